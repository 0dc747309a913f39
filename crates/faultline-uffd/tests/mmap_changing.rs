//! `mmap-changing` of the kernel's uffd-unit-tests (the EAGAIN test), through this crate's API,
//! on every memory kind. With `EVENT_REMOVE` negotiated, `madvise(MADV_DONTNEED)` (private
//! memory) or `madvise(MADV_REMOVE)` (shared memory) on a registered range queues a REMOVE event
//! and blocks the caller until a handler reads it. While it is unread the address space is
//! "changing": every resolve ioctl — COPY, ZEROPAGE, CONTINUE, POISON, MOVE — fails with EAGAIN
//! (`ResolveErrorKind::Retry`) before looking at its arguments, and does nothing. Once the event is
//! read (and the madvise caller has returned), the same resolves succeed.
//!
//! Readiness without sleeping: the kernel raises its "changing" count before it queues the
//! message, so once the fd polls readable the resolves must fail; and it lowers the count in the
//! madvise caller after the read wakes it, so the tests join that thread before resolving again.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use faultline_testing::{missing_features, need_features, need_kind, pattern_page, within};
use faultline_uffd::{
    ContinueMode, CopyMode, Event, EventBuffer, Features, Mapping, MemoryKind, MoveMode,
    RegisterMode, ResolveErrorKind, ResolveOp, Resolved, Uffd, ZeropageMode, PAGE_SIZE,
};

const WAIT: Duration = Duration::from_secs(10);

fn features_for(kind: MemoryKind) -> Features {
    let mut f = Features::EVENT_REMOVE | Features::MOVE | Features::POISON | missing_features(kind);
    match kind {
        MemoryKind::Shmem => f |= Features::MINOR_SHMEM,
        MemoryKind::HugetlbShared => f |= Features::MINOR_HUGETLBFS,
        _ => {}
    }
    f
}

/// Drop the first page the way a balloon does on this kind of memory (blocks until the REMOVE
/// event is read).
fn release_first_page(m: &Mapping) -> Result<(), faultline_uffd::Error> {
    if m.kind().is_shared() {
        m.remove(0, m.page_size())
    } else {
        m.discard(0, m.page_size())
    }
}

fn read_page(m: &Mapping, page: usize) -> Vec<u8> {
    let mut v = vec![0u8; m.page_size()];
    m.read(page * m.page_size(), &mut v).expect("read");
    v
}

/// Read events until a REMOVE arrives; returns it (other events are not expected here).
fn read_remove(uffd: &Uffd) -> (u64, u64) {
    let mut buf = EventBuffer::new(8);
    loop {
        assert!(
            uffd.poll_readable(Some(WAIT)).expect("poll"),
            "no REMOVE event"
        );
        if uffd.read_events(&mut buf).expect("read") == 0 {
            continue;
        }
        match buf.events() {
            [Event::Remove { start, end }] => return (*start, *end),
            other => panic!("expected one REMOVE event, got {other:?}"),
        }
    }
}

// Pages of the registered mapping and what each is for.
const REMOVED: usize = 0;
const COPIED: usize = 1;
const ZEROED: usize = 2;
const CONTINUED: usize = 3;
const POISONED: usize = 4;
const MOVED: usize = 5;

fn mmap_changing_on(kind: MemoryKind) {
    let features = features_for(kind);
    if !need_features("mmap-changing", features) || !need_kind("mmap-changing", kind, 8) {
        return;
    }
    let ps = kind.page_size();
    let psu = ps as u64;
    let uffd = Arc::new(Uffd::new(features).expect("uffd"));
    let m = Arc::new(Mapping::new(kind, 6 * ps).expect("mapping"));
    let mode = if kind.is_shared() {
        RegisterMode::MISSING | RegisterMode::MINOR
    } else {
        RegisterMode::MISSING
    };
    uffd.register(&m, mode).expect("register");
    let page = |p: usize| m.addr() + (p * ps) as u64;

    // The page the balloon will take back is present.
    let old = pattern_page(61, 0, ps);
    assert_eq!(
        uffd.copy(page(REMOVED), &old, CopyMode::empty()),
        Ok(Resolved::Complete(psu))
    );
    // For CONTINUE: the page cache holds the page, the registered mapping does not map it yet.
    let alias = kind.is_shared().then(|| m.alias().expect("alias"));
    let cached = pattern_page(62, CONTINUED as u64, ps);
    if let Some(a) = &alias {
        a.write(CONTINUED * ps, &cached).expect("fill page cache");
    }
    // For MOVE: a present anonymous source page.
    let src = Mapping::anonymous(ps).expect("move source");
    let moving = pattern_page(63, 0, ps);
    src.write(0, &moving).expect("fill move source");
    let mv = || {
        // SAFETY: `src` is an anonymous `Mapping` of this test that holds no Rust references;
        // its page is meant to leave it.
        unsafe { uffd.move_pages(page(MOVED), src.addr(), psu, MoveMode::empty()) }
    };

    let before = uffd.stats();
    let m2 = Arc::clone(&m);
    let remover = std::thread::spawn(move || release_first_page(&m2));
    // The REMOVE is queued: the address space is changing until it is read.
    assert!(
        uffd.poll_readable(Some(WAIT)).expect("poll"),
        "no REMOVE event queued"
    );

    let mut blocked = vec![
        (
            ResolveOp::Copy,
            uffd.copy(page(COPIED), &pattern_page(64, 1, ps), CopyMode::empty()),
        ),
        (
            ResolveOp::Zeropage,
            uffd.zeropage(page(ZEROED), psu, ZeropageMode::empty()),
        ),
        (ResolveOp::Poison, uffd.poison(page(POISONED), psu)),
        (ResolveOp::Move, mv()),
    ];
    if kind.is_shared() {
        blocked.push((
            ResolveOp::Continue,
            uffd.continue_minor(page(CONTINUED), psu, ContinueMode::empty()),
        ));
    }
    for (op, r) in &blocked {
        let e = r.expect_err("a resolve while REMOVE is unread");
        assert_eq!(
            (e.op, e.kind),
            (*op, ResolveErrorKind::Retry),
            "{op} on {kind}"
        );
        assert!(e.is_retry());
    }
    let during = uffd.stats();
    assert_eq!(during.eagain - before.eagain, blocked.len() as u64);
    assert_eq!(during.resolves() - before.resolves(), blocked.len() as u64);
    assert!(
        !remover.is_finished(),
        "madvise returned before its REMOVE was read"
    );

    // Read the event; the madvise caller returns.
    let (start, end) = read_remove(&uffd);
    assert_eq!((start, end), (page(REMOVED), page(REMOVED) + psu));
    within(WAIT, move || remover.join().expect("remover")).expect("madvise");

    // Everything that was refused now works, and nothing had been done in the meantime.
    let fresh = pattern_page(64, 1, ps);
    assert_eq!(
        uffd.copy(page(COPIED), &fresh, CopyMode::empty()),
        Ok(Resolved::Complete(psu))
    );
    assert_eq!(read_page(&m, COPIED), fresh);
    // The removed page is missing again.
    let refill = pattern_page(65, 0, ps);
    assert_eq!(
        uffd.copy(page(REMOVED), &refill, CopyMode::empty()),
        Ok(Resolved::Complete(psu))
    );
    assert_eq!(read_page(&m, REMOVED), refill);

    let z = uffd.zeropage(page(ZEROED), psu, ZeropageMode::empty());
    if kind.is_hugetlb() {
        assert_eq!(z.map_err(|e| e.kind), Err(ResolveErrorKind::InvalidRange));
    } else {
        assert_eq!(z, Ok(Resolved::Complete(psu)));
        assert!(read_page(&m, ZEROED).iter().all(|&b| b == 0));
    }
    assert_eq!(
        uffd.poison(page(POISONED), psu),
        Ok(Resolved::Complete(psu))
    );
    if kind.is_shared() {
        assert_eq!(
            uffd.continue_minor(page(CONTINUED), psu, ContinueMode::empty()),
            Ok(Resolved::Complete(psu))
        );
        assert_eq!(read_page(&m, CONTINUED), cached);
    }
    if kind == MemoryKind::PrivateAnonymous {
        assert_eq!(mv(), Ok(Resolved::Complete(psu)));
        assert_eq!(read_page(&m, MOVED), moving);
        assert!(read_page(&src, 0).iter().all(|&b| b == 0));
    } else {
        // With the address space stable the kernel gets to the real check: MOVE needs
        // anonymous memory.
        assert_eq!(
            mv().map_err(|e| e.kind),
            Err(ResolveErrorKind::InvalidRange)
        );
    }
    assert_eq!(
        uffd.stats().eagain,
        during.eagain,
        "no EAGAIN after the event was read"
    );
}

#[test]
fn mmap_changing_private_anonymous() {
    mmap_changing_on(MemoryKind::PrivateAnonymous);
}

#[test]
fn mmap_changing_shmem() {
    mmap_changing_on(MemoryKind::Shmem);
}

#[test]
fn mmap_changing_hugetlb_private() {
    mmap_changing_on(MemoryKind::HugetlbPrivate);
}

#[test]
fn mmap_changing_hugetlb_shared() {
    mmap_changing_on(MemoryKind::HugetlbShared);
}

/// A handler's view (Firecracker's balloon): a fault arrives while a REMOVE is pending; the
/// resolve says Retry; the handler reads events (the REMOVE, and the fault if not yet read),
/// retries, and the faulting thread gets its page.
#[test]
fn a_handler_retries_after_reading_the_remove() {
    if !need_features("mmap-changing retry", Features::EVENT_REMOVE) {
        return;
    }
    let uffd = Arc::new(Uffd::new(Features::EVENT_REMOVE).expect("uffd"));
    let m = Arc::new(Mapping::anonymous(2 * PAGE_SIZE).expect("mapping"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let ps = PAGE_SIZE as u64;
    assert_eq!(
        uffd.zeropage(m.addr(), ps, ZeropageMode::empty()),
        Ok(Resolved::Complete(ps))
    );
    let m2 = Arc::clone(&m);
    let remover = std::thread::spawn(move || m2.discard(0, PAGE_SIZE));
    assert!(uffd.poll_readable(Some(WAIT)).expect("poll"));
    let m3 = Arc::clone(&m);
    let toucher = std::thread::spawn(move || m3.read_u8(PAGE_SIZE + 9));

    let page = pattern_page(66, 1, PAGE_SIZE);
    let target = m.addr() + ps;
    let mut buf = EventBuffer::new(8);
    let (mut saw_remove, mut saw_fault) = (false, false);
    let mut remover = Some(remover);
    let mut retries = 0;
    loop {
        match uffd.copy(target, &page, CopyMode::empty()) {
            Ok(r) => {
                assert_eq!(r, Resolved::Complete(ps));
                break;
            }
            Err(e) if e.is_retry() => {
                retries += 1;
                assert!(retries < 1000, "EAGAIN forever");
                // Read what is queued: pending faults come first, then the REMOVE.
                if !saw_remove && uffd.poll_readable(Some(WAIT)).expect("poll") {
                    uffd.read_events(&mut buf).expect("read");
                    for ev in buf.events() {
                        match ev {
                            Event::Remove { start, end } => {
                                assert_eq!((*start, *end), (m.addr(), m.addr() + ps));
                                saw_remove = true;
                            }
                            Event::Pagefault { address, .. } => {
                                assert_eq!(*address, target);
                                saw_fault = true;
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                }
                // The kernel lowers its count when the madvise caller runs again.
                if saw_remove {
                    if let Some(h) = remover.take() {
                        h.join().expect("remover").expect("madvise");
                    }
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_remove && remover.is_none());
    assert!(
        retries >= 1,
        "the first COPY must have met the pending REMOVE"
    );
    assert_eq!(toucher.join().expect("toucher"), Ok(page[9]));
    if !saw_fault {
        // Either the toucher faulted after the COPY, or the COPY's wake-up took its unread
        // message off the queue: nothing is left to read.
        assert_eq!(uffd.read_events(&mut buf).expect("read"), 0);
    }
    let s = uffd.stats();
    assert_eq!(s.eagain, retries);
    assert_eq!(s.copy, retries + 1);
}

/// Without EVENT_REMOVE nothing waits: MADV_DONTNEED returns at once, no event is queued and
/// resolves are never refused.
#[test]
fn without_event_remove_nothing_changes() {
    let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
    let m = Arc::new(Mapping::anonymous(PAGE_SIZE).expect("mapping"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let ps = PAGE_SIZE as u64;
    let page = pattern_page(67, 0, PAGE_SIZE);
    assert_eq!(
        uffd.copy(m.addr(), &page, CopyMode::empty()),
        Ok(Resolved::Complete(ps))
    );
    let m2 = Arc::clone(&m);
    within(WAIT, move || m2.discard(0, PAGE_SIZE)).expect("madvise");
    assert!(!uffd.poll_readable(Some(Duration::ZERO)).expect("poll"));
    // The page was dropped all the same: it is missing again.
    assert_eq!(
        uffd.copy(m.addr(), &page, CopyMode::empty()),
        Ok(Resolved::Complete(ps))
    );
    assert_eq!(uffd.stats().eagain, 0);
}
