//! The fault server: epoll over many userfaultfds, N worker threads, page-state bitmaps.
//!
//! Every worker blocks in `epoll_wait` on one shared epoll instance that watches every session's
//! userfaultfd (level-triggered) and, optionally, a "watch" fd per session (a pidfd or the client's
//! socket) whose readiness means the client is gone. A worker that sees a userfaultfd readable
//! reads up to a buffer of messages with one `read(2)` (another worker may have emptied it: 0
//! messages is normal traffic), applies the non-fault events (REMOVE, UNMAP, REMAP, FORK) in order,
//! then serves the faults of the batch sorted by address, coalescing adjacent pages into one
//! resolve.
//!
//! Resolves never use DONTWAKE: each one wakes every thread blocked on its range — including
//! faults whose messages are still unread — so no `UFFDIO_WAKE` is ever needed (the stats count
//! them; the count stays zero). A fault on a page another worker is resolving is dropped; a fault
//! on a page believed present is resolved again (see [`crate::state`] for why that is both needed
//! and sufficient).
//!
//! Ordering rules: while a REMOVE (or UNMAP/REMAP/FORK) message is unread, every resolve fails
//! with EAGAIN; such work is deferred and retried after events were read, never dropped. A source
//! read that fails is retried with backoff if the error is retryable; when it still fails, the page
//! is poisoned (`UFFDIO_POISON`: the client gets SIGBUS there and only there) and the error is
//! logged with region, offset and cause. A resolve answered ESRCH means the client is gone: the
//! session ends, its fd is closed.
//!
//! Work order in each worker: demand faults first, then deferred retries that are due, then one
//! chunk of background work (readahead ahead of a sequential stream, working-set prefetch,
//! background fill), then back to `epoll_wait` with a zero timeout while background work remains.
//!
//! Where things live: this module holds the public API ([`Server`], [`ServerConfig`],
//! [`SessionOptions`], [`SessionHandle`]); `session` a session's state and its life (enter, close,
//! finish); `worker` the epoll loop, reading messages, applying events and claiming the faults of
//! a batch; `resolve` planning a run (removed pages, zero stretches, data) and the resolve ioctl
//! with what each errno means; `schedule` the queues beyond demand (deferred retries, readahead,
//! prefetch, fill) and their order; `unservable` the way out for pages with no right bytes
//! (POISON or the end of the client); `watchdog` the report of stuck faults and the deadline.

use crate::sync::{lock, read, write};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline_uffd::{Features, ResolveError, ResolveOp, Uffd};
use rustix::event::epoll;
use rustix::io::Errno;

use crate::inject::ResolveFaults;
use crate::policy::{Readahead, WorkingSet};
use crate::ratelimit::LogLimit;
use crate::region::{Region, RegionEntry, RegionError, RegionMap};
use crate::stats::{Counters, Stats};

mod idle;
mod resolve;
mod schedule;
mod session;
mod unservable;
mod watchdog;
mod worker;

pub use session::{Session, SessionHandle};
use watchdog::Current;
use worker::Worker;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Worker threads (default: number of CPUs).
    pub workers: usize,
    /// Readahead policy for demand faults.
    pub readahead: Readahead,
    /// Pin worker `i` to CPU `i % ncpus`.
    pub pin_workers: bool,
    /// Messages read per `read(2)`.
    pub batch: usize,
    /// Largest single resolve in bytes (background chunks and readahead windows are cut to it).
    pub max_io: usize,
    /// Workers that do background work (readahead beyond a fault's first chunk, working-set
    /// prefetch, fill) at once, at most; the others serve demand faults only. Zero: all.
    pub background_workers: usize,
    /// Make the copies of a background fill in the kernel's idle scheduling class (`SCHED_IDLE`),
    /// so that they take only CPU time the served threads leave (a worker something waits for is
    /// raised again at once; see the `idle` module). Ignored, with a warning, where a thread of
    /// the process cannot come back from that class (no `CAP_SYS_NICE`, `RLIMIT_NICE` 0).
    /// Readahead and working-set prefetch, which a fault is about to need, keep normal priority.
    pub idle_fill: bool,
    /// Bytes resolved first for a demand fault, so the faulting thread wakes early; the rest of
    /// the window follows in `max_io` pieces.
    pub first_chunk: usize,
    /// Shortest stretch of source zero pages resolved with ZEROPAGE (which maps the shared zero
    /// page: no memory used); shorter stretches are copied along with their neighbours.
    pub min_zero_run: usize,
    /// Attempts for a retryable source error before the page is poisoned.
    pub source_attempts: u32,
    /// First backoff between attempts (doubles each time).
    pub retry_backoff: Duration,
    /// The longest a claimed page may stay unresolved (EAGAIN after EAGAIN, a source retried
    /// and retried, a worker stuck in a source read): past it, the page is unservable and ends
    /// as [`SessionOptions::on_unservable`] says (poisoned, or the client killed), so no
    /// thread sleeps for ever on a fault the server read.
    pub fault_deadline: Duration,
    /// The watchdog logs (once per fault, with address and age) a fault unresolved this long.
    pub stuck_after: Duration,
    /// How long a fault at an address no region covers is kept, waiting for the REMAP that may
    /// explain it, before it is unservable (a client touching registered memory it never
    /// declared).
    pub orphan_grace: Duration,
    /// Features treated as missing though the kernel has them: `Features::POISON` makes the
    /// server behave as on a kernel before 6.6 (unservable pages end the client instead).
    pub missing_features: Features,
    /// Failure injection under the resolve ioctls (tests; see [`crate::inject`]).
    pub inject: Option<Arc<ResolveFaults>>,
}

impl ServerConfig {
    /// Workers for a server whose sources wait on the network (a remote page server): one more
    /// than the CPUs, so that while a worker waits for bytes the others keep every CPU copying.
    /// Measured (`faultline bench --remote`, 256 MiB, 2 vCPUs, same runs): a streamed restore
    /// took 71.7–80.1 ms with 3 workers against 81.1–86.5 ms with 2 (and 80–85 with 4), an
    /// on-demand one 97–105 ms against 130.
    pub fn network_workers() -> usize {
        ServerConfig::default().workers + 1
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            readahead: Readahead::default(),
            pin_workers: false,
            batch: 64,
            max_io: 1 << 20,
            background_workers: 0,
            idle_fill: true,
            first_chunk: 64 << 10,
            min_zero_run: 8,
            source_attempts: 4,
            retry_backoff: Duration::from_millis(2),
            fault_deadline: Duration::from_secs(60),
            stuck_after: Duration::from_secs(2),
            orphan_grace: Duration::from_secs(1),
            missing_features: Features::empty(),
            inject: None,
        }
    }
}

/// Options of one session (one userfaultfd).
#[derive(Debug, Default)]
pub struct SessionOptions {
    /// A name for logs.
    pub label: String,
    /// Record the order in which pages are first touched (readahead is turned off for the session
    /// so that every touch is seen).
    pub record_working_set: bool,
    /// Replay a recorded working set ahead of demand.
    pub prefetch: Option<WorkingSet>,
    /// Fill every remaining page in the background.
    pub background_fill: bool,
    /// The background fill starts only once the session has gone this long without a demand
    /// fault (counted from its start; a working set to prefetch is pushed first either way):
    /// a restored guest's start-up then runs on its working set without the fill beside it.
    /// Zero (the default): the fill starts at once. [`Server::fill_all`] ends the wait.
    pub fill_after_quiet: Duration,
    /// A file descriptor whose readiness (readable or hang-up) means the client is gone: a pidfd,
    /// or the client's socket.
    pub watch: Option<OwnedFd>,
    /// Readahead for this session (default: the server's).
    pub readahead: Option<Readahead>,
    /// Called once when the session ends (client gone, removed, or server shut down), e.g. to
    /// save its recorded working set.
    pub on_end: Option<EndHook>,
    /// Called for every REMOVE event applied (start, end): a supervisor keeps them to resume the
    /// session in a restarted worker with the same balloon state.
    pub on_remove: Option<RemoveHook>,
    /// Ranges the client removed before this server saw the session (a resumed session): they
    /// are served as zeros.
    pub removed: Vec<(u64, u64)>,
    /// The session is resumed from a handler that died: wake every thread blocked on the regions
    /// first, so faults whose messages the dead handler read (and never resolved) are taken again.
    pub resume: bool,
    /// Where to mark the pages made present, one byte per page in the order of the regions
    /// given (see [`crate::served`]). With `resume`, the pages an earlier handler marked there
    /// are served as zeros should they fault again: zapped since, possibly by a REMOVE the dead
    /// handler read and never passed on.
    pub served_log: Option<crate::ServedLog>,
    /// The session's id, chosen by the caller (a supervisor that hands sessions to a restarted
    /// worker keeps their ids); `None`: the server numbers it. Must not be in use.
    pub id: Option<u64>,
    /// Counters carried over from an earlier life of this session (a worker that died): the
    /// session's statistics and its end summary include them.
    pub carried: Option<Stats>,
    /// The client process, as a pidfd: its exit ends the session (whatever happens to its socket),
    /// and it is what [`Unservable::Kill`] kills.
    pub pidfd: Option<OwnedFd>,
    /// What to do with a fault that has no right bytes (see [`Unservable`]).
    pub on_unservable: Unservable,
}

/// What the server does with a claimed fault it cannot serve the right bytes for (a source that
/// fails for good, a range the kernel refuses, a fault outside every region): never a wrong or
/// zero page, never a thread left asleep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unservable {
    /// `UFFDIO_POISON` the page (the client gets SIGBUS there and only there); where the kernel
    /// lacks POISON (before Linux 6.6), kill the client process through its pidfd.
    #[default]
    Poison,
    /// Kill the client process through its pidfd (the whole VM ends, logged), even where POISON
    /// exists: for platforms that would rather restart a VM than let its guest see a machine check.
    Kill,
}

/// A callback run for every REMOVE event of a session.
pub struct RemoveHook(pub Box<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for RemoveHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoveHook")
    }
}

/// A callback run when a session ends.
pub struct EndHook(pub Box<dyn FnOnce(&SessionHandle) + Send>);

impl std::fmt::Debug for EndHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndHook")
    }
}

/// Errors of the server API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A region is invalid.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A system call failed.
    #[error("{operation} failed")]
    Os {
        /// What.
        operation: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// No such session.
    #[error("no session {0}")]
    NoSession(u64),
    /// A session with this id is already served.
    #[error("session id {0} is already in use")]
    DuplicateId(u64),
}

fn os(operation: &'static str) -> impl FnOnce(Errno) -> ServerError {
    move |errno| ServerError::Os { operation, errno }
}

const NOTIFY_TOKEN: u64 = u64::MAX;

struct Shared {
    config: ServerConfig,
    epoll: OwnedFd,
    notify: OwnedFd,
    sessions: RwLock<HashMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
    shutdown: AtomicBool,
    total: Counters,
    rr: AtomicU64,
    /// Bytes of worker buffers (read buffers, zero buffers, event buffers).
    buffer_bytes: AtomicU64,
    /// Set when background work may be queued (cleared by a worker that found none).
    bg_hint: AtomicBool,
    /// When a fill that waits for its session to be quiet may start (the soonest of them).
    bg_due: Mutex<Option<Instant>>,
    /// Workers inside a background step now (see [`ServerConfig::background_workers`]).
    bg_active: AtomicU64,
    /// Deferred jobs queued over all sessions.
    deferred_jobs: AtomicU64,
    /// What this kernel offers, less [`ServerConfig::missing_features`].
    kernel_features: Features,
    /// Log lines per cause.
    logs: LogLimit,
    /// What each worker is resolving now, for the watchdog: (session, address, since).
    current: Vec<Mutex<Option<Current>>>,
    /// Workers lowered to the idle class for a fill copy ([`ServerConfig::idle_fill`]).
    idle: idle::IdleFill,
}

/// A running fault server.
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// The watchdog thread, and what stops it.
    watchdog: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Server {
    /// Start a server with `config.workers` worker threads.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(os("epoll_create"))?;
        let notify = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(os("eventfd"))?;
        epoll::add(
            &epoll,
            &notify,
            epoll::EventData::new_u64(NOTIFY_TOKEN),
            epoll::EventFlags::IN,
        )
        .map_err(os("epoll_ctl"))?;
        let offered = faultline_uffd::Uffd::builder()
            .probe()
            .map(|info| info.features)
            .unwrap_or(Features::empty());
        let kernel_features = offered - config.missing_features;
        let n_workers = config.workers.max(1);
        let shared = Arc::new(Shared {
            current: (0..n_workers).map(|_| Mutex::new(None)).collect(),
            idle: idle::IdleFill::new(config.idle_fill, n_workers),
            kernel_features,
            logs: LogLimit::with_window(Duration::from_secs(10)),
            config,
            epoll,
            notify,
            sessions: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            total: Counters::default(),
            rr: AtomicU64::new(0),
            buffer_bytes: AtomicU64::new(0),
            bg_hint: AtomicBool::new(false),
            bg_due: Mutex::new(None),
            bg_active: AtomicU64::new(0),
            deferred_jobs: AtomicU64::new(0),
        });
        let n = n_workers;
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let sh = Arc::clone(&shared);
            let pin = sh.config.pin_workers.then_some(i % ncpu);
            let h = std::thread::Builder::new()
                .name(format!("faultline-w{i}"))
                .spawn(move || Worker::new(sh, pin, i).run_or_abort())
                .map_err(|e| ServerError::Os {
                    operation: "spawn worker",
                    errno: Errno::from_io_error(&e).unwrap_or(Errno::AGAIN),
                })?;
            workers.push(h);
        }
        let (stop, stopped) = std::sync::mpsc::channel();
        let sh = Arc::clone(&shared);
        let watchdog = std::thread::Builder::new()
            .name("faultline-watchdog".into())
            .spawn(move || sh.watchdog(&stopped))
            .map_err(|e| ServerError::Os {
                operation: "spawn watchdog",
                errno: Errno::from_io_error(&e).unwrap_or(Errno::AGAIN),
            })?;
        Ok(Server {
            shared,
            workers,
            watchdog: Some((stop, watchdog)),
        })
    }

    /// Serve `uffd` (already handshaken, its ranges registered) for `regions`.
    pub fn add_session(
        &self,
        uffd: Uffd,
        regions: Vec<Region>,
        options: SessionOptions,
    ) -> Result<SessionHandle, ServerError> {
        let mut map = RegionMap::new();
        let mut log_base = 0;
        for r in regions {
            let pages = r.pages();
            let mut e = RegionEntry::new(r);
            e.log_base = log_base;
            log_base += pages;
            map.insert(e)?;
        }
        self.shared.add(uffd, map, options).map(SessionHandle)
    }

    /// End a session: stop serving it and close its userfaultfd.
    pub fn remove_session(&self, id: u64) -> Result<(), ServerError> {
        let s = self.shared.session(id).ok_or(ServerError::NoSession(id))?;
        self.shared.close(&s, "removed");
        Ok(())
    }

    /// End every live session (as [`Server::remove_session`] does) and wait, up to `limit`, until
    /// each is finished: its summary logged and its end hook run (a recorded working set written,
    /// a supervisor told). A worker still inside a session finishes it when it leaves, so a
    /// process that exits right after closing its sessions could skip their ends. Returns whether
    /// every session finished in time.
    pub fn end_sessions(&self, limit: Duration) -> bool {
        let sessions = self.sessions();
        for s in &sessions {
            self.shared.close(&s.0, "removed");
        }
        let deadline = Instant::now() + limit;
        sessions
            .iter()
            .all(|s| s.wait_closed(deadline.saturating_duration_since(Instant::now())))
    }

    /// Add a region to a running session.
    pub fn add_region(&self, id: u64, region: Region) -> Result<(), ServerError> {
        let s = self.shared.session(id).ok_or(ServerError::NoSession(id))?;
        let pages = region.pages() as u64;
        let mut e = RegionEntry::new(region);
        e.log_base = s.log_pages.fetch_add(e.region.pages(), Ordering::AcqRel);
        write(&s.regions).insert(e)?;
        s.total_pages.fetch_add(pages, Ordering::AcqRel);
        Ok(())
    }

    /// Handles on the live sessions.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        read(&self.shared.sessions)
            .values()
            .filter(|s| !s.closed.load(Ordering::Acquire))
            .cloned()
            .map(SessionHandle)
            .collect()
    }

    /// Start background fill in every live session (used to drain before stopping).
    pub fn fill_all(&self) {
        for s in self.sessions() {
            {
                let mut b = lock(&s.0.background);
                if b.fill_cursor.is_none() {
                    b.fill_cursor = Some((0, 0));
                }
            }
            s.0.fill_quiet_ns.store(0, Ordering::Release);
        }
        self.shared.bg_hint.store(true, Ordering::Release);
        self.shared.kick();
    }

    /// Counters over all sessions, ended ones included. (Workers count per session only, so the
    /// hot path touches one set of counters; the total is summed here.)
    pub fn stats(&self) -> Stats {
        let sum = Counters::default();
        // Under the sessions lock: a closing session moves from the map into the total
        // atomically with respect to this.
        {
            let m = read(&self.shared.sessions);
            self.shared.total.merge_into(&sum);
            for s in m.values() {
                s.stats.merge_into(&sum);
            }
        }
        sum.snapshot()
    }

    /// Memory the server itself holds, in bytes: page-state bitmaps of the live sessions, worker
    /// buffers and latency histograms (not the pages it serves, which live in the clients).
    pub fn footprint_bytes(&self) -> u64 {
        let workers = self.workers.len() as u64;
        let per_worker = self.shared.config.batch as u64 * 32 + 64 * 1024;
        let hist = 2 * 64 * 1024;
        let sessions: u64 = self
            .sessions()
            .iter()
            .map(|s| {
                let pages = s.total_pages();
                pages.div_ceil(32) * 8 + pages.div_ceil(64) * 8 + hist + 4096
            })
            .sum();
        sessions + workers * per_worker + self.shared.buffer_bytes.load(Ordering::Relaxed) + hist
    }

    /// Prometheus text: every metric once (`# TYPE` line), with a `scope="total"` sample and one
    /// `session="<id>"` sample per live session.
    pub fn prometheus(&self) -> String {
        let mut labelled = vec![("scope=\"total\"".to_string(), self.stats())];
        for s in self.sessions() {
            labelled.push((format!("session=\"{}\"", s.id()), s.stats()));
        }
        crate::stats::prometheus(&labelled)
    }

    /// Stop the workers and close every session.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for _ in 0..self.workers.len() {
            let _ = rustix::io::write(&self.shared.notify, &1u64.to_ne_bytes());
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        if let Some((stop, h)) = self.watchdog.take() {
            drop(stop);
            let _ = h.join();
        }
        let sessions: Vec<_> = read(&self.shared.sessions).values().cloned().collect();
        for s in sessions {
            self.shared.close(&s, "server shut down");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.stop();
        }
    }
}

impl Shared {
    fn session(&self, id: u64) -> Option<Arc<Session>> {
        read(&self.sessions).get(&id).cloned()
    }

    /// A failure injected in place of the resolve ioctl `op` (tests), or `Ok(())`: do the call.
    fn injected(&self, op: ResolveOp, start: u64, len: u64) -> Result<(), ResolveError> {
        match &self.config.inject {
            Some(faults) => faults.check(op, start, len),
            None => Ok(()),
        }
    }

    /// Pause here if [`ServerConfig::inject`] asks for it (see [`ResolveFaults::pause_at`]).
    fn pause_injected(&self, op: ResolveOp, start: u64, len: u64) {
        if let Some(faults) = &self.config.inject {
            faults.pause(op, start, len);
        }
    }

    /// Wake a worker blocked in epoll_wait (new background work).
    fn kick(&self) {
        let _ = rustix::io::write(&self.notify, &1u64.to_ne_bytes());
    }
}
