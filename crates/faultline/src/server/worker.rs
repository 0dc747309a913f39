//! A worker thread: the epoll loop, reading a session's messages, applying its events and
//! claiming, coalescing and running the faults of a batch.

use crate::sync::{lock, read, write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_uffd::{Event, EventBuffer, Uffd};
use rustix::event::epoll;
use rustix::io::Errno;

use crate::policy::Readahead;
use crate::region::RegionMap;
use crate::state::{PageState, PageStates};
use crate::stats::add;

use super::resolve::RunEnd;
use super::schedule::{job, Job, JobKind};
use super::session::{apply_remove, Session};
use super::unservable::Unserved;
use super::watchdog::Current;
use super::{RemoveHook, SessionOptions, Shared, NOTIFY_TOKEN};

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) pin: Option<usize>,
    /// Its slot in [`Shared::current`].
    pub(super) index: usize,
    pub(super) events: EventBuffer,
    pub(super) buf: Vec<u8>,
    pub(super) zeros: Vec<u8>,
    pub(super) scratch: Option<faultline_uffd::ScratchPages>,
    /// This worker's thread (set when it starts running).
    pub(super) tid: Option<rustix::thread::Pid>,
    /// The run being resolved is a background fill's (its copies may go idle: `idle`).
    pub(super) filling: bool,
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>, pin: Option<usize>, index: usize) -> Worker {
        let batch = shared.config.batch;
        Worker {
            shared,
            pin,
            index,
            events: EventBuffer::new(batch),
            buf: Vec::new(),
            zeros: Vec::new(),
            scratch: None,
            tid: None,
            filling: false,
        }
    }

    /// Serve until shutdown. A panic here (not in a page source: those are caught where they
    /// are called) leaves pages claimed that nobody will resolve: the process aborts, so that a
    /// supervisor restarts the worker and resumes every session, rather than limping on with
    /// sleepers nobody serves.
    pub(super) fn run_or_abort(self) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run())).is_err() {
            tracing::error!("a fault-serving thread panicked: aborting (a supervisor restarts the worker and resumes every session)");
            std::process::abort();
        }
    }

    pub(super) fn run(mut self) {
        self.tid = Some(rustix::thread::gettid());
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
    pub(super) fn serve_ready(&mut self, s: &Arc<Session>) -> usize {
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
            // No resolve installs source bytes while a REMOVE may be read and not yet applied.
            let installs = s.reading(&self.shared.idle);
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
                    drop(installs);
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
            drop(installs);
            drop(guard);
            handled += faults.len();
            self.serve_faults(s, &mut faults);
            // Work deferred on EAGAIN can go now that the pending events were read.
            self.run_deferred_of(s, changed);
        }
        handled
    }

    pub(super) fn on_remove(&mut self, s: &Arc<Session>, start: u64, end: u64) {
        apply_remove(s, start, end);
        if let Some(RemoveHook(f)) = &s.on_remove {
            f(start, end);
        }
    }

    pub(super) fn adopt_fork(&mut self, parent: &Arc<Session>, child: Uffd) {
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
    pub(super) fn serve_faults(&mut self, s: &Arc<Session>, faults: &mut [(u64, Instant)]) {
        if !faults.is_empty() {
            s.note_demand();
        }
        faults.sort_unstable_by_key(|f| f.0);
        let mut runs: Vec<Job> = Vec::new();
        let mut refaults: Vec<Job> = Vec::new();
        let mut aheads: Vec<Job> = Vec::new();
        let mut orphans: Vec<(u64, Instant)> = Vec::new();
        let mut lost: Vec<(u64, Instant)> = Vec::new();
        // A fault on a page another worker is resolving: if that is a fill copy in the idle
        // class, the faulting thread must not wait for CPU time nobody leaves it.
        let mut in_flight = false;
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
                        in_flight = true;
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
                    in_flight = true;
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
                    Readahead::Adaptive { .. } => window
                        .now
                        .min((self.shared.config.first_chunk / e.region.kind.page_size()).max(1)),
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
        // Readahead queued behind a fill step in the idle class: that step's copy finishes now.
        if (in_flight || !aheads.is_empty()) && self.shared.idle.any_lowered() {
            add(&s.stats.fill_raised, self.shared.idle.raise_all() as u64);
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

    pub(super) fn run_job(&mut self, s: &Arc<Session>, j: Job) {
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

    pub(super) fn ensure_zeros(&mut self, len: usize) {
        if self.zeros.len() < len {
            let grow = len - self.zeros.len();
            self.zeros = vec![0; len];
            self.shared
                .buffer_bytes
                .fetch_add(grow as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn scratch(
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

    pub(super) fn ensure_buf(&mut self, len: usize) {
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
}
