//! The remote page server and source over loopback: bytes, batching, priorities, the
//! background stream's bound, dropped connections (cut by the server, server restarted on the
//! same port), a server gone past the deadline, and the fault server serving a mapping from a
//! remote source, every byte verified, including a cut mid-restore.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)] // unwrap is how a test fails

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use faultline::remote::{Exporter, ExporterOptions, RemoteOptions, RemoteSource};
use faultline::source::{Failure, FailureInjecting, MemorySource, PageSource, Retry, SourceError};
use faultline::{Region, Server, ServerConfig, SessionOptions};
use faultline_testing::{fill_pattern, in_child, need_features, within, ChildExit};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};

const PS: u64 = PAGE_SIZE as u64;
/// Safety net for every wait (a lost answer fails the test instead of hanging it).
const LIMIT: Duration = Duration::from_secs(10);

/// `pages` pages of patterns, every fifth page zero, then `tail` more bytes.
fn content(pages: usize, tail: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE + tail];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if p % 5 != 0 {
            fill_pattern(0x7e57, p as u64, chunk);
        }
    }
    v
}

fn options() -> RemoteOptions {
    RemoteOptions {
        read_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(20),
        reconnect_min: Duration::from_millis(2),
        reconnect_max: Duration::from_millis(50),
        ..RemoteOptions::default()
    }
}

fn serve(bytes: &[u8]) -> Exporter {
    Exporter::bind("127.0.0.1:0", Arc::new(MemorySource::new(bytes.to_vec())))
        .expect("binding a loopback port")
}

/// A server that does not scan its source for duplicates (the tests that count or gate the
/// source's reads see only the reads that answer requests).
fn serve_unscanned(source: Arc<dyn PageSource>) -> Exporter {
    let options = ExporterOptions {
        dedup: false,
        ..ExporterOptions::default()
    };
    Exporter::start(TcpListener::bind("127.0.0.1:0").unwrap(), source, options).unwrap()
}

fn connect(server: &Exporter, opts: RemoteOptions) -> RemoteSource {
    RemoteSource::connect(&server.local_addr().to_string(), opts).expect("connecting")
}

/// Read `len` bytes at `off` and compare with `want`.
fn check(src: &dyn PageSource, want: &[u8], off: usize, len: usize) -> Result<(), SourceError> {
    let mut buf = vec![0xa5u8; len];
    src.read_at(off as u64, &mut buf)?;
    assert!(
        buf == want[off..off + len],
        "bytes {off:#x}+{len:#x} differ from the source"
    );
    Ok(())
}

/// Read like the fault server does: retry retryable errors (bounded), fail on permanent ones.
fn read_retrying(src: &RemoteSource, want: &[u8], off: usize, len: usize) {
    let end = Instant::now() + LIMIT;
    loop {
        match check(src, want, off, len) {
            Ok(()) => return,
            Err(e) if e.is_retryable() && Instant::now() < end => continue,
            Err(e) => panic!("read {off:#x}+{len:#x}: {e}"),
        }
    }
}

/// A source whose reads wait while its gate is closed, and which logs every read's offset and
/// announces it on a channel.
#[derive(Debug)]
struct Gated {
    inner: MemorySource,
    closed: Mutex<bool>,
    opened: Condvar,
    log: Mutex<Vec<u64>>,
    started: Sender<u64>,
}

impl Gated {
    fn new(bytes: Vec<u8>) -> (Arc<Gated>, Receiver<u64>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let g = Gated {
            inner: MemorySource::new(bytes),
            closed: Mutex::new(true),
            opened: Condvar::new(),
            log: Mutex::new(Vec::new()),
            started: tx,
        };
        (Arc::new(g), rx)
    }
    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }
    fn log(&self) -> Vec<u64> {
        self.log.lock().unwrap().clone()
    }
}

impl PageSource for Gated {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> String {
        "gated".into()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.log.lock().unwrap().push(offset);
        let _ = self.started.send(offset);
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.read_at(offset, buf)
    }
}

fn recv(rx: &Receiver<u64>) -> u64 {
    rx.recv_timeout(LIMIT)
        .expect("a source read within the limit")
}

#[test]
fn read_at_returns_the_bytes() {
    let want = content(40, 100);
    let server = serve(&want);
    let src = connect(&server, options());
    assert_eq!(src.len(), want.len() as u64);
    assert_eq!(src.welcome().page_size, 4096);
    // Whole pages, zero pages, an unaligned read across pages, the short last page.
    for p in 0..40 {
        check(&src, &want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    check(&src, &want, 3 * PAGE_SIZE + 17, 9000).unwrap();
    // Pages 3 and 5 were read in part: they stay until the rest of them is read (from the
    // cache, without asking again).
    assert!(src.stats().cached_bytes > 0);
    check(&src, &want, 3 * PAGE_SIZE, 17).unwrap();
    check(
        &src,
        &want,
        3 * PAGE_SIZE + 17 + 9000,
        6 * PAGE_SIZE - (3 * PAGE_SIZE + 17 + 9000),
    )
    .unwrap();
    assert_eq!(src.stats().reads_from_cache, 2);
    assert_eq!(src.stats().cached_bytes, 0);
    check(&src, &want, 40 * PAGE_SIZE, 100).unwrap();
    check(&src, &want, 38 * PAGE_SIZE, 2 * PAGE_SIZE + 100).unwrap();
    check(&src, &want, 7, 0).unwrap();
    // Out of range is refused locally, permanently.
    let e = check(&src, &want, want.len() - 10, 11).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent);

    let st = src.stats();
    assert_eq!(st.reads, 45, "{st:?}");
    // Zero pages came as lengths, not bytes: 8 of the first 40 pages, and again in re-reads.
    assert!(st.zero_bytes_received >= 8 * PS, "{st:?}");
    let sent = server.stats();
    assert_eq!(sent.bytes_sent, st.bytes_received);
    assert_eq!(sent.zero_bytes, st.zero_bytes_received);
    assert_eq!(sent.demand_requests, st.demand_requests);
    assert_eq!(sent.background_requests, 0);
    assert_eq!(st.cached_bytes, 0, "every read page was dropped: {st:?}");
}

#[test]
fn server_side_errors_keep_their_class() {
    let want = content(16, 0);
    let failing = FailureInjecting::new(MemorySource::new(want.clone()))
        .with_rule(Failure::RetryableAt {
            offset: 3 * PS,
            times: 1,
        })
        .with_rule(Failure::PermanentAt { offset: 7 * PS });
    let server = serve_unscanned(Arc::new(failing));
    let src = connect(&server, options());
    let e = check(&src, &want, 3 * PAGE_SIZE, PAGE_SIZE).unwrap_err();
    assert_eq!(e.retry, Retry::Retryable, "{e}");
    check(&src, &want, 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
    let e = check(&src, &want, 7 * PAGE_SIZE, PAGE_SIZE).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent, "{e}");
    assert!(e.to_string().contains("the server says"), "{e}");
    // Its neighbours are fine, and the connection survived.
    check(&src, &want, 6 * PAGE_SIZE, PAGE_SIZE).unwrap();
    check(&src, &want, 8 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(server.stats().error_frames, 2);
    assert_eq!(src.stats().reconnects, 0);
}

#[test]
fn concurrent_reads_are_batched_into_few_frames() {
    const THREADS: usize = 8;
    const PER: usize = 32;
    let want = content(THREADS * PER * 2, 0);
    let server = serve(&want);
    let src = connect(
        &server,
        RemoteOptions {
            batch_delay: Duration::from_millis(2),
            ..options()
        },
    );
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (src, want, barrier) = (&src, &want, &barrier);
            s.spawn(move || {
                barrier.wait();
                // Every other page, interleaved with the other threads: no two reads adjacent.
                for i in 0..PER {
                    let p = 2 * (i * THREADS + t);
                    check(src, want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
                }
            });
        }
    });
    let st = src.stats();
    let reads = (THREADS * PER) as u64;
    assert_eq!(st.reads, reads);
    assert_eq!(st.ranges_sent, reads, "one range per read: {st:?}");
    assert!(
        st.demand_requests < reads,
        "{} request frames for {reads} reads: {st:?}",
        st.demand_requests
    );
    assert_eq!(server.stats().demand_requests, st.demand_requests);
    eprintln!(
        "{reads} concurrent reads went out in {} request frames",
        st.demand_requests
    );
}

#[test]
fn demand_is_answered_before_queued_background_requests() {
    let want = content(256, 0);
    let (gated, started) = Gated::new(want.clone());
    let server = serve_unscanned(gated.clone());
    let src = connect(
        &server,
        RemoteOptions {
            stream_chunk: 16 * PS,
            stream_window: 4,
            ..options()
        },
    );
    src.start_stream();
    // The server's writer is stuck in the first background read; three more are queued.
    assert_eq!(recv(&started), 0);
    assert!(server.wait_stats(LIMIT, |s| s.background_requests == 4));
    let last = 255 * PAGE_SIZE;
    std::thread::scope(|s| {
        let reader = s.spawn(|| check(&src, &want, last, PAGE_SIZE));
        assert!(server.wait_stats(LIMIT, |s| s.demand_requests == 1));
        gated.open();
        reader.join().unwrap().unwrap();
    });
    // The stream goes on to the end.
    assert!(src.wait_stats(LIMIT, |s| s.stream_complete));
    // Served in order: the background read that was running, then the demand read, then the
    // background reads that were queued before the demand arrived.
    let log = gated.log();
    assert_eq!(&log[..2], &[0, last as u64], "source reads: {log:x?}");
    assert!(log[2..5] == [16 * PS, 32 * PS, 48 * PS], "{log:x?}");
    assert!(server.stats().demand_overtook >= 1);
    // Everything still reads right, mostly from the cache.
    for p in 0..255 {
        check(&src, &want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    let st = src.stats();
    assert!(st.reads_from_cache >= 250, "{st:?}");
    assert_eq!(st.cached_bytes, 0, "{st:?}");
}

#[test]
fn the_stream_fills_the_cache_ahead_and_stays_within_its_bound() {
    const PAGES: usize = 2048; // 8 MiB
    const CACHE: u64 = 1 << 20;
    let want = content(PAGES, 0);
    let server = serve(&want);
    let src = connect(
        &server,
        RemoteOptions {
            stream: true,
            cache_bytes: CACHE,
            stream_chunk: 128 << 10,
            ..options()
        },
    );
    // The stream stops when the cache is full: at least 3/4 of it, but no more than all of it.
    assert!(src.wait_stats(LIMIT, |s| s.cached_bytes >= CACHE * 3 / 4
        && s.stream_position < want.len() as u64));
    let before = src.stats();
    assert!(before.cached_bytes <= CACHE, "{before:?}");
    assert!(!before.stream_complete);
    // Read everything in order: what was cached is served without asking, the stream follows.
    for p in 0..PAGES {
        check(&src, &want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    let st = src.stats();
    assert!(st.peak_cached_bytes <= CACHE, "{st:?}");
    assert!(
        st.reads_from_cache >= before.cached_bytes / PS,
        "prefetched pages were read from the cache: {st:?}"
    );
    assert!(st.background_requests > 8, "{st:?}");
    assert!(src.wait_stats(LIMIT, |s| s.stream_complete));
    eprintln!(
        "{} of {PAGES} reads from the cache; peak cache {} KiB",
        st.reads_from_cache,
        st.peak_cached_bytes >> 10
    );
}

#[test]
fn a_request_cut_in_flight_is_sent_again_and_answered() {
    let want = content(64, 0);
    let (gated, started) = Gated::new(want.clone());
    let server = serve_unscanned(gated.clone());
    let src = connect(&server, options());
    std::thread::scope(|s| {
        let reader = s.spawn(|| check(&src, &want, 10 * PAGE_SIZE, 3 * PAGE_SIZE));
        // The request reached the server and its answer is being read: cut now.
        assert_eq!(recv(&started), 10 * PS);
        assert_eq!(server.cut_connections(), 1);
        // The client reconnects and asks again; the new connection's read starts too.
        assert!(src.wait_stats(LIMIT, |s| s.reconnects >= 1 && s.resent_requests >= 1));
        assert_eq!(recv(&started), 10 * PS);
        gated.open();
        let r = reader.join().unwrap();
        assert!(
            r.is_ok(),
            "{r:?}: {:?} {:?} log {:x?}",
            src.stats(),
            server.stats(),
            gated.log()
        );
    });
    let st = src.stats();
    assert_eq!((st.disconnects, st.reconnects), (1, 1), "{st:?}");
    assert_eq!(server.stats().connections, 2);
    check(&src, &want, 20 * PAGE_SIZE, PAGE_SIZE).unwrap();
}

#[test]
fn reads_from_many_threads_survive_repeated_cuts() {
    const THREADS: usize = 4;
    const PAGES: usize = 1024;
    let want = content(PAGES, 0);
    let server = serve(&want);
    let src = connect(&server, options());
    let done = AtomicUsize::new(0);
    let halfway = Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (src, want, done, halfway) = (&src, &want, &done, &halfway);
            s.spawn(move || {
                let mine: Vec<usize> = (0..PAGES).filter(|p| p % THREADS == t).collect();
                for (i, &p) in mine.iter().enumerate() {
                    if i == mine.len() / 2 {
                        halfway.wait();
                    }
                    read_retrying(src, want, p * PAGE_SIZE, PAGE_SIZE);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        halfway.wait();
        // Cut while the second halves run, a few times.
        for _ in 0..3 {
            assert!(src.wait_stats(LIMIT, |s| s.connected));
            let seen = src.stats().reconnects;
            server.cut_connections();
            assert!(
                src.wait_stats(LIMIT, |s| s.reconnects > seen),
                "never reconnected: {:?}",
                src.stats()
            );
        }
    });
    assert_eq!(done.load(Ordering::Relaxed), PAGES);
    let st = src.stats();
    assert!(st.disconnects >= 1 && st.reconnects >= 1, "{st:?}");
}

#[test]
fn reads_resume_when_the_server_restarts_on_the_same_port() {
    let want = content(64, 0);
    let server = serve(&want);
    let addr = server.local_addr();
    let src = connect(
        &server,
        RemoteOptions {
            read_timeout: Duration::from_millis(100),
            ..options()
        },
    );
    read_retrying(&src, &want, 0, 8 * PAGE_SIZE);
    server.shutdown();
    // Gone: a read waits, then fails with an error the fault server retries.
    let e = check(&src, &want, 20 * PAGE_SIZE, PAGE_SIZE).unwrap_err();
    assert_eq!(e.retry, Retry::Retryable, "{e}");
    assert!(!src.is_connected());
    // Back on the same port, with the same source.
    let listener = TcpListener::bind(addr).expect("rebinding the same port");
    let again = Exporter::start(
        listener,
        Arc::new(MemorySource::new(want.clone())),
        ExporterOptions::default(),
    )
    .unwrap();
    read_retrying(&src, &want, 20 * PAGE_SIZE, PAGE_SIZE);
    for p in 8..64 {
        read_retrying(&src, &want, p * PAGE_SIZE, PAGE_SIZE);
    }
    let st = src.stats();
    assert_eq!(st.reconnects, 1, "{st:?}");
    assert!(st.retryable_errors >= 1, "{st:?}");
    assert_eq!(st.permanent_errors, 0, "{st:?}");
    assert_eq!(again.stats().connections, 1);
}

#[test]
fn a_server_gone_past_the_deadline_makes_reads_fail_permanently() {
    let want = content(16, 0);
    let server = serve(&want);
    let deadline = Duration::from_millis(300);
    let src = connect(
        &server,
        RemoteOptions {
            read_timeout: Duration::from_millis(40),
            deadline,
            ..options()
        },
    );
    read_retrying(&src, &want, 0, PAGE_SIZE);
    let gone = Instant::now();
    server.shutdown();
    let mut retryable = 0;
    let e = loop {
        match check(&src, &want, 5 * PAGE_SIZE, PAGE_SIZE) {
            Ok(()) => panic!("read from a server that is gone"),
            Err(e) if e.is_retryable() => retryable += 1,
            Err(e) => break e,
        }
        assert!(gone.elapsed() < LIMIT, "never became permanent");
    };
    let after = gone.elapsed();
    assert!(retryable >= 1, "retryable first");
    assert!(
        after >= deadline,
        "permanent after {after:?}, before the deadline"
    );
    assert!(e.to_string().contains("unreachable"), "{e}");
    // And at once from now on.
    let t = Instant::now();
    let e = check(&src, &want, 6 * PAGE_SIZE, PAGE_SIZE).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent);
    assert!(t.elapsed() < Duration::from_millis(30));
}

#[test]
fn a_different_source_behind_the_same_address_is_never_served() {
    let want = content(16, 0);
    let server = serve(&want);
    let addr = server.local_addr();
    let src = connect(
        &server,
        RemoteOptions {
            read_timeout: Duration::from_millis(100),
            ..options()
        },
    );
    read_retrying(&src, &want, 0, PAGE_SIZE);
    server.shutdown();
    // Same length and name, other bytes, another id.
    let other = vec![0x11u8; want.len()];
    let _imposter = Exporter::start(
        TcpListener::bind(addr).expect("rebinding the same port"),
        Arc::new(MemorySource::new(other)),
        ExporterOptions {
            source_id: Some(42),
            ..ExporterOptions::default()
        },
    )
    .unwrap();
    let end = Instant::now() + LIMIT;
    let e = loop {
        match check(&src, &want, PAGE_SIZE, PAGE_SIZE) {
            Ok(()) => panic!("served a page of another source"),
            Err(e) if e.is_retryable() && Instant::now() < end => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(e.retry, Retry::Permanent, "{e}");
    assert!(e.to_string().contains("different source"), "{e}");
}

/// The fault server serving a mapping from a remote source; `mid` runs when half the pages
/// were touched (by every thread).
fn restore_through_the_fault_server(
    want: &[u8],
    opts: RemoteOptions,
    fill: bool,
    mid: impl Fn(&Exporter),
) -> faultline::Stats {
    const THREADS: usize = 2;
    let pages = want.len() / PAGE_SIZE;
    let remote = serve(want);
    let src = Arc::new(connect(&remote, opts));
    let uffd = Uffd::new(Features::empty()).unwrap();
    let m = Mapping::anonymous(pages * PAGE_SIZE).unwrap();
    uffd.register(&m, RegisterMode::MISSING).unwrap();
    let server = Server::start(ServerConfig {
        workers: 2,
        // The remote source's deadline decides when a page is given up.
        source_attempts: u32::MAX,
        ..ServerConfig::default()
    })
    .unwrap();
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(&m, src.clone())],
            SessionOptions {
                background_fill: fill,
                ..SessionOptions::default()
            },
        )
        .unwrap();
    let halfway = Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (m, halfway) = (&m, &halfway);
            s.spawn(move || {
                let mut page = vec![0u8; PAGE_SIZE];
                let mine: Vec<usize> = (0..pages).filter(|p| p % THREADS == t).collect();
                for (i, &p) in mine.iter().enumerate() {
                    if i == mine.len() / 2 {
                        halfway.wait();
                    }
                    m.read(p * PAGE_SIZE, &mut page).unwrap();
                    assert!(
                        page[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                        "page {p} differs"
                    );
                }
            });
        }
        halfway.wait();
        mid(&remote);
    });
    let mut all = vec![0u8; pages * PAGE_SIZE];
    m.read(0, &mut all).unwrap();
    assert!(all == want, "the restored memory differs from the source");
    let st = session.stats();
    assert_eq!(st.poisoned_pages, 0, "{st:?}");
    // Every page resolved exactly once; with background fill the fill may win every page
    // before the touching threads fault, so only an on-demand restore must have faulted.
    assert_eq!(st.pages, pages as u64, "{st:?}");
    assert!(fill || st.faults >= 1, "{st:?}");
    let rs = src.stats();
    eprintln!("fault server: {st:?}\nremote source: {rs:?}");
    server.shutdown();
    st
}

#[test]
fn the_fault_server_restores_a_mapping_from_a_remote_source() {
    within(LIMIT * 2, || {
        restore_through_the_fault_server(&content(2048, 0), options(), false, |_| {});
    });
}

#[test]
fn the_fault_server_restores_across_a_connection_cut() {
    within(LIMIT * 2, || {
        restore_through_the_fault_server(&content(2048, 0), options(), false, |remote| {
            remote.cut_connections();
        });
    });
}

#[test]
fn the_fault_server_restores_from_a_stream_across_a_cut() {
    within(LIMIT * 2, || {
        let opts = RemoteOptions {
            stream: true,
            cache_bytes: 2 << 20,
            ..options()
        };
        restore_through_the_fault_server(&content(2048, 0), opts, true, |remote| {
            remote.cut_connections();
        });
    });
}

#[test]
fn a_remote_gone_past_the_deadline_poisons_the_page() {
    if !need_features("remote poison", Features::POISON) {
        return;
    }
    // A poisoned page kills whoever touches it: run the client in a forked child, which makes
    // its own server, remote source and fault server (the test process's threads are not there).
    let exit = within(LIMIT, || {
        in_child(|| {
            // The child inherited every socket of the tests running in parallel (a listener
            // among them, which would keep its port bound): close them all.
            // SAFETY: close_range has no memory-safety preconditions; the child owns no Rust
            // object that uses those descriptors (it only runs this closure, then `_exit`s).
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            let want = content(64, 0);
            let remote = serve(&want);
            let src = Arc::new(connect(
                &remote,
                RemoteOptions {
                    read_timeout: Duration::from_millis(20),
                    deadline: Duration::from_millis(200),
                    ..options()
                },
            ));
            let uffd = Uffd::new(Features::POISON).unwrap();
            let m = Mapping::anonymous(64 * PAGE_SIZE).unwrap();
            uffd.register(&m, RegisterMode::MISSING).unwrap();
            let server = Server::start(ServerConfig {
                workers: 1,
                readahead: faultline::Readahead::Off,
                source_attempts: u32::MAX,
                retry_backoff: Duration::from_millis(1),
                ..ServerConfig::default()
            })
            .unwrap();
            let _session = server
                .add_session(
                    uffd,
                    vec![Region::for_mapping(&m, src)],
                    SessionOptions::default(),
                )
                .unwrap();
            if m.read_u8(PAGE_SIZE + 1).ok() != Some(want[PAGE_SIZE + 1]) {
                return 1;
            }
            remote.shutdown();
            // Dies of SIGBUS here, once the deadline has passed.
            let _ = m.read_u8(9 * PAGE_SIZE);
            2
        })
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS));
}

/// A raw connection to `server` that says hello speaking only version 1, followed by `then`.
fn hello_v1(server: &Exporter, then: &mut Vec<u8>) -> std::net::TcpStream {
    use faultline::remote::wire::Frame;
    use std::io::Write;
    let mut raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(LIMIT)).unwrap();
    let mut out = Vec::new();
    Frame::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode(&mut out);
    out.append(then);
    raw.write_all(&out).unwrap();
    raw
}

#[test]
fn a_client_that_breaks_the_protocol_is_dropped_and_others_are_served() {
    use faultline::remote::wire::{read_frame, Frame};
    use std::io::{Read, Write};
    let want = content(8, 0);
    let server = serve(&want);
    let mut raw = hello_v1(&server, &mut Vec::new());
    assert!(matches!(
        read_frame(&mut raw, &mut Vec::new()).unwrap(),
        Frame::Welcome(_)
    ));
    // A frame that claims 4 GiB: refused from its header, the connection closed.
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 4]).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing is answered to a bad frame");
    assert!(server.wait_stats(LIMIT, |s| s.live_connections == 0));
    // A client speaking another version is refused with a reason.
    let mut old = std::net::TcpStream::connect(server.local_addr()).unwrap();
    old.set_read_timeout(Some(LIMIT)).unwrap();
    let mut out = Vec::new();
    Frame::Hello {
        min_version: 7,
        max_version: 9,
    }
    .encode(&mut out);
    old.write_all(&out).unwrap();
    match read_frame(&mut old, &mut Vec::new()).unwrap() {
        Frame::Refused { reason } => assert!(reason.contains("version"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Well-behaved clients are still served.
    let src = connect(&server, options());
    check(&src, &want, 0, want.len()).unwrap();
    assert_eq!(server.stats().connections, 2);
}

/// A hand-written server's side of the handshake on `c`: the client's `HELLO` (offering
/// versions up to 2), then a `WELCOME` to `version` for a source of `len` bytes in 4 KiB pages.
fn welcome(c: &mut std::net::TcpStream, version: u16, len: usize, name: &str) {
    use faultline::remote::wire::{read_frame, Frame, Welcome};
    use std::io::Write;
    assert!(matches!(
        read_frame(c, &mut Vec::new()).unwrap(),
        Frame::Hello { max_version: 2, .. }
    ));
    let mut out = Vec::new();
    Frame::Welcome(Welcome {
        version,
        page_size: 4096,
        source_len: len as u64,
        source_id: 5,
        max_ranges: 16,
        max_range_len: 1 << 20,
        name: name.into(),
    })
    .encode(&mut out);
    c.write_all(&out).unwrap();
}

/// A hand-written server of `bytes` speaking `version`, for two connections: to the first
/// read of connection `round` it answers `answer(round, id, range, bytes)`; it keeps the second
/// connection until the client hangs up. Returns its address and thread.
fn fake_server(
    version: u16,
    bytes: Vec<u8>,
    answer: impl Fn(usize, u64, faultline::remote::wire::WireRange, &[u8]) -> faultline::remote::wire::Frame
        + Send
        + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use faultline::remote::wire::{read_frame, Frame};
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        for round in 0..2 {
            let (mut c, _) = listener.accept().unwrap();
            let mut scratch = Vec::new();
            welcome(&mut c, version, bytes.len(), "fake");
            let Frame::Read { id, ranges, .. } = read_frame(&mut c, &mut scratch).unwrap() else {
                panic!("expected a read");
            };
            let mut out = Vec::new();
            answer(round, id, ranges[0], &bytes).encode(&mut out);
            let _ = c.write_all(&out);
            if round == 1 {
                // Keep the connection until the client hangs up.
                let _ = read_frame(&mut c, &mut scratch);
            }
        }
    });
    (addr, fake)
}

/// The right answer to a read of `r`.
fn data_of(
    id: u64,
    r: faultline::remote::wire::WireRange,
    bytes: &[u8],
) -> faultline::remote::wire::Frame {
    let from = usize::try_from(r.offset).expect("fits usize");
    faultline::remote::wire::Frame::Data {
        id,
        offset: r.offset,
        bytes: bytes[from..from + r.len as usize].to_vec(),
    }
}

#[test]
fn an_answer_that_does_not_fit_its_request_ends_the_connection() {
    // Its first connection answers at a wrong offset, its second answers right.
    let want = content(8, 0);
    let (addr, fake) = fake_server(1, want.clone(), |round, id, r, bytes| {
        let mut r = r;
        if round == 0 {
            r.offset += 4096;
        }
        data_of(id, r, bytes)
    });
    let src = RemoteSource::connect(&addr.to_string(), options()).unwrap();
    check(&src, &want, 2 * PAGE_SIZE, PAGE_SIZE).unwrap();
    let st = src.stats();
    assert_eq!(
        (st.disconnects, st.reconnects, st.resent_requests),
        (1, 1, 1),
        "{st:?}"
    );
    drop(src);
    fake.join().unwrap();
}

/// `pages` pages: every fifth zero, every third (not zero) a copy of one of `kinds` contents,
/// the rest unique patterns.
fn with_copies(pages: usize, kinds: u64) -> Vec<u8> {
    let mut v = content(pages, 0);
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if p % 5 != 0 && p % 3 == 0 {
            fill_pattern(0xd0b1e, (p as u64 / 3) % kinds, chunk);
        }
    }
    v
}

/// Pages of `bytes` that are copies (every third page that is not zero).
fn copies(bytes: &[u8]) -> u64 {
    (0..bytes.len() / PAGE_SIZE)
        .filter(|p| p % 5 != 0 && p % 3 == 0)
        .count() as u64
}

#[test]
fn repeated_pages_travel_once_per_connection() {
    const PAGES: usize = 600;
    let want = with_copies(PAGES, 7);
    let server = serve(&want);
    assert!(server.wait_stats(LIMIT, |s| s.dedup_done));
    let scan = server.stats();
    assert_eq!((scan.dedup_slots, scan.dedup_pages), (7, copies(&want)));
    let src = connect(&server, options());
    assert_eq!(src.stats().version, 2);
    // Read in pieces of 16 pages: every byte right.
    for p in (0..PAGES).step_by(16) {
        let n = 16.min(PAGES - p);
        check(&src, &want, p * PAGE_SIZE, n * PAGE_SIZE).unwrap();
    }
    let s = server.stats();
    let dup_bytes = copies(&want) * PS;
    let zero_bytes = PAGES.div_ceil(5) as u64 * PS;
    assert_eq!(s.keep_frames, 7, "{s:?}");
    assert_eq!(s.same_bytes, dup_bytes, "{s:?}");
    assert_eq!(s.zero_bytes, zero_bytes, "{s:?}");
    // Unique pages, and each repeated content once.
    let sent = want.len() as u64 - dup_bytes - zero_bytes + 7 * PS;
    assert_eq!(s.bytes_sent, sent, "{s:?}");
    let c = src.stats();
    assert_eq!(
        (c.bytes_received, c.same_bytes_received, c.kept_pages),
        (sent, dup_bytes, 7),
        "{c:?}"
    );
    assert_eq!(c.kept_bytes, 7 * PS, "kept for the connection: {c:?}");
    // Kept pages live as long as their connection: a new one is sent them again.
    server.cut_connections();
    assert!(src.wait_stats(LIMIT, |s| s.reconnects == 1 && s.connected));
    for p in (0..PAGES).step_by(16) {
        let n = 16.min(PAGES - p);
        read_retrying(&src, &want, p * PAGE_SIZE, n * PAGE_SIZE);
    }
    let s = server.stats();
    assert_eq!(s.keep_frames, 14, "{s:?}");
    assert_eq!(s.same_bytes, 2 * dup_bytes, "{s:?}");
}

#[test]
fn without_the_scan_or_for_a_version_1_client_copies_go_as_data() {
    use faultline::remote::wire::{read_frame, Frame, WireRange};
    let want = with_copies(64, 3);
    // A server that does not scan sends every nonzero page.
    let plain = serve_unscanned(Arc::new(MemorySource::new(want.clone())));
    let src = connect(&plain, options());
    check(&src, &want, 0, want.len()).unwrap();
    let s = plain.stats();
    assert_eq!((s.keep_frames, s.same_frames, s.dedup_slots), (0, 0, 0));
    assert_eq!(s.bytes_sent + s.zero_bytes, want.len() as u64);
    // A scanning server speaks version 1 to a client that only speaks 1: DATA and ZERO only.
    let server = serve(&want);
    assert!(server.wait_stats(LIMIT, |s| s.dedup_done && s.dedup_slots == 3));
    let mut out = Vec::new();
    Frame::Read {
        id: 1,
        priority: faultline::remote::wire::Priority::Demand,
        ranges: vec![WireRange {
            offset: 0,
            len: u32::try_from(want.len()).expect("fits u32"),
        }],
    }
    .encode(&mut out);
    let mut raw = hello_v1(&server, &mut out);
    let mut scratch = Vec::new();
    match read_frame(&mut raw, &mut scratch).unwrap() {
        Frame::Welcome(w) => assert_eq!(w.version, 1),
        other => panic!("expected a welcome, got {other:?}"),
    }
    let mut got = vec![0xa5u8; want.len()];
    let mut at = 0usize;
    while at < want.len() {
        match read_frame(&mut raw, &mut scratch).unwrap() {
            Frame::Data { offset, bytes, .. } => {
                assert_eq!(offset, at as u64);
                got[at..at + bytes.len()].copy_from_slice(&bytes);
                at += bytes.len();
            }
            Frame::Zero { offset, len, .. } => {
                assert_eq!(offset, at as u64);
                got[at..at + len as usize].fill(0);
                at += len as usize;
            }
            other => panic!("a version-1 connection got {other:?}"),
        }
    }
    assert!(got == want, "the answer differs from the source");
    assert_eq!(server.stats().same_frames, 0);
}

#[test]
fn a_same_for_a_slot_never_kept_ends_the_connection() {
    // A version-2 server whose first connection answers with SAME for a slot it never sent,
    // its second with the page's bytes.
    use faultline::remote::wire::Frame;
    let want = content(8, 0);
    let (addr, fake) = fake_server(2, want.clone(), |round, id, r, bytes| {
        if round == 0 {
            Frame::Same {
                id,
                offset: r.offset,
                len: r.len,
                slot: 3,
            }
        } else {
            data_of(id, r, bytes)
        }
    });
    let src = RemoteSource::connect(&addr.to_string(), options()).unwrap();
    check(&src, &want, 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
    let st = src.stats();
    assert_eq!((st.disconnects, st.reconnects), (1, 1), "{st:?}");
    assert_eq!(st.same_bytes_received, 0, "{st:?}");
    drop(src);
    fake.join().unwrap();
}

/// A read a server got: its priority, and its first range's offset and length.
type SeenRead = (faultline::remote::wire::Priority, u64, u32);

/// A server that answers background reads `delay` late and demand reads at once, for one
/// connection; it returns every read it got.
fn slow_background_server(
    bytes: Vec<u8>,
    delay: Duration,
) -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<SeenRead>>) {
    use faultline::remote::wire::{read_frame, Frame, Priority};
    use std::io::Write;
    use std::sync::Mutex;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut scratch = Vec::new();
        welcome(&mut c, 1, bytes.len(), "slow background");
        // Writes from this thread and the late ones share the socket, a frame at a time.
        let writer = Arc::new(Mutex::new(c.try_clone().unwrap()));
        let bytes = Arc::new(bytes);
        let mut seen = Vec::new();
        let mut late = Vec::new();
        while let Ok(Frame::Read {
            id,
            priority,
            ranges,
        }) = read_frame(&mut c, &mut scratch)
        {
            seen.push((priority, ranges[0].offset, ranges[0].len));
            let (w, b) = (Arc::clone(&writer), Arc::clone(&bytes));
            let answer = move || {
                let mut out = Vec::new();
                for r in ranges {
                    data_of(id, r, &b).encode(&mut out);
                }
                let _ = w.lock().unwrap().write_all(&out);
            };
            match priority {
                Priority::Demand => answer(),
                Priority::Background => late.push(std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    answer();
                })),
            }
        }
        for t in late {
            t.join().unwrap();
        }
        seen
    });
    (addr, server)
}

/// A client of `addr` with `opts`, streaming one background request at a time, once the
/// stream has sent its first.
fn streaming(addr: std::net::SocketAddr, opts: RemoteOptions) -> RemoteSource {
    let src = RemoteSource::connect(
        &addr.to_string(),
        RemoteOptions {
            stream: true,
            stream_window: 1,
            ..opts
        },
    )
    .unwrap();
    let start = Instant::now();
    while src.stats().background_requests == 0 {
        assert!(start.elapsed() < LIMIT, "the stream never asked");
        std::thread::sleep(Duration::from_millis(1));
    }
    src
}

#[test]
fn a_read_waits_for_pages_the_stream_asked_for_instead_of_asking_again() {
    use faultline::remote::wire::Priority;
    let want = content(16, 0);
    // Waiting longer than the stream takes; not at all; less than the stream takes (the read
    // waits, then asks).
    for (grace, asks_again) in [
        (LIMIT, false),
        (Duration::ZERO, true),
        (Duration::from_millis(20), true),
    ] {
        let (addr, server) = slow_background_server(want.clone(), Duration::from_millis(150));
        // The stream asks for all 16 pages at once; page 6 is wanted before they arrive.
        let src = streaming(
            addr,
            RemoteOptions {
                stream_chunk: 16 * PS,
                background_grace: grace,
                ..options()
            },
        );
        check(&src, &want, 6 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let st = src.stats();
        assert_eq!(
            st.demand_requests,
            u64::from(asks_again),
            "{grace:?}: {st:?}"
        );
        // The background answer arrives (late); everything else is read from it.
        let start = Instant::now();
        while src.stats().frames_received < 1 + u64::from(asks_again) {
            assert!(start.elapsed() < LIMIT, "the background answer never came");
            std::thread::sleep(Duration::from_millis(1));
        }
        for p in (0..16).filter(|&p| p != 6) {
            check(&src, &want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
        }
        // Page 6 travelled twice only when it was asked for again.
        assert_eq!(src.stats().duplicate_pages, u64::from(asks_again));
        drop(src);
        let seen = server.join().unwrap();
        let demand: Vec<_> = seen
            .iter()
            .filter(|(pri, ..)| *pri == Priority::Demand)
            .collect();
        if asks_again {
            assert_eq!(
                demand,
                [&(
                    Priority::Demand,
                    6 * PS,
                    u32::try_from(PAGE_SIZE).expect("fits u32")
                )],
                "{seen:?}"
            );
        } else {
            assert!(demand.is_empty(), "{seen:?}");
        }
        assert_eq!(
            seen[0],
            (
                Priority::Background,
                0,
                16 * u32::try_from(PAGE_SIZE).expect("fits u32")
            ),
            "{seen:?}"
        );
    }
}

#[test]
fn the_stream_goes_on_where_it_was_as_well_as_where_a_fault_took_it() {
    // Two vCPUs touching memory in order at two places: after a fault far from the stream, the
    // stream serves both places in turn, not only the last one that faulted.
    use faultline::remote::wire::Priority;
    let want = content(64, 0);
    let (addr, server) = slow_background_server(want.clone(), Duration::from_millis(20));
    let src = streaming(
        addr,
        RemoteOptions {
            stream_chunk: 4 * PS,
            cache_bytes: 64 * PS,
            background_grace: LIMIT,
            ..options()
        },
    );
    let start = Instant::now();
    // A fault at page 40, far ahead of the stream (at page 4).
    check(&src, &want, 40 * PAGE_SIZE, PAGE_SIZE).unwrap();
    while src.stats().background_requests < 6 {
        assert!(start.elapsed() < LIMIT, "the stream stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Every page is right, wherever it came from.
    for p in 0..64 {
        check(&src, &want, p * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    drop(src);
    let seen = server.join().unwrap();
    let at = seen
        .iter()
        .position(|r| r.0 == Priority::Demand)
        .expect("the demand read");
    assert_eq!(
        seen[at],
        (
            Priority::Demand,
            40 * PS,
            u32::try_from(PAGE_SIZE).expect("fits u32")
        ),
        "{seen:?}"
    );
    // The stream's next requests: from just after the fault and from where it was, in turn.
    let next: Vec<u64> = seen[at + 1..]
        .iter()
        .filter(|r| r.0 == Priority::Background)
        .take(4)
        .map(|r| r.1 / PS)
        .collect();
    assert!(next.len() == 4, "{seen:?}");
    assert!(next[0] == 41 || next[0] == 4, "{seen:?}");
    let (ahead, behind): (Vec<u64>, Vec<u64>) = next.iter().partition(|&&p| p > 40);
    assert_eq!((ahead.len(), behind.len()), (2, 2), "{seen:?}");
    assert!(ahead.windows(2).all(|w| w[1] == w[0] + 4), "{seen:?}");
    assert!(behind.windows(2).all(|w| w[1] == w[0] + 4), "{seen:?}");
}

/// Blocks of 128 pages: 32 unique, 16 zero, 24 copies of 3 contents, 56 unique.
fn blocks(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n * 128 * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        match p % 128 {
            32..48 => {}
            48..72 => fill_pattern(0xc0b1e5, (p % 3) as u64, chunk),
            _ => fill_pattern(0x5eed, p as u64, chunk),
        }
    }
    v
}

#[test]
fn runs_received_whole_are_lent_and_the_rest_read_out() {
    use faultline::source::Lend;
    let want = blocks(1);
    let server = serve(&want);
    assert!(server.wait_stats(LIMIT, |s| s.dedup_done && s.dedup_slots == 3));
    let src = connect(&server, options());
    let len = want.len() as u64;
    src.wait_ready(0, len).unwrap();
    // Ready: the zero pages are known before anything is read.
    assert_eq!(src.is_zero(32 * PS, 16 * PS), Some(true));
    assert_eq!(src.is_zero(0, PS), None);
    let demands = src.stats().demand_requests;
    let mut got = Vec::new();
    let mut answers = Vec::new();
    let mut buf = vec![0xa5u8; want.len()];
    let mut held = Vec::new();
    while (got.len() as u64) < len {
        let at = got.len() as u64;
        match src
            .read_or_lend(
                at,
                &mut buf[..usize::try_from(len - at).expect("fits usize")],
            )
            .unwrap()
        {
            Lend::Lent(l) => {
                answers.push(("lent", l.bytes().len() / PAGE_SIZE));
                got.extend_from_slice(l.bytes());
                held.push(l);
            }
            Lend::Read(n) => {
                answers.push(("read", n / PAGE_SIZE));
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    assert!(
        got == want,
        "the bytes lent and read differ from the source"
    );
    // The two unique runs are lent whole; the zeros and the copies between them are read out.
    assert_eq!(answers, [("lent", 32), ("read", 40), ("lent", 56)]);
    // Lent bytes stay alive while lent, and are counted; then nothing is cached.
    assert!(src.stats().cached_bytes >= 88 * PS, "{:?}", src.stats());
    drop(held);
    assert_eq!(src.stats().cached_bytes, 0, "{:?}", src.stats());
    // Zero pages stay known zero once read: read again, they are not asked for.
    assert_eq!(src.is_zero(32 * PS, 16 * PS), Some(true));
    check(&src, &want, 32 * PAGE_SIZE, 16 * PAGE_SIZE).unwrap();
    assert_eq!(src.stats().demand_requests, demands);
    // Pages lent were handed over once: read again, they are asked for again.
    check(&src, &want, 0, 2 * PAGE_SIZE).unwrap();
    assert_eq!(src.stats().demand_requests, demands + 1);
}

#[test]
fn zero_runs_of_a_remote_source_are_mapped_not_copied() {
    within(LIMIT * 2, || {
        let want = blocks(16);
        let zero_pages = 16 * 16;
        let st = restore_through_the_fault_server(&want, options(), false, |_| {});
        // Every run of zeros is resolved with UFFDIO_ZEROPAGE but where a resolve's window cut
        // one short (below the shortest run worth a ZEROPAGE, it is copied with its
        // neighbours): before the pages were readied first, none were.
        assert!(st.zeropage >= 1, "{st:?}");
        assert!(st.zero_pages >= zero_pages * 3 / 4, "{st:?}");
        assert!(st.zero_pages <= zero_pages, "{st:?}");
    });
}

/// A client told which source to expect (`expect_source_id`, pinned by a supervisor from the
/// connection its sessions started on) refuses a server announcing another, and serves the one
/// announcing it.
#[test]
fn a_server_announcing_another_source_id_is_refused() {
    let bytes = content(8, 0);
    let server = serve(&bytes);
    let id = server.welcome().source_id;
    let addr = server.local_addr().to_string();
    let refused = RemoteSource::connect(
        &addr,
        RemoteOptions {
            expect_source_id: Some(id ^ 1),
            ..options()
        },
    )
    .expect_err("another source id is refused");
    assert!(
        matches!(refused, faultline::remote::RemoteError::SourceChanged { got, want, .. } if got == id && want == id ^ 1),
        "{refused}"
    );
    assert!(!refused.is_retryable());
    let src = connect(
        &server,
        RemoteOptions {
            expect_source_id: Some(id),
            ..options()
        },
    );
    read_retrying(&src, &bytes, 0, bytes.len());
}
