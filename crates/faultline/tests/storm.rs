//! A fault storm: eight threads touch every page of one region at once, each starting at a
//! different page, so that several threads fault on the same missing page at the same time and
//! several workers read those faults. Every byte must be right, every page must be resolved
//! exactly once, and every extra fault must be accounted for as a duplicate (the page was in
//! flight: its resolver's wake-up covers it) or a refault of a present page (resolved again,
//! answered EEXIST) — never as a second successful resolve, and never with a `UFFDIO_WAKE`.
//! The storm opens with all eight threads on one page whose source read is slow, so faults on a
//! page in flight are certain to happen (a kernel wake-up removes unread messages of the threads
//! it wakes, so fast resolves alone may leave no duplicate to count).
//!
//! The accounting identity, from `server.rs`: the server counts each resolve ioctl before
//! issuing it (`Stats::copy`/`zeropage` equal the fd's own counts), a claimed run never meets a
//! present page when no REMOVE happens (so EEXIST comes only from refaults, one each), nothing
//! is deferred without events (no EAGAIN), and each successful resolve covers one or more pages
//! nobody resolved before. Hence:
//! `io.copy + io.zeropage - io.eexist` = successful resolves ≤ pages, with equality when every
//! resolve is one page (one message per read, no readahead); and the fault messages split into
//! `claimed + duplicate_faults + present_refaults`, where the claimed faults plus the readahead
//! pages are exactly the pages of the region.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use faultline::source::{Failure, FailureInjecting, LayeredSource, MemorySource, PageSource};
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions, Stats};
use faultline_testing::{fill_pattern, within};
use faultline_uffd::{Features, IoctlStats, Mapping, RegisterMode, Uffd, PAGE_SIZE};

const THREADS: usize = 8;
const PAGES: usize = 1024;
/// Every fourth page of the source is zero (served with ZEROPAGE).
const ZERO_PAGES: usize = PAGES / 4;
/// The page every thread touches first, all at once; its reads are slow, so the other threads'
/// faults on it are read while it is in flight.
const HOT: usize = 100;
const HOT_READ: Duration = Duration::from_millis(20);
/// Safety net against a lost wake-up.
const LIMIT: Duration = Duration::from_secs(30);

fn content(seed: u64) -> Arc<Vec<u8>> {
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if p % 4 != 3 {
            fill_pattern(seed, p as u64, chunk);
        }
    }
    Arc::new(v)
}

/// Run the storm under `config` and return the session's counters and the fd's ioctl counts.
fn storm(config: ServerConfig, seed: u64) -> (Stats, IoctlStats) {
    let want = content(seed);
    let base: Arc<dyn PageSource> = Arc::new(MemorySource::new(want.as_ref().clone()));
    let slow = FailureInjecting::new(MemorySource::new(want.as_ref().clone()))
        .with_rule(Failure::Slow(HOT_READ));
    let source = Arc::new(
        LayeredSource::new(base, PAGE_SIZE as u64)
            .and_then(|l| l.with_diff(Arc::new(slow), [HOT as u64]))
            .expect("layered source"),
    );
    let uffd = Uffd::new(Features::empty()).expect("userfaultfd");
    let m = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(config).expect("server");
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(&m, source)],
            SessionOptions::default(),
        )
        .expect("session");

    let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
    within(LIMIT, move || {
        let start = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (m, want, start) = (&m2, &want2, &start);
                s.spawn(move || {
                    start.wait();
                    // All threads on one page at once.
                    let at = HOT * PAGE_SIZE + t * 8;
                    assert_eq!(
                        m.read_u8(at).expect("read"),
                        want[at],
                        "thread {t}: hot page"
                    );
                    // Start a few pages apart: a thread soon catches up with the one ahead of
                    // it, and from then on they fault on the same pages. One byte per page
                    // keeps the threads at the same frontier.
                    for k in 0..PAGES {
                        let p = (t * 7 + k) % PAGES;
                        let at = p * PAGE_SIZE + (t * 511 + k) % PAGE_SIZE;
                        let b = m.read_u8(at).expect("read");
                        assert_eq!(b, want[at], "thread {t}: page {p} byte {at:#x}");
                    }
                    // Then every byte of every page, as this thread sees it.
                    let mut got = vec![0u8; PAGE_SIZE];
                    for k in 0..PAGES {
                        let p = (t * 7 + k) % PAGES;
                        m.read(p * PAGE_SIZE, &mut got).expect("read");
                        assert!(
                            got[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                            "thread {t}: page {p} has wrong bytes"
                        );
                    }
                });
            }
        });
    });

    // Every byte, once more, after the storm.
    let mut all = vec![0u8; PAGES * PAGE_SIZE];
    m.read(0, &mut all).expect("read all");
    assert!(all[..] == want[..], "wrong bytes after the storm");
    // Counters are complete once the last page is published present (they are added first).
    assert!(
        session.wait_all_present(LIMIT),
        "pages missing after the storm"
    );
    let st = session.stats();
    let io = session.uffd_stats();
    server.shutdown();
    (st, io)
}

/// What holds whatever the readahead and batching.
fn check_common(st: &Stats, io: &IoctlStats) {
    assert_eq!(
        st.pages, PAGES as u64,
        "every page resolved exactly once: {st:?}"
    );
    assert_eq!(st.bytes, (PAGES * PAGE_SIZE) as u64, "{st:?}");
    // Short zero stretches may be copied along with their neighbours; never more than the zero
    // pages of the source are served as zeros.
    assert!(st.zero_pages <= ZERO_PAGES as u64, "{st:?}");
    assert_eq!(
        (io.wake, st.wake),
        (0, 0),
        "resolves wake their sleepers: {io:?}"
    );
    assert_eq!(
        (st.copy, st.zeropage),
        (io.copy, io.zeropage),
        "the server counts every ioctl"
    );
    assert_eq!(
        io.eagain + st.eagain + st.deferred,
        0,
        "no event, so no EAGAIN: {st:?} {io:?}"
    );
    assert_eq!(st.eexist, io.eexist, "{st:?} {io:?}");
    assert_eq!(
        io.eexist, st.present_refaults,
        "EEXIST comes only from refaults of present pages, one each: {st:?} {io:?}"
    );
    assert_eq!(
        st.faults, io.events,
        "every message read is a fault, and counted: {st:?} {io:?}"
    );
    assert_eq!((st.poison, st.source_errors, st.continue_), (0, 0, 0));
    let succeeded = io.copy + io.zeropage - io.eexist;
    assert!(
        succeeded >= 1 && succeeded <= PAGES as u64,
        "successful resolves ({succeeded}) never cover a page twice: {st:?} {io:?}"
    );
}

#[test]
fn no_readahead_one_message_per_read_one_resolve_per_page() {
    let config = ServerConfig {
        workers: 4,
        batch: 1,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let (st, io) = storm(config, 11);
    check_common(&st, &io);
    assert_eq!(
        io.copy + io.zeropage - io.eexist,
        PAGES as u64,
        "one successful resolve per page: {st:?} {io:?}"
    );
    assert_eq!(
        st.zero_pages, ZERO_PAGES as u64,
        "lone zero pages resolved as zeros: {st:?}"
    );
    assert_eq!(
        st.faults - st.duplicate_faults - st.present_refaults,
        PAGES as u64,
        "{st:?}"
    );
    assert_eq!(st.readahead_pages, 0);
    assert!(
        st.duplicate_faults + st.present_refaults > 0,
        "eight threads in a convoy fault on the same pages: {st:?}"
    );
    eprintln!(
        "storm/off/batch1: faults {} duplicates {} refaults {} eexist {}",
        st.faults, st.duplicate_faults, st.present_refaults, io.eexist
    );
}

#[test]
fn no_readahead_batched_reads_coalesce_but_never_resolve_twice() {
    let config = ServerConfig {
        workers: 2,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let (st, io) = storm(config, 12);
    check_common(&st, &io);
    assert_eq!(
        st.faults - st.duplicate_faults - st.present_refaults,
        PAGES as u64,
        "without readahead each page is claimed by exactly one fault: {st:?}"
    );
    assert_eq!(st.readahead_pages, 0);
    assert!(st.duplicate_faults + st.present_refaults > 0, "{st:?}");
    // Every fault of a claimed run is answered within its run: the latency samples count runs.
    assert!(
        st.latency_samples >= 1 && st.latency_samples <= PAGES as u64,
        "{st:?}"
    );
}

#[test]
fn adaptive_readahead_every_page_once_fewer_faults() {
    let config = ServerConfig {
        workers: 2,
        readahead: Readahead::Adaptive {
            min_pages: 1,
            max_pages: 64,
        },
        ..ServerConfig::default()
    };
    let (st, io) = storm(config, 13);
    check_common(&st, &io);
    assert_eq!(
        st.faults - st.duplicate_faults - st.present_refaults + st.readahead_pages,
        PAGES as u64,
        "each page is claimed once, by a fault or by readahead: {st:?}"
    );
    assert!(
        st.readahead_pages > 0,
        "sequential touches trigger readahead: {st:?}"
    );
    assert!(st.faults < PAGES as u64, "readahead saves faults: {st:?}");
    eprintln!(
        "storm/adaptive: faults {} duplicates {} refaults {} readahead {}",
        st.faults, st.duplicate_faults, st.present_refaults, st.readahead_pages
    );
}
