//! Write protection, after the kernel's uffd-unit-tests `wp-fork`, `wp-fork-with-event`,
//! `wp-fork-pin`, `wp-fork-pin-with-event` and `wp-unpopulated`, plus synchronous WP faults — on
//! every memory kind each applies to.
//!
//! What the selftests check, and these tests too (through `/proc/self/pagemap`'s `PM_UFFD_WP` bit
//! and through real faults):
//! - A fork()ed child inherits the uffd-wp bit of a protected page only when `EVENT_FORK` was
//!   negotiated (its copy of the range is then registered with the userfaultfd of the FORK event,
//!   and a write there is a WP fault served through that fd); without it the bit is dropped and the
//!   child writes freely. The bit also survives a zap (a pte marker) and fork copies the marker.
//! - Pinned pages: fork() copies a maybe-DMA-pinned private page at once ("early CoW"), and a
//!   read-only pin in the child unshares a page it shares with the parent; both copies must keep
//!   the bit exactly when the child is registered.
//! - `WP_UNPOPULATED`: protecting a never-touched range arms it, a read sees zeros, the first
//!   write is a WP fault.
#![allow(unsafe_code)]

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use faultline_testing::{
    direct_io_write_from, in_child, missing_features, need_features, need_kind, pattern_page,
    serve_fork_safe, skip, uffd_wp_bit, within, wp_features, ChildExit, FaultServer, Flow,
    LongtermPin,
};
use faultline_uffd::{
    CopyMode, Event, Features, Ioctls, Mapping, MemoryKind, PagefaultFlags, RegisterMode, Resolved,
    Uffd, WriteprotectMode,
};

/// Safety net for operations that block on a fault (a lost wake-up fails instead of hanging).
const LIMIT: Duration = Duration::from_secs(20);

/// A fork() in one test copies every other test's registered ranges into the child, and waits for
/// the FORK events of every `EVENT_FORK` userfaultfd: the tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One test per memory kind, in a module named after the scenario.
macro_rules! for_kinds {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn private_anonymous() {
                ($f)(MemoryKind::PrivateAnonymous)
            }
            #[test]
            fn shmem() {
                ($f)(MemoryKind::Shmem)
            }
            #[test]
            fn hugetlb_private() {
                ($f)(MemoryKind::HugetlbPrivate)
            }
            #[test]
            fn hugetlb_shared() {
                ($f)(MemoryKind::HugetlbShared)
            }
        }
    };
}

type FaultLog = (u64, PagefaultFlags);
/// The FORK events' userfaultfds, each with the server of its child's faults.
type Children = Arc<Mutex<Vec<(Arc<Uffd>, FaultServer)>>>;

/// Record a fault and resolve it by clearing write protection (every fault these tests expect
/// is a WP fault; anything else panics, which fails the test through its `within` net).
fn clear_wp(uffd: &Uffd, ev: Event, page_size: usize, log: &Sender<FaultLog>) {
    match ev {
        Event::Pagefault { address, flags, .. } => {
            let _ = log.send((address, flags));
            assert!(
                flags.contains(PagefaultFlags::WP),
                "not a WP fault: {flags:?}"
            );
            let page = address & !(page_size as u64 - 1);
            uffd.writeprotect(page, page_size as u64, WriteprotectMode::empty())
                .expect("clear write protection");
        }
        other => panic!("unexpected event {other:?}"),
    }
}

/// Serves a parent userfaultfd negotiated with `EVENT_FORK`: each FORK event's userfaultfd (the
/// child's) gets its own server that resolves WP faults; forks and faults are logged.
struct ForkWatch {
    server: FaultServer,
    children: Children,
    forks: Receiver<()>,
    child_faults: Receiver<FaultLog>,
    parent_faults: Receiver<FaultLog>,
}

impl ForkWatch {
    fn spawn(uffd: Arc<Uffd>, page_size: usize) -> ForkWatch {
        let children = Arc::new(Mutex::new(Vec::new()));
        let (fork_tx, forks) = mpsc::channel();
        let (child_tx, child_faults) = mpsc::channel();
        let (parent_tx, parent_faults) = mpsc::channel();
        let kids = Arc::clone(&children);
        let server = serve_fork_safe(uffd, move |uffd, ev| {
            match ev {
                Event::Fork(child) => {
                    let child = Arc::new(child);
                    let tx = child_tx.clone();
                    let s = FaultServer::spawn(Arc::clone(&child), move |u, ev| {
                        clear_wp(u, ev, page_size, &tx);
                        Flow::Continue
                    });
                    kids.lock().expect("children").push((child, s));
                    // Last: the test starts no other fork before this arrives.
                    let _ = fork_tx.send(());
                }
                ev => clear_wp(uffd, ev, page_size, &parent_tx),
            }
            Flow::Continue
        });
        ForkWatch {
            server,
            children,
            forks,
            child_faults,
            parent_faults,
        }
    }

    /// Stop every server; returns the children's userfaultfds in fork order (for their stats).
    fn finish(self) -> Vec<Arc<Uffd>> {
        self.server.stop();
        let kids = std::mem::take(&mut *self.children.lock().expect("children"));
        kids.into_iter()
            .map(|(uffd, server)| {
                server.stop();
                uffd
            })
            .collect()
    }
}

/// Run `f` in a forked child (bounded by [`LIMIT`]) and return how it ended; with a `watch`, also
/// wait until its FORK event has been handled (see [`serve_fork_safe`]).
fn fork_and_wait(watch: Option<&ForkWatch>, f: impl FnOnce() -> i32 + Send + 'static) -> ChildExit {
    let exit = within(LIMIT, move || in_child(f));
    if let Some(watch) = watch {
        watch.forks.recv_timeout(LIMIT).expect("FORK event handled");
    }
    exit
}

/// `MADV_PAGEOUT` (reclaim): a no-op without swap, and refused by hugetlbfs, both fine here —
/// like the selftest we only ask, and check that the protection is still there.
fn try_pageout(m: &Mapping, len: usize) {
    // SAFETY: reclaiming pages of our own mapping never changes their contents; the mapping holds
    // no Rust references.
    let _ = unsafe { libc::madvise(m.as_ptr().cast(), len, libc::MADV_PAGEOUT) };
}

fn wp_fork(kind: MemoryKind, with_event: bool) {
    let test = if with_event {
        "wp-fork-with-event"
    } else {
        "wp-fork"
    };
    let _serial = serial();
    // Private hugetlbfs: the child's write copies the page.
    if !need_kind(test, kind, 4) {
        return;
    }
    let mut features = wp_features(kind);
    if with_event {
        features |= Features::EVENT_FORK;
    }
    if !need_features(test, features) {
        return;
    }
    let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
    let m = Arc::new(Mapping::new(kind, kind.page_size()).expect("mapping"));
    let (addr, ps) = (m.addr(), m.page_size());
    let ioctls = uffd.register(&m, RegisterMode::WP).expect("register WP");
    assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    m.write_u8(0, 1).expect("populate");
    uffd.writeprotect(addr, ps as u64, WriteprotectMode::WP)
        .expect("protect");
    assert!(
        uffd_wp_bit(addr),
        "protected present page has no uffd-wp bit"
    );
    let watch = with_event.then(|| ForkWatch::spawn(Arc::clone(&uffd), ps));

    // 1. A present, protected page. With EVENT_FORK the child's write is a WP fault, served
    //    through the child's userfaultfd; without it the child writes freely.
    let child = Arc::clone(&m);
    let exit = fork_and_wait(watch.as_ref(), move || {
        if uffd_wp_bit(addr) != with_event {
            return 10;
        }
        if child.read_u8(0) != Ok(1) {
            return 11;
        }
        if child.write_u8(0, 7).is_err() || child.read_u8(0) != Ok(7) {
            return 12;
        }
        if uffd_wp_bit(addr) {
            return 13; // a written page is no longer protected
        }
        0
    });
    assert_eq!(exit, ChildExit::Code(0), "{test} on {kind}: present page");
    // The child wrote 7 into its copy (private) or into the shared page itself (shared).
    let parent_value = if kind.is_shared() { 7 } else { 1 };
    assert_eq!(m.read_u8(0), Ok(parent_value));
    assert!(uffd_wp_bit(addr), "the parent's page lost its protection");

    // 2. The zapped page: a pte marker (shared memory) or a swap entry (private, when swap exists)
    //    keeps the protection, and fork copies the marker into a registered child only.
    if kind.is_shared() {
        m.discard(0, ps).expect("MADV_DONTNEED");
    } else {
        try_pageout(&m, ps);
    }
    assert!(uffd_wp_bit(addr), "protection lost by the zap");
    let child = Arc::clone(&m);
    let exit = fork_and_wait(watch.as_ref(), move || {
        if uffd_wp_bit(addr) != with_event {
            return 20;
        }
        if child.read_u8(0) != Ok(parent_value) {
            return 21;
        }
        0
    });
    assert_eq!(exit, ChildExit::Code(0), "{test} on {kind}: zapped page");

    // 3. Unprotect, then the parent writes without a fault.
    uffd.writeprotect(addr, ps as u64, WriteprotectMode::empty())
        .expect("unprotect");
    assert!(!uffd_wp_bit(addr));
    let writer = Arc::clone(&m);
    within(LIMIT, move || writer.write_u8(0, 2)).expect("write");
    assert_eq!(m.read_u8(0), Ok(2));
    assert!(!uffd_wp_bit(addr));
    assert_eq!(uffd.stats().writeprotect, 2);

    if let Some(watch) = watch {
        let extra_forks = watch.forks.try_iter().count();
        let child_faults: Vec<_> = watch.child_faults.try_iter().collect();
        let parent_faults: Vec<_> = watch.parent_faults.try_iter().collect();
        let children = watch.finish();
        assert_eq!(
            (children.len(), extra_forks),
            (2, 0),
            "one FORK event per fork"
        );
        // Only the first child wrote, once, to its protected page.
        assert_eq!(
            child_faults,
            vec![(addr, PagefaultFlags::WP | PagefaultFlags::WRITE)]
        );
        assert_eq!(children[0].stats().writeprotect, 1);
        assert_eq!(children[1].stats().writeprotect, 0);
        assert_eq!(parent_faults, vec![]);
    }
    uffd.unregister_mapping(&m).expect("unregister");
}

for_kinds!(wp_fork_without_event, |k| wp_fork(k, false));
for_kinds!(wp_fork_with_event, |k| wp_fork(k, true));

fn wp_fork_pin(kind: MemoryKind, with_event: bool) {
    let test = if with_event {
        "wp-fork-pin-with-event"
    } else {
        "wp-fork-pin"
    };
    let _serial = serial();
    // Private hugetlbfs: the early CoW and the unshare each copy the page.
    if !need_kind(test, kind, 4) {
        return;
    }
    let mut features = wp_features(kind);
    if with_event {
        features |= Features::EVENT_FORK;
    }
    if !need_features(test, features) {
        return;
    }
    let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
    let m = Arc::new(Mapping::new(kind, kind.page_size()).expect("mapping"));
    let (addr, ps) = (m.addr(), m.page_size());
    uffd.register(&m, RegisterMode::WP).expect("register WP");
    m.write_u8(0, 1).expect("populate");
    // The only long-term pin reachable without CONFIG_GUP_TEST is a writable one, which would
    // take a WP fault on a protected page: pin first, then protect (the order does not matter to
    // fork, which only sees a pinned, protected page).
    let pin = match LongtermPin::new(m.as_ptr(), ps) {
        Ok(pin) => pin,
        Err(e) => {
            skip(
                test,
                &format!("{kind}: cannot pin with an io_uring fixed buffer: {e}"),
            );
            return;
        }
    };
    uffd.writeprotect(addr, ps as u64, WriteprotectMode::WP)
        .expect("protect");
    assert!(uffd_wp_bit(addr));
    let watch = with_event.then(|| ForkWatch::spawn(Arc::clone(&uffd), ps));

    // 1. Pin, then fork: a pinned private page is copied for the child during fork (early CoW);
    //    the copy keeps the uffd-wp bit exactly when the child is registered.
    let child = Arc::clone(&m);
    let exit = fork_and_wait(watch.as_ref(), move || {
        if uffd_wp_bit(addr) != with_event {
            return 10;
        }
        if child.read_u8(0) != Ok(1) {
            return 11;
        }
        0
    });
    assert_eq!(
        exit,
        ChildExit::Code(0),
        "{test} on {kind}: fork of a pinned page"
    );
    drop(pin);

    // 2. Fork, then a read-only pin in the child (O_DIRECT write from the page): the child
    //    unshares the page it shares with the parent, and the copy keeps the bit.
    let exit = fork_and_wait(watch.as_ref(), move || {
        match direct_io_write_from(addr as *const u8, 4096) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return 30,
            Err(_) => return 31,
        }
        if uffd_wp_bit(addr) != with_event {
            return 32;
        }
        0
    });
    if exit == ChildExit::Code(30) {
        skip(
            test,
            &format!("{kind}: R/O pin after fork: the temporary directory has no O_DIRECT"),
        );
    } else {
        assert_eq!(
            exit,
            ChildExit::Code(0),
            "{test} on {kind}: R/O pin in the child"
        );
    }
    // The parent's page is still protected and intact.
    assert!(uffd_wp_bit(addr));
    assert_eq!(m.read_u8(0), Ok(1));

    if let Some(watch) = watch {
        let extra_forks = watch.forks.try_iter().count();
        let child_faults: Vec<_> = watch.child_faults.try_iter().collect();
        let parent_faults: Vec<_> = watch.parent_faults.try_iter().collect();
        let children = watch.finish();
        assert_eq!(
            (children.len(), extra_forks),
            (2, 0),
            "one FORK event per fork"
        );
        // Neither the early CoW nor the unshare is a write: no WP fault anywhere.
        assert_eq!(child_faults, vec![]);
        assert_eq!(parent_faults, vec![]);
    }
    uffd.unregister_mapping(&m).expect("unregister");
}

for_kinds!(wp_fork_pin_without_event, |k| wp_fork_pin(k, false));
for_kinds!(wp_fork_pin_with_event, |k| wp_fork_pin(k, true));

fn wp_unpopulated(kind: MemoryKind) {
    let test = "wp-unpopulated";
    let _serial = serial();
    if !need_kind(test, kind, 2) {
        return;
    }
    let features = wp_features(kind) | Features::WP_UNPOPULATED;
    if !need_features(test, features) {
        return;
    }
    let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
    let m = Arc::new(Mapping::new(kind, 2 * kind.page_size()).expect("mapping"));
    let (addr, ps) = (m.addr(), m.page_size());
    uffd.register(&m, RegisterMode::WP).expect("register WP");

    // Protecting never-touched pages arms them (pte markers).
    uffd.writeprotect(addr, 2 * ps as u64, WriteprotectMode::WP)
        .expect("protect");
    assert!(uffd_wp_bit(addr) && uffd_wp_bit(addr + ps as u64));
    // A read is not a write: zeros, no fault, still protected.
    assert_eq!(m.read_u8(0), Ok(0));
    assert_eq!(m.read_u8(ps - 1), Ok(0));
    assert!(uffd_wp_bit(addr));

    let (tx, faults) = mpsc::channel();
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        clear_wp(u, ev, ps, &tx);
        Flow::Continue
    });
    let data = pattern_page(11, 0, ps);
    let writer = Arc::clone(&m);
    let page = data.clone();
    within(LIMIT, move || writer.write(0, &page)).expect("write");
    let seen: Vec<_> = faults.try_iter().collect();
    assert_eq!(
        seen,
        vec![(addr, PagefaultFlags::WP | PagefaultFlags::WRITE)]
    );
    let mut back = vec![0; ps];
    m.read(0, &mut back).expect("read");
    assert!(back == data, "the write did not land");
    assert!(!uffd_wp_bit(addr), "page 0 still protected after the clear");
    assert!(uffd_wp_bit(addr + ps as u64), "page 1 lost its protection");

    if kind == MemoryKind::PrivateAnonymous {
        // Zapping an anonymous marker drops it (the selftest's zap check): the next write lands
        // without a fault.
        m.discard(ps, ps).expect("MADV_DONTNEED");
        assert!(!uffd_wp_bit(addr + ps as u64));
        let writer = Arc::clone(&m);
        within(LIMIT, move || writer.write_u8(ps, 5)).expect("write");
        assert_eq!(m.read_u8(ps), Ok(5));
        assert_eq!(faults.try_iter().count(), 0);
    }
    server.stop();
    assert_eq!(uffd.stats().writeprotect, 2);
}

for_kinds!(wp_unpopulated, wp_unpopulated);

/// The control for `wp-unpopulated`: without the feature, protecting an untouched anonymous page
/// does nothing (there is no pte to mark), and a write lands without a fault.
#[test]
fn wp_without_unpopulated_ignores_untouched_anonymous_pages() {
    let test = "wp-without-unpopulated";
    let _serial = serial();
    if !need_features(test, Features::PAGEFAULT_FLAG_WP) {
        return;
    }
    let uffd = Uffd::new(Features::PAGEFAULT_FLAG_WP).expect("userfaultfd");
    assert!(!uffd.features().contains(Features::WP_UNPOPULATED));
    let m = Arc::new(Mapping::anonymous(faultline_uffd::PAGE_SIZE).expect("mapping"));
    uffd.register(&m, RegisterMode::WP).expect("register WP");
    uffd.writeprotect(m.addr(), m.len() as u64, WriteprotectMode::WP)
        .expect("protect");
    assert!(!uffd_wp_bit(m.addr()));
    // No server: a WP fault would block until the safety net fails the test.
    let writer = Arc::clone(&m);
    within(LIMIT, move || writer.write_u8(0, 9)).expect("write");
    assert_eq!(m.read_u8(0), Ok(9));
    assert_eq!(uffd.stats().events, 0);
}

/// Synchronous WP faults on a MISSING|WP range: populated pages are protected, a writer thread
/// takes `WP | WRITE` faults, the handler clears the protection of the faulting page only, and
/// the writes land.
fn wp_sync_faults(kind: MemoryKind) {
    let test = "wp-sync-faults";
    let _serial = serial();
    const PAGES: usize = 4;
    if !need_kind(test, kind, PAGES as u64) {
        return;
    }
    let features = missing_features(kind) | wp_features(kind);
    if !need_features(test, features) {
        return;
    }
    let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
    let m = Arc::new(Mapping::new(kind, PAGES * kind.page_size()).expect("mapping"));
    let (addr, ps) = (m.addr(), m.page_size());
    let ioctls = uffd
        .register(&m, RegisterMode::MISSING | RegisterMode::WP)
        .expect("register");
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::WRITEPROTECT | Ioctls::WAKE));
    let pages: Vec<Vec<u8>> = (0..PAGES as u64).map(|p| pattern_page(5, p, ps)).collect();
    for (p, data) in pages.iter().enumerate() {
        let at = addr + (p * ps) as u64;
        assert_eq!(
            uffd.copy(at, data, CopyMode::empty()),
            Ok(Resolved::Complete(ps as u64))
        );
    }
    uffd.writeprotect(addr, (PAGES * ps) as u64, WriteprotectMode::WP)
        .expect("protect");
    assert!((0..PAGES).all(|p| uffd_wp_bit(addr + (p * ps) as u64)));

    let (tx, faults) = mpsc::channel();
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        clear_wp(u, ev, ps, &tx);
        Flow::Continue
    });
    // Reads of protected pages do not fault.
    let mut back = vec![0; ps];
    m.read(2 * ps, &mut back).expect("read");
    assert!(back == pages[2]);

    let word = 0x0123_4567_89ab_cdefu64.to_ne_bytes();
    let writer = Arc::clone(&m);
    within(LIMIT, move || {
        writer.write(ps + 64, &word).expect("write page 1");
        writer.write(4 * ps - 8, &word).expect("write page 3");
        // The protection is gone from those pages: a second write does not fault.
        writer.write_u8(ps, 0xee).expect("write page 1 again");
    });
    let seen: Vec<_> = faults.try_iter().collect();
    let wp_write = PagefaultFlags::WP | PagefaultFlags::WRITE;
    assert_eq!(
        seen,
        vec![
            (addr + ps as u64, wp_write),
            (addr + 3 * ps as u64, wp_write)
        ]
    );
    server.stop();

    let mut want = pages.clone();
    want[1][64..72].copy_from_slice(&word);
    want[1][0] = 0xee;
    want[3][ps - 8..].copy_from_slice(&word);
    for (p, expected) in want.iter().enumerate() {
        m.read(p * ps, &mut back).expect("read");
        assert!(back == *expected, "page {p} has wrong bytes");
        let protected = p == 0 || p == 2;
        assert_eq!(uffd_wp_bit(addr + (p * ps) as u64), protected, "page {p}");
    }
    let s = uffd.stats();
    assert_eq!((s.copy, s.writeprotect, s.events), (PAGES as u64, 3, 2));
}

for_kinds!(wp_sync_faults, wp_sync_faults);
