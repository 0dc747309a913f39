//! Reading the handshake's JSON: where one complete value ends in a byte stream
//! ([`JsonFramer`]), and its parse into [`GuestRegionUffdMapping`]s ([`parse_mappings`]), type by
//! type, every error naming the region and the field.

use serde_json::Value;

use super::{GuestRegionUffdMapping, HandshakeError};

/// What [`JsonFramer::feed`] has seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The value is not complete yet.
    NeedMore,
    /// The array closed: the message is the first `len` bytes fed (bytes after it were fed too).
    Complete {
        /// Length of the message, from the first byte fed through the closing `]`.
        len: usize,
    },
    /// The first non-whitespace byte is not `[`: this is no handshake, stop reading and let
    /// [`parse_mappings`] say what it is.
    NotAnArray,
}

/// Finds the end of a JSON array arriving in pieces, in O(1) per byte, without parsing it.
///
/// It tracks strings (with escapes) and the nesting depth of `[`/`{` against `]`/`}` and reports
/// [`Framing::Complete`] when the outermost array closes. It does not check syntax (`[}` is
/// "complete"): the framed bytes go to [`parse_mappings`], which does. For valid JSON it reports
/// `Complete` exactly at the closing bracket, however the bytes are split.
#[derive(Debug, Clone, Default)]
pub struct JsonFramer {
    seen: usize,
    started: bool,
    depth: usize,
    in_string: bool,
    escaped: bool,
    done: Option<Framing>,
}

impl JsonFramer {
    /// A framer that has seen nothing.
    pub fn new() -> Self {
        JsonFramer::default()
    }

    /// Feeds the next bytes. Once it returned `Complete` or `NotAnArray` it keeps returning that.
    pub fn feed(&mut self, bytes: &[u8]) -> Framing {
        if let Some(done) = self.done {
            return done;
        }
        for &byte in bytes {
            self.seen += 1;
            if !self.started {
                match byte {
                    b' ' | b'\t' | b'\n' | b'\r' => continue,
                    b'[' => {
                        self.started = true;
                        self.depth = 1;
                        continue;
                    }
                    _ => {
                        self.done = Some(Framing::NotAnArray);
                        return Framing::NotAnArray;
                    }
                }
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let done = Framing::Complete { len: self.seen };
                        self.done = Some(done);
                        return done;
                    }
                }
                _ => {}
            }
        }
        Framing::NeedMore
    }
}

/// The kind of a JSON value, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value rendered for an error message, at most 64 characters.
fn render(value: &Value) -> String {
    const MAX: usize = 64;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Parses a handshake message into its mappings: a JSON array of objects with the unsigned
/// integer fields `base_host_virt_addr`, `size`, `offset` and optionally `page_size` and
/// `page_size_kib`. Unknown fields are ignored, `null` optional fields are absent. Whitespace may
/// surround the array; anything else after it is an error.
///
/// This is pure and checks only the shape and types; [`validate`](super::validate()) checks
/// the values. Both the handler and the fuzzer use it.
pub fn parse_mappings(bytes: &[u8]) -> Result<Vec<GuestRegionUffdMapping>, HandshakeError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|source| HandshakeError::BadJson {
        line: source.line(),
        column: source.column(),
        source,
    })?;
    let Value::Array(elements) = value else {
        return Err(HandshakeError::NotAnArray {
            found: kind_of(&value),
        });
    };
    elements
        .iter()
        .enumerate()
        .map(|(index, element)| mapping_from_value(index, element))
        .collect()
}

fn mapping_from_value(
    index: usize,
    value: &Value,
) -> Result<GuestRegionUffdMapping, HandshakeError> {
    let Value::Object(fields) = value else {
        return Err(HandshakeError::NotAnObject {
            index,
            found: kind_of(value),
        });
    };
    let number = |field: &'static str, value: &Value| {
        value.as_u64().ok_or_else(|| HandshakeError::BadField {
            index,
            field,
            found: render(value),
        })
    };
    let required = |field: &'static str| match fields.get(field) {
        None => Err(HandshakeError::MissingField { index, field }),
        Some(value) => number(field, value),
    };
    let optional = |field: &'static str| match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => number(field, value).map(Some),
    };
    Ok(GuestRegionUffdMapping {
        base_host_virt_addr: required("base_host_virt_addr")?,
        size: required("size")?,
        offset: required("offset")?,
        page_size: optional("page_size")?,
        page_size_kib: optional("page_size_kib")?,
    })
}
