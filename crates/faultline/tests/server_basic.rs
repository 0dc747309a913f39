//! The fault server serves every page of in-process regions with the right bytes.

use std::sync::Arc;
use std::time::Duration;

use faultline::source::{MemorySource, PageSource};
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions};
use faultline_testing::fill_pattern;
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd, PAGE_SIZE};

/// A source of `pages` pattern pages: zero in runs of 16 pages (one run in four), and every
/// seventh page zero on its own.
fn source(pages: usize, seed: u64) -> Arc<MemorySource> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if (p / 16) % 4 != 3 && p % 7 != 0 {
            fill_pattern(seed, p as u64, chunk);
        }
    }
    Arc::new(MemorySource::new(v))
}

fn verify(m: &Mapping, src: &MemorySource, pages: std::ops::Range<usize>) {
    let mut got = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for p in pages {
        m.read(p * PAGE_SIZE, &mut got).expect("read");
        src.read_at((p * PAGE_SIZE) as u64, &mut want)
            .expect("source");
        assert_eq!(got, want, "page {p}");
    }
}

fn serve_and_touch(
    config: ServerConfig,
    threads: usize,
    pages: usize,
) -> (faultline::Stats, faultline_uffd::IoctlStats) {
    let src = source(pages, 7);
    let uffd = Uffd::new(Features::empty()).expect("uffd");
    let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(config).expect("server");
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(&m, src.clone())],
            SessionOptions::default(),
        )
        .expect("session");
    let m2 = Arc::clone(&m);
    let src2 = src.clone();
    faultline_testing::within(Duration::from_secs(60), move || {
        std::thread::scope(|s| {
            for t in 0..threads {
                let (m, src) = (&m2, &src2);
                s.spawn(move || {
                    let per = pages / threads;
                    verify(m, src, t * per..(t + 1) * per);
                });
            }
        });
    });
    verify(&m, &src, 0..pages);
    // Counters are complete once every page is published present (they are added first).
    assert!(session.wait_all_present(Duration::from_secs(10)));
    let st = session.stats();
    let io = session.uffd_stats();
    server.shutdown();
    (st, io)
}

#[test]
fn sequential_touch_with_adaptive_readahead_serves_every_byte() {
    let (st, io) = serve_and_touch(
        ServerConfig {
            workers: 2,
            ..ServerConfig::default()
        },
        4,
        4096,
    );
    assert_eq!(st.pages, 4096, "every page resolved exactly once: {st:?}");
    // Runs of 16 zero pages are ZEROPAGEd (a run cut by a chunk boundary may be copied, one
    // that an isolated zero page extends is mapped whole); other isolated zero pages are copied
    // with their neighbours. Never more than the source holds.
    let zeros = (0..4096u64)
        .filter(|p| (p / 16) % 4 == 3 || p % 7 == 0)
        .count() as u64;
    assert!(
        (768..=zeros).contains(&st.zero_pages),
        "{st:?}, {zeros} in the source"
    );
    assert_eq!(io.wake, 0, "resolves wake their sleepers: no UFFDIO_WAKE");
    assert!(st.faults < 4096, "readahead must save faults: {st:?}");
    assert_eq!(
        st.copy + st.zeropage,
        io.copy + io.zeropage,
        "server counts match the fd's ioctl counts"
    );
}

#[test]
fn no_readahead_one_resolve_per_touched_page() {
    let config = ServerConfig {
        workers: 1,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let (st, io) = serve_and_touch(config, 1, 256);
    assert_eq!(st.pages, 256);
    assert_eq!(st.faults, 256, "{st:?}");
    assert_eq!(io.wake, 0);
    assert_eq!(st.latency_samples, 256);
    assert!(st.latency_p50_ns > 0);
}

/// `pages` pages of shmem registered MISSING | MINOR and served through the page cache (MINOR
/// backing) by two workers; `None` (the test skips, saying why) where the kernel lacks it.
type ShmemServed = (
    Server,
    faultline::SessionHandle,
    Arc<Mapping>,
    Arc<MemorySource>,
);

fn serve_shmem_minor(pages: usize, seed: u64) -> Option<ShmemServed> {
    serve_shmem_minor_with(pages, seed, |_| None)
}

/// [`serve_shmem_minor`] with resolve failures injected (`faults(address of the region)`).
fn serve_shmem_minor_with(
    pages: usize,
    seed: u64,
    faults: impl FnOnce(u64) -> Option<faultline::inject::ResolveFaults>,
) -> Option<ShmemServed> {
    let features = Features::MINOR_SHMEM | Features::MISSING_SHMEM;
    if !faultline_testing::need_features("shmem_minor", features) {
        return None;
    }
    let src = source(pages, seed);
    let uffd = Uffd::new(features).expect("uffd");
    let m = Arc::new(Mapping::new(MemoryKind::Shmem, pages * PAGE_SIZE).expect("memfd"));
    let cache = Arc::new(m.alias().expect("alias"));
    uffd.register(&m, RegisterMode::MISSING | RegisterMode::MINOR)
        .expect("register");
    let server = Server::start(ServerConfig {
        workers: 2,
        inject: faults(m.addr()).map(Arc::new),
        ..ServerConfig::default()
    })
    .expect("server");
    let region =
        Region::for_mapping(&m, src.clone()).with_backing(faultline::Backing::Minor { cache });
    let session = server
        .add_session(uffd, vec![region], SessionOptions::default())
        .expect("session");
    Some((server, session, m, src))
}

#[test]
fn shmem_minor_backing_fills_the_page_cache_then_continues() {
    let pages = 512;
    let Some((server, session, m, src)) = serve_shmem_minor(pages, 9) else {
        return;
    };
    let (m2, src2) = (Arc::clone(&m), src.clone());
    faultline_testing::within(Duration::from_secs(30), move || {
        verify(&m2, &src2, 0..pages)
    });
    // Counters are complete once every page is published present (they are added first).
    assert!(session.wait_all_present(Duration::from_secs(10)));
    let st = session.stats();
    assert_eq!(st.pages, pages as u64);
    assert!(st.continue_ > 0 && st.copy == 0, "{st:?}");
    server.shutdown();
}

/// Shared memory keeps its bytes in the page cache when the client zaps its mapping
/// (`MADV_DONTNEED`): the page faults again (MINOR), and the server maps the page cache's bytes —
/// the client's own writes — instead of writing the source's older bytes over them.
#[test]
fn shmem_page_faulting_again_keeps_the_clients_bytes() {
    let pages = 64;
    let Some((server, session, m, src)) = serve_shmem_minor(pages, 11) else {
        return;
    };
    let (m2, src2) = (Arc::clone(&m), src.clone());
    let mine = vec![0xA5u8; 4 * PAGE_SIZE];
    let got = faultline_testing::within(Duration::from_secs(30), move || {
        verify(&m2, &src2, 0..pages);
        m2.write(8 * PAGE_SIZE, &mine).expect("the client's write");
        m2.discard(8 * PAGE_SIZE, 4 * PAGE_SIZE)
            .expect("MADV_DONTNEED");
        let mut got = vec![0u8; 4 * PAGE_SIZE];
        m2.read(8 * PAGE_SIZE, &mut got).expect("read");
        verify(&m2, &src2, 0..8);
        verify(&m2, &src2, 12..pages);
        got
    });
    assert!(
        got.iter().all(|&b| b == 0xA5),
        "pages 8..12 lost the client's bytes after a zap (first byte {:#x})",
        got[0]
    );
    let st = session.stats();
    assert!(
        st.present_refaults >= 4,
        "the zapped pages faulted again: {st:?}"
    );
    assert_eq!(st.copy, 0, "{st:?}");
    server.shutdown();
}

/// A client that punches a hole in its shared memory (`MADV_REMOVE`, no REMOVE event asked for)
/// dropped those pages' bytes: they read zero, as they would without us. Touched again, they
/// fault (MISSING: the page cache has nothing there) and are served zeros — never the source's
/// older bytes, never SIGBUS — while the pages around them keep the client's writes.
#[test]
fn shmem_pages_punched_out_without_an_event_read_zero_when_touched_again() {
    let pages = 64;
    let Some((server, session, m, src)) = serve_shmem_minor(pages, 13) else {
        return;
    };
    let (m2, src2) = (Arc::clone(&m), src.clone());
    let (holes, kept) = faultline_testing::within(Duration::from_secs(30), move || {
        verify(&m2, &src2, 0..pages);
        // The client writes pages 6..14, then punches 8..12 out of the memfd.
        m2.write(6 * PAGE_SIZE, &vec![0xA5u8; 8 * PAGE_SIZE])
            .expect("the client's write");
        m2.remove(8 * PAGE_SIZE, 4 * PAGE_SIZE)
            .expect("MADV_REMOVE");
        let mut holes = vec![0xFFu8; 4 * PAGE_SIZE];
        m2.read(8 * PAGE_SIZE, &mut holes).expect("read");
        let mut kept = vec![0u8; 8 * PAGE_SIZE];
        m2.read(6 * PAGE_SIZE, &mut kept).expect("read");
        verify(&m2, &src2, 0..6);
        verify(&m2, &src2, 14..pages);
        (holes, kept)
    });
    if let Some(i) = holes.iter().position(|&b| b != 0) {
        panic!(
            "byte {i} of the punched pages 8..12 is {:#x}, not zero",
            holes[i]
        );
    }
    assert!(
        kept[..2 * PAGE_SIZE].iter().all(|&b| b == 0xA5)
            && kept[6 * PAGE_SIZE..].iter().all(|&b| b == 0xA5),
        "pages 6, 7, 12 and 13 lost the client's bytes"
    );
    let st = session.stats();
    assert!(
        st.present_refaults >= 1,
        "the punched pages faulted again: {st:?}"
    );
    assert_eq!(
        (st.poisoned_pages, st.source_errors, st.copy),
        (0, 0, 0),
        "{st:?}"
    );
    server.shutdown();
}

/// The page is punched out again while the server allocates and maps it (here: the kernel's
/// EFAULT for the mapping, injected twice): allocated and mapped again, it reads zero — no
/// poison, no source error blaming a truncated file.
#[test]
fn a_shmem_page_punched_out_again_while_being_mapped_still_reads_zero() {
    let pages = 64;
    let page8 = |base: u64| base + 8 * PAGE_SIZE as u64;
    // The first CONTINUE over page 8 serves it; the next two (the refault's) find no page.
    let Some((server, session, m, src)) = serve_shmem_minor_with(pages, 17, |base| {
        Some(faultline::inject::ResolveFaults::new().fail_at_after(
            faultline_uffd::ResolveOp::Continue,
            page8(base),
            1,
            rustix::io::Errno::FAULT,
            2,
        ))
    }) else {
        return;
    };
    let (m2, src2) = (Arc::clone(&m), src.clone());
    let page = faultline_testing::within(Duration::from_secs(30), move || {
        verify(&m2, &src2, 0..pages);
        m2.remove(8 * PAGE_SIZE, PAGE_SIZE).expect("MADV_REMOVE");
        let mut page = vec![0xFFu8; PAGE_SIZE];
        m2.read(8 * PAGE_SIZE, &mut page).expect("read");
        verify(&m2, &src2, 9..pages);
        page
    });
    assert!(page.iter().all(|&b| b == 0), "page 8 does not read zero");
    let st = session.stats();
    assert_eq!(
        (st.poisoned_pages, st.source_errors, st.copy),
        (0, 0, 0),
        "{st:?}"
    );
    assert!(st.present_refaults >= 1, "{st:?}");
    server.shutdown();
}

#[test]
fn background_fill_makes_everything_present_without_touches() {
    let pages = 2048;
    let src = source(pages, 3);
    let uffd = Uffd::new(Features::empty()).expect("uffd");
    let m = Mapping::anonymous(pages * PAGE_SIZE).expect("mmap");
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(ServerConfig {
        workers: 1,
        ..ServerConfig::default()
    })
    .expect("server");
    let opts = SessionOptions {
        background_fill: true,
        ..SessionOptions::default()
    };
    let session = server
        .add_session(uffd, vec![Region::for_mapping(&m, src.clone())], opts)
        .expect("session");
    assert!(
        session.wait_all_present(Duration::from_secs(30)),
        "background fill did not finish"
    );
    let st = session.stats();
    assert_eq!(st.faults, 0);
    assert_eq!(st.fill_pages, pages as u64);
    verify(&m, &src, 0..pages);
    server.shutdown();
}

#[test]
fn move_backing_serves_a_pread_source_in_process_with_one_copy() {
    if !faultline_testing::need_features("move_backing", Features::MOVE) {
        return;
    }
    let pages = 1024;
    let src = source(pages, 11);
    let mut file = tempfile::NamedTempFile::new().expect("tempfile");
    std::io::Write::write_all(&mut file, src.bytes()).expect("write");
    let fsrc = Arc::new(faultline::source::FileSource::open(file.path()).expect("open"));
    let uffd = Uffd::new(Features::MOVE).expect("uffd");
    assert!(uffd.is_own_process());
    let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let region = Region::for_mapping(&m, fsrc).with_backing(faultline::Backing::Move);
    let session = server
        .add_session(uffd, vec![region], SessionOptions::default())
        .expect("session");
    let (m2, src2) = (Arc::clone(&m), src.clone());
    faultline_testing::within(Duration::from_secs(30), move || {
        verify(&m2, &src2, 0..pages)
    });
    assert!(session.wait_all_present(Duration::from_secs(10)));
    let st = session.stats();
    assert_eq!(st.pages, pages as u64);
    assert!(
        st.move_ > 0 && st.copy == 0,
        "data pages are moved, not copied: {st:?}"
    );
    assert_eq!(session.uffd_stats().move_, st.move_);
    server.shutdown();
}
