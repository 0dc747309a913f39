//! Dirty tracking with `WP_ASYNC` and the `PAGEMAP_SCAN` ioctl (Linux 6.7).
//!
//! A range registered in WP mode on a userfaultfd with [`Features::WP_ASYNC`] is write-protected
//! (with [`Uffd::writeprotect`]); a write to it does not queue a message: the kernel lifts the
//! protection itself and marks the page written. `PAGEMAP_SCAN` on `/proc/<pid>/pagemap` then
//! collects the written pages and, with `PM_SCAN_WP_MATCHING`, write-protects them again in the
//! same call: the modern, race-free replacement of soft-dirty bits.
//!
//! [`Features::WP_ASYNC`]: crate::Features::WP_ASYNC
//! [`Uffd::writeprotect`]: crate::Uffd::writeprotect

use std::os::fd::{AsFd, OwnedFd};

use bitflags::bitflags;
use rustix::io::Errno;

use crate::error::{check_range, Error};
use crate::mapping::PAGE_SIZE;
use crate::sys;

bitflags! {
    /// `PAGE_IS_*` categories of `PAGEMAP_SCAN`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageCategories: u64 {
        /// Async write protection is possible on the page.
        const WPALLOWED = linux_raw_sys::general::PAGE_IS_WPALLOWED as u64;
        /// Written since it was last write-protected.
        const WRITTEN = linux_raw_sys::general::PAGE_IS_WRITTEN as u64;
        /// File-backed.
        const FILE = linux_raw_sys::general::PAGE_IS_FILE as u64;
        /// Present in memory.
        const PRESENT = linux_raw_sys::general::PAGE_IS_PRESENT as u64;
        /// Swapped out.
        const SWAPPED = linux_raw_sys::general::PAGE_IS_SWAPPED as u64;
        /// Maps the zero page.
        const PFNZERO = linux_raw_sys::general::PAGE_IS_PFNZERO as u64;
        /// A huge page.
        const HUGE = linux_raw_sys::general::PAGE_IS_HUGE as u64;
        /// Soft-dirty.
        const SOFT_DIRTY = linux_raw_sys::general::PAGE_IS_SOFT_DIRTY as u64;
        /// A guard region.
        const GUARD = linux_raw_sys::general::PAGE_IS_GUARD as u64;
        /// Bits this crate does not know.
        const _ = !0;
    }
}

/// A run of pages sharing categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// The categories (masked by the scan's return mask).
    pub categories: PageCategories,
}

/// The answer of one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanEnd {
    /// Runs written to the output.
    pub runs: usize,
    /// Where the walk stopped (the range end when it completed; earlier when the output was full).
    pub walk_end: u64,
}

/// An open `/proc/<pid>/pagemap` for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
    out: Vec<sys::page_region>,
}

impl Pagemap {
    /// Open this process's pagemap.
    pub fn open_self() -> Result<Pagemap, Error> {
        Self::open_path("/proc/self/pagemap")
    }

    /// Open another process's pagemap (needs ptrace-read access to it).
    pub fn open(pid: u32) -> Result<Pagemap, Error> {
        Self::open_path(&format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: &str) -> Result<Pagemap, Error> {
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(Error::os("open pagemap"))?;
        Ok(Pagemap {
            fd,
            out: vec![
                sys::page_region {
                    start: 0,
                    end: 0,
                    categories: 0
                };
                256
            ],
        })
    }

    /// One `PAGEMAP_SCAN` call over `start..start+len` reporting pages that have all of
    /// `required` categories, appending runs to `out`. With `reprotect`, matching pages are
    /// write-protected again atomically (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`: the range
    /// must be registered for async WP, else EPERM).
    #[doc(alias = "PAGEMAP_SCAN")]
    pub fn scan(
        &mut self,
        start: u64,
        len: u64,
        required: PageCategories,
        reprotect: bool,
        out: &mut Vec<PageRun>,
    ) -> Result<ScanEnd, Error> {
        check_range(start, len, PAGE_SIZE as u64)?;
        let mut arg = sys::pm_scan_arg {
            size: 0,
            flags: if reprotect {
                sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC
            } else {
                0
            },
            start,
            end: start + len,
            walk_end: 0,
            vec: 0,
            vec_len: 0,
            max_pages: 0,
            category_inverted: 0,
            category_mask: required.bits(),
            category_anyof_mask: 0,
            return_mask: PageCategories::all().bits() & 0x1ff,
        };
        let n = sys::pagemap_scan(self.fd.as_fd(), &mut arg, &mut self.out).map_err(|errno| {
            Error::Os {
                operation: "PAGEMAP_SCAN",
                errno,
            }
        })?;
        out.extend(self.out[..n].iter().map(|r| PageRun {
            start: r.start,
            end: r.end,
            categories: PageCategories::from_bits_retain(r.categories),
        }));
        Ok(ScanEnd {
            runs: n,
            walk_end: arg.walk_end,
        })
    }

    /// Collect every page written in `start..start+len` since the last collection, and
    /// write-protect them again (looping until the whole range was walked). Returns the runs.
    pub fn collect_written(&mut self, start: u64, len: u64) -> Result<Vec<PageRun>, Error> {
        let end = start.checked_add(len).ok_or(Error::Os {
            operation: "PAGEMAP_SCAN",
            errno: Errno::OVERFLOW,
        })?;
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let r = self.scan(at, end - at, PageCategories::WRITTEN, true, &mut out)?;
            if r.walk_end <= at {
                break;
            }
            at = r.walk_end;
        }
        Ok(out)
    }
}

/// Total bytes covered by runs.
pub fn run_bytes(runs: &[PageRun]) -> u64 {
    runs.iter().map(|r| r.end.saturating_sub(r.start)).sum()
}
