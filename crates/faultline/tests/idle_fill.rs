//! Background fill copies in the idle scheduling class (`ServerConfig::idle_fill`): the copy runs
//! in `SCHED_IDLE`, and whoever would wait for a lowered worker raises it first — a fault on a
//! page it is copying, the reader of events that needs the install lock it holds shared.
//!
//! Each test slows one fill copy down with an injected pause (taken inside the lowered section,
//! with the claims and the install lock held) and looks at the worker threads' scheduling class
//! from outside. The tests of this file share the process's `faultline-w*` threads: they run one
//! at a time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline::inject::ResolveFaults;
use faultline::source::{MemorySource, PageSource};
use faultline::{Region, Server, ServerConfig, SessionHandle, SessionOptions};
use faultline_uffd::sched::{self, SchedClass};
use faultline_uffd::{Features, Mapping, RegisterMode, ResolveOp, Uffd, PAGE_SIZE};
use rustix::thread::Pid;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PAGES: usize = 512;

/// Whether threads here may go idle and back; prints why not (a failure under `CI=true`).
fn can_idle(test: &str) -> bool {
    match sched::can_leave_idle() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            faultline_testing::skip(test, &why);
            false
        }
    }
}

/// The fault server's worker threads of this process and their scheduling classes.
fn workers() -> Vec<(Pid, SchedClass)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let t = t.expect("a task");
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // faultline-w0, faultline-w1 (not faultline-watchdog).
        let worker = comm
            .strip_prefix("faultline-w")
            .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()));
        if !worker {
            continue;
        }
        let tid: i32 = t.file_name().to_string_lossy().parse().expect("a tid");
        let pid = Pid::from_raw(tid).expect("a tid is not 0");
        if let Ok(c) = sched::class_of(Some(pid)) {
            out.push((pid, c));
        }
    }
    out
}

/// Polls `cond` every millisecond for up to `limit`.
fn within(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

fn idle_workers() -> usize {
    workers()
        .iter()
        .filter(|(_, c)| *c == SchedClass::Idle)
        .count()
}

struct Setup {
    server: Server,
    session: SessionHandle,
    map: Arc<Mapping>,
    src: Arc<MemorySource>,
}

/// A client of `PAGES` pattern pages (none zero) served by 2 workers, one of which does
/// background work (so the fill stays behind its paused first copy, the start of the region,
/// for `pause`, and the other is free to read faults).
fn setup(features: Features, idle_fill: bool, pause: Duration) -> Setup {
    let mut bytes = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in bytes.chunks_mut(PAGE_SIZE).enumerate() {
        faultline_testing::fill_pattern(41, p as u64, chunk);
    }
    let src = Arc::new(MemorySource::new(bytes));
    let uffd = Uffd::new(features).expect("uffd");
    let map = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
    uffd.register(&map, RegisterMode::MISSING)
        .expect("register");
    let faults = ResolveFaults::new().pause_at(ResolveOp::Copy, map.addr(), pause, 1);
    let server = Server::start(ServerConfig {
        workers: 2,
        background_workers: 1,
        idle_fill,
        inject: Some(Arc::new(faults)),
        ..ServerConfig::default()
    })
    .expect("server");
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(
                &map,
                src.clone() as Arc<dyn PageSource>,
            )],
            SessionOptions {
                background_fill: true,
                ..SessionOptions::default()
            },
        )
        .expect("session");
    Setup {
        server,
        session,
        map,
        src,
    }
}

impl Setup {
    /// The fill's paused first copy is lowered: one worker in SCHED_IDLE within 200 ms (the
    /// watchdog raises a worker lowered for a whole tick, 250 ms, so look well before).
    fn one_worker_goes_idle(&self, when: &str) {
        assert!(
            within(Duration::from_millis(200), || idle_workers() == 1),
            "no worker in SCHED_IDLE {when}: {:?}",
            workers()
        );
    }

    /// A thread touches byte `offset` of the region while the worker is lowered: the worker is
    /// raised within 500 ms, counted in the session (the watchdog's raises are not), and the
    /// thread gets the source's byte.
    fn touching_raises_the_worker(&self, offset: usize, why_not: &str) {
        let (map, src) = (Arc::clone(&self.map), Arc::clone(&self.src));
        let toucher = std::thread::spawn(move || {
            let got = map.read_u8(offset).expect("read");
            let mut want = [0u8; 1];
            src.read_at(offset as u64, &mut want).expect("source");
            (got, want[0])
        });
        assert!(
            within(Duration::from_millis(500), || idle_workers() == 0
                && self.session.stats().fill_raised >= 1),
            "{why_not}: {:?}, {:?}",
            workers(),
            self.session.stats()
        );
        let (got, want) = toucher.join().expect("toucher");
        assert_eq!(got, want);
    }

    /// Every page present with the source's bytes; then the server is shut down and every
    /// worker is back in the normal class.
    fn finish(self) -> faultline::Stats {
        assert!(
            self.session.wait_all_present(Duration::from_secs(30)),
            "the fill did not finish"
        );
        let mut got = vec![0u8; PAGE_SIZE];
        let mut want = vec![0u8; PAGE_SIZE];
        for p in 0..PAGES {
            self.map.read(p * PAGE_SIZE, &mut got).expect("read");
            self.src
                .read_at((p * PAGE_SIZE) as u64, &mut want)
                .expect("source");
            assert_eq!(got, want, "page {p}");
        }
        let st = self.session.stats();
        assert!(
            workers().iter().all(|(_, c)| *c == SchedClass::Normal),
            "a worker stayed out of the normal class: {:?}",
            workers()
        );
        self.server.shutdown();
        st
    }
}

#[test]
fn fill_copies_run_in_the_idle_class_and_the_workers_come_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !can_idle("fill_copies_run_in_the_idle_class") {
        return;
    }
    let t = setup(Features::empty(), true, Duration::from_millis(600));
    t.one_worker_goes_idle("during the fill's first copy");
    let st = t.finish();
    assert!(st.fill_idle_copies >= 1, "{st:?}");
    assert_eq!(st.fill_pages, PAGES as u64);
    assert_eq!(st.faults, 0);
    // Nothing of this session waited for the lowered worker.
    assert_eq!(st.fill_raised, 0);
}

#[test]
fn without_idle_fill_no_worker_leaves_the_normal_class() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = setup(Features::empty(), false, Duration::from_millis(300));
    assert!(
        !within(Duration::from_millis(200), || idle_workers() > 0),
        "a worker went idle with idle_fill off: {:?}",
        workers()
    );
    let st = t.finish();
    assert_eq!(st.fill_idle_copies, 0);
    assert_eq!(st.fill_pages, PAGES as u64);
}

/// A thread faulting on a page of the run a lowered worker copies: the worker is raised at once
/// (it does not wait for the watchdog), and the thread gets the page's bytes.
#[test]
fn a_fault_on_a_page_being_filled_raises_the_filling_worker() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !can_idle("a_fault_on_a_page_being_filled_raises") {
        return;
    }
    let t = setup(Features::empty(), true, Duration::from_secs(2));
    t.one_worker_goes_idle("during the fill's first copy");
    // Page 1 is in the paused run (pages 0..64: a fill copying in the idle class copies 256 KiB
    // per step).
    t.touching_raises_the_worker(
        PAGE_SIZE + 5,
        "the worker copying the faulting page was not raised",
    );
    let st = t.finish();
    assert!(st.duplicate_faults >= 1, "{st:?}");
    assert!(st.fill_raised >= 1);
}

/// A client with REMOVE events: the reader of its messages takes the install lock exclusively,
/// which the lowered worker holds shared through its copy. A fault elsewhere makes the reader
/// raise it rather than wait on it in the idle class.
#[test]
fn the_reader_raises_a_filling_worker_that_holds_the_install_lock() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !can_idle("the_reader_raises_a_filling_worker") {
        return;
    }
    if !faultline_testing::need_features("reader_raises", Features::EVENT_REMOVE) {
        return;
    }
    let t = setup(Features::EVENT_REMOVE, true, Duration::from_secs(2));
    t.one_worker_goes_idle("during the fill's first copy");
    // The last page: outside the paused run (256 KiB with the install lock), so only the
    // reader's wait can raise the worker before the watchdog does.
    t.touching_raises_the_worker(
        (PAGES - 1) * PAGE_SIZE,
        "the reader waited on a worker in the idle class",
    );
    let st = t.finish();
    assert!(st.fill_raised >= 1);
}

/// Nothing waits for the lowered worker in a way the server sees (here: nothing at all), and the
/// copy does not end: the watchdog raises a worker lowered for a whole tick (250 ms here), a
/// backstop for waiters it cannot see. Counted in the server's total, not in a session's.
#[test]
fn the_watchdog_raises_a_worker_lowered_for_a_whole_tick() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !can_idle("the_watchdog_raises_a_worker_lowered_for_a_whole_tick") {
        return;
    }
    let t = setup(Features::empty(), true, Duration::from_secs(2));
    let lowered = Instant::now();
    t.one_worker_goes_idle("during the fill's first copy");
    assert!(
        within(Duration::from_millis(1500), || idle_workers() == 0),
        "the watchdog left a worker in SCHED_IDLE for {:?}: {:?}",
        lowered.elapsed(),
        workers()
    );
    // Between one and two ticks, and well before the paused copy ends.
    let raised_after = lowered.elapsed();
    assert!(
        raised_after < Duration::from_millis(1500),
        "{raised_after:?}"
    );
    assert!(t.server.stats().fill_raised >= 1);
    assert_eq!(t.session.stats().fill_raised, 0);
    let st = t.finish();
    assert_eq!(st.fill_pages, PAGES as u64);
}
