//! Counters and the fault-latency histogram, as a struct, JSON and Prometheus text.

use crate::sync::lock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Live counters of a session (or of the whole server).
#[derive(Debug)]
pub struct Counters {
    pub(crate) faults: AtomicU64,
    pub(crate) duplicate_faults: AtomicU64,
    pub(crate) present_refaults: AtomicU64,
    pub(crate) copy: AtomicU64,
    pub(crate) zeropage: AtomicU64,
    pub(crate) continue_: AtomicU64,
    pub(crate) move_: AtomicU64,
    pub(crate) poison: AtomicU64,
    pub(crate) wake: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) pages: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) eexist: AtomicU64,
    pub(crate) eagain: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) readahead_pages: AtomicU64,
    pub(crate) prefetch_pages: AtomicU64,
    pub(crate) fill_pages: AtomicU64,
    pub(crate) fill_idle_copies: AtomicU64,
    pub(crate) fill_raised: AtomicU64,
    pub(crate) source_errors: AtomicU64,
    pub(crate) source_retries: AtomicU64,
    pub(crate) poisoned_pages: AtomicU64,
    pub(crate) events_remove: AtomicU64,
    pub(crate) removed_in_flight: AtomicU64,
    pub(crate) events_unmap: AtomicU64,
    pub(crate) events_remap: AtomicU64,
    pub(crate) events_fork: AtomicU64,
    pub(crate) events_unknown: AtomicU64,
    pub(crate) unservable: AtomicU64,
    pub(crate) stuck_faults: AtomicU64,
    latency: Mutex<Histogram<u32>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            faults: AtomicU64::new(0),
            duplicate_faults: AtomicU64::new(0),
            present_refaults: AtomicU64::new(0),
            copy: AtomicU64::new(0),
            zeropage: AtomicU64::new(0),
            continue_: AtomicU64::new(0),
            move_: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            wake: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            eexist: AtomicU64::new(0),
            eagain: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            readahead_pages: AtomicU64::new(0),
            prefetch_pages: AtomicU64::new(0),
            fill_pages: AtomicU64::new(0),
            fill_idle_copies: AtomicU64::new(0),
            fill_raised: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            source_retries: AtomicU64::new(0),
            poisoned_pages: AtomicU64::new(0),
            events_remove: AtomicU64::new(0),
            removed_in_flight: AtomicU64::new(0),
            events_unmap: AtomicU64::new(0),
            events_remap: AtomicU64::new(0),
            events_fork: AtomicU64::new(0),
            events_unknown: AtomicU64::new(0),
            unservable: AtomicU64::new(0),
            stuck_faults: AtomicU64::new(0),
            latency: Mutex::new(
                // 1 µs .. 60 s at 2 significant digits with 32-bit counts: ~13 KiB per session
                // (3 digits and 64-bit counts from 1 ns took ~220 KiB).
                Histogram::new_with_bounds(1_000, 60_000_000_000, 2)
                    .expect("valid histogram bounds"),
            ),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Record one fault's latency (message read → page resolved).
    pub(crate) fn record_latency(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1_000);
        {
            let mut h = lock(&self.latency);
            h.saturating_record(ns);
        }
    }

    /// The counters with the same name in `self` and `other`, in pairs.
    fn pairs<'a>(&'a self, other: &'a Counters) -> [(&'a AtomicU64, &'a AtomicU64); 31] {
        [
            (&self.faults, &other.faults),
            (&self.duplicate_faults, &other.duplicate_faults),
            (&self.present_refaults, &other.present_refaults),
            (&self.copy, &other.copy),
            (&self.zeropage, &other.zeropage),
            (&self.continue_, &other.continue_),
            (&self.move_, &other.move_),
            (&self.poison, &other.poison),
            (&self.wake, &other.wake),
            (&self.bytes, &other.bytes),
            (&self.pages, &other.pages),
            (&self.zero_pages, &other.zero_pages),
            (&self.eexist, &other.eexist),
            (&self.eagain, &other.eagain),
            (&self.deferred, &other.deferred),
            (&self.readahead_pages, &other.readahead_pages),
            (&self.prefetch_pages, &other.prefetch_pages),
            (&self.fill_pages, &other.fill_pages),
            (&self.fill_idle_copies, &other.fill_idle_copies),
            (&self.fill_raised, &other.fill_raised),
            (&self.source_errors, &other.source_errors),
            (&self.source_retries, &other.source_retries),
            (&self.poisoned_pages, &other.poisoned_pages),
            (&self.events_remove, &other.events_remove),
            (&self.removed_in_flight, &other.removed_in_flight),
            (&self.events_unmap, &other.events_unmap),
            (&self.events_remap, &other.events_remap),
            (&self.events_fork, &other.events_fork),
            (&self.events_unknown, &other.events_unknown),
            (&self.unservable, &other.unservable),
            (&self.stuck_faults, &other.stuck_faults),
        ]
    }

    /// Add these counters (and the latency samples) into `into`.
    pub(crate) fn merge_into(&self, into: &Counters) {
        for (from, to) in self.pairs(into) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let from = lock(&self.latency);
        let _ = lock(&into.latency).add(&*from);
    }

    /// Add the counts of `carried` (a snapshot taken elsewhere, e.g. by a worker process that
    /// died) to these counters; its latency samples are not carried (only their summary was).
    pub fn add_stats(&self, carried: &Stats) {
        let theirs = Counters::from_counts(carried);
        for (from, to) in theirs.pairs(self) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn from_counts(s: &Stats) -> Counters {
        let c = Counters::default();
        let n = |v: u64| AtomicU64::new(v);
        Counters {
            faults: n(s.faults),
            duplicate_faults: n(s.duplicate_faults),
            present_refaults: n(s.present_refaults),
            copy: n(s.copy),
            zeropage: n(s.zeropage),
            continue_: n(s.continue_),
            move_: n(s.move_),
            poison: n(s.poison),
            wake: n(s.wake),
            bytes: n(s.bytes),
            pages: n(s.pages),
            zero_pages: n(s.zero_pages),
            eexist: n(s.eexist),
            eagain: n(s.eagain),
            deferred: n(s.deferred),
            readahead_pages: n(s.readahead_pages),
            prefetch_pages: n(s.prefetch_pages),
            fill_pages: n(s.fill_pages),
            fill_idle_copies: n(s.fill_idle_copies),
            fill_raised: n(s.fill_raised),
            source_errors: n(s.source_errors),
            source_retries: n(s.source_retries),
            poisoned_pages: n(s.poisoned_pages),
            events_remove: n(s.events_remove),
            removed_in_flight: n(s.removed_in_flight),
            events_unmap: n(s.events_unmap),
            events_remap: n(s.events_remap),
            events_fork: n(s.events_fork),
            events_unknown: n(s.events_unknown),
            unservable: n(s.unservable),
            stuck_faults: n(s.stuck_faults),
            latency: c.latency,
        }
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> Stats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (p50, p99, max, n) = match lock(&self.latency) {
            h if !h.is_empty() => (
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max(),
                h.len(),
            ),
            _ => (0, 0, 0, 0),
        };
        Stats {
            faults: l(&self.faults),
            duplicate_faults: l(&self.duplicate_faults),
            present_refaults: l(&self.present_refaults),
            copy: l(&self.copy),
            zeropage: l(&self.zeropage),
            continue_: l(&self.continue_),
            move_: l(&self.move_),
            poison: l(&self.poison),
            wake: l(&self.wake),
            bytes: l(&self.bytes),
            pages: l(&self.pages),
            zero_pages: l(&self.zero_pages),
            eexist: l(&self.eexist),
            eagain: l(&self.eagain),
            deferred: l(&self.deferred),
            readahead_pages: l(&self.readahead_pages),
            prefetch_pages: l(&self.prefetch_pages),
            fill_pages: l(&self.fill_pages),
            fill_idle_copies: l(&self.fill_idle_copies),
            fill_raised: l(&self.fill_raised),
            source_errors: l(&self.source_errors),
            source_retries: l(&self.source_retries),
            poisoned_pages: l(&self.poisoned_pages),
            events_remove: l(&self.events_remove),
            removed_in_flight: l(&self.removed_in_flight),
            events_unmap: l(&self.events_unmap),
            events_remap: l(&self.events_remap),
            events_fork: l(&self.events_fork),
            events_unknown: l(&self.events_unknown),
            unservable: l(&self.unservable),
            stuck_faults: l(&self.stuck_faults),
            latency_samples: n,
            latency_p50_ns: p50,
            latency_p99_ns: p99,
            latency_max_ns: max,
        }
    }
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Fault messages read.
    pub faults: u64,
    /// Faults on a page already in flight (woken by its resolver; no ioctl).
    pub duplicate_faults: u64,
    /// Faults on a page believed present (resolved again; normally EEXIST).
    pub present_refaults: u64,
    /// `UFFDIO_COPY` calls.
    pub copy: u64,
    /// `UFFDIO_ZEROPAGE` calls.
    pub zeropage: u64,
    /// `UFFDIO_CONTINUE` calls.
    pub continue_: u64,
    /// `UFFDIO_MOVE` calls.
    pub move_: u64,
    /// `UFFDIO_POISON` calls.
    pub poison: u64,
    /// `UFFDIO_WAKE` calls.
    pub wake: u64,
    /// Bytes resolved (all kinds).
    pub bytes: u64,
    /// Pages resolved (all kinds).
    pub pages: u64,
    /// Pages resolved as zeros.
    pub zero_pages: u64,
    /// Resolves answered EEXIST.
    pub eexist: u64,
    /// Resolves answered EAGAIN.
    pub eagain: u64,
    /// Resolves deferred (EAGAIN or a retryable source error).
    pub deferred: u64,
    /// Pages resolved by readahead beyond the faulting page.
    pub readahead_pages: u64,
    /// Pages resolved by working-set prefetch.
    pub prefetch_pages: u64,
    /// Pages resolved by background fill.
    pub fill_pages: u64,
    /// Background fill copies made in the idle scheduling class
    /// ([`crate::ServerConfig::idle_fill`]).
    pub fill_idle_copies: u64,
    /// Workers raised out of the idle class during a fill copy because something waited for
    /// them (a fault on a page they were copying, the reader of events, the watchdog).
    pub fill_raised: u64,
    /// Source reads that failed.
    pub source_errors: u64,
    /// Source reads retried.
    pub source_retries: u64,
    /// Pages poisoned because their source could not be read.
    pub poisoned_pages: u64,
    /// REMOVE events.
    pub events_remove: u64,
    /// Runs planned again because pages of theirs were removed while they were resolved (found
    /// under the install lock before the ioctl, or after their source read failed): served zeros
    /// instead of the source's older bytes.
    pub removed_in_flight: u64,
    /// UNMAP events.
    pub events_unmap: u64,
    /// REMAP events.
    pub events_remap: u64,
    /// FORK events.
    pub events_fork: u64,
    /// Unknown events.
    pub events_unknown: u64,
    /// Clients ended explicitly (killed through their pidfd, or their session closed) because a
    /// page could be neither served nor poisoned: 0 or 1 per session. See
    /// [`crate::server::Unservable`].
    pub unservable: u64,
    /// Faults the watchdog found unresolved past the server's fault deadline (each logged once).
    pub stuck_faults: u64,
    /// Faults with a latency sample.
    pub latency_samples: u64,
    /// Median fault latency (ns).
    pub latency_p50_ns: u64,
    /// 99th percentile fault latency (ns).
    pub latency_p99_ns: u64,
    /// Largest fault latency (ns).
    pub latency_max_ns: u64,
}

impl Stats {
    /// All resolve ioctls.
    pub fn resolves(&self) -> u64 {
        self.copy + self.zeropage + self.continue_ + self.move_ + self.poison
    }

    /// JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Prometheus text exposition of this snapshot alone, labelled with `labels`
    /// (e.g. `session="3"`).
    pub fn to_prometheus(&self, labels: &str) -> String {
        prometheus(&[(labels.to_string(), *self)])
    }
}

/// Prometheus text for several labelled snapshots: each metric's `# TYPE` line once, then one
/// sample per snapshot (the exposition format rejects a repeated `# TYPE`).
pub fn prometheus(samples: &[(String, Stats)]) -> String {
    let values: Vec<serde_json::Map<String, serde_json::Value>> = samples
        .iter()
        .map(|(_, s)| match serde_json::to_value(s) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        })
        .collect();
    let mut out = String::new();
    let Some(first) = values.first() else {
        return out;
    };
    for key in first.keys() {
        let name = format!("faultline_{key}");
        let kind = if key.starts_with("latency_") && key != "latency_samples" {
            "gauge"
        } else {
            "counter"
        };
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for ((labels, _), v) in samples.iter().zip(&values) {
            if let Some(val) = v.get(key) {
                out.push_str(&format!("{name}{{{labels}}} {val}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_json_and_prometheus() {
        let c = Counters::default();
        add(&c.faults, 3);
        add(&c.copy, 2);
        c.record_latency(Duration::from_micros(5));
        c.record_latency(Duration::from_micros(7));
        let s = c.snapshot();
        assert_eq!((s.faults, s.copy, s.latency_samples), (3, 2, 2));
        assert!(
            (4_900..=5_200).contains(&s.latency_p50_ns)
                && (6_900..=7_300).contains(&s.latency_max_ns),
            "2 significant digits: {s:?}"
        );
        let j: serde_json::Value = serde_json::from_str(&s.to_json()).expect("json");
        assert_eq!(j["faults"], 3);
        let p = s.to_prometheus("session=\"1\"");
        assert!(p.contains("faultline_copy{session=\"1\"} 2\n"));
        assert!(p.contains("# TYPE faultline_latency_p99_ns gauge"));
        let two = prometheus(&[("scope=\"total\"".into(), s), ("session=\"1\"".into(), s)]);
        assert_eq!(two.matches("# TYPE faultline_copy counter").count(), 1);
        assert!(
            two.contains("faultline_copy{scope=\"total\"} 2\nfaultline_copy{session=\"1\"} 2\n")
        );
    }
}
