//! Fault storms: many threads fault the same pages at once while one handler resolves them.
//!
//! Every faulting thread queues its own message, so a handler sees duplicates for one page; the
//! first resolve wins and every later one is answered EEXIST (`AlreadyPresent`), which is normal
//! traffic. These tests check that each page is resolved exactly once, that every thread sees the
//! right bytes, and that the ioctl counters of [`Uffd::stats`] agree with what the handler saw —
//! including the DONTWAKE discipline (resolve quietly, then one `UFFDIO_WAKE` per batch).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::Duration;

use faultline_testing::{need_features, pattern_page, serve_batches, within, Flow};
use faultline_uffd::{
    CopyMode, Event, EventBuffer, Features, Mapping, PagefaultFlags, RegisterMode,
    ResolveErrorKind, Resolved, Uffd, PAGE_SIZE,
};

const THREADS: usize = 8;
const LIMIT: Duration = Duration::from_secs(20);
const PAGE: u64 = PAGE_SIZE as u64;

/// How a handler's resolves turned out.
#[derive(Default)]
struct Tally {
    copied: AtomicU64,
    already_present: AtomicU64,
}

impl Tally {
    fn record(&self, r: Result<Resolved, faultline_uffd::ResolveError>) {
        match r {
            Ok(Resolved::Complete(n)) => {
                assert_eq!(n, PAGE);
                self.copied.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind == ResolveErrorKind::AlreadyPresent => {
                self.already_present.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("unexpected resolve outcome {other:?}"),
        }
    }
    fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
    fn already_present(&self) -> u64 {
        self.already_present.load(Ordering::Relaxed)
    }
}

/// Per page: the thread ids of its fault messages and how many of them were writes.
type Seen = HashMap<u64, (Vec<u32>, usize)>;

/// Touch `page` from thread `t` (even threads read, odd threads write the byte it must hold), then
/// check the whole page against the pattern.
fn touch_and_verify(region: &Mapping, seed: u64, page: usize, t: usize) {
    let expect = pattern_page(seed, page as u64, PAGE_SIZE);
    let at = page * PAGE_SIZE + t * 64;
    if t % 2 == 0 {
        assert_eq!(region.read_u8(at).expect("in bounds"), expect[t * 64]);
    } else {
        region.write_u8(at, expect[t * 64]).expect("in bounds");
    }
    let mut got = vec![0u8; PAGE_SIZE];
    region.read(page * PAGE_SIZE, &mut got).expect("in bounds");
    assert!(got == expect, "thread {t} saw wrong bytes on page {page}");
}

/// A handler that waits until all THREADS messages for a page have arrived, then resolves once per
/// message, as a naive handler would: the first COPY succeeds, the other seven are EEXIST. Every
/// message carries a distinct faulting thread id, and the writers' messages carry WRITE.
#[test]
fn every_duplicate_message_after_the_first_resolve_is_already_present() {
    if !need_features("storm naive", Features::THREAD_ID) {
        return;
    }
    within(LIMIT, || {
        const PAGES: usize = 4;
        const SEED: u64 = 11;
        let uffd = Arc::new(Uffd::new(Features::THREAD_ID).expect("uffd"));
        let region = Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap");
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();

        let tally = Arc::new(Tally::default());
        // page -> (thread ids of its messages, number of WRITE messages)
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let server = {
            let (tally, seen) = (Arc::clone(&tally), Arc::clone(&seen));
            serve_batches(Arc::clone(&uffd), 4, move |uffd, batch| {
                for ev in batch.drain(..) {
                    let Event::Pagefault {
                        address,
                        flags,
                        thread_id,
                    } = ev
                    else {
                        panic!("unexpected event {ev:?}");
                    };
                    let page = (address - base) / PAGE;
                    let mut seen = seen.lock().expect("lock");
                    let entry = seen.entry(page).or_default();
                    entry.0.push(thread_id.expect("THREAD_ID negotiated"));
                    entry.1 += usize::from(flags.contains(PagefaultFlags::WRITE));
                    if entry.0.len() == THREADS {
                        let data = pattern_page(SEED, page, PAGE_SIZE);
                        for _ in 0..THREADS {
                            tally.record(uffd.copy(base + page * PAGE, &data, CopyMode::empty()));
                        }
                    }
                }
                Flow::Continue
            })
        };

        let barrier = Barrier::new(THREADS);
        let tids: HashSet<u32> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (region, barrier) = (&region, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        // All threads walk the pages in the same order: all eight block on a page
                        // before it is resolved.
                        for page in 0..PAGES {
                            touch_and_verify(region, SEED, page, t);
                        }
                        rustix::thread::gettid().as_raw_nonzero().get() as u32
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("toucher"))
                .collect()
        });
        server.stop();

        assert_eq!(tids.len(), THREADS);
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), PAGES);
        for (page, (ids, writes)) in seen.iter() {
            let ids: HashSet<u32> = ids.iter().copied().collect();
            assert_eq!(ids, tids, "page {page}: one message per faulting thread");
            assert_eq!(
                *writes,
                THREADS / 2,
                "page {page}: the writers' messages say WRITE"
            );
        }
        let (pages, threads) = (PAGES as u64, THREADS as u64);
        assert_eq!(tally.copied(), pages);
        assert_eq!(tally.already_present(), pages * (threads - 1));
        let st = uffd.stats();
        assert_eq!(st.events, pages * threads);
        assert_eq!(st.copy, pages * threads);
        assert_eq!(st.eexist, pages * (threads - 1));
        assert_eq!(st.copy - st.eexist, pages);
        assert_eq!(st.wake, 0);
    });
}

/// An eager handler resolves every message as it reads it. Eight threads walk 64 pages in
/// rotated orders for three rounds (the pages are dropped between rounds and refault with new
/// content): exactly one COPY per page and round succeeds, the rest are EEXIST, and the counters
/// add up.
#[test]
fn a_storm_on_many_pages_resolves_each_page_exactly_once() {
    within(LIMIT, || {
        const PAGES: usize = 64;
        const ROUNDS: u64 = 3;
        let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
        let region = Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap");
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();

        let seed = Arc::new(AtomicU64::new(0));
        let tally = Arc::new(Tally::default());
        let per_page: Arc<Vec<AtomicU64>> =
            Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
        let server = {
            let (seed, tally, per_page) =
                (Arc::clone(&seed), Arc::clone(&tally), Arc::clone(&per_page));
            serve_batches(Arc::clone(&uffd), 64, move |uffd, batch| {
                for ev in batch.drain(..) {
                    let address = ev.fault_address().expect("only page faults");
                    let page = (address - base) / PAGE;
                    let data = pattern_page(seed.load(Ordering::Acquire), page, PAGE_SIZE);
                    let r = uffd.copy(address, &data, CopyMode::empty());
                    if r.is_ok() {
                        per_page[page as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    tally.record(r);
                }
                Flow::Continue
            })
        };

        for round in 1..=ROUNDS {
            seed.store(round, Ordering::Release);
            let barrier = Barrier::new(THREADS);
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (region, barrier) = (&region, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        // Thread t starts at a different page: pairs of threads collide everywhere.
                        for i in 0..PAGES {
                            let page = (i + t * PAGES / (THREADS / 2)) % PAGES;
                            touch_and_verify(region, round, page, t);
                        }
                    });
                }
            });
            for (page, n) in per_page.iter().enumerate() {
                assert_eq!(
                    n.swap(0, Ordering::Relaxed),
                    1,
                    "round {round}, page {page}"
                );
            }
            assert_eq!(tally.copied(), round * PAGES as u64);
            // Drop every page (no EVENT_REMOVE negotiated: no event); they fault again.
            region.discard(0, region.len()).expect("discard");
        }
        server.stop();

        let st = uffd.stats();
        let resolved = ROUNDS * PAGES as u64;
        assert_eq!(st.copy, tally.copied() + tally.already_present());
        assert_eq!(st.eexist, tally.already_present());
        assert_eq!(st.copy - st.eexist, resolved);
        assert_eq!(st.events, st.copy, "one COPY per message read");
        assert_eq!(st.wake, 0);
        eprintln!(
            "storm: {} messages for {resolved} page resolves ({} duplicates)",
            st.events, st.eexist
        );
    });
}

/// Resolving with DONTWAKE leaves the sleepers asleep; one `UFFDIO_WAKE` releases all of them.
#[test]
fn dontwake_keeps_every_sleeper_asleep_until_the_wake() {
    within(LIMIT, || {
        const SEED: u64 = 5;
        let uffd = Uffd::new(Features::empty()).expect("uffd");
        let region = Mapping::anonymous(PAGE_SIZE).expect("mmap");
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let data = pattern_page(SEED, 0, PAGE_SIZE);
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (region, done_tx) = (&region, done_tx.clone());
                s.spawn(move || {
                    touch_and_verify(region, SEED, 0, t);
                    done_tx.send(t).expect("send");
                });
            }
            // Wait for one message per thread: all eight are asleep on the page.
            let mut buf = EventBuffer::new(THREADS);
            let mut messages = 0;
            while messages < THREADS {
                uffd.poll_readable(None).expect("poll");
                messages += uffd.read_events(&mut buf).expect("read");
                assert!(buf
                    .events()
                    .iter()
                    .all(|e| e.fault_address() == Some(region.addr())));
            }
            let r = uffd.copy(region.addr(), &data, CopyMode::DONTWAKE);
            assert_eq!(r, Ok(Resolved::Complete(PAGE)));
            // The page is present, but nobody may have been woken.
            let mut probe = vec![0u8; PAGE_SIZE];
            region.read(0, &mut probe).expect("read");
            assert!(probe == data);
            assert_eq!(
                done_rx.recv_timeout(Duration::from_millis(100)),
                Err(mpsc::RecvTimeoutError::Timeout),
                "a thread woke without UFFDIO_WAKE"
            );
            uffd.wake(region.addr(), PAGE).expect("wake");
            let woken: HashSet<usize> = (0..THREADS)
                .map(|_| done_rx.recv_timeout(LIMIT).expect("woken"))
                .collect();
            assert_eq!(woken.len(), THREADS);
        });
        let st = uffd.stats();
        assert_eq!((st.copy, st.eexist, st.wake), (1, 0, 1));
        assert_eq!(st.events, THREADS as u64);
    });
}

/// A batching handler: COPY every distinct page of a read with DONTWAKE, then exactly one
/// `UFFDIO_WAKE` over the batch's span. Eight threads storm 32 pages; each page is resolved once,
/// every thread sees the right bytes, and the wake count equals the batch count.
#[test]
fn dontwake_batches_need_exactly_one_wake_each() {
    within(LIMIT, || {
        const PAGES: usize = 32;
        const SEED: u64 = 77;
        let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
        let region = Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap");
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();

        let tally = Arc::new(Tally::default());
        let batches = Arc::new(AtomicU64::new(0));
        let distinct_in_batches = Arc::new(AtomicU64::new(0));
        let server = {
            let (tally, batches, distinct) = (
                Arc::clone(&tally),
                Arc::clone(&batches),
                Arc::clone(&distinct_in_batches),
            );
            serve_batches(Arc::clone(&uffd), 16, move |uffd, batch| {
                let mut pages: Vec<u64> = batch
                    .iter()
                    .map(|e| e.fault_address().expect("only page faults"))
                    .collect();
                pages.sort_unstable();
                pages.dedup();
                for &address in &pages {
                    let data = pattern_page(SEED, (address - base) / PAGE, PAGE_SIZE);
                    tally.record(uffd.copy(address, &data, CopyMode::DONTWAKE));
                }
                distinct.fetch_add(pages.len() as u64, Ordering::Relaxed);
                let (first, last) = (pages[0], pages[pages.len() - 1]);
                uffd.wake(first, last - first + PAGE).expect("wake");
                batches.fetch_add(1, Ordering::Relaxed);
                Flow::Continue
            })
        };

        let barrier = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (region, barrier) = (&region, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..PAGES {
                        // Half the threads walk up, half walk down.
                        let page = if t % 2 == 0 { i } else { PAGES - 1 - i };
                        touch_and_verify(region, SEED, page, t);
                    }
                });
            }
        });
        server.stop();

        let st = uffd.stats();
        let batches = batches.load(Ordering::Relaxed);
        assert!(batches >= 1);
        assert_eq!(st.wake, batches, "one UFFDIO_WAKE per batch");
        assert_eq!(tally.copied(), PAGES as u64);
        assert_eq!(
            st.copy,
            distinct_in_batches.load(Ordering::Relaxed),
            "one COPY per distinct page of a batch"
        );
        assert_eq!(st.copy - st.eexist, PAGES as u64);
        assert_eq!(st.eexist, tally.already_present());
        eprintln!(
            "dontwake storm: {} messages, {batches} batches, {} COPY, {} EEXIST",
            st.events, st.copy, st.eexist
        );
    });
}
