//! Crash recovery: a supervisor process and a worker process.
//!
//! A page-fault handler is on the critical path of every VM it serves: if it dies, the guests
//! freeze (Firecracker keeps its own copy of the userfaultfd, so nothing reads zero pages, but
//! nothing serves them either). So a supervised daemon splits in two:
//!
//! - the **supervisor** owns what must survive: the listening socket, the snapshot (opened once at
//!   start: the open files, never their paths, are handed to every worker, and the source's
//!   identity is pinned), and for every live session the client's socket, a duplicate of its
//!   userfaultfd, a pidfd of its process (SO_PEERPIDFD, or opened from SO_PEERCRED's pid), its
//!   validated regions, the ranges its balloon removed (merged), its latest counters, and its
//!   served log (a memfd the worker marks every page it makes present in, see
//!   [`faultline::served`]). It accepts clients, receives and validates their handshakes, and hands
//!   each session to the worker over a `SOCK_SEQPACKET` socket pair (JSON + the userfaultfd, the
//!   pidfd and the served log; the socket instead of the pidfd where the kernel cannot name the
//!   client process). The client's socket stays with the supervisor.
//! - the **worker** (the same program run again, see [`crate::worker`]; the pair on its stdin) runs
//!   the fault server. Its first message is the snapshot's files; it tells the supervisor when it
//!   is ready (or why it cannot start), when a session ends, every REMOVE it applies and, every 500
//!   ms, each session's counters.
//!
//! When the worker dies (a crash, an OOM kill, SIGKILL), the supervisor starts a new one and hands
//! it every live session again, marked `resume`, with the session's id and counters: the new worker
//! applies the recorded REMOVEs (those pages still read zero) and the served log (a page made
//! present before that faults again was zapped since — possibly by a REMOVE the dead worker read
//! and never passed on — and reads zero too), then wakes every thread blocked on each region —
//! faults whose messages the dead worker had read but not resolved fault again and are served;
//! pages already present stay (a resolve of one answers EEXIST and is counted, never overwritten).
//! The session keeps its id, and its end summary covers its whole life.
//!
//! A worker that cannot start (its source refuses it, say) is restarted with backoff (100 ms
//! doubling to 10 s; at once after a worker that lived 10 s), its cause logged once a minute at
//! most. Sessions left without a worker for [`DaemonConfig::worker_down_limit`] have their VMs ended
//! (SIGKILL through the client's pidfd, logged): a fault never waits without a bound.
//!
//! When the supervisor dies (SIGKILL), the worker keeps serving the sessions it has until each
//! ends, then exits; nothing new reaches it (the listening socket died with the supervisor).

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline::firecracker::PeerCred;
use faultline::Stats;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::accept::{accept_loop, bind, Accepted, ConnCtx};
use crate::config::DaemonConfig;
use crate::control::{
    recv_msg, send_msg, InitMsg, RangeSet, Reg, Report, SessionMsg, ToWorker, EXIT_CANNOT_START,
    REMOVED_CHUNK,
};
use crate::error::{chain, Error, Result};
use crate::snapshot::Pinned;
use crate::worker::WorkerCommand;

/// Lock `m`, recovering the guard from a poisoned lock: the data behind the supervisor's locks
/// (records, the worker) stays consistent at every step a panic could interrupt, and work is
/// never skipped because some other thread panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A worker that lived this long was healthy: the next restart is immediate.
const HEALTHY: Duration = Duration::from_secs(10);

/// First and longest pause between restarts of a worker that keeps dying young.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The same start-up failure is logged at most this often.
const CAUSE_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the supervisor keeps of a live session.
struct Record {
    /// The client's socket: kept open while the session lives.
    socket: Option<OwnedFd>,
    uffd: OwnedFd,
    /// The client process (`None` where the kernel cannot name it: it is then ended by its
    /// socket's hang-up).
    pidfd: Option<OwnedFd>,
    regions: Vec<Reg>,
    peer: PeerCred,
    removed: RangeSet,
    stats: Option<Stats>,
    /// The session's served log (see [`faultline::served`]), handed to every worker.
    served: Option<OwnedFd>,
}

struct Worker {
    child: Child,
    /// The control socket, shared (not duplicated) with the main loop's poll: a `dup` there
    /// needed a free fd, which a daemon at its open-file limit may not have.
    control: Arc<OwnedFd>,
    started: Instant,
    /// It reported that it serves.
    ready: bool,
    /// When it last reported anything.
    heard: Instant,
    /// Why it cannot start, as it reported.
    cannot_start: Option<String>,
}

/// Start a worker and hand it the snapshot (its first message).
fn spawn_worker(
    config: &DaemonConfig,
    command: &WorkerCommand,
    pinned: &Pinned,
    resuming: bool,
) -> Result<Worker> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::SocketPair {
        purpose: "the worker's control socket pair",
        source: e.into(),
    })?;
    let mut cmd = Command::new(&command.program);
    cmd.args(&command.args).stdin(Stdio::from(theirs));
    let child = cmd.spawn().map_err(|source| Error::SpawnWorker {
        program: command.program.clone(),
        source,
    })?;
    tracing::info!(worker = child.id(), "worker started");
    let init = InitMsg {
        len: pinned.len,
        modified: pinned.modified,
        names: pinned.files.iter().map(|(_, n)| n.clone()).collect(),
        remote_id: pinned.remote_id,
        image_id: pinned.image_id,
        config: config.clone(),
        resuming,
    };
    let fds: Vec<BorrowedFd<'_>> = pinned.files.iter().map(|(f, _)| f.as_fd()).collect();
    // A worker that died already shows as a hang-up on the control socket: handled there.
    if let Err(e) = send_msg(ours.as_fd(), &init, &fds) {
        tracing::warn!(error = %e, "cannot hand the snapshot to the worker");
    }
    Ok(Worker {
        child,
        control: Arc::new(ours),
        started: Instant::now(),
        ready: false,
        heard: Instant::now(),
        cannot_start: None,
    })
}

/// Hand a session to the worker: for one taken over from a dead worker, its removed ranges (in
/// bounded chunks) and counters go with it.
fn hand_over(control: BorrowedFd<'_>, id: u64, r: &Record, resume: bool) -> std::io::Result<()> {
    if resume {
        for ranges in r.removed.chunks(REMOVED_CHUNK) {
            send_msg(control, &ToWorker::Removed { id, ranges }, &[])?;
        }
    }
    let msg = ToWorker::Session(Box::new(SessionMsg {
        id,
        pid: r.peer.pid,
        uid: r.peer.uid,
        regions: r.regions.clone(),
        resume,
        carried: if resume { r.stats } else { None },
        pidfd: r.pidfd.is_some(),
        served: r.served.is_some(),
    }));
    let mut fds = vec![r.uffd.as_fd()];
    fds.extend(r.pidfd.as_ref().or(r.socket.as_ref()).map(AsFd::as_fd));
    fds.extend(r.served.as_ref().map(AsFd::as_fd));
    send_msg(control, &msg, &fds)
}

/// The supervisor's state shared with the handshake threads.
struct Shared {
    records: Mutex<HashMap<u64, Record>>,
    worker: Mutex<Option<Worker>>,
    next_id: AtomicU64,
    /// No worker served for longer than the worker down limit: new clients are refused.
    given_up: AtomicBool,
}

/// What the supervisor knows about starting workers.
struct Restarts {
    /// Deaths in a row of workers that died young.
    failures: u32,
    /// When to start the next worker (none running).
    next_start: Option<Instant>,
    /// No worker has served since then.
    down_since: Option<Instant>,
    /// The last start-up failure logged, when, and how many times it recurred since.
    last_cause: Option<(String, Instant, u64)>,
}

impl Restarts {
    /// The worker `w` died (reaped, with `status`): schedule its successor.
    fn died(&mut self, w: &Worker, now: Instant) -> Duration {
        if w.started.elapsed() >= HEALTHY {
            self.failures = 0;
        }
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => BACKOFF_MIN
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(BACKOFF_MAX),
        };
        self.failures = self.failures.saturating_add(1);
        self.next_start = Some(now + delay);
        if !w.ready {
            self.down_since.get_or_insert(now);
        } else {
            self.down_since = Some(now);
        }
        delay
    }

    /// Log a start-up failure: once per cause per [`CAUSE_LOG_EVERY`], with how often it recurred.
    fn cannot_start(&mut self, worker: u32, error: &str, retry_in: Duration) {
        let now = Instant::now();
        if let Some((cause, at, repeats)) = &mut self.last_cause {
            if cause == error && now.duration_since(*at) < CAUSE_LOG_EVERY {
                *repeats += 1;
                return;
            }
        }
        let repeats = match self.last_cause.take() {
            Some((cause, _, n)) if cause == error => n,
            _ => 0,
        };
        tracing::error!(
            worker,
            error,
            attempts = self.failures,
            repeats_since_last_line = repeats,
            retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
            "the serve worker cannot start; retrying with backoff"
        );
        self.last_cause = Some((error.to_string(), now, 0));
    }
}

/// End the VMs of every live session (no worker could serve them for `limit`): SIGKILL through
/// each client's pidfd, logged; their records go.
fn end_unserved(shared: &Shared, limit: Duration) {
    let mut recs = lock(&shared.records);
    for (id, r) in recs.drain() {
        let killed = r
            .pidfd
            .as_ref()
            .map(|p| rustix::process::pidfd_send_signal(p, rustix::process::Signal::KILL));
        match killed {
            Some(Ok(())) => tracing::error!(
                session = id,
                pid = r.peer.pid,
                limit_s = limit.as_secs(),
                "no serve worker for the limit: ended the VM (SIGKILL)"
            ),
            Some(Err(Errno::SRCH)) => tracing::info!(
                session = id,
                pid = r.peer.pid,
                "no serve worker for the limit: the VM had already exited; its session is dropped"
            ),
            Some(Err(e)) => tracing::error!(
                session = id,
                pid = r.peer.pid,
                error = %e,
                "no serve worker for the limit: cannot kill the VM; its session is dropped"
            ),
            None => tracing::error!(
                session = id,
                pid = r.peer.pid,
                "no serve worker for the limit and no pidfd of the VM: its session is dropped"
            ),
        }
    }
}

/// A supervised daemon: this process accepts clients and keeps their sessions; a worker process
/// serves them, and is restarted (its sessions resumed) when it dies. See the [module
/// docs](crate::supervisor).
pub struct Supervisor {
    shared: Arc<Shared>,
    term: Arc<AtomicBool>,
    wake: UnixStream,
    main: Option<JoinHandle<Result<()>>>,
    socket: PathBuf,
}

impl Supervisor {
    /// Open the snapshot (once: every worker serves these files), bind `socket`, start the first
    /// worker with `command` and start accepting clients. The worker program must run
    /// [`worker::main_if_worker`](crate::worker::main_if_worker) (or [`worker::run`](crate::worker::run))
    /// when started with `command`'s arguments.
    pub fn start(
        config: &DaemonConfig,
        socket: impl AsRef<Path>,
        command: WorkerCommand,
    ) -> Result<Supervisor> {
        let args = config;
        let socket = socket.as_ref().to_path_buf();
        let term = Arc::new(AtomicBool::new(false));
        let (sig_rx, sig_tx) = UnixStream::pair().map_err(|source| Error::SocketPair {
            purpose: "the supervisor's wake-up socket pair",
            source,
        })?;
        // Open the snapshot once, here: every worker serves these files and this identity (a bad
        // flag fails at once, too).
        let pinned = Pinned::open(args)?;
        if let Some(p) = &args.prefetch_ws {
            faultline::WorkingSet::load(p).map_err(|source| Error::WorkingSet {
                path: p.clone(),
                source,
            })?;
        }
        let down_limit = args.worker_down_limit.max(Duration::from_secs(1));
        let hang_limit = args.worker_hang_limit.max(Duration::from_secs(1));
        let listener = bind(&socket)?;
        let shared = Arc::new(Shared {
            records: Mutex::new(HashMap::new()),
            worker: Mutex::new(Some(spawn_worker(args, &command, &pinned, false)?)),
            next_id: AtomicU64::new(1),
            given_up: AtomicBool::new(false),
        });

        // Accept on a thread; each handshake on its own thread; accepted sessions go to the worker.
        let limits = faultline::firecracker::Limits {
            timeout: args.handshake_timeout.max(Duration::from_secs(1)),
            mem_len: Some(pinned.len),
            ..Default::default()
        };
        let shared2 = Arc::clone(&shared);
        let end_refused = args.end_refused_clients;
        let served_log_errors =
            faultline::ratelimit::LogLimit::with_window(crate::accept::LOG_WINDOW);
        let dispatch = Box::new(move |c: Accepted| {
            if shared2.given_up.load(Ordering::Acquire) {
                tracing::error!(
                    pid = c.peer.pid,
                    "no serve worker can start: client refused; connection closed"
                );
                if end_refused {
                    crate::accept::end_refused_client(
                        c.pidfd.as_ref(),
                        c.peer.pid,
                        "no serve worker can start",
                    );
                }
                return;
            }
            let id = shared2.next_id.fetch_add(1, Ordering::AcqRel);
            let regions = c
                .regions
                .iter()
                .map(|r| Reg {
                    start: r.start,
                    len: r.len,
                    page_size: r.page_size,
                    offset: r.offset,
                })
                .collect();
            // Which pages were made present, kept here so that a successor of a dead worker
            // serves zeros where they were zapped since. Without one (no memory for a memfd),
            // the session is served all the same, and the gap is logged.
            let served = match faultline::ServedLog::memfd() {
                Ok(log) => Some(OwnedFd::from(log.into_file())),
                Err(e) => {
                    if served_log_errors.allow("memfd") {
                        tracing::warn!(
                            session = id,
                            error = %e,
                            "no served log for this session: after a worker restart, a page \
                             zapped while no worker ran would be served its snapshot bytes"
                        );
                    }
                    None
                }
            };
            let record = Record {
                socket: c.socket,
                uffd: c.uffd.into_fd(),
                pidfd: c.pidfd,
                regions,
                peer: c.peer,
                removed: RangeSet::default(),
                stats: None,
                served,
            };
            // Hold the records lock while handing over, so a worker restart cannot miss it.
            let mut recs = lock(&shared2.records);
            let w = lock(&shared2.worker);
            match w.as_ref() {
                Some(w) => {
                    if let Err(e) = hand_over(w.control.as_fd(), id, &record, false) {
                        tracing::warn!(error = %e, "worker unavailable; the session will be handed to its successor");
                    }
                }
                None => tracing::warn!(
                    session = id,
                    "no serve worker at the moment; the session will be handed to the next one"
                ),
            }
            recs.insert(id, record);
        });
        let ctx = Arc::new(ConnCtx::new(
            args,
            limits,
            Arc::new(AtomicU64::new(0)),
            dispatch,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(|source| Error::SocketPair {
            purpose: "the accept loop's wake-up socket pair",
            source,
        })?;
        let accept = {
            let (stop, ctx) = (Arc::clone(&stop), Arc::clone(&ctx));
            std::thread::Builder::new()
                .name("faultline-accept".into())
                .spawn(move || accept_loop(listener, wake_rx, stop, ctx))
                .map_err(|source| Error::Thread {
                    name: "accept loop",
                    source,
                })?
        };
        tracing::info!(socket = %socket.display(), snapshot = %args.snapshot_name(), "serving (supervised)");
        let main = MainLoop {
            config: args.clone(),
            command,
            pinned,
            shared: Arc::clone(&shared),
            term: Arc::clone(&term),
            sig_rx,
            down_limit,
            hang_limit,
            accept,
            stop,
            wake_tx,
            socket: socket.clone(),
        };
        let main = std::thread::Builder::new()
            .name("faultline-supervisor".into())
            .spawn(move || main.run())
            .map_err(|source| Error::Thread {
                name: "supervisor",
                source,
            })?;
        Ok(Supervisor {
            shared,
            term,
            wake: sig_tx,
            main: Some(main),
            socket,
        })
    }

    /// Sessions live now (handed to the worker, or waiting for the next one).
    pub fn sessions(&self) -> usize {
        lock(&self.shared.records).len()
    }

    /// Each live session's id and its latest counters as the worker reported them (every
    /// 500 ms; `None` before its first report), in id order. The fault server's own metrics
    /// are the worker's: see [`DaemonConfig::metrics`].
    pub fn session_stats(&self) -> Vec<(u64, Option<Stats>)> {
        let mut v: Vec<(u64, Option<Stats>)> = lock(&self.shared.records)
            .iter()
            .map(|(&id, r)| (id, r.stats))
            .collect();
        v.sort_by_key(|&(id, _)| id);
        v
    }

    /// The worker process's id, while one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        lock(&self.shared.worker).as_ref().map(|w| w.child.id())
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop: stop accepting, ask the worker to stop (it drains first if the config says so) and
    /// wait for it to exit, remove the socket.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_main()
    }

    /// A handle that stops the supervisor from another thread (a signal handler's thread, say),
    /// as [`Supervisor::shutdown`] does; [`Supervisor::wait`] then returns.
    pub fn stop_handle(&self) -> Result<StopHandle> {
        Ok(StopHandle {
            term: Arc::clone(&self.term),
            wake: self.wake.try_clone().map_err(|source| Error::SocketPair {
                purpose: "a stop handle's copy of the supervisor's wake-up socket",
                source,
            })?,
        })
    }

    /// Block until the supervisor stops: through a [`StopHandle`], or because its main loop
    /// failed (the error is returned; the daemon no longer supervises anything then).
    pub fn wait(mut self) -> Result<()> {
        self.join_main()
    }

    fn stop_main(&mut self) -> Result<()> {
        self.term.store(true, Ordering::Release);
        let _ = std::io::Write::write_all(&mut &self.wake, b"x");
        self.join_main()
    }

    fn join_main(&mut self) -> Result<()> {
        match self.main.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::SupervisorPanicked),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.main.is_some() {
            if let Err(e) = self.stop_main() {
                tracing::error!(error = %chain(&e), "the supervisor stopped with an error");
            }
        }
    }
}

/// Stops a [`Supervisor`] from anywhere (see [`Supervisor::stop_handle`]).
#[derive(Debug)]
pub struct StopHandle {
    term: Arc<AtomicBool>,
    wake: UnixStream,
}

impl StopHandle {
    /// Stop the supervisor (stop accepting, stop the worker, remove the socket); returns at once.
    pub fn stop(&self) {
        self.term.store(true, Ordering::Release);
        let _ = std::io::Write::write_all(&mut &self.wake, b"x");
    }
}

/// The supervisor's main loop and what it owns.
struct MainLoop {
    config: DaemonConfig,
    command: WorkerCommand,
    pinned: Pinned,
    shared: Arc<Shared>,
    term: Arc<AtomicBool>,
    sig_rx: UnixStream,
    down_limit: Duration,
    hang_limit: Duration,
    accept: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    wake_tx: UnixStream,
    socket: PathBuf,
}

impl MainLoop {
    /// Reports from the worker, the worker's death, restarts, the stop request.
    fn run(self) -> Result<()> {
        let MainLoop {
            config: args,
            command,
            pinned,
            shared,
            term,
            sig_rx,
            down_limit,
            hang_limit,
            accept,
            stop,
            wake_tx,
            socket,
        } = self;
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut restarts = Restarts {
            failures: 0,
            next_start: None,
            down_since: Some(Instant::now()),
            last_cause: None,
        };
        let mut b = [0u8; 64];
        loop {
            if term.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            // Sessions without a worker for too long: their VMs end.
            if let Some(down) = restarts.down_since {
                if now.duration_since(down) >= down_limit {
                    if !shared.given_up.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                        limit_s = down_limit.as_secs(),
                        "no serve worker for the limit: ending the live sessions' VMs and refusing new clients until one starts"
                    );
                    }
                    end_unserved(&shared, down_limit);
                }
            }
            // Start the next worker when its time has come.
            if let Some(at) = restarts.next_start {
                if now >= at {
                    restarts.next_start = None;
                    let recs = lock(&shared.records);
                    let mut w = lock(&shared.worker);
                    match spawn_worker(&args, &command, &pinned, !recs.is_empty()) {
                        Ok(nw) => {
                            let mut handed = 0;
                            for (id, r) in recs.iter() {
                                match hand_over(nw.control.as_fd(), *id, r, true) {
                                    Ok(()) => handed += 1,
                                    Err(e) => {
                                        // Kept: the worker died meanwhile, its successor gets it.
                                        tracing::error!(session = id, error = %e, "cannot hand a session to the new worker");
                                        break;
                                    }
                                }
                            }
                            tracing::debug!(sessions = handed, "sessions handed to the new worker");
                            *w = Some(nw);
                        }
                        Err(e) => {
                            tracing::error!(error = %chain(&e), "cannot start a serve worker");
                            restarts.failures = restarts.failures.saturating_add(1);
                            restarts.next_start = Some(now + BACKOFF_MAX);
                        }
                    }
                }
            }
            // A worker that has said nothing for the hang limit (stopped, or wedged) is killed; its
            // death is then handled like any other (a successor resumes every session).
            let hung = lock(&shared.worker).as_ref().and_then(|w| {
                (w.ready && now.duration_since(w.heard) >= hang_limit).then(|| w.child.id())
            });
            if let Some(pid) = hung {
                tracing::error!(
                worker = pid,
                limit_s = hang_limit.as_secs(),
                "the worker has said nothing for the hang limit (stopped or wedged): killing it; its successor resumes every session"
            );
                if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                if let Some(w) = lock(&shared.worker).as_mut() {
                    w.ready = false; // killed once; its death comes through the control socket
                }
            }
            let heard_by = lock(&shared.worker)
                .as_ref()
                .filter(|w| w.ready)
                .map(|w| w.heard + hang_limit);
            let control = lock(&shared.worker)
                .as_ref()
                .map(|w| Arc::clone(&w.control));
            // Wake for the next start, the down limit or the hang limit, whichever comes first.
            let wake_at = [
                heard_by,
                restarts.next_start,
                restarts
                    .down_since
                    .filter(|_| !shared.given_up.load(Ordering::Acquire))
                    .map(|d| d + down_limit),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = wake_at.map(|at| {
                let d = at.saturating_duration_since(Instant::now());
                Timespec {
                    tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(d.subsec_nanos()),
                }
            });
            let mut fds = vec![PollFd::new(&sig_rx, PollFlags::IN)];
            if let Some(c) = &control {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(Error::Poll { source: e.into() }),
            }
            if !fds[0].revents().is_empty() {
                let _ = (&sig_rx).read(&mut b);
                continue;
            }
            let readable = fds.get(1).is_some_and(|f| !f.revents().is_empty());
            drop(fds);
            let Some(control) = control else { continue };
            if !readable {
                continue;
            }
            let received = recv_msg(control.as_fd());
            if let (Ok(Some(_)), Some(w)) = (&received, lock(&shared.worker).as_mut()) {
                w.heard = Instant::now();
            }
            match received {
                Ok(Some((bytes, _))) => match serde_json::from_slice::<Report>(&bytes) {
                    Ok(Report::Alive) => {}
                    Ok(Report::Ready) => {
                        if let Some(w) = lock(&shared.worker).as_mut() {
                            w.ready = true;
                        }
                        if restarts.down_since.take().is_some()
                            && shared.given_up.swap(false, Ordering::AcqRel)
                        {
                            tracing::info!("a serve worker started again; accepting clients");
                        }
                        restarts.last_cause = None;
                    }
                    Ok(Report::CannotStart { error }) => {
                        if let Some(w) = lock(&shared.worker).as_mut() {
                            w.cannot_start = Some(error);
                        }
                    }
                    Ok(Report::Ended { id, .. }) => {
                        lock(&shared.records).remove(&id);
                    }
                    Ok(Report::Removed { id, start, end }) => {
                        if let Some(rec) = lock(&shared.records).get_mut(&id) {
                            rec.removed.insert(start, end);
                        }
                    }
                    Ok(Report::Counters { id, stats }) => {
                        if let Some(rec) = lock(&shared.records).get_mut(&id) {
                            tracing::debug!(session = id, pages = stats.pages, "session counters");
                            rec.stats = Some(stats);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed report from the worker"),
                },
                Ok(None) | Err(_) => {
                    // The worker is gone: reap it and schedule its successor.
                    let recs = lock(&shared.records);
                    let mut slot = lock(&shared.worker);
                    let Some(mut w) = slot.take() else { continue };
                    let status = w
                        .child
                        .wait()
                        .map_err(|source| Error::ReapWorker { source })?;
                    if term.load(Ordering::Acquire) {
                        break;
                    }
                    let delay = restarts.died(&w, Instant::now());
                    match &w.cannot_start {
                        Some(error) => restarts.cannot_start(w.child.id(), error, delay),
                        None if status.code() == Some(EXIT_CANNOT_START) => {
                            restarts.cannot_start(w.child.id(), "(no reason given)", delay)
                        }
                        None => {
                            let removed: usize = recs.values().map(|r| r.removed.len()).sum();
                            tracing::error!(
                                worker = w.child.id(),
                                %status,
                                sessions = recs.len(),
                                removed_ranges = removed,
                                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                                "worker died; restarting it and resuming every session"
                            );
                        }
                    }
                }
            }
        }
        tracing::info!("supervisor stopping");
        stop.store(true, Ordering::Release);
        let _ = std::io::Write::write_all(&mut &wake_tx, b"x");
        let _ = accept.join();
        if let Some(w) = lock(&shared.worker).as_mut() {
            stop_worker(&mut w.child);
        }
        let _ = std::fs::remove_file(&socket);
        Ok(())
    }
}

/// Ask the worker to stop (SIGTERM) and wait for it to exit. The signal is sent again every
/// second while it lives: one that lands while the worker is still starting can go unseen (a CI
/// run here once saw a freshly started worker outlive a single SIGTERM), and the worker's handler
/// only sets a flag, so a repeat is harmless — a draining worker keeps draining.
fn stop_worker(child: &mut Child) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pid = rustix::process::Pid::from_child(child);
    // Readable when the process exits; without it (very old kernels), one signal and a wait.
    if let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        let second = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        for waited_s in 0u64.. {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            if matches!(poll(&mut fds, Some(&second)), Ok(n) if n > 0) {
                break;
            }
            if waited_s > 0 && waited_s % 5 == 0 {
                tracing::warn!(
                    worker = child.id(),
                    waited_s,
                    "the worker has not exited yet"
                );
            }
        }
    } else {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_reset_after_a_healthy_worker() {
        let mut r = Restarts {
            failures: 0,
            next_start: None,
            down_since: None,
            last_cause: None,
        };
        let young = |ready| Worker {
            child: Command::new("true").spawn().expect("spawning true"),
            control: Arc::new(
                rustix::net::socketpair(
                    AddressFamily::UNIX,
                    SocketType::SEQPACKET,
                    SocketFlags::CLOEXEC,
                    None,
                )
                .expect("socketpair")
                .0,
            ),
            started: Instant::now(),
            heard: Instant::now(),
            ready,
            cannot_start: None,
        };
        let now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..10 {
            let mut w = young(false);
            delays.push(r.died(&w, now).as_millis());
            let _ = w.child.wait();
        }
        assert_eq!(
            delays,
            [0, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        let mut old = young(true);
        old.started = now - HEALTHY;
        assert_eq!(r.died(&old, now), Duration::ZERO);
        let _ = old.child.wait();
    }
}
