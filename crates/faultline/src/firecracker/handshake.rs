//! The handshake on the Unix socket: receiving it ([`receive_handshake`]: every read, its fds,
//! the deadline, the checks) and, for tests and demos, sending it ([`send_handshake`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::RecvFlags;

use super::fdpass::{recv_with_fds, send_with_fds};
use super::{
    parse_mappings, validate, Framing, GuestRegionUffdMapping, Handshake, HandshakeError,
    JsonFramer, JsonShape, Limits, PeerCred, PAGE_SIZE_4K,
};

/// What `readlink("/proc/self/fd/N")` says for a userfaultfd (from `userfaultfd(2)` and from
/// `/dev/userfaultfd` alike).
pub(super) const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// Bytes asked for per `recvmsg`.
pub(super) const RECV_CHUNK: usize = 64 * 1024;

/// Room for this many fds in one `recvmsg`'s control buffer. More than the protocol allows, so a
/// client that sends 3 gets a precise count; beyond it the kernel truncates (and closes the rest).
const FD_ROOM: usize = 8;

/// Receives and validates the handshake on a connected stream socket: reads until one complete
/// JSON array has arrived, collecting the fds of every read, then checks the message, the fds and
/// the regions (see the [module docs](super)). Works on blocking and non-blocking sockets alike and
/// leaves the socket's options unchanged (the deadline is kept with `poll`).
///
/// On error every received fd is closed.
pub fn receive_handshake(
    stream: &UnixStream,
    limits: &Limits,
) -> Result<Handshake, HandshakeError> {
    receive_handshake_or_rejected(stream, limits).map_err(|r| r.error)
}

/// A refused handshake, and whether the client had handed over its userfaultfd first.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: HandshakeError,
    /// A userfaultfd came with the message, or fds the kernel could not deliver (the control
    /// message was cut: out of fds here). Such a client has registered its memory and sent its
    /// only way to have it served: refused, its threads wait on their first fault for ever
    /// (Firecracker never reads an answer). Whoever refuses it must end it explicitly.
    pub handed_uffd: bool,
}

/// [`receive_handshake`], telling whether a refused client had handed over its userfaultfd.
pub fn receive_handshake_or_rejected(
    stream: &UnixStream,
    limits: &Limits,
) -> Result<Handshake, Rejected> {
    let mut handed = false;
    match receive_with_seen(stream, limits, RECV_CHUNK, &mut handed) {
        Ok((handshake, _)) => Ok(handshake),
        Err(error) => Err(Rejected {
            error,
            handed_uffd: handed,
        }),
    }
}

/// [`receive_handshake`] reading at most `recv_size` bytes per `recvmsg`; also returns how many
/// `recvmsg` calls it made.
#[cfg(test)]
pub(super) fn receive_with(
    stream: &UnixStream,
    limits: &Limits,
    recv_size: usize,
) -> Result<(Handshake, usize), HandshakeError> {
    receive_with_seen(stream, limits, recv_size, &mut false)
}

/// [`receive_with`], setting `handed` once a userfaultfd (or a cut control message) arrived.
fn receive_with_seen(
    stream: &UnixStream,
    limits: &Limits,
    recv_size: usize,
    handed: &mut bool,
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
        let received = match recv_with_fds(stream, &mut chunk[..room], FD_ROOM, RecvFlags::DONTWAIT)
        {
            Ok(received) => received,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => return Err(HandshakeError::io("recvmsg", e)),
        };
        recvs += 1;
        *handed = *handed
            || received.truncated
            || received
                .fds
                .iter()
                .any(|fd| matches!(is_userfaultfd(fd.as_fd()), Some(Ok(())) | None));
        fds.extend(received.fds);
        if received.truncated || fds.len() > 2 {
            return Err(HandshakeError::TooManyFds {
                count: fds.len(),
                truncated: received.truncated,
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

/// Whether a whole handshake message already waits in `stream`'s receive queue (looked at with
/// `MSG_PEEK`: nothing is consumed, the fds stay queued). Firecracker sends its message in one
/// `sendmsg` right after connecting, so its handshake can be received at once without waiting;
/// a handler at its cap of handshakes in flight can still take it instead of refusing a client
/// whose memory is already registered.
///
/// A message not there yet is waited for up to `grace` (a client connects, then sends).
pub fn handshake_waiting(stream: &UnixStream, max_message: usize, grace: Duration) -> bool {
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    let grace = Timespec::try_from(grace).ok();
    if !matches!(poll(&mut fds, grace.as_ref()), Ok(n) if n > 0) {
        return false;
    }
    let mut peek = vec![0u8; max_message.clamp(1, RECV_CHUNK)];
    match rustix::net::recv(stream, &mut peek, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((n, _)) if n > 0 => {
            let bytes = peek.get(..n).unwrap_or_default();
            JsonFramer::new().feed(bytes) != Framing::NeedMore
        }
        _ => false,
    }
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
