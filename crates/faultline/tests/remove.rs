//! Balloon semantics: pages the client drops with `MADV_DONTNEED` (a `UFFD_EVENT_REMOVE`) read
//! as zeros when touched again, never as the source's old bytes, while pages nobody dropped keep
//! their source bytes — even when the drop races with faults on the pages next to it.
//!
//! The races exercised: while a REMOVE is queued and unread, every resolve ioctl fails with
//! EAGAIN (the server must defer and retry, not drop the fault); `madvise` sleeps until the REMOVE
//! is read and zaps the pages only then, so a removed page can be refaulted right after the event
//! was read; and a removed page that was never touched must still come back as zeros.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use faultline::source::failure::{Failure, FailureInjecting};
use faultline::source::{MemorySource, PageSource};
use faultline::{Readahead, Region, Server, ServerConfig, SessionHandle, SessionOptions};
use faultline_testing::{fill_pattern, within};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};

/// Safety net against a lost fault.
const LIMIT: Duration = Duration::from_secs(60);

/// Pattern content with no zero page, so a zero page read back can only come from a removal.
fn content(pages: usize, seed: u64) -> Arc<Vec<u8>> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        fill_pattern(seed, p as u64, chunk);
    }
    Arc::new(v)
}

struct Fixture {
    server: Server,
    session: SessionHandle,
    m: Arc<Mapping>,
    want: Arc<Vec<u8>>,
}

fn serve(pages: usize, seed: u64, config: ServerConfig, options: SessionOptions) -> Fixture {
    serve_with(Features::EVENT_REMOVE, pages, seed, config, options)
}

fn serve_with(
    features: Features,
    pages: usize,
    seed: u64,
    config: ServerConfig,
    options: SessionOptions,
) -> Fixture {
    let want = content(pages, seed);
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let (server, session, m) = serve_source(features, pages, source, config, options);
    Fixture {
        server,
        session,
        m,
        want,
    }
}

/// `pages` pages of anonymous memory registered with a userfaultfd of `features`, served from
/// `source`.
fn serve_source(
    features: Features,
    pages: usize,
    source: Arc<dyn PageSource>,
    config: ServerConfig,
    options: SessionOptions,
) -> (Server, SessionHandle, Arc<Mapping>) {
    let uffd = Uffd::new(features).expect("userfaultfd");
    let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(config).expect("server");
    let session = server
        .add_session(uffd, vec![Region::for_mapping(&m, source)], options)
        .expect("session");
    (server, session, m)
}

/// Two workers, no readahead: a fault claims its page alone (the REMOVE-race tests).
fn two_workers_no_readahead() -> ServerConfig {
    ServerConfig {
        workers: 2,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    }
}

/// Wait (bounded) until a read of `source` is inside its injected delay.
fn wait_for_a_slow_read(source: &FailureInjecting<MemorySource>) {
    let deadline = std::time::Instant::now() + LIMIT;
    while source.stats().slowed == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow source read never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Read page `p` whole and say what it holds: `Ok` when it is `zero`-filled as expected (or the
/// source, when `zero` is false), else a description naming the page.
fn check_page(m: &Mapping, want: &[u8], p: usize, zero: bool, who: &str) -> Result<(), String> {
    let mut got = vec![0u8; PAGE_SIZE];
    m.read(p * PAGE_SIZE, &mut got).expect("read");
    let src = &want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
    let is_zero = got.iter().all(|&b| b == 0);
    let is_src = got[..] == src[..];
    match (zero, is_zero, is_src) {
        (true, true, _) | (false, _, true) => Ok(()),
        (true, _, true) => Err(format!(
            "{who}: removed page {p} holds its old source bytes"
        )),
        (false, true, _) => Err(format!(
            "{who}: page {p} is zero, expected its source bytes"
        )),
        _ => Err(format!(
            "{who}: page {p} holds neither its source bytes nor zeros"
        )),
    }
}

/// Collect failures instead of panicking inside a barrier-synchronised loop (a panicking thread
/// would leave the others waiting at the barrier); the test asserts the list is empty at the end.
fn note(errors: &Mutex<Vec<String>>, r: Result<(), String>) {
    if let Err(e) = r {
        errors.lock().expect("errors").push(e);
    }
}

/// Each cell: `BALLOON` pages the remover drops, then `TOUCHERS * PER_TOUCHER` pages the
/// touchers fault in for the first time while the drop is under way.
const BALLOON: usize = 2;
const TOUCHERS: usize = 3;
const PER_TOUCHER: usize = 2;
const CELL: usize = BALLOON + TOUCHERS * PER_TOUCHER;
const ITERATIONS: usize = 300;
/// Every this many iterations the remover also drops an earlier, already dropped balloon again.
const AGAIN_EVERY: usize = 10;
const AGAIN_BACK: usize = 5;

/// `ITERATIONS` rounds, in lock step: the remover serves the balloon pages of cell `i`, then, at
/// the same moment as the touchers fault the fresh pages right after them, drops the balloon and
/// reads it back at once (zeros), served by `workers` workers.
fn balloon_race(workers: usize, seed: u64) {
    let pages = ITERATIONS * CELL;
    let config = ServerConfig {
        workers,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let f = serve(pages, seed, config, SessionOptions::default());
    let (m, want) = (Arc::clone(&f.m), Arc::clone(&f.want));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = Arc::clone(&errors);
    let discards = within(LIMIT, move || {
        let errors = &*errs;
        let start = Barrier::new(1 + TOUCHERS);
        let end = Barrier::new(1 + TOUCHERS);
        std::thread::scope(|s| {
            for t in 0..TOUCHERS {
                let (m, want, start, end) = (&m, &want, &start, &end);
                s.spawn(move || {
                    for i in 0..ITERATIONS {
                        start.wait();
                        for k in 0..PER_TOUCHER {
                            let p = i * CELL + BALLOON + t * PER_TOUCHER + k;
                            note(errors, check_page(m, want, p, false, "toucher"));
                        }
                        end.wait();
                    }
                });
            }
            let drop_and_refault = |first: usize, who: &str| {
                m.discard(first * PAGE_SIZE, BALLOON * PAGE_SIZE)
                    .expect("MADV_DONTNEED");
                for p in first..first + BALLOON {
                    note(errors, check_page(&m, &want, p, true, who));
                }
            };
            let mut discards = 0u64;
            for i in 0..ITERATIONS {
                let balloon = i * CELL;
                // Served first (source bytes), so the drop really zaps pages.
                for p in balloon..balloon + BALLOON {
                    note(
                        errors,
                        check_page(&m, &want, p, false, "remover before the drop"),
                    );
                }
                start.wait();
                drop_and_refault(balloon, "remover after the drop");
                discards += 1;
                if i % AGAIN_EVERY == 0 && i >= AGAIN_BACK {
                    // Dropped, refaulted as zeros, dropped again: zeros again.
                    drop_and_refault((i - AGAIN_BACK) * CELL, "remover after the second drop");
                    discards += 1;
                }
                end.wait();
            }
            discards
        })
    });

    // Afterwards: balloons zero, everything else the source.
    for p in 0..pages {
        note(
            &errors,
            check_page(&f.m, &f.want, p, p % CELL < BALLOON, "final check"),
        );
    }
    let st = f.session.stats();
    let io = f.session.uffd_stats();
    eprintln!(
        "balloon race ({workers} workers): drops {discards}, faults {}, EAGAIN {} (fd {}), \
         deferred {}, present refaults {} (EEXIST {}), zero pages {}",
        st.faults, st.eagain, io.eagain, st.deferred, st.present_refaults, st.eexist, st.zero_pages
    );
    let errors = errors.lock().expect("errors");
    assert!(
        errors.is_empty(),
        "{} wrong pages, first: {:#?}\n{st:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        st.events_remove, discards,
        "one REMOVE per madvise, each counted: {st:?}"
    );
    assert_eq!(
        st.faults + st.events_remove,
        io.events,
        "every message is a fault or a REMOVE"
    );
    // The only UFFDIO_WAKE the server issues follows a REMOVE that zapped a page while it was
    // being resolved (see faultline::state): never more than one per REMOVE.
    assert_eq!(io.wake, st.wake, "{io:?}");
    assert!(st.wake <= st.events_remove, "{st:?}");
    if workers == 1 {
        assert_eq!(st.wake, 0, "one worker cannot race itself: {st:?}");
    }
    assert_eq!(
        (st.copy, st.zeropage),
        (io.copy, io.zeropage),
        "{st:?} {io:?}"
    );
    // EAGAIN: failures without progress are counted by both; the fd also counts partial progress.
    assert!(st.eagain <= io.eagain, "{st:?} {io:?}");
    assert!(
        st.deferred >= st.eagain,
        "every EAGAIN defers its run: {st:?}"
    );
    assert_eq!((st.source_errors, st.poisoned_pages), (0, 0));
    // Each drop's pages were resolved again, as zeros (the source has no zero page).
    assert!(st.zero_pages >= discards * BALLOON as u64, "{st:?}");
    assert!(
        st.pages >= (pages + BALLOON * usize::try_from(discards).expect("fits usize")) as u64,
        "{st:?}"
    );
    f.server.shutdown();
}

/// One worker reads a REMOVE and applies it before it reads the next message, so the refault
/// that follows the zap always meets the updated page states.
#[test]
fn dropped_pages_read_zero_while_neighbours_fault() {
    balloon_race(1, 21);
}

#[test]
fn dropped_pages_read_zero_while_neighbours_fault_two_workers() {
    balloon_race(2, 22);
}

/// 64 disjoint stretches of 1 to 7 pages, 32 pages apart: (first page, pages).
fn stretches() -> Vec<(usize, usize)> {
    (0..64)
        .map(|k| (k * 32 + (k * 7) % 16, 1 + k % 7))
        .collect()
}

#[test]
fn pages_dropped_before_their_first_touch_read_zero_inside_readahead_windows() {
    let pages = 64 * 32;
    let config = ServerConfig {
        workers: 1,
        ..ServerConfig::default()
    };
    let f = serve(pages, 23, config, SessionOptions::default());
    let drops = stretches();
    let dropped = |p: usize| drops.iter().any(|&(a, n)| p >= a && p < a + n);
    let (m, want, d) = (Arc::clone(&f.m), Arc::clone(&f.want), drops.clone());
    within(LIMIT, move || {
        for &(a, n) in &d {
            m.discard(a * PAGE_SIZE, n * PAGE_SIZE)
                .expect("MADV_DONTNEED");
        }
        // One sequential pass: adaptive readahead windows span the dropped stretches.
        for p in 0..pages {
            let zero = d.iter().any(|&(a, n)| p >= a && p < a + n);
            check_page(&m, &want, p, zero, "sequential pass").expect("page");
        }
    });
    // Counters are complete once the last page is published present (they are added first).
    assert!(
        f.session.wait_all_present(LIMIT),
        "pages missing after the pass"
    );
    let st = f.session.stats();
    let io = f.session.uffd_stats();
    let dropped_pages = (0..pages).filter(|&p| dropped(p)).count() as u64;
    assert_eq!(st.events_remove, drops.len() as u64, "{st:?}");
    assert_eq!(st.faults + st.events_remove, io.events, "{st:?} {io:?}");
    assert!(
        st.readahead_pages > 0,
        "readahead windows were used: {st:?}"
    );
    assert_eq!(
        st.zero_pages, dropped_pages,
        "exactly the dropped pages served as zeros: {st:?}"
    );
    assert_eq!(st.pages, pages as u64, "{st:?}");
    assert_eq!(io.wake, 0);
    f.server.shutdown();
}

/// Drop stretches while the background fill runs: some were filled already, some are in flight,
/// some not reached yet. All must read zero once `madvise` returned.
fn fill_racing_drops(workers: usize, seed: u64) {
    let pages = 64 * 32;
    let config = ServerConfig {
        workers,
        ..ServerConfig::default()
    };
    let options = SessionOptions {
        background_fill: true,
        ..SessionOptions::default()
    };
    let f = serve(pages, seed, config, options);
    let drops = stretches();
    let dropped = |p: usize| drops.iter().any(|&(a, n)| p >= a && p < a + n);
    let (m, want, d) = (Arc::clone(&f.m), Arc::clone(&f.want), drops.clone());
    let errors = within(LIMIT, move || {
        let mut errors = Vec::new();
        for &(a, n) in &d {
            m.discard(a * PAGE_SIZE, n * PAGE_SIZE)
                .expect("MADV_DONTNEED");
            for p in a..a + n {
                if let Err(e) = check_page(&m, &want, p, true, "right after the drop") {
                    errors.push(e);
                }
            }
        }
        errors
    });
    assert!(
        errors.is_empty(),
        "{} wrong pages, first: {:#?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for p in 0..pages {
        check_page(&f.m, &f.want, p, dropped(p), "final check").expect("page");
    }
    let st = f.session.stats();
    assert_eq!(st.events_remove, drops.len() as u64, "{st:?}");
    assert!(st.fill_pages > 0, "{st:?}");
    f.server.shutdown();
}

#[test]
fn background_fill_racing_drops_leaves_dropped_pages_zero() {
    fill_racing_drops(1, 24);
}

#[test]
fn background_fill_racing_drops_leaves_dropped_pages_zero_two_workers() {
    fill_racing_drops(2, 25);
}

/// A client whose userfaultfd lacks `EVENT_REMOVE` zaps pages the server made present
/// (`MADV_DONTNEED`): no event tells the server, the pages simply fault again. Private memory
/// reads zeros after a zap, so they are served zeros — never the source's older bytes — and the
/// pages around them keep their bytes.
#[test]
fn a_page_zapped_without_a_remove_event_reads_zero_when_touched_again() {
    let pages = 64;
    let (zap, n) = (8, 16);
    let config = ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    };
    let f = serve_with(
        Features::empty(),
        pages,
        31,
        config,
        SessionOptions::default(),
    );
    let (m, want) = (Arc::clone(&f.m), Arc::clone(&f.want));
    let errors = within(LIMIT, move || {
        let mut errors = Vec::new();
        for p in 0..pages {
            errors.extend(check_page(&m, &want, p, false, "first touch").err());
        }
        m.discard(zap * PAGE_SIZE, n * PAGE_SIZE)
            .expect("MADV_DONTNEED");
        for p in 0..pages {
            let zapped = (zap..zap + n).contains(&p);
            errors.extend(check_page(&m, &want, p, zapped, "after the zap").err());
        }
        errors
    });
    assert!(errors.is_empty(), "{errors:#?}");
    let st = f.session.stats();
    assert_eq!(st.events_remove, 0, "{st:?}");
    assert!(
        st.present_refaults >= n as u64,
        "every zapped page faulted again: {st:?}"
    );
    f.server.shutdown();
}

/// A handler serves pages, marking them in its served log, and dies; the client then zaps some
/// of them with no handler to see it (as if the dead one had read the REMOVE and never passed it
/// on). A successor given the same log serves those pages zeros when they fault again, and
/// serves the pages nobody touched yet their source bytes.
#[test]
fn a_successor_serves_zeros_for_pages_zapped_after_its_predecessor_served_them() {
    let pages = 96;
    let (touched, zap, n) = (64, 8, 16);
    let want = content(pages, 41);
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let uffd = Uffd::new(Features::empty()).expect("userfaultfd");
    let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let keep = uffd.try_clone_fd().expect("dup");
    let log = faultline::ServedLog::memfd().expect("memfd");
    let successor_log = faultline::ServedLog::new(log.file().try_clone().expect("dup"));

    let first = Server::start(ServerConfig::default()).expect("server");
    let options = SessionOptions {
        served_log: Some(log),
        readahead: Some(Readahead::Off),
        ..SessionOptions::default()
    };
    let _s = first
        .add_session(uffd, vec![Region::for_mapping(&m, source.clone())], options)
        .expect("session");
    let (m1, w1) = (Arc::clone(&m), Arc::clone(&want));
    let errors = within(LIMIT, move || {
        (0..touched)
            .filter_map(|p| check_page(&m1, &w1, p, false, "first handler").err())
            .collect::<Vec<_>>()
    });
    assert!(errors.is_empty(), "{errors:#?}");
    first.shutdown();
    m.discard(zap * PAGE_SIZE, n * PAGE_SIZE)
        .expect("MADV_DONTNEED");

    let second = Server::start(ServerConfig::default()).expect("server");
    let options = SessionOptions {
        served_log: Some(successor_log),
        resume: true,
        ..SessionOptions::default()
    };
    let uffd = Uffd::from_received_fd(keep).expect("the userfaultfd again");
    let s = second
        .add_session(uffd, vec![Region::for_mapping(&m, source)], options)
        .expect("resumed session");
    let (m2, w2) = (Arc::clone(&m), Arc::clone(&want));
    let errors = within(LIMIT, move || {
        (0..pages)
            .filter_map(|p| {
                let zapped = (zap..zap + n).contains(&p);
                check_page(&m2, &w2, p, zapped, "successor").err()
            })
            .collect::<Vec<_>>()
    });
    assert!(errors.is_empty(), "{errors:#?}");
    // Counters are complete once every page is published present (they are added first).
    assert!(s.wait_all_present(LIMIT));
    let st = s.stats();
    assert_eq!(st.events_remove, 0, "{st:?}");
    assert!(
        st.zero_pages >= n as u64,
        "the zapped pages served as zeros: {st:?}"
    );
    second.shutdown();
}

/// A REMOVE read while a resolve of the same page is between its source read and its ioctl: the
/// kernel lets `madvise` zap as soon as the event is read, so a COPY issued after that would put
/// the old bytes back for good, after `madvise` returned. The resolve re-checks the page under the
/// install lock and serves zeros; the reader of the REMOVE did not wait for the slow read.
#[test]
fn a_remove_read_during_a_slow_source_read_never_brings_old_bytes_back() {
    let pages = 16;
    let page = 5;
    let want = content(pages, 51);
    let slow = Duration::from_millis(300);
    let source = Arc::new(
        FailureInjecting::new(MemorySource::new(want.as_ref().clone())).with_rule(
            Failure::HangAt {
                offset: (page * PAGE_SIZE) as u64,
                delay: slow,
            },
        ),
    );
    let (server, session, m) = serve_source(
        Features::EVENT_REMOVE,
        pages,
        source.clone(),
        two_workers_no_readahead(),
        SessionOptions::default(),
    );
    // A thread faults the page: a worker claims it and sits in the slow source read.
    let m1 = Arc::clone(&m);
    let first = std::thread::spawn(move || {
        let mut got = vec![0u8; PAGE_SIZE];
        m1.read(page * PAGE_SIZE, &mut got).expect("read");
        got
    });
    wait_for_a_slow_read(&source);
    // The client drops the page meanwhile; the other worker reads the REMOVE at once.
    let t = std::time::Instant::now();
    m.discard(page * PAGE_SIZE, PAGE_SIZE)
        .expect("MADV_DONTNEED");
    assert!(
        t.elapsed() < slow / 2,
        "madvise waited for the slow source read ({:?})",
        t.elapsed()
    );
    let (m2, w2) = (Arc::clone(&m), Arc::clone(&want));
    let after = within(LIMIT, move || {
        check_page(&m2, &w2, page, true, "read after madvise returned")
    });
    assert_eq!(after, Ok(()));
    let got = first.join().expect("the first reader");
    assert!(
        got.iter().all(|&b| b == 0) || got[..] == want[page * PAGE_SIZE..(page + 1) * PAGE_SIZE],
        "the racing read got neither the old bytes nor zeros"
    );
    let st = session.stats();
    assert_eq!(st.events_remove, 1, "{st:?}");
    assert_eq!(st.removed_in_flight, 1, "one run planned again: {st:?}");
    server.shutdown();
}

/// The source fails for good on a page while the client drops that page: the page needs none of
/// the source's bytes any more (it reads zeros), so it is served zeros, not poisoned.
#[test]
fn a_page_removed_while_its_source_read_fails_reads_zero_not_sigbus() {
    let pages = 16;
    let page = 9;
    let want = content(pages, 61);
    let source = Arc::new(
        FailureInjecting::new(MemorySource::new(want.as_ref().clone()))
            .with_rule(Failure::Slow(Duration::from_millis(300)))
            .with_rule(Failure::PermanentAt {
                offset: (page * PAGE_SIZE) as u64,
            }),
    );
    let (server, session, m) = serve_source(
        Features::EVENT_REMOVE,
        pages,
        source.clone(),
        two_workers_no_readahead(),
        SessionOptions::default(),
    );
    // Without the fix this read gets SIGBUS (the page poisoned) and the test process dies.
    let (m1, w1) = (Arc::clone(&m), Arc::clone(&want));
    let first = std::thread::spawn(move || check_page(&m1, &w1, page, true, "the racing read"));
    wait_for_a_slow_read(&source);
    m.discard(page * PAGE_SIZE, PAGE_SIZE)
        .expect("MADV_DONTNEED");
    let (m2, w2) = (Arc::clone(&m), Arc::clone(&want));
    let after = within(LIMIT, move || {
        check_page(&m2, &w2, page, true, "after the drop")
    });
    assert_eq!(after, Ok(()));
    assert_eq!(first.join().expect("the racing read"), Ok(()));
    let st = session.stats();
    assert!(st.source_errors >= 1, "the source failed: {st:?}");
    assert_eq!(st.poisoned_pages, 0, "{st:?}");
    assert_eq!(st.removed_in_flight, 1, "one run planned again: {st:?}");
    server.shutdown();
}
