//! Baseline fault handlers for benchmarks: what the public examples do.
//!
//! One thread, one message per `read(2)`, one page-sized `UFFDIO_COPY` per fault from a source
//! pointer. [`naive_faultline`] runs that loop on `faultline-uffd`; [`naive_crate`] (feature
//! `userfaultfd-crate`) runs the same loop on the `userfaultfd` crate, the existing Rust binding.

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
/// pointer fails the copy with EFAULT, which ends the loop with a panic in this test helper).
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
            let off = (dst - region) as usize;
            assert!(
                dst >= region && dst + page <= region + len,
                "fault outside the region"
            );
            match uffd.copy_from_ptr(dst, src.wrapping_add(off), page as usize, CopyMode::empty()) {
                Ok(_) => st.copies += 1,
                Err(e) if e.is_already_present() => st.eexist += 1,
                Err(e) => panic!("copy: {e}"),
            }
            st.latencies_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    st
}

/// The same loop on the `userfaultfd` crate: returns after `stop` is set.
#[cfg(feature = "userfaultfd-crate")]
pub fn naive_crate(
    uffd: &userfaultfd::Uffd,
    region: u64,
    len: u64,
    page: u64,
    src: *const u8,
    stop: &AtomicBool,
) -> NaiveStats {
    use std::os::fd::AsRawFd;
    let mut st = NaiveStats::default();
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 5) };
        if r <= 0 {
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
            let off = (dst - region) as usize;
            // SAFETY: `dst` is a page of the registered region (only accessed volatile by the
            // benchmark), `src + off` is readable for `page` bytes (caller's contract).
            let r = unsafe {
                uffd.copy(
                    src.wrapping_add(off).cast(),
                    dst as *mut libc::c_void,
                    page as usize,
                    true,
                )
            };
            match r {
                Ok(_) => st.copies += 1,
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    st.eexist += 1
                }
                Err(e) => panic!("userfaultfd crate copy: {e}"),
            }
            st.latencies_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    st
}
