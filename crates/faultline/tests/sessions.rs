//! One server, many sessions: several userfaultfds (clients), each with several regions from
//! different sources, served at once by the same workers; a session removed while the others
//! keep faulting; and sessions whose client is another process that hands its userfaultfd over
//! a Unix socket and then exits — the session must end by itself (its pidfd says the client is
//! gone) and leave no file descriptor behind, however many come and go.
#![allow(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use faultline::source::{
    FailureInjecting, FileSource, LayeredSource, MemorySource, MmapSource, PageSource, ZeroSource,
};
use faultline::{Region, Server, ServerConfig, ServerError, SessionHandle, SessionOptions};
use faultline_testing::{
    client_socketpair, fd_count, fill_pattern, recv_uffd, send_uffd, within, ChildExit,
    ChildProcess,
};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd, PAGE_SIZE};

/// Safety net against a lost fault.
const LIMIT: Duration = Duration::from_secs(30);

/// A fork copies every other test's registered ranges and open fds into the child, and the fd
/// count must not see another test's fds: the tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pattern(pages: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        // Every fifth page zero: zero resolves mix with copies.
        if p % 5 != 4 {
            fill_pattern(seed, p as u64, chunk);
        }
    }
    v
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temporary file");
    f.write_all(bytes).expect("write temporary file");
    f.flush().expect("flush");
    f
}

/// A source of kind `k` holding `pages` pages, and the bytes it holds.
fn source(
    k: usize,
    pages: usize,
    seed: u64,
    files: &mut Vec<tempfile::NamedTempFile>,
) -> (Arc<dyn PageSource>, Vec<u8>) {
    let bytes = pattern(pages, seed);
    match k % 6 {
        0 => (Arc::new(MemorySource::new(bytes.clone())), bytes),
        1 => {
            let f = temp_file(&bytes);
            let s = FileSource::open(f.path()).expect("file source");
            files.push(f);
            (Arc::new(s), bytes)
        }
        2 => {
            let f = temp_file(&bytes);
            let s = MmapSource::open(f.path())
                .expect("mmap source")
                .with_zero_scan()
                .expect("zero scan");
            files.push(f);
            (Arc::new(s), bytes)
        }
        3 => (
            Arc::new(ZeroSource::new((pages * PAGE_SIZE) as u64)),
            vec![0; pages * PAGE_SIZE],
        ),
        4 => {
            // A base with every third page overridden by a diff.
            let diff = pattern(pages, seed + 1000);
            let over: Vec<u64> = (0..pages as u64).filter(|p| p % 3 == 0).collect();
            let mut want = bytes.clone();
            for &p in &over {
                let p = usize::try_from(p).expect("fits usize");
                let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
                want[r.clone()].copy_from_slice(&diff[r]);
            }
            let base: Arc<dyn PageSource> = Arc::new(MemorySource::new(bytes));
            let s = LayeredSource::new(base, PAGE_SIZE as u64)
                .and_then(|l| l.with_diff(Arc::new(MemorySource::new(diff)), over))
                .expect("layered source");
            (Arc::new(s), want)
        }
        _ => (
            Arc::new(FailureInjecting::new(MemorySource::new(bytes.clone()))),
            bytes,
        ),
    }
}

/// One in-process client: a userfaultfd with two mappings, each a region from its own source.
struct Client {
    maps: Vec<Arc<Mapping>>,
    want: Vec<Arc<Vec<u8>>>,
    session: SessionHandle,
}

const REGION_PAGES: [usize; 2] = [160, 96];

fn client(server: &Server, i: usize, files: &mut Vec<tempfile::NamedTempFile>) -> Client {
    let uffd = Uffd::new(Features::empty()).expect("userfaultfd");
    let mut maps = Vec::new();
    let mut want = Vec::new();
    let mut regions = Vec::new();
    for (r, &pages) in REGION_PAGES.iter().enumerate() {
        let m = Arc::new(Mapping::anonymous(pages * PAGE_SIZE).expect("mmap"));
        uffd.register(&m, RegisterMode::MISSING).expect("register");
        let (src, bytes) = source(i * 2 + r, pages, (i * 2 + r) as u64, files);
        regions.push(Region::for_mapping(&m, src));
        maps.push(m);
        want.push(Arc::new(bytes));
    }
    let options = SessionOptions {
        label: format!("client-{i}"),
        ..SessionOptions::default()
    };
    let session = server.add_session(uffd, regions, options).expect("session");
    Client {
        maps,
        want,
        session,
    }
}

/// Read pages `pages` of `m` and compare them with `want`.
fn verify(m: &Mapping, want: &[u8], pages: std::ops::Range<usize>, what: &str) {
    let mut got = vec![0u8; PAGE_SIZE];
    for p in pages {
        m.read(p * PAGE_SIZE, &mut got).expect("read");
        assert!(
            got[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            "{what}: page {p} wrong"
        );
    }
}

#[test]
fn four_clients_with_two_regions_each_are_served_at_once() {
    let _serial = serial();
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let mut files = Vec::new();
    let clients: Vec<Client> = (0..4).map(|i| client(&server, i, &mut files)).collect();
    let work: Vec<(Arc<Mapping>, Arc<Vec<u8>>, String)> = clients
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            (0..2).map(move |r| {
                (
                    Arc::clone(&c.maps[r]),
                    Arc::clone(&c.want[r]),
                    format!("client {i} region {r}"),
                )
            })
        })
        .collect();
    within(LIMIT, move || {
        let start = Barrier::new(work.len());
        std::thread::scope(|s| {
            for (m, want, what) in &work {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    verify(m, want, 0..m.len() / PAGE_SIZE, what);
                });
            }
        });
    });
    let total: usize = REGION_PAGES.iter().sum();
    let mut sum = 0;
    for (i, c) in clients.iter().enumerate() {
        assert!(c.session.wait_all_present(LIMIT), "client {i} complete");
        let st = c.session.stats();
        let io = c.session.uffd_stats();
        assert_eq!(
            st.pages, total as u64,
            "client {i}: every page once: {st:?}"
        );
        assert_eq!((st.copy, st.zeropage), (io.copy, io.zeropage), "client {i}");
        assert_eq!(io.wake, 0);
        assert_eq!(c.session.total_pages(), total as u64);
        sum += st.pages;
    }
    // The server's totals are the sum over its sessions.
    assert_eq!(server.stats().pages, sum);
    assert_eq!(server.sessions().len(), 4);
    server.shutdown();
    for c in &clients {
        assert!(c.session.is_closed(), "shutdown ends every session");
    }
}

#[test]
fn removing_one_session_leaves_the_others_serving() {
    let _serial = serial();
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let mut files = Vec::new();
    let mut clients: Vec<Client> = (0..4).map(|i| client(&server, i, &mut files)).collect();
    // Client 0: its first region served, then the session is removed.
    let gone = clients.remove(0);
    let (m0, w0) = (Arc::clone(&gone.maps[0]), Arc::clone(&gone.want[0]));
    within(LIMIT, move || {
        verify(&m0, &w0, 0..REGION_PAGES[0], "client 0 before removal")
    });
    let gone_id = gone.session.id();

    let work: Vec<(Arc<Mapping>, Arc<Vec<u8>>, String)> = clients
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            (0..2).map(move |r| {
                (
                    Arc::clone(&c.maps[r]),
                    Arc::clone(&c.want[r]),
                    format!("client {} region {r}", i + 1),
                )
            })
        })
        .collect();
    let started = Arc::new(Barrier::new(work.len() + 1));
    let started2 = Arc::clone(&started);
    let touchers = std::thread::spawn(move || {
        within(LIMIT, move || {
            std::thread::scope(|s| {
                for (m, want, what) in &work {
                    let started = &started2;
                    s.spawn(move || {
                        let pages = m.len() / PAGE_SIZE;
                        verify(m, want, 0..pages / 2, what);
                        started.wait();
                        verify(m, want, pages / 2..pages, what);
                    });
                }
            });
        })
    });
    // Every other client has faulted half its pages: remove client 0 now.
    started.wait();
    server.remove_session(gone_id).expect("remove");
    assert!(gone.session.is_closed());
    // It ends once no worker is inside it any more (one may be running its readahead).
    assert!(gone.session.wait_closed(Duration::from_secs(10)));
    assert!(
        matches!(server.remove_session(gone_id), Err(ServerError::NoSession(id)) if id == gone_id)
    );
    assert!(server.sessions().iter().all(|s| s.id() != gone_id));
    touchers
        .join()
        .expect("the other clients are served to the end");

    // The removed client keeps what was served; once its userfaultfd is closed (the session held
    // the last fd), its never-served pages are plain anonymous memory: zeros, and no hang.
    let before = gone.session.stats();
    let Client {
        maps,
        want,
        session,
    } = gone;
    drop(session);
    let (m1, m0, w0) = (
        Arc::clone(&maps[1]),
        Arc::clone(&maps[0]),
        Arc::clone(&want[0]),
    );
    within(LIMIT, move || {
        verify(&m0, &w0, 0..REGION_PAGES[0], "client 0 after removal");
        let zeros = vec![0u8; REGION_PAGES[1] * PAGE_SIZE];
        verify(
            &m1,
            &zeros,
            0..REGION_PAGES[1],
            "client 0's unserved region after removal",
        );
    });
    assert_eq!(before.pages, REGION_PAGES[0] as u64, "{before:?}");

    let total: usize = REGION_PAGES.iter().sum();
    for c in &clients {
        assert!(c.session.wait_all_present(LIMIT));
        assert_eq!(c.session.stats().pages, total as u64);
    }
    assert_eq!(server.sessions().len(), 3);
    server.shutdown();
}

const CHILD_PAGES: usize = 24;
const CHILD_SESSIONS: usize = 50;

/// The client process: make a userfaultfd and a mapping, hand the fd and the mapping's place to
/// the server over `sock`, touch every page and compare it with `want`. Exit code 0 when all is
/// right; 2..=4 name the step that failed.
fn client_process(sock: std::os::fd::OwnedFd, want: &[u8]) -> i32 {
    let Ok(uffd) = Uffd::new(Features::empty()) else {
        return 2;
    };
    let Ok(m) = Mapping::anonymous(CHILD_PAGES * PAGE_SIZE) else {
        return 2;
    };
    if uffd.register(&m, RegisterMode::MISSING).is_err() {
        return 2;
    }
    if send_uffd(&sock, &uffd, &[m.addr(), m.len() as u64]).is_err() {
        return 3;
    }
    let mut got = vec![0u8; CHILD_PAGES * PAGE_SIZE];
    // Faults here are served by the parent through the fd just sent.
    if m.read(0, &mut got).is_err() || got[..] != want[..] {
        return 4;
    }
    0
}

#[test]
fn client_processes_that_exit_end_their_sessions_without_leaking_fds() {
    let _serial = serial();
    let want = Arc::new(pattern(CHILD_PAGES, 77));
    let source: Arc<dyn PageSource> = Arc::new(MemorySource::new(want.as_ref().clone()));
    let fds_before_server = fd_count().expect("fd count");
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let baseline = fd_count().expect("fd count");

    for k in 0..CHILD_SESSIONS {
        let (ours, theirs) = client_socketpair().expect("socketpair");
        let want2 = Arc::clone(&want);
        let child = ChildProcess::spawn(move || client_process(theirs, &want2));
        let (fd, words) =
            within(LIMIT, move || recv_uffd(&ours)).expect("the client's userfaultfd");
        assert_eq!(words.len(), 2);
        // SAFETY: the fd was just received from our own client process, which created it with
        // `Uffd::new` and registered the mapping it describes; it is a userfaultfd of the
        // child's address space, which holds no Rust references of ours.
        let uffd = unsafe { Uffd::from_initialized_fd(fd, Features::empty()) };
        let region = Region::new(
            words[0],
            words[1],
            MemoryKind::PrivateAnonymous,
            Arc::clone(&source),
            0,
        );
        let options = SessionOptions {
            label: format!("child-{k}"),
            watch: Some(child.pidfd().expect("pidfd_open")),
            ..SessionOptions::default()
        };
        let session = server
            .add_session(uffd, vec![region], options)
            .expect("session");
        let exit = within(LIMIT, move || child.wait());
        assert_eq!(exit, ChildExit::Code(0), "client {k} verified its pages");
        assert!(
            session.wait_closed(LIMIT),
            "client {k}: the session ends when the client exits"
        );
        let st = session.stats();
        assert_eq!(st.pages, CHILD_PAGES as u64, "client {k}: {st:?}");
    }
    assert!(server.sessions().is_empty(), "every client session ended");
    // A worker may hold a closed session for the rest of one loop iteration; poll, bounded.
    let deadline = Instant::now() + LIMIT;
    let mut now = fd_count().expect("fd count");
    while now > baseline && Instant::now() < deadline {
        std::thread::yield_now();
        now = fd_count().expect("fd count");
    }
    assert_eq!(
        now, baseline,
        "fds of ended sessions are closed while the server runs"
    );
    assert_eq!(server.stats().pages, (CHILD_SESSIONS * CHILD_PAGES) as u64);
    server.shutdown();
    assert_eq!(
        fd_count().expect("fd count"),
        fds_before_server,
        "shutdown closes every fd"
    );
}
