//! Background fill copies in the kernel's idle scheduling class ([`ServerConfig::idle_fill`]).
//!
//! A fill copies pages nobody has asked for, on the CPUs of the threads it serves. Measured on
//! the real client (a restored Firecracker guest, 2 host CPUs that its vCPUs keep busy; 285
//! rounds over five runs, paired per round), a fill at normal priority delays the guest's first
//! tick by 2.3% against the File backend; the same copies in `SCHED_IDLE`, which take only CPU
//! time no other thread wants, by 0.3% (0.996–1.007): idle against normal 0.976 (0.969–0.983).
//! See docs/firecracker.md, run U.
//!
//! A lowered worker is a priority inversion waiting to happen: a vCPU that faults on a page of
//! the run it is copying, or the reader of a session's events that needs the install lock it
//! holds shared, would wait for a thread that gets CPU only when nothing else runs. So a worker
//! is lowered only around the resolve ioctl of a fill run (never while it holds a lock of ours
//! other than its shared install lock, never in a source read), and whoever would wait for it
//! raises it first ([`IdleFill::raise_all`]): a demand fault on a page in flight or one that
//! queues readahead (a fill step holds a background slot), a reader that cannot take the install
//! lock at once, and the watchdog for a worker lowered a whole tick, as a backstop. While fill
//! copies go idle, a fill step is one copy of at most 256 KiB, so readahead waits for one at most:
//! with 1 MiB steps and 4 clones on 2 cores, readahead starved behind the fill (318 handler
//! faults per restore instead of ~45).
//!
//! [`ServerConfig::idle_fill`]: super::ServerConfig::idle_fill

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultline_uffd::sched::{self, SchedClass};
use rustix::thread::Pid;

/// Per worker: its thread id while it copies in the idle class (0: not lowered), since when
/// (ns after [`IdleFill`]'s start), and whether someone raised it during that copy.
#[derive(Debug, Default)]
struct Slot {
    tid: AtomicI32,
    since: AtomicU64,
    raised: AtomicBool,
}

/// The workers lowered for a fill copy now.
#[derive(Debug)]
pub(super) struct IdleFill {
    enabled: AtomicBool,
    slots: Vec<Slot>,
    start: Instant,
}

impl IdleFill {
    /// For `workers` workers; `wanted` false, or a process whose threads cannot leave
    /// `SCHED_IDLE` again (logged), never lowers any.
    pub(super) fn new(wanted: bool, workers: usize) -> IdleFill {
        let enabled = wanted
            && match sched::can_leave_idle() {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(
                        reason = %why,
                        "background fill runs at normal priority: a thread of this process could \
                         not come back from SCHED_IDLE"
                    );
                    false
                }
            };
        IdleFill {
            enabled: AtomicBool::new(enabled),
            slots: (0..workers).map(|_| Slot::default()).collect(),
            start: Instant::now(),
        }
    }

    /// Lower worker `worker` (the calling thread, `tid`) for one fill copy; the guard raises it
    /// again. `None` when idle fill is off.
    pub(super) fn lower(&self, worker: usize, tid: Pid) -> Option<Lowered<'_>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let slot = self.slots.get(worker)?;
        // Published before lowering: whoever then finds this worker in the way raises it. One who
        // raised it between the two is seen in `raised` right after.
        slot.since.store(self.now_ns(), Ordering::SeqCst);
        slot.tid.store(tid.as_raw_nonzero().get(), Ordering::SeqCst);
        if let Err(e) = sched::set_class(None, SchedClass::Idle) {
            slot.tid.store(0, Ordering::SeqCst);
            self.give_up("entering SCHED_IDLE", e);
            return None;
        }
        if slot.raised.swap(false, Ordering::SeqCst) {
            self.raise_self();
        }
        Some(Lowered { idle: self, slot })
    }

    /// Whether fill copies go idle (asked for, allowed, and no raise has failed).
    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether a worker is lowered now.
    pub(super) fn any_lowered(&self) -> bool {
        self.slots.iter().any(|s| s.tid.load(Ordering::SeqCst) != 0)
    }

    /// Raise every lowered worker back to the normal class (something waits for one of them).
    /// Returns how many were raised.
    pub(super) fn raise_all(&self) -> usize {
        self.raise_lowered_for(Duration::ZERO)
    }

    /// Raise the workers lowered for at least `age` (the watchdog's backstop). Returns how many.
    pub(super) fn raise_lowered_for(&self, age: Duration) -> usize {
        let before = if age.is_zero() {
            u64::MAX
        } else {
            self.now_ns()
                .saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX))
        };
        let mut n = 0;
        for slot in &self.slots {
            let tid = slot.tid.load(Ordering::SeqCst);
            if slot.since.load(Ordering::SeqCst) > before {
                continue;
            }
            let Some(pid) = Pid::from_raw(tid) else {
                continue;
            };
            slot.raised.store(true, Ordering::SeqCst);
            // A worker that finished its copy meanwhile is normal already (or lowered for its
            // next copy, which then runs at normal priority): harmless either way.
            match sched::set_class(Some(pid), SchedClass::Normal) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!(tid, error = %e, "raising a fill worker failed"),
            }
        }
        n
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn raise_self(&self) {
        if let Err(e) = sched::set_class(None, SchedClass::Normal) {
            self.give_up("leaving SCHED_IDLE", e);
        }
    }

    fn give_up(&self, what: &str, e: rustix::io::Errno) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "{what} failed: background fill runs at normal priority from now on");
        }
    }
}

/// A worker lowered for one fill copy; dropping it raises the worker again.
pub(super) struct Lowered<'a> {
    idle: &'a IdleFill,
    slot: &'a Slot,
}

impl Drop for Lowered<'_> {
    fn drop(&mut self) {
        self.idle.raise_self();
        self.slot.tid.store(0, Ordering::SeqCst);
        self.slot.raised.store(false, Ordering::SeqCst);
    }
}
