//! Sessions: one userfaultfd, its regions and queues; entering, closing and finishing one.

use crate::sync::{lock, read, write};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use faultline_uffd::{Features, Uffd};
use rustix::event::epoll;

use crate::policy::{Readahead, Streams, WorkingSet};
use crate::region::{RegionEntry, RegionMap};
use crate::state::PageState;
use crate::stats::{add, Counters, Stats};

use super::schedule::{Background, Job};
use super::{os, EndHook, RemoveHook, ServerError, SessionOptions, Shared, Unservable};

/// One userfaultfd and its regions.
pub struct Session {
    pub(super) id: u64,
    pub(super) label: String,
    pub(super) uffd: Uffd,
    pub(super) regions: RwLock<RegionMap>,
    pub(super) stats: Counters,
    pub(super) deferred: Mutex<VecDeque<Job>>,
    pub(super) background: Mutex<Background>,
    pub(super) streams: Mutex<Streams>,
    pub(super) readahead: Readahead,
    pub(super) recording: Option<Mutex<Vec<u64>>>,
    pub(super) watch: Option<OwnedFd>,
    /// The client process (see [`SessionOptions::pidfd`]).
    pub(super) pidfd: Option<OwnedFd>,
    pub(super) on_unservable: Unservable,
    /// UFFDIO_POISON works here: the kernel has it (and it is not masked) and no POISON of this
    /// session was refused as unknown.
    pub(super) can_poison: AtomicBool,
    /// The client is being ended ([`Shared::end_client`]): once per session.
    pub(super) ending: AtomicBool,
    pub(super) on_end: Mutex<Option<EndHook>>,
    pub(super) on_remove: Option<RemoveHook>,
    /// Held while reading messages and applying non-fault events.
    pub(super) read_lock: Mutex<()>,
    /// Held shared by resolves that install bytes from the source, exclusively by the reader of
    /// messages until the REMOVEs it read are applied (see `resolve_pages`); only where the
    /// client asked for REMOVE events.
    pub(super) install_lock: Option<RwLock<()>>,
    /// Faults at addresses no region covers yet (a REMAP not yet read): retried, never dropped.
    pub(super) orphans: Mutex<Vec<(u64, Instant)>>,
    pub(super) closed: AtomicBool,
    /// Why it was closed (for the summary logged when it is finished).
    pub(super) end_reason: Mutex<String>,
    /// Workers serving this session right now (see [`Shared::enter`]).
    pub(super) busy: AtomicU64,
    /// Set once by [`Shared::finish`].
    pub(super) finished: AtomicBool,
    pub(super) started: Instant,
    pub(super) ended: Mutex<Option<Instant>>,
    pub(super) changed: Condvar,
    pub(super) present_pages: AtomicU64,
    pub(super) total_pages: AtomicU64,
    pub(super) prefetch_inflight: AtomicU64,
    pub(super) page_size: u64,
    /// Nanoseconds without a demand fault before the fill may start
    /// ([`SessionOptions::fill_after_quiet`]); 0 once [`Server::fill_all`] asked for it now.
    pub(super) fill_quiet_ns: AtomicU64,
    /// When the last demand fault was read, in nanoseconds after `started`.
    pub(super) last_demand_ns: AtomicU64,
    /// Where the pages made present are marked ([`SessionOptions::served_log`]).
    pub(super) served_log: Option<crate::ServedLog>,
    /// Pages of the served log given out to regions so far (the next region's `log_base`).
    pub(super) log_pages: AtomicUsize,
}

impl Session {
    /// The install lock, shared, for a resolve that installs the source's bytes (`None` where
    /// the client has no REMOVE events).
    pub(super) fn installing(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        self.install_lock.as_ref().map(|l| read(l))
    }

    /// The install lock, exclusively, for reading messages (see [`Session::installing`]). A
    /// worker lowered to the idle class for a fill copy may hold it shared: raised first, so the
    /// reader does not wait on CPU time nobody leaves it (see `idle`).
    pub(super) fn reading(
        &self,
        idle: &super::idle::IdleFill,
    ) -> Option<std::sync::RwLockWriteGuard<'_, ()>> {
        let l = self.install_lock.as_ref()?;
        if let Ok(g) = l.try_write() {
            return Some(g);
        }
        if idle.any_lowered() {
            crate::stats::add(&self.stats.fill_raised, idle.raise_all() as u64);
        }
        Some(write(l))
    }

    /// How long the session's background fill must still wait: it starts once the session has
    /// gone [`SessionOptions::fill_after_quiet`] without a demand fault (counted from its start).
    pub(super) fn fill_wait(&self, now: Instant) -> Duration {
        let quiet = self.fill_quiet_ns.load(Ordering::Acquire);
        if quiet == 0 {
            return Duration::ZERO;
        }
        let last = self.started + Duration::from_nanos(self.last_demand_ns.load(Ordering::Acquire));
        (last + Duration::from_nanos(quiet)).saturating_duration_since(now)
    }

    /// A demand fault was read now.
    pub(super) fn note_demand(&self) {
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_demand_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// The fill still waits for quiet: how long, if it has pages left to fill.
    pub(super) fn gated_fill(&self, now: Instant) -> Option<Duration> {
        let wait = self.fill_wait(now);
        (!wait.is_zero() && lock(&self.background).fill_cursor.is_some()).then_some(wait)
    }
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
pub struct SessionHandle(pub(super) Arc<Session>);

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
        self.wait_until(timeout, || self.all_present())
    }

    /// Wait until the working set given as `prefetch` has been replayed (every recorded page
    /// resolved, by prefetch or by demand) or `timeout` passes; returns whether it was.
    pub fn wait_prefetched(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, || {
            self.0.prefetch_inflight.load(Ordering::Acquire) == 0
                && lock(&self.0.background).prefetch.is_empty()
        })
    }

    /// Wait until `done()` (asked whenever the session's pages or state change, and every
    /// 50 ms), the session ends or `timeout` passes; returns whether `done()` held.
    fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
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
pub(super) fn locate(regions: &RegionMap, off: u64) -> Option<(&RegionEntry, usize)> {
    regions.entries().iter().find_map(|e| {
        let r = &e.region;
        (off >= r.source_offset && off < r.source_offset + r.len)
            .then(|| usize::try_from((off - r.source_offset) / r.page_size()).ok())
            .flatten()
            .map(|page| (e, page))
    })
}

impl Shared {
    pub(super) fn add(
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
        let removes = uffd.features().contains(Features::EVENT_REMOVE);
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
            install_lock: removes.then(|| RwLock::new(())),
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
            fill_quiet_ns: AtomicU64::new(
                u64::try_from(o.fill_after_quiet.as_nanos()).unwrap_or(u64::MAX),
            ),
            last_demand_ns: AtomicU64::new(0),
            served_log: o.served_log,
            log_pages: AtomicUsize::new(usize::try_from(total_pages).unwrap_or(usize::MAX)),
        });
        if let Some(carried) = &o.carried {
            session.stats.add_stats(carried);
        }
        for &(start, end) in &o.removed {
            apply_remove(&session, start, end);
        }
        if o.resume {
            zero_served(&session);
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

    /// Mark `s` as being served by the calling worker, unless it is closed. While any worker is
    /// inside a session, closing it only stops new work; the counters are folded into the total,
    /// the summary logged and the waiters told by the last worker to leave ([`Shared::finish`]).
    /// Without this, a worker whose resolve woke a client's last fault could still be counting
    /// that resolve when the client's exit closed the session, and the count was lost.
    pub(super) fn enter(self: &Arc<Self>, s: &Arc<Session>) -> Option<Busy> {
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
    pub(super) fn close(&self, s: &Arc<Session>, why: &str) {
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
    pub(super) fn finish(&self, s: &Arc<Session>) {
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
            duration_ms = u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX),
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
}

/// A worker inside a session ([`Shared::enter`]); leaving finishes a closed session.
pub(super) struct Busy {
    pub(super) shared: Arc<Shared>,
    pub(super) session: Arc<Session>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let s = &self.session;
        if s.busy.fetch_sub(1, Ordering::SeqCst) == 1 && s.closed.load(Ordering::SeqCst) {
            self.shared.finish(s);
        }
    }
}

/// Mark `start..end` removed in every region it covers: served as zeros from now on.
pub(super) fn apply_remove(s: &Session, start: u64, end: u64) {
    let regions = read(&s.regions);
    for e in regions.entries() {
        let (rs, re) = (e.region.start, e.region.end());
        let (a, b) = (start.max(rs), end.min(re));
        if a >= b {
            continue;
        }
        let ps = e.region.page_size();
        let first = usize::try_from((a - rs) / ps).expect("a page index of a region");
        let last = usize::try_from((b - rs).div_ceil(ps)).expect("a page index of a region");
        e.states.remove(e.state_base + first..e.state_base + last);
    }
}

/// A resumed session: every page an earlier handler made present (its served log) reads zeros
/// should it fault again — it was zapped since, maybe by a REMOVE the dead handler read and never
/// passed on. Pages still present stay as they are (a zero resolve of one answers EEXIST).
fn zero_served(s: &Session) {
    let Some(log) = &s.served_log else {
        return;
    };
    let marked = match log.marked() {
        Ok(m) => m,
        Err(err) => {
            tracing::error!(
                session = s.id,
                error = %err,
                "resume: the served log cannot be read; a page zapped while no handler ran may be \
                 served its snapshot bytes"
            );
            return;
        }
    };
    let regions = read(&s.regions);
    // Shared memory served through its page cache keeps its bytes there across a zap: a refault
    // maps them (never zeros).
    let private = |e: &&RegionEntry| !matches!(e.region.backing, crate::Backing::Minor { .. });
    for e in regions.entries().iter().filter(private) {
        let (lo, hi) = (e.log_base, e.log_base + e.states.len());
        for r in &marked {
            let (a, b) = (r.start.max(lo), r.end.min(hi));
            if a < b {
                e.states.remove(a - lo..b - lo);
            }
        }
    }
}
