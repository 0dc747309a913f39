//! Balloon semantics: pages the client drops with `MADV_DONTNEED` (a `UFFD_EVENT_REMOVE`) read
//! as zeros when touched again, never as the source's old bytes, while pages nobody dropped keep
//! their source bytes — even when the drop races with faults on the pages next to it.
//!
//! The races exercised: while a REMOVE is queued and unread, every resolve ioctl fails with
//! EAGAIN (the server must defer and retry, not drop the fault); `madvise` sleeps until the REMOVE
//! is read and zaps the pages only then, so a removed page can be refaulted right after the event
//! was read; and a removed page that was never touched must still come back as zeros.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use faultline::source::MemorySource;
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
    let want = content(pages, seed);
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let uffd = Uffd::new(Features::EVENT_REMOVE).expect("userfaultfd with EVENT_REMOVE");
    let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(config).expect("server");
    let session = server
        .add_session(uffd, vec![Region::for_mapping(&m, source)], options)
        .expect("session");
    Fixture {
        server,
        session,
        m,
        want,
    }
}

/// Read page `p` whole; panics naming the page if it is not `expected` (the source, or zeros).
fn check_page(m: &Mapping, want: &[u8], p: usize, zero: bool, who: &str) {
    let mut got = vec![0u8; PAGE_SIZE];
    m.read(p * PAGE_SIZE, &mut got).expect("read");
    if zero {
        assert!(
            got.iter().all(|&b| b == 0),
            "{who}: removed page {p} is not zero"
        );
    } else {
        assert!(
            got[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            "{who}: page {p} wrong bytes"
        );
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

#[test]
fn discard_races_neighbour_faults_removed_pages_read_zero() {
    let pages = ITERATIONS * CELL;
    let config = ServerConfig {
        workers: 2,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let f = serve(pages, 21, config, SessionOptions::default());
    let (m, want) = (Arc::clone(&f.m), Arc::clone(&f.want));
    let discards = within(LIMIT, move || {
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
                            check_page(m, want, p, false, "toucher");
                        }
                        end.wait();
                    }
                });
            }
            let mut discards = 0u64;
            for i in 0..ITERATIONS {
                let balloon = i * CELL;
                // Served first (source bytes), so the drop really zaps pages.
                for p in balloon..balloon + BALLOON {
                    check_page(&m, &want, p, false, "remover before the drop");
                }
                start.wait();
                m.discard(balloon * PAGE_SIZE, BALLOON * PAGE_SIZE)
                    .expect("MADV_DONTNEED");
                discards += 1;
                for p in balloon..balloon + BALLOON {
                    check_page(&m, &want, p, true, "remover after the drop");
                }
                if i % AGAIN_EVERY == 0 && i >= AGAIN_BACK {
                    // A page dropped, refaulted as zero, dropped again: zero again.
                    let old = (i - AGAIN_BACK) * CELL;
                    m.discard(old * PAGE_SIZE, BALLOON * PAGE_SIZE)
                        .expect("MADV_DONTNEED");
                    discards += 1;
                    for p in old..old + BALLOON {
                        check_page(&m, &want, p, true, "remover after the second drop");
                    }
                }
                end.wait();
            }
            discards
        })
    });

    // Afterwards: balloons zero, everything else the source.
    for p in 0..pages {
        check_page(&f.m, &f.want, p, p % CELL < BALLOON, "final check");
    }
    let st = f.session.stats();
    let io = f.session.uffd_stats();
    eprintln!(
        "remove: discards {discards} faults {} eagain {} (fd {}) deferred {} refaults {} zero pages {}",
        st.faults, st.eagain, io.eagain, st.deferred, st.present_refaults, st.zero_pages
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
    assert_eq!((io.wake, st.wake), (0, 0), "{io:?}");
    assert_eq!(
        (st.copy, st.zeropage),
        (io.copy, io.zeropage),
        "{st:?} {io:?}"
    );
    // EAGAIN: whole failures are counted by both; the fd also counts partial progress.
    assert!(st.eagain <= io.eagain, "{st:?} {io:?}");
    assert!(
        st.deferred >= st.eagain,
        "every EAGAIN defers its run: {st:?}"
    );
    assert_eq!((st.source_errors, st.poisoned_pages), (0, 0));
    // Every refault of a dropped page was resolved as zeros (at least once per drop per page).
    assert!(st.zero_pages >= discards * BALLOON as u64, "{st:?}");
    // First touches: every page once, plus the zero re-resolves; never fewer.
    assert!(
        st.pages >= (pages + BALLOON * discards as usize) as u64,
        "{st:?}"
    );
    f.server.shutdown();
}

#[test]
fn pages_dropped_before_their_first_touch_read_zero_with_readahead_and_fill() {
    let pages = 2048;
    let config = ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    };
    let options = SessionOptions {
        background_fill: true,
        ..SessionOptions::default()
    };
    let f = serve(pages, 22, config, options);
    // Drop stretches all over the region while the fill runs: some were filled already, some are
    // in flight, some not reached yet. All must read zero afterwards.
    let dropped: Vec<(usize, usize)> = (0..64)
        .map(|k| ((k * 131) % (pages - 8), 1 + k % 7))
        .collect();
    let is_dropped = |p: usize| dropped.iter().any(|&(a, n)| p >= a && p < a + n);
    let (m, want, drops) = (Arc::clone(&f.m), Arc::clone(&f.want), dropped.clone());
    within(LIMIT, move || {
        std::thread::scope(|s| {
            // A toucher faulting in order, racing both the fill and the drops.
            let (m2, want2) = (&m, &want);
            let dropped = &drops;
            s.spawn(move || {
                for p in (0..pages).step_by(3) {
                    let mut got = vec![0u8; PAGE_SIZE];
                    m2.read(p * PAGE_SIZE, &mut got).expect("read");
                    let src = &want2[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
                    // A page not dropped is the source; a dropped one is the source if read
                    // before its drop, zeros after.
                    let may_be_zero = dropped.iter().any(|&(a, n)| p >= a && p < a + n);
                    assert!(
                        got[..] == src[..] || (may_be_zero && got.iter().all(|&b| b == 0)),
                        "toucher: page {p} is neither its source nor a dropped zero page"
                    );
                }
            });
            for &(a, n) in dropped.iter() {
                m.discard(a * PAGE_SIZE, n * PAGE_SIZE)
                    .expect("MADV_DONTNEED");
                for p in a..a + n {
                    check_page(&m, &want, p, true, "right after the drop");
                }
            }
        });
    });
    for p in 0..pages {
        check_page(&f.m, &f.want, p, is_dropped(p), "final check");
    }
    let st = f.session.stats();
    let io = f.session.uffd_stats();
    assert_eq!(st.events_remove, dropped.len() as u64, "{st:?}");
    assert_eq!(st.faults + st.events_remove, io.events, "{st:?} {io:?}");
    assert_eq!(io.wake, 0);
    assert!(st.deferred >= st.eagain, "{st:?}");
    eprintln!(
        "remove+fill: faults {} fill {} eagain {} deferred {} refaults {}",
        st.faults, st.fill_pages, st.eagain, st.deferred, st.present_refaults
    );
    f.server.shutdown();
}
