//! Passing file descriptors over Unix sockets (`SCM_RIGHTS`): the handshake's stream socket, and
//! the daemon's supervisor–worker `SOCK_SEQPACKET` socket. Every received fd is an [`OwnedFd`]
//! (received with `MSG_CMSG_CLOEXEC`, so it never leaks into a child); every send uses
//! `MSG_NOSIGNAL` (a closed peer is an `EPIPE` error, not a signal).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

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

/// What one [`recv_with_fds`] brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (0: the peer is gone, if `fds` is empty too).
    pub bytes: usize,
    /// The fds that came with them.
    pub fds: Vec<OwnedFd>,
    /// The control message was truncated (more fds than `max_fds`: the kernel closed the rest).
    pub truncated: bool,
}

/// One `recvmsg` on `fd` into `buf`, with room for `max_fds` fds (`MSG_CMSG_CLOEXEC` is always
/// added to `flags`). Errors, `EINTR` and `EAGAIN` included, are the caller's to handle.
pub fn recv_with_fds(
    fd: impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
    flags: RecvFlags,
) -> rustix::io::Result<Received> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(max_fds))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        fd,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for ancillary in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received_fds) = ancillary {
            fds.extend(received_fds);
        }
    }
    Ok(Received {
        bytes: received.bytes,
        fds,
        truncated: received.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// Sends `bytes` as one message (a `SOCK_SEQPACKET` datagram) with `fds` attached, retrying on
/// `EINTR`. `MSG_NOSIGNAL` is always added to `flags` (with `MSG_DONTWAIT`, a full socket buffer
/// is an `EAGAIN` error).
pub fn send_message(
    fd: impl AsFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> io::Result<()> {
    let rights = SendAncillaryMessage::ScmRights(fds);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rights.size()];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rights) {
        return Err(io::Error::other("SCM_RIGHTS does not fit"));
    }
    loop {
        match sendmsg(
            &fd,
            &[IoSlice::new(bytes)],
            &mut control,
            flags | SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
