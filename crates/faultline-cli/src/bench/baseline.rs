//! Baseline fault handlers of `faultline bench`: what the public examples do, and the kernel's
//! own path.
//!
//! One thread, one message per `read(2)`, one page-sized `UFFDIO_COPY` per fault from a source
//! pointer. [`naive_faultline`] runs that loop on `faultline-uffd`; `naive_crate` (feature
//! `crate-baseline`) runs the same loop on the `userfaultfd` crate, the existing Rust binding.
//! [`FileMapping`] is the kernel's own path: a file mapping touched from user space.
//!
//! Two of these cannot be written without `unsafe`, the only `unsafe` of this binary, allowed
//! in this module alone: the `userfaultfd` crate's `copy` is an `unsafe fn`, and user space
//! reading a file mapping needs the mapping made (`mmap`) and read through a raw pointer.
//! (faultline itself never reads a file mapping from user space: its mmap source hands the
//! mapping to the kernel and reads files with `pread`.)
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faultline_uffd::{CopyMode, Event, EventBuffer, Uffd};

/// What a baseline handler did.
#[derive(Debug, Clone, Default)]
pub struct NaiveStats {
    /// Fault messages read.
    pub faults: u64,
    /// Successful copies.
    pub copies: u64,
    /// EEXIST answers.
    pub eexist: u64,
    /// Per-fault latency (read → copy done), nanoseconds.
    pub latencies_ns: Vec<u64>,
}

/// Serve faults on `[region, region + len)` from `src` (the same layout) until `stop` is set:
/// one message per read, one `page`-byte COPY per fault.
///
/// `src` must point to `len` readable bytes for as long as this runs (the kernel reads it; a bad
/// pointer fails the copy with EFAULT, which ends the loop with a panic in this benchmark).
pub fn naive_faultline(
    uffd: &Uffd,
    region: u64,
    len: u64,
    page: u64,
    src: *const u8,
    stop: &AtomicBool,
) -> NaiveStats {
    let mut st = NaiveStats::default();
    let mut buf = EventBuffer::new(1);
    while !stop.load(Ordering::Acquire) {
        if !uffd
            .poll_readable(Some(Duration::from_millis(5)))
            .expect("poll")
        {
            continue;
        }
        if uffd.read_events(&mut buf).expect("read") == 0 {
            continue;
        }
        let t = Instant::now();
        for ev in buf.events() {
            let Event::Pagefault { address, .. } = ev else {
                continue;
            };
            st.faults += 1;
            let dst = address & !(page - 1);
            let off = usize::try_from(dst - region).expect("an offset inside the mapped region");
            assert!(
                dst >= region && dst + page <= region + len,
                "fault outside the region"
            );
            match uffd.copy_from_ptr(
                dst,
                src.wrapping_add(off),
                usize::try_from(page).expect("a page size"),
                CopyMode::empty(),
            ) {
                Ok(_) => st.copies += 1,
                Err(e) if e.is_already_present() => st.eexist += 1,
                Err(e) => panic!("copy: {e}"),
            }
            st.latencies_ns
                .push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    st
}

/// The same loop on the `userfaultfd` crate: returns after `stop` is set.
#[cfg(feature = "crate-baseline")]
pub fn naive_crate(
    uffd: &userfaultfd::Uffd,
    region: u64,
    len: u64,
    page: u64,
    src: *const u8,
    stop: &AtomicBool,
) -> NaiveStats {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut st = NaiveStats::default();
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: 5_000_000,
    };
    while !stop.load(Ordering::Acquire) {
        let mut pfd = [PollFd::new(uffd, PollFlags::IN)];
        if !matches!(poll(&mut pfd, Some(&timeout)), Ok(n) if n > 0) {
            continue;
        }
        let Some(ev) = uffd.read_event().expect("read_event") else {
            continue;
        };
        let t = Instant::now();
        if let userfaultfd::Event::Pagefault { addr, .. } = ev {
            st.faults += 1;
            let dst = addr as u64 & !(page - 1);
            assert!(
                dst >= region && dst + page <= region + len,
                "fault outside the region"
            );
            let off = usize::try_from(dst - region).expect("an offset inside the mapped region");
            // SAFETY: `dst` is a page of the registered region (only accessed volatile by the
            // benchmark), `src + off` is readable for `page` bytes (caller's contract).
            let r = unsafe {
                uffd.copy(
                    src.wrapping_add(off).cast(),
                    dst as *mut std::ffi::c_void,
                    usize::try_from(page).expect("a page size"),
                    true,
                )
            };
            match r {
                Ok(_) => st.copies += 1,
                Err(userfaultfd::Error::CopyFailed(e))
                    if e as i32 == rustix::io::Errno::EXIST.raw_os_error() =>
                {
                    st.eexist += 1
                }
                Err(e) => panic!("userfaultfd crate copy: {e}"),
            }
            st.latencies_ns
                .push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    st
}

/// A read-only shared mapping of a file that this process reads itself: the kernel's own
/// page-cache fault path, the `kernel` baseline of `faultline bench`.
///
/// Only for files nobody truncates: touching a page past a new, shorter end of the file raises
/// `SIGBUS`. (That is why faultline's `MmapSource` never reads its mapping from user space, and
/// why this lives in the benchmark and not in the runtime.)
#[derive(Debug)]
pub struct FileMapping {
    map: memmap2::Mmap,
}

impl FileMapping {
    /// Map all of `file` (open for reading, not empty) read-only and shared, without populating.
    pub fn map(file: &std::fs::File) -> std::io::Result<FileMapping> {
        // SAFETY: memmap2 asks that the file be neither modified nor truncated while mapped,
        // because of `Mmap`'s `&[u8]`; that slice is never formed here (the mapping is read only
        // through volatile loads in `touch`), and the benchmark's memory file is its own, made
        // for the run and left alone while mapped.
        let map = unsafe { memmap2::MmapOptions::new().map(file) }?;
        Ok(FileMapping { map })
    }

    /// Read byte `offset` through the mapping (a page fault served by the kernel if the page is
    /// not mapped yet); `None` past the end. `SIGBUS` if the file was truncated below `offset`.
    pub fn touch(&self, offset: usize) -> Option<u8> {
        if offset >= self.map.len() {
            return None;
        }
        let byte = self.map.as_ptr().wrapping_add(offset);
        // SAFETY: `byte` is inside the live, readable mapping (`offset < len`); a volatile load
        // of a `u8` needs no alignment, forms no reference and any byte is a valid `u8`.
        Some(unsafe { byte.read_volatile() })
    }
}
