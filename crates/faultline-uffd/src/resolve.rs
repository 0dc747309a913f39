//! The resolve ioctls: COPY, ZEROPAGE, CONTINUE, POISON, MOVE, WRITEPROTECT and WAKE.
//!
//! The kernel reports progress through a signed field of the argument struct: the number of bytes
//! done, or a negative errno. When a multi-page resolve stops part-way (a page already present, an
//! address-space change), the ioctl fails with EAGAIN but the field holds the bytes that *were*
//! done. This module turns both channels into one typed answer: `Ok(Resolved::Complete(n))`,
//! `Ok(Resolved::Partial(n))` (n > 0 bytes done, the rest not), or `Err(ResolveError)` with a
//! matchable [`ResolveErrorKind`] when nothing was done. A negative count never becomes a size.
//!
//! Wake semantics: without DONTWAKE, a successful resolve wakes every thread blocked on the range,
//! including faults whose messages have not been read. With DONTWAKE the sleepers stay asleep
//! until [`Uffd::wake`] covers them.

use std::sync::atomic::Ordering;

use bitflags::bitflags;
use rustix::io::Errno;

use crate::error::{check_range, ResolveError, ResolveErrorKind, ResolveOp};
use crate::mapping::PAGE_SIZE;
use crate::sys;
use crate::uffd::{IoctlCounters, Uffd};

/// The result of a resolve ioctl that did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Resolved {
    /// The whole range was resolved (bytes).
    Complete(u64),
    /// Only the first `n` bytes were resolved; the kernel stopped (EAGAIN with progress) at a page
    /// that is already present or because the address space is changing.
    Partial(u64),
}

impl Resolved {
    /// Bytes resolved.
    pub fn bytes(self) -> u64 {
        match self {
            Resolved::Complete(n) | Resolved::Partial(n) => n,
        }
    }
    /// Whether the whole range was done.
    pub fn is_complete(self) -> bool {
        matches!(self, Resolved::Complete(_))
    }
}

bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the threads blocked on the range.
        const DONTWAKE = 1 << 0;
        /// Map the page write-protected (WP-registered ranges).
        const WP = 1 << 1;
    }
}

bitflags! {
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ZeropageMode: u64 {
        /// Do not wake the threads blocked on the range.
        const DONTWAKE = 1 << 0;
    }
}

bitflags! {
    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the threads blocked on the range.
        const DONTWAKE = 1 << 0;
        /// Map the page write-protected.
        const WP = 1 << 1;
    }
}

bitflags! {
    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the threads blocked on the range.
        const DONTWAKE = 1 << 0;
        /// Holes in the source are skipped instead of failing with ENOENT.
        const ALLOW_SRC_HOLES = 1 << 1;
    }
}

bitflags! {
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct WriteprotectMode: u64 {
        /// Set write protection (absent: remove it, which resolves WP faults).
        const WP = 1 << 0;
        /// Do not wake the threads blocked on the range when removing protection.
        const DONTWAKE = 1 << 1;
    }
}

/// Turn the two result channels of a progress-reporting ioctl into a typed answer.
fn outcome(
    op: ResolveOp,
    start: u64,
    len: u64,
    result: Result<(), Errno>,
    progress: i64,
    counters: &IoctlCounters,
) -> Result<Resolved, ResolveError> {
    match result {
        Ok(()) => Ok(Resolved::Complete(
            u64::try_from(progress).unwrap_or(len).min(len),
        )),
        Err(errno) => {
            if errno == Errno::AGAIN {
                counters.eagain.fetch_add(1, Ordering::Relaxed);
            }
            match u64::try_from(progress) {
                Ok(done) if done > 0 && done < len => Ok(Resolved::Partial(done)),
                Ok(done) if done >= len && done > 0 => Ok(Resolved::Complete(len)),
                _ => {
                    // Nothing done: the field holds -errno (or was never written).
                    let errno = if progress < 0 {
                        i32::try_from(-progress)
                            .map(Errno::from_raw_os_error)
                            .unwrap_or(errno)
                    } else {
                        errno
                    };
                    if errno == Errno::EXIST {
                        counters.eexist.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(ResolveError::from_errno(op, start, len, errno))
                }
            }
        }
    }
}

fn checked(op: ResolveOp, start: u64, len: u64) -> Result<(), ResolveError> {
    check_range(start, len, PAGE_SIZE as u64).map_err(|_| ResolveError::invalid(op, start, len))
}

impl Uffd {
    /// `UFFDIO_COPY`: atomically fill the missing pages at `dst` with `src` and (unless DONTWAKE)
    /// wake the threads waiting on them.
    #[doc(alias = "UFFDIO_COPY")]
    pub fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<Resolved, ResolveError> {
        self.copy_from_ptr(dst, src.as_ptr(), src.len(), mode)
    }

    /// `UFFDIO_COPY` from a raw source address of this process, e.g. a file mapping that may
    /// change underneath (no slice is formed over it). The kernel reads the source with
    /// `copy_from_user`; an unreadable source fails with [`ResolveErrorKind::BadAddress`].
    #[doc(alias = "UFFDIO_COPY")]
    pub fn copy_from_ptr(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
        mode: CopyMode,
    ) -> Result<Resolved, ResolveError> {
        let len = len as u64;
        checked(ResolveOp::Copy, dst, len)?;
        let mut arg = sys::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: mode.bits(),
            copy: 0,
        };
        self.stats.copy.fetch_add(1, Ordering::Relaxed);
        let r = sys::copy(self.borrow(), &mut arg);
        outcome(ResolveOp::Copy, dst, len, r, arg.copy, &self.stats)
    }

    /// `UFFDIO_ZEROPAGE`: map zero pages at the missing pages of the range.
    #[doc(alias = "UFFDIO_ZEROPAGE")]
    pub fn zeropage(
        &self,
        start: u64,
        len: u64,
        mode: ZeropageMode,
    ) -> Result<Resolved, ResolveError> {
        checked(ResolveOp::Zeropage, start, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            zeropage: 0,
        };
        self.stats.zeropage.fetch_add(1, Ordering::Relaxed);
        let r = sys::zeropage(self.borrow(), &mut arg);
        outcome(
            ResolveOp::Zeropage,
            start,
            len,
            r,
            arg.zeropage,
            &self.stats,
        )
    }

    /// `UFFDIO_CONTINUE`: map the pages already in the page cache (MINOR faults).
    #[doc(alias = "UFFDIO_CONTINUE")]
    pub fn continue_minor(
        &self,
        start: u64,
        len: u64,
        mode: ContinueMode,
    ) -> Result<Resolved, ResolveError> {
        checked(ResolveOp::Continue, start, len)?;
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            mapped: 0,
        };
        self.stats.continue_.fetch_add(1, Ordering::Relaxed);
        let r = sys::continue_(self.borrow(), &mut arg);
        outcome(ResolveOp::Continue, start, len, r, arg.mapped, &self.stats)
    }

    /// `UFFDIO_POISON`: mark the missing pages poisoned; an access raises SIGBUS. Use it for a page
    /// that cannot be served correctly, so that the client sees an error, never a wrong page.
    #[doc(alias = "UFFDIO_POISON")]
    pub fn poison(&self, start: u64, len: u64) -> Result<Resolved, ResolveError> {
        checked(ResolveOp::Poison, start, len)?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range { start, len },
            mode: 0,
            updated: 0,
        };
        self.stats.poison.fetch_add(1, Ordering::Relaxed);
        let r = sys::poison(self.borrow(), &mut arg);
        outcome(ResolveOp::Poison, start, len, r, arg.updated, &self.stats)
    }

    /// The body of [`Uffd::move_pages`] (declared with the crate's other unsafe code in
    /// `sys`), whose safety contract the caller keeps: no Rust reference into `src..src+len`.
    pub(crate) fn move_unchecked(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        mode: MoveMode,
    ) -> Result<Resolved, ResolveError> {
        checked(ResolveOp::Move, dst, len)?;
        checked(ResolveOp::Move, src, len)?;
        let mut arg = sys::uffdio_move {
            dst,
            src,
            len,
            mode: mode.bits(),
            move_: 0,
        };
        self.stats.move_.fetch_add(1, Ordering::Relaxed);
        let r = sys::move_pages(self.borrow(), &mut arg);
        outcome(ResolveOp::Move, dst, len, r, arg.move_, &self.stats)
    }

    /// `UFFDIO_MOVE` of `len` bytes at `offset` of `scratch` to the missing pages at `dst`: the
    /// one-copy path for bytes the handler produced itself. Only for a userfaultfd that serves this
    /// process ([`Uffd::is_own_process`]); otherwise fails with [`ResolveErrorKind::NotPermitted`].
    #[doc(alias = "UFFDIO_MOVE")]
    pub fn move_from_scratch(
        &self,
        dst: u64,
        scratch: &mut crate::scratch::ScratchPages,
        offset: usize,
        len: usize,
        mode: MoveMode,
    ) -> Result<Resolved, ResolveError> {
        let len64 = len as u64;
        let src = scratch
            .check(offset, len)
            .map_err(|_| ResolveError::invalid(ResolveOp::Move, dst, len64))?;
        if !self.is_own_process() {
            return Err(ResolveError {
                op: ResolveOp::Move,
                kind: ResolveErrorKind::NotPermitted,
                start: dst,
                len: len64,
                errno: Errno::PERM,
            });
        }
        // The contract of `move_pages` holds: `src` lies in `scratch`, exclusively borrowed for
        // the call, so no reference into it exists; its pages belong to this process's address
        // space (checked above), which is the fd's. Afterwards they are holes that the scratch
        // buffer tolerates.
        self.move_unchecked(dst, src, len64, mode)
    }

    /// `UFFDIO_WRITEPROTECT`: set (`WP`) or clear write protection on a WP-registered range.
    /// Clearing it resolves WP faults and wakes their threads unless DONTWAKE.
    #[doc(alias = "UFFDIO_WRITEPROTECT")]
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        mode: WriteprotectMode,
    ) -> Result<(), ResolveError> {
        checked(ResolveOp::Writeprotect, start, len)?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
        };
        self.stats.writeprotect.fetch_add(1, Ordering::Relaxed);
        sys::writeprotect(self.borrow(), &mut arg)
            .map_err(|errno| ResolveError::from_errno(ResolveOp::Writeprotect, start, len, errno))
    }

    /// `UFFDIO_WAKE`: wake the threads blocked on the range (after DONTWAKE resolves).
    #[doc(alias = "UFFDIO_WAKE")]
    pub fn wake(&self, start: u64, len: u64) -> Result<(), ResolveError> {
        checked(ResolveOp::Wake, start, len)?;
        let mut arg = sys::uffdio_range { start, len };
        self.stats.wake.fetch_add(1, Ordering::Relaxed);
        sys::wake(self.borrow(), &mut arg)
            .map_err(|errno| ResolveError::from_errno(ResolveOp::Wake, start, len, errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(result: Result<(), Errno>, progress: i64) -> Result<Resolved, ResolveError> {
        outcome(
            ResolveOp::Copy,
            0x1000,
            0x3000,
            result,
            progress,
            &IoctlCounters::default(),
        )
    }

    #[test]
    fn complete_partial_and_errors_are_told_apart() {
        assert_eq!(run(Ok(()), 0x3000), Ok(Resolved::Complete(0x3000)));
        assert_eq!(
            run(Err(Errno::AGAIN), 0x1000),
            Ok(Resolved::Partial(0x1000))
        );
        let e =
            run(Err(Errno::EXIST), -(Errno::EXIST.raw_os_error() as i64)).expect_err("an error");
        assert!(e.is_already_present());
        let e =
            run(Err(Errno::AGAIN), -(Errno::AGAIN.raw_os_error() as i64)).expect_err("an error");
        assert!(e.is_retry());
        // The field was never written (validation failed before the kernel's put_user).
        let e = run(Err(Errno::INVAL), 0).expect_err("an error");
        assert_eq!(e.kind, ResolveErrorKind::InvalidRange);
        let e = run(Err(Errno::SRCH), 0).expect_err("an error");
        assert!(e.is_process_gone());
    }

    #[test]
    fn a_negative_count_is_never_a_size() {
        for errno in [Errno::EXIST, Errno::NOENT, Errno::NOMEM, Errno::FAULT] {
            let r = run(Err(errno), -(errno.raw_os_error() as i64));
            assert_eq!(r.expect_err("an error").errno, errno);
        }
    }

    #[test]
    fn eexist_and_eagain_are_counted() {
        let c = IoctlCounters::default();
        let _ = outcome(ResolveOp::Copy, 0, 4096, Err(Errno::EXIST), -17, &c);
        let _ = outcome(ResolveOp::Copy, 0, 8192, Err(Errno::AGAIN), 4096, &c);
        assert_eq!(c.eexist.load(Ordering::Relaxed), 1);
        assert_eq!(c.eagain.load(Ordering::Relaxed), 1);
    }
}
