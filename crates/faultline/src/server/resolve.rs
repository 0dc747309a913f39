//! Resolving a run of claimed pages: planning it (removed pages, zero stretches, data), the
//! resolve ioctl for its backing, and what each errno means for the pages.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use faultline_uffd::{
    ContinueMode, CopyMode, ResolveError, ResolveErrorKind, ResolveOp, Resolved, ZeropageMode,
};

use crate::region::{Backing, RegionEntry};
use crate::source::{Lend, SourceError};
use crate::state::PageState;
use crate::stats::add;

use super::schedule::{Job, JobKind};
use super::session::Session;
use super::unservable::Unserved;
use super::worker::Worker;

/// The largest resolve while the reader of events may wait for it (a client with REMOVE events:
/// see `resolve_pages`): it waits for at most one such copy per worker, ~75 µs at 3.4 GiB/s
/// instead of ~300 µs for `ServerConfig::max_io`'s 1 MiB.
pub(super) const INSTALL_MAX: usize = 256 << 10;

/// How many times a page punched out of a client's shared memory is allocated and mapped again
/// when it keeps vanishing in between (see `resolve_pages`), before it ends as unservable.
const HOLE_REFILLS: u32 = 3;

/// What resolving a run of pages came to.
pub(super) enum RunEnd {
    /// All pages done (resolved, found present or poisoned).
    Done,
    /// Pages from the given index on must be retried later (EAGAIN, retryable source error).
    Defer(usize, bool),
    /// The client is gone.
    Gone,
    /// The client was ended explicitly (an unservable page); the session is closed.
    Ended,
}

impl Worker {
    pub(super) fn class(e: &RegionEntry, page: usize) -> PageClass {
        if e.any_removed(page..page + 1) {
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
    pub(super) fn plan(
        e: &RegionEntry,
        p: usize,
        end: usize,
        cap: usize,
        min_zero: usize,
    ) -> (usize, bool) {
        plan_run(|q| Self::class(e, q), p, end, cap, min_zero)
    }

    /// Resolve pages `first..first+n` of `e`, claimed by the caller unless `j.claimed` is false
    /// (a re-resolve of a page believed present).
    pub(super) fn resolve_run(
        &mut self,
        s: &Arc<Session>,
        e: &RegionEntry,
        first: usize,
        n: usize,
        j: &Job,
    ) -> RunEnd {
        self.filling = j.kind == JobKind::Fill;
        let ps = e.region.kind.page_size();
        // With the install lock, the reader of events waits for the data resolves in flight: keep
        // each short (see `INSTALL_MAX`).
        let max_io = if s.install_lock.is_some() {
            self.shared.config.max_io.min(INSTALL_MAX)
        } else {
            self.shared.config.max_io
        };
        let max_pages = (max_io / ps).max(1);
        let first_pages = (self.shared.config.first_chunk / ps).max(1);
        let mut p = first;
        let end = first + n;
        let mut latency_recorded = j.fault_read.is_none();
        let minor = matches!(e.region.backing, Backing::Minor { .. });
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
                    // A page we made present faults again: it was zapped since (a REMOVE not read
                    // yet, a MADV_DONTNEED with no REMOVE event) or the message is a duplicate.
                    // Private memory reads zeros after a zap, never the snapshot's older bytes; a
                    // duplicate is answered EEXIST either way. Shared memory kept its bytes in the
                    // page cache: map them, never overwrite them (unless REMOVEd: planned below).
                    Ok(()) if !j.claimed && !minor => (
                        limit,
                        true,
                        self.resolve_pages(s, e, p, limit - p, true, false),
                    ),
                    Ok(()) if !j.claimed && !e.any_removed(p..limit) => (
                        limit,
                        false,
                        self.resolve_pages(s, e, p, limit - p, false, true),
                    ),
                    Ok(()) => {
                        let (q, zero) = Self::plan(e, p, end, cap, self.shared.config.min_zero_run);
                        (q, zero, self.resolve_pages(s, e, p, q - p, zero, false))
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
                    if !latency_recorded {
                        if let Some(t) = j.fault_read {
                            s.stats.record_latency(t.elapsed());
                        }
                        latency_recorded = true;
                    }
                    self.log_served(s, e, p, done);
                    for i in p..p + done {
                        self.mark_resolved(s, e, i, j);
                    }
                    if !zero {
                        self.wake_if_removed_in_flight(s, e, p, done);
                    }
                    p += done;
                }
                Err(Step::Exists) => {
                    self.log_served(s, e, p, 1);
                    self.mark_resolved(s, e, p, j);
                    p += 1;
                }
                Err(Step::Replan) => add(&s.stats.removed_in_flight, 1),
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
                    // Pages removed while the source was read need none of its bytes: planned
                    // again, they are zeros (a zero resolve reads no source, so this ends).
                    if e.any_removed(p..q) {
                        add(&s.stats.removed_in_flight, 1);
                        continue;
                    }
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
    pub(super) fn no_right_bytes(
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
    pub(super) fn wake_if_removed_in_flight(
        &self,
        s: &Session,
        e: &RegionEntry,
        p: usize,
        n: usize,
    ) {
        if e.any_removed(p..p + n) {
            let ps = e.region.page_size();
            add(&s.stats.wake, 1);
            if let Err(err) = s.uffd.wake(e.addr_of(p), n as u64 * ps) {
                tracing::debug!(session = s.id, error = %err, "wake after a racing REMOVE failed");
            }
        }
    }

    /// For a fill's resolve (a data copy or a zero run), this worker in the idle class until the
    /// guard drops (see `idle`): only around the ioctl (and the install lock it holds shared),
    /// never in a source read.
    fn lowered(&self, s: &Session) -> Option<super::idle::Lowered<'_>> {
        if !self.filling {
            return None;
        }
        let lowered = self.shared.idle.lower(self.index, self.tid?)?;
        add(&s.stats.fill_idle_copies, 1);
        Some(lowered)
    }

    /// Mark pages `p..p + n` of `e`, just made present, in the session's served log. After the
    /// resolve, never before: a handler killed between the two leaves a present page unmarked
    /// (a successor serving it zeros on a silent zap is all that is lost), where a mark before
    /// would have a successor serve zeros for a page never made present.
    fn log_served(&self, s: &Session, e: &RegionEntry, p: usize, n: usize) {
        let Some(log) = &s.served_log else {
            return;
        };
        if let Err(err) = log.mark(e.log_base + e.state_base + p, n) {
            if self.shared.logs.allow("served log") {
                tracing::warn!(
                    session = s.id,
                    error = %err,
                    "marking pages in the served log failed; after a handler restart they would \
                     be served their snapshot bytes if zapped"
                );
            }
        }
    }

    pub(super) fn mark_resolved(&self, s: &Session, e: &RegionEntry, page: usize, j: &Job) {
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
    pub(super) fn classify(
        &self,
        s: &Session,
        e: &RegionEntry,
        p: usize,
        err: ResolveError,
    ) -> Step {
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
    /// `mapped_only`: shared memory whose page cache already holds the pages' bytes is only
    /// mapped (`UFFDIO_CONTINUE`), not written.
    pub(super) fn resolve_pages(
        &mut self,
        s: &Arc<Session>,
        e: &RegionEntry,
        p: usize,
        n: usize,
        zero: bool,
        mapped_only: bool,
    ) -> Result<usize, Step> {
        let ps = e.region.page_size();
        let addr = e.addr_of(p);
        let len = n as u64 * ps;
        // The same length as a buffer size: a run is at most `max_io` bytes, a `usize`.
        let size = n * e.region.kind.page_size();
        let off = e.source_offset_of(p);
        let result: Result<Resolved, faultline_uffd::ResolveError> = match &e.region.backing {
            Backing::Minor { cache } => {
                let Ok(cache_off) = usize::try_from(e.cache_offset + p as u64 * ps) else {
                    return Err(Step::Source(source_failed(
                        e,
                        p,
                        len,
                        "the page cache offset does not fit in memory".into(),
                    )));
                };
                if !zero && !mapped_only {
                    self.ensure_buf(size);
                    e.region
                        .source
                        .read_at(off, &mut self.buf[..size])
                        .map_err(Step::Source)?;
                }
                // Held through the CONTINUE that makes the written bytes the client's.
                let _installing = if zero || mapped_only {
                    None
                } else {
                    installing(s, e, p, n)?
                };
                let write = if mapped_only {
                    Ok(())
                } else if zero {
                    self.ensure_zeros(size);
                    cache.write(cache_off, &self.zeros[..size])
                } else {
                    cache.write(cache_off, &self.buf[..size])
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
                let map = || {
                    self.shared
                        .injected(ResolveOp::Continue, addr, len)
                        .and_then(|()| s.uffd.continue_minor(addr, len, ContinueMode::empty()))
                };
                // Nothing in the page cache there (EFAULT): a page we made present was punched
                // out of the client's memory (MADV_REMOVE, PUNCH_HOLE) with no REMOVE event, and
                // faults again. Its bytes are gone, so it reads zero, as it would without us:
                // allocate the holes — `fallocate` leaves pages that exist, and the client's
                // bytes in them, alone — and map again. A client that punches the page out again
                // in between gets a few more tries, then an explicit end that says so.
                let mut mapped = map();
                let mut refills = 0;
                while mapped_only
                    && matches!(&mapped, Err(err) if err.kind == ResolveErrorKind::BadAddress)
                {
                    if refills == HOLE_REFILLS {
                        return Err(Step::Source(source_failed(
                            e,
                            p,
                            len,
                            format!(
                                "the client's memory file lost these pages again each of the \
                                 {HOLE_REFILLS} times they were allocated and mapped (punched \
                                 out while being served)"
                            ),
                        )));
                    }
                    refills += 1;
                    fill_holes(cache, cache_off, size)
                        .map_err(|why| Step::Source(source_failed(e, p, len, why)))?;
                    add(&s.stats.continue_, 1);
                    mapped = map();
                }
                mapped
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
                let scratch = self.scratch(size).map_err(|_| Step::Retry)?;
                e.region
                    .source
                    .read_at(off, &mut scratch.as_mut_slice()[..size])
                    .map_err(Step::Source)?;
                let _installing = installing(s, e, p, n)?;
                injected.and_then(|()| {
                    s.uffd.move_from_scratch(
                        addr,
                        scratch,
                        0,
                        size,
                        faultline_uffd::MoveMode::empty(),
                    )
                })
            }
            Backing::Copy | Backing::Move if zero && !e.region.kind.is_hugetlb() => {
                add(&s.stats.zeropage, 1);
                let _lowered = self.lowered(s);
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
                    self.ensure_zeros(size);
                    s.uffd.copy(addr, &self.zeros[..size], CopyMode::empty())
                } else if let Some(ptr) = e.region.source.ptr_at(off, len) {
                    let _lowered = self.lowered(s);
                    let _installing = installing(s, e, p, n)?;
                    self.shared.pause_injected(ResolveOp::Copy, addr, len);
                    s.uffd.copy_from_ptr(addr, ptr, size, CopyMode::empty())
                } else {
                    self.ensure_buf(size);
                    let lend = e
                        .region
                        .source
                        .read_or_lend(off, &mut self.buf[..size])
                        .map_err(Step::Source)?;
                    // Whole pages of what was asked, at least one: anything else is a broken
                    // source, and its pages are poisoned rather than filled from a guess.
                    let fits = |n: usize| n > 0 && n <= size && n % e.region.kind.page_size() == 0;
                    let _lowered = self.lowered(s);
                    let _installing = installing(s, e, p, n)?;
                    self.shared.pause_injected(ResolveOp::Copy, addr, len);
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
                let pages = usize::try_from(bytes / ps)
                    .expect("the kernel resolves at most the bytes asked for, a usize");
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
}

/// Allocate zeroed pages in the holes of `cache`'s memfd over `off..off+len`; pages already
/// there are left as they are (`fallocate` mode 0, keeping the file's size).
fn fill_holes(cache: &faultline_uffd::Mapping, off: usize, len: usize) -> Result<(), String> {
    let fd = cache
        .fd()
        .ok_or_else(|| "the page cache mapping has no memfd to allocate in".to_string())?;
    rustix::fs::fallocate(
        fd,
        rustix::fs::FallocateFlags::KEEP_SIZE,
        off as u64,
        len as u64,
    )
    .map_err(|err| format!("allocating the punched-out pages failed: {err}"))
}

/// [`Worker::plan`] over any page classes (`class_of(page)`): where the resolve starting at `p`
/// ends and whether it is a zero resolve. Pure logic, unit-tested below.
pub(super) fn plan_run(
    class_of: impl Fn(usize) -> PageClass,
    p: usize,
    end: usize,
    cap: usize,
    min_zero: usize,
) -> (usize, bool) {
    let limit = end.min(p + cap);
    let zero_stretch = |from: usize| {
        let mut z = from;
        while z < limit && class_of(z) == PageClass::SourceZero {
            z += 1;
        }
        z - from
    };
    match class_of(p) {
        PageClass::Removed => {
            let mut q = p + 1;
            while q < limit && class_of(q) == PageClass::Removed {
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
                match class_of(q) {
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

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PageClass {
    /// Source bytes.
    Data,
    /// The source says zeros.
    SourceZero,
    /// Removed by the client: must read as zeros whatever the source holds.
    Removed,
}

/// Why one resolve step did not make progress.
pub(super) enum Step {
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
    /// A REMOVE read since the run was planned dropped some of its pages: plan it again.
    Replan,
}

/// Leave to install bytes from the source in pages `p..p + n` of `e`, held until they are the
/// client's: they must never land after the client's zap of a page whose REMOVE was read while
/// this resolve was under way (the kernel lets `madvise` zap as soon as the event is read, and a
/// COPY issued after that puts the old bytes back for good). Data resolves hold the session's
/// install lock shared, right around the ioctl (the source was read before); the reader of events
/// holds it exclusively until the REMOVEs it read are applied. Under it, a page removed since the
/// run was planned sends the run back to be planned again (zeros): [`Step::Replan`].
fn installing<'s>(
    s: &'s Session,
    e: &RegionEntry,
    p: usize,
    n: usize,
) -> Result<Option<std::sync::RwLockReadGuard<'s, ()>>, Step> {
    let guard = s.installing();
    if e.any_removed(p..p + n) {
        return Err(Step::Replan);
    }
    Ok(guard)
}

/// A source error for `len` bytes at page `page` of `e`, permanent.
pub(super) fn source_failed(e: &RegionEntry, page: usize, len: u64, what: String) -> SourceError {
    SourceError {
        offset: e.source_offset_of(page),
        len,
        source_name: e.region.source.name(),
        what,
        retry: crate::source::Retry::Permanent,
        cause: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::region::Region;
    use crate::source::MemorySource;
    use faultline_uffd::MemoryKind;
    use PageClass::{Data as D, Removed as R, SourceZero as Z};

    const P: usize = 4096;

    /// The plan over `classes` from page `p`, with `cap` and `min_zero`, to the end of `classes`.
    fn plan_of(classes: &[PageClass], p: usize, cap: usize, min_zero: usize) -> (usize, bool) {
        plan_run(|q| classes[q], p, classes.len(), cap, min_zero)
    }

    #[test]
    fn data_pages_make_one_copy_run_up_to_the_cap() {
        assert_eq!(plan_of(&[D; 10], 0, 64, 8), (10, false));
        assert_eq!(plan_of(&[D; 10], 0, 4, 8), (4, false));
        assert_eq!(plan_of(&[D; 10], 7, 64, 8), (10, false));
        // The end given to the plan bounds it too.
        assert_eq!(plan_run(|_| D, 2, 5, 64, 8), (5, false));
    }

    #[test]
    fn short_zero_stretches_are_copied_with_their_neighbours() {
        // Two source-zero pages inside data: one copy of all seven, not three ioctls.
        let c = [D, D, Z, Z, D, D, D];
        assert_eq!(plan_of(&c, 0, 64, 8), (7, false));
        // A short stretch at the start, followed by data: copied along.
        let c = [Z, Z, D, D];
        assert_eq!(plan_of(&c, 0, 64, 8), (4, false));
    }

    #[test]
    fn long_zero_stretches_become_zeropage_runs() {
        // Data stops before a stretch of at least `min_zero` zero pages ...
        let mut c = vec![D, D];
        c.extend([Z; 8]);
        c.push(D);
        assert_eq!(plan_of(&c, 0, 64, 8), (2, false));
        // ... which is then one zero resolve of exactly that stretch.
        assert_eq!(plan_of(&c, 2, 64, 8), (10, true));
        // With a smaller threshold, three zero pages are enough.
        assert_eq!(plan_of(&[D, Z, Z, Z, D], 0, 64, 3), (1, false));
        assert_eq!(plan_of(&[D, Z, Z, Z, D], 1, 64, 3), (4, true));
    }

    #[test]
    fn a_zero_stretch_reaching_the_limit_is_a_zero_run_however_short() {
        // Nothing after it to copy it along with.
        assert_eq!(plan_of(&[Z, Z], 0, 64, 8), (2, true));
        // The cap is the limit too.
        assert_eq!(plan_of(&[Z, Z, Z, D], 0, 2, 8), (2, true));
    }

    #[test]
    fn removed_pages_are_always_zeros_and_never_joined_with_source_pages() {
        let c = [R, R, R, D, D];
        assert_eq!(plan_of(&c, 0, 64, 8), (3, true));
        // A single removed page is a zero run even below `min_zero`.
        assert_eq!(plan_of(&[R, Z, D], 0, 64, 8), (1, true));
        // Data stops at a removed page (its bytes must not come from the source).
        assert_eq!(plan_of(&[D, D, R, D], 0, 64, 8), (2, false));
        // A short source-zero stretch before a removed page is copied on its own, not joined.
        assert_eq!(plan_of(&[Z, R, D], 0, 64, 8), (1, false));
        // Removed pages are cut by the cap.
        assert_eq!(plan_of(&[R; 6], 1, 3, 8), (4, true));
    }

    /// A region of `pages` pages over `bytes` (at a made-up address: nothing is registered).
    fn entry(bytes: Vec<u8>) -> RegionEntry {
        let len = bytes.len() as u64;
        let source = Arc::new(MemorySource::new(bytes));
        RegionEntry::new(Region::new(
            0x7000_0000_0000,
            len,
            MemoryKind::PrivateAnonymous,
            source,
            0,
        ))
    }

    #[test]
    fn page_classes_come_from_the_removed_bits_and_the_source() {
        // Pages: data, zero, data, zero.
        let mut bytes = vec![0u8; 4 * P];
        bytes[0] = 1;
        bytes[2 * P + 5] = 7;
        let e = entry(bytes);
        assert_eq!(Worker::class(&e, 0), D);
        assert_eq!(Worker::class(&e, 1), Z);
        assert_eq!(Worker::class(&e, 2), D);
        assert_eq!(Worker::class(&e, 3), Z);
        // A removed page reads as zeros whatever the source holds.
        e.states.remove(e.state_base..e.state_base + 1);
        assert_eq!(Worker::class(&e, 0), R);
        assert_eq!(Worker::class(&e, 2), D);
    }

    #[test]
    fn the_plan_of_a_region_follows_its_source_and_removed_pages() {
        // 16 pages: data 0..2, zeros 2..12, data 12..16.
        let mut bytes = vec![0u8; 16 * P];
        for p in (0..2).chain(12..16) {
            bytes[p * P] = 0xaa;
        }
        let e = entry(bytes);
        assert_eq!(Worker::plan(&e, 0, 16, 64, 8), (2, false));
        assert_eq!(Worker::plan(&e, 2, 16, 64, 8), (12, true));
        assert_eq!(Worker::plan(&e, 12, 16, 64, 8), (16, false));
        // With the zero threshold above the stretch, everything is one copy.
        assert_eq!(Worker::plan(&e, 0, 16, 64, 11), (16, false));
        // The balloon took pages 13 and 14: the copy stops there, and they are zeros.
        e.states.remove(e.state_base + 13..e.state_base + 15);
        assert_eq!(Worker::plan(&e, 12, 16, 64, 8), (13, false));
        assert_eq!(Worker::plan(&e, 13, 16, 64, 8), (15, true));
        assert_eq!(Worker::plan(&e, 15, 16, 64, 8), (16, false));
    }
}
