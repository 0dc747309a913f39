//! Dirty tracking with `WP_ASYNC` and `PAGEMAP_SCAN`: a WP-registered range on a userfaultfd with
//! `WP_ASYNC` is write-protected; writes are not reported as messages (the kernel lifts the
//! protection itself, no handler runs) but mark the pages written; [`Pagemap::collect_written`]
//! reports exactly the written pages and re-protects them in the same call, so the next
//! collection reports only what was written since.
//!
//! Runs on every memory kind; a kind whose async write protection the kernel refuses is skipped
//! with the reason.

use std::collections::BTreeSet;

use faultline_testing::{need_features, need_kind, skip, wp_features};
use faultline_uffd::{
    Error, EventBuffer, Features, Mapping, MemoryKind, PageCategories, PageRun, Pagemap,
    RegisterMode, Uffd, WriteprotectMode,
};

const PAGES: usize = 10;

/// The page indexes the runs cover.
fn pages_of(runs: &[PageRun], base: u64, page_size: usize) -> BTreeSet<usize> {
    let ps = page_size as u64;
    let mut out = BTreeSet::new();
    for r in runs {
        assert!(r.categories.contains(PageCategories::WRITTEN), "{r:?}");
        assert_eq!((r.start - base) % ps, 0, "run not page-aligned: {r:?}");
        assert_eq!((r.end - base) % ps, 0, "run not page-aligned: {r:?}");
        let mut a = r.start;
        while a < r.end {
            out.insert(usize::try_from((a - base) / ps).expect("page index"));
            a += ps;
        }
    }
    out
}

fn set(pages: &[usize]) -> BTreeSet<usize> {
    pages.iter().copied().collect()
}

fn dirty_tracking(kind: MemoryKind) {
    let test = "dirty tracking";
    if !need_kind(test, kind, PAGES as u64 + 2) {
        return;
    }
    let features = wp_features(kind) | Features::WP_ASYNC | Features::WP_UNPOPULATED;
    if !need_features(test, features) {
        return;
    }
    let uffd = Uffd::new(features).expect("userfaultfd");
    assert!(uffd
        .features()
        .contains(Features::WP_ASYNC | Features::WP_UNPOPULATED));
    let m = Mapping::new(kind, PAGES * kind.page_size()).expect("mapping");
    let (base, ps, len) = (m.addr(), m.page_size(), m.len() as u64);
    uffd.register(&m, RegisterMode::WP).expect("register WP");
    uffd.writeprotect(base, len, WriteprotectMode::WP)
        .expect("protect");
    let mut pagemap = Pagemap::open_self().expect("pagemap");
    let mut collect = || match pagemap.collect_written(base, len) {
        Ok(runs) => Some(pages_of(&runs, base, ps)),
        Err(e @ Error::Os { .. }) => {
            skip(test, &format!("PAGEMAP_SCAN refused on {kind}: {e}"));
            None
        }
        Err(e) => panic!("PAGEMAP_SCAN: {e}"),
    };

    // Protected, never written (unpopulated pages carry markers): nothing to report.
    let Some(first) = collect() else { return };
    assert_eq!(first, set(&[]));

    // Writes from this thread: no handler, the kernel resolves them.
    for p in [3, 7, 8] {
        m.write_u8(p * ps + p, p.to_le_bytes()[0] + 1)
            .expect("write");
    }
    assert_eq!(collect(), Some(set(&[3, 7, 8])));
    // Collected pages were protected again.
    assert_eq!(collect(), Some(set(&[])));
    m.write_u8(5 * ps, 0x55).expect("write");
    assert_eq!(collect(), Some(set(&[5])));
    // Re-armed: a page written before is reported again after a new write.
    m.write_u8(3 * ps + 1, 0x33).expect("write");
    assert_eq!(collect(), Some(set(&[3])));
    // Reads never count.
    assert_eq!(m.read_u8(9 * ps), Ok(0));
    assert_eq!(m.read_u8(7 * ps + 7), Ok(8));
    assert_eq!(collect(), Some(set(&[])));

    for (p, b) in [(3, 4), (7, 8), (8, 9)] {
        assert_eq!(m.read_u8(p * ps + p), Ok(b));
    }
    assert_eq!(
        (m.read_u8(5 * ps), m.read_u8(3 * ps + 1)),
        (Ok(0x55), Ok(0x33))
    );
    // Async WP faults queue no message.
    let mut buf = EventBuffer::new(8);
    assert_eq!(uffd.read_events(&mut buf).expect("read"), 0);
    let s = uffd.stats();
    assert_eq!((s.events, s.writeprotect), (0, 1));
}

#[test]
fn dirty_tracking_private_anonymous() {
    dirty_tracking(MemoryKind::PrivateAnonymous);
}

#[test]
fn dirty_tracking_shmem() {
    dirty_tracking(MemoryKind::Shmem);
}

#[test]
fn dirty_tracking_hugetlb_private() {
    dirty_tracking(MemoryKind::HugetlbPrivate);
}

#[test]
fn dirty_tracking_hugetlb_shared() {
    dirty_tracking(MemoryKind::HugetlbShared);
}

/// `collect_written` re-protects with `PM_SCAN_CHECK_WPASYNC`: a range registered for WP on a
/// userfaultfd without `WP_ASYNC` is refused (EPERM) rather than silently scanned.
#[test]
fn collect_written_needs_async_write_protection() {
    let test = "dirty tracking without WP_ASYNC";
    if !need_features(test, Features::PAGEFAULT_FLAG_WP) {
        return;
    }
    let uffd = Uffd::new(Features::PAGEFAULT_FLAG_WP).expect("userfaultfd");
    let m = Mapping::anonymous(4 * faultline_uffd::PAGE_SIZE).expect("mapping");
    uffd.register(&m, RegisterMode::WP).expect("register WP");
    let mut pagemap = Pagemap::open_self().expect("pagemap");
    match pagemap.collect_written(m.addr(), m.len() as u64) {
        Err(Error::Os { errno, .. }) => assert_eq!(errno, rustix::io::Errno::PERM),
        other => panic!("expected EPERM, got {other:?}"),
    }
}
