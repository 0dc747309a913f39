//! Regions of 2 MiB hugetlbfs pages: every fault is resolved a whole huge page at a time with
//! `UFFDIO_COPY` — zero pages included, since `UFFDIO_ZEROPAGE` does not exist on hugetlbfs —
//! and every byte of every huge page is the source's.

use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::Duration;

use faultline::source::MemorySource;
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions, Stats};
use faultline_testing::{fill_pattern, need_features, need_huge_pages, within};
use faultline_uffd::{
    Features, IoctlStats, Mapping, MemoryKind, RegisterMode, Uffd, HUGE_PAGE_SIZE, PAGE_SIZE,
};

/// Huge pages per region.
const PAGES: usize = 6;
/// These huge pages of the source are all zeros.
const ZERO: [usize; 2] = [2, 5];
const LIMIT: Duration = Duration::from_secs(30);

/// The huge page pool is shared by the tests of this file: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn content() -> Arc<Vec<u8>> {
    let mut v = vec![0u8; PAGES * HUGE_PAGE_SIZE];
    for (p, huge) in v.chunks_mut(HUGE_PAGE_SIZE).enumerate() {
        if !ZERO.contains(&p) {
            // A different pattern in every 4 KiB piece, so a misplaced piece is caught too.
            for (k, chunk) in huge.chunks_mut(PAGE_SIZE).enumerate() {
                fill_pattern(51, (p * 1000 + k) as u64, chunk);
            }
        }
    }
    Arc::new(v)
}

fn check(m: &Mapping, want: &[u8], p: usize, who: &str) {
    let mut got = vec![0u8; HUGE_PAGE_SIZE];
    m.read(p * HUGE_PAGE_SIZE, &mut got).expect("read");
    assert!(
        got[..] == want[p * HUGE_PAGE_SIZE..(p + 1) * HUGE_PAGE_SIZE],
        "{who}: huge page {p} wrong"
    );
}

/// Serve a `kind` region of [`PAGES`] huge pages; `threads` threads touch every huge page (each
/// starting at a different one, at a different 4 KiB piece).
fn serve(kind: MemoryKind, readahead: Readahead, threads: usize) -> (Stats, IoctlStats) {
    let want = content();
    let uffd = Uffd::new(Features::MISSING_HUGETLBFS).expect("userfaultfd");
    let m = Arc::new(Mapping::new(kind, PAGES * HUGE_PAGE_SIZE).expect("hugetlb mapping"));
    assert_eq!(m.page_size(), HUGE_PAGE_SIZE);
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let config = ServerConfig {
        workers: 2,
        readahead,
        ..ServerConfig::default()
    };
    let server = Server::start(config).expect("server");
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let region = Region::for_mapping(&m, source);
    assert_eq!(region.page_size(), HUGE_PAGE_SIZE as u64);
    let session = server
        .add_session(uffd, vec![region], SessionOptions::default())
        .expect("session");
    let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
    within(LIMIT, move || {
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (m, want, start) = (&m2, &want2, &start);
                s.spawn(move || {
                    start.wait();
                    for k in 0..PAGES {
                        let p = (t + k) % PAGES;
                        // First touch somewhere inside the huge page, not at its start.
                        let at = p * HUGE_PAGE_SIZE + ((t * 131 + k * 17) % 512) * PAGE_SIZE + 9;
                        assert_eq!(
                            m.read_u8(at).expect("read"),
                            want[at],
                            "thread {t}: byte {at:#x}"
                        );
                    }
                    for p in 0..PAGES {
                        check(m, want, p, &format!("thread {t}"));
                    }
                });
            }
        });
    });
    assert!(session.wait_all_present(LIMIT));
    let st = session.stats();
    let io = session.uffd_stats();
    server.shutdown();
    (st, io)
}

fn common(st: &Stats, io: &IoctlStats) {
    assert_eq!(
        st.pages, PAGES as u64,
        "every huge page resolved once: {st:?}"
    );
    assert_eq!(st.bytes, (PAGES * HUGE_PAGE_SIZE) as u64, "{st:?}");
    assert_eq!(
        (st.zeropage, io.zeropage),
        (0, 0),
        "no ZEROPAGE on hugetlbfs: {st:?} {io:?}"
    );
    assert_eq!(st.copy, io.copy, "{st:?} {io:?}");
    assert_eq!(io.eexist, st.present_refaults, "{st:?} {io:?}");
    assert_eq!((io.wake, io.eagain), (0, 0), "{io:?}");
    assert!(st.zero_pages <= ZERO.len() as u64, "{st:?}");
}

#[test]
fn private_hugetlb_one_copy_per_huge_page_zeros_included() {
    let _serial = serial();
    if !need_features("hugetlb", Features::MISSING_HUGETLBFS) {
        return;
    }
    let Some(_huge) = need_huge_pages("private hugetlb", PAGES as u64) else {
        return;
    };
    let (st, io) = serve(MemoryKind::HugetlbPrivate, Readahead::Off, 1);
    common(&st, &io);
    assert_eq!(st.faults, PAGES as u64, "one fault per huge page: {st:?}");
    assert_eq!(
        io.copy, PAGES as u64,
        "one 2 MiB COPY per huge page: {io:?}"
    );
    assert_eq!(
        st.zero_pages,
        ZERO.len() as u64,
        "zero huge pages copied from zeros: {st:?}"
    );
}

#[test]
fn private_hugetlb_touched_by_several_threads_with_readahead() {
    let _serial = serial();
    if !need_features("hugetlb", Features::MISSING_HUGETLBFS) {
        return;
    }
    let Some(_huge) = need_huge_pages("private hugetlb", PAGES as u64) else {
        return;
    };
    let (st, io) = serve(MemoryKind::HugetlbPrivate, Readahead::default(), 4);
    common(&st, &io);
}

#[test]
fn shared_hugetlb_missing_mode_is_served_with_copy_too() {
    let _serial = serial();
    if !need_features("hugetlb", Features::MISSING_HUGETLBFS) {
        return;
    }
    let Some(_huge) = need_huge_pages("shared hugetlb", PAGES as u64) else {
        return;
    };
    let (st, io) = serve(MemoryKind::HugetlbShared, Readahead::Off, 3);
    common(&st, &io);
}
