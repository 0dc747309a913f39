//! Every fault the server reads ends in the right bytes, a poisoned page (SIGBUS at that page
//! only) or an explicit end of the client — whatever the kernel answers to the resolve, whatever
//! the source does, wherever the client faults.
//!
//! Each test forks a client process that creates its own userfaultfd and memory (as Firecracker
//! does), hands the fd over a socket, and reads its pages in a chosen order, checking every byte;
//! the test process serves it with failures injected under the server's resolve ioctls
//! ([`faultline::inject::ResolveFaults`]) or in the source ([`Failure`]). How the client ends
//! (exit 0 after reading every page right, SIGBUS on the bad page read last, SIGKILL from the
//! server through its pidfd) and the session's counters are the assertions.

use std::sync::Arc;
use std::time::Duration;

use faultline::inject::ResolveFaults;
use faultline::source::{Failure, FailureInjecting, MemorySource};
use faultline::{Region, Server, ServerConfig, SessionHandle, SessionOptions, Stats, Unservable};
use faultline_testing::{
    client_socketpair, fill_pattern, need_features, recv_uffd, send_uffd, within, ChildExit,
    ChildProcess,
};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, ResolveOp, Uffd, PAGE_SIZE};
use rustix::io::Errno;

/// Pages the client declares to the server.
const PAGES: usize = 32;
/// The page that cannot be served.
const BAD: usize = 21;
/// Safety net against a lost fault: a client that hangs fails the test instead.
const LIMIT: Duration = Duration::from_secs(60);
const SEED: u64 = 12;

fn content() -> Vec<u8> {
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        fill_pattern(SEED, p as u64, chunk);
    }
    v
}

/// The client: `registered` pages of private anonymous memory registered MISSING on its own
/// userfaultfd, sent to the server; then it reads the pages of `touch` in order, comparing every
/// byte with the pattern. Exit 0: all right; 2: wrong bytes.
fn client(touch: Vec<usize>, registered: usize) -> (ChildProcess, Uffd, u64) {
    let (ours, theirs) = client_socketpair().expect("socketpair");
    let child = ChildProcess::spawn(move || {
        let uffd = match Uffd::new(Features::empty()) {
            Ok(u) => u,
            Err(_) => return 3,
        };
        let Ok(m) = Mapping::anonymous(registered * PAGE_SIZE) else {
            return 3;
        };
        if uffd.register(&m, RegisterMode::MISSING).is_err() {
            return 3;
        }
        if send_uffd(&theirs, &uffd, &[m.addr()]).is_err() {
            return 3;
        }
        let mut want = vec![0u8; PAGE_SIZE];
        let mut got = vec![0u8; PAGE_SIZE];
        for p in touch {
            fill_pattern(SEED, p as u64, &mut want);
            if m.read(p * PAGE_SIZE, &mut got).is_err() || got != want {
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("client: page {p} has wrong bytes\n").as_bytes(),
                );
                return 2;
            }
        }
        0
    });
    let (fd, words) = recv_uffd(&ours).expect("the client's userfaultfd");
    let uffd = Uffd::from_received_fd(fd).expect("a userfaultfd");
    (child, uffd, words[0])
}

/// A served client and what the test looks at.
struct Run {
    exit: ChildExit,
    /// From the session's start to the client's end.
    exit_after: Duration,
    stats: Stats,
    injected: Vec<(ResolveOp, Errno, u64)>,
    session: SessionHandle,
    addr: u64,
}

/// Serve a client that reads `touch` (of `registered` pages; the first [`PAGES`] declared) from a
/// source with `rule`, under `faults` and `config`, with `policy`; wait for the client to end.
fn run(
    touch: Vec<usize>,
    registered: usize,
    rule: Option<Failure>,
    faults: impl FnOnce(u64) -> ResolveFaults,
    config: ServerConfig,
    policy: Unservable,
) -> Run {
    let (child, uffd, addr) = client(touch, registered);
    let faults = Arc::new(faults(addr));
    let mut source = FailureInjecting::new(MemorySource::new(content()));
    if let Some(rule) = rule {
        source = source.with_rule(rule);
    }
    let server = Server::start(ServerConfig {
        workers: 2,
        retry_backoff: Duration::from_micros(200),
        inject: Some(Arc::clone(&faults)),
        ..config
    })
    .expect("server");
    let region = Region::new(
        addr,
        (PAGES * PAGE_SIZE) as u64,
        MemoryKind::PrivateAnonymous,
        Arc::new(source),
        0,
    );
    let session = server
        .add_session(
            uffd,
            vec![region],
            SessionOptions {
                pidfd: Some(child.pidfd().expect("pidfd")),
                on_unservable: policy,
                ..SessionOptions::default()
            },
        )
        .expect("session");
    let started = std::time::Instant::now();
    let exit = within(LIMIT, move || child.wait());
    let exit_after = started.elapsed();
    assert!(
        session.wait_closed(LIMIT),
        "the session ends with its client"
    );
    let stats = session.stats();
    server.shutdown();
    Run {
        exit,
        exit_after,
        stats,
        injected: faults.injected(),
        session,
        addr,
    }
}

fn all_but_bad_then_bad() -> Vec<usize> {
    (0..PAGES).filter(|&p| p != BAD).chain([BAD]).collect()
}

fn all() -> Vec<usize> {
    (0..PAGES).collect()
}

fn bad_addr(addr: u64) -> u64 {
    addr + (BAD * PAGE_SIZE) as u64
}

fn poison_ok() -> bool {
    need_features("unservable", Features::POISON)
}

#[test]
fn efault_from_a_copy_poisons_that_page_only() {
    if !poison_ok() {
        return;
    }
    // EFAULT: the kernel could not read the source bytes (a memory file truncated under its
    // mapping). Readahead makes the failing copy a multi-page run: it is split, and only the
    // bad page is poisoned.
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| ResolveFaults::new().fail_at(ResolveOp::Copy, bad_addr(a), Errno::FAULT, u32::MAX),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(r.stats.poisoned_pages, 1, "{:?}", r.stats);
    assert_eq!(r.stats.unservable, 0);
    assert!(r.stats.source_errors >= 1);
    assert!(r.injected.iter().all(|i| i.1 == Errno::FAULT));
}

#[test]
fn enomem_is_retried_and_every_page_served() {
    let r = run(
        all(),
        PAGES,
        None,
        |_| ResolveFaults::new().fail(ResolveOp::Copy, Errno::NOMEM, 3),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Code(0), "{:?}", r.stats);
    assert_eq!(r.injected.len(), 3);
    assert!(r.stats.deferred >= 1, "{:?}", r.stats);
    assert_eq!((r.stats.poison, r.stats.unservable), (0, 0));
}

#[test]
fn einval_poisons_the_page_it_refuses() {
    if !poison_ok() {
        return;
    }
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| ResolveFaults::new().fail_at(ResolveOp::Copy, bad_addr(a), Errno::INVAL, u32::MAX),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(r.stats.poisoned_pages, 1, "{:?}", r.stats);
}

#[test]
fn without_poison_an_unservable_page_kills_the_client() {
    // A kernel before 6.6 (simulated by masking the feature): no POISON, so the explicit end is
    // the client's process, killed through its pidfd — never a page marked present that nobody
    // filled.
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| ResolveFaults::new().fail_at(ResolveOp::Copy, bad_addr(a), Errno::INVAL, u32::MAX),
        ServerConfig {
            missing_features: Features::POISON,
            ..ServerConfig::default()
        },
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGKILL), "{:?}", r.stats);
    assert_eq!(
        (r.stats.poison, r.stats.unservable),
        (0, 1),
        "{:?}",
        r.stats
    );
    assert!(r.session.is_closed());
}

#[test]
fn a_refused_poison_kills_the_client() {
    // POISON itself answered EINVAL (as a kernel without it does): the client is killed.
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| {
            ResolveFaults::new()
                .fail_at(ResolveOp::Copy, bad_addr(a), Errno::INVAL, u32::MAX)
                .fail(ResolveOp::Poison, Errno::INVAL, u32::MAX)
        },
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGKILL), "{:?}", r.stats);
    assert_eq!(
        (r.stats.poison, r.stats.unservable),
        (1, 1),
        "{:?}",
        r.stats
    );
    assert_eq!(r.stats.poisoned_pages, 0);
}

#[test]
fn the_kill_policy_ends_the_client_even_where_poison_exists() {
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        Some(Failure::PermanentAt {
            offset: (BAD * PAGE_SIZE) as u64,
        }),
        |_| ResolveFaults::new(),
        ServerConfig::default(),
        Unservable::Kill,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGKILL), "{:?}", r.stats);
    assert_eq!(
        (r.stats.poison, r.stats.unservable),
        (0, 1),
        "{:?}",
        r.stats
    );
}

#[test]
fn enoent_gives_the_claim_back_and_the_refault_is_served() {
    let r = run(
        all(),
        PAGES,
        None,
        |a| ResolveFaults::new().fail_at(ResolveOp::Copy, bad_addr(a), Errno::NOENT, 1),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Code(0), "{:?}", r.stats);
    assert_eq!(r.injected.len(), 1);
    assert!(
        r.stats.wake >= 1,
        "the range given back is woken: {:?}",
        r.stats
    );
}

#[test]
fn eagain_for_ever_ends_at_the_fault_deadline() {
    if !poison_ok() {
        return;
    }
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| ResolveFaults::new().fail_at(ResolveOp::Copy, bad_addr(a), Errno::AGAIN, u32::MAX),
        ServerConfig {
            fault_deadline: Duration::from_millis(600),
            stuck_after: Duration::from_millis(100),
            ..ServerConfig::default()
        },
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(r.stats.poisoned_pages, 1, "{:?}", r.stats);
    assert!(
        r.stats.eagain >= 2 && r.stats.deferred >= 2,
        "{:?}",
        r.stats
    );
    assert!(
        r.stats.stuck_faults >= 1,
        "the watchdog reported it: {:?}",
        r.stats
    );
}

#[test]
fn esrch_ends_the_session() {
    // ESRCH: the kernel says the client's memory is gone. The session ends; here the process
    // is in fact alive and blocked, so the test ends it.
    let (child, uffd, addr) = client(all(), PAGES);
    let faults = Arc::new(ResolveFaults::new().fail(ResolveOp::Copy, Errno::SRCH, u32::MAX));
    let server = Server::start(ServerConfig {
        workers: 1,
        inject: Some(Arc::clone(&faults)),
        ..ServerConfig::default()
    })
    .expect("server");
    let src = Arc::new(MemorySource::new(content()));
    let region = Region::new(
        addr,
        (PAGES * PAGE_SIZE) as u64,
        MemoryKind::PrivateAnonymous,
        src,
        0,
    );
    let session = server
        .add_session(uffd, vec![region], SessionOptions::default())
        .expect("session");
    assert!(session.wait_closed(LIMIT), "ESRCH closes the session");
    assert_eq!(faults.injected().len(), 1);
    drop(child); // killed and reaped
    server.shutdown();
}

#[test]
fn a_panicking_source_poisons_its_page_and_the_server_goes_on() {
    if !poison_ok() {
        return;
    }
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        Some(Failure::PanicAt {
            offset: (BAD * PAGE_SIZE + 7) as u64,
        }),
        |_| ResolveFaults::new(),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(r.stats.poisoned_pages, 1, "{:?}", r.stats);
    // The same server process serves the next client whole (its workers survived the panic).
    let again = run(
        all(),
        PAGES,
        None,
        |_| ResolveFaults::new(),
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(again.exit, ChildExit::Code(0));
}

#[test]
fn a_fault_outside_every_declared_region_ends_after_the_grace() {
    if !poison_ok() {
        return;
    }
    // The client registers twice what it declares, then touches the undeclared half: such a
    // fault has no right page. It used to be retried every millisecond for ever.
    let mut touch = all();
    touch.push(PAGES + 3);
    let r = run(
        touch,
        2 * PAGES,
        None,
        |_| ResolveFaults::new(),
        ServerConfig {
            orphan_grace: Duration::from_millis(200),
            ..ServerConfig::default()
        },
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(r.stats.poisoned_pages, 1, "{:?}", r.stats);
    // Retried after events and at the grace's end, not every millisecond.
    assert!(r.stats.faults < PAGES as u64 + 50, "{:?}", r.stats);
    let _ = r.addr;
}

#[test]
fn a_hung_source_read_is_ended_by_the_watchdog() {
    if !poison_ok() {
        return;
    }
    // The read of the bad page blocks for 6 s; the deadline is 800 ms: the watchdog reports the
    // fault, then poisons the page the worker holds, and the client gets SIGBUS long before the
    // read returns.
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        Some(Failure::HangAt {
            offset: (BAD * PAGE_SIZE) as u64,
            delay: Duration::from_secs(6),
        }),
        |_| ResolveFaults::new(),
        ServerConfig {
            workers: 3,
            fault_deadline: Duration::from_millis(800),
            stuck_after: Duration::from_millis(200),
            readahead: faultline::Readahead::Off,
            ..ServerConfig::default()
        },
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert!(r.stats.stuck_faults >= 1, "{:?}", r.stats);
    assert!(r.stats.poisoned_pages >= 1, "{:?}", r.stats);
    assert!(
        r.exit_after < Duration::from_secs(5),
        "ended by the deadline, not by the read: {:?}",
        r.exit_after
    );
}

#[test]
fn a_poison_answered_eagain_is_tried_again() {
    if !poison_ok() {
        return;
    }
    // A REMOVE unread by the other worker makes POISON answer EAGAIN for a moment: the page is
    // still poisoned (the client is not killed for it).
    let r = run(
        all_but_bad_then_bad(),
        PAGES,
        None,
        |a| {
            ResolveFaults::new()
                .fail_at(ResolveOp::Copy, bad_addr(a), Errno::INVAL, u32::MAX)
                .fail(ResolveOp::Poison, Errno::AGAIN, 3)
        },
        ServerConfig::default(),
        Unservable::Poison,
    );
    assert_eq!(r.exit, ChildExit::Signal(libc::SIGBUS), "{:?}", r.stats);
    assert_eq!(
        (r.stats.poisoned_pages, r.stats.unservable),
        (1, 0),
        "{:?}",
        r.stats
    );
    assert_eq!(
        r.injected
            .iter()
            .filter(|i| i.0 == ResolveOp::Poison)
            .count(),
        3
    );
}

#[test]
fn ending_the_sessions_waits_for_a_worker_inside_one() {
    // A worker is inside the session (its source read hangs 500 ms) when the server is told to
    // end every session: `end_sessions` returns only once the session is finished, its end hook
    // run (a process exiting right after it no longer skips the summary or a working set).
    let (child, uffd, addr) = client(vec![BAD], PAGES);
    let source = Arc::new(
        FailureInjecting::new(MemorySource::new(content())).with_rule(Failure::HangAt {
            offset: (BAD * PAGE_SIZE) as u64,
            delay: Duration::from_millis(500),
        }),
    );
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let region = Region::new(
        addr,
        (PAGES * PAGE_SIZE) as u64,
        MemoryKind::PrivateAnonymous,
        Arc::clone(&source) as Arc<dyn faultline::PageSource>,
        0,
    );
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&ended);
    let _session = server
        .add_session(
            uffd,
            vec![region],
            SessionOptions {
                on_end: Some(faultline::EndHook(Box::new(move |_| {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                }))),
                ..SessionOptions::default()
            },
        )
        .expect("session");
    within(LIMIT, {
        let source = Arc::clone(&source);
        move || {
            while source.stats().slowed == 0 {
                std::thread::yield_now();
            }
        }
    });
    assert!(server.end_sessions(Duration::from_secs(10)));
    assert!(
        ended.load(std::sync::atomic::Ordering::Acquire),
        "the end hook ran before end_sessions returned"
    );
    drop(child);
    server.shutdown();
}
