//! Crash recovery for `faultline serve`: a supervisor process and a worker process.
//!
//! A page-fault handler is on the critical path of every VM it serves: if it dies, the guests
//! freeze (Firecracker keeps its own copy of the userfaultfd, so nothing reads zero pages, but
//! nothing serves them either). So `faultline serve` splits in two:
//!
//! - the **supervisor** owns what must survive: the listening socket, the snapshot (opened once
//!   at start: the open files, never their paths, are handed to every worker, and the source's
//!   identity is pinned), and for every live session the client's socket, a duplicate of its
//!   userfaultfd, a pidfd of its process (SO_PEERPIDFD, or opened from SO_PEERCRED's pid), its validated regions, the ranges its balloon removed
//!   (merged) and its latest counters. It accepts clients, receives and validates their
//!   handshakes, and hands each session to the worker over a `SOCK_SEQPACKET` socket pair (JSON +
//!   the userfaultfd and the pidfd; the socket instead where the kernel cannot name the client
//!   process). The client's socket stays with the supervisor.
//! - the **worker** (`faultline serve-worker`, the same binary, the pair on its stdin) runs the fault
//!   server. Its first message is the snapshot's files; it tells the supervisor when it is ready
//!   (or why it cannot start), when a session ends, every REMOVE it applies and, every 500 ms,
//!   each session's counters.
//!
//! When the worker dies (a crash, an OOM kill, SIGKILL), the supervisor starts a new one and hands
//! it every live session again, marked `resume`, with the session's id and counters: the new
//! worker applies the recorded REMOVEs (those pages still read zero), then wakes every thread
//! blocked on each region — faults whose messages the dead worker had read but not resolved fault
//! again and are served; pages already present stay (a resolve of one answers EEXIST and is
//! counted, never overwritten). The session keeps its id, and its end summary covers its whole
//! life.
//!
//! A worker that cannot start (its source refuses it, say) is restarted with backoff (100 ms
//! doubling to 10 s; at once after a worker that lived 10 s), its cause logged once a minute at
//! most. Sessions left without a worker for `--worker-down-limit` seconds have their VMs ended
//! (SIGKILL through the client's pidfd, logged): a fault never waits without a bound.
//!
//! When the supervisor dies (SIGKILL), the worker keeps serving the sessions it has until each
//! ends, then exits; nothing new reaches it (the listening socket died with the supervisor).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use faultline::firecracker::{PeerCred, ValidatedRegion};
use faultline::Stats;
use faultline_uffd::Uffd;
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::serve::{
    accept_loop, bind, Accepted, ConnCtx, Core, Handed, Handover, Hooks, OnExit, Pinned, ServeArgs,
};

/// Lock `m`, recovering the guard from a poisoned lock: the data behind the supervisor's locks
/// (records, the worker) stays consistent at every step a panic could interrupt, and work is
/// never skipped because some other thread panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most ranges per `Removed` message (a few dozen bytes each in JSON): the messages stay far
/// below a `SOCK_SEQPACKET` socket's send buffer whatever the balloon did.
const REMOVED_CHUNK: usize = 2048;

/// How often the worker reports each session's counters.
const COUNTERS_EVERY: Duration = Duration::from_millis(500);

/// A worker that lived this long was healthy: the next restart is immediate.
const HEALTHY: Duration = Duration::from_secs(10);

/// First and longest pause between restarts of a worker that keeps dying young.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The same start-up failure is logged at most this often.
const CAUSE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The worker exits with this code when it cannot start (it reported why first).
const EXIT_CANNOT_START: i32 = 3;

/// Most files a snapshot hands to a worker (an image and its layers of diffs).
const MAX_FILES: usize = 32;

/// A region as the supervisor keeps it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Reg {
    start: u64,
    len: u64,
    page_size: u64,
    offset: u64,
}

/// Supervisor → worker, first: the snapshot, its files attached in this order.
#[derive(Debug, Serialize, Deserialize)]
struct InitMsg {
    len: u64,
    modified: Option<(i64, i64)>,
    names: Vec<String>,
    remote_id: Option<u64>,
    image_id: Option<String>,
}

/// Supervisor → worker, after [`InitMsg`].
#[derive(Debug, Serialize, Deserialize)]
enum ToWorker {
    /// Ranges a session's balloon removed, sent in bounded chunks before its `Session`.
    Removed { id: u64, ranges: Vec<(u64, u64)> },
    /// A session, its userfaultfd and socket attached.
    Session(Box<SessionMsg>),
}

#[derive(Debug, Serialize, Deserialize)]
struct SessionMsg {
    id: u64,
    pid: i32,
    uid: u32,
    regions: Vec<Reg>,
    /// Taken over from a dead worker (its removed ranges came before this message).
    resume: bool,
    /// The session's counters so far.
    carried: Option<Stats>,
    /// The second fd is a pidfd of the client process (else the client's socket, whose
    /// hang-up then ends the session).
    #[serde(default)]
    pidfd: bool,
}

/// Worker → supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    /// The worker serves.
    Ready,
    /// The worker cannot start, and exits.
    CannotStart {
        error: String,
    },
    Ended {
        id: u64,
        stats: Option<Stats>,
    },
    Removed {
        id: u64,
        start: u64,
        end: u64,
    },
    /// A session's counters (its whole life so far).
    Counters {
        id: u64,
        stats: Stats,
    },
    /// The worker runs (sent every [`COUNTERS_EVERY`]): one that says nothing for
    /// `--worker-hang-limit` (SIGSTOPped, wedged) is killed and replaced.
    Alive,
}

/// Byte ranges, kept merged: overlapping and adjacent ranges are one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Add `start..end`.
    fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let within: Vec<u64> = self.0.range(s..=e).map(|(&k, _)| k).collect();
        for k in within {
            if let Some(v) = self.0.remove(&k) {
                e = e.max(v);
            }
        }
        self.0.insert(s, e);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The ranges in order, at most `n` at a time.
    fn chunks(&self, n: usize) -> Vec<Vec<(u64, u64)>> {
        let all: Vec<(u64, u64)> = self.0.iter().map(|(&s, &e)| (s, e)).collect();
        all.chunks(n.max(1)).map(<[_]>::to_vec).collect()
    }
}

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
}

/// Send one message with fds on a SEQPACKET socket.
fn send_msg(
    fd: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    send_msg_with(fd, msg, fds, SendFlags::NOSIGNAL)
}

/// [`send_msg`] that gives up at once (EAGAIN) when the socket's buffer is full: for reports
/// that a later one replaces (a session's counters), so the sender never waits on a supervisor
/// that is itself waiting on this worker.
fn try_send_msg(fd: BorrowedFd<'_>, msg: &impl Serialize) -> std::io::Result<()> {
    send_msg_with(fd, msg, &[], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

fn send_msg_with(
    fd: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg)?;
    let rights = SendAncillaryMessage::ScmRights(fds);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rights.size()];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rights) {
        return Err(std::io::Error::other("SCM_RIGHTS does not fit"));
    }
    loop {
        match sendmsg(fd, &[IoSlice::new(&bytes)], &mut control, flags) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one message with its fds; `None` when the peer is gone.
fn recv_msg(fd: BorrowedFd<'_>) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FILES))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let n = loop {
        match recvmsg(
            fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            // A peer that exits with messages unread in its queue (sessions handed to a worker
            // that could not start) reports ECONNRESET once; what it sent before is still
            // queued, then the end.
            Err(Errno::INTR) | Err(Errno::CONNRESET) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
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
fn spawn_worker(args: &ServeArgs, pinned: &Pinned) -> Result<Worker> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let exe = std::env::current_exe().context("finding the faultline binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve-worker")
        .args(worker_flags(args))
        .stdin(Stdio::from(theirs));
    let child = cmd.spawn().context("starting the serve worker")?;
    tracing::info!(worker = child.id(), "worker started");
    let init = InitMsg {
        len: pinned.len,
        modified: pinned.modified,
        names: pinned.files.iter().map(|(_, n)| n.clone()).collect(),
        remote_id: pinned.remote_id,
        image_id: pinned.image_id.as_ref().map(|id| faultline::image::hex(id)),
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
/// The worker's command line: the serving flags of `args` (not the socket: the supervisor has it).
fn worker_flags(a: &ServeArgs) -> Vec<String> {
    let mut v = vec![
        "--socket".into(),
        a.socket.display().to_string(),
        "--readahead".into(),
        format!("{:?}", a.readahead).to_lowercase(),
        "--readahead-pages".into(),
        a.readahead_pages.to_string(),
        "--readahead-min-pages".into(),
        a.readahead_min_pages.to_string(),
        "--log-format".into(),
        format!("{:?}", a.log_format).to_lowercase(),
        "--on-exit".into(),
        format!("{:?}", a.on_exit).to_lowercase(),
        "--handshake-timeout".into(),
        a.handshake_timeout.to_string(),
        "--on-unservable".into(),
        format!("{:?}", a.on_unservable).to_lowercase(),
        "--fault-deadline".into(),
        a.fault_deadline.to_string(),
    ];
    if a.simulate_no_poison {
        v.push("--simulate-no-poison".into());
    }
    if let Some(p) = &a.mem_file {
        v.extend(["--mem-file".into(), p.display().to_string()]);
    }
    if let Some(p) = &a.image {
        v.extend(["--image".into(), p.display().to_string()]);
    }
    if let Some(id) = &a.image_id {
        v.extend(["--image-id".into(), faultline::image::hex(id)]);
    }
    if let Some(r) = &a.remote {
        v.extend(["--remote".into(), r.clone()]);
        v.extend(a.remote_flags.to_args());
    }
    v.extend(a.object.to_args());
    if let Some(w) = a.workers {
        v.extend(["--workers".into(), w.to_string()]);
    }
    if a.pin_workers {
        v.push("--pin-workers".into());
    }
    if let Some(p) = &a.record_ws {
        v.extend(["--record-ws".into(), p.display().to_string()]);
    }
    if let Some(p) = &a.prefetch_ws {
        v.extend(["--prefetch-ws".into(), p.display().to_string()]);
    }
    if a.background_fill {
        v.push("--background-fill".into());
    }
    if let Some(m) = &a.metrics {
        v.extend(["--metrics".into(), m.clone()]);
    }
    if a.no_zero_scan {
        v.push("--no-zero-scan".into());
    }
    v
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
    }));
    let mut fds = vec![r.uffd.as_fd()];
    fds.extend(r.pidfd.as_ref().or(r.socket.as_ref()).map(AsFd::as_fd));
    send_msg(control, &msg, &fds)
}

/// The supervisor's state shared with the handshake threads.
struct Shared {
    records: Mutex<HashMap<u64, Record>>,
    worker: Mutex<Option<Worker>>,
    next_id: AtomicU64,
    /// No worker served for longer than `--worker-down-limit`: new clients are refused.
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

/// `faultline serve` (supervised): run until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    // Open the snapshot once, here: every worker serves these files and this identity (a bad
    // flag fails at once, too).
    let pinned = Pinned::open(&args)?;
    if let Some(p) = &args.prefetch_ws {
        faultline::WorkingSet::load(p)
            .with_context(|| format!("reading the working set {}", p.display()))?;
    }
    let down_limit = Duration::from_secs(args.worker_down_limit.max(1));
    let hang_limit = Duration::from_secs(args.worker_hang_limit.max(1));
    let listener = bind(&args.socket)?;
    let shared = Arc::new(Shared {
        records: Mutex::new(HashMap::new()),
        worker: Mutex::new(Some(spawn_worker(&args, &pinned)?)),
        next_id: AtomicU64::new(1),
        given_up: AtomicBool::new(false),
    });

    // Accept on a thread; each handshake on its own thread; accepted sessions go to the worker.
    let limits = faultline::firecracker::Limits {
        timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        mem_len: Some(pinned.len),
        ..Default::default()
    };
    let shared2 = Arc::clone(&shared);
    let dispatch = Box::new(move |c: Accepted| {
        if shared2.given_up.load(Ordering::Acquire) {
            tracing::error!(
                pid = c.peer.pid,
                "no serve worker can start: client refused; connection closed"
            );
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
        let record = Record {
            socket: c.socket,
            uffd: c.uffd.into_fd(),
            pidfd: c.pidfd,
            regions,
            peer: c.peer,
            removed: RangeSet::default(),
            stats: None,
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
        &args,
        limits,
        Arc::new(AtomicU64::new(0)),
        dispatch,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    let accept = {
        let (stop, ctx) = (Arc::clone(&stop), Arc::clone(&ctx));
        std::thread::Builder::new()
            .name("faultline-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, stop, ctx))?
    };
    tracing::info!(socket = %args.socket.display(), snapshot = %crate::serve::snapshot_name(&args), "serving (supervised)");

    // Main loop: reports from the worker, the worker's death, restarts, signals.
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
                match spawn_worker(&args, &pinned) {
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
                        tracing::error!(error = %format!("{e:#}"), "cannot start a serve worker");
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
            Err(e) => return Err(e.into()),
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
                let status = w.child.wait()?;
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
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
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

/// The worker's first message: the snapshot the supervisor opened.
fn receive_snapshot(control: BorrowedFd<'_>) -> Result<Handed> {
    let (bytes, fds) = recv_msg(control)?.context("the supervisor closed the control socket")?;
    let init: InitMsg = serde_json::from_slice(&bytes).context("the supervisor's first message")?;
    if init.names.len() != fds.len() {
        anyhow::bail!(
            "the supervisor named {} snapshot files and sent {}",
            init.names.len(),
            fds.len()
        );
    }
    let image_id = match &init.image_id {
        Some(hex) => Some(
            crate::serve::parse_image_id(hex)
                .map_err(|e| anyhow::anyhow!("the supervisor's image id: {e}"))?,
        ),
        None => None,
    };
    Ok(Handed {
        files: fds.into_iter().map(File::from).zip(init.names).collect(),
        remote_id: init.remote_id,
        image_id,
        len: Some(init.len),
        modified: init.modified,
    })
}

/// `faultline serve-worker`: the serving half; its stdin is the control socket.
pub fn run_worker(args: ServeArgs) -> Result<()> {
    crate::serve::init_logging(args.log_format);
    crate::serve::raise_fd_limit();
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    let stdin = std::io::stdin();
    let control: OwnedFd = stdin.as_fd().try_clone_to_owned()?;
    let control = Arc::new(control);
    // The snapshot comes from the supervisor (open files, never a path); a worker that cannot
    // serve it says why, once, to the supervisor, which logs it (rate-limited) and backs off.
    let core =
        match receive_snapshot(control.as_fd()).and_then(|h| Core::build_from(&args, Some(h))) {
            Ok(core) => Arc::new(core),
            Err(e) => {
                let error = format!("{e:#}");
                if send_msg(
                    control.as_fd(),
                    &Report::CannotStart {
                        error: error.clone(),
                    },
                    &[],
                )
                .is_err()
                {
                    tracing::error!(error, "cannot start, and the supervisor is gone");
                }
                std::process::exit(EXIT_CANNOT_START);
            }
        };
    let _ = send_msg(control.as_fd(), &Report::Ready, &[]);
    // Each session's counters go to the supervisor every COUNTERS_EVERY: a restarted worker
    // starts the session with them, so its summary covers its whole life.
    {
        let (core, control) = (Arc::clone(&core), Arc::clone(&control));
        std::thread::Builder::new()
            .name("faultline-counters".into())
            .spawn(move || loop {
                std::thread::sleep(COUNTERS_EVERY);
                let _ = try_send_msg(control.as_fd(), &Report::Alive);
                for s in core.server.sessions() {
                    let report = Report::Counters {
                        id: s.id(),
                        stats: s.stats(),
                    };
                    let _ = try_send_msg(control.as_fd(), &report);
                }
            })?;
    }
    // Sessions arrive on a thread; the main thread waits for the signal.
    {
        let (core, control) = (Arc::clone(&core), Arc::clone(&control));
        std::thread::Builder::new()
            .name("faultline-control".into())
            .spawn(move || control_loop(&core, &control))?;
    }
    let mut b = [0u8; 16];
    while !term.load(Ordering::Acquire) {
        let _ = (&sig_rx).read(&mut b);
    }
    tracing::info!(
        sessions = core.server.sessions().len(),
        started = core.started.load(Ordering::Relaxed),
        refused = core.refused.load(Ordering::Relaxed),
        "stopping"
    );
    if args.on_exit == OnExit::Drain {
        core.drain();
    }
    if !core.server.end_sessions(crate::serve::SESSION_END_LIMIT) {
        tracing::warn!("some sessions did not finish ending in time");
    }
    core.flush();
    Ok(())
}

/// The worker's side of the control socket: sessions from the supervisor until it is gone; then
/// the live sessions are served until each ends, and the worker exits.
fn control_loop(core: &Core, control: &Arc<OwnedFd>) {
    let mut removed: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    loop {
        let (bytes, fds) = match recv_msg(control.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let msg = match serde_json::from_slice::<ToWorker>(&bytes) {
            Ok(ToWorker::Session(m)) => *m,
            Ok(ToWorker::Removed { id, ranges }) => {
                removed.entry(id).or_default().extend(ranges);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "malformed message from the supervisor");
                continue;
            }
        };
        let id = msg.id;
        let removed = removed.remove(&id).unwrap_or_default();
        let mut fds = fds.into_iter();
        let (Some(uffd), second) = (fds.next(), fds.next()) else {
            tracing::error!(session = id, "session without its userfaultfd");
            continue;
        };
        let (pidfd, socket) = if msg.pidfd {
            (second, None)
        } else {
            (None, second)
        };
        let uffd = match Uffd::from_received_fd(uffd) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(session = id, error = %e, "not a userfaultfd");
                continue;
            }
        };
        let (c1, c2) = (Arc::clone(control), Arc::clone(control));
        let hooks = Hooks {
            ended: Some(Box::new(move |s: &faultline::SessionHandle| {
                let report = Report::Ended {
                    id,
                    stats: Some(s.stats()),
                };
                let _ = send_msg(c1.as_fd(), &report, &[]);
            })),
            removed: Some(faultline::RemoveHook(Box::new(move |start, end| {
                let _ = send_msg(c2.as_fd(), &Report::Removed { id, start, end }, &[]);
            }))),
        };
        let accepted = crate::serve::Accepted {
            uffd,
            regions: msg
                .regions
                .iter()
                .map(|r| ValidatedRegion {
                    start: r.start,
                    len: r.len,
                    page_size: r.page_size,
                    offset: r.offset,
                })
                .collect(),
            peer: PeerCred {
                pid: msg.pid,
                uid: msg.uid,
                gid: 0,
            },
            pidfd,
            socket,
        };
        if msg.resume {
            tracing::info!(
                session = id,
                pid = msg.pid,
                removed_ranges = removed.len(),
                carried_pages = msg.carried.map_or(0, |s| s.pages),
                "resuming a session of a dead worker"
            );
        }
        let handover = Handover {
            id: Some(id),
            resume: msg.resume,
            removed,
            carried: msg.carried,
        };
        if core.start_session(accepted, handover, hooks).is_err() {
            // From another thread: this one must go on reading, or a supervisor blocked sending
            // to it could never read this.
            let c = Arc::clone(control);
            let _ = std::thread::Builder::new()
                .name("faultline-report".into())
                .spawn(move || {
                    let _ = send_msg(c.as_fd(), &Report::Ended { id, stats: None }, &[]);
                });
        }
    }
    // The supervisor is gone (killed): nothing new can come, but the VMs served here must not
    // freeze. Serve each live session until it ends, then exit.
    let live = core.server.sessions();
    tracing::error!(
        sessions = live.len(),
        "the supervisor is gone; serving the live sessions until they end, then exiting"
    );
    loop {
        let live = core.server.sessions();
        let Some(s) = live.first() else { break };
        s.wait_closed(Duration::from_secs(1));
    }
    tracing::info!("the last session ended; the worker exits");
    core.flush();
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &RangeSet) -> Vec<(u64, u64)> {
        s.0.iter().map(|(&a, &b)| (a, b)).collect()
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let mut s = RangeSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(ranges(&s), [(10, 20), (30, 40)]);
        s.insert(20, 25); // adjacent to the first
        assert_eq!(ranges(&s), [(10, 25), (30, 40)]);
        s.insert(5, 10); // adjacent before
        assert_eq!(ranges(&s), [(5, 25), (30, 40)]);
        s.insert(24, 31); // bridges both
        assert_eq!(ranges(&s), [(5, 40)]);
        s.insert(0, 100); // swallows everything
        assert_eq!(ranges(&s), [(0, 100)]);
        s.insert(50, 60); // inside
        s.insert(7, 7); // empty
        assert_eq!(ranges(&s), [(0, 100)]);
    }

    #[test]
    fn the_same_page_removed_again_and_again_stays_one_range() {
        let mut s = RangeSet::default();
        for _ in 0..100_000 {
            s.insert(4096, 8192);
        }
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn chunks_bound_every_message() {
        let mut s = RangeSet::default();
        for i in 0..10_000u64 {
            s.insert(2 * i * 4096, (2 * i + 1) * 4096);
        }
        let chunks = s.chunks(REMOVED_CHUNK);
        assert_eq!(chunks.len(), 10_000usize.div_ceil(REMOVED_CHUNK));
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 10_000);
        // The largest message (ranges near the top of a 64-bit address space) is far below a
        // SEQPACKET socket's default send buffer (~208 KiB).
        let msg = ToWorker::Removed {
            id: u64::MAX,
            ranges: vec![(u64::MAX - 1, u64::MAX); REMOVED_CHUNK],
        };
        let len = serde_json::to_vec(&msg).expect("json").len();
        assert!(len < 100 << 10, "{len} bytes");
    }

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
