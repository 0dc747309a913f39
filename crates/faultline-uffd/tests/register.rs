//! `register-ioctls` of the kernel's uffd-unit-tests, through this crate's API: every memory kind
//! registered in every mode it allows returns exactly the ioctl set the kernel documents for it;
//! modes a kind or the fd's features do not allow are refused before any ioctl; bad ranges are
//! `RangeError`s; unregistering ends fault reporting.
//!
//! The kernel answers `UFFDIO_REGISTER` with `UFFD_API_RANGE_IOCTLS` (WAKE, COPY, ZEROPAGE, MOVE,
//! WRITEPROTECT, CONTINUE, POISON) — or `UFFD_API_RANGE_IOCTLS_BASIC` (no ZEROPAGE, no MOVE) when
//! the range holds hugetlbfs memory — minus WRITEPROTECT without WP mode and minus CONTINUE without
//! MINOR mode.
#![allow(unsafe_code)]

use std::time::Duration;

use faultline_testing::{need_kind, within};
use faultline_uffd::{
    Error, Features, Ioctls, Mapping, MemoryKind, RangeError, RegisterMode, Uffd, HUGE_PAGE_SIZE,
    PAGE_SIZE,
};
use rustix::io::Errno;

/// The features `register-ioctls` requires in the selftest.
const REGISTER_FEATURES: Features = Features::MISSING_HUGETLBFS
    .union(Features::MISSING_SHMEM)
    .union(Features::PAGEFAULT_FLAG_WP)
    .union(Features::WP_HUGETLBFS_SHMEM)
    .union(Features::MINOR_HUGETLBFS)
    .union(Features::MINOR_SHMEM);

/// The seven non-empty combinations of MISSING, WP and MINOR.
fn all_modes() -> Vec<RegisterMode> {
    (1..8u64)
        .map(|bits| {
            let mut m = RegisterMode::empty();
            if bits & 1 != 0 {
                m |= RegisterMode::MISSING;
            }
            if bits & 2 != 0 {
                m |= RegisterMode::WP;
            }
            if bits & 4 != 0 {
                m |= RegisterMode::MINOR;
            }
            m
        })
        .collect()
}

/// The exact set the kernel returns for `kind` registered in `mode`.
fn expected_ioctls(kind: MemoryKind, mode: RegisterMode) -> Ioctls {
    let mut set =
        Ioctls::WAKE | Ioctls::COPY | Ioctls::WRITEPROTECT | Ioctls::CONTINUE | Ioctls::POISON;
    if !kind.is_hugetlb() {
        set |= Ioctls::ZEROPAGE | Ioctls::MOVE;
    }
    if !mode.contains(RegisterMode::WP) {
        set -= Ioctls::WRITEPROTECT;
    }
    if !mode.contains(RegisterMode::MINOR) {
        set -= Ioctls::CONTINUE;
    }
    set
}

/// MINOR mode needs a page cache: the crate allows it on shmem and shared hugetlbfs only.
fn allowed(kind: MemoryKind, mode: RegisterMode) -> bool {
    !mode.contains(RegisterMode::MINOR) || kind.is_shared()
}

fn register_ioctls_on(kind: MemoryKind) {
    if !need_kind("register-ioctls", kind, 4) {
        return;
    }
    let uffd = Uffd::new(REGISTER_FEATURES).expect("uffd");
    let m = Mapping::new(kind, 2 * kind.page_size()).expect("mapping");
    let mut issued = 0;
    for mode in all_modes() {
        let r = uffd.register(&m, mode);
        if allowed(kind, mode) {
            let ioctls = r.unwrap_or_else(|e| panic!("register {mode:?} on {kind}: {e}"));
            assert_eq!(ioctls, expected_ioctls(kind, mode), "{mode:?} on {kind}");
            // The selftest's minimum: WAKE always, COPY with MISSING, WRITEPROTECT with WP,
            // CONTINUE with MINOR.
            assert!(ioctls.contains(Ioctls::WAKE));
            assert!(
                ioctls.contains(Ioctls::COPY),
                "COPY is declared whatever the mode"
            );
            issued += 1;
            uffd.unregister_mapping(&m).expect("unregister");
        } else {
            match r {
                Err(Error::ModeNotSupported { mode: m2, kind: k2 }) => {
                    assert_eq!((m2, k2), (mode, kind));
                }
                other => panic!("{mode:?} on {kind}: expected ModeNotSupported, got {other:?}"),
            }
        }
    }
    // No mode at all is refused before the kernel is asked.
    assert!(matches!(
        uffd.register(&m, RegisterMode::empty()),
        Err(Error::ModeNotSupported { .. })
    ));
    // Refused modes never reached the kernel.
    let s = uffd.stats();
    assert_eq!(s.register, issued);
    assert_eq!(s.unregister, issued);
    assert_eq!(issued, if kind.is_shared() { 7 } else { 3 });
}

#[test]
fn register_ioctls_private_anonymous() {
    register_ioctls_on(MemoryKind::PrivateAnonymous);
}

#[test]
fn register_ioctls_shmem() {
    register_ioctls_on(MemoryKind::Shmem);
}

#[test]
fn register_ioctls_hugetlb_private() {
    register_ioctls_on(MemoryKind::HugetlbPrivate);
}

#[test]
fn register_ioctls_hugetlb_shared() {
    register_ioctls_on(MemoryKind::HugetlbShared);
}

/// The selftest's kernel-side refusals: MINOR on anonymous memory and an empty mode fail with
/// EINVAL when the crate's own checks are bypassed.
#[test]
fn kernel_refuses_minor_on_anonymous_and_empty_mode() {
    let uffd = Uffd::new(REGISTER_FEATURES).expect("uffd");
    let m = Mapping::anonymous(PAGE_SIZE).expect("mapping");
    for mode in [
        RegisterMode::MINOR,
        RegisterMode::MISSING | RegisterMode::MINOR,
        RegisterMode::empty(),
    ] {
        // SAFETY: `m` is a live `Mapping`, which never hands out references into its memory.
        let r = unsafe { uffd.register_raw(m.addr(), PAGE_SIZE as u64, mode) };
        match r {
            Err(Error::Register {
                errno, mode: m2, ..
            }) => {
                assert_eq!(errno, Errno::INVAL, "{mode:?}");
                assert_eq!(m2, mode);
            }
            other => panic!("{mode:?} on anonymous memory: {other:?}"),
        }
    }
    assert_eq!(uffd.stats().register, 3);
}

/// Modes whose features this fd did not negotiate are refused, naming the feature.
#[test]
fn modes_without_their_feature_are_refused() {
    let bare = Uffd::new(Features::empty()).expect("uffd");
    let wp_only = Uffd::new(Features::PAGEFAULT_FLAG_WP).expect("uffd");
    let anon = Mapping::anonymous(PAGE_SIZE).expect("anon");
    let shmem = Mapping::new(MemoryKind::Shmem, PAGE_SIZE).expect("shmem");
    let cases: [(&Uffd, &Mapping, RegisterMode, Features); 5] = [
        (&bare, &anon, RegisterMode::WP, Features::PAGEFAULT_FLAG_WP),
        (
            &bare,
            &shmem,
            RegisterMode::MISSING,
            Features::MISSING_SHMEM,
        ),
        (&bare, &shmem, RegisterMode::MINOR, Features::MINOR_SHMEM),
        (
            &wp_only,
            &shmem,
            RegisterMode::WP,
            Features::WP_HUGETLBFS_SHMEM,
        ),
        (
            &bare,
            &anon,
            RegisterMode::MISSING | RegisterMode::WP,
            Features::PAGEFAULT_FLAG_WP,
        ),
    ];
    for (uffd, m, mode, feature) in cases {
        match uffd.register(m, mode) {
            Err(Error::FeatureNotNegotiated { feature: f, .. }) => {
                assert_eq!(f, feature, "{mode:?} on {}", m.kind());
            }
            other => panic!("{mode:?} on {}: {other:?}", m.kind()),
        }
    }
    // The same fd registers what it has: MISSING on anonymous memory needs nothing.
    assert_eq!(
        bare.register(&anon, RegisterMode::MISSING)
            .expect("missing"),
        expected_ioctls(MemoryKind::PrivateAnonymous, RegisterMode::MISSING)
    );
    assert_eq!(bare.stats().register, 1);
    assert_eq!(wp_only.stats().register, 0);
}

#[test]
fn hugetlb_modes_without_their_feature_are_refused() {
    if !need_kind("hugetlb features", MemoryKind::HugetlbShared, 2) {
        return;
    }
    let bare = Uffd::new(Features::empty()).expect("uffd");
    let shared = Mapping::new(MemoryKind::HugetlbShared, HUGE_PAGE_SIZE).expect("hugetlb");
    for (mode, feature) in [
        (RegisterMode::MISSING, Features::MISSING_HUGETLBFS),
        (RegisterMode::MINOR, Features::MINOR_HUGETLBFS),
    ] {
        match bare.register(&shared, mode) {
            Err(Error::FeatureNotNegotiated { feature: f, .. }) => assert_eq!(f, feature),
            other => panic!("{mode:?}: {other:?}"),
        }
    }
    assert_eq!(bare.stats().register, 0);
}

/// Unaligned, empty, out-of-bounds and overflowing ranges are `RangeError`s; none reaches the
/// kernel.
#[test]
fn bad_ranges_are_range_errors() {
    let uffd = Uffd::new(REGISTER_FEATURES).expect("uffd");
    let m = Mapping::anonymous(4 * PAGE_SIZE).expect("mapping");
    let miss = RegisterMode::MISSING;
    assert!(matches!(
        uffd.register_range(&m, 1, PAGE_SIZE, miss),
        Err(Error::Range(RangeError::Unaligned {
            page_size: 4096,
            ..
        }))
    ));
    assert!(matches!(
        uffd.register_range(&m, 0, PAGE_SIZE + 1, miss),
        Err(Error::Range(RangeError::Unaligned { .. }))
    ));
    assert!(matches!(
        uffd.register_range(&m, PAGE_SIZE, 0, miss),
        Err(Error::Range(RangeError::Empty { .. }))
    ));
    assert!(matches!(
        uffd.register_range(&m, 3 * PAGE_SIZE, 2 * PAGE_SIZE, miss),
        Err(Error::Range(RangeError::OutOfBounds {
            offset: 0x3000,
            len: 0x2000,
            mapping_len: 0x4000
        }))
    ));
    assert!(matches!(
        uffd.register_range(&m, usize::MAX, PAGE_SIZE, miss),
        Err(Error::Range(RangeError::OutOfBounds { .. }))
    ));
    // SAFETY: the range is refused before the kernel sees it; nothing is registered.
    let r = unsafe { uffd.register_raw(u64::MAX - 4095, 2 * PAGE_SIZE as u64, miss) };
    assert!(matches!(r, Err(Error::Range(RangeError::Overflow { .. }))));
    assert!(matches!(
        uffd.unregister(m.addr() + 1, PAGE_SIZE as u64),
        Err(Error::Range(RangeError::Unaligned { .. }))
    ));
    assert!(matches!(
        uffd.unregister(m.addr(), 0),
        Err(Error::Range(RangeError::Empty { .. }))
    ));
    assert_eq!(uffd.stats().register, 0);
    assert_eq!(uffd.stats().unregister, 0);
    // A sub-range in bounds is fine.
    let ioctls = uffd
        .register_range(&m, PAGE_SIZE, 2 * PAGE_SIZE, miss)
        .expect("sub-range");
    assert!(ioctls.contains(Ioctls::COPY));
}

/// hugetlbfs ranges must be aligned to the 2 MiB page, not just to 4 KiB.
#[test]
fn hugetlb_ranges_must_be_huge_page_aligned() {
    for kind in [MemoryKind::HugetlbPrivate, MemoryKind::HugetlbShared] {
        if !need_kind("hugetlb alignment", kind, 4) {
            continue;
        }
        let uffd = Uffd::new(REGISTER_FEATURES).expect("uffd");
        let m = Mapping::new(kind, 2 * HUGE_PAGE_SIZE).expect("mapping");
        match uffd.register_range(&m, PAGE_SIZE, HUGE_PAGE_SIZE, RegisterMode::MISSING) {
            Err(Error::Range(RangeError::Unaligned { page_size, .. })) => {
                assert_eq!(page_size, HUGE_PAGE_SIZE as u64);
            }
            other => panic!("{kind}: {other:?}"),
        }
        assert!(matches!(
            uffd.register_range(&m, 0, PAGE_SIZE, RegisterMode::MISSING),
            Err(Error::Range(RangeError::Unaligned { .. }))
        ));
        assert_eq!(uffd.stats().register, 0);
        // The kernel refuses a 4 KiB-aligned range on hugetlbfs as well.
        // SAFETY: `m` is a live `Mapping`, which never hands out references into its memory.
        let r = unsafe {
            uffd.register_raw(
                m.addr() + PAGE_SIZE as u64,
                PAGE_SIZE as u64,
                RegisterMode::MISSING,
            )
        };
        assert!(
            matches!(
                r,
                Err(Error::Register {
                    errno: Errno::INVAL,
                    ..
                })
            ),
            "{kind}: {r:?}"
        );
        uffd.register_range(&m, HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, RegisterMode::MISSING)
            .expect("aligned huge page");
    }
}

/// One range belongs to one userfaultfd at a time: a second one gets EBUSY.
#[test]
fn a_range_registered_elsewhere_is_busy() {
    let a = Uffd::new(Features::empty()).expect("uffd a");
    let b = Uffd::new(Features::empty()).expect("uffd b");
    let m = Mapping::anonymous(PAGE_SIZE).expect("mapping");
    a.register(&m, RegisterMode::MISSING).expect("first");
    match b.register(&m, RegisterMode::MISSING) {
        Err(e @ Error::Register { .. }) => assert_eq!(e.errno(), Some(Errno::BUSY)),
        other => panic!("{other:?}"),
    }
    a.unregister_mapping(&m).expect("unregister");
    b.register(&m, RegisterMode::MISSING)
        .expect("free after unregister");
}

/// After UNREGISTER a missing page faults normally (reads zero) instead of waiting for a
/// handler; re-registering reports faults again (the page is still missing, so a read blocks
/// until COPY fills it).
#[test]
fn unregister_ends_fault_reporting() {
    let uffd = std::sync::Arc::new(Uffd::new(Features::empty()).expect("uffd"));
    let m = std::sync::Arc::new(Mapping::anonymous(2 * PAGE_SIZE).expect("mapping"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    uffd.unregister_mapping(&m).expect("unregister");
    // No handler runs: if the range were still registered this would never return.
    let m2 = std::sync::Arc::clone(&m);
    let v = within(Duration::from_secs(10), move || m2.read_u8(0));
    assert_eq!(v, Ok(0));

    // Page 1 is still missing: register it again and it faults into the handler.
    uffd.register_range(&m, PAGE_SIZE, PAGE_SIZE, RegisterMode::MISSING)
        .expect("re-register");
    let m3 = std::sync::Arc::clone(&m);
    let toucher = std::thread::spawn(move || m3.read_u8(PAGE_SIZE + 7));
    let mut buf = faultline_uffd::EventBuffer::new(4);
    let addr = loop {
        assert!(uffd
            .poll_readable(Some(Duration::from_secs(10)))
            .expect("poll"));
        if uffd.read_events(&mut buf).expect("read") > 0 {
            break buf.events()[0].fault_address().expect("a page fault");
        }
    };
    assert_eq!(addr, m.addr() + PAGE_SIZE as u64);
    let page = faultline_testing::pattern_page(3, 1, PAGE_SIZE);
    let done = uffd
        .copy(addr, &page, faultline_uffd::CopyMode::empty())
        .expect("copy");
    assert!(done.is_complete());
    assert_eq!(toucher.join().expect("toucher"), Ok(page[7]));
    let s = uffd.stats();
    assert_eq!((s.register, s.unregister, s.copy), (2, 1, 1));
}
