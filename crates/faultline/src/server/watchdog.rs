//! The watchdog: reports faults unresolved too long and ends, as unservable, a source read that
//! hangs past the fault deadline.

use crate::sync::{lock, read};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::add;

use super::session::Session;
use super::unservable::Unserved;
use super::Shared;

/// What a worker is resolving now, for the watchdog.
#[derive(Debug, Clone, Copy)]
pub(super) struct Current {
    pub(super) session: u64,
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) since: Instant,
    /// 0: not reported; 1: reported stuck; 2: ended past the deadline.
    pub(super) stage: u8,
}

impl Shared {
    /// The watchdog: every tick, report (once per fault, with address and age) any claimed fault
    /// older than [`ServerConfig::stuck_after`], and end as unservable what a worker has been
    /// resolving for longer than [`ServerConfig::fault_deadline`] (a source read that hangs).
    /// Deferred work reaches its deadline in the worker ([`Worker::run_job`]).
    ///
    /// [`ServerConfig::stuck_after`]: super::ServerConfig::stuck_after
    /// [`ServerConfig::fault_deadline`]: super::ServerConfig::fault_deadline
    /// [`Worker::run_job`]: super::worker::Worker::run_job
    pub(super) fn watchdog(&self, stop: &std::sync::mpsc::Receiver<()>) {
        let tick = Self::watch_tick(self.config.stuck_after);
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
            self.watch_once(Instant::now());
            self.logs.flush();
        }
    }

    /// The watchdog's period.
    fn watch_tick(stuck_after: Duration) -> Duration {
        (stuck_after / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    pub(super) fn watch_once(&self, now: Instant) {
        // A fill copy in the idle class takes ~75 µs of CPU: a worker lowered for a whole tick is
        // starved by busy CPUs, and something may wait for it unseen (a lock of the kernel's):
        // raised, as a backstop to the raises of whoever waits.
        let (stuck, deadline) = (self.config.stuck_after, self.config.fault_deadline);
        if self.idle.any_lowered() {
            let raised = self.idle.raise_lowered_for(Self::watch_tick(stuck));
            crate::stats::add(&self.total.fill_raised, raised as u64);
        }
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

    pub(super) fn report_stuck(&self, s: &Session, addr: u64, age: Duration, state: &str) {
        add(&s.stats.stuck_faults, 1);
        if self.logs.allow("stuck") {
            tracing::warn!(
                session = s.id,
                label = %s.label,
                addr = format_args!("{addr:#x}"),
                age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                state,
                deadline_ms = u64::try_from(self.config.fault_deadline.as_millis()).unwrap_or(u64::MAX),
                "fault unresolved"
            );
        }
    }
}
