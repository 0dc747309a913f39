//! `faultline serve` stays up and keeps nothing of the dead: its worker process is SIGKILLed
//! (while it holds faults it has read and not resolved) in the middle of four 512 MiB restores,
//! or twice in a row, and every restore still completes byte for byte (the supervisor restarts
//! the worker, which resumes every session, balloon removes included, and wakes the threads the
//! dead one left waiting); a thousand clients that die at every stage of the handshake or
//! mid-restore leave the fd, thread and memory counts of both processes where they were;
//! `--on-exit drain` fills every page before exiting, `abandon` leaves at once; `--allow-uid`
//! vets clients by uid; and `--no-supervisor` still serves in one process.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{
    all_threads_stopped, client_command, fields, is_message, is_refusal, output_within,
    outputs_within, read_unresolved_faults, refusals_of, signal, summary, thread_names, try_metric,
    usage_of, userfaultfds_of, verified_report, wait_until, wait_until_within, within, workdir,
    write_large_mem_file, Daemon, HeldClient, LineCount, Usage, DEADLINE, MEM_LEN,
};
use faultline::firecracker::{send_handshake, GuestRegionUffdMapping, JsonShape};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};
use rustix::process::Signal;
use serde_json::Value;

const PAGES: u64 = MEM_LEN / 4096;

/// The crash-recovery restores: four clients of 512 MiB each.
const BIG: u64 = 512 << 20;
const CLIENTS: usize = 4;

/// Safety net of the waits of the 512 MiB restores (debug builds, two cores, two of them
/// verifying 2 GiB): a bound that fails the test, never a delay.
const BIG_DEADLINE: Duration = Duration::from_secs(120);

/// The crash-recovery tests keep both cores busy: they run one at a time.
static BIG_TESTS: Mutex<()> = Mutex::new(());

fn is_worker_death(line: &str) -> bool {
    fields(line)["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("worker died"))
}

fn is_resume(line: &str) -> bool {
    is_message(line, "resuming a session of a dead worker")
}

/// The `pid` field of a log line.
fn pid_of(line: &str) -> u64 {
    fields(line)["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// Pages served so far by the serve worker answering on `addr` (each worker counts from zero).
fn pages_served(addr: &str) -> Option<u64> {
    try_metric(addr, "faultline_pages", "scope=\"total\"")
}

/// Four clients restore `size` bytes each (every byte verified by the client) from a daemon
/// started with `flags`, while its serve worker is SIGKILLed `kills` times, each time once all
/// four sessions are being served by it, it has served pages and holds faults it has read but
/// not resolved. The supervisor restarts the worker, which resumes every session: the restores
/// all complete, and the last worker served pages.
fn restores_survive_worker_kills(size: u64, kills: usize, flags: &[&str]) {
    let pages = size / 4096;
    // Each wait's safety net: 120 s for 512 MiB (debug build, two cores), 60 s for less.
    let limit = if size >= BIG {
        BIG_DEADLINE
    } else {
        Duration::from_secs(60)
    };
    let _one_at_a_time = BIG_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("mem");
    write_large_mem_file(&mem, size);
    let addr = common::free_local_addr();
    let mut args = vec!["--metrics", addr.as_str()];
    args.extend_from_slice(flags);
    let daemon = Daemon::start(dir.path(), &mem, &args);
    let mut clients = Clients(
        (0..CLIENTS)
            .map(|i| {
                let touch = if i % 2 == 0 { "seq" } else { "rand" };
                client_command(daemon.socket(), &mem, &["--threads", "2", "--touch", touch])
                    .spawn()
                    .expect("spawning a client")
            })
            .collect(),
    );
    let pids: BTreeSet<u64> = clients.0.iter().map(|c| u64::from(c.id())).collect();
    let log = daemon.log();
    let started = log.wait_count_within("the four sessions", CLIENTS, limit, |l| {
        is_message(l, "session started")
    });
    assert!(pids.contains(&pid_of(&started)), "{started}");
    let mut killed = Vec::new();
    let mut in_hand = Vec::new();
    for k in 1..=kills {
        let worker = daemon.worker_pid(k, limit);
        // This worker serves all four sessions (the first started them, later ones resumed
        // them) and has served its share of pages: kill it mid-restore. The shares add up to
        // less than one client's memory, so no client can have finished before the last kill.
        if k > 1 {
            log.wait_count_within("the resumed sessions", CLIENTS * (k - 1), limit, is_resume);
        }
        let share = pages / (kills as u64 + 2);
        wait_until_within("the worker served its share", limit, || {
            pages_served(&addr).is_some_and(|p| p >= share)
        });
        // SIGKILL it while it holds faults it has read but not resolved: their threads sleep
        // until the next worker wakes them.
        in_hand.push(stop_holding_faults(daemon.pid(), worker, limit));
        signal(worker, Signal::KILL);
        killed.push(worker);
        let died = log.wait_count_within("the worker's death", k, limit, is_worker_death);
        let f = fields(&died);
        assert_eq!(f["worker"], worker, "{died}");
        assert!(
            f["status"].as_str().is_some_and(|s| s.contains("SIGKILL")),
            "{died}"
        );
        assert_eq!(f["sessions"], CLIENTS, "{died}");
    }
    // Every client completes its restore, every byte checked.
    for out in outputs_within(std::mem::take(&mut clients.0), limit) {
        let report = daemon.verified(&out);
        assert_eq!(report["pages"], pages, "{report}");
    }
    eprintln!(
        "{CLIENTS} x {} MiB restored through {kills} worker kill(s) in {:.1} s; \
         faults read and unresolved at each kill: {in_hand:?}",
        size >> 20,
        t0.elapsed().as_secs_f64()
    );
    // Each restart started a worker that resumed all four sessions, by their clients' pids.
    let last = daemon.worker_pid(kills + 1, DEADLINE);
    assert!(!killed.contains(&last));
    let resumed = log.matching(is_resume);
    assert_eq!(resumed.len(), CLIENTS * kills, "{resumed:#?}");
    for round in resumed.chunks(CLIENTS) {
        let round: BTreeSet<u64> = round.iter().map(|l| pid_of(l)).collect();
        assert_eq!(round, pids);
    }
    assert_eq!(log.count(|l| is_message(l, "worker started")), kills + 1);
    // The last worker served part of the restores: the kills did come mid-restore.
    let last_served = pages_served(&addr).expect("the last worker's metrics");
    assert!(last_served > 0, "the last worker served nothing");
    // Its sessions end with the clients, nothing poisoned.
    for pid in &pids {
        let pid = u32::try_from(*pid).expect("pid");
        let s = summary(&daemon.wait_session_ended_for(pid));
        assert_eq!(s["poisoned_pages"], 0, "{s}");
        assert_eq!(s["source_errors"], 0, "{s}");
    }
}

/// Client processes, killed and reaped if the test fails before it collects them (a client
/// blocked on a page nobody serves would otherwise outlive the test).
struct Clients(Vec<Child>);

impl Drop for Clients {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Stops the serve `worker` (SIGSTOP) at a moment when it holds page faults it has read and not
/// resolved, and returns how many (the sessions' userfaultfds, which the supervisor holds too,
/// count them in their fdinfo). Tries again (SIGCONT, a millisecond, SIGSTOP) until it does.
fn stop_holding_faults(supervisor: u32, worker: u32, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    loop {
        signal(worker, Signal::STOP);
        // Stopped threads issue no resolve: the count cannot change under us.
        wait_until("the worker stopped", || all_threads_stopped(worker));
        let n = read_unresolved_faults(supervisor);
        if n > 0 {
            return n;
        }
        signal(worker, Signal::CONT);
        assert!(
            Instant::now() < end,
            "the worker never held an unresolved fault"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn restores_complete_when_the_worker_is_killed_mid_restore() {
    restores_survive_worker_kills(BIG, 1, &[]);
}

/// The same with 128 MiB clients (the 512 MiB case is above; this one is about recovering
/// again), killing the worker twice.
#[test]
fn restores_complete_when_the_worker_is_killed_twice() {
    restores_survive_worker_kills(128 << 20, 2, &[]);
}

/// With readahead the new worker's copies around other faults usually free a thread blocked on
/// a fault the dead worker had read, sooner or later; without it each page is resolved only for
/// its own fault, so such a thread waits forever unless the new worker wakes it. (Against a
/// worker that skipped the resume wake this hung in every run.)
#[test]
fn faults_read_by_the_dead_worker_are_taken_again() {
    restores_survive_worker_kills(32 << 20, 1, &["--readahead", "off"]);
}

/// A test-process "guest": one 4 MiB region of the memory file registered with a userfaultfd
/// and handed to the daemon. Every access runs on a helper thread with a deadline, because a page
/// nobody serves blocks the access forever.
struct Guest {
    map: Arc<Mapping>,
    _uffd: Uffd,
    _stream: UnixStream,
}

impl Guest {
    fn connect(socket: &Path) -> Guest {
        let uffd = Uffd::new(Features::EVENT_REMOVE).expect("creating a userfaultfd");
        let map = Mapping::new(
            MemoryKind::PrivateAnonymous,
            usize::try_from(MEM_LEN).expect("fits usize"),
        )
        .expect("mapping");
        uffd.register(&map, RegisterMode::MISSING)
            .expect("registering");
        let stream = UnixStream::connect(socket).expect("connecting");
        let region = GuestRegionUffdMapping::new(map.addr(), MEM_LEN, 0, 4096);
        send_handshake(&stream, &[region], uffd.as_fd(), None, JsonShape::Both)
            .expect("sending the handshake");
        Guest {
            map: Arc::new(map),
            _uffd: uffd,
            _stream: stream,
        }
    }

    /// Page `p` as the guest reads it.
    fn page(&self, p: u64) -> Vec<u8> {
        let map = Arc::clone(&self.map);
        within(&format!("reading page {p}"), DEADLINE, move || {
            let mut buf = vec![0u8; 4096];
            map.read(usize::try_from(p).expect("fits usize") * 4096, &mut buf)
                .expect("in range");
            buf
        })
    }

    /// Drops page `p` (MADV_DONTNEED: a REMOVE event for the handler, a balloon inflating).
    fn discard(&self, p: u64) {
        let map = Arc::clone(&self.map);
        within(&format!("discarding page {p}"), DEADLINE, move || {
            map.discard(usize::try_from(p).expect("fits usize") * 4096, 4096)
                .expect("MADV_DONTNEED");
        });
    }
}

/// Pages removed by the balloon before the worker died still read zero after the restart: the
/// supervisor kept the REMOVEs and the new worker applies them before serving.
#[test]
fn removed_pages_read_zero_after_a_worker_restart() {
    let (dir, mem) = workdir();
    let file = std::fs::read(&mem).expect("reading the memory file");
    let want = |p: u64| {
        file[usize::try_from(p * 4096).expect("fits usize")
            ..usize::try_from((p + 1) * 4096).expect("fits usize")]
            .to_vec()
    };
    let daemon = Daemon::start(dir.path(), &mem, &["--readahead", "off"]);
    let worker = daemon.worker_pid(1, DEADLINE);
    let guest = Guest::connect(daemon.socket());
    // The first half is restored; then every 10th page of it is ballooned away.
    for p in 0..PAGES / 2 {
        assert_eq!(guest.page(p), want(p), "page {p}");
    }
    let removed: Vec<u64> = (0..PAGES / 2).step_by(10).collect();
    for &p in &removed {
        guest.discard(p);
    }
    // One more page removed, then touched: it reads zero once the worker has applied its
    // REMOVE. The worker reports each REMOVE to the supervisor under the session's read lock,
    // before it serves any later fault of the session, so by then every report is on the
    // control socket, which the supervisor reads to its end before restarting the worker.
    let sentinel = PAGES / 2 - 1;
    guest.discard(sentinel);
    assert!(guest.page(sentinel).iter().all(|&b| b == 0));
    signal(worker, Signal::KILL);
    let resumed = daemon.log().wait_for("the resumed session", is_resume);
    assert_eq!(pid_of(&resumed), u64::from(std::process::id()), "{resumed}");
    for &p in &removed {
        assert!(
            guest.page(p).iter().all(|&b| b == 0),
            "removed page {p} does not read zero after the restart"
        );
    }
    // Everything else reads the snapshot: present pages untouched, the rest served by the new
    // worker.
    for p in (0..PAGES).filter(|p| !removed.contains(p) && *p != sentinel) {
        assert_eq!(guest.page(p), want(p), "page {p}");
    }
    assert_eq!(daemon.log().count(is_worker_death), 1);
}

/// Sessions of dead clients the worker may not have ended yet when the next handshake goes in.
/// A burst of sessions raises the worker's resident memory for good (each has a latency
/// histogram of about 220 KiB, and the allocator keeps what they free), so the pace is bounded
/// to compare memory before and after.
const IN_FLIGHT: usize = 8;

fn is_session_end(line: &str) -> bool {
    is_message(line, "session ended")
}

/// How the test's clients die.
struct Deaths {
    /// Connected and closed without sending anything.
    silent: usize,
    /// Sent half a handshake, then closed.
    half: usize,
    /// Sent a whole handshake, then closed (from this process).
    handshaken: usize,
    /// `faultline client` processes SIGKILLed mid-restore.
    killed: usize,
    /// The sessions ended so far.
    ended: LineCount<fn(&str) -> bool>,
}

impl Deaths {
    fn new() -> Deaths {
        Deaths {
            silent: 0,
            half: 0,
            handshaken: 0,
            killed: 0,
            ended: LineCount::new(is_session_end),
        }
    }

    /// A connection that sends nothing.
    fn silent(&mut self, socket: &Path) {
        drop(UnixStream::connect(socket).expect("connecting"));
        self.silent += 1;
    }

    /// Half of a valid handshake (with its userfaultfd), then the connection closes.
    fn half(&mut self, socket: &Path) {
        let uffd = Uffd::new(Features::EVENT_REMOVE).expect("creating a userfaultfd");
        let json = format!(
            r#"[{{"base_host_virt_addr": 140000000000000, "size": {MEM_LEN}, "offset": 0, "page_size": 4096}}]"#
        );
        let stream = UnixStream::connect(socket).expect("connecting");
        faultline::firecracker::send_with_fds(
            &stream,
            &json.as_bytes()[..json.len() / 2],
            &[uffd.as_fd()],
            usize::MAX,
        )
        .expect("sending half a handshake");
        self.half += 1;
    }

    /// A complete handshake of a real userfaultfd with a registered 64 KiB mapping from a child
    /// process that then exits (as Firecracker dying right after the handshake). It is reaped
    /// once its session started (a client reaped before the daemon named it is refused instead).
    fn handshaken(&mut self, daemon: &Daemon) {
        let sessions = self.handshaken + self.killed;
        if sessions > IN_FLIGHT {
            self.ended.wait(
                daemon.log(),
                "a session end",
                sessions - IN_FLIGHT,
                DEADLINE,
            );
        }
        let socket = daemon.socket().to_owned();
        let child = faultline_testing::ChildProcess::spawn(move || {
            let uffd = Uffd::new(Features::EVENT_REMOVE).expect("creating a userfaultfd");
            let map = Mapping::new(MemoryKind::PrivateAnonymous, 16 * 4096).expect("mapping");
            uffd.register(&map, RegisterMode::MISSING)
                .expect("registering");
            let stream = UnixStream::connect(&socket).expect("connecting");
            let region = GuestRegionUffdMapping::new(map.addr(), 16 * 4096, 0, 4096);
            send_handshake(&stream, &[region], uffd.as_fd(), None, JsonShape::Both)
                .expect("sending the handshake");
            0
        });
        let pid = child.pid();
        daemon
            .log()
            .wait_count_within("the handshaken client's session", 1, DEADLINE, |l| {
                is_message(l, "session started") && fields(l)["pid"] == pid
            });
        assert_eq!(
            common::wait_child(child, daemon),
            faultline_testing::ChildExit::Code(0)
        );
        self.handshaken += 1;
    }

    /// A `faultline client` killed once its session started: before touching anything, after
    /// touching part of its memory, or wherever its restore got to.
    fn killed(&mut self, daemon: &Daemon, mem: &Path) {
        let extra: &[&str] = match self.killed % 3 {
            0 => &["--touch", "none"],
            1 => &["--ws-pct", "20", "--ws-only"],
            _ => &["--touch", "rand"],
        };
        let held = HeldClient::spawn(daemon.socket(), mem, extra);
        let pid = held.pid();
        daemon
            .log()
            .wait_count_within("the killed client's session", 1, DEADLINE, |l| {
                is_message(l, "session started") && fields(l)["pid"] == pid
            });
        assert!(!held.kill().success());
        self.killed += 1;
    }

    /// `n` deaths of the first three kinds in turn, and a killed client every `every_killed`.
    fn run(&mut self, daemon: &Daemon, mem: &Path, n: usize, every_killed: usize) {
        for i in 0..n {
            match i % 3 {
                0 => self.silent(daemon.socket()),
                1 => self.half(daemon.socket()),
                _ => self.handshaken(daemon),
            }
            if (i + 1) % every_killed == 0 {
                self.killed(daemon, mem);
            }
        }
    }

    /// Waits until the daemon logged every death: a refusal for each silent (and the start-up
    /// probe) and half connection, a session start and end for each handshake and killed
    /// client; then until both processes are quiet (no handshake thread left in the supervisor,
    /// no userfaultfd left in either).
    fn settle(&mut self, daemon: &Daemon, supervisor: u32, worker: u32) {
        let log = daemon.log();
        let sessions = self.handshaken + self.killed;
        // Refusals are logged a few a second per cause, the rest counted: the totals, per cause.
        let (empty, half) = ((1 + self.silent) as u64, self.half as u64);
        wait_until("every refusal is logged or counted", || {
            refusals_of(log, "closed-empty") >= empty && refusals_of(log, "closed") >= half
        });
        log.wait_count_within("every session start", sessions, DEADLINE, |l| {
            is_message(l, "session started")
        });
        self.ended
            .wait(log, "every session end", sessions, DEADLINE);
        assert_eq!(
            refusals_of(log, "closed-empty"),
            empty,
            "connections that sent nothing"
        );
        assert_eq!(
            refusals_of(log, "closed"),
            half,
            "connections that sent half a handshake"
        );
        for refused in log.matching(is_refusal) {
            let e = refusal_error(&refused);
            assert!(e.contains("closed the connection after"), "{refused}");
        }
        for ended in log.matching(is_session_end) {
            assert!(
                fields(&ended)["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("client gone")),
                "{ended}"
            );
        }
        wait_until("the supervisor's handshake threads are gone", || {
            !thread_names(supervisor)
                .iter()
                .any(|t| t.starts_with("faultline-hand"))
        });
        wait_until("no userfaultfd is left open", || {
            userfaultfds_of(supervisor) == 0 && userfaultfds_of(worker) == 0
        });
    }
}

fn refusal_error(line: &str) -> String {
    fields(line)["error"].as_str().unwrap_or(line).to_owned()
}

/// Waits (bounded) until `pid`'s fds and threads are back to `base` exactly, then checks its
/// resident memory grew by at most `slack_kib`.
fn assert_back_to(name: &str, pid: u32, base: Usage, slack_kib: u64) {
    let end = Instant::now() + DEADLINE;
    let mut now = usage_of(pid);
    while (now.fds, now.threads) != (base.fds, base.threads) {
        assert!(
            Instant::now() < end,
            "the {name}'s fds/threads did not return to the baseline: {now:?} vs {base:?}; \
             fds now: {:?}; threads: {:?}",
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d
                    .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            thread_names(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
        now = usage_of(pid);
    }
    eprintln!("{name}: after the warm-up {base:?}, at the end {now:?}");
    assert!(
        now.rss_kib <= base.rss_kib + slack_kib,
        "the {name}'s memory grew: {now:?} vs {base:?}"
    );
}

/// A thousand clients die at every stage — connected and silent, half a handshake, a whole
/// handshake then gone, `faultline client` processes SIGKILLed mid-restore — and both daemon
/// processes end up holding exactly the fds and threads they held after a warm-up, with about
/// the same memory.
#[test]
fn a_thousand_client_deaths_leave_nothing_behind() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let supervisor = daemon.pid();
    let worker = daemon.worker_pid(1, DEADLINE);
    let mut deaths = Deaths::new();
    // Warm-up: 18 deaths of the first three kinds and two killed clients, so lazily created
    // state (allocator arenas, log buffers) exists before the baseline.
    deaths.run(&daemon, &mem, 18, 9);
    deaths.settle(&daemon, supervisor, worker);
    let base_supervisor = usage_of(supervisor);
    let base_worker = usage_of(worker);
    let t = Instant::now();
    deaths.run(&daemon, &mem, 1000, 50);
    deaths.settle(&daemon, supervisor, worker);
    eprintln!(
        "{} silent, {} half, {} handshaken, {} killed in {:.1} s",
        deaths.silent,
        deaths.half,
        deaths.handshaken,
        deaths.killed,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(deaths.killed, 22);
    assert_back_to("supervisor", supervisor, base_supervisor, 8 << 10);
    assert_back_to("worker", worker, base_worker, 8 << 10);
    // The same worker served throughout, and still serves.
    assert_eq!(daemon.log().count(is_worker_death), 0);
    daemon.client(&mem, &[]);
}

/// `--on-exit drain`: on SIGTERM every session's missing pages are filled before the daemon
/// exits. The client touched nothing while the daemon ran; once it is gone, the client reads
/// every page and each matches the snapshot (a page left missing would block that read, which
/// the deadline turns into a failure).
#[test]
fn drain_fills_every_page_before_exiting() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-exit", "drain"]);
    let held = HeldClient::spawn(
        daemon.socket(),
        &mem,
        &["--touch", "none", "--verify-after-hold"],
    );
    let pid = held.pid();
    daemon.log().wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    signal(daemon.pid(), Signal::TERM);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}: {}", daemon.log().text());
    // The daemon (both processes) is gone; the client reads and checks every page.
    let report = verified_report(&held.release());
    assert_eq!(report["pages"], PAGES, "{report}");
    let drained = daemon
        .log()
        .wait_for("the drained session", |l| is_message(l, "drained"));
    assert_eq!(fields(&drained)["complete"], true, "{drained}");
}

/// `--on-exit abandon` (the default): SIGTERM stops at once; the held client, which touched
/// nothing, is not filled and exits normally when released.
#[test]
fn abandon_exits_at_once_and_leaves_the_client_alone() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-exit", "abandon"]);
    let held = HeldClient::spawn(daemon.socket(), &mem, &["--touch", "none"]);
    let pid = held.pid();
    daemon.log().wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    let rss_anon = common::proc_status(pid, "RssAnon");
    let t = Instant::now();
    signal(daemon.pid(), Signal::TERM);
    let status = daemon.wait_exit();
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{status}: {}", daemon.log().text());
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    assert_eq!(daemon.log().count(|l| is_message(l, "drained")), 0);
    let ended = daemon.wait_session_ended_for(pid);
    assert_eq!(fields(&ended)["reason"], "removed", "{ended}");
    // No page was pushed into the client (its memory file has 3 MiB of non-zero pages).
    let grew = common::proc_status(pid, "RssAnon").saturating_sub(rss_anon);
    assert!(grew < 512, "the client got {grew} KiB of pages");
    let out = held.release();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the client's report");
    assert_eq!(report["pages"], PAGES, "{report}");
}

/// `--allow-uid` refuses a client whose uid it does not list (naming the uid) and serves one it
/// does. The tests run as root: uid 0.
#[test]
fn allow_uid_vets_clients() {
    let (dir, mem) = workdir();
    assert_eq!(
        rustix::process::getuid().as_raw(),
        0,
        "the tests run as root"
    );
    let mut daemon = Daemon::start(dir.path(), &mem, &["--allow-uid", "4242"]);
    // The refused client touches nothing (nobody would serve it) and exits after its handshake,
    // or fails to send it: it is refused right after `accept`, before anything is read, so its
    // send may find the connection closed already.
    let out = output_within(
        client_command(daemon.socket(), &mem, &["--touch", "none"])
            .spawn()
            .expect("spawning a client"),
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("Broken pipe") || stderr.contains("reset"),
        "{out:?}"
    );
    let error = daemon.wait_refusal("runs as uid 0");
    assert!(error.contains("--allow-uid"), "{error}");
    assert_eq!(daemon.log().count(|l| is_message(l, "session started")), 0);
    drop(daemon);
    let daemon = Daemon::start(dir.path(), &mem, &["--allow-uid", "4242,0"]);
    let report = daemon.client(&mem, &[]);
    assert_eq!(report["pages"], PAGES, "{report}");
}

/// `--no-supervisor`: one process (no worker child) that serves a client in full.
#[test]
fn no_supervisor_serves_in_one_process() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &["--no-supervisor"]);
    let report = daemon.client(&mem, &[]);
    assert_eq!(report["pages"], PAGES, "{report}");
    daemon.wait_session_ended(1);
    let pid = daemon.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("reading the daemon's children");
    assert!(children.trim().is_empty(), "children: {children}");
    assert_eq!(daemon.log().count(|l| is_message(l, "worker started")), 0);
}
