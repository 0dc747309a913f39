//! The Firecracker page-fault handler protocol: the region mappings, the handshake on the Unix
//! socket, and the checks that make the client's word safe to act on.
//!
//! # The protocol
//! Firecracker restores a snapshot with `mem_backend: {backend_type: "Uffd", backend_path: SOCK}`:
//! it maps guest memory (anonymous, or hugetlbfs for 2 MiB-page guests), creates a userfaultfd
//! (`O_CLOEXEC | O_NONBLOCK`, feature `EVENT_REMOVE`), registers every region in MISSING mode,
//! connects to the handler's Unix **stream** socket and sends one message: a UTF-8 JSON array of
//! [`GuestRegionUffdMapping`]s with the userfaultfd attached as `SCM_RIGHTS`. It then keeps the
//! socket open and sends nothing more.
//! ```text
//! [{"base_host_virt_addr": 140241283469312, "size": 134217728, "offset": 0,
//!   "page_size": 4096, "page_size_kib": 4096}, ...]
//! ```
//! [`receive_handshake`] is the handler's side: it reads the message, the fds and the peer's
//! credentials (`SO_PEERCRED`), parses ([`parse_mappings`]) and validates ([`validate`]) it, and
//! returns a [`Handshake`]. [`send_handshake`] is the client's side, for tests and demos.
//!
//! # Corner cases handled here
//! - **One message, many reads.** The public example handlers read the message with a single
//!   1024-byte `recv` and parse whatever arrived. A VM with many regions sends more than that (about
//!   110 bytes a region), and a stream socket may split any message anyway. We read until a
//!   complete JSON value has arrived ([`JsonFramer`] tracks the bracket depth incrementally, so
//!   reassembly costs O(n) however the bytes are split), bounded by [`Limits::max_message`], and
//!   within a total deadline ([`Limits::timeout`]) so a client that connects and sends nothing —
//!   or one byte a second — cannot hold the handler.
//! - **fds on any read.** The fds normally come with the first byte, but they are collected from
//!   every `recvmsg` (with `MSG_CMSG_CLOEXEC`, so they never leak into a child). The message must
//!   carry exactly one (the userfaultfd) or two (some forks add a memfd holding guest memory); more,
//!   or a truncated control message, is an error. Every received fd is an [`OwnedFd`], so an error
//!   closes them.
//! - **Page size by release.** Up to v1.6 there is no page-size field (4096 is meant); v1.7–v1.11
//!   send `page_size_kib`, whose value is in **bytes** despite its name (4096 or 2097152); v1.12+
//!   send both with the same value; forks (and, as announced, Firecracker 2.0, which drops the
//!   deprecated `page_size_kib`) send only `page_size`. All four shapes are accepted; when both
//!   fields are present they must agree.
//! - **Forward compatibility.** Fields we do not know (forks add e.g. `gpa_start`) are accepted and
//!   ignored; `null` in an optional field means absent (as for a serde `Option`). A repeated key
//!   keeps its last value.
//! - **Nothing from the client is trusted.** Types are checked field by field (an error names the
//!   region and the field); every region must be non-empty, 4 KiB- or 2 MiB-paged, page-aligned in
//!   address, size and file offset, free of overflow, inside the memory file (a fault can never
//!   make the handler read past it), and disjoint from every other region; all regions share one
//!   page size. The single fd is checked to be a userfaultfd (through `/proc/self/fd`, when
//!   `/proc` is mounted), so the later `unsafe` adoption of it has its precondition checked.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The base page size (and the page size when the message names none).
pub const PAGE_SIZE_4K: u64 = 4096;
/// The huge page size of hugetlbfs-backed guests.
pub const PAGE_SIZE_2M: u64 = 2 * 1024 * 1024;

/// What `readlink("/proc/self/fd/N")` says for a userfaultfd (from `userfaultfd(2)` and from
/// `/dev/userfaultfd` alike).
const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// Bytes asked for per `recvmsg`.
const RECV_CHUNK: usize = 64 * 1024;

/// Room for this many fds in one `recvmsg`'s control buffer. More than the protocol allows, so a
/// client that sends 3 gets a precise count; beyond it the kernel truncates (and closes the rest).
const FD_ROOM: usize = 8;

/// One guest memory region as Firecracker describes it in the handshake.
///
/// Deserializing with serde (`serde_json::from_slice::<Vec<GuestRegionUffdMapping>>`) accepts the
/// same documents as [`parse_mappings`] (which is what the handler uses, because its errors name
/// the region and the field), except that serde rejects a repeated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region starts in the client's address space.
    pub base_host_virt_addr: u64,
    /// Region size in bytes.
    pub size: u64,
    /// Where the region's bytes start in the memory file (the running sum of earlier sizes).
    pub offset: u64,
    /// The page size in bytes (Firecracker v1.12+ and forks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// The page size in **bytes**, despite the name (Firecracker v1.7+; deprecated upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// A mapping with the given page size, carried in both page-size fields (the v1.12+ shape).
    pub fn new(base_host_virt_addr: u64, size: u64, offset: u64, page_size: u64) -> Self {
        GuestRegionUffdMapping {
            base_host_virt_addr,
            size,
            offset,
            page_size: Some(page_size),
            page_size_kib: Some(page_size),
        }
    }

    /// The page size the fields state, without checking it is supported: `page_size` or
    /// `page_size_kib` (both in bytes), 4096 when neither is present. `Err` when both are present
    /// and disagree; `index` only labels the error.
    pub fn stated_page_size(&self, index: usize) -> Result<u64, HandshakeError> {
        match (self.page_size, self.page_size_kib) {
            (None, None) => Ok(PAGE_SIZE_4K),
            (Some(size), None) | (None, Some(size)) => Ok(size),
            (Some(page_size), Some(page_size_kib)) if page_size == page_size_kib => Ok(page_size),
            (Some(page_size), Some(page_size_kib)) => Err(HandshakeError::PageSizeMismatch {
                index,
                page_size,
                page_size_kib,
            }),
        }
    }

    /// Which of the protocol's shapes this mapping has.
    pub fn shape(&self) -> JsonShape {
        match (self.page_size, self.page_size_kib) {
            (None, None) => JsonShape::NoPageSize,
            (None, Some(_)) => JsonShape::PageSizeKib,
            (Some(_), None) => JsonShape::PageSizeOnly,
            (Some(_), Some(_)) => JsonShape::Both,
        }
    }
}

/// The page-size fields a client sends, by Firecracker release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JsonShape {
    /// No page-size field (up to v1.6): the receiver assumes 4096, so a 2 MiB page size is lost.
    NoPageSize,
    /// `page_size_kib` only, in bytes (v1.7 – v1.11).
    PageSizeKib,
    /// Both `page_size` and `page_size_kib`, same value (v1.12+).
    Both,
    /// `page_size` only (forks; Firecracker 2.0 drops `page_size_kib`).
    PageSizeOnly,
}

impl JsonShape {
    /// Every shape.
    pub const ALL: [JsonShape; 4] = [
        JsonShape::NoPageSize,
        JsonShape::PageSizeKib,
        JsonShape::Both,
        JsonShape::PageSizeOnly,
    ];
}

/// A region that passed [`validate`]: non-empty, aligned, inside the memory file, disjoint from
/// the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ValidatedRegion {
    /// Start address in the client's address space.
    pub start: u64,
    /// Length in bytes (a non-zero multiple of `page_size`).
    pub len: u64,
    /// 4096 or 2097152.
    pub page_size: u64,
    /// Offset of the region's first byte in the memory file; `offset + len <= mem_len`.
    pub offset: u64,
}

impl ValidatedRegion {
    /// One past the last address (cannot overflow: checked by [`validate`]).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The bounds [`receive_handshake`] and [`validate`] enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted message in bytes (default 1 MiB, room for about 9000 regions).
    pub max_message: usize,
    /// Most regions in one message (default 1024).
    pub max_regions: usize,
    /// Total time from the start of [`receive_handshake`] to a complete message (default 5 s).
    pub timeout: Duration,
    /// Length of the memory file the regions' offsets point into. [`receive_handshake`] checks
    /// `offset + size` against it and, when the client attaches a memory fd, against that fd's
    /// size too. `None`: no file bound other than the memory fd's (default).
    pub mem_len: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 1 << 20,
            max_regions: 1024,
            timeout: Duration::from_secs(5),
            mem_len: None,
        }
    }
}

/// The credentials of the socket's peer at connect time (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// The client's process id as seen from this process's pid namespace; the kernel reports 0
    /// when the client's pid is not visible here (e.g. a handler in a sibling container).
    pub pid: i32,
    /// The client's effective user id.
    pub uid: u32,
    /// The client's effective group id.
    pub gid: u32,
}

/// A received and validated handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The regions, in the order the client sent them.
    pub mappings: Vec<ValidatedRegion>,
    /// The client's userfaultfd (close-on-exec). Firecracker negotiated `EVENT_REMOVE` on it;
    /// adopt it with `faultline_uffd::Uffd::from_initialized_fd`.
    pub uffd: OwnedFd,
    /// The second fd some forks attach: a memfd holding guest memory (close-on-exec).
    pub mem_fd: Option<OwnedFd>,
    /// Who connected.
    pub peer: PeerCred,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A socket call failed.
    #[error("{op} on the handshake socket failed")]
    Io {
        /// The call (`recvmsg`, `poll`, `SO_PEERCRED`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No complete message before the deadline.
    #[error("no complete handshake message within {timeout:?} ({received} bytes received)")]
    Timeout {
        /// The limit that expired.
        timeout: Duration,
        /// Bytes received by then.
        received: usize,
    },
    /// The client closed the connection before a complete message.
    #[error("client closed the connection after {received} bytes, before a complete handshake")]
    Closed {
        /// Bytes received before the end of stream.
        received: usize,
    },
    /// The message grew past the limit without completing.
    #[error("handshake message exceeds {limit} bytes without completing")]
    MessageTooLarge {
        /// The byte limit.
        limit: usize,
    },
    /// The bytes are not JSON.
    #[error("handshake message is not valid JSON (line {line}, column {column})")]
    BadJson {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What the JSON parser says.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON value is not an array.
    #[error("handshake message must be a JSON array of regions, found {found}")]
    NotAnArray {
        /// The kind of value found (`an object`, `a string`, ...).
        found: &'static str,
    },
    /// An array element is not an object.
    #[error("region {index}: must be a JSON object, found {found}")]
    NotAnObject {
        /// Position in the array.
        index: usize,
        /// The kind of value found.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("region {index}: missing field `{field}`")]
    MissingField {
        /// Position in the array.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A field does not hold an unsigned 64-bit integer.
    #[error("region {index}: field `{field}` must be an unsigned 64-bit integer, found {found}")]
    BadField {
        /// Position in the array.
        index: usize,
        /// The field.
        field: &'static str,
        /// The value found, as JSON (shortened when long).
        found: String,
    },
    /// No fd came with the message.
    #[error("handshake carried no file descriptor; expected the userfaultfd as SCM_RIGHTS")]
    NoFd,
    /// More fds than the protocol allows.
    #[error(
        "handshake carried {count}{} file descriptors; expected 1 (the userfaultfd) or 2 \
         (the userfaultfd and a memory fd)",
        if *truncated { " or more" } else { "" }
    )]
    TooManyFds {
        /// How many were received.
        count: usize,
        /// The kernel truncated the control message: more were sent (and closed unread).
        truncated: bool,
    },
    /// The fd in the userfaultfd position is something else.
    #[error("the handshake's fd is not a userfaultfd (it is `{found}`)")]
    NotAUserfaultfd {
        /// What `/proc/self/fd` says it is.
        found: String,
    },
    /// The second fd is not a memory file.
    #[error("the handshake's second fd is not a guest-memory file (it is `{found}`)")]
    MemFdNotAFile {
        /// What `/proc/self/fd` says it is.
        found: String,
    },
    /// The array is empty.
    #[error("handshake lists no regions")]
    Empty,
    /// More regions than the limit.
    #[error("handshake lists {count} regions, more than the limit of {limit}")]
    TooManyRegions {
        /// Regions in the message.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A region of size 0.
    #[error("region {index}: size is 0")]
    ZeroSize {
        /// Position in the array.
        index: usize,
    },
    /// A page size other than 4 KiB or 2 MiB.
    #[error("region {index}: page size {page_size} is not supported (only 4096 and 2097152)")]
    UnsupportedPageSize {
        /// Position in the array.
        index: usize,
        /// The stated page size, in bytes.
        page_size: u64,
    },
    /// `page_size` and `page_size_kib` disagree.
    #[error(
        "region {index}: page_size {page_size} and page_size_kib {page_size_kib} disagree \
         (both are in bytes)"
    )]
    PageSizeMismatch {
        /// Position in the array.
        index: usize,
        /// The `page_size` field.
        page_size: u64,
        /// The `page_size_kib` field.
        page_size_kib: u64,
    },
    /// Regions with different page sizes.
    #[error(
        "region {index}: page size {page_size} differs from region 0's {first}; Firecracker \
         backs all guest memory with one page size, so a mix means a confused client"
    )]
    MixedPageSizes {
        /// Position in the array.
        index: usize,
        /// This region's page size.
        page_size: u64,
        /// Region 0's page size.
        first: u64,
    },
    /// An address, size or offset that is not a multiple of the page size.
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {page_size}")]
    Unaligned {
        /// Position in the array.
        index: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        field: &'static str,
        /// The value.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// `base + size` or `offset + size` overflows.
    #[error("region {index}: {field} {value:#x} + size {size:#x} overflows 64 bits")]
    Overflow {
        /// Position in the array.
        index: usize,
        /// `base_host_virt_addr` or `offset`.
        field: &'static str,
        /// The value.
        value: u64,
        /// The region size.
        size: u64,
    },
    /// A region reaching past the end of the memory file.
    #[error(
        "region {index}: file range {offset:#x} + {size:#x} ends past the memory file's \
         {mem_len:#x} bytes"
    )]
    BeyondFile {
        /// Position in the array.
        index: usize,
        /// The region's file offset.
        offset: u64,
        /// The region size.
        size: u64,
        /// The memory file's length.
        mem_len: u64,
    },
    /// Two regions share addresses.
    #[error(
        "regions {first} [{first_start:#x}, {first_end:#x}) and {second} \
         [{second_start:#x}, {second_end:#x}) overlap"
    )]
    Overlap {
        /// Position of the lower region in the array.
        first: usize,
        /// Its start.
        first_start: u64,
        /// Its end.
        first_end: u64,
        /// Position of the higher region in the array.
        second: usize,
        /// Its start.
        second_start: u64,
        /// Its end.
        second_end: u64,
    },
}

impl HandshakeError {
    /// Whether the client caused the failure (a malformed, incomplete, slow or lying message),
    /// as opposed to a failing socket call. A server logs client errors at a lower level and
    /// keeps serving others.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, HandshakeError::Io { .. })
    }

    /// A short name of the kind of failure, for logs that count refusals by cause (`timeout`,
    /// `closed-empty` for a connection closed before its first byte, `closed`, `too-large`,
    /// `malformed`, `fds`, `regions`, `io`).
    pub fn cause(&self) -> &'static str {
        match self {
            HandshakeError::Io { .. } => "io",
            HandshakeError::Timeout { .. } => "timeout",
            HandshakeError::Closed { received: 0 } => "closed-empty",
            HandshakeError::Closed { .. } => "closed",
            HandshakeError::MessageTooLarge { .. } => "too-large",
            HandshakeError::BadJson { .. }
            | HandshakeError::NotAnArray { .. }
            | HandshakeError::NotAnObject { .. }
            | HandshakeError::MissingField { .. }
            | HandshakeError::BadField { .. } => "malformed",
            HandshakeError::NoFd
            | HandshakeError::TooManyFds { .. }
            | HandshakeError::NotAUserfaultfd { .. }
            | HandshakeError::MemFdNotAFile { .. } => "fds",
            HandshakeError::Empty
            | HandshakeError::TooManyRegions { .. }
            | HandshakeError::ZeroSize { .. }
            | HandshakeError::UnsupportedPageSize { .. }
            | HandshakeError::PageSizeMismatch { .. }
            | HandshakeError::MixedPageSizes { .. }
            | HandshakeError::Unaligned { .. }
            | HandshakeError::Overflow { .. }
            | HandshakeError::BeyondFile { .. }
            | HandshakeError::Overlap { .. } => "regions",
        }
    }

    fn io(op: &'static str, errno: Errno) -> HandshakeError {
        HandshakeError::Io {
            op,
            source: errno.into(),
        }
    }
}

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
/// This is pure and checks only the shape and types; [`validate`] checks the values. Both the
/// handler and the fuzzer use it.
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

/// Checks the mappings against each other and against a memory file of `mem_len` bytes (pass
/// `u64::MAX` for no file bound), returning the regions in the client's order.
///
/// Refused: an empty list, more than [`Limits::max_regions`], a zero size, a page size other than
/// 4096 or 2097152 or two page-size fields that disagree, a base, size or offset not aligned to
/// the region's page size, `base + size` or `offset + size` overflowing, `offset + size` past
/// `mem_len`, regions with different page sizes, and overlapping regions. Regions may share file
/// bytes (two regions reading the same offsets is harmless).
pub fn validate(
    mappings: &[GuestRegionUffdMapping],
    mem_len: u64,
    limits: &Limits,
) -> Result<Vec<ValidatedRegion>, HandshakeError> {
    if mappings.is_empty() {
        return Err(HandshakeError::Empty);
    }
    if mappings.len() > limits.max_regions {
        return Err(HandshakeError::TooManyRegions {
            count: mappings.len(),
            limit: limits.max_regions,
        });
    }
    let mut regions: Vec<ValidatedRegion> = Vec::with_capacity(mappings.len());
    for (index, mapping) in mappings.iter().enumerate() {
        regions.push(validate_one(index, mapping, mem_len)?);
    }
    if let Some(first) = regions.first() {
        let first = first.page_size;
        if let Some((index, region)) = regions
            .iter()
            .enumerate()
            .find(|(_, region)| region.page_size != first)
        {
            return Err(HandshakeError::MixedPageSizes {
                index,
                page_size: region.page_size,
                first,
            });
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_unstable_by_key(|&index| regions[index].start);
    for pair in order.windows(2) {
        let (low, high) = (&regions[pair[0]], &regions[pair[1]]);
        if low.end() > high.start {
            return Err(HandshakeError::Overlap {
                first: pair[0],
                first_start: low.start,
                first_end: low.end(),
                second: pair[1],
                second_start: high.start,
                second_end: high.end(),
            });
        }
    }
    Ok(regions)
}

fn validate_one(
    index: usize,
    mapping: &GuestRegionUffdMapping,
    mem_len: u64,
) -> Result<ValidatedRegion, HandshakeError> {
    let page_size = mapping.stated_page_size(index)?;
    if page_size != PAGE_SIZE_4K && page_size != PAGE_SIZE_2M {
        return Err(HandshakeError::UnsupportedPageSize { index, page_size });
    }
    let size = mapping.size;
    if size == 0 {
        return Err(HandshakeError::ZeroSize { index });
    }
    for (field, value) in [
        ("base_host_virt_addr", mapping.base_host_virt_addr),
        ("size", size),
        ("offset", mapping.offset),
    ] {
        if value % page_size != 0 {
            return Err(HandshakeError::Unaligned {
                index,
                field,
                value,
                page_size,
            });
        }
    }
    let overflow = |field: &'static str, value: u64| HandshakeError::Overflow {
        index,
        field,
        value,
        size,
    };
    mapping
        .base_host_virt_addr
        .checked_add(size)
        .ok_or_else(|| overflow("base_host_virt_addr", mapping.base_host_virt_addr))?;
    let file_end = mapping
        .offset
        .checked_add(size)
        .ok_or_else(|| overflow("offset", mapping.offset))?;
    if file_end > mem_len {
        return Err(HandshakeError::BeyondFile {
            index,
            offset: mapping.offset,
            size,
            mem_len,
        });
    }
    Ok(ValidatedRegion {
        start: mapping.base_host_virt_addr,
        len: size,
        page_size,
        offset: mapping.offset,
    })
}

/// Receives and validates the handshake on a connected stream socket: reads until one complete
/// JSON array has arrived, collecting the fds of every read, then checks the message, the fds and
/// the regions (see the [module docs](self)). Works on blocking and non-blocking sockets alike and
/// leaves the socket's options unchanged (the deadline is kept with `poll`).
///
/// On error every received fd is closed.
pub fn receive_handshake(
    stream: &UnixStream,
    limits: &Limits,
) -> Result<Handshake, HandshakeError> {
    receive_with(stream, limits, RECV_CHUNK).map(|(handshake, _)| handshake)
}

/// [`receive_handshake`] reading at most `recv_size` bytes per `recvmsg`; also returns how many
/// `recvmsg` calls it made.
fn receive_with(
    stream: &UnixStream,
    limits: &Limits,
    recv_size: usize,
) -> Result<(Handshake, usize), HandshakeError> {
    let peer = peer_cred(stream)?;
    let deadline = Instant::now().checked_add(limits.timeout);
    let mut message: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; recv_size.clamp(1, limits.max_message.max(1))];
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut framer = JsonFramer::new();
    let mut recvs = 0;
    loop {
        if message.len() >= limits.max_message {
            return Err(HandshakeError::MessageTooLarge {
                limit: limits.max_message,
            });
        }
        wait_readable(stream, deadline, limits.timeout, message.len())?;
        let room = chunk.len().min(limits.max_message - message.len());
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FD_ROOM))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = match recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut chunk[..room])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Ok(received) => received,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => return Err(HandshakeError::io("recvmsg", e)),
        };
        recvs += 1;
        for ancillary in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received_fds) = ancillary {
                fds.extend(received_fds);
            }
        }
        if received.flags.contains(ReturnFlags::CTRUNC) || fds.len() > 2 {
            return Err(HandshakeError::TooManyFds {
                count: fds.len(),
                truncated: received.flags.contains(ReturnFlags::CTRUNC),
            });
        }
        if received.bytes == 0 {
            return Err(HandshakeError::Closed {
                received: message.len(),
            });
        }
        let bytes = &chunk[..received.bytes];
        // Grow to at most the limit (not by doubling past it): a handshake never holds more
        // than `max_message` bytes, so a server's bytes in flight are bounded by that limit
        // times its concurrent handshakes.
        let want = message.len() + bytes.len();
        if want > message.capacity() {
            let target = want
                .max(message.capacity().saturating_mul(2))
                .min(limits.max_message.max(want));
            message.reserve_exact(target - message.len());
        }
        message.extend_from_slice(bytes);
        if framer.feed(bytes) != Framing::NeedMore {
            break;
        }
    }
    // Bytes after the array that arrived in the same read are parsed too: only whitespace passes.
    let mappings = parse_mappings(&message)?;
    let (uffd, mem_fd) = split_fds(fds)?;
    let mut mem_len = limits.mem_len.unwrap_or(u64::MAX);
    if let Some(mem_fd) = &mem_fd {
        let stat = rustix::fs::fstat(mem_fd).map_err(|e| HandshakeError::io("fstat(mem_fd)", e))?;
        mem_len = mem_len.min(u64::try_from(stat.st_size).unwrap_or(0));
    }
    let mappings = validate(&mappings, mem_len, limits)?;
    Ok((
        Handshake {
            mappings,
            uffd,
            mem_fd,
            peer,
        },
        recvs,
    ))
}

/// The credentials of the client at the other end of `stream` (`SO_PEERCRED`), read without
/// touching the stream's bytes: a server vets the client with them before reading anything.
pub fn peer_cred(stream: &UnixStream) -> Result<PeerCred, HandshakeError> {
    // Caveat: rustix models the pid as non-zero, but the kernel reports 0 for a peer whose pid is
    // not visible in our pid namespace (checked on 6.18 with `unshare --pid`). Reading it back
    // yields 0 in practice; a raw getsockopt in a kernel-facing module would make that exact.
    let peer = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| HandshakeError::io("getsockopt(SO_PEERCRED)", e))?;
    Ok(PeerCred {
        pid: peer.pid.as_raw_nonzero().get(),
        uid: peer.uid.as_raw(),
        gid: peer.gid.as_raw(),
    })
}

/// Waits until `stream` is readable or the deadline passes.
fn wait_readable(
    stream: &UnixStream,
    deadline: Option<Instant>,
    timeout: Duration,
    received: usize,
) -> Result<(), HandshakeError> {
    loop {
        let remaining = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(HandshakeError::Timeout { timeout, received });
                }
                Timespec::try_from(deadline - now).ok()
            }
            None => None,
        };
        let mut fds = [PollFd::new(stream, PollFlags::IN)];
        match poll(&mut fds, remaining.as_ref()) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(HandshakeError::io("poll", e)),
        }
    }
}

/// Whether `fd` is a userfaultfd: `Some(Ok(()))` if it is, `Some(Err(what it is))` if not, `None`
/// when `/proc` cannot tell.
fn is_userfaultfd(fd: BorrowedFd<'_>) -> Option<Result<(), String>> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let link = link.to_string_lossy();
    Some(if link == UFFD_LINK {
        Ok(())
    } else {
        Err(link.into_owned())
    })
}

/// Splits the received fds into the userfaultfd and the optional memory fd. The order is
/// `[uffd, mem_fd]`; if `/proc` shows the first is not a userfaultfd but the second is, they are
/// swapped (a fork sending them the other way round).
fn split_fds(mut fds: Vec<OwnedFd>) -> Result<(OwnedFd, Option<OwnedFd>), HandshakeError> {
    if fds.len() == 2 {
        let first = is_userfaultfd(fds[0].as_fd());
        let second = is_userfaultfd(fds[1].as_fd());
        if matches!(first, Some(Err(_))) && matches!(second, Some(Ok(()))) {
            fds.swap(0, 1);
        }
    }
    let mut fds = fds.into_iter();
    let (uffd, mem_fd) = match (fds.next(), fds.next(), fds.next()) {
        (None, _, _) => return Err(HandshakeError::NoFd),
        (Some(uffd), mem_fd, None) => (uffd, mem_fd),
        (Some(_), _, Some(_)) => {
            return Err(HandshakeError::TooManyFds {
                count: 3 + fds.len(),
                truncated: false,
            })
        }
    };
    if let Some(Err(found)) = is_userfaultfd(uffd.as_fd()) {
        return Err(HandshakeError::NotAUserfaultfd { found });
    }
    if let Some(m) = &mem_fd {
        // A guest-memory fd is a file: a memfd (`/memfd:...`) or a path. Pipes, sockets and
        // anonymous inodes are named instead of being sized as an empty file.
        if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", m.as_raw_fd())) {
            let link = link.to_string_lossy().into_owned();
            if !link.starts_with('/') {
                return Err(HandshakeError::MemFdNotAFile { found: link });
            }
        }
    }
    Ok((uffd, mem_fd))
}

/// The JSON a client of the given release sends for `mappings`: each mapping's page size (see
/// [`GuestRegionUffdMapping::stated_page_size`]; 4096 if its fields disagree) is written in the
/// fields `shape` has.
pub fn encode_mappings(mappings: &[GuestRegionUffdMapping], shape: JsonShape) -> Vec<u8> {
    let shaped: Vec<GuestRegionUffdMapping> = mappings
        .iter()
        .map(|mapping| {
            let page_size = mapping.stated_page_size(0).unwrap_or(PAGE_SIZE_4K);
            let (page_size, page_size_kib) = match shape {
                JsonShape::NoPageSize => (None, None),
                JsonShape::PageSizeKib => (None, Some(page_size)),
                JsonShape::Both => (Some(page_size), Some(page_size)),
                JsonShape::PageSizeOnly => (Some(page_size), None),
            };
            GuestRegionUffdMapping {
                page_size,
                page_size_kib,
                ..*mapping
            }
        })
        .collect();
    serde_json::to_vec(&shaped).expect("a list of integer structs always serializes")
}

/// The client side: sends `mappings` as the Firecracker handshake, in the JSON `shape` of a given
/// release, with `uffd` (and `mem_fd` after it, if any) attached as `SCM_RIGHTS`.
pub fn send_handshake(
    stream: &UnixStream,
    mappings: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
    mem_fd: Option<BorrowedFd<'_>>,
    shape: JsonShape,
) -> io::Result<()> {
    send_handshake_chunked(stream, mappings, uffd, mem_fd, shape, usize::MAX)
}

/// [`send_handshake`] writing the JSON in pieces of at most `chunk` bytes, one `sendmsg` each (the
/// first carries the fds), to exercise the receiver's reassembly.
pub fn send_handshake_chunked(
    stream: &UnixStream,
    mappings: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
    mem_fd: Option<BorrowedFd<'_>>,
    shape: JsonShape,
    chunk: usize,
) -> io::Result<()> {
    let json = encode_mappings(mappings, shape);
    let mut fds = vec![uffd];
    fds.extend(mem_fd);
    send_with_fds(stream, &json, &fds, chunk)
}

/// Sends arbitrary `bytes` in pieces of at most `chunk` bytes, `fds` attached to the first piece
/// (none if `fds` is empty): a raw client for testing a receiver with malformed handshakes.
/// `bytes` must not be empty when `fds` is not (a stream socket carries fds only with data).
/// Uses `MSG_NOSIGNAL`: a closed peer is an `EPIPE` error, not a signal.
pub fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    chunk: usize,
) -> io::Result<()> {
    if chunk == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "chunk size 0"));
    }
    if bytes.is_empty() && !fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fds need at least one byte of data on a stream socket",
        ));
    }
    let rights = SendAncillaryMessage::ScmRights(fds);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rights.size()];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rights) {
        return Err(io::Error::other(
            "SCM_RIGHTS does not fit its computed space",
        ));
    }
    let mut rest = bytes;
    while !rest.is_empty() {
        let piece = &rest[..rest.len().min(chunk)];
        let mut done = 0;
        while done < piece.len() {
            match sendmsg(
                stream,
                &[IoSlice::new(&piece[done..])],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(sent) => {
                    done += sent;
                    // The fds went with the first bytes.
                    control.clear();
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        rest = &rest[piece.len()..];
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use faultline_uffd::{Features, Uffd};
    use proptest::prelude::*;
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    use rustix::io::{fcntl_getfd, FdFlags};
    use std::os::unix::fs::MetadataExt;
    use std::thread;

    const BASE: u64 = 0x7f00_0000_0000;
    const MIB: u64 = 1 << 20;

    /// A Firecracker-like layout: regions back to back in the file, a hole in the address space.
    fn layout(page_size: u64) -> Vec<GuestRegionUffdMapping> {
        vec![
            GuestRegionUffdMapping::new(BASE, 4 * page_size, 0, page_size),
            GuestRegionUffdMapping::new(BASE + 64 * MIB, 8 * page_size, 4 * page_size, page_size),
        ]
    }

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    fn err(result: Result<Vec<ValidatedRegion>, HandshakeError>) -> HandshakeError {
        result.expect_err("validation must fail")
    }

    fn check(mappings: &[GuestRegionUffdMapping]) -> Result<Vec<ValidatedRegion>, HandshakeError> {
        validate(mappings, 1 << 40, &limits())
    }

    fn parse_err(json: &str) -> HandshakeError {
        parse_mappings(json.as_bytes()).expect_err("parsing must fail")
    }

    // ---- parsing ----

    #[test]
    fn every_json_shape_is_accepted() {
        let no_page_size = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728,
            "offset": 0}]"#;
        let kib = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
            "page_size_kib": 2097152}]"#;
        let both = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
            "page_size": 2097152, "page_size_kib": 2097152}]"#;
        let only = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
            "page_size": 2097152}]"#;
        for (json, shape, page_size) in [
            (no_page_size, JsonShape::NoPageSize, PAGE_SIZE_4K),
            (kib, JsonShape::PageSizeKib, PAGE_SIZE_2M),
            (both, JsonShape::Both, PAGE_SIZE_2M),
            (only, JsonShape::PageSizeOnly, PAGE_SIZE_2M),
        ] {
            let mappings = parse_mappings(json.as_bytes()).unwrap();
            assert_eq!(mappings.len(), 1);
            assert_eq!(mappings[0].shape(), shape);
            // serde's derive agrees with the hand-written parser.
            let derived: Vec<GuestRegionUffdMapping> = serde_json::from_str(json).unwrap();
            assert_eq!(derived, mappings);
            let regions = check(&mappings).unwrap();
            assert_eq!(
                regions,
                vec![ValidatedRegion {
                    start: 139637976727552,
                    len: 134217728,
                    page_size,
                    offset: 0
                }]
            );
        }
    }

    #[test]
    fn unknown_fields_and_null_optionals_are_ignored() {
        let json = r#" [{"base_host_virt_addr": 4096, "size": 8192, "offset": 4096,
            "gpa_start": 0, "future": {"nested": [1, "]"]}, "page_size": null,
            "page_size_kib": 4096}] "#;
        let mappings = parse_mappings(json.as_bytes()).unwrap();
        assert_eq!(
            mappings,
            vec![GuestRegionUffdMapping {
                base_host_virt_addr: 4096,
                size: 8192,
                offset: 4096,
                page_size: None,
                page_size_kib: Some(4096),
            }]
        );
    }

    #[test]
    fn wrong_types_name_the_region_and_field() {
        let e = parse_err(
            r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0},
                {"base_host_virt_addr": 8192, "size": "big", "offset": 4096}]"#,
        );
        assert!(
            matches!(&e, HandshakeError::BadField { index: 1, field: "size", found } if found == "\"big\""),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "region 1: field `size` must be an unsigned 64-bit integer, found \"big\""
        );
        for (json, field) in [
            (
                r#"[{"base_host_virt_addr": -4096, "size": 4096, "offset": 0}]"#,
                "base_host_virt_addr",
            ),
            (
                r#"[{"base_host_virt_addr": 0, "size": 4096.0, "offset": 0}]"#,
                "size",
            ),
            (
                r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 18446744073709551616}]"#,
                "offset",
            ),
            (
                r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": "4k"}]"#,
                "page_size",
            ),
            (
                r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size_kib": [4]}]"#,
                "page_size_kib",
            ),
            (
                r#"[{"base_host_virt_addr": null, "size": 4096, "offset": 0}]"#,
                "base_host_virt_addr",
            ),
        ] {
            match parse_err(json) {
                HandshakeError::BadField {
                    index: 0, field: f, ..
                } => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_err(r#"[{"base_host_virt_addr": 0, "offset": 0}]"#),
            HandshakeError::MissingField {
                index: 0,
                field: "size"
            }
        ));
        assert!(matches!(
            parse_err(r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0}, 7]"#),
            HandshakeError::NotAnObject {
                index: 1,
                found: "a number"
            }
        ));
    }

    #[test]
    fn long_bad_values_are_shortened() {
        let long = "x".repeat(10_000);
        let json = format!(r#"[{{"base_host_virt_addr": "{long}", "size": 1, "offset": 0}}]"#);
        let HandshakeError::BadField { found, .. } = parse_err(&json) else {
            panic!("expected BadField")
        };
        assert!(found.len() < 80, "{found}");
        assert!(found.ends_with("..."));
    }

    #[test]
    fn not_json_not_an_array_and_empty() {
        let e = parse_err(r#"[{"size": 4096,]"#);
        assert!(
            matches!(e, HandshakeError::BadJson { line: 1, .. }),
            "{e:?}"
        );
        assert!(matches!(parse_err(""), HandshakeError::BadJson { .. }));
        assert!(
            matches!(parse_err("[] x"), HandshakeError::BadJson { .. }),
            "trailing bytes"
        );
        assert!(matches!(
            parse_err(r#"{"regions": []}"#),
            HandshakeError::NotAnArray { found: "an object" }
        ));
        assert!(matches!(
            parse_err("\"[]\""),
            HandshakeError::NotAnArray { found: "a string" }
        ));
        assert!(matches!(
            check(&parse_mappings(b" [ ] \n").unwrap()),
            Err(HandshakeError::Empty)
        ));
    }

    // ---- validation ----

    #[test]
    fn valid_layouts_pass_in_client_order() {
        for page_size in [PAGE_SIZE_4K, PAGE_SIZE_2M] {
            let mut mappings = layout(page_size);
            mappings.reverse();
            let regions = check(&mappings).unwrap();
            assert_eq!(regions[0].start, BASE + 64 * MIB);
            assert_eq!(regions[0].offset, 4 * page_size);
            assert_eq!(regions[1].len, 4 * page_size);
            assert!(regions.iter().all(|r| r.page_size == page_size));
            // Exactly filling the file is fine.
            validate(&mappings, 12 * page_size, &limits()).unwrap();
        }
    }

    #[test]
    fn zero_size_is_refused() {
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[1].size = 0;
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::ZeroSize { index: 1 }
        ));
    }

    #[test]
    fn unaligned_base_size_and_offset_are_refused() {
        for field in ["base_host_virt_addr", "size", "offset"] {
            let mut mappings = layout(PAGE_SIZE_4K);
            match field {
                "base_host_virt_addr" => mappings[1].base_host_virt_addr += 512,
                "size" => mappings[1].size += 512,
                _ => mappings[1].offset += 512,
            }
            match err(check(&mappings)) {
                HandshakeError::Unaligned {
                    index: 1,
                    field: f,
                    page_size: 4096,
                    ..
                } => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // 4 KiB-aligned is not enough for a 2 MiB region.
        let mut mappings = layout(PAGE_SIZE_2M);
        mappings[0].base_host_virt_addr += PAGE_SIZE_4K;
        let e = err(check(&mappings));
        assert!(
            matches!(
                e,
                HandshakeError::Unaligned {
                    index: 0,
                    field: "base_host_virt_addr",
                    page_size: PAGE_SIZE_2M,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("0x7f0000001000"), "{e}");
    }

    #[test]
    fn odd_and_disagreeing_page_sizes_are_refused() {
        for odd in [0, 1, 1024, 8192, 1 << 30] {
            let mut mappings = layout(PAGE_SIZE_4K);
            mappings[0].page_size = Some(odd);
            mappings[0].page_size_kib = None;
            assert!(
                matches!(err(check(&mappings)), HandshakeError::UnsupportedPageSize { index: 0, page_size } if page_size == odd),
                "{odd}"
            );
        }
        // v1.7-era clients that meant KiB (4) would be refused, not silently mis-sized.
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[1].page_size = None;
        mappings[1].page_size_kib = Some(4);
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::UnsupportedPageSize {
                index: 1,
                page_size: 4
            }
        ));
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[1].page_size_kib = Some(PAGE_SIZE_2M);
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::PageSizeMismatch {
                index: 1,
                page_size: 4096,
                page_size_kib: PAGE_SIZE_2M
            }
        ));
    }

    #[test]
    fn mixed_page_sizes_are_refused() {
        let mut mappings = layout(PAGE_SIZE_2M);
        mappings[1] = GuestRegionUffdMapping::new(BASE + 64 * MIB, 4096, 8 * PAGE_SIZE_2M, 4096);
        let e = err(check(&mappings));
        assert!(
            matches!(
                e,
                HandshakeError::MixedPageSizes {
                    index: 1,
                    page_size: 4096,
                    first: PAGE_SIZE_2M
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("one page size"));
    }

    #[test]
    fn overflows_are_refused() {
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[1].offset = !4095u64;
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::Overflow {
                index: 1,
                field: "offset",
                ..
            }
        ));
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[0].base_host_virt_addr = !4095u64;
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::Overflow {
                index: 0,
                field: "base_host_virt_addr",
                ..
            }
        ));
        // Not aligned comes first for u64::MAX itself.
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[0].offset = u64::MAX;
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::Unaligned {
                index: 0,
                field: "offset",
                ..
            }
        ));
    }

    #[test]
    fn regions_beyond_the_file_are_refused() {
        let mappings = layout(PAGE_SIZE_4K);
        let e = err(validate(&mappings, 12 * 4096 - 4096, &limits()));
        assert!(
            matches!(
                e,
                HandshakeError::BeyondFile {
                    index: 1,
                    offset: 16384,
                    size: 32768,
                    mem_len: 45056
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings.push(GuestRegionUffdMapping::new(BASE + 3 * 4096, 4096, 0, 4096));
        let e = err(check(&mappings));
        assert!(
            matches!(
                e,
                HandshakeError::Overlap { first: 0, first_start: BASE, second: 2, second_start, .. }
                    if second_start == BASE + 3 * 4096
            ),
            "{e:?}"
        );
        // Touching is not overlapping; an identical duplicate is.
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings.push(GuestRegionUffdMapping::new(BASE + 4 * 4096, 4096, 0, 4096));
        check(&mappings).unwrap();
        mappings.push(mappings[1]);
        assert!(matches!(
            err(check(&mappings)),
            HandshakeError::Overlap { .. }
        ));
    }

    #[test]
    fn too_many_regions_are_refused() {
        let mappings: Vec<_> = (0..5)
            .map(|i| GuestRegionUffdMapping::new(BASE + i * 4096, 4096, i * 4096, 4096))
            .collect();
        let tight = Limits {
            max_regions: 4,
            ..limits()
        };
        assert!(matches!(
            validate(&mappings, u64::MAX, &tight),
            Err(HandshakeError::TooManyRegions { count: 5, limit: 4 })
        ));
        validate(&mappings[..4], u64::MAX, &tight).unwrap();
        assert!(matches!(
            validate(&[], u64::MAX, &tight),
            Err(HandshakeError::Empty)
        ));
    }

    #[test]
    fn client_errors_are_classified() {
        assert!(HandshakeError::NoFd.is_client_error());
        assert!(HandshakeError::Timeout {
            timeout: Duration::ZERO,
            received: 0
        }
        .is_client_error());
        assert!(!HandshakeError::io("recvmsg", Errno::BADF).is_client_error());
    }

    // ---- framing ----

    #[test]
    fn framer_finds_the_end_across_splits_and_strings() {
        let json = br#" [{"a": "]}\"[", "b": [1, {"c": []}]}] "#;
        let end = json.len() - 1;
        for split in 0..json.len() {
            let mut framer = JsonFramer::new();
            let first = framer.feed(&json[..split]);
            let second = framer.feed(&json[split..]);
            if split >= end {
                assert_eq!(first, Framing::Complete { len: end }, "split {split}");
            } else {
                assert_eq!(first, Framing::NeedMore, "split {split}");
            }
            assert_eq!(second, Framing::Complete { len: end }, "split {split}");
        }
        assert_eq!(JsonFramer::new().feed(b"  {\"a\": 1}"), Framing::NotAnArray);
        assert_eq!(JsonFramer::new().feed(b"\n\t"), Framing::NeedMore);
    }

    // ---- the socket ----

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn uffd() -> Uffd {
        Uffd::new(Features::empty()).unwrap()
    }

    fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
        let (a, b) = (rustix::fs::fstat(a).unwrap(), rustix::fs::fstat(b).unwrap());
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    fn assert_is_our_uffd(handshake: &Handshake, uffd: &Uffd) {
        assert!(same_file(handshake.uffd.as_fd(), uffd.as_fd()));
        // A new descriptor (not our own number), close-on-exec.
        assert_ne!(handshake.uffd.as_raw_fd(), uffd.as_raw_fd());
        assert!(fcntl_getfd(&handshake.uffd)
            .unwrap()
            .contains(FdFlags::CLOEXEC));
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", handshake.uffd.as_raw_fd())).unwrap();
        assert_eq!(link.to_str(), Some(UFFD_LINK));
    }

    fn me() -> PeerCred {
        use rustix::process::{getegid, geteuid, getpid};
        PeerCred {
            pid: getpid().as_raw_nonzero().get(),
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        }
    }

    #[test]
    fn round_trip_with_the_uffd_in_every_shape() {
        let uffd = uffd();
        for shape in JsonShape::ALL {
            let (client, server) = pair();
            send_handshake(&client, &layout(PAGE_SIZE_4K), uffd.as_fd(), None, shape).unwrap();
            let handshake = receive_handshake(&server, &limits()).unwrap();
            assert_eq!(
                handshake.mappings,
                check(&layout(PAGE_SIZE_4K)).unwrap(),
                "{shape:?}"
            );
            assert_is_our_uffd(&handshake, &uffd);
            assert!(handshake.mem_fd.is_none());
            assert_eq!(handshake.peer, me());
        }
    }

    fn memfd(len: u64) -> OwnedFd {
        let fd = memfd_create("guest-memory", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, len).unwrap();
        fd
    }

    #[test]
    fn round_trip_with_a_memory_fd_in_either_order() {
        let uffd = uffd();
        let mem = memfd(12 * PAGE_SIZE_2M);
        let (client, server) = pair();
        let mappings = layout(PAGE_SIZE_2M);
        send_handshake(
            &client,
            &mappings,
            uffd.as_fd(),
            Some(mem.as_fd()),
            JsonShape::PageSizeKib,
        )
        .unwrap();
        let handshake = receive_handshake(&server, &limits()).unwrap();
        assert_is_our_uffd(&handshake, &uffd);
        let got = handshake.mem_fd.as_ref().unwrap();
        assert!(same_file(got.as_fd(), mem.as_fd()));
        assert!(fcntl_getfd(got).unwrap().contains(FdFlags::CLOEXEC));
        assert!(handshake
            .mappings
            .iter()
            .all(|r| r.page_size == PAGE_SIZE_2M));

        // A fork that sends [memfd, uffd]: the userfaultfd is recognised.
        let json = encode_mappings(&mappings, JsonShape::Both);
        send_with_fds(&client, &json, &[mem.as_fd(), uffd.as_fd()], usize::MAX).unwrap();
        let handshake = receive_handshake(&server, &limits()).unwrap();
        assert_is_our_uffd(&handshake, &uffd);
        assert!(same_file(
            handshake.mem_fd.as_ref().unwrap().as_fd(),
            mem.as_fd()
        ));
    }

    #[test]
    fn regions_must_fit_the_attached_memory_fd() {
        let uffd = uffd();
        let mem = memfd(11 * PAGE_SIZE_4K); // the layout needs 12 pages
        let (client, server) = pair();
        send_handshake(
            &client,
            &layout(PAGE_SIZE_4K),
            uffd.as_fd(),
            Some(mem.as_fd()),
            JsonShape::Both,
        )
        .unwrap();
        let e = receive_handshake(&server, &limits()).unwrap_err();
        assert!(
            matches!(e, HandshakeError::BeyondFile { index: 1, mem_len, .. } if mem_len == 11 * 4096),
            "{e:?}"
        );
        // And the configured file length bounds it too.
        send_handshake(
            &client,
            &layout(PAGE_SIZE_4K),
            uffd.as_fd(),
            None,
            JsonShape::Both,
        )
        .unwrap();
        let small = Limits {
            mem_len: Some(4 * 4096),
            ..limits()
        };
        assert!(matches!(
            receive_handshake(&server, &small),
            Err(HandshakeError::BeyondFile {
                index: 1,
                mem_len: 16384,
                ..
            })
        ));
    }

    #[test]
    fn chunked_message_is_reassembled() {
        let uffd = uffd();
        let mem = memfd(MIB);
        let (client, server) = pair();
        let mappings = layout(PAGE_SIZE_4K);
        let json_len = encode_mappings(&mappings, JsonShape::Both).len();
        let sender = thread::spawn(move || {
            send_handshake_chunked(
                &client,
                &mappings,
                uffd.as_fd(),
                Some(mem.as_fd()),
                JsonShape::Both,
                7,
            )
            .unwrap();
            (client, uffd)
        });
        // Read 7 bytes at a time, so reassembly runs however the kernel coalesces the writes.
        let (handshake, recvs) = receive_with(&server, &limits(), 7).unwrap();
        let (_client, uffd) = sender.join().unwrap();
        assert_eq!(recvs, json_len.div_ceil(7));
        assert_eq!(handshake.mappings, check(&layout(PAGE_SIZE_4K)).unwrap());
        assert_is_our_uffd(&handshake, &uffd);
        assert!(handshake.mem_fd.is_some());
    }

    fn many(count: u64) -> Vec<GuestRegionUffdMapping> {
        (0..count)
            .map(|i| GuestRegionUffdMapping::new(BASE + i * 2 * 4096, 4096, i * 4096, 4096))
            .collect()
    }

    #[test]
    fn message_larger_than_one_recv_is_reassembled() {
        let uffd = uffd();
        let mappings = many(3000);
        let json_len = encode_mappings(&mappings, JsonShape::Both).len();
        assert!(json_len > RECV_CHUNK, "{json_len}");
        let (client, server) = pair();
        let sender = {
            let mappings = mappings.clone();
            thread::spawn(move || {
                send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
                (client, uffd)
            })
        };
        let roomy = Limits {
            max_regions: 3000,
            ..limits()
        };
        let (handshake, recvs) = receive_with(&server, &roomy, RECV_CHUNK).unwrap();
        let (_client, uffd) = sender.join().unwrap();
        assert!(recvs >= json_len.div_ceil(RECV_CHUNK), "{recvs} recvs");
        assert_eq!(handshake.mappings.len(), 3000);
        assert_eq!(handshake.mappings[2999].start, BASE + 2999 * 2 * 4096);
        assert_eq!(handshake.mappings[2999].offset, 2999 * 4096);
        assert_is_our_uffd(&handshake, &uffd);
        // The default limit refuses that many regions.
        let (client, server) = pair();
        let sender = thread::spawn(move || {
            send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
            client
        });
        assert!(matches!(
            receive_handshake(&server, &limits()),
            Err(HandshakeError::TooManyRegions {
                count: 3000,
                limit: 1024
            })
        ));
        drop(sender.join().unwrap());
    }

    #[test]
    fn message_without_fd_is_refused() {
        let (client, server) = pair();
        let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
        send_with_fds(&client, &json, &[], usize::MAX).unwrap();
        assert!(matches!(
            receive_handshake(&server, &limits()),
            Err(HandshakeError::NoFd)
        ));
    }

    #[test]
    fn three_fds_are_refused_and_closed() {
        let uffd = uffd();
        let (a, b) = (memfd(4096), memfd(4096));
        let (client, server) = pair();
        let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
        send_with_fds(
            &client,
            &json,
            &[uffd.as_fd(), a.as_fd(), b.as_fd()],
            usize::MAX,
        )
        .unwrap();
        let e = receive_handshake(&server, &limits()).unwrap_err();
        assert!(
            matches!(
                e,
                HandshakeError::TooManyFds {
                    count: 3,
                    truncated: false
                }
            ),
            "{e:?}"
        );
        assert!(e.is_client_error());
        assert!(e.to_string().contains("3 file descriptors"), "{e}");
        // The received copies were closed: only our own descriptor of `b` is left. (Other tests
        // open fds concurrently, so look for this memfd rather than counting all fds.)
        let b_stat = rustix::fs::fstat(&b).unwrap();
        let open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| std::fs::metadata(entry.ok()?.path()).ok())
            .filter(|meta| (meta.dev(), meta.ino()) == (b_stat.st_dev, b_stat.st_ino))
            .count();
        assert_eq!(open, 1, "a received copy of the memfd is still open");
    }

    #[test]
    fn a_single_fd_must_be_a_userfaultfd() {
        let mem = memfd(MIB);
        let (client, server) = pair();
        send_handshake(
            &client,
            &layout(PAGE_SIZE_4K),
            mem.as_fd(),
            None,
            JsonShape::Both,
        )
        .unwrap();
        let e = receive_handshake(&server, &limits()).unwrap_err();
        assert!(
            matches!(&e, HandshakeError::NotAUserfaultfd { found } if found.starts_with("/memfd:guest-memory")),
            "{e:?}"
        );
    }

    #[test]
    fn silent_client_times_out() {
        let (_client, server) = pair();
        let quick = Limits {
            timeout: Duration::from_millis(100),
            ..limits()
        };
        let start = Instant::now();
        let e = receive_handshake(&server, &quick).unwrap_err();
        let waited = start.elapsed();
        assert!(
            matches!(e, HandshakeError::Timeout { received: 0, .. }),
            "{e:?}"
        );
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
    }

    #[test]
    fn slow_client_hits_the_total_deadline() {
        // Half a message, then silence: the deadline covers the whole handshake, not each read.
        let uffd = uffd();
        let (client, server) = pair();
        let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
        send_with_fds(&client, &json[..20], &[uffd.as_fd()], usize::MAX).unwrap();
        let quick = Limits {
            timeout: Duration::from_millis(100),
            ..limits()
        };
        assert!(matches!(
            receive_handshake(&server, &quick),
            Err(HandshakeError::Timeout { received: 20, .. })
        ));
    }

    #[test]
    fn client_closing_mid_json_is_closed() {
        let uffd = uffd();
        let (client, server) = pair();
        let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
        send_with_fds(&client, &json[..json.len() - 3], &[uffd.as_fd()], 5).unwrap();
        drop(client);
        let e = receive_handshake(&server, &limits()).unwrap_err();
        assert!(
            matches!(e, HandshakeError::Closed { received } if received == json.len() - 3),
            "{e:?}"
        );
    }

    #[test]
    fn oversized_message_is_refused() {
        let uffd = uffd();
        let (client, server) = pair();
        let mappings = many(100);
        let json_len = encode_mappings(&mappings, JsonShape::Both).len();
        let small = Limits {
            max_message: 1000,
            ..limits()
        };
        assert!(json_len > 1000);
        send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
        assert!(matches!(
            receive_handshake(&server, &small),
            Err(HandshakeError::MessageTooLarge { limit: 1000 })
        ));
        // A message of exactly the limit passes.
        let (client, server) = pair();
        send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
        let exact = Limits {
            max_message: json_len,
            ..limits()
        };
        assert_eq!(
            receive_handshake(&server, &exact).unwrap().mappings.len(),
            100
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        let uffd = uffd();
        let (client, server) = pair();
        send_with_fds(&client, b"hello", &[uffd.as_fd()], usize::MAX).unwrap();
        assert!(matches!(
            receive_handshake(&server, &limits()),
            Err(HandshakeError::BadJson { .. })
        ));
        let (client, server) = pair();
        send_with_fds(
            &client,
            br#"{"not": "an array"}"#,
            &[uffd.as_fd()],
            usize::MAX,
        )
        .unwrap();
        // One write arrives in one read: the whole object is there to be named.
        assert!(matches!(
            receive_handshake(&server, &limits()),
            Err(HandshakeError::NotAnArray { found: "an object" })
        ));
        let (client, server) = pair();
        let mut json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
        json.extend_from_slice(b"\n");
        send_with_fds(&client, &json, &[uffd.as_fd()], usize::MAX).unwrap();
        receive_handshake(&server, &limits()).unwrap();
        let (client, server) = pair();
        json.extend_from_slice(b"[]");
        send_with_fds(&client, &json, &[uffd.as_fd()], usize::MAX).unwrap();
        assert!(matches!(
            receive_handshake(&server, &limits()),
            Err(HandshakeError::BadJson { .. })
        ));
    }

    // ---- properties ----

    fn arb_layout() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
        // (page size, [(gap before in pages, size in pages)])
        (
            prop_oneof![Just(PAGE_SIZE_4K), Just(PAGE_SIZE_2M)],
            prop::collection::vec((0u64..1000, 1u64..100), 1..40),
        )
    }

    fn build(page_size: u64, parts: &[(u64, u64)]) -> Vec<GuestRegionUffdMapping> {
        let (mut addr, mut offset) = (BASE, 0);
        parts
            .iter()
            .map(|&(gap, pages)| {
                addr += gap * page_size;
                let mapping =
                    GuestRegionUffdMapping::new(addr, pages * page_size, offset, page_size);
                addr += pages * page_size;
                offset += pages * page_size;
                mapping
            })
            .collect()
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(mappings) = parse_mappings(&bytes) {
                let _ = validate(&mappings, u64::MAX, &Limits::default());
            }
            let mut framer = JsonFramer::new();
            for piece in bytes.chunks(3) {
                framer.feed(piece);
            }
        }

        #[test]
        fn random_near_json_never_panics(
            parts in prop::collection::vec(prop_oneof![
                Just("[".to_string()), Just("]".to_string()), Just("{".to_string()),
                Just("}".to_string()), Just(",".to_string()), Just(":".to_string()),
                Just("\"size\"".to_string()), Just("\"offset\"".to_string()),
                Just("\"base_host_virt_addr\"".to_string()), Just("\"page_size\"".to_string()),
                Just("\"page_size_kib\"".to_string()), Just("null".to_string()),
                any::<u64>().prop_map(|n| n.to_string()), Just("-1".to_string()),
            ], 0..40)
        ) {
            let json = parts.concat();
            if let Ok(mappings) = parse_mappings(json.as_bytes()) {
                let _ = validate(&mappings, u64::MAX, &Limits::default());
                // When serde's derive accepts it, it reads the same mappings.
                if let Ok(derived) = serde_json::from_str::<Vec<GuestRegionUffdMapping>>(&json) {
                    prop_assert_eq!(derived, mappings);
                }
            }
        }

        #[test]
        fn valid_layouts_round_trip(
            (page_size, parts) in arb_layout(),
            shape_index in 0usize..4,
            split in any::<prop::sample::Index>(),
        ) {
            let shape = JsonShape::ALL[shape_index];
            let mappings = build(page_size, &parts);
            let json = encode_mappings(&mappings, shape);
            let parsed = parse_mappings(&json).unwrap();
            prop_assert!(parsed.iter().all(|m| m.shape() == shape));
            let file_len: u64 = parts.iter().map(|&(_, pages)| pages * page_size).sum();
            let regions = validate(&parsed, file_len, &Limits::default()).unwrap();
            prop_assert_eq!(regions.len(), mappings.len());
            for (region, mapping) in regions.iter().zip(&mappings) {
                prop_assert_eq!(region.start, mapping.base_host_virt_addr);
                prop_assert_eq!(region.len, mapping.size);
                prop_assert_eq!(region.offset, mapping.offset);
                // Before v1.7 there is no page size on the wire: 4096 is assumed.
                let expected = if shape == JsonShape::NoPageSize { PAGE_SIZE_4K } else { page_size };
                prop_assert_eq!(region.page_size, expected);
            }
            // The framer finds the end wherever the message is split.
            let at = split.index(json.len());
            let mut framer = JsonFramer::new();
            let first = framer.feed(&json[..at]);
            prop_assert_eq!(first, Framing::NeedMore);
            prop_assert_eq!(framer.feed(&json[at..]), Framing::Complete { len: json.len() });
        }
    }
}
