//! The frames of the remote page protocol (`docs/remote-protocol.md`): encoding, and decoding
//! with every length checked before anything is allocated or read.

use std::io::{self, Read};

use crate::source::Retry;

/// The protocol's magic, first in `HELLO` and `WELCOME`.
pub const MAGIC: [u8; 4] = *b"FLRP";
/// The newest protocol version this crate speaks (2 adds `KEEP` and `SAME`: duplicate pages
/// travel once per connection).
pub const VERSION: u16 = 2;
/// The oldest protocol version this crate speaks.
pub const MIN_VERSION: u16 = 1;
/// Most bytes a version-2 client keeps for `KEEP` slots: slots are `0 .. MAX_KEPT_BYTES /
/// page_size`.
pub const MAX_KEPT_BYTES: u32 = 16 << 20;
/// Largest `DATA` payload.
pub const MAX_DATA: u32 = 2 << 20;
/// Largest frame (`len`: type byte + body).
pub const MAX_FRAME: u32 = MAX_DATA + 64;
/// Most ranges in one `READ`.
pub const MAX_RANGES: u16 = 1024;
/// Longest range in a `READ`.
pub const MAX_RANGE_LEN: u32 = 64 << 20;
/// Smallest page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Longest source name.
pub const MAX_NAME: usize = 256;
/// Longest refusal reason or error message.
pub const MAX_MESSAGE: usize = 1024;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSED: u8 = 3;
const T_READ: u8 = 4;
const T_DATA: u8 = 5;
const T_ZERO: u8 = 6;
const T_ERROR: u8 = 7;
const T_KEEP: u8 = 8;
const T_SAME: u8 = 9;

/// Bytes of a `DATA`/`ZERO` body before the payload: id, offset, len.
const ANSWER_HEAD: usize = 8 + 8 + 4;
/// [`ANSWER_HEAD`] as a `u32`, for frame lengths.
const ANSWER_HEAD_U32: u32 = 8 + 8 + 4;
const _: () = assert!(ANSWER_HEAD_U32 as usize == ANSWER_HEAD);

/// A frame that breaks the protocol, or the connection failing under it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// A frame length outside `1..=MAX_FRAME`.
    #[error("frame length {0} is out of bounds")]
    FrameLength(u32),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A body shorter or longer than its type implies.
    #[error("{frame} frame has {got} body bytes, expected {want}")]
    BodyLength {
        /// The frame type.
        frame: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes implied by its fields.
        want: usize,
    },
    /// A field with a value the protocol does not allow.
    #[error("{0}")]
    Invalid(String),
}

/// How urgent a read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A thread waits for it.
    Demand,
    /// Prefetch.
    Background,
}

/// A byte range of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRange {
    /// Start offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// The server's answer to an accepted hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version the connection uses.
    pub version: u16,
    /// Unit of requests and answers.
    pub page_size: u32,
    /// Source length in bytes.
    pub source_len: u64,
    /// Identifies the bytes served.
    pub source_id: u64,
    /// Most ranges per `READ` the server accepts.
    pub max_ranges: u16,
    /// Longest range the server accepts.
    pub max_range_len: u32,
    /// The source's name.
    pub name: String,
}

impl Welcome {
    /// Whether `other` serves the same bytes (same length, page size and id).
    pub fn same_source(&self, other: &Welcome) -> bool {
        self.source_len == other.source_len
            && self.page_size == other.page_size
            && self.source_id == other.source_id
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → server, first.
    Hello {
        /// Lowest version spoken.
        min_version: u16,
        /// Highest version spoken.
        max_version: u16,
    },
    /// Server → client: accepted.
    Welcome(Welcome),
    /// Server → client: not accepted.
    Refused {
        /// Why.
        reason: String,
    },
    /// Client → server: read these ranges.
    Read {
        /// Request id.
        id: u64,
        /// Demand or background.
        priority: Priority,
        /// The ranges, answered in this order.
        ranges: Vec<WireRange>,
    },
    /// Server → client: bytes.
    Data {
        /// Request id.
        id: u64,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Server → client: `len` zero bytes.
    Zero {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Server → client: these bytes could not be read.
    Error {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Whether asking again may help.
        retry: Retry,
        /// What went wrong.
        message: String,
    },
    /// Server → client (version 2): keep these bytes (one page) as `slot` for the rest of the
    /// connection; `SAME` frames refer to them.
    Keep {
        /// Slot number, below `MAX_KEPT_BYTES / page_size`.
        slot: u32,
        /// The page's bytes.
        bytes: Vec<u8>,
    },
    /// Server → client (version 2): each page of `offset..offset + len` holds the bytes kept
    /// in `slot`.
    Same {
        /// Request id.
        id: u64,
        /// Offset.
        offset: u64,
        /// Length (whole pages).
        len: u32,
        /// The kept slot.
        slot: u32,
    },
}

/// Clip a message to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = clip(s, max);
    let len = u16::try_from(s.len()).expect("strings are clipped to MAX_NAME or MAX_MESSAGE");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The fields every answer frame starts with: request id, offset, length.
fn put_answer_head(out: &mut Vec<u8>, id: u64, offset: u64, len: u32) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Start a frame of type `t` in `out`; returns where its length goes.
fn begin(out: &mut Vec<u8>, t: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, t]);
    at
}

fn finish(out: &mut [u8], at: usize) {
    let len = u32::try_from(out.len() - at - 4).expect("a frame is at most MAX_FRAME bytes");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

impl Frame {
    /// Append the encoded frame to `out`. Strings are clipped to their limits; the caller keeps
    /// counts and lengths within theirs (checked in debug builds).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                min_version,
                max_version,
            } => {
                let at = begin(out, T_HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&min_version.to_le_bytes());
                out.extend_from_slice(&max_version.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                finish(out, at);
            }
            Frame::Welcome(w) => {
                let at = begin(out, T_WELCOME);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&w.version.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(&w.page_size.to_le_bytes());
                out.extend_from_slice(&w.source_len.to_le_bytes());
                out.extend_from_slice(&w.source_id.to_le_bytes());
                out.extend_from_slice(&w.max_ranges.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(&w.max_range_len.to_le_bytes());
                put_str(out, &w.name, MAX_NAME);
                finish(out, at);
            }
            Frame::Refused { reason } => {
                let at = begin(out, T_REFUSED);
                put_str(out, reason, MAX_MESSAGE);
                finish(out, at);
            }
            Frame::Read {
                id,
                priority,
                ranges,
            } => {
                debug_assert!(!ranges.is_empty() && ranges.len() <= usize::from(MAX_RANGES));
                let at = begin(out, T_READ);
                out.extend_from_slice(&id.to_le_bytes());
                out.push(match priority {
                    Priority::Demand => 0,
                    Priority::Background => 1,
                });
                out.push(0);
                let count = u16::try_from(ranges.len()).expect("at most MAX_RANGES ranges");
                out.extend_from_slice(&count.to_le_bytes());
                for r in ranges {
                    out.extend_from_slice(&r.offset.to_le_bytes());
                    out.extend_from_slice(&r.len.to_le_bytes());
                }
                finish(out, at);
            }
            Frame::Data { id, offset, bytes } => {
                debug_assert!(bytes.len() <= MAX_DATA as usize);
                let len = u32::try_from(bytes.len()).expect("at most MAX_DATA bytes");
                out.extend_from_slice(&data_head(*id, *offset, len));
                out.extend_from_slice(bytes);
            }
            Frame::Zero { id, offset, len } => {
                let at = begin(out, T_ZERO);
                put_answer_head(out, *id, *offset, *len);
                finish(out, at);
            }
            Frame::Error {
                id,
                offset,
                len,
                retry,
                message,
            } => {
                let at = begin(out, T_ERROR);
                put_answer_head(out, *id, *offset, *len);
                out.push(u8::from(*retry == Retry::Retryable));
                put_str(out, message, MAX_MESSAGE);
                finish(out, at);
            }
            Frame::Keep { slot, bytes } => {
                debug_assert!(bytes.len() <= MAX_DATA as usize);
                let len = u32::try_from(bytes.len()).expect("at most MAX_DATA bytes");
                out.extend_from_slice(&keep_head(*slot, len));
                out.extend_from_slice(bytes);
            }
            Frame::Same {
                id,
                offset,
                len,
                slot,
            } => {
                let at = begin(out, T_SAME);
                put_answer_head(out, *id, *offset, *len);
                out.extend_from_slice(&slot.to_le_bytes());
                finish(out, at);
            }
        }
    }

    /// Decode a frame from its type byte and body (everything after the length).
    pub fn decode(t: u8, body: &[u8]) -> Result<Frame, WireError> {
        let mut r = Cursor::new(body);
        let frame = match t {
            T_HELLO => {
                r.magic()?;
                let min_version = r.u16()?;
                let max_version = r.u16()?;
                if r.u32()? != 0 {
                    return Err(invalid("hello flags must be zero"));
                }
                if min_version > max_version {
                    return Err(invalid("hello: min_version > max_version"));
                }
                Frame::Hello {
                    min_version,
                    max_version,
                }
            }
            T_WELCOME => {
                r.magic()?;
                let version = r.u16()?;
                r.reserved16("welcome")?;
                let page_size = r.u32()?;
                let source_len = r.u64()?;
                let source_id = r.u64()?;
                let max_ranges = r.u16()?;
                r.reserved16("welcome")?;
                let max_range_len = r.u32()?;
                let name = r.string(MAX_NAME)?;
                if !page_size.is_power_of_two()
                    || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
                {
                    return Err(invalid(format!("welcome: page size {page_size}")));
                }
                if max_ranges == 0 || max_ranges > MAX_RANGES {
                    return Err(invalid(format!("welcome: max_ranges {max_ranges}")));
                }
                if max_range_len < page_size
                    || max_range_len > MAX_RANGE_LEN
                    || max_range_len % page_size != 0
                {
                    return Err(invalid(format!("welcome: max_range_len {max_range_len}")));
                }
                Frame::Welcome(Welcome {
                    version,
                    page_size,
                    source_len,
                    source_id,
                    max_ranges,
                    max_range_len,
                    name,
                })
            }
            T_REFUSED => Frame::Refused {
                reason: r.string(MAX_MESSAGE)?,
            },
            T_READ => {
                let id = r.u64()?;
                let priority = match r.u8()? {
                    0 => Priority::Demand,
                    1 => Priority::Background,
                    p => return Err(invalid(format!("read: priority {p}"))),
                };
                if r.u8()? != 0 {
                    return Err(invalid("read: reserved byte must be zero"));
                }
                let count = r.u16()?;
                if count == 0 || count > MAX_RANGES {
                    return Err(invalid(format!("read: {count} ranges")));
                }
                let want = 12 + usize::from(count) * 12;
                if body.len() != want {
                    return Err(WireError::BodyLength {
                        frame: "READ",
                        got: body.len(),
                        want,
                    });
                }
                let mut ranges = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let offset = r.u64()?;
                    let len = r.u32()?;
                    ranges.push(WireRange { offset, len });
                }
                Frame::Read {
                    id,
                    priority,
                    ranges,
                }
            }
            T_DATA => {
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                check_data_len(len, body.len())?;
                let bytes = r.take(len as usize)?.to_vec();
                Frame::Data { id, offset, bytes }
            }
            T_ZERO => {
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                Frame::Zero { id, offset, len }
            }
            T_ERROR => {
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                let retry = match r.u8()? {
                    0 => Retry::Permanent,
                    1 => Retry::Retryable,
                    v => return Err(invalid(format!("error: retry {v}"))),
                };
                let message = r.string(MAX_MESSAGE)?;
                Frame::Error {
                    id,
                    offset,
                    len,
                    retry,
                    message,
                }
            }
            T_KEEP => {
                let slot = r.u32()?;
                let n = body.len() - r.at;
                if n == 0 || n > MAX_DATA as usize {
                    return Err(invalid(format!("keep: {n} bytes")));
                }
                let bytes = r.take(n)?.to_vec();
                Frame::Keep { slot, bytes }
            }
            T_SAME => {
                let id = r.u64()?;
                let offset = r.u64()?;
                let len = r.u32()?;
                let slot = r.u32()?;
                if len == 0 {
                    return Err(invalid("same: length 0"));
                }
                Frame::Same {
                    id,
                    offset,
                    len,
                    slot,
                }
            }
            t => return Err(WireError::UnknownType(t)),
        };
        if r.at != body.len() {
            return Err(WireError::BodyLength {
                frame: type_name(t),
                got: body.len(),
                want: r.at,
            });
        }
        Ok(frame)
    }
}

fn type_name(t: u8) -> &'static str {
    match t {
        T_HELLO => "HELLO",
        T_WELCOME => "WELCOME",
        T_REFUSED => "REFUSED",
        T_READ => "READ",
        T_DATA => "DATA",
        T_ZERO => "ZERO",
        T_ERROR => "ERROR",
        T_KEEP => "KEEP",
        T_SAME => "SAME",
        _ => "unknown",
    }
}

fn check_data_len(len: u32, body_len: usize) -> Result<(), WireError> {
    if len == 0 || len > MAX_DATA {
        return Err(invalid(format!("data: length {len}")));
    }
    let want = ANSWER_HEAD + len as usize;
    if body_len != want {
        return Err(WireError::BodyLength {
            frame: "DATA",
            got: body_len,
            want,
        });
    }
    Ok(())
}

fn invalid(what: impl Into<String>) -> WireError {
    WireError::Invalid(what.into())
}

/// The header of a `DATA` frame carrying `len` bytes (the bytes follow it on the wire).
pub fn data_head(id: u64, offset: u64, len: u32) -> [u8; 4 + 1 + ANSWER_HEAD] {
    let mut h = [0u8; 4 + 1 + ANSWER_HEAD];
    h[..4].copy_from_slice(&(1 + ANSWER_HEAD_U32 + len).to_le_bytes());
    h[4] = T_DATA;
    h[5..13].copy_from_slice(&id.to_le_bytes());
    h[13..21].copy_from_slice(&offset.to_le_bytes());
    h[21..25].copy_from_slice(&len.to_le_bytes());
    h
}

/// The header of a `KEEP` frame carrying `len` bytes (the bytes follow it on the wire).
pub fn keep_head(slot: u32, len: u32) -> [u8; 4 + 1 + 4] {
    let mut h = [0u8; 9];
    h[..4].copy_from_slice(&(1 + 4 + len).to_le_bytes());
    h[4] = T_KEEP;
    h[5..9].copy_from_slice(&slot.to_le_bytes());
    h
}

/// Reads little-endian fields from a body, failing on truncation.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Cursor<'a> {
        Cursor { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(end) => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(invalid(format!(
                "truncated frame: {} bytes needed at byte {} of {}",
                n,
                self.at,
                self.b.len()
            ))),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A reserved 16-bit field, which must be zero.
    fn reserved16(&mut self, frame: &str) -> Result<(), WireError> {
        match self.u16()? {
            0 => Ok(()),
            v => Err(invalid(format!(
                "{frame}: reserved field is {v}, must be zero"
            ))),
        }
    }

    fn magic(&mut self) -> Result<(), WireError> {
        if self.array::<4>()? != MAGIC {
            return Err(invalid("bad magic (not a faultline remote page peer)"));
        }
        Ok(())
    }
    fn string(&mut self, max: usize) -> Result<String, WireError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(invalid(format!("string of {n} bytes (at most {max})")));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| invalid("string is not UTF-8"))
    }
}

/// Whether `buffered` (bytes received, not yet read) begins with a whole frame, so that
/// [`read_frame`] takes it without waiting for the peer. Only the length is looked at: the
/// frame is checked when it is read.
pub fn holds_whole_frame(buffered: &[u8]) -> bool {
    match buffered.get(..4) {
        Some(l) => {
            let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]);
            4 + u64::from(len) <= buffered.len() as u64
        }
        None => false,
    }
}

/// Read one frame. `DATA` payloads are read straight into their own buffer (one copy from the
/// socket); other bodies go through `scratch`.
pub fn read_frame(r: &mut impl Read, scratch: &mut Vec<u8>) -> Result<Frame, WireError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::FrameLength(len));
    }
    let t = head[4];
    let body_len = (len - 1) as usize;
    if t == T_DATA {
        if body_len < ANSWER_HEAD {
            return Err(WireError::BodyLength {
                frame: "DATA",
                got: body_len,
                want: ANSWER_HEAD,
            });
        }
        let mut h = [0u8; ANSWER_HEAD];
        r.read_exact(&mut h)?;
        let mut c = Cursor::new(&h);
        let id = c.u64()?;
        let offset = c.u64()?;
        let n = c.u32()?;
        check_data_len(n, body_len)?;
        let mut bytes = Vec::with_capacity(n as usize);
        let got = r.take(u64::from(n)).read_to_end(&mut bytes)?;
        if got != n as usize {
            return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        return Ok(Frame::Data { id, offset, bytes });
    }
    scratch.clear();
    scratch.resize(body_len, 0);
    r.read_exact(scratch)?;
    Frame::decode(t, scratch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let mut out = Vec::new();
        f.encode(&mut out);
        let mut scratch = Vec::new();
        let back = read_frame(&mut &out[..], &mut scratch).unwrap();
        // The slice decoder agrees with the stream reader.
        assert_eq!(Frame::decode(out[4], &out[5..]).unwrap(), back);
        back
    }

    fn welcome() -> Welcome {
        Welcome {
            version: 1,
            page_size: 4096,
            source_len: 1 << 30,
            source_id: 0xfeed,
            max_ranges: 1024,
            max_range_len: 64 << 20,
            name: "mem".into(),
        }
    }

    #[test]
    fn every_frame_roundtrips() {
        let frames = [
            Frame::Hello {
                min_version: 1,
                max_version: 3,
            },
            Frame::Welcome(welcome()),
            Frame::Refused {
                reason: "busy".into(),
            },
            Frame::Read {
                id: 7,
                priority: Priority::Background,
                ranges: vec![
                    WireRange {
                        offset: 0,
                        len: 4096,
                    },
                    WireRange {
                        offset: 1 << 40,
                        len: 8192,
                    },
                ],
            },
            Frame::Data {
                id: 9,
                offset: 4096,
                bytes: vec![5; 4096],
            },
            Frame::Zero {
                id: 9,
                offset: 8192,
                len: 1 << 20,
            },
            Frame::Error {
                id: 2,
                offset: 0,
                len: 4096,
                retry: Retry::Retryable,
                message: "EIO".into(),
            },
            Frame::Keep {
                slot: 3,
                bytes: vec![7; 4096],
            },
            Frame::Same {
                id: 9,
                offset: 3 << 12,
                len: 8192,
                slot: 3,
            },
        ];
        for f in &frames {
            assert_eq!(&roundtrip(f), f);
        }
    }

    /// An encoded `ZERO` frame of one page.
    fn zero_frame() -> Vec<u8> {
        let mut out = Vec::new();
        Frame::Zero {
            id: 1,
            offset: 0,
            len: 4096,
        }
        .encode(&mut out);
        out
    }

    #[test]
    fn a_whole_frame_is_told_from_a_part_of_one() {
        let mut out = zero_frame();
        assert!(holds_whole_frame(&out));
        assert!(!holds_whole_frame(&out[..out.len() - 1]));
        assert!(!holds_whole_frame(&out[..3]));
        out.push(9); // the start of the next frame does not matter
        assert!(holds_whole_frame(&out));
    }

    #[test]
    fn lengths_are_checked_before_reading() {
        // A frame claiming 4 GiB is refused from its header alone.
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.push(T_DATA);
        let e = read_frame(&mut &bytes[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, WireError::FrameLength(u32::MAX)), "{e}");
        let e = read_frame(&mut &[0u8, 0, 0, 0, 1][..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, WireError::FrameLength(0)), "{e}");
        // DATA whose inner length disagrees with the frame length.
        let mut out = Vec::new();
        Frame::Data {
            id: 1,
            offset: 0,
            bytes: vec![1; 100],
        }
        .encode(&mut out);
        out[21] = 99; // inner len 99, frame len says 100
        assert!(read_frame(&mut &out[..], &mut Vec::new()).is_err());
        assert!(Frame::decode(out[4], &out[5..]).is_err());
        // Trailing bytes.
        let mut out = zero_frame();
        out.push(0);
        out[0] += 1;
        let e = read_frame(&mut &out[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, WireError::BodyLength { .. }), "{e}");
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut w = welcome();
        w.page_size = 4097;
        let mut out = Vec::new();
        Frame::Welcome(w).encode(&mut out);
        assert!(Frame::decode(out[4], &out[5..]).is_err());
        let mut out = Vec::new();
        Frame::Welcome(welcome()).encode(&mut out);
        out[5 + 6] = 3; // the reserved u16 after the version
        let e = Frame::decode(out[4], &out[5..]).unwrap_err();
        assert_eq!(e.to_string(), "welcome: reserved field is 3, must be zero");

        let mut out = Vec::new();
        Frame::Read {
            id: 1,
            priority: Priority::Demand,
            ranges: vec![WireRange { offset: 0, len: 1 }],
        }
        .encode(&mut out);
        let mut bad = out.clone();
        bad[5 + 8] = 2; // priority 2
        assert!(Frame::decode(bad[4], &bad[5..]).is_err());
        let mut bad = out.clone();
        bad[5 + 10] = 2; // count 2, one range present
        assert!(Frame::decode(bad[4], &bad[5..]).is_err());
        let mut bad = out.clone();
        bad[5 + 9] = 1; // reserved byte
        let e = Frame::decode(bad[4], &bad[5..]).unwrap_err();
        assert_eq!(e.to_string(), "read: reserved byte must be zero");
        let mut bad = out;
        bad[5] = b'x';
        bad[4] = 99;
        assert!(matches!(
            Frame::decode(bad[4], &bad[5..]),
            Err(WireError::UnknownType(99))
        ));
        let mut hello = Vec::new();
        Frame::Hello {
            min_version: 1,
            max_version: 1,
        }
        .encode(&mut hello);
        hello[5] = b'X';
        assert!(Frame::decode(hello[4], &hello[5..]).is_err());
        // KEEP without bytes, SAME of no pages.
        let keep = keep_head(1, 0);
        let e = Frame::decode(keep[4], &keep[5..]).unwrap_err();
        assert_eq!(e.to_string(), "keep: 0 bytes");
        let mut same = Vec::new();
        Frame::Same {
            id: 1,
            offset: 0,
            len: 0,
            slot: 0,
        }
        .encode(&mut same);
        let e = Frame::decode(same[4], &same[5..]).unwrap_err();
        assert_eq!(e.to_string(), "same: length 0");
    }

    #[test]
    fn long_strings_are_clipped_on_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE);
        let back = roundtrip(&Frame::Refused {
            reason: msg.clone(),
        });
        let Frame::Refused { reason } = back else {
            panic!("not a refusal")
        };
        assert!(reason.len() <= MAX_MESSAGE && msg.starts_with(&reason));
    }

    proptest! {
        #[test]
        fn decode_never_panics(t in 0u8..10, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(t, &body);
            let mut framed = u32::try_from(body.len() + 1).unwrap().to_le_bytes().to_vec();
            framed.push(t);
            framed.extend_from_slice(&body);
            let _ = read_frame(&mut &framed[..], &mut Vec::new());
        }

        #[test]
        fn reads_roundtrip(id in any::<u64>(), bg in any::<bool>(),
                           ranges in proptest::collection::vec((any::<u64>(), any::<u32>()), 1..50)) {
            let f = Frame::Read {
                id,
                priority: if bg { Priority::Background } else { Priority::Demand },
                ranges: ranges.into_iter().map(|(offset, len)| WireRange { offset, len }).collect(),
            };
            prop_assert_eq!(roundtrip(&f), f);
        }
    }
}
