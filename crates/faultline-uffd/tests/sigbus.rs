//! `sigbus` and `sigbus-wp` of the kernel's uffd-unit-tests, through this crate's API, on every
//! memory kind. With `Features::SIGBUS` no fault is ever queued as a message: a user-space access
//! to a missing page raises SIGBUS in the faulting thread, and a kernel access (`read(2)` into the
//! page) fails with EFAULT. In WP mode the write-protect faults are signalled the same way — the
//! selftest's faulting process resolves both kinds from its SIGBUS handler (COPY for the missing
//! fault, then un-protecting for the WP fault of the write that follows) and its monitor thread
//! must see no message at all. Each scenario runs in a forked child, since it raises SIGBUS.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use faultline_testing::{
    in_child, missing_features, need_features, need_kind, on_sigbus, pattern_page, ChildExit,
};
use faultline_uffd::{
    CopyMode, EventBuffer, Features, Mapping, MemoryKind, RegisterMode, Uffd, WriteprotectMode,
};

const PAGES: usize = 4;

/// A safety net for the child: if a fault waited for a message nobody reads instead of raising
/// SIGBUS, SIGALRM ends the child (and the test fails) instead of hanging the suite.
fn arm_alarm() {
    // SAFETY: alarm(2) has no memory-safety preconditions.
    unsafe { libc::alarm(20) };
}

fn features_for(kind: MemoryKind, wp: bool) -> (Features, RegisterMode) {
    let mut features = Features::SIGBUS | missing_features(kind);
    let mut mode = RegisterMode::MISSING;
    if wp {
        features |= Features::PAGEFAULT_FLAG_WP;
        if kind != MemoryKind::PrivateAnonymous {
            features |= Features::WP_HUGETLBFS_SHMEM;
        }
        mode |= RegisterMode::WP;
    }
    (features, mode)
}

fn ready(test: &str, kind: MemoryKind, wp: bool) -> bool {
    need_features(test, features_for(kind, wp).0) && need_kind(test, kind, PAGES as u64 + 2)
}

// ---------------------------------------------------------------------------------------------
// Without a handler: the access dies of SIGBUS; a kernel access gets EFAULT; nothing is queued.

fn sigbus_kills_on(kind: MemoryKind) {
    if !ready("sigbus", kind, false) {
        return;
    }
    let exit = in_child(move || {
        arm_alarm();
        let (features, mode) = features_for(kind, false);
        let uffd = Uffd::new(features).expect("uffd");
        let m = Mapping::new(kind, 2 * kind.page_size()).expect("mapping");
        uffd.register(&m, mode).expect("register");

        // A kernel access to the missing page fails instead of queueing a fault.
        let (rx, tx) = rustix::pipe::pipe().expect("pipe");
        rustix::io::write(&tx, b"0123456789").expect("fill pipe");
        // SAFETY: the destination is 10 bytes inside the live mapping, which holds no Rust
        // references; the kernel writes it with copy_to_user.
        let n = unsafe { libc::read(rx.as_raw_fd(), m.as_ptr().cast(), 10) };
        assert_eq!(n, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EFAULT)
        );
        assert!(!uffd.poll_readable(Some(Duration::ZERO)).expect("poll"));
        assert_eq!(uffd.read_events(&mut EventBuffer::new(4)).expect("read"), 0);

        // A user access raises SIGBUS, which (no handler of ours) kills the child.
        let _ = m.read_u8(kind.page_size() + 3);
        // Not reached.
        42
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS), "sigbus on {kind}");
}

#[test]
fn sigbus_kills_private_anonymous() {
    sigbus_kills_on(MemoryKind::PrivateAnonymous);
}

#[test]
fn sigbus_kills_shmem() {
    sigbus_kills_on(MemoryKind::Shmem);
}

#[test]
fn sigbus_kills_hugetlb_private() {
    sigbus_kills_on(MemoryKind::HugetlbPrivate);
}

#[test]
fn sigbus_kills_hugetlb_shared() {
    sigbus_kills_on(MemoryKind::HugetlbShared);
}

// ---------------------------------------------------------------------------------------------
// With a handler: the selftest's faulting process, resolving from its SIGBUS handler.

/// What the child's SIGBUS handler serves (set once in the child, after fork).
struct Served {
    uffd: Uffd,
    base: u64,
    page_size: usize,
    pages: Vec<Vec<u8>>,
    filled: Vec<AtomicBool>,
    wp: bool,
}

static SERVED: OnceLock<Served> = OnceLock::new();
static SIGNALS: AtomicU64 = AtomicU64::new(0);

fn die(code: i32) -> ! {
    // SAFETY: async-signal-safe exit of the forked child.
    unsafe { libc::_exit(code) }
}

/// Resolve the fault that raised SIGBUS, from inside the handler (ioctls and atomics only): the
/// first signal for a page is its missing fault (COPY, write-protected in WP mode); a second one
/// is only expected in WP mode, for the write to the protected page (un-protect).
extern "C" fn serve_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: for SIGBUS the kernel fills in the faulting address.
    let addr = unsafe { info.si_addr() } as u64;
    let Some(s) = SERVED.get() else { die(60) };
    let ps = s.page_size as u64;
    let page_addr = addr & !(ps - 1);
    let page = match page_addr
        .checked_sub(s.base)
        .map(|o| usize::try_from(o / ps).expect("fits usize"))
    {
        Some(p) if p < s.pages.len() => p,
        _ => die(61),
    };
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    if !s.filled[page].swap(true, Ordering::SeqCst) {
        let mode = if s.wp {
            CopyMode::WP
        } else {
            CopyMode::empty()
        };
        if s.uffd.copy(page_addr, &s.pages[page], mode).is_err() {
            die(62);
        }
    } else if s.wp {
        if s.uffd
            .writeprotect(page_addr, ps, WriteprotectMode::empty())
            .is_err()
        {
            die(63);
        }
    } else {
        // The selftest's "Signal repeated": a served page must not fault again.
        die(64);
    }
}

fn sigbus_served_in(kind: MemoryKind, wp: bool) -> i32 {
    arm_alarm();
    let ps = kind.page_size();
    let (features, mode) = features_for(kind, wp);
    let uffd = Uffd::new(features).expect("uffd");
    let m = Mapping::new(kind, PAGES * ps).expect("mapping");
    uffd.register(&m, mode).expect("register");
    let pages: Vec<Vec<u8>> = (0..PAGES).map(|p| pattern_page(51, p as u64, ps)).collect();
    let served = Served {
        uffd,
        base: m.addr(),
        page_size: ps,
        pages,
        filled: (0..PAGES).map(|_| AtomicBool::new(false)).collect(),
        wp,
    };
    assert!(SERVED.set(served).is_ok(), "set once per child");
    let s = SERVED.get().expect("just set");
    on_sigbus(serve_sigbus);

    let signals_per_page = if wp { 2 } else { 1 };
    for round in 1..=2u64 {
        for p in 0..PAGES {
            let off = p * ps + 8;
            // Missing: SIGBUS, served by COPY; the read is retried and sees the page.
            let b = m.read_u8(off).expect("in bounds");
            assert_eq!(b, s.pages[p][8], "page {p}");
            // Writing it back: in WP mode the page is protected, SIGBUS again, un-protected.
            m.write_u8(off, b).expect("in bounds");
        }
        for p in 0..PAGES {
            let mut got = vec![0u8; ps];
            m.read(p * ps, &mut got).expect("read");
            assert!(got == s.pages[p], "page {p} corrupted");
        }
        assert_eq!(
            SIGNALS.load(Ordering::SeqCst),
            round * signals_per_page * PAGES as u64,
            "signals after round {round}"
        );
        if round == 1 {
            // Release the pages (as the selftest between its two faulting passes): they are
            // missing again and raise SIGBUS again.
            if kind.is_shared() {
                m.remove(0, m.len()).expect("MADV_REMOVE");
            } else {
                m.discard(0, m.len()).expect("MADV_DONTNEED");
            }
            for f in &s.filled {
                f.store(false, Ordering::SeqCst);
            }
        }
    }

    // The monitor's view: not one message was queued.
    assert!(!s.uffd.poll_readable(Some(Duration::ZERO)).expect("poll"));
    assert_eq!(
        s.uffd.read_events(&mut EventBuffer::new(8)).expect("read"),
        0
    );
    let st = s.uffd.stats();
    assert_eq!(st.copy, 2 * PAGES as u64);
    assert_eq!(st.writeprotect, if wp { 2 * PAGES as u64 } else { 0 });
    assert_eq!((st.reads, st.events, st.eexist), (0, 0, 0));
    0
}

fn sigbus_served_on(kind: MemoryKind, wp: bool) {
    let test = if wp { "sigbus-wp" } else { "sigbus" };
    if !ready(test, kind, wp) {
        return;
    }
    let exit = in_child(move || sigbus_served_in(kind, wp));
    assert_eq!(
        exit,
        ChildExit::Code(0),
        "{test} on {kind} (child exit codes: 60-64 handler)"
    );
}

#[test]
fn sigbus_served_private_anonymous() {
    sigbus_served_on(MemoryKind::PrivateAnonymous, false);
}

#[test]
fn sigbus_served_shmem() {
    sigbus_served_on(MemoryKind::Shmem, false);
}

#[test]
fn sigbus_served_hugetlb_private() {
    sigbus_served_on(MemoryKind::HugetlbPrivate, false);
}

#[test]
fn sigbus_served_hugetlb_shared() {
    sigbus_served_on(MemoryKind::HugetlbShared, false);
}

#[test]
fn sigbus_wp_private_anonymous() {
    sigbus_served_on(MemoryKind::PrivateAnonymous, true);
}

#[test]
fn sigbus_wp_shmem() {
    sigbus_served_on(MemoryKind::Shmem, true);
}

#[test]
fn sigbus_wp_hugetlb_private() {
    sigbus_served_on(MemoryKind::HugetlbPrivate, true);
}

#[test]
fn sigbus_wp_hugetlb_shared() {
    sigbus_served_on(MemoryKind::HugetlbShared, true);
}
