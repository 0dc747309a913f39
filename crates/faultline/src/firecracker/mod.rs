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

use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod error;
pub mod fdpass;
mod framing;
mod handshake;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests;
mod validate;

pub use error::HandshakeError;
pub use fdpass::send_with_fds;
pub use framing::{parse_mappings, Framing, JsonFramer};
pub use handshake::{
    encode_mappings, handshake_waiting, peer_cred, receive_handshake,
    receive_handshake_or_rejected, send_handshake, send_handshake_chunked, Rejected,
};
pub use validate::validate;

/// The base page size (and the page size when the message names none).
pub const PAGE_SIZE_4K: u64 = 4096;
/// The huge page size of hugetlbfs-backed guests.
pub const PAGE_SIZE_2M: u64 = 2 * 1024 * 1024;

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
