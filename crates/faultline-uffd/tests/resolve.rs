//! Resolve ioctls of the kernel's uffd-unit-tests, through this crate's API: `zeropage`, `move`,
//! `move-pmd` and `poison` on every memory kind each applies to, plus misuse (unregistered
//! ranges, bad lengths, addresses outside any registration), which must come back as typed
//! errors, never as a panic or a wrong page.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_testing::{
    in_child, missing_features, need_features, need_kind, on_sigbus, pattern_page, ChildExit,
    FaultServer, Flow,
};
use faultline_uffd::{
    ContinueMode, CopyMode, EventBuffer, Features, Ioctls, Mapping, MemoryKind, MoveMode,
    RegisterMode, ResolveErrorKind, ResolveOp, Resolved, Uffd, WriteprotectMode, ZeropageMode,
    HUGE_PAGE_SIZE, PAGE_SIZE,
};

/// Wait (at most 10 s, a safety net) for the next page fault and return its address.
fn next_fault(uffd: &Uffd, buf: &mut EventBuffer) -> u64 {
    loop {
        assert!(
            uffd.poll_readable(Some(Duration::from_secs(10)))
                .expect("poll"),
            "no page fault within 10 s"
        );
        if uffd.read_events(buf).expect("read") > 0 {
            return buf.events()[0].fault_address().expect("a page fault");
        }
    }
}

fn read_page(m: &Mapping, offset: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read(offset, &mut v).expect("read");
    v
}

/// `madvise` a part of a mapping (THP hints, which `Mapping` does not offer).
fn advise(m: &Mapping, offset: usize, len: usize, advice: libc::c_int) -> bool {
    assert!(offset + len <= m.len());
    let start = m.as_ptr().wrapping_add(offset);
    // SAFETY: the range lies inside the live mapping, which holds no Rust references; THP hints
    // do not change its contents.
    let r = unsafe { libc::madvise(start.cast(), len, advice) };
    r == 0
}

// ---------------------------------------------------------------------------------------------
// zeropage

fn zeropage_on(kind: MemoryKind) {
    if !need_kind("zeropage", kind, 4) {
        return;
    }
    let ps = kind.page_size();
    let psu = ps as u64;
    let uffd = Uffd::new(missing_features(kind)).expect("uffd");
    let m = Mapping::new(kind, 2 * ps).expect("mapping");
    let ioctls = uffd.register(&m, RegisterMode::MISSING).expect("register");
    assert_eq!(
        ioctls.contains(Ioctls::ZEROPAGE),
        !kind.is_hugetlb(),
        "{kind}"
    );

    if kind.is_hugetlb() {
        // hugetlbfs has no ZEROPAGE: EINVAL, and the page stays missing.
        let e = uffd
            .zeropage(m.addr(), psu, ZeropageMode::empty())
            .expect_err("ZEROPAGE on hugetlbfs");
        assert_eq!(
            (e.op, e.kind),
            (ResolveOp::Zeropage, ResolveErrorKind::InvalidRange)
        );
        let page = pattern_page(11, 0, ps);
        let done = uffd.copy(m.addr(), &page, CopyMode::empty()).expect("copy");
        assert_eq!(done, Resolved::Complete(psu));
        assert_eq!(read_page(&m, 0, ps), page);
        let s = uffd.stats();
        assert_eq!((s.zeropage, s.copy, s.eexist), (1, 1, 0));
        return;
    }

    // Page 0: a read fault resolved with ZEROPAGE reads zeros.
    std::thread::scope(|s| {
        let toucher = s.spawn(|| read_page(&m, 0, ps));
        let mut buf = EventBuffer::new(4);
        let addr = next_fault(&uffd, &mut buf);
        assert_eq!(addr, m.addr());
        let done = uffd
            .zeropage(addr, psu, ZeropageMode::empty())
            .expect("zeropage");
        assert_eq!(done, Resolved::Complete(psu));
        let got = toucher.join().expect("toucher");
        assert!(
            got.iter().all(|&b| b == 0),
            "{kind}: non-zero byte after ZEROPAGE"
        );
    });

    // Page 1: filled before anyone touches it (the selftest's flow); reading it does not fault.
    let done = uffd
        .zeropage(m.addr() + psu, psu, ZeropageMode::empty())
        .expect("zeropage ahead");
    assert_eq!(done, Resolved::Complete(psu));
    assert!(read_page(&m, ps, ps).iter().all(|&b| b == 0));

    // ZEROPAGE on a present page: EEXIST, the page is left alone.
    let e = uffd
        .zeropage(m.addr(), psu, ZeropageMode::empty())
        .expect_err("zeropage twice");
    assert_eq!(e.kind, ResolveErrorKind::AlreadyPresent);
    assert!(e.is_already_present());
    m.write_u8(ps + 5, 0xAB).expect("write");
    let e = uffd
        .zeropage(m.addr() + psu, psu, ZeropageMode::empty())
        .expect_err("zeropage over data");
    assert_eq!(e.kind, ResolveErrorKind::AlreadyPresent);
    assert_eq!(m.read_u8(ps + 5), Ok(0xAB));

    let s = uffd.stats();
    assert_eq!((s.zeropage, s.eexist, s.reads), (4, 2, 1));
    uffd.unregister_mapping(&m).expect("unregister");
}

#[test]
fn zeropage_private_anonymous() {
    zeropage_on(MemoryKind::PrivateAnonymous);
}

#[test]
fn zeropage_shmem() {
    zeropage_on(MemoryKind::Shmem);
}

#[test]
fn zeropage_hugetlb_private() {
    zeropage_on(MemoryKind::HugetlbPrivate);
}

#[test]
fn zeropage_hugetlb_shared() {
    zeropage_on(MemoryKind::HugetlbShared);
}

// ---------------------------------------------------------------------------------------------
// move, move-pmd

/// `move`: every missing page of the destination is served by moving the source's page there.
/// The destination then holds the bytes and the source reads zero.
#[test]
fn move_pages_4k() {
    if !need_features("move", Features::MOVE) {
        return;
    }
    const PAGES: usize = 16;
    let uffd = Arc::new(Uffd::new(Features::MOVE).expect("uffd"));
    let src = Mapping::anonymous(PAGES * PAGE_SIZE).expect("src");
    // As the selftest: keep the source in 4 KiB pages (ignore failure: no THP configured).
    advise(&src, 0, src.len(), libc::MADV_NOHUGEPAGE);
    for p in 0..PAGES {
        src.write(p * PAGE_SIZE, &pattern_page(21, p as u64, PAGE_SIZE))
            .expect("fill source");
    }
    let dst = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("dst"));
    let ioctls = uffd
        .register(&dst, RegisterMode::MISSING)
        .expect("register");
    assert!(ioctls.contains(Ioctls::MOVE));

    let (src_base, dst_base) = (src.addr(), dst.addr());
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        let addr = ev.fault_address().expect("only page faults") & !(PAGE_SIZE as u64 - 1);
        let off = addr - dst_base;
        // SAFETY: the source is an anonymous `Mapping` of this test that holds no Rust
        // references; its pages are meant to leave it.
        let r = unsafe { u.move_pages(addr, src_base + off, PAGE_SIZE as u64, MoveMode::empty()) };
        assert_eq!(r, Ok(Resolved::Complete(PAGE_SIZE as u64)));
        Flow::Continue
    });
    for p in 0..PAGES {
        let want = pattern_page(21, p as u64, PAGE_SIZE);
        assert_eq!(
            read_page(&src, p * PAGE_SIZE, PAGE_SIZE),
            want,
            "source page {p}"
        );
        assert_eq!(
            read_page(&dst, p * PAGE_SIZE, PAGE_SIZE),
            want,
            "moved page {p}"
        );
        assert!(
            read_page(&src, p * PAGE_SIZE, PAGE_SIZE)
                .iter()
                .all(|&b| b == 0),
            "source page {p} still has data after the move"
        );
    }
    server.stop();
    let s = uffd.stats();
    // One MOVE per page, as the selftest's fault count.
    assert_eq!((s.move_, s.copy, s.eexist), (PAGES as u64, 0, 0));
}

/// `move-pmd`: a 2 MiB-aligned, THP-backed (when THP is available) source range moved in one
/// MOVE into a 2 MiB-aligned destination on its first fault.
#[test]
fn move_pmd() {
    if !need_features("move-pmd", Features::MOVE) {
        return;
    }
    let uffd = Arc::new(Uffd::new(Features::MOVE).expect("uffd"));
    let src = Mapping::anonymous(2 * HUGE_PAGE_SIZE).expect("src");
    let dst = Arc::new(Mapping::anonymous(2 * HUGE_PAGE_SIZE).expect("dst"));
    let align = |m: &Mapping| {
        usize::try_from(m.addr().next_multiple_of(HUGE_PAGE_SIZE as u64) - m.addr())
            .expect("fits usize")
    };
    let (src_off, dst_off) = (align(&src), align(&dst));
    let thp = advise(&src, src_off, HUGE_PAGE_SIZE, libc::MADV_HUGEPAGE)
        && advise(&dst, dst_off, HUGE_PAGE_SIZE, libc::MADV_HUGEPAGE);
    if !thp {
        eprintln!("move-pmd: MADV_HUGEPAGE refused; moving 512 small pages instead");
    }
    let pages = HUGE_PAGE_SIZE / PAGE_SIZE;
    let mut chunk = vec![0u8; HUGE_PAGE_SIZE];
    for p in 0..pages {
        faultline_testing::fill_pattern(22, p as u64, &mut chunk[p * PAGE_SIZE..][..PAGE_SIZE]);
    }
    src.write(src_off, &chunk).expect("fill source");
    uffd.register(&dst, RegisterMode::MISSING)
        .expect("register");

    let src_win = src.addr() + src_off as u64;
    let dst_win = dst.addr() + dst_off as u64;
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        let addr = ev.fault_address().expect("only page faults");
        assert_eq!(
            addr & !(HUGE_PAGE_SIZE as u64 - 1),
            dst_win,
            "fault outside the window"
        );
        // SAFETY: the source is an anonymous `Mapping` of this test that holds no Rust
        // references; its pages are meant to leave it.
        let r = unsafe { u.move_pages(dst_win, src_win, HUGE_PAGE_SIZE as u64, MoveMode::empty()) };
        assert_eq!(r, Ok(Resolved::Complete(HUGE_PAGE_SIZE as u64)));
        Flow::Continue
    });
    // Touch the middle of the window: one fault moves the whole 2 MiB.
    let got = read_page(&dst, dst_off + HUGE_PAGE_SIZE / 2, PAGE_SIZE);
    server.stop();
    assert_eq!(got, chunk[HUGE_PAGE_SIZE / 2..][..PAGE_SIZE]);
    assert_eq!(read_page(&dst, dst_off, HUGE_PAGE_SIZE), chunk);
    assert!(read_page(&src, src_off, HUGE_PAGE_SIZE)
        .iter()
        .all(|&b| b == 0));
    let s = uffd.stats();
    assert_eq!((s.move_, s.reads), (1, 1));
}

/// A hole in the source: ENOENT (`NotRegistered`) by default; with ALLOW_SRC_HOLES it is skipped
/// (counted as moved) and the destination page stays missing. A hole after a moved page is
/// partial progress. A present destination is EEXIST and the source keeps its page.
#[test]
fn move_source_holes() {
    if !need_features("move holes", Features::MOVE) {
        return;
    }
    let ps = PAGE_SIZE as u64;
    let uffd = Uffd::new(Features::MOVE).expect("uffd");
    // Source pages 0, 2 and 4 hold data; 1 and 3 are holes.
    let src = Mapping::anonymous(5 * PAGE_SIZE).expect("src");
    advise(&src, 0, src.len(), libc::MADV_NOHUGEPAGE);
    for p in [0usize, 2, 4] {
        src.write(p * PAGE_SIZE, &pattern_page(23, p as u64, PAGE_SIZE))
            .expect("fill");
    }
    let dst = Mapping::anonymous(5 * PAGE_SIZE).expect("dst");
    uffd.register(&dst, RegisterMode::MISSING)
        .expect("register");
    let (s0, d0) = (src.addr(), dst.addr());
    let mv = |d: u64, s: u64, len: u64, mode: MoveMode| {
        // SAFETY: the source is an anonymous `Mapping` of this test that holds no Rust
        // references; its pages are meant to leave it.
        unsafe { uffd.move_pages(d, s, len, mode) }
    };

    let e = mv(d0 + ps, s0 + ps, ps, MoveMode::empty()).expect_err("hole");
    assert_eq!(
        (e.op, e.kind),
        (ResolveOp::Move, ResolveErrorKind::NotRegistered)
    );

    assert_eq!(
        mv(d0 + ps, s0 + ps, ps, MoveMode::ALLOW_SRC_HOLES),
        Ok(Resolved::Complete(ps))
    );
    // Nothing was placed: the destination page is still missing, so COPY fills it.
    let filler = pattern_page(24, 1, PAGE_SIZE);
    assert_eq!(
        uffd.copy(d0 + ps, &filler, CopyMode::empty()),
        Ok(Resolved::Complete(ps))
    );

    // Page 2 moves, then the hole at 3 stops the ioctl: partial progress, not an error.
    assert_eq!(
        mv(d0 + 2 * ps, s0 + 2 * ps, 2 * ps, MoveMode::empty()),
        Ok(Resolved::Partial(ps))
    );
    assert_eq!(
        read_page(&dst, 2 * PAGE_SIZE, PAGE_SIZE),
        pattern_page(23, 2, PAGE_SIZE)
    );
    assert!(read_page(&src, 2 * PAGE_SIZE, PAGE_SIZE)
        .iter()
        .all(|&b| b == 0));

    // ALLOW_SRC_HOLES changes nothing for a present page.
    assert_eq!(
        mv(d0, s0, ps, MoveMode::ALLOW_SRC_HOLES),
        Ok(Resolved::Complete(ps))
    );
    assert_eq!(
        read_page(&dst, 0, PAGE_SIZE),
        pattern_page(23, 0, PAGE_SIZE)
    );

    // Destination already present: EEXIST, and the source page stays where it was.
    let e = mv(d0, s0 + 4 * ps, ps, MoveMode::empty()).expect_err("present destination");
    assert_eq!(e.kind, ResolveErrorKind::AlreadyPresent);
    assert_eq!(
        read_page(&src, 4 * PAGE_SIZE, PAGE_SIZE),
        pattern_page(23, 4, PAGE_SIZE)
    );
    assert_eq!(
        read_page(&dst, 0, PAGE_SIZE),
        pattern_page(23, 0, PAGE_SIZE)
    );

    let s = uffd.stats();
    assert_eq!((s.move_, s.copy, s.eexist, s.eagain), (5, 1, 1, 1));
}

/// MOVE works on private anonymous memory only: shmem (which still declares the ioctl) and
/// hugetlbfs destinations are refused with EINVAL and stay missing.
#[test]
fn move_needs_anonymous_memory() {
    if !need_features("move kinds", Features::MOVE) {
        return;
    }
    for kind in [
        MemoryKind::Shmem,
        MemoryKind::HugetlbPrivate,
        MemoryKind::HugetlbShared,
    ] {
        if !need_kind("move kinds", kind, 4) {
            continue;
        }
        let ps = kind.page_size();
        let uffd = Uffd::new(Features::MOVE | missing_features(kind)).expect("uffd");
        let dst = Mapping::new(kind, ps).expect("dst");
        let ioctls = uffd
            .register(&dst, RegisterMode::MISSING)
            .expect("register");
        assert_eq!(ioctls.contains(Ioctls::MOVE), !kind.is_hugetlb(), "{kind}");
        let src = Mapping::anonymous(ps).expect("src");
        src.write(0, &pattern_page(25, 0, ps)).expect("fill");
        // SAFETY: the source is an anonymous `Mapping` of this test that holds no Rust
        // references.
        let r = unsafe { uffd.move_pages(dst.addr(), src.addr(), ps as u64, MoveMode::empty()) };
        let e = r.expect_err("MOVE into non-anonymous memory");
        assert_eq!(e.kind, ResolveErrorKind::InvalidRange, "{kind}");
        // The source keeps its data; the destination is still missing (COPY works).
        assert_eq!(read_page(&src, 0, ps), pattern_page(25, 0, ps));
        let page = pattern_page(26, 0, ps);
        assert_eq!(
            uffd.copy(dst.addr(), &page, CopyMode::empty()),
            Ok(Resolved::Complete(ps as u64)),
            "{kind}"
        );
        assert_eq!(read_page(&dst, 0, ps), page);
    }
}

// ---------------------------------------------------------------------------------------------
// poison

/// The start of the page expected to raise SIGBUS in a `poison` child, and its size.
static POISONED_PAGE: AtomicU64 = AtomicU64::new(0);
static POISONED_LEN: AtomicU64 = AtomicU64::new(0);

/// In the child: a SIGBUS at the poisoned page restores the default action and returns, so the
/// access faults again and the child dies of SIGBUS; a SIGBUS anywhere else exits with code 43.
/// (Linux 6.6 reported a poisoned page as a hardware memory error, `BUS_MCEERR_AR`; Linux 6.18
/// reports `BUS_ADRERR`: both are accepted.)
extern "C" fn poison_sigbus(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: for SIGBUS the kernel fills in the faulting address.
    let addr = unsafe { info.si_addr() } as u64;
    let code = info.si_code;
    let start = POISONED_PAGE.load(Ordering::SeqCst);
    let len = POISONED_LEN.load(Ordering::SeqCst);
    let known_code = code == libc::BUS_ADRERR || code == libc::BUS_MCEERR_AR;
    if !known_code || addr < start || addr >= start + len {
        // SAFETY: async-signal-safe exit of the forked child.
        unsafe { libc::_exit(43) };
    }
    // SAFETY: restoring the default action is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// `poison`: a handler thread serves odd pages with COPY and even pages with POISON (as the
/// selftest); the copied pages read right, and touching a poisoned page kills the toucher with
/// SIGBUS at that page.
fn poison_on(kind: MemoryKind) {
    if !need_features("poison", Features::POISON) || !need_kind("poison", kind, 6) {
        return;
    }
    let exit = in_child(move || {
        let ps = kind.page_size();
        let psu = ps as u64;
        let uffd = Arc::new(Uffd::new(Features::POISON | missing_features(kind)).expect("uffd"));
        let m = Mapping::new(kind, 4 * ps).expect("mapping");
        let ioctls = uffd.register(&m, RegisterMode::MISSING).expect("register");
        assert!(ioctls.contains(Ioctls::COPY | Ioctls::POISON), "{ioctls:?}");
        let base = m.addr();
        let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
            let addr = ev.fault_address().expect("only page faults") & !(psu - 1);
            let page = (addr - base) / psu;
            if page % 2 == 1 {
                let r = u.copy(addr, &pattern_page(31, page, ps), CopyMode::empty());
                assert_eq!(r, Ok(Resolved::Complete(psu)));
            } else {
                assert_eq!(u.poison(addr, psu), Ok(Resolved::Complete(psu)));
            }
            Flow::Continue
        });
        for page in [1usize, 3] {
            assert_eq!(
                read_page(&m, page * ps, ps),
                pattern_page(31, page as u64, ps)
            );
        }
        POISONED_PAGE.store(base + 2 * psu, Ordering::SeqCst);
        POISONED_LEN.store(psu, Ordering::SeqCst);
        on_sigbus(poison_sigbus);
        let _ = m.read_u8(2 * ps + 17);
        drop(server);
        // Not reached: the read above raises SIGBUS.
        42
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS), "poison on {kind}");
}

#[test]
fn poison_private_anonymous() {
    poison_on(MemoryKind::PrivateAnonymous);
}

#[test]
fn poison_shmem() {
    poison_on(MemoryKind::Shmem);
}

#[test]
fn poison_hugetlb_private() {
    poison_on(MemoryKind::HugetlbPrivate);
}

#[test]
fn poison_hugetlb_shared() {
    poison_on(MemoryKind::HugetlbShared);
}

/// POISON only fills missing pages: a second POISON, or one over a page COPY filled, is EEXIST.
#[test]
fn poison_over_a_present_page_is_already_present() {
    if !need_features("poison twice", Features::POISON) {
        return;
    }
    for kind in MemoryKind::ALL {
        if !need_kind("poison twice", kind, 4) {
            continue;
        }
        let psu = kind.page_size() as u64;
        let uffd = Uffd::new(Features::POISON | missing_features(kind)).expect("uffd");
        let m = Mapping::new(kind, 2 * kind.page_size()).expect("mapping");
        uffd.register(&m, RegisterMode::MISSING).expect("register");
        assert_eq!(uffd.poison(m.addr(), psu), Ok(Resolved::Complete(psu)));
        let e = uffd.poison(m.addr(), psu).expect_err("poison twice");
        assert_eq!(
            (e.op, e.kind),
            (ResolveOp::Poison, ResolveErrorKind::AlreadyPresent)
        );
        let page = pattern_page(32, 1, kind.page_size());
        assert_eq!(
            uffd.copy(m.addr() + psu, &page, CopyMode::empty()),
            Ok(Resolved::Complete(psu))
        );
        let e = uffd
            .poison(m.addr() + psu, psu)
            .expect_err("poison over data");
        assert_eq!(e.kind, ResolveErrorKind::AlreadyPresent, "{kind}");
        assert_eq!(read_page(&m, kind.page_size(), kind.page_size()), page);
        let s = uffd.stats();
        assert_eq!((s.poison, s.copy, s.eexist), (3, 1, 2), "{kind}");
    }
}

// ---------------------------------------------------------------------------------------------
// misuse

/// Resolving into memory no userfaultfd registered is ENOENT (`NotRegistered`) for every fill
/// ioctl; WAKE has nothing to wake and succeeds.
#[test]
fn resolve_outside_any_registration_is_not_registered() {
    let ps = PAGE_SIZE as u64;
    let uffd = Uffd::new(Features::POISON | Features::MISSING_SHMEM | Features::MINOR_SHMEM)
        .expect("uffd");
    let anon = Mapping::anonymous(2 * PAGE_SIZE).expect("anon");
    let shmem = Mapping::new(MemoryKind::Shmem, 2 * PAGE_SIZE).expect("shmem");
    let page = pattern_page(41, 0, PAGE_SIZE);
    for m in [&anon, &shmem] {
        let a = m.addr();
        let checks = [
            uffd.copy(a, &page, CopyMode::empty()).map(|_| ()),
            uffd.zeropage(a, ps, ZeropageMode::empty()).map(|_| ()),
            uffd.poison(a, ps).map(|_| ()),
            uffd.continue_minor(a, ps, ContinueMode::empty())
                .map(|_| ()),
        ];
        for (i, r) in checks.into_iter().enumerate() {
            let e = r.expect_err("unregistered");
            assert_eq!(
                e.kind,
                ResolveErrorKind::NotRegistered,
                "{} op {i}: {e}",
                m.kind()
            );
            assert_eq!(e.start, a);
        }
        assert_eq!(uffd.wake(a, ps), Ok(()));
        // The memory itself was not touched: it still faults in as zero.
        assert_eq!(m.read_u8(0), Ok(0));
    }

    // Registered by this fd but only in part: a COPY spilling past the registration.
    uffd.register_range(&anon, 0, PAGE_SIZE, RegisterMode::MISSING)
        .expect("register first page");
    let two = [page.clone(), page.clone()].concat();
    let e = uffd
        .copy(anon.addr(), &two, CopyMode::empty())
        .expect_err("spills past the registration");
    assert_eq!(e.kind, ResolveErrorKind::NotRegistered);
    // An address that is not mapped at all.
    let gone = Mapping::anonymous(PAGE_SIZE).expect("gone");
    let gone_addr = gone.addr();
    drop(gone);
    let e = uffd
        .copy(gone_addr, &page, CopyMode::empty())
        .expect_err("unmapped");
    assert!(
        matches!(e.kind, ResolveErrorKind::NotRegistered),
        "unmapped address: {e}"
    );
    // Beyond the user address space: EINVAL.
    let kernel_half = 0xffff_8000_0000_0000u64;
    for r in [
        uffd.zeropage(kernel_half, ps, ZeropageMode::empty()),
        uffd.copy(kernel_half, &page, CopyMode::empty()),
    ] {
        let e = r.expect_err("outside user space");
        assert_eq!(e.kind, ResolveErrorKind::InvalidRange, "{e}");
    }
    let s = uffd.stats();
    assert_eq!(
        (s.copy, s.zeropage, s.poison, s.continue_, s.wake),
        (5, 3, 2, 2, 2)
    );
}

/// Lengths and addresses the kernel cannot take are `InvalidRange` without an ioctl being
/// issued; nothing panics, whatever the numbers.
#[test]
fn bad_lengths_are_invalid_range() {
    let ps = PAGE_SIZE as u64;
    let uffd = Uffd::new(Features::POISON | Features::MOVE).expect("uffd");
    let m = Mapping::anonymous(2 * PAGE_SIZE).expect("mapping");
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let a = m.addr();

    for len in [0usize, 1, 100, PAGE_SIZE - 1, PAGE_SIZE + 1] {
        let src = vec![7u8; len];
        let e = uffd
            .copy(a, &src, CopyMode::empty())
            .expect_err("bad source length");
        assert_eq!(
            (e.op, e.kind),
            (ResolveOp::Copy, ResolveErrorKind::InvalidRange)
        );
        assert_eq!(e.len, len as u64);
    }
    let page = pattern_page(42, 0, PAGE_SIZE);
    // The last page of the address space: its end overflows.
    let page_mask = !(ps - 1);
    let e = uffd
        .copy(a + 8, &page, CopyMode::empty())
        .expect_err("unaligned destination");
    assert_eq!(e.kind, ResolveErrorKind::InvalidRange);
    let e = uffd
        .copy(page_mask, &page, CopyMode::empty())
        .expect_err("overflowing destination");
    assert_eq!(e.kind, ResolveErrorKind::InvalidRange);
    for (start, len) in [
        (a, 0),
        (a, 1),
        (a + 1, ps),
        (ps, u64::MAX - ps + 1),
        (a, page_mask),
    ] {
        assert_eq!(
            uffd.zeropage(start, len, ZeropageMode::empty())
                .map_err(|e| e.kind),
            Err(ResolveErrorKind::InvalidRange),
            "zeropage {start:#x}+{len:#x}"
        );
        assert!(uffd.poison(start, len).is_err());
        assert!(uffd
            .continue_minor(start, len, ContinueMode::empty())
            .is_err());
        assert!(uffd.wake(start, len).is_err());
        assert!(uffd.writeprotect(start, len, WriteprotectMode::WP).is_err());
        // SAFETY: these ranges are refused (by the crate or the kernel) before any page moves.
        assert!(unsafe { uffd.move_pages(a, start, len, MoveMode::empty()) }.is_err());
    }
    // Every one of these was refused before an ioctl was issued.
    let s = uffd.stats();
    assert_eq!((s.resolves(), s.wake, s.writeprotect), (0, 0, 0), "{s:?}");

    // The page is untouched by all of this: it is still missing, and COPY fills it.
    assert_eq!(
        uffd.copy(a, &page, CopyMode::empty()),
        Ok(Resolved::Complete(ps))
    );
    assert_eq!(read_page(&m, 0, PAGE_SIZE), page);
}

/// COPY of a 4 KiB page into hugetlbfs memory: the kernel wants whole huge pages (EINVAL).
/// An unreadable source is EFAULT (`BadAddress`).
#[test]
fn copy_misuse_reaching_the_kernel() {
    let ps = PAGE_SIZE as u64;
    let uffd = Uffd::new(Features::MISSING_HUGETLBFS).expect("uffd");
    let m = Mapping::anonymous(PAGE_SIZE).expect("mapping");
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let e = uffd
        .copy_from_ptr(m.addr(), 8 as *const u8, PAGE_SIZE, CopyMode::empty())
        .expect_err("unreadable source");
    assert_eq!(e.kind, ResolveErrorKind::BadAddress);
    // The page is still missing.
    let page = pattern_page(43, 0, PAGE_SIZE);
    assert_eq!(
        uffd.copy(m.addr(), &page, CopyMode::empty()),
        Ok(Resolved::Complete(ps))
    );

    if !need_kind("copy misuse", MemoryKind::HugetlbPrivate, 2) {
        return;
    }
    let huge = Mapping::new(MemoryKind::HugetlbPrivate, HUGE_PAGE_SIZE).expect("hugetlb");
    uffd.register(&huge, RegisterMode::MISSING)
        .expect("register hugetlb");
    let e = uffd
        .copy(huge.addr(), &page, CopyMode::empty())
        .expect_err("4 KiB into a huge page");
    assert_eq!(e.kind, ResolveErrorKind::InvalidRange);
    let big = pattern_page(44, 0, HUGE_PAGE_SIZE);
    assert_eq!(
        uffd.copy(huge.addr(), &big, CopyMode::empty()),
        Ok(Resolved::Complete(HUGE_PAGE_SIZE as u64))
    );
    assert_eq!(read_page(&huge, 0, HUGE_PAGE_SIZE), big);
}
