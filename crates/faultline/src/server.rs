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

use crate::sync::{lock, read, write};
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline_uffd::{
    ContinueMode, CopyMode, Event, EventBuffer, Features, ResolveError, ResolveErrorKind,
    ResolveOp, Resolved, Uffd, ZeropageMode,
};
use rustix::event::epoll;
use rustix::io::Errno;

use crate::inject::ResolveFaults;
use crate::policy::{Readahead, Streams, WorkingSet};
use crate::ratelimit::LogLimit;
use crate::region::{Backing, Region, RegionEntry, RegionError, RegionMap};
use crate::source::{Lend, SourceError};
use crate::state::{PageState, PageStates};
use crate::stats::{add, Counters, Stats};

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

/// Tries of a POISON answered EAGAIN (2 ms apart) before the client is ended instead.
const POISON_EAGAIN_TRIES: u32 = 25;

/// What a background or deferred job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Demand,
    Readahead,
    Prefetch,
    Fill,
}

/// Pages of one region piece, claimed (`claimed`) or to be claimed when run.
#[derive(Debug, Clone)]
struct Job {
    addr: u64,
    pages: usize,
    states: Arc<PageStates>,
    state_index: usize,
    kind: JobKind,
    claimed: bool,
    attempts: u32,
    eagain: u32,
    not_before: Instant,
    fault_read: Option<Instant>,
    /// When its pages were claimed (or its fault read): the fault deadline counts from here.
    since: Instant,
    /// The watchdog has reported it.
    reported: bool,
}

struct Background {
    ahead: VecDeque<Job>,
    prefetch: VecDeque<u64>,
    fill_cursor: Option<(usize, usize)>,
}

/// One userfaultfd and its regions.
pub struct Session {
    id: u64,
    label: String,
    uffd: Uffd,
    regions: RwLock<RegionMap>,
    stats: Counters,
    deferred: Mutex<VecDeque<Job>>,
    background: Mutex<Background>,
    streams: Mutex<Streams>,
    readahead: Readahead,
    recording: Option<Mutex<Vec<u64>>>,
    watch: Option<OwnedFd>,
    /// The client process (see [`SessionOptions::pidfd`]).
    pidfd: Option<OwnedFd>,
    on_unservable: Unservable,
    /// UFFDIO_POISON works here: the kernel has it (and it is not masked) and no POISON of this
    /// session was refused as unknown.
    can_poison: AtomicBool,
    /// The client is being ended ([`Shared::end_client`]): once per session.
    ending: AtomicBool,
    on_end: Mutex<Option<EndHook>>,
    on_remove: Option<RemoveHook>,
    /// Held while reading messages and applying non-fault events.
    read_lock: Mutex<()>,
    /// Faults at addresses no region covers yet (a REMAP not yet read): retried, never dropped.
    orphans: Mutex<Vec<(u64, Instant)>>,
    closed: AtomicBool,
    /// Why it was closed (for the summary logged when it is finished).
    end_reason: Mutex<String>,
    /// Workers serving this session right now (see [`Shared::enter`]).
    busy: AtomicU64,
    /// Set once by [`Shared::finish`].
    finished: AtomicBool,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    changed: Condvar,
    present_pages: AtomicU64,
    total_pages: AtomicU64,
    prefetch_inflight: AtomicU64,
    page_size: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("label", &self.label)
            .finish()
    }
}

/// A handle on a session.
#[derive(Debug, Clone)]
pub struct SessionHandle(Arc<Session>);

impl SessionHandle {
    /// The session id.
    pub fn id(&self) -> u64 {
        self.0.id
    }
    /// Counters.
    pub fn stats(&self) -> Stats {
        self.0.stats.snapshot()
    }
    /// The userfaultfd's own ioctl counts.
    pub fn uffd_stats(&self) -> faultline_uffd::IoctlStats {
        self.0.uffd.stats()
    }
    /// Whether the session ended (client gone or removed).
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
    /// Pages resolved so far (excluding re-resolves).
    pub fn present_pages(&self) -> u64 {
        self.0.present_pages.load(Ordering::Acquire)
    }
    /// Pages in all regions.
    pub fn total_pages(&self) -> u64 {
        self.0.total_pages.load(Ordering::Acquire)
    }
    /// Whether every page of every region is present.
    pub fn all_present(&self) -> bool {
        self.0
            .regions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .all_present()
    }
    /// Whether the pages at these source offsets are all present.
    pub fn offsets_present(&self, offsets: &[u64]) -> bool {
        let regions = read(&self.0.regions);
        offsets.iter().all(|&off| match locate(&regions, off) {
            Some((e, p)) => e.states.get(e.state_base + p) == PageState::Present,
            None => true,
        })
    }
    /// Wait until the session ends or `timeout` passes; returns whether it ended.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.0.ended);
        while g.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = match self.0.changed.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
    /// Wait until every page is present (or the session ends, or `timeout` passes); returns
    /// whether every page is present.
    pub fn wait_all_present(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.0.ended);
        loop {
            if self.all_present() {
                return true;
            }
            let now = Instant::now();
            if g.is_some() || now >= deadline {
                return false;
            }
            g = match self
                .0
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Wait until the working set given as `prefetch` has been replayed (every recorded page
    /// resolved, by prefetch or by demand) or `timeout` passes; returns whether it was.
    pub fn wait_prefetched(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let done = || {
            self.0.prefetch_inflight.load(Ordering::Acquire) == 0
                && lock(&self.0.background).prefetch.is_empty()
        };
        let mut g = lock(&self.0.ended);
        loop {
            if done() {
                return true;
            }
            let now = Instant::now();
            if g.is_some() || now >= deadline {
                return false;
            }
            g = match self
                .0
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The working set recorded so far (empty unless recording).
    pub fn working_set(&self) -> WorkingSet {
        let offsets = self
            .0
            .recording
            .as_ref()
            .map(|r| lock(r).clone())
            .unwrap_or_default();
        WorkingSet {
            page_size: self.0.page_size,
            offsets,
        }
    }
    /// How long the session has run (until it ended).
    pub fn duration(&self) -> Duration {
        let end = self
            .0
            .ended
            .lock()
            .map(|g| *g)
            .unwrap_or_else(|p| *p.into_inner())
            .unwrap_or_else(Instant::now);
        end - self.0.started
    }
    /// The session's label.
    pub fn label(&self) -> &str {
        &self.0.label
    }
}

/// Find the region piece and page holding source offset `off`.
fn locate(regions: &RegionMap, off: u64) -> Option<(&RegionEntry, usize)> {
    regions.entries().iter().find_map(|e| {
        let r = &e.region;
        (off >= r.source_offset && off < r.source_offset + r.len)
            .then(|| (e, ((off - r.source_offset) / r.page_size()) as usize))
    })
}

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
    /// Deferred jobs queued over all sessions.
    deferred_jobs: AtomicU64,
    /// What this kernel offers, less [`ServerConfig::missing_features`].
    kernel_features: Features,
    /// Log lines per cause.
    logs: LogLimit,
    /// What each worker is resolving now, for the watchdog: (session, address, since).
    current: Vec<Mutex<Option<Current>>>,
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
        for r in regions {
            map.insert(RegionEntry::new(r))?;
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
        write(&s.regions).insert(RegionEntry::new(region))?;
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

    fn add(
        &self,
        uffd: Uffd,
        map: RegionMap,
        o: SessionOptions,
    ) -> Result<Arc<Session>, ServerError> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err(ServerError::ShuttingDown);
        }
        let id = match o.id {
            Some(id) => {
                if read(&self.sessions).contains_key(&id) {
                    return Err(ServerError::DuplicateId(id));
                }
                // Ids the server picks later stay clear of the caller's.
                self.next_id.fetch_max(id + 1, Ordering::AcqRel);
                id
            }
            None => self.next_id.fetch_add(1, Ordering::AcqRel),
        };
        let total_pages: u64 = map.entries().iter().map(|e| e.region.pages() as u64).sum();
        let page_size = map
            .entries()
            .first()
            .map(|e| e.region.page_size())
            .unwrap_or(4096);
        let readahead = if o.record_working_set {
            Readahead::Off
        } else {
            o.readahead.unwrap_or(self.config.readahead)
        };
        let prefetch: VecDeque<u64> = o.prefetch.map(|w| w.offsets.into()).unwrap_or_default();
        let session = Arc::new(Session {
            id,
            label: if o.label.is_empty() {
                format!("session-{id}")
            } else {
                o.label
            },
            uffd,
            regions: RwLock::new(map),
            stats: Counters::default(),
            deferred: Mutex::new(VecDeque::new()),
            background: Mutex::new(Background {
                ahead: VecDeque::new(),
                prefetch,
                fill_cursor: o.background_fill.then_some((0, 0)),
            }),
            streams: Mutex::new(Streams::default()),
            readahead,
            recording: o.record_working_set.then(|| Mutex::new(Vec::new())),
            watch: o.watch,
            pidfd: o.pidfd,
            on_unservable: o.on_unservable,
            can_poison: AtomicBool::new(self.kernel_features.contains(Features::POISON)),
            ending: AtomicBool::new(false),
            on_end: Mutex::new(o.on_end),
            on_remove: o.on_remove,
            read_lock: Mutex::new(()),
            orphans: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            end_reason: Mutex::new(String::new()),
            busy: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            started: Instant::now(),
            ended: Mutex::new(None),
            changed: Condvar::new(),
            present_pages: AtomicU64::new(0),
            total_pages: AtomicU64::new(total_pages),
            prefetch_inflight: AtomicU64::new(0),
            page_size,
        });
        if let Some(carried) = &o.carried {
            session.stats.add_stats(carried);
        }
        for &(start, end) in &o.removed {
            apply_remove(&session, start, end);
        }
        if o.resume {
            // Threads asleep on faults the dead handler read are woken to fault again; those
            // whose page is present just go on. One WAKE per region, counted.
            {
                let regions = read(&session.regions);
                for e in regions.entries() {
                    add(&session.stats.wake, 1);
                    if let Err(err) = session.uffd.wake(e.region.start, e.region.len) {
                        tracing::warn!(session = id, error = %err, "resume: wake failed");
                    }
                }
            }
        }
        {
            let mut map = write(&self.sessions);
            if map.contains_key(&id) {
                return Err(ServerError::DuplicateId(id));
            }
            map.insert(id, Arc::clone(&session));
        }
        let flags = epoll::EventFlags::IN;
        epoll::add(
            &self.epoll,
            &session.uffd,
            epoll::EventData::new_u64(id << 1),
            flags,
        )
        .map_err(os("epoll_ctl(userfaultfd)"))?;
        for w in session.watch.iter().chain(&session.pidfd) {
            epoll::add(
                &self.epoll,
                w,
                epoll::EventData::new_u64((id << 1) | 1),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::HUP,
            )
            .map_err(os("epoll_ctl(watch)"))?;
        }
        tracing::debug!(session = id, label = %session.label, pages = total_pages, "session started");
        self.bg_hint.store(true, Ordering::Release);
        self.kick();
        Ok(session)
    }

    /// A failure injected in place of the resolve ioctl `op` (tests), or `Ok(())`: do the call.
    fn injected(&self, op: ResolveOp, start: u64, len: u64) -> Result<(), ResolveError> {
        match &self.config.inject {
            Some(faults) => faults.check(op, start, len),
            None => Ok(()),
        }
    }

    /// Claimed pages that are not ours to serve (their range moved, went away or was
    /// unregistered): the claims go back, and the range is woken so that a thread asleep there
    /// faults again, to wherever that address now belongs. A wake is never wrong: at worst one
    /// thread faults once more.
    fn give_back(&self, s: &Session, j: &Job) {
        if j.claimed {
            for i in 0..j.pages {
                j.states.release(j.state_index + i);
            }
        }
        add(&s.stats.wake, 1);
        let len = j.pages as u64 * s.page_size;
        if let Err(err) = self
            .injected(ResolveOp::Wake, j.addr, len)
            .and_then(|()| s.uffd.wake(j.addr, len))
        {
            tracing::debug!(session = s.id, addr = j.addr, error = %err, "wake of a range given back failed");
        }
    }

    /// The one way out for a page with no right bytes: `UFFDIO_POISON` where the session's policy
    /// and the kernel allow it (the client gets SIGBUS at that page only), else an explicit,
    /// logged end of the client ([`Shared::end_client`]). Never a wrong or zero page, never a
    /// thread left asleep.
    fn unservable(
        &self,
        s: &Arc<Session>,
        addr: u64,
        len: u64,
        offset: Option<u64>,
        why: &dyn std::fmt::Display,
    ) -> Unserved {
        if s.on_unservable == Unservable::Poison && s.can_poison.load(Ordering::Acquire) {
            add(&s.stats.poison, 1);
            // EAGAIN (a REMOVE another worker has not read yet) passes within milliseconds:
            // worth a few short waits before it is taken for a POISON that cannot be done.
            let mut poisoned = Err(ResolveError::from_errno(
                ResolveOp::Poison,
                addr,
                len,
                Errno::AGAIN,
            ));
            for attempt in 0..POISON_EAGAIN_TRIES {
                if attempt > 0 {
                    add(&s.stats.eagain, 1);
                    // A pause while another worker reads the event, not synchronisation.
                    std::thread::sleep(Duration::from_millis(2));
                }
                poisoned = self
                    .injected(ResolveOp::Poison, addr, len)
                    .and_then(|()| s.uffd.poison(addr, len));
                if !matches!(&poisoned, Err(e) if e.kind == ResolveErrorKind::Retry) {
                    break;
                }
            }
            match poisoned {
                Ok(_) => {
                    add(&s.stats.poisoned_pages, len.div_ceil(s.page_size));
                    if self.logs.allow("poison") {
                        tracing::error!(
                            session = s.id,
                            label = %s.label,
                            addr = format_args!("{addr:#x}"),
                            offset,
                            cause = %why,
                            "page poisoned: no right bytes for it (the client gets SIGBUS there)"
                        );
                    }
                    return Unserved::Poisoned;
                }
                Err(err) if err.kind == ResolveErrorKind::AlreadyPresent => {
                    // Someone resolved it meanwhile (a late resolve of a stuck read).
                    add(&s.stats.eexist, 1);
                    return Unserved::Poisoned;
                }
                Err(err) if err.kind == ResolveErrorKind::ProcessGone => {
                    self.close(s, "client gone (ESRCH)");
                    return Unserved::Ended;
                }
                Err(err) => {
                    // EINVAL is also how a kernel without UFFDIO_POISON answers it: no more
                    // poisoning for this session.
                    if matches!(
                        err.kind,
                        ResolveErrorKind::InvalidRange | ResolveErrorKind::NotPermitted
                    ) {
                        s.can_poison.store(false, Ordering::Release);
                    }
                    return self.end_client(s, addr, &format!("{why}; and {err}"));
                }
            }
        }
        self.end_client(s, addr, why)
    }

    /// End the client explicitly: kill its process through its pidfd (as Firecracker's own
    /// example handler does), log it, close the session. Without a pidfd, the session is closed
    /// and the log says the client could not be ended.
    fn end_client(&self, s: &Arc<Session>, addr: u64, why: &dyn std::fmt::Display) -> Unserved {
        if s.ending.swap(true, Ordering::AcqRel) {
            // Another worker is ending it (two threads faulted on unservable pages at once).
            return Unserved::Ended;
        }
        add(&s.stats.unservable, 1);
        let how = match &s.pidfd {
            Some(pidfd) => {
                match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
                    Ok(()) => "the client process was killed".to_string(),
                    Err(Errno::SRCH) => "the client process had already exited".to_string(),
                    Err(e) => format!("killing the client process failed: {e}"),
                }
            }
            None => "no pidfd to end the client by: only its session is closed".to_string(),
        };
        tracing::error!(
            session = s.id,
            label = %s.label,
            addr = format_args!("{addr:#x}"),
            cause = %why,
            policy = ?s.on_unservable,
            poison = s.can_poison.load(Ordering::Acquire),
            "unservable page: ending the client ({how})"
        );
        self.close(s, "client ended: unservable page");
        Unserved::Ended
    }

    /// The watchdog: every tick, report (once per fault, with address and age) any claimed fault
    /// older than [`ServerConfig::stuck_after`], and end as unservable what a worker has been
    /// resolving for longer than [`ServerConfig::fault_deadline`] (a source read that hangs).
    /// Deferred work reaches its deadline in the worker ([`Worker::run_job`]).
    fn watchdog(&self, stop: &std::sync::mpsc::Receiver<()>) {
        let tick = (self.config.stuck_after / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
            self.watch_once(Instant::now());
            self.logs.flush();
        }
    }

    fn watch_once(&self, now: Instant) {
        let (stuck, deadline) = (self.config.stuck_after, self.config.fault_deadline);
        for slot in &self.current {
            let mut g = lock(slot);
            let Some(c) = g.as_mut() else { continue };
            let age = now.saturating_duration_since(c.since);
            let Some(s) = self.session(c.session) else {
                continue;
            };
            if c.stage == 0 && age >= stuck {
                c.stage = 1;
                self.report_stuck(&s, c.addr, age, "a worker is still reading its source");
            }
            if c.stage == 1 && age >= deadline {
                c.stage = 2;
                let (addr, len) = (c.addr, c.len);
                drop(g);
                let why = format!(
                    "a worker has been reading its source for {} ms, past the fault deadline",
                    age.as_millis()
                );
                // Whichever comes first wins in the kernel: if the read ever returns, its
                // resolve finds the pages settled (EEXIST) and nothing is overwritten. Page by
                // page: pages of the run already resolved answer EEXIST and are skipped.
                let mut page = addr;
                while page < addr + len && !s.closed.load(Ordering::Acquire) {
                    if let Unserved::Ended = self.unservable(&s, page, s.page_size, None, &why) {
                        break;
                    }
                    page += s.page_size;
                }
            }
        }
        let sessions: Vec<Arc<Session>> = read(&self.sessions).values().cloned().collect();
        for s in sessions {
            let mut late = Vec::new();
            for j in lock(&s.deferred).iter_mut() {
                let age = now.saturating_duration_since(j.since);
                if !j.reported && age >= stuck {
                    j.reported = true;
                    late.push((j.addr, age));
                }
            }
            for (addr, age) in late {
                self.report_stuck(&s, addr, age, "deferred (EAGAIN or a source being retried)");
            }
        }
    }

    fn report_stuck(&self, s: &Session, addr: u64, age: Duration, state: &str) {
        add(&s.stats.stuck_faults, 1);
        if self.logs.allow("stuck") {
            tracing::warn!(
                session = s.id,
                label = %s.label,
                addr = format_args!("{addr:#x}"),
                age_ms = age.as_millis() as u64,
                state,
                deadline_ms = self.config.fault_deadline.as_millis() as u64,
                "fault unresolved"
            );
        }
    }

    /// Wake a worker blocked in epoll_wait (new background work).
    fn kick(&self) {
        let _ = rustix::io::write(&self.notify, &1u64.to_ne_bytes());
    }

    /// Mark `s` as being served by the calling worker, unless it is closed. While any worker is
    /// inside a session, closing it only stops new work; the counters are folded into the total,
    /// the summary logged and the waiters told by the last worker to leave ([`Shared::finish`]).
    /// Without this, a worker whose resolve woke a client's last fault could still be counting
    /// that resolve when the client's exit closed the session, and the count was lost.
    fn enter(self: &Arc<Self>, s: &Arc<Session>) -> Option<Busy> {
        // SeqCst on `busy` and `closed`, here and in `close`: either `close` sees this worker
        // busy, or this worker sees the session closed (and leaves at once).
        s.busy.fetch_add(1, Ordering::SeqCst);
        let busy = Busy {
            shared: Arc::clone(self),
            session: Arc::clone(s),
        };
        if s.closed.load(Ordering::SeqCst) {
            return None; // `busy` drops: leaves, and finishes the session if it is the last
        }
        Some(busy)
    }

    /// Stop serving `s`: no new work starts; the session is finished now or when the last worker
    /// inside it leaves.
    fn close(&self, s: &Arc<Session>, why: &str) {
        if s.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut g = lock(&s.end_reason);
            *g = why.to_string();
        }
        let _ = epoll::delete(&self.epoll, &s.uffd);
        for w in s.watch.iter().chain(&s.pidfd) {
            let _ = epoll::delete(&self.epoll, w);
        }
        {
            let mut d = lock(&s.deferred);
            self.deferred_jobs
                .fetch_sub(d.len() as u64, Ordering::AcqRel);
            d.clear();
        }
        if s.busy.load(Ordering::SeqCst) == 0 {
            self.finish(s);
        }
    }

    /// The end of a closed session that no worker serves any more (once): its counters join the
    /// total, it leaves the map (both under the map's lock, so a sum never sees it twice or not
    /// at all), the summary is logged and the waiters and the end hook are told.
    fn finish(&self, s: &Arc<Session>) {
        if s.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut m = write(&self.sessions);
            s.stats.merge_into(&self.total);
            m.remove(&s.id);
        }
        let st = s.stats.snapshot();
        let why = lock(&s.end_reason).clone();
        tracing::info!(
            session = s.id,
            label = %s.label,
            reason = why.as_str(),
            duration_ms = s.started.elapsed().as_millis() as u64,
            summary = %st.to_json(),
            "session ended"
        );
        let hook = lock(&s.on_end).take();
        if let Some(EndHook(f)) = hook {
            f(&SessionHandle(Arc::clone(s)));
        }
        // Waiters are told last: a session they see ended has had its end hook run.
        {
            let mut g = lock(&s.ended);
            *g = Some(Instant::now());
        }
        s.changed.notify_all();
    }

    fn has_background(&self) -> Option<Duration> {
        if self.bg_hint.load(Ordering::Acquire) {
            return Some(Duration::ZERO);
        }
        if self.deferred_jobs.load(Ordering::Acquire) == 0 {
            return None;
        }
        let sessions = read(&self.sessions);
        let mut soonest: Option<Duration> = None;
        let now = Instant::now();
        for s in sessions.values() {
            {
                let b = lock(&s.background);
                if !b.ahead.is_empty() || !b.prefetch.is_empty() || b.fill_cursor.is_some() {
                    return Some(Duration::ZERO);
                }
            }
            // Orphans are looked at again after every read of events, and once more when the
            // oldest one's grace is over.
            if let Some(oldest) = lock(&s.orphans).iter().map(|o| o.1).min() {
                let wait = (oldest + self.config.orphan_grace)
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                soonest = Some(soonest.map_or(wait, |w| w.min(wait)));
            }
            {
                let d = lock(&s.deferred);
                for j in d.iter() {
                    let wait = j.not_before.saturating_duration_since(now);
                    soonest = Some(soonest.map_or(wait, |w| w.min(wait)));
                }
            }
        }
        soonest
    }
}

/// A worker inside a session ([`Shared::enter`]); leaving finishes a closed session.
struct Busy {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let s = &self.session;
        if s.busy.fetch_sub(1, Ordering::SeqCst) == 1 && s.closed.load(Ordering::SeqCst) {
            self.shared.finish(s);
        }
    }
}

/// How an unservable page ended.
enum Unserved {
    /// Poisoned (or found resolved meanwhile): the page is settled, the session goes on.
    Poisoned,
    /// The client was ended and the session closed.
    Ended,
}

/// What a worker is resolving now, for the watchdog.
#[derive(Debug, Clone, Copy)]
struct Current {
    session: u64,
    addr: u64,
    len: u64,
    since: Instant,
    /// 0: not reported; 1: reported stuck; 2: ended past the deadline.
    stage: u8,
}

/// What resolving a run of pages came to.
enum RunEnd {
    /// All pages done (resolved, found present or poisoned).
    Done,
    /// Pages from the given index on must be retried later (EAGAIN, retryable source error).
    Defer(usize, bool),
    /// The client is gone.
    Gone,
    /// The client was ended explicitly (an unservable page); the session is closed.
    Ended,
}

struct Worker {
    shared: Arc<Shared>,
    pin: Option<usize>,
    /// Its slot in [`Shared::current`].
    index: usize,
    events: EventBuffer,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    scratch: Option<faultline_uffd::ScratchPages>,
}

impl Worker {
    fn new(shared: Arc<Shared>, pin: Option<usize>, index: usize) -> Worker {
        let batch = shared.config.batch;
        Worker {
            shared,
            pin,
            index,
            events: EventBuffer::new(batch),
            buf: Vec::new(),
            zeros: Vec::new(),
            scratch: None,
        }
    }

    /// Serve until shutdown. A panic here (not in a page source: those are caught where they
    /// are called) leaves pages claimed that nobody will resolve: the process aborts, so that a
    /// supervisor restarts the worker and resumes every session, rather than limping on with
    /// sleepers nobody serves.
    fn run_or_abort(self) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run())).is_err() {
            tracing::error!("a fault-serving thread panicked: aborting (a supervisor restarts the worker and resumes every session)");
            std::process::abort();
        }
    }

    fn run(mut self) {
        if let Some(cpu) = self.pin {
            let mut set = rustix::thread::CpuSet::new();
            set.set(cpu);
            if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                tracing::warn!(cpu, error = %e, "cannot pin worker");
            }
        }
        let mut ready: Vec<epoll::Event> = Vec::with_capacity(32);
        while !self.shared.shutdown.load(Ordering::Acquire) {
            let timeout = match self.shared.has_background() {
                Some(d) if d.is_zero() => Some(rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                }),
                Some(d) => Some(rustix::event::Timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: i64::from(d.subsec_nanos()).max(100_000),
                }),
                None => Some(rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                }),
            };
            ready.clear();
            match epoll::wait(
                &self.shared.epoll,
                rustix::buffer::spare_capacity(&mut ready),
                timeout.as_ref(),
            ) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; worker exits");
                    return;
                }
            }
            let mut demand = 0;
            for ev in ready.iter() {
                let token = ev.data.u64();
                if token == NOTIFY_TOKEN {
                    // On shutdown the eventfd is left readable, so every worker wakes and exits.
                    if self.shared.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(&self.shared.notify, &mut b);
                    continue;
                }
                let Some(s) = self.shared.session(token >> 1) else {
                    continue;
                };
                if token & 1 == 1 {
                    self.shared.close(&s, "client gone (watch fd ready)");
                } else if let Some(_busy) = self.shared.enter(&s) {
                    demand += self.serve_ready(&s);
                }
            }
            self.run_deferred();
            // Demand first: the ready fds were served above; one background chunk, then back
            // to epoll (with a zero timeout while background work remains).
            let _ = demand;
            self.background_step();
        }
    }

    /// Read and handle the queued messages of `s`. Returns the number of faults handled.
    fn serve_ready(&mut self, s: &Arc<Session>) -> usize {
        let mut handled = 0;
        for _ in 0..4 {
            if s.closed.load(Ordering::Acquire) {
                break;
            }
            // One reader per session at a time, holding the lock until the non-fault events of its
            // batch are applied: the kernel lets the process behind a REMOVE or REMAP go on as soon
            // as the message is read, so a fault it causes next must not be looked at by another
            // worker before the page states and regions reflect the event.
            let guard = lock(&s.read_lock);
            let n = match s.uffd.read_events(&mut self.events) {
                Ok(n) => n,
                Err(faultline_uffd::Error::Decode(e)) => {
                    if self.shared.logs.allow("malformed message") {
                        tracing::warn!(session = s.id, error = %e, "malformed userfaultfd message");
                    }
                    self.events.len()
                }
                Err(e) => {
                    tracing::error!(session = s.id, error = %e, "reading the userfaultfd failed");
                    drop(guard);
                    self.shared.close(s, "read failed");
                    return handled;
                }
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let mut faults: Vec<(u64, Instant)> = Vec::with_capacity(n);
            let mut changed = false;
            let events: Vec<Event> = self.events.drain().collect();
            for ev in events {
                match ev {
                    Event::Pagefault { address, .. } => faults.push((address, now)),
                    Event::Remove { start, end } => {
                        add(&s.stats.events_remove, 1);
                        self.on_remove(s, start, end);
                        changed = true;
                    }
                    Event::Unmap { start, end } => {
                        add(&s.stats.events_unmap, 1);
                        changed = true;
                        {
                            let mut r = write(&s.regions);
                            for e in r.remove_range(start, end) {
                                let gone = e.region.pages() as u64;
                                s.total_pages.fetch_sub(
                                    gone.min(s.total_pages.load(Ordering::Acquire)),
                                    Ordering::AcqRel,
                                );
                            }
                        }
                    }
                    Event::Remap { from, to, len } => {
                        add(&s.stats.events_remap, 1);
                        changed = true;
                        {
                            let mut r = write(&s.regions);
                            r.remap(from, to, len);
                        }
                    }
                    Event::Fork(child) => {
                        add(&s.stats.events_fork, 1);
                        self.adopt_fork(s, child);
                    }
                    Event::Unknown { code, .. } => {
                        add(&s.stats.events_unknown, 1);
                        if self.shared.logs.allow("unknown event") {
                            tracing::warn!(session = s.id, code, "unknown userfaultfd event");
                        }
                    }
                }
            }
            {
                let mut o = lock(&s.orphans);
                self.shared
                    .deferred_jobs
                    .fetch_sub(o.len() as u64, Ordering::AcqRel);
                faults.extend(o.drain(..));
            }
            drop(guard);
            handled += faults.len();
            self.serve_faults(s, &mut faults);
            // Work deferred on EAGAIN can go now that the pending events were read.
            self.run_deferred_of(s, changed);
        }
        handled
    }

    fn on_remove(&mut self, s: &Arc<Session>, start: u64, end: u64) {
        apply_remove(s, start, end);
        if let Some(RemoveHook(f)) = &s.on_remove {
            f(start, end);
        }
    }

    fn adopt_fork(&mut self, parent: &Arc<Session>, child: Uffd) {
        let map = {
            let r = read(&parent.regions);
            let mut copies: Vec<(Arc<PageStates>, Arc<PageStates>)> = Vec::new();
            let mut map = RegionMap::new();
            for e in r.entries() {
                let states = match copies.iter().find(|(orig, _)| Arc::ptr_eq(orig, &e.states)) {
                    Some((_, c)) => Arc::clone(c),
                    None => {
                        let c = Arc::new(e.states.fork_copy());
                        copies.push((Arc::clone(&e.states), Arc::clone(&c)));
                        c
                    }
                };
                let mut child_entry = e.clone();
                child_entry.states = states;
                // A MINOR region's page cache is shared with the child: keep the backing.
                if map.insert(child_entry).is_err() {
                    tracing::warn!(session = parent.id, "fork: region could not be copied");
                }
            }
            map
        };
        let opts = SessionOptions {
            label: format!("{}-child", parent.label),
            readahead: Some(parent.readahead),
            ..SessionOptions::default()
        };
        match self.shared.add(child, map, opts) {
            Ok(c) => tracing::info!(parent = parent.id, child = c.id, "adopted forked child"),
            Err(e) => tracing::error!(parent = parent.id, error = %e, "cannot adopt forked child"),
        }
    }

    /// Serve the faults of one batch: claim, coalesce, resolve.
    fn serve_faults(&mut self, s: &Arc<Session>, faults: &mut [(u64, Instant)]) {
        faults.sort_unstable_by_key(|f| f.0);
        let mut runs: Vec<Job> = Vec::new();
        let mut refaults: Vec<Job> = Vec::new();
        let mut aheads: Vec<Job> = Vec::new();
        let mut orphans: Vec<(u64, Instant)> = Vec::new();
        let mut lost: Vec<(u64, Instant)> = Vec::new();
        {
            let regions = read(&s.regions);
            for &(addr, t) in faults.iter() {
                add(&s.stats.faults, 1);
                let Some(e) = regions.find(addr) else {
                    // A fault at an address no region covers: the REMAP that moves a region there
                    // may not have been read yet. Keep it and look again after the next events
                    // (dropping it would leave the thread asleep for ever); past the grace, it
                    // is a fault in registered memory the client never declared: no right bytes.
                    if t.elapsed() >= self.shared.config.orphan_grace {
                        lost.push((addr, t));
                    } else {
                        orphans.push((addr, t));
                    }
                    continue;
                };
                let page = e.page_of(addr);
                let idx = e.state_base + page;
                match e.states.get(idx) {
                    PageState::InFlight => {
                        add(&s.stats.duplicate_faults, 1);
                        continue;
                    }
                    PageState::Present => {
                        add(&s.stats.present_refaults, 1);
                        refaults.push(job(e, page, 1, JobKind::Demand, false, Some(t)));
                        continue;
                    }
                    PageState::Missing => {}
                }
                if !e.states.try_claim(idx) {
                    add(&s.stats.duplicate_faults, 1);
                    continue;
                }
                if let Some(rec) = &s.recording {
                    {
                        let mut v = lock(rec);
                        v.push(e.source_offset_of(page));
                    }
                }
                // Extend a run from the same batch that ends right here.
                if let Some(last) = runs.last_mut() {
                    if Arc::ptr_eq(&last.states, &e.states) && last.state_index + last.pages == idx
                    {
                        last.pages += 1;
                        continue;
                    }
                }
                let policy = s.readahead.for_page_size(e.region.page_size());
                let window = lock(&s.streams).on_fault(policy, e.region.start, page);
                let max_pages = e.region.pages();
                // Resolve the faulting page (and a first chunk after it) now, so the faulting
                // thread wakes early; queue the rest of the window and the readahead beyond it as
                // background work that any worker picks up (demand faults still go first).
                let inline = match s.readahead {
                    Readahead::Adaptive { .. } => window.now.min(
                        (self.shared.config.first_chunk as u64 / e.region.page_size()).max(1)
                            as usize,
                    ),
                    _ => window.now,
                };
                let mut n = 1;
                while n < inline && page + n < max_pages && e.states.try_claim(idx + n) {
                    n += 1;
                }
                runs.push(job(e, page, n, JobKind::Demand, true, Some(t)));
                if n > 1 {
                    add(&s.stats.readahead_pages, n as u64 - 1);
                }
                let rest = (window.now + window.ahead).saturating_sub(n);
                if rest > 0 && page + n < max_pages {
                    let rest = rest.min(max_pages - page - n);
                    aheads.push(job(e, page + n, rest, JobKind::Readahead, false, None));
                }
                // The head of an aligned block, below the fault (claimed when its job runs).
                if window.before > 0 && window.before <= page {
                    let from = page - window.before;
                    aheads.push(job(e, from, window.before, JobKind::Readahead, false, None));
                }
            }
        }
        for (addr, t) in lost {
            let why = format!(
                "fault outside every declared region for {} ms",
                t.elapsed().as_millis()
            );
            let page = addr & !(s.page_size - 1);
            if let Unserved::Ended = self.shared.unservable(s, page, s.page_size, None, &why) {
                return;
            }
        }
        if !orphans.is_empty() {
            add(&s.stats.deferred, orphans.len() as u64);
            {
                let mut o = lock(&s.orphans);
                self.shared
                    .deferred_jobs
                    .fetch_add(orphans.len() as u64, Ordering::AcqRel);
                o.extend(orphans);
            }
        }
        if !aheads.is_empty() {
            {
                let mut b = lock(&s.background);
                b.ahead.extend(aheads);
            }
            self.shared.bg_hint.store(true, Ordering::Release);
            self.shared.kick();
        }
        for j in runs.into_iter().chain(refaults) {
            self.run_job(s, j);
        }
    }

    fn run_job(&mut self, s: &Arc<Session>, j: Job) {
        let entry = {
            let regions = read(&s.regions);
            match regions.find(j.addr) {
                Some(e)
                    if Arc::ptr_eq(&e.states, &j.states)
                        && e.state_base + e.page_of(j.addr) == j.state_index =>
                {
                    e.clone()
                }
                _ => {
                    // The range moved or went away: its pages are not ours to serve here.
                    self.shared.give_back(s, &j);
                    return;
                }
            }
        };
        let first = entry.page_of(j.addr);
        if j.claimed && j.since.elapsed() >= self.shared.config.fault_deadline {
            // Deferred again and again (EAGAIN, a source that keeps failing as retryable): no
            // right bytes within the deadline, so the pages end as unservable. Each page gets
            // one last try on its own first (the run may have stalled on one page only).
            let why = format!(
                "unresolved for {} ms, past the fault deadline",
                j.since.elapsed().as_millis()
            );
            for i in first..first + j.pages {
                match self.resolve_run(s, &entry, i, 1, &j) {
                    RunEnd::Done => continue,
                    RunEnd::Gone => return self.shared.close(s, "client gone (ESRCH)"),
                    RunEnd::Ended => return,
                    RunEnd::Defer(..) => {}
                }
                match self.shared.unservable(
                    s,
                    entry.addr_of(i),
                    entry.region.page_size(),
                    Some(entry.source_offset_of(i)),
                    &why,
                ) {
                    Unserved::Poisoned => self.mark_resolved(s, &entry, i, &j),
                    Unserved::Ended => return,
                }
            }
            return;
        }
        *lock(&self.shared.current[self.index]) = Some(Current {
            session: s.id,
            addr: j.addr,
            len: j.pages as u64 * entry.region.page_size(),
            since: j.since,
            stage: 0,
        });
        let end = self.resolve_run(s, &entry, first, j.pages, &j);
        *lock(&self.shared.current[self.index]) = None;
        match end {
            RunEnd::Done => {}
            RunEnd::Defer(done, retry_source) => {
                let mut rest = j.clone();
                rest.addr = entry.addr_of(first + done);
                rest.pages = j.pages - done;
                rest.state_index = j.state_index + done;
                if retry_source {
                    rest.attempts += 1;
                    let backoff = self.shared.config.retry_backoff
                        * 2u32.saturating_pow(rest.attempts.min(10));
                    rest.not_before = Instant::now() + backoff;
                } else {
                    // EAGAIN: the address space is changing until the pending event is read and
                    // the change done. Retry as soon as events were read, else after a short,
                    // growing pause (not a busy loop).
                    rest.eagain += 1;
                    let pause = Duration::from_micros(50 << rest.eagain.min(5));
                    rest.not_before = Instant::now() + pause;
                }
                // Never later than the deadline, where it ends as unservable.
                rest.not_before = rest
                    .not_before
                    .min(rest.since + self.shared.config.fault_deadline);
                add(&s.stats.deferred, 1);
                {
                    let mut d = lock(&s.deferred);
                    d.push_back(rest);
                    self.shared.deferred_jobs.fetch_add(1, Ordering::AcqRel);
                }
            }
            RunEnd::Gone => self.shared.close(s, "client gone (ESRCH)"),
            RunEnd::Ended => {}
        }
    }

    fn class(e: &RegionEntry, page: usize) -> PageClass {
        if e.states.is_zero(e.state_base + page) {
            PageClass::Removed
        } else if e
            .region
            .source
            .is_zero(e.source_offset_of(page), e.region.page_size())
            == Some(true)
        {
            PageClass::SourceZero
        } else {
            PageClass::Data
        }
    }

    /// Where the resolve starting at `p` ends (exclusive, at most `cap` pages, before `end`), and
    /// whether it is a zero resolve. Removed pages are always zeros (balloon semantics). Short
    /// stretches of zeros in the source are copied along with their neighbours: one ioctl instead
    /// of three; stretches of at least `min_zero` pages become ZEROPAGE (no memory used).
    fn plan(e: &RegionEntry, p: usize, end: usize, cap: usize, min_zero: usize) -> (usize, bool) {
        let limit = end.min(p + cap);
        let zero_stretch = |from: usize| {
            let mut z = from;
            while z < limit && Self::class(e, z) == PageClass::SourceZero {
                z += 1;
            }
            z - from
        };
        match Self::class(e, p) {
            PageClass::Removed => {
                let mut q = p + 1;
                while q < limit && Self::class(e, q) == PageClass::Removed {
                    q += 1;
                }
                (q, true)
            }
            class => {
                if class == PageClass::SourceZero {
                    let z = zero_stretch(p);
                    if z >= min_zero || p + z == limit {
                        return (p + z, true);
                    }
                }
                let mut q = p + 1;
                while q < limit {
                    match Self::class(e, q) {
                        PageClass::Removed => break,
                        PageClass::Data => q += 1,
                        PageClass::SourceZero => {
                            let z = zero_stretch(q);
                            if z >= min_zero {
                                break;
                            }
                            q += z;
                        }
                    }
                }
                (q, false)
            }
        }
    }

    /// Resolve pages `first..first+n` of `e`, claimed by the caller unless `j.claimed` is false
    /// (a re-resolve of a page believed present).
    fn resolve_run(
        &mut self,
        s: &Arc<Session>,
        e: &RegionEntry,
        first: usize,
        n: usize,
        j: &Job,
    ) -> RunEnd {
        let ps = e.region.page_size() as usize;
        let max_pages = (self.shared.config.max_io / ps).max(1);
        let first_pages = (self.shared.config.first_chunk / ps).max(1);
        let mut p = first;
        let end = first + n;
        let mut latency_recorded = j.fault_read.is_none();
        while p < end {
            let cap = if p == first && j.kind == JobKind::Demand {
                first_pages
            } else {
                max_pages
            };
            // A source whose pages arrive from elsewhere has them here first, so that the plan
            // knows its zero runs.
            let limit = end.min(p + cap);
            // A page source that panics fails this read for good (its pages are poisoned);
            // the worker and every other session go on.
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ready = e.region.source.wait_ready(
                    e.source_offset_of(p),
                    (limit - p) as u64 * e.region.page_size(),
                );
                match ready {
                    Ok(()) => {
                        let (q, zero) = Self::plan(e, p, end, cap, self.shared.config.min_zero_run);
                        (q, zero, self.resolve_pages(s, e, p, q - p, zero))
                    }
                    Err(err) => (limit, false, Err(Step::Source(err))),
                }
            }));
            let (q, zero, outcome) = attempt.unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                let len = (limit - p) as u64 * e.region.page_size();
                (
                    limit,
                    false,
                    Err(Step::Source(source_failed(
                        e,
                        p,
                        len,
                        format!("the page source panicked: {msg}"),
                    ))),
                )
            });
            match outcome {
                Ok(done) => {
                    let done = done.max(1).min(q - p);
                    // Count before publishing the pages as present: a waiter woken by the last
                    // page sees complete counters.
                    let stat = match j.kind {
                        JobKind::Prefetch => Some(&s.stats.prefetch_pages),
                        JobKind::Fill => Some(&s.stats.fill_pages),
                        JobKind::Readahead => Some(&s.stats.readahead_pages),
                        JobKind::Demand => None,
                    };
                    if let Some(c) = stat {
                        add(c, done as u64);
                    }
                    for i in p..p + done {
                        self.mark_resolved(s, e, i, j);
                    }
                    if !zero {
                        self.wake_if_removed_in_flight(s, e, p, done);
                    }
                    if !latency_recorded {
                        if let Some(t) = j.fault_read {
                            s.stats.record_latency(t.elapsed());
                        }
                        latency_recorded = true;
                    }
                    p += done;
                }
                Err(Step::Exists) => {
                    self.mark_resolved(s, e, p, j);
                    p += 1;
                }
                Err(Step::Retry) => return RunEnd::Defer(p - first, false),
                Err(Step::Gone) => return RunEnd::Gone,
                Err(Step::GiveBack) => {
                    // Not registered any more (the client unregistered or unmapped it): not
                    // ours to serve. The claims go back and the range is woken, so a thread
                    // still asleep there faults again, wherever that fault now goes.
                    let rest = Job {
                        addr: e.addr_of(p),
                        pages: end - p,
                        state_index: e.state_base + p,
                        ..j.clone()
                    };
                    self.shared.give_back(s, &rest);
                    return RunEnd::Done;
                }
                Err(Step::Unservable(err)) => {
                    match self.no_right_bytes(s, e, (first, p, q), j, &err) {
                        Ok(next) => p = next,
                        Err(end) => return end,
                    }
                }
                Err(Step::Source(err)) => {
                    add(&s.stats.source_errors, 1);
                    if err.is_retryable() && j.attempts + 1 < self.shared.config.source_attempts {
                        add(&s.stats.source_retries, 1);
                        return RunEnd::Defer(p - first, true);
                    }
                    match self.no_right_bytes(s, e, (first, p, q), j, &err) {
                        Ok(next) => p = next,
                        Err(end) => return end,
                    }
                }
            }
        }
        RunEnd::Done
    }

    /// Pages `p..q` of a run that started at `first` got no right bytes (`why`): with several
    /// pages, each is tried on its own to find which; a single page ends as unservable. Returns
    /// where the run goes on, or how it ends.
    fn no_right_bytes(
        &mut self,
        s: &Arc<Session>,
        e: &RegionEntry,
        (first, p, q): (usize, usize, usize),
        j: &Job,
        why: &dyn std::fmt::Display,
    ) -> Result<usize, RunEnd> {
        if q - p > 1 {
            for i in p..q {
                match self.resolve_run(s, e, i, 1, j) {
                    RunEnd::Done => {}
                    RunEnd::Defer(_, src) => return Err(RunEnd::Defer(i - first, src)),
                    other => return Err(other),
                }
            }
            return Ok(q);
        }
        match self.shared.unservable(
            s,
            e.addr_of(p),
            e.region.page_size(),
            Some(e.source_offset_of(p)),
            why,
        ) {
            Unserved::Poisoned => {
                self.mark_resolved(s, e, p, j);
                Ok(p + 1)
            }
            Unserved::Ended => Err(RunEnd::Ended),
        }
    }

    /// A REMOVE that arrived while pages `p..p+n` were being resolved zapped what we just
    /// installed: the client's refault may have been read while the page was still in flight and
    /// dropped as a duplicate, after our resolve's wake had already happened. Wake the range so
    /// such a thread faults again (and is then served zeros). Rare; counted as a wake.
    fn wake_if_removed_in_flight(&self, s: &Session, e: &RegionEntry, p: usize, n: usize) {
        let hit = (p..p + n).any(|i| e.states.is_zero(e.state_base + i));
        if hit {
            let ps = e.region.page_size();
            add(&s.stats.wake, 1);
            if let Err(err) = s.uffd.wake(e.addr_of(p), n as u64 * ps) {
                tracing::debug!(session = s.id, error = %err, "wake after a racing REMOVE failed");
            }
        }
    }

    fn mark_resolved(&self, s: &Session, e: &RegionEntry, page: usize, j: &Job) {
        let idx = e.state_base + page;
        // A re-resolve (unclaimed) that found the page missing claims it now to publish it.
        let newly =
            j.claimed || (e.states.get(idx) == PageState::Missing && e.states.try_claim(idx));
        if newly {
            e.states.set_present(idx);
        }
        if newly {
            let n = s.present_pages.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= s.total_pages.load(Ordering::Acquire) {
                // Take the lock so a waiter between its check and its wait cannot miss this.
                drop(s.ended.lock());
                s.changed.notify_all();
            }
        }
    }

    /// What a resolve ioctl's error means for the pages (from page `p` of `e`) it was for.
    fn classify(&self, s: &Session, e: &RegionEntry, p: usize, err: ResolveError) -> Step {
        match err.kind {
            ResolveErrorKind::AlreadyPresent => {
                add(&s.stats.eexist, 1);
                Step::Exists
            }
            ResolveErrorKind::Retry => {
                add(&s.stats.eagain, 1);
                Step::Retry
            }
            // The kernel could not allocate: a pause, then again (bounded by the deadline).
            ResolveErrorKind::OutOfMemory => Step::Retry,
            ResolveErrorKind::ProcessGone => Step::Gone,
            ResolveErrorKind::NotRegistered => Step::GiveBack,
            // The kernel could not read the bytes it was given: a source mapping whose file
            // shrank under it (the only source memory the kernel reads that user space did not
            // fill). Those bytes do not exist any more.
            ResolveErrorKind::BadAddress => Step::Source(source_failed(
                e,
                p,
                err.len,
                format!(
                    "the kernel could not read the source's bytes ({err}): was the file truncated?"
                ),
            )),
            _ => Step::Unservable(err),
        }
    }

    /// One resolve ioctl (or a few for a long zero run on hugetlbfs) for pages `p..p+n`.
    /// Returns how many pages were done (partial progress is fine: the caller continues).
    fn resolve_pages(
        &mut self,
        s: &Arc<Session>,
        e: &RegionEntry,
        p: usize,
        n: usize,
        zero: bool,
    ) -> Result<usize, Step> {
        let ps = e.region.page_size();
        let addr = e.addr_of(p);
        let len = n as u64 * ps;
        let off = e.source_offset_of(p);
        let result: Result<Resolved, faultline_uffd::ResolveError> = match &e.region.backing {
            Backing::Minor { cache } => {
                let cache_off = (e.cache_offset + p as u64 * ps) as usize;
                let write = if zero {
                    self.ensure_zeros(len as usize);
                    cache.write(cache_off, &self.zeros[..len as usize])
                } else {
                    self.ensure_buf(len as usize);
                    e.region
                        .source
                        .read_at(off, &mut self.buf[..len as usize])
                        .map_err(Step::Source)?;
                    cache.write(cache_off, &self.buf[..len as usize])
                };
                if let Err(err) = write {
                    return Err(Step::Source(source_failed(
                        e,
                        p,
                        len,
                        format!("writing the page cache failed: {err}"),
                    )));
                }
                add(&s.stats.continue_, 1);
                self.shared
                    .injected(ResolveOp::Continue, addr, len)
                    .and_then(|()| s.uffd.continue_minor(addr, len, ContinueMode::empty()))
            }
            Backing::Move
                if !zero
                    && s.uffd.is_own_process()
                    && s.uffd.features().contains(faultline_uffd::Features::MOVE)
                    && e.region.kind == faultline_uffd::MemoryKind::PrivateAnonymous =>
            {
                add(&s.stats.move_, 1);
                let injected = self.shared.injected(ResolveOp::Move, addr, len);
                // No scratch memory now: like ENOMEM, later.
                let scratch = self.scratch(len as usize).map_err(|_| Step::Retry)?;
                e.region
                    .source
                    .read_at(off, &mut scratch.as_mut_slice()[..len as usize])
                    .map_err(Step::Source)?;
                injected.and_then(|()| {
                    s.uffd.move_from_scratch(
                        addr,
                        scratch,
                        0,
                        len as usize,
                        faultline_uffd::MoveMode::empty(),
                    )
                })
            }
            Backing::Copy | Backing::Move if zero && !e.region.kind.is_hugetlb() => {
                add(&s.stats.zeropage, 1);
                self.shared
                    .injected(ResolveOp::Zeropage, addr, len)
                    .and_then(|()| s.uffd.zeropage(addr, len, ZeropageMode::empty()))
            }
            Backing::Copy | Backing::Move => {
                add(&s.stats.copy, 1);
                let injected = self.shared.injected(ResolveOp::Copy, addr, len);
                if let Err(err) = injected {
                    Err(err)
                } else if zero {
                    self.ensure_zeros(len as usize);
                    s.uffd
                        .copy(addr, &self.zeros[..len as usize], CopyMode::empty())
                } else if let Some(ptr) = e.region.source.ptr_at(off, len) {
                    s.uffd
                        .copy_from_ptr(addr, ptr, len as usize, CopyMode::empty())
                } else {
                    self.ensure_buf(len as usize);
                    let lend = e
                        .region
                        .source
                        .read_or_lend(off, &mut self.buf[..len as usize])
                        .map_err(Step::Source)?;
                    // Whole pages of what was asked, at least one: anything else is a broken
                    // source, and its pages are poisoned rather than filled from a guess.
                    let fits = |n: usize| n > 0 && n <= len as usize && n % ps as usize == 0;
                    match lend {
                        Lend::Lent(l) if fits(l.bytes().len()) => {
                            s.uffd.copy(addr, l.bytes(), CopyMode::empty())
                        }
                        Lend::Read(n) if fits(n) => {
                            s.uffd.copy(addr, &self.buf[..n], CopyMode::empty())
                        }
                        other => {
                            let got = match other {
                                Lend::Lent(l) => format!("lent {} bytes", l.bytes().len()),
                                Lend::Read(n) => format!("read {n} bytes"),
                            };
                            return Err(Step::Source(SourceError {
                                offset: off,
                                len,
                                source_name: e.region.source.name(),
                                what: format!(
                                    "read_or_lend {got}, not whole pages of the {len} asked for"
                                ),
                                retry: crate::source::Retry::Permanent,
                                cause: None,
                            }));
                        }
                    }
                }
            }
        };
        match result {
            Ok(r) => {
                let bytes = r.bytes();
                let pages = (bytes / ps) as usize;
                add(&s.stats.bytes, bytes);
                add(&s.stats.pages, pages as u64);
                if zero {
                    add(&s.stats.zero_pages, pages as u64);
                }
                if pages == 0 {
                    // Partial progress of less than a page cannot happen; treat as a retry.
                    return Err(Step::Retry);
                }
                Ok(pages)
            }
            Err(err) => Err(self.classify(s, e, p, err)),
        }
    }

    fn ensure_zeros(&mut self, len: usize) {
        if self.zeros.len() < len {
            let grow = len - self.zeros.len();
            self.zeros = vec![0; len];
            self.shared
                .buffer_bytes
                .fetch_add(grow as u64, Ordering::Relaxed);
        }
    }

    fn scratch(
        &mut self,
        len: usize,
    ) -> Result<&mut faultline_uffd::ScratchPages, faultline_uffd::Error> {
        let have = self.scratch.as_ref().map(|s| s.len()).unwrap_or(0);
        if have < len {
            let grown = faultline_uffd::ScratchPages::new(len.max(self.shared.config.max_io))?;
            self.shared
                .buffer_bytes
                .fetch_add((grown.len() - have) as u64, Ordering::Relaxed);
            self.scratch = Some(grown);
        }
        Ok(self.scratch.as_mut().expect("scratch was just ensured"))
    }

    fn ensure_buf(&mut self, len: usize) {
        // Only ever grows: filling it with zeros again at every length change costs a memset
        // of the difference per resolve.
        if self.buf.len() >= len {
            return;
        }
        let before = self.buf.capacity();
        self.buf.resize(len, 0);
        let grown = self.buf.capacity().saturating_sub(before);
        if grown > 0 {
            self.shared
                .buffer_bytes
                .fetch_add(grown as u64, Ordering::Relaxed);
        }
    }

    fn run_deferred(&mut self) {
        if self.shared.deferred_jobs.load(Ordering::Acquire) == 0 {
            return;
        }
        let sessions: Vec<Arc<Session>> = read(&self.shared.sessions)
            .values()
            .filter(|s| !lock(&s.deferred).is_empty() || !lock(&s.orphans).is_empty())
            .cloned()
            .collect();
        for s in sessions {
            if let Some(_busy) = self.shared.enter(&s) {
                self.run_deferred_of(&s, false);
            }
        }
    }

    /// Run the deferred work of `s` that is due; with `events_read`, EAGAIN work is due at once.
    fn run_deferred_of(&mut self, s: &Arc<Session>, events_read: bool) {
        let now = Instant::now();
        let due: Vec<Job> = {
            let mut d = lock(&s.deferred);
            let (due, later): (Vec<Job>, Vec<Job>) = d
                .drain(..)
                .partition(|j| j.not_before <= now || (events_read && j.eagain > 0));
            d.extend(later);
            self.shared
                .deferred_jobs
                .fetch_sub(due.len() as u64, Ordering::AcqRel);
            due
        };
        for j in due {
            if s.closed.load(Ordering::Acquire) {
                return;
            }
            self.run_job(s, j);
        }
        // Faults that found no region: look again (the regions may have moved meanwhile).
        let mut orphans = match lock(&s.orphans) {
            mut o if !o.is_empty() => {
                self.shared
                    .deferred_jobs
                    .fetch_sub(o.len() as u64, Ordering::AcqRel);
                std::mem::take(&mut *o)
            }
            _ => Vec::new(),
        };
        if !orphans.is_empty() {
            self.serve_faults(s, &mut orphans);
        }
    }

    /// One chunk of background work from one session (round robin).
    fn background_step(&mut self) {
        // Clear the hint before looking: work queued after this point sets it again.
        if !self.shared.bg_hint.swap(false, Ordering::AcqRel) {
            return;
        }
        let sessions: Vec<Arc<Session>> = read(&self.shared.sessions).values().cloned().collect();
        if sessions.is_empty() {
            return;
        }
        let start = self.shared.rr.fetch_add(1, Ordering::Relaxed) as usize;
        for k in 0..sessions.len() {
            let s = &sessions[(start + k) % sessions.len()];
            let Some(_busy) = self.shared.enter(s) else {
                continue;
            };
            let jobs = self.next_background_jobs(s);
            if jobs.is_empty() {
                continue;
            }
            self.shared.bg_hint.store(true, Ordering::Release);
            let prefetched = jobs.iter().filter(|j| j.kind == JobKind::Prefetch).count() as u64;
            for j in jobs {
                self.run_job(s, j);
            }
            if prefetched > 0 {
                let left = s.prefetch_inflight.fetch_sub(prefetched, Ordering::AcqRel) - prefetched;
                let queued = lock(&s.background).prefetch.len();
                if left == 0 && queued == 0 {
                    tracing::debug!(
                        session = s.id,
                        elapsed_ms = s.started.elapsed().as_millis() as u64,
                        pages = s.stats.prefetch_pages.load(Ordering::Relaxed),
                        "working set prefetched"
                    );
                    drop(s.ended.lock());
                    s.changed.notify_all();
                }
            }
            return;
        }
    }

    /// Claim the next background work of `s`: a readahead window, else up to 64 runs of the
    /// recorded working set (in recorded order), else a chunk of background fill.
    fn next_background_jobs(&mut self, s: &Arc<Session>) -> Vec<Job> {
        match self.next_background_job(s) {
            Some(j) if j.kind == JobKind::Prefetch => {
                let mut v = vec![j];
                while v.len() < 64 {
                    match self.next_prefetch_job(s) {
                        Some(j) => v.push(j),
                        None => break,
                    }
                }
                v
            }
            Some(j) => vec![j],
            None => Vec::new(),
        }
    }

    fn next_prefetch_job(&mut self, s: &Arc<Session>) -> Option<Job> {
        let max_io = self.shared.config.max_io as u64;
        let mut bg = lock(&s.background);
        let regions = read(&s.regions);
        Self::pop_prefetch(s, &mut bg, &regions, max_io)
    }

    fn pop_prefetch(
        s: &Session,
        bg: &mut Background,
        regions: &RegionMap,
        max_io: u64,
    ) -> Option<Job> {
        while let Some(off) = bg.prefetch.pop_front() {
            let Some((e, page)) = locate(regions, off) else {
                continue;
            };
            if !e.states.try_claim(e.state_base + page) {
                continue;
            }
            // Extend over following recorded offsets that are the next pages.
            let mut n = 1;
            let ps = e.region.page_size();
            while (n as u64) * ps < max_io
                && page + n < e.region.pages()
                && bg.prefetch.front() == Some(&(off + n as u64 * ps))
                && e.states.try_claim(e.state_base + page + n)
            {
                bg.prefetch.pop_front();
                n += 1;
            }
            s.prefetch_inflight.fetch_add(1, Ordering::AcqRel);
            return Some(job(e, page, n, JobKind::Prefetch, true, None));
        }
        None
    }

    /// Claim the next background run of `s`: readahead windows, then prefetch, then fill.
    fn next_background_job(&mut self, s: &Arc<Session>) -> Option<Job> {
        let max_io = self.shared.config.max_io as u64;
        let mut bg = lock(&s.background);
        let regions = read(&s.regions);
        while let Some(a) = bg.ahead.pop_front() {
            if let Some(j) = claim_run(&regions, &a, max_io) {
                if a.pages > j.pages {
                    let mut rest = a.clone();
                    let skip = j.state_index + j.pages - a.state_index;
                    rest.addr = a.addr + skip as u64 * s.page_size;
                    rest.pages = a.pages.saturating_sub(skip);
                    rest.state_index = a.state_index + skip;
                    if rest.pages > 0 {
                        bg.ahead.push_front(rest);
                    }
                }
                return Some(j);
            }
        }
        if let Some(j) = Self::pop_prefetch(s, &mut bg, &regions, max_io) {
            return Some(j);
        }
        while let Some((ri, from)) = bg.fill_cursor {
            let Some(e) = regions.entries().get(ri) else {
                bg.fill_cursor = None;
                break;
            };
            let pages = e.region.pages();
            let next =
                (from..pages).find(|&p| e.states.get(e.state_base + p) == PageState::Missing);
            let Some(p) = next else {
                bg.fill_cursor = Some((ri + 1, 0));
                continue;
            };
            let want = Job {
                addr: e.addr_of(p),
                pages: pages - p,
                states: Arc::clone(&e.states),
                state_index: e.state_base + p,
                kind: JobKind::Fill,
                claimed: false,
                attempts: 0,
                eagain: 0,
                not_before: Instant::now(),
                fault_read: None,
                since: Instant::now(),
                reported: false,
            };
            match claim_run(&regions, &want, max_io) {
                Some(j) => {
                    bg.fill_cursor = Some((ri, p + j.pages));
                    return Some(j);
                }
                None => {
                    bg.fill_cursor = Some((ri, p + 1));
                }
            }
        }
        None
    }
}

/// Mark `start..end` removed in every region it covers: served as zeros from now on.
fn apply_remove(s: &Session, start: u64, end: u64) {
    let regions = read(&s.regions);
    for e in regions.entries() {
        let (rs, re) = (e.region.start, e.region.end());
        let (a, b) = (start.max(rs), end.min(re));
        if a >= b {
            continue;
        }
        let ps = e.region.page_size();
        let first = ((a - rs) / ps) as usize;
        let last = ((b - rs).div_ceil(ps)) as usize;
        e.states.remove(e.state_base + first..e.state_base + last);
    }
}

/// Claim the first contiguous run of missing pages of `want` (at most `max_io` bytes).
fn claim_run(regions: &RegionMap, want: &Job, max_io: u64) -> Option<Job> {
    let e = regions.find(want.addr)?;
    if !Arc::ptr_eq(&e.states, &want.states) {
        return None;
    }
    let first = e.page_of(want.addr);
    let ps = e.region.page_size();
    let limit = ((max_io / ps).max(1) as usize).min(want.pages);
    let end = (first + want.pages).min(e.region.pages());
    let mut p = first;
    while p < end && !e.states.try_claim(e.state_base + p) {
        p += 1;
    }
    if p >= end {
        return None;
    }
    let mut n = 1;
    while n < limit && p + n < end && e.states.try_claim(e.state_base + p + n) {
        n += 1;
    }
    Some(job(e, p, n, want.kind, true, None))
}

fn job(
    e: &RegionEntry,
    page: usize,
    pages: usize,
    kind: JobKind,
    claimed: bool,
    t: Option<Instant>,
) -> Job {
    Job {
        addr: e.addr_of(page),
        pages,
        states: Arc::clone(&e.states),
        state_index: e.state_base + page,
        kind,
        claimed,
        attempts: 0,
        eagain: 0,
        not_before: Instant::now(),
        fault_read: t,
        since: t.unwrap_or_else(Instant::now),
        reported: false,
    }
}

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageClass {
    /// Source bytes.
    Data,
    /// The source says zeros.
    SourceZero,
    /// Removed by the client: must read as zeros whatever the source holds.
    Removed,
}

/// Why one resolve step did not make progress.
enum Step {
    /// EEXIST: the page is there.
    Exists,
    /// EAGAIN / ENOMEM: later.
    Retry,
    /// ESRCH: the client's memory is gone.
    Gone,
    /// ENOENT: the range is not registered (any more).
    GiveBack,
    /// The kernel refuses the resolve (EINVAL ...): no right bytes can go there.
    Unservable(ResolveError),
    /// The source failed.
    Source(SourceError),
}

/// A source error for `len` bytes at page `page` of `e`, permanent.
fn source_failed(e: &RegionEntry, page: usize, len: u64, what: String) -> SourceError {
    SourceError {
        offset: e.source_offset_of(page),
        len,
        source_name: e.region.source.name(),
        what,
        retry: crate::source::Retry::Permanent,
        cause: None,
    }
}
