//! Working sets: a session records the order in which pages were first touched; the recording
//! survives a round trip through a file; replayed into a fresh session, it makes exactly the
//! recorded pages present ahead of demand — without a single fault — and background fill then
//! completes the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::source::{MemorySource, PageSource, SourceError};
use faultline::{
    Readahead, Region, Server, ServerConfig, SessionHandle, SessionOptions, WorkingSet,
};
use faultline_testing::{fill_pattern, within};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};

const PAGES: usize = 512;
/// Pages touched while recording.
const TOUCHED: usize = 200;
const LIMIT: Duration = Duration::from_secs(30);

fn content() -> Arc<Vec<u8>> {
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        // Every seventh page zero.
        if p % 7 != 6 {
            fill_pattern(31, p as u64, chunk);
        }
    }
    Arc::new(v)
}

/// A random-looking order of `TOUCHED` distinct pages (a fixed linear congruential shuffle).
fn touch_order() -> Vec<usize> {
    let mut pages: Vec<usize> = (0..PAGES).collect();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in (1..PAGES).rev() {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = (x >> 33) as usize % (i + 1);
        pages.swap(i, j);
    }
    pages.truncate(TOUCHED);
    pages
}

struct Client {
    m: Arc<Mapping>,
    session: SessionHandle,
}

fn client(server: &Server, source: &Arc<MemorySource>, options: SessionOptions) -> Client {
    let uffd = Uffd::new(Features::empty()).expect("userfaultfd");
    let m = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let region = Region::for_mapping(&m, Arc::clone(source) as _);
    let session = server
        .add_session(uffd, vec![region], options)
        .expect("session");
    Client { m, session }
}

fn check(m: &Mapping, want: &[u8], p: usize) {
    let mut got = vec![0u8; PAGE_SIZE];
    m.read(p * PAGE_SIZE, &mut got).expect("read");
    assert!(
        got[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
        "page {p} wrong"
    );
}

fn offsets(pages: &[usize]) -> Vec<u64> {
    pages.iter().map(|&p| (p * PAGE_SIZE) as u64).collect()
}

/// Record a working set of [`touch_order`] (each page touched twice, the second time without a
/// fault) and return it.
fn record(server: &Server, source: &Arc<MemorySource>, want: &Arc<Vec<u8>>) -> WorkingSet {
    // Readahead asked for, but a recording session turns it off so that every touch is seen.
    let options = SessionOptions {
        record_working_set: true,
        readahead: Some(Readahead::Adaptive {
            min_pages: 4,
            max_pages: 64,
        }),
        ..SessionOptions::default()
    };
    let c = client(server, source, options);
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(want));
    within(LIMIT, move || {
        let order = touch_order();
        for (k, &p) in order.iter().enumerate() {
            check(&m, &want2, p);
            // Touch an earlier page again: present, no fault, not recorded twice.
            check(&m, &want2, order[k / 2]);
        }
    });
    let st = c.session.stats();
    assert_eq!(
        st.faults, TOUCHED as u64,
        "one fault per first touch: {st:?}"
    );
    assert_eq!(
        st.readahead_pages, 0,
        "no readahead while recording: {st:?}"
    );
    c.session.working_set()
}

#[test]
fn a_recorded_working_set_survives_a_file_and_replays_without_faults() {
    let want = content();
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let ws = record(&server, &source, &want);
    assert_eq!(ws.page_size, PAGE_SIZE as u64);
    assert_eq!(
        ws.offsets,
        offsets(&touch_order()),
        "first touches, in order, once each"
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("app.wset");
    ws.save(&path).expect("save");
    let loaded = WorkingSet::load(&path).expect("load");
    assert_eq!(loaded, ws);

    // Replay into a fresh client of the same source.
    let recorded = offsets(&touch_order());
    let options = SessionOptions {
        prefetch: Some(loaded),
        ..SessionOptions::default()
    };
    let c = client(&server, &source, options);
    // No "prefetch done" signal exists: wait for the recorded pages to be present, bounded.
    let deadline = Instant::now() + LIMIT;
    while !c.session.offsets_present(&recorded) {
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {:?}",
            c.session.stats()
        );
        std::thread::yield_now();
    }
    let st = c.session.stats();
    assert_eq!(
        st.faults, 0,
        "prefetch runs ahead of demand, no fault: {st:?}"
    );
    assert_eq!(
        st.prefetch_pages, TOUCHED as u64,
        "exactly the recorded pages: {st:?}"
    );
    assert_eq!(st.fill_pages + st.readahead_pages, 0, "{st:?}");
    let order = touch_order();
    for p in (0..PAGES).filter(|p| !order.contains(p)) {
        assert!(
            !c.session.offsets_present(&[(p * PAGE_SIZE) as u64]),
            "page {p} not recorded"
        );
    }

    // The recorded pages are there: touching them faults nothing.
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(&want));
    within(LIMIT, move || {
        for &p in &order {
            check(&m, &want2, p);
        }
    });
    assert_eq!(c.session.stats().faults, 0, "{:?}", c.session.stats());
    // A page outside the working set is served on demand.
    let outside = (0..PAGES)
        .find(|p| !touch_order().contains(p))
        .expect("an unrecorded page");
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(&want));
    within(LIMIT, move || check(&m, &want2, outside));
    assert_eq!(c.session.stats().faults, 1);
    server.shutdown();
}

#[test]
fn prefetch_goes_first_then_background_fill_completes_the_rest() {
    let want = content();
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let ws = record(&server, &source, &want);
    let options = SessionOptions {
        prefetch: Some(ws),
        background_fill: true,
        ..SessionOptions::default()
    };
    let c = client(&server, &source, options);
    assert!(
        c.session.wait_all_present(LIMIT),
        "prefetch + fill complete"
    );
    let st = c.session.stats();
    assert_eq!(st.faults, 0, "{st:?}");
    // The fill starts once every recorded page is claimed by prefetch: it never takes one.
    assert_eq!(st.prefetch_pages, TOUCHED as u64, "{st:?}");
    assert_eq!(st.fill_pages, (PAGES - TOUCHED) as u64, "{st:?}");
    assert_eq!(st.pages, PAGES as u64, "{st:?}");
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(&want));
    within(LIMIT, move || (0..PAGES).for_each(|p| check(&m, &want2, p)));
    assert_eq!(c.session.stats().faults, 0);
    server.shutdown();
}

/// With `fill_after_quiet`, the working set is pushed at once but the fill of the rest waits
/// until the session has gone that long without a demand fault; a demand fault starts the wait
/// again; `fill_all` (a draining server) ends it.
#[test]
fn the_fill_waits_for_the_session_to_be_quiet() {
    const QUIET: Duration = Duration::from_secs(2);
    let want = content();
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let ws = record(&server, &source, &want);
    let options = |quiet| SessionOptions {
        prefetch: Some(ws.clone()),
        background_fill: true,
        fill_after_quiet: quiet,
        readahead: Some(Readahead::Off),
        ..SessionOptions::default()
    };
    let c = client(&server, &source, options(QUIET));
    assert!(
        c.session.wait_prefetched(LIMIT),
        "the working set is pushed at once"
    );
    assert_eq!(c.session.stats().prefetch_pages, TOUCHED as u64);
    // A page outside the working set: a demand fault, which starts the quiet wait again.
    let outside = (0..PAGES)
        .find(|p| !touch_order().contains(p))
        .expect("a page outside the working set");
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(&want));
    within(LIMIT, move || check(&m, &want2, outside));
    let touched = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let st = c.session.stats();
    assert_eq!(st.faults, 1, "{st:?}");
    assert_eq!(
        st.fill_pages, 0,
        "no fill before the session is quiet: {st:?}"
    );
    assert!(c.session.wait_all_present(LIMIT), "the fill completes");
    assert!(
        touched.elapsed() >= QUIET - Duration::from_millis(100),
        "the fill waited for {QUIET:?} without demand: all present after {:?}",
        touched.elapsed()
    );
    let st = c.session.stats();
    assert_eq!(st.fill_pages, (PAGES - TOUCHED - 1) as u64, "{st:?}");
    let (m, want2) = (Arc::clone(&c.m), Arc::clone(&want));
    within(LIMIT, move || (0..PAGES).for_each(|p| check(&m, &want2, p)));

    // A wait longer than the test's limit: only fill_all can end it.
    let c = client(&server, &source, options(Duration::from_secs(3600)));
    assert!(
        c.session.wait_prefetched(LIMIT),
        "the working set is pushed at once"
    );
    assert_eq!(c.session.stats().prefetch_pages, TOUCHED as u64);
    server.fill_all();
    assert!(c.session.wait_all_present(LIMIT), "fill_all ends the wait");
    assert_eq!(c.session.stats().faults, 0);
    server.shutdown();
}

/// A memory source whose reads take a while and are counted while they run: how many at once
/// (at most), apart from the reads of one page a test faults on.
#[derive(Debug)]
struct Concurrency {
    inner: MemorySource,
    /// The page whose reads are not counted (a demand fault's).
    demand_page: u64,
    now: std::sync::atomic::AtomicU64,
    max: std::sync::atomic::AtomicU64,
}

impl PageSource for Concurrency {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> String {
        "concurrency".into()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        use std::sync::atomic::Ordering::SeqCst;
        let page = PAGE_SIZE as u64;
        let demand = offset <= self.demand_page * page
            && self.demand_page * page < offset + buf.len() as u64;
        if !demand {
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
        }
        std::thread::sleep(Duration::from_millis(5));
        let r = self.inner.read_at(offset, buf);
        if !demand {
            self.now.fetch_sub(1, SeqCst);
        }
        r
    }
}

/// `background_workers` bounds the workers doing background work at once; the others still
/// serve demand faults while it runs.
#[test]
fn background_work_takes_at_most_its_workers_and_demand_is_served_beside_it() {
    let want = content();
    let run = |background_workers: usize| {
        let source = Arc::new(Concurrency {
            inner: MemorySource::new(want.as_ref().clone()),
            demand_page: (PAGES - 1) as u64,
            now: Default::default(),
            max: Default::default(),
        });
        let server = Server::start(ServerConfig {
            workers: 3,
            background_workers,
            // Many small background steps (each a 5 ms read): workers meet in them.
            max_io: 4 * PAGE_SIZE,
            ..ServerConfig::default()
        })
        .expect("server");
        let uffd = Uffd::new(Features::empty()).expect("userfaultfd");
        let m = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
        uffd.register(&m, RegisterMode::MISSING).expect("register");
        let region = Region::for_mapping(&m, Arc::clone(&source) as _);
        let session = server
            .add_session(
                uffd,
                vec![region],
                SessionOptions {
                    background_fill: true,
                    readahead: Some(Readahead::Off),
                    ..SessionOptions::default()
                },
            )
            .expect("session");
        // A demand fault on the last page (the fill goes in address order: it is far away).
        let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
        within(LIMIT, move || check(&m2, &want2, PAGES - 1));
        let filled_by_then = session.stats().fill_pages;
        assert!(session.wait_all_present(LIMIT), "the fill completes");
        let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
        within(LIMIT, move || {
            (0..PAGES).for_each(|p| check(&m2, &want2, p))
        });
        let st = session.stats();
        assert_eq!(st.faults, 1, "{st:?}");
        server.shutdown();
        (
            source.max.load(std::sync::atomic::Ordering::SeqCst),
            filled_by_then,
            st.fill_pages,
        )
    };
    let (one, filled_by_then, filled) = run(1);
    assert_eq!(
        one, 1,
        "one background read at a time with background_workers 1"
    );
    assert_eq!(filled, (PAGES - 1) as u64);
    // The fill (128 steps of 5 ms each) was not done when the demand fault was: a worker the
    // fill may not take served it beside the fill, not after it.
    assert!(
        filled_by_then < filled,
        "the demand fault waited for the whole fill ({filled_by_then} of {filled} pages)"
    );
    let (all, _, _) = run(0);
    assert!(
        all >= 2,
        "every worker takes background steps with 0 (max {all} at once)"
    );
}
