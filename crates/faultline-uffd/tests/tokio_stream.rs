//! The `tokio` feature: faults served from async tasks while plain threads touch the memory.
#![cfg(feature = "tokio")]

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_testing::{pattern_page, within};
use faultline_uffd::tokio::{AsyncUffd, EventStream};
use faultline_uffd::{
    CopyMode, Event, EventBuffer, Features, Mapping, RegisterMode, ResolveErrorKind, Resolved,
    Uffd, PAGE_SIZE,
};
use futures_core::Stream;

const LIMIT: Duration = Duration::from_secs(20);
const PAGE: u64 = PAGE_SIZE as u64;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Read every page of `region` (the first read of a page faults), checking all its bytes.
fn touch_all(region: &Mapping, seed: u64, pages: impl Iterator<Item = usize>) {
    let mut got = vec![0u8; PAGE_SIZE];
    for page in pages {
        region.read(page * PAGE_SIZE, &mut got).expect("in bounds");
        assert!(
            got == pattern_page(seed, page as u64, PAGE_SIZE),
            "page {page} has wrong bytes"
        );
    }
}

/// COPY the pattern page for a fault; true when this COPY resolved it (false: EEXIST).
fn serve(uffd: &Uffd, base: u64, seed: u64, ev: &Event) -> bool {
    let address = ev.fault_address().expect("only page faults") & !(PAGE - 1);
    let page = (address - base) / PAGE;
    match uffd.copy(
        address,
        &pattern_page(seed, page, PAGE_SIZE),
        CopyMode::empty(),
    ) {
        Ok(Resolved::Complete(n)) if n == PAGE => true,
        Err(e) if e.kind == ResolveErrorKind::AlreadyPresent => false,
        other => panic!("COPY of page {page}: {other:?}"),
    }
}

async fn next_batch(stream: &mut EventStream) -> Vec<Event> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx))
        .await
        .expect("the event stream never ends")
        .expect("read events")
}

/// A task serves every fault from the event stream while a std thread reads 64 pages.
#[test]
fn a_task_serves_faults_from_the_event_stream() {
    within(LIMIT, || {
        const PAGES: usize = 64;
        const SEED: u64 = 3;
        let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
        let region = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();

        let rt = current_thread();
        let (batches, events) = rt.block_on(async {
            let mut stream = EventStream::new(Arc::clone(&uffd), 8).expect("stream");
            let toucher = {
                let region = Arc::clone(&region);
                std::thread::spawn(move || touch_all(&region, SEED, 0..PAGES))
            };
            let (mut resolved, mut batches, mut events) = (0, 0u64, 0u64);
            while resolved < PAGES {
                let batch = next_batch(&mut stream).await;
                assert!(!batch.is_empty(), "a batch holds at least one event");
                batches += 1;
                events += batch.len() as u64;
                for ev in &batch {
                    resolved += usize::from(serve(stream.uffd(), base, SEED, ev));
                }
            }
            toucher.join().expect("toucher");
            (batches, events)
        });

        let st = uffd.stats();
        assert_eq!(st.copy - st.eexist, PAGES as u64);
        assert_eq!(st.copy, events, "one COPY per event");
        assert_eq!((st.reads, st.events), (batches, events));
        // The toucher is done: every page is present with its bytes.
        touch_all(&region, SEED, 0..PAGES);
    });
}

/// Two tasks on a multi-thread runtime await `read_events` on one `AsyncUffd` while two threads
/// touch the same pages in opposite orders: each message goes to one task, no read comes back
/// empty, and each page is resolved once.
#[test]
fn concurrent_readers_share_the_messages() {
    within(LIMIT, || {
        const PAGES: usize = 128;
        const SEED: u64 = 8;
        let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
        let region = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");

        let (resolved, reads, events) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        rt.block_on(async {
            let fd = Arc::new(AsyncUffd::new(Arc::clone(&uffd)).expect("AsyncUffd"));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (fd, resolved, reads, events) = (
                        Arc::clone(&fd),
                        Arc::clone(&resolved),
                        Arc::clone(&reads),
                        Arc::clone(&events),
                    );
                    tokio::spawn(async move {
                        let mut buf = EventBuffer::new(4);
                        loop {
                            let n = fd.read_events(&mut buf).await.expect("read events");
                            assert!(n > 0 && n == buf.len(), "read_events returned {n}");
                            reads.fetch_add(1, Ordering::Relaxed);
                            events.fetch_add(n as u64, Ordering::Relaxed);
                            for ev in buf.events() {
                                if serve(fd.uffd(), base, SEED, ev) {
                                    resolved.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            let touchers: Vec<_> = [false, true]
                .into_iter()
                .map(|reverse| {
                    let region = Arc::clone(&region);
                    std::thread::spawn(move || {
                        if reverse {
                            touch_all(&region, SEED, (0..PAGES).rev());
                        } else {
                            touch_all(&region, SEED, 0..PAGES);
                        }
                    })
                })
                .collect();
            tokio::task::spawn_blocking(move || {
                for t in touchers {
                    t.join().expect("toucher");
                }
            })
            .await
            .expect("join touchers");
            for r in &readers {
                r.abort();
            }
            for r in readers {
                let e = r.await.expect_err("aborted");
                assert!(e.is_cancelled(), "reader task failed: {e}");
            }
        });

        let st = uffd.stats();
        assert_eq!(resolved.load(Ordering::Relaxed), PAGES as u64);
        assert_eq!(st.copy - st.eexist, PAGES as u64);
        assert_eq!(st.reads, reads.load(Ordering::Relaxed));
        assert_eq!(st.events, events.load(Ordering::Relaxed));
        assert_eq!(st.copy, st.events);
    });
}

/// Readiness is set but the queue is empty (the second fault's message was withdrawn when the
/// page was resolved): `read_events` must clear the readiness and wait — on a current-thread
/// runtime a spin would hang the test — and a later fault is still delivered.
#[test]
fn an_empty_read_clears_readiness_and_waits_again() {
    within(LIMIT, || {
        let uffd = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
        let region = Arc::new(Mapping::anonymous(2 * PAGE_SIZE).expect("mmap"));
        uffd.register(&region, RegisterMode::MISSING)
            .expect("register");
        let base = region.addr();
        let touch = |page: usize| {
            let region = Arc::clone(&region);
            std::thread::spawn(move || region.read_u8(page * PAGE_SIZE).expect("in bounds"))
        };

        current_thread().block_on(async {
            let fd = AsyncUffd::new(Arc::clone(&uffd)).expect("AsyncUffd");
            let mut buf = EventBuffer::new(1);
            let first = touch(0);
            assert_eq!(fd.read_events(&mut buf).await.expect("read"), 1);
            assert_eq!(buf.events()[0].fault_address(), Some(base));
            // A second thread faults on the same page; wait (without reading) until its message
            // is queued. The readiness from the first read was never cleared.
            let second = touch(0);
            assert!(
                uffd.poll_readable(Some(LIMIT)).expect("poll"),
                "second fault queued"
            );
            // Resolving wakes both threads; the second one's unread message is withdrawn.
            assert!(serve(&uffd, base, 1, &buf.events()[0]));
            assert_eq!(
                first.join().expect("first"),
                pattern_page(1, 0, PAGE_SIZE)[0]
            );
            assert_eq!(
                second.join().expect("second"),
                pattern_page(1, 0, PAGE_SIZE)[0]
            );

            let waited =
                tokio::time::timeout(Duration::from_millis(100), fd.read_events(&mut buf)).await;
            assert!(
                waited.is_err(),
                "nothing is queued, yet read_events returned {waited:?}"
            );

            // A new fault re-arms the readiness and is delivered.
            let third = touch(1);
            assert_eq!(fd.read_events(&mut buf).await.expect("read"), 1);
            assert_eq!(buf.events()[0].fault_address(), Some(base + PAGE));
            assert!(serve(&uffd, base, 1, &buf.events()[0]));
            assert_eq!(
                third.join().expect("third"),
                pattern_page(1, 1, PAGE_SIZE)[0]
            );
        });
        let st = uffd.stats();
        assert_eq!((st.reads, st.events, st.copy, st.eexist), (2, 2, 2, 0));
    });
}

#[test]
fn a_blocking_fd_or_no_runtime_is_an_error_not_a_panic() {
    let blocking = Arc::new(Uffd::builder().non_blocking(false).create().expect("uffd"));
    let non_blocking = Arc::new(Uffd::new(Features::empty()).expect("uffd"));
    // Outside a runtime.
    let e = AsyncUffd::new(Arc::clone(&non_blocking)).expect_err("no runtime");
    assert_eq!(e.errno(), Some(rustix::io::Errno::NXIO));
    current_thread().block_on(async {
        let e = AsyncUffd::new(blocking).expect_err("blocking fd");
        assert_eq!(e.errno(), Some(rustix::io::Errno::INVAL));
        let fd = AsyncUffd::new(Arc::clone(&non_blocking)).expect("non-blocking fd");
        assert!(Arc::ptr_eq(fd.uffd(), &non_blocking));
        assert!(Arc::ptr_eq(&fd.into_inner(), &non_blocking));
    });
}
