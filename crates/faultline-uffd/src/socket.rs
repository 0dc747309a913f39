//! Two socket calls the runtime needs that rustix 1.1 does not offer in a safe form: a vectored
//! write whose pieces may be raw memory ([`writev`]) and the pidfd of a Unix socket's peer
//! ([`peer_pidfd`], `SO_PEERPIDFD`).
//!
//! Both are safe whatever their arguments. [`writev`] lets only the kernel read the pieces: an
//! [`IoPiece`] made from a raw address ([`IoPiece::from_raw`], e.g. a [`crate::FileMapping`]'s)
//! is never read in user space, so a page that vanished underneath (a truncated file) fails the
//! call with `EFAULT` rather than raising `SIGBUS`, and memory that changes underneath never
//! backs a `&[u8]`. The raw calls are in the crate's `sys` module.

use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};

use rustix::io::Errno;

use crate::sys;

/// One piece of a [`writev`]: bytes of a slice, or `len` bytes at a raw address that only the
/// kernel reads (an `iovec`).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct IoPiece<'a> {
    pub(crate) iov: libc::iovec,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> IoPiece<'a> {
    /// The bytes of `bytes`.
    pub fn from_slice(bytes: &'a [u8]) -> IoPiece<'a> {
        IoPiece::from_raw(bytes.as_ptr(), bytes.len())
    }

    /// `len` bytes at `ptr`, read by the kernel only. Safe: the kernel checks the address on the
    /// call (an unreadable one fails it with `EFAULT`), and nothing in this process reads it.
    /// The caller keeps the memory mapped across the call for the bytes to be the ones it meant.
    pub fn from_raw(ptr: *const u8, len: usize) -> IoPiece<'a> {
        IoPiece {
            iov: libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            },
            _bytes: PhantomData,
        }
    }

    /// The piece without its first `skip` bytes (all of them when `skip` is longer).
    pub fn skip(self, skip: usize) -> IoPiece<'a> {
        let skip = skip.min(self.len());
        IoPiece::from_raw(
            self.iov.iov_base.cast::<u8>().wrapping_add(skip),
            self.len() - skip,
        )
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// By hand: `libc::iovec` is `Debug` only with libc's `extra_traits` feature.
impl std::fmt::Debug for IoPiece<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPiece")
            .field("base", &self.iov.iov_base)
            .field("len", &self.iov.iov_len)
            .finish()
    }
}

/// The most pieces one [`writev`] call takes (the kernel's `UIO_MAXIOV`); more are left unsent,
/// as a short write.
pub const MAX_PIECES: usize = sys::MAX_IOV;

/// `writev(2)` of up to [`MAX_PIECES`] pieces to `fd`, in order: returns the bytes written, which
/// may be fewer than given (the caller continues where it stopped). `EINTR` is returned, for the
/// caller to retry.
pub fn writev(fd: impl AsFd, pieces: &[IoPiece<'_>]) -> Result<usize, Errno> {
    sys::writev(fd.as_fd(), pieces)
}

/// A pidfd (close-on-exec) of the process that connected the Unix socket `socket`, taken by the
/// kernel at `connect()` time (`getsockopt(SO_PEERPIDFD)`, Linux 6.5+). Fails with `ENOPROTOOPT`
/// or `EINVAL` on older kernels, `ESRCH` when that process was already reaped (Linux 6.9+).
#[doc(alias = "SO_PEERPIDFD")]
pub fn peer_pidfd(socket: impl AsFd) -> Result<OwnedFd, Errno> {
    sys::peer_pidfd(socket.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn writev_sends_slices_and_raw_pieces_in_order() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let head = b"head:";
        let body = vec![7u8; 3000];
        let pieces = [
            IoPiece::from_slice(head),
            IoPiece::from_raw(body.as_ptr(), body.len()).skip(1000),
            IoPiece::from_slice(&[]),
            IoPiece::from_slice(b"!"),
        ];
        assert_eq!(pieces[1].len(), 2000);
        let n = writev(&a, &pieces).expect("writev");
        assert_eq!(n, 5 + 2000 + 1);
        let mut got = vec![0u8; n];
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got[..5], head);
        assert!(got[5..2005].iter().all(|&x| x == 7));
        assert_eq!(got[2005], b'!');
    }

    #[test]
    fn writev_of_an_unmapped_address_is_efault() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let nowhere = IoPiece::from_raw(std::ptr::null(), 16);
        assert_eq!(writev(&a, &[nowhere]), Err(Errno::FAULT));
    }

    #[test]
    fn peer_pidfd_names_this_process() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        match peer_pidfd(&a) {
            Ok(fd) => {
                let info = std::fs::read_to_string(format!(
                    "/proc/self/fdinfo/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&fd)
                ))
                .expect("fdinfo");
                let pid: u32 = info
                    .lines()
                    .find_map(|l| l.strip_prefix("Pid:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a Pid line");
                assert_eq!(pid, std::process::id());
            }
            Err(e @ (Errno::NOPROTOOPT | Errno::INVAL)) => {
                eprintln!("skipped: this kernel has no SO_PEERPIDFD ({e})");
            }
            Err(e) => panic!("SO_PEERPIDFD: {e}"),
        }
    }
}
