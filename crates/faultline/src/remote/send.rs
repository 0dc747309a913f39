//! The exporter's vectored socket write, which sends page bytes straight from a source's memory.
//!
//! A piece of an answer is frame headers, page bytes and kept pages, sent in one `writev(2)`.
//! For a memory file the page bytes are in the source's mapping: copying them into a buffer
//! first costs a copy of every page sent (a tenth of a streamed restore's CPU here). They are
//! sent from where they are instead.
//!
//! # The rules it keeps
//! The mapping of a file is memory another process may change (STYLE.md rule 3): no `&[u8]` is
//! ever made over it. The source lends a raw pointer ([`PageSource::ptr_at`]), and the pointer
//! goes to the kernel in an `iovec`, so only the kernel reads those bytes. That takes a
//! `writev` over raw `iovec`s (std and rustix take slices), which the bindings offer safely
//! ([`faultline_uffd::socket::writev`]). A [`Mapped`] borrows the source it points into, so the
//! pointer cannot outlive it.

use std::io;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;

use faultline_uffd::socket::{self, IoPiece, MAX_PIECES};
use rustix::io::Errno;

use crate::source::PageSource;

/// Bytes of a source's own memory, as the raw pointer it lent ([`PageSource::ptr_at`]). Equal
/// when they are the same bytes (address and length).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped<'a> {
    ptr: *const u8,
    len: usize,
    _source: PhantomData<&'a dyn PageSource>,
}

impl<'a> Mapped<'a> {
    /// `len` bytes of `source` at `offset`, if it lends a pointer to them.
    pub(crate) fn of(source: &'a dyn PageSource, offset: u64, len: usize) -> Option<Mapped<'a>> {
        let ptr = source.ptr_at(offset, len as u64)?;
        Some(Mapped {
            ptr,
            len,
            _source: PhantomData,
        })
    }
}

/// A part of a vectored write.
#[derive(Clone, Copy)]
pub(crate) enum Part<'a> {
    /// Bytes of ours.
    Bytes(&'a [u8]),
    /// Bytes of a source's memory.
    Mapped(Mapped<'a>),
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Mapped(m) => m.len,
        }
    }

    /// The iovec of this part from byte `skip` on.
    fn iovec(&self, skip: usize) -> IoPiece<'_> {
        let piece = match self {
            Part::Bytes(b) => IoPiece::from_slice(b),
            // Only the kernel reads through it (writev); no reference is made.
            Part::Mapped(m) => IoPiece::from_raw(m.ptr, m.len),
        };
        piece.skip(skip)
    }
}

/// The most iovecs one `writev` takes (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = MAX_PIECES;

/// Write all of `parts` to `fd` (a blocking socket), in order.
pub(crate) fn write_all(fd: BorrowedFd<'_>, parts: &[Part<'_>]) -> io::Result<()> {
    let mut idx = 0;
    let mut skip = 0;
    let mut iov = Vec::with_capacity(parts.len().min(MAX_IOV));
    while idx < parts.len() {
        if parts[idx].len() == skip {
            idx += 1;
            skip = 0;
            continue;
        }
        iov.clear();
        iov.push(parts[idx].iovec(skip));
        iov.extend(
            parts[idx + 1..]
                .iter()
                .take(MAX_IOV - 1)
                .map(|p| p.iovec(0)),
        );
        // Each iovec describes readable memory that lives across the call: a `Part::Bytes`
        // borrows a live slice; a `Part::Mapped` is a pointer its source lent for `len` bytes,
        // valid while the source lives, which the `'a` borrow in `Mapped` guarantees. `skip` is
        // less than the part's length (checked above). writev only reads that memory.
        let n = match socket::writev(fd, &iov) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        (idx, skip) = advance(parts, idx, skip, n);
    }
    Ok(())
}

/// Where the next write starts after one that took `n` bytes from part `idx`, byte `skip` on
/// (a socket may take less than it was given): `(part, byte in it)`.
fn advance(parts: &[Part<'_>], mut idx: usize, mut skip: usize, mut n: usize) -> (usize, usize) {
    while n > 0 && idx < parts.len() {
        let left = parts[idx].len() - skip;
        if n >= left {
            n -= left;
            idx += 1;
            skip = 0;
        } else {
            skip += n;
            n = 0;
        }
    }
    (idx, skip)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::MmapSource;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn parts_of_ours_and_of_a_mapping_arrive_in_order() {
        let mut f = tempfile::tempfile().unwrap();
        let file_bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&file_bytes).unwrap();
        let map = MmapSource::from_file(&f).unwrap();
        let src: &dyn PageSource = &map;
        let head = b"head".to_vec();
        let tail = vec![9u8; 100];
        // Many parts (more than one writev takes), some empty, to cross the iovec limit.
        let mut parts = vec![Part::Bytes(&head), Part::Bytes(&[])];
        for i in 0..1500u64 {
            let off = (i % 3) * 4096 + i % 7;
            parts.push(Part::Mapped(Mapped::of(src, off, 11).unwrap()));
        }
        parts.push(Part::Bytes(&tail));
        let mut want = head.clone();
        for i in 0..1500u64 {
            let off = usize::try_from((i % 3) * 4096 + i % 7).unwrap();
            want.extend_from_slice(&file_bytes[off..off + 11]);
        }
        want.extend_from_slice(&tail);
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = want.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            b.read_exact(&mut got).unwrap();
            got
        });
        write_all(a.as_fd(), &parts).unwrap();
        drop(a);
        assert!(reader.join().unwrap() == want);
        // Out of range: no pointer, no part.
        assert!(Mapped::of(src, 3 * 4096 - 10, 11).is_none());
    }

    #[test]
    fn short_writes_go_on_where_they_stopped() {
        let parts = [
            Part::Bytes(b"abcd"),
            Part::Bytes(b""),
            Part::Bytes(b"efghij"),
            Part::Bytes(b"k"),
        ];
        let (mut idx, mut skip) = (0, 0);
        let mut got = Vec::new();
        while idx < parts.len() {
            // What a write from here would be given; a trickling peer takes 3 bytes of it.
            let mut given = Vec::new();
            for (i, p) in parts[idx..].iter().enumerate() {
                if let Part::Bytes(b) = p {
                    given.extend_from_slice(if i == 0 { &b[skip..] } else { b });
                }
            }
            let n = given.len().min(3);
            got.extend_from_slice(&given[..n]);
            (idx, skip) = advance(&parts, idx, skip, n);
            assert!(
                n > 0 || idx == parts.len(),
                "stuck at part {idx} byte {skip}"
            );
        }
        assert_eq!(got, b"abcdefghijk");
        // Part by part: the end of a part moves on to the next one (an empty one is stepped
        // over by the write loop, before it builds the next iovecs).
        assert_eq!(advance(&parts, 0, 0, 4), (1, 0));
        assert_eq!(advance(&parts, 0, 1, 2), (0, 3));
        assert_eq!(advance(&parts, 2, 5, 2), (4, 0));
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let big = vec![0u8; 1 << 20];
        // SIGPIPE is ignored by the Rust runtime: the write fails with EPIPE.
        let e = write_all(a.as_fd(), &[Part::Bytes(&big)]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
