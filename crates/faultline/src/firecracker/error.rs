//! Why a handshake was refused: [`HandshakeError`], each variant naming the problem, and its
//! short cause (the key of the daemon's rate-limited log).

use std::io;
use std::time::Duration;

use rustix::io::Errno;

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

    pub(super) fn io(op: &'static str, errno: Errno) -> HandshakeError {
        HandshakeError::Io {
            op,
            source: errno.into(),
        }
    }
}
