//! Work queues beyond demand: deferred retries, readahead windows, working-set prefetch and
//! background fill, and the order a worker takes them in.

use crate::sync::{lock, read};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::region::{RegionEntry, RegionMap};
use crate::state::{PageState, PageStates};

use super::session::{locate, Session};
use super::worker::Worker;
use super::Shared;

/// What a background or deferred job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    Demand,
    Readahead,
    Prefetch,
    Fill,
}

/// Pages of one region piece, claimed (`claimed`) or to be claimed when run.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) addr: u64,
    pub(super) pages: usize,
    pub(super) states: Arc<PageStates>,
    pub(super) state_index: usize,
    pub(super) kind: JobKind,
    pub(super) claimed: bool,
    pub(super) attempts: u32,
    pub(super) eagain: u32,
    pub(super) not_before: Instant,
    pub(super) fault_read: Option<Instant>,
    /// When its pages were claimed (or its fault read): the fault deadline counts from here.
    pub(super) since: Instant,
    /// The watchdog has reported it.
    pub(super) reported: bool,
}

pub(super) struct Background {
    pub(super) ahead: VecDeque<Job>,
    pub(super) prefetch: VecDeque<u64>,
    pub(super) fill_cursor: Option<(usize, usize)>,
}

impl Shared {
    /// A worker may take a background step now ([`ServerConfig::background_workers`]).
    pub(super) fn background_slot_free(&self) -> bool {
        self.bg_active.load(Ordering::Acquire) < self.background_limit()
    }

    /// Workers that may be in a background step at once (zero in the config: every one).
    fn background_limit(&self) -> u64 {
        match self.config.background_workers {
            0 => u64::MAX,
            n => n as u64,
        }
    }

    pub(super) fn has_background(&self) -> Option<Duration> {
        if self.bg_hint.load(Ordering::Acquire) && self.background_slot_free() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut soonest: Option<Duration> = None;
        {
            let mut due = lock(&self.bg_due);
            if let Some(at) = *due {
                if at <= now {
                    *due = None;
                    self.bg_hint.store(true, Ordering::Release);
                    return Some(Duration::ZERO);
                }
                soonest = Some(at - now);
            }
        }
        if self.deferred_jobs.load(Ordering::Acquire) == 0 {
            return soonest;
        }
        // A worker that may not take a background step now does not spin on queued work: it
        // waits for its faults, a kick, or its deferred jobs.
        let slot = self.background_slot_free();
        let sessions = read(&self.sessions);
        for s in sessions.values() {
            if slot {
                let b = lock(&s.background);
                let fill = b.fill_cursor.is_some() && s.fill_wait(now).is_zero();
                if !b.ahead.is_empty() || !b.prefetch.is_empty() || fill {
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

impl Worker {
    pub(super) fn run_deferred(&mut self) {
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
    pub(super) fn run_deferred_of(&mut self, s: &Arc<Session>, events_read: bool) {
        let now = Instant::now();
        let due: Vec<Job> = {
            let mut d = lock(&s.deferred);
            let due = take_due(&mut d, now, events_read);
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
    pub(super) fn background_step(&mut self) {
        // Take a background slot (`ServerConfig::background_workers`) for the step, if one is
        // free.
        let active = &self.shared.bg_active;
        if active.fetch_add(1, Ordering::AcqRel) >= self.shared.background_limit() {
            active.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.background_step_in_slot();
        self.shared.bg_active.fetch_sub(1, Ordering::AcqRel);
    }

    fn background_step_in_slot(&mut self) {
        // Clear the hint before looking: work queued after this point sets it again.
        if !self.shared.bg_hint.swap(false, Ordering::AcqRel) {
            return;
        }
        let sessions: Vec<Arc<Session>> = read(&self.shared.sessions).values().cloned().collect();
        if sessions.is_empty() {
            return;
        }
        let turn = self.shared.rr.fetch_add(1, Ordering::Relaxed) % sessions.len() as u64;
        let start = usize::try_from(turn).expect("below a usize length");
        // The soonest a fill that waits for its session to be quiet may start.
        let mut gated: Option<Duration> = None;
        for k in 0..sessions.len() {
            let s = &sessions[(start + k) % sessions.len()];
            let Some(_busy) = self.shared.enter(s) else {
                continue;
            };
            let jobs = self.next_background_jobs(s);
            if jobs.is_empty() {
                if let Some(w) = s.gated_fill(Instant::now()) {
                    gated = Some(gated.map_or(w, |g| g.min(w)));
                }
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
                        elapsed_ms =
                            u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        pages = s.stats.prefetch_pages.load(Ordering::Relaxed),
                        "working set prefetched"
                    );
                    drop(s.ended.lock());
                    s.changed.notify_all();
                }
            }
            return;
        }
        // No work now: a worker looks again when the first waiting fill may start.
        if let Some(w) = gated {
            let at = Instant::now() + w;
            let mut due = lock(&self.shared.bg_due);
            *due = Some(due.map_or(at, |d| d.min(at)));
        }
    }

    /// Claim the next background work of `s`: a readahead window, else a batch of the recorded
    /// working set ([`prefetch_batch`]), else a chunk of background fill once the session's
    /// fill may start ([`Session::fill_wait`]).
    pub(super) fn next_background_jobs(&mut self, s: &Arc<Session>) -> Vec<Job> {
        let max_io = self.shared.config.max_io as u64;
        // A fill copying in the idle class holds a background slot while it may be starved:
        // one resolve per step, so readahead (taken first) waits for one copy at most.
        let fill_io = if self.shared.idle.enabled() {
            max_io.min(super::resolve::INSTALL_MAX as u64)
        } else {
            max_io
        };
        let fill = s.fill_wait(Instant::now()).is_zero().then_some(fill_io);
        let mut bg = lock(&s.background);
        let regions = read(&s.regions);
        match next_background(
            &mut bg,
            &regions,
            s.page_size,
            max_io,
            &s.prefetch_inflight,
            fill,
        ) {
            Some(j) if j.kind == JobKind::Prefetch => {
                prefetch_batch(j, &mut bg, &regions, max_io, &s.prefetch_inflight)
            }
            Some(j) => vec![j],
            None => Vec::new(),
        }
    }
}

/// Runs of the recorded working set to resolve in one background step: `first` and the runs
/// that follow it in recorded order while together they stay under `max_io` bytes (at most 64
/// runs: a scattered set is many one-page runs). A step is bounded in bytes so that a worker is
/// back at its demand faults within one chunk's copy; each run is claimed when it is taken, so a
/// fault on a page of a step's last run waits for the whole step (64 runs of `max_io` each held a
/// worker, and such a fault, for a whole 33 MiB working set).
pub(super) fn prefetch_batch(
    first: Job,
    bg: &mut Background,
    regions: &RegionMap,
    max_io: u64,
    inflight: &AtomicU64,
) -> Vec<Job> {
    let bytes_of = |j: &Job| {
        regions
            .find(j.addr)
            .map_or(0, |e| j.pages as u64 * e.region.page_size())
    };
    let mut bytes = bytes_of(&first);
    let mut batch = vec![first];
    while batch.len() < 64 && bytes < max_io {
        match pop_prefetch(inflight, bg, regions, max_io) {
            Some(j) => {
                bytes += bytes_of(&j);
                batch.push(j);
            }
            None => break,
        }
    }
    batch
}

/// Claim the first contiguous run of missing pages of `want` (at most `max_io` bytes).
pub(super) fn claim_run(regions: &RegionMap, want: &Job, max_io: u64) -> Option<Job> {
    let e = regions.find(want.addr)?;
    if !Arc::ptr_eq(&e.states, &want.states) {
        return None;
    }
    let first = e.page_of(want.addr);
    let ps = e.region.page_size();
    let limit = usize::try_from((max_io / ps).max(1))
        .unwrap_or(usize::MAX)
        .min(want.pages);
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

pub(super) fn job(
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

pub(super) fn pop_prefetch(
    inflight: &AtomicU64,
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
        inflight.fetch_add(1, Ordering::AcqRel);
        return Some(job(e, page, n, JobKind::Prefetch, true, None));
    }
    None
}

/// The next background run of a session's queues, claimed: readahead windows (the rest of a
/// window longer than `max_io` stays queued first), then the working set in recorded order,
/// then background fill from the fill cursor in runs of at most `fill` bytes if the fill may
/// go on (`Some`). Pure logic over the page states, unit-tested.
pub(super) fn next_background(
    bg: &mut Background,
    regions: &RegionMap,
    page_size: u64,
    max_io: u64,
    inflight: &AtomicU64,
    fill: Option<u64>,
) -> Option<Job> {
    while let Some(a) = bg.ahead.pop_front() {
        if let Some(j) = claim_run(regions, &a, max_io) {
            if a.pages > j.pages {
                let mut rest = a.clone();
                let skip = j.state_index + j.pages - a.state_index;
                rest.addr = a.addr + skip as u64 * page_size;
                rest.pages = a.pages.saturating_sub(skip);
                rest.state_index = a.state_index + skip;
                if rest.pages > 0 {
                    bg.ahead.push_front(rest);
                }
            }
            return Some(j);
        }
    }
    if let Some(j) = pop_prefetch(inflight, bg, regions, max_io) {
        return Some(j);
    }
    let fill_io = fill?;
    while let Some((ri, from)) = bg.fill_cursor {
        let Some(e) = regions.entries().get(ri) else {
            bg.fill_cursor = None;
            break;
        };
        let pages = e.region.pages();
        let next = (from..pages).find(|&p| e.states.get(e.state_base + p) == PageState::Missing);
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
        match claim_run(regions, &want, fill_io) {
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

/// Take the deferred jobs that are due at `now` out of `queue`, in queue order; with
/// `events_read`, jobs deferred on EAGAIN are due at once (the event they waited for was read).
/// The others stay queued, in order.
pub(super) fn take_due(queue: &mut VecDeque<Job>, now: Instant, events_read: bool) -> Vec<Job> {
    let (due, later): (Vec<Job>, Vec<Job>) = queue
        .drain(..)
        .partition(|j| j.not_before <= now || (events_read && j.eagain > 0));
    queue.extend(later);
    due
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::region::Region;
    use crate::source::ZeroSource;
    use faultline_uffd::MemoryKind;

    const PS: u64 = 4096;
    const BASE: u64 = 0x7000_0000_0000;

    /// One region of `pages` pages (at a made-up address: nothing is registered).
    fn regions(pages: u64) -> RegionMap {
        let mut map = RegionMap::new();
        let source = Arc::new(ZeroSource::new(pages * PS));
        map.insert(RegionEntry::new(Region::new(
            BASE,
            pages * PS,
            MemoryKind::PrivateAnonymous,
            source,
            0,
        )))
        .unwrap();
        map
    }

    fn queues(ahead: Vec<Job>, prefetch: &[u64], fill: bool) -> Background {
        Background {
            ahead: ahead.into(),
            prefetch: prefetch.iter().map(|p| p * PS).collect(),
            fill_cursor: fill.then_some((0, 0)),
        }
    }

    /// (first page, pages, kind) of the next background job.
    fn next(
        bg: &mut Background,
        map: &RegionMap,
        max_io: u64,
        inflight: &AtomicU64,
    ) -> Option<(usize, usize, JobKind)> {
        next_background(bg, map, PS, max_io, inflight, Some(max_io)).map(|j| {
            assert!(j.claimed, "background jobs are claimed when taken");
            let e = &map.entries()[0];
            assert_eq!(j.addr, e.addr_of(j.state_index - e.state_base));
            (j.state_index - e.state_base, j.pages, j.kind)
        })
    }

    #[test]
    fn background_work_goes_readahead_then_prefetch_then_fill() {
        let map = regions(16);
        let e = &map.entries()[0];
        let ahead = job(e, 2, 2, JobKind::Readahead, false, None);
        let mut bg = queues(vec![ahead], &[8, 9, 12], true);
        let inflight = AtomicU64::new(0);
        let max_io = 1 << 20;
        let mut order = Vec::new();
        while let Some(j) = next(&mut bg, &map, max_io, &inflight) {
            order.push(j);
        }
        use JobKind::*;
        assert_eq!(
            order,
            vec![
                (2, 2, Readahead),
                // Consecutive recorded pages make one run.
                (8, 2, Prefetch),
                (12, 1, Prefetch),
                // Fill takes the missing pages in order, around those already claimed.
                (0, 2, Fill),
                (4, 4, Fill),
                (10, 2, Fill),
                (13, 3, Fill),
            ]
        );
        assert_eq!(
            inflight.load(Ordering::Acquire),
            2,
            "two prefetch runs in flight"
        );
        assert_eq!(bg.fill_cursor, None, "fill is over");
        assert_eq!(
            e.states.count(PageState::InFlight),
            16,
            "every page claimed once"
        );
    }

    #[test]
    fn a_readahead_window_longer_than_max_io_runs_in_max_io_pieces() {
        let map = regions(16);
        let e = &map.entries()[0];
        let ahead = job(e, 0, 10, JobKind::Readahead, false, None);
        let mut bg = queues(vec![ahead], &[], false);
        let inflight = AtomicU64::new(0);
        let mut pieces = Vec::new();
        while let Some((p, n, _)) = next(&mut bg, &map, 4 * PS, &inflight) {
            pieces.push((p, n));
        }
        assert_eq!(pieces, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(e.states.get(e.state_base + 10), PageState::Missing);
    }

    #[test]
    fn readahead_skips_pages_already_present_or_claimed() {
        let map = regions(16);
        let e = &map.entries()[0];
        assert!(e.states.try_claim(e.state_base + 5));
        e.states.set_present(e.state_base + 5);
        assert!(e.states.try_claim(e.state_base));
        let ahead = job(e, 0, 10, JobKind::Readahead, false, None);
        let mut bg = queues(vec![ahead], &[], false);
        let inflight = AtomicU64::new(0);
        let mut pieces = Vec::new();
        while let Some((p, n, _)) = next(&mut bg, &map, 4 * PS, &inflight) {
            pieces.push((p, n));
        }
        assert_eq!(pieces, vec![(1, 4), (6, 4)]);
    }

    #[test]
    fn prefetch_runs_are_cut_to_max_io_and_keep_the_recorded_order() {
        let map = regions(16);
        let mut bg = queues(Vec::new(), &[3, 4, 5, 6, 7, 1], false);
        let inflight = AtomicU64::new(0);
        let mut runs = Vec::new();
        while let Some(j) = pop_prefetch(&inflight, &mut bg, &map, 3 * PS) {
            assert_eq!(j.kind, JobKind::Prefetch);
            runs.push((j.state_index, j.pages));
        }
        assert_eq!(runs, vec![(3, 3), (6, 2), (1, 1)]);
        assert_eq!(inflight.load(Ordering::Acquire), 3);
        assert!(bg.prefetch.is_empty());
    }

    #[test]
    fn a_prefetch_step_is_bounded_in_bytes_and_runs() {
        let map = regions(256);
        let e = &map.entries()[0];
        let inflight = AtomicU64::new(0);
        let batch_of = |bg: &mut Background, max_io: u64| -> Vec<(usize, usize)> {
            let first = pop_prefetch(&inflight, bg, &map, max_io).expect("a first run");
            prefetch_batch(first, bg, &map, max_io, &inflight)
                .iter()
                .map(|j| (j.state_index - e.state_base, j.pages))
                .collect()
        };
        // One long recorded run: cut to max_io pieces, one piece per step.
        let long: Vec<u64> = (0..32).collect();
        let mut bg = queues(Vec::new(), &long, false);
        assert_eq!(batch_of(&mut bg, 8 * PS), vec![(0, 8)]);
        assert_eq!(batch_of(&mut bg, 8 * PS), vec![(8, 8)]);
        // Scattered one-page runs: as many as fit in max_io bytes.
        let scattered: Vec<u64> = (0..40).map(|p| 64 + 2 * p).collect();
        let mut bg = queues(Vec::new(), &scattered, false);
        assert_eq!(batch_of(&mut bg, 3 * PS), vec![(64, 1), (66, 1), (68, 1)]);
        // ... and never more than 64 runs, however large max_io.
        let many: Vec<u64> = (0..78).map(|p| 100 + 2 * p).collect();
        let mut bg = queues(Vec::new(), &many, false);
        let batch = batch_of(&mut bg, 1 << 30);
        assert_eq!(batch.len(), 64);
        assert_eq!(batch[63], (226, 1));
        assert_eq!(bg.prefetch.len(), 14, "the rest stays queued");
    }

    #[test]
    fn a_fill_that_may_not_start_yet_is_left_queued() {
        let map = regions(8);
        let mut bg = queues(Vec::new(), &[2], true);
        let inflight = AtomicU64::new(0);
        let take = |bg: &mut Background, ready: bool| {
            next_background(bg, &map, PS, 1 << 20, &inflight, ready.then_some(1 << 20))
                .map(|j| (j.kind, j.pages))
        };
        // The working set goes whether or not the fill may start.
        assert_eq!(take(&mut bg, false), Some((JobKind::Prefetch, 1)));
        assert_eq!(take(&mut bg, false), None);
        assert_eq!(bg.fill_cursor, Some((0, 0)), "the fill is still to do");
        assert_eq!(take(&mut bg, true), Some((JobKind::Fill, 2)));
        assert_eq!(take(&mut bg, true), Some((JobKind::Fill, 5)));
        assert_eq!(take(&mut bg, true), None);
    }

    #[test]
    fn prefetch_skips_offsets_outside_every_region_and_pages_already_claimed() {
        let map = regions(16);
        let e = &map.entries()[0];
        assert!(e.states.try_claim(e.state_base + 2));
        // 100 is past the region; 2 is claimed; 5 then 4 are not consecutive in that order.
        let mut bg = queues(Vec::new(), &[100, 2, 5, 4], false);
        let inflight = AtomicU64::new(0);
        let mut runs = Vec::new();
        while let Some(j) = pop_prefetch(&inflight, &mut bg, &map, 1 << 20) {
            runs.push((j.state_index - e.state_base, j.pages));
        }
        assert_eq!(runs, vec![(5, 1), (4, 1)]);
        assert_eq!(inflight.load(Ordering::Acquire), 2);
    }

    #[test]
    fn claim_run_takes_the_first_claimable_stretch_only() {
        let map = regions(16);
        let e = &map.entries()[0];
        assert!(e.states.try_claim(e.state_base + 1));
        assert!(e.states.try_claim(e.state_base + 4));
        let want = job(e, 1, 8, JobKind::Fill, false, None);
        let j = claim_run(&map, &want, 1 << 20).unwrap();
        assert_eq!((j.state_index - e.state_base, j.pages), (2, 2));
        assert!(j.claimed);
        // A job for other page states (a region that was replaced) claims nothing.
        let other = Arc::new(PageStates::new(16));
        let stale = Job {
            states: other,
            ..want
        };
        assert!(claim_run(&map, &stale, 1 << 20).is_none());
        assert_eq!(e.states.get(e.state_base + 5), PageState::Missing);
    }

    #[test]
    fn due_deferred_jobs_leave_the_queue_in_order() {
        let map = regions(16);
        let e = &map.entries()[0];
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut source_retry = job(e, 0, 1, JobKind::Demand, true, None);
        source_retry.not_before = later;
        let mut due_now = job(e, 1, 1, JobKind::Demand, true, None);
        due_now.not_before = now;
        let mut on_eagain = job(e, 2, 1, JobKind::Fill, true, None);
        on_eagain.not_before = later;
        on_eagain.eagain = 1;
        let mut also_due = job(e, 3, 1, JobKind::Prefetch, true, None);
        also_due.not_before = now - Duration::from_millis(1);
        let mut q: VecDeque<Job> = vec![source_retry, due_now, on_eagain, also_due].into();
        let pages = |v: &[Job]| v.iter().map(|j| j.state_index).collect::<Vec<_>>();

        let due = take_due(&mut q, now, false);
        assert_eq!(pages(&due), vec![1, 3]);
        assert_eq!(pages(q.make_contiguous()), vec![0, 2]);
        // Once events were read, work deferred on EAGAIN is due at once; a source retry waits.
        let due = take_due(&mut q, now, true);
        assert_eq!(pages(&due), vec![2]);
        assert_eq!(pages(q.make_contiguous()), vec![0]);
        assert_eq!(pages(&take_due(&mut q, later, false)), vec![0]);
        assert!(q.is_empty());
    }
}
