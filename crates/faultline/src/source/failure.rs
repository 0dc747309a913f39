//! A source wrapper that injects failures, for testing what a server does when reads fail.
//!
//! [`FailureInjecting`] wraps any source and applies a list of [`Failure`] rules to its reads:
//! transient failures (the first `n` reads, or the first `n` reads of one offset), permanent
//! failures of one offset, short reads, and slow reads. It counts every read and every injected
//! failure ([`FailureStats`]), so a test can assert that a server retried exactly as often as it
//! should and then gave up (poisoned the page).
//!
//! A rule that applies to a range also hides the inner source's shortcuts for it:
//! [`PageSource::ptr_at`] and [`PageSource::is_zero`] answer `None`, so the server goes through
//! [`PageSource::read_at`] and meets the failure instead of copying from a lent pointer or
//! resolving with a zero page. Rules can be added and cleared while the source is being served
//! (`add_rule`, `clear_rules`), e.g. to let a failing page heal.
//!
//! Rules are checked in order; the first that fires decides the error, and only that rule's
//! count goes down. A `Slow` rule never fails a read: it delays it, and every read is delayed by
//! the sum of all `Slow` rules, before any other rule is looked at.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{check_bounds, PageSource, Retry, SourceError};

/// One failure rule. A read "touches" `offset` when `offset` lies in the range it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first `n` reads (of any range) that no earlier rule failed fail with a retryable
    /// error; later reads go through.
    FirstReads(u64),
    /// The first `times` reads touching `offset` fail with a retryable error; later ones go
    /// through (a page that heals after retries).
    RetryableAt {
        /// A byte offset in the source.
        offset: u64,
        /// How many reads fail.
        times: u64,
    },
    /// Every read touching `offset` fails with a permanent error.
    PermanentAt {
        /// A byte offset in the source.
        offset: u64,
    },
    /// Every read touching `offset` stops there: the bytes before it are read, then the read
    /// fails with a permanent "short read" error, as a file truncated under the reader would.
    ShortReadAt {
        /// A byte offset in the source: where the data appears to end.
        offset: u64,
    },
    /// Every read sleeps this long before doing anything else.
    Slow(Duration),
    /// Every read touching `offset` panics (a buggy source): the server must poison its pages
    /// and keep serving.
    PanicAt {
        /// A byte offset in the source.
        offset: u64,
    },
    /// Every read touching `offset` blocks this long, then goes through (a hung network read):
    /// the server's watchdog must end the fault at its deadline.
    HangAt {
        /// A byte offset in the source.
        offset: u64,
        /// How long the read blocks.
        delay: Duration,
    },
}

/// A rule and how many more times it fires (for the counted rules).
#[derive(Debug, Clone, Copy)]
struct Rule {
    failure: Failure,
    remaining: u64,
}

impl Rule {
    fn new(failure: Failure) -> Rule {
        let remaining = match failure {
            Failure::FirstReads(n) => n,
            Failure::RetryableAt { times, .. } => times,
            _ => 0,
        };
        Rule { failure, remaining }
    }

    /// Whether the rule would act on a read of `offset..end`.
    fn applies(&self, offset: u64, end: u64) -> bool {
        let touches = |at: u64| offset <= at && at < end;
        match self.failure {
            Failure::FirstReads(_) => self.remaining > 0,
            Failure::RetryableAt { offset: at, .. } => self.remaining > 0 && touches(at),
            Failure::PermanentAt { offset: at }
            | Failure::ShortReadAt { offset: at }
            | Failure::PanicAt { offset: at }
            | Failure::HangAt { offset: at, .. } => touches(at),
            Failure::Slow(_) => true,
        }
    }
}

/// What an injected rule did to one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    Fail { retry: Retry, at: Option<u64> },
    Short { at: u64 },
    Panic { at: u64 },
    Hang { delay: Duration },
}

/// Counts of what a [`FailureInjecting`] source did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureStats {
    /// Calls of `read_at` (all of them, failed or not, in range or not).
    pub reads: u64,
    /// Reads that failed because of a rule (`retryable + permanent + short_reads`).
    pub injected: u64,
    /// Injected retryable failures.
    pub retryable: u64,
    /// Injected permanent failures (not counting short reads).
    pub permanent: u64,
    /// Injected short reads.
    pub short_reads: u64,
    /// Reads delayed by a `Slow` rule.
    pub slowed: u64,
}

/// A source that fails reads of an inner source as configured.
#[derive(Debug)]
pub struct FailureInjecting<S> {
    inner: S,
    rules: Mutex<Vec<Rule>>,
    reads: AtomicU64,
    retryable: AtomicU64,
    permanent: AtomicU64,
    short_reads: AtomicU64,
    slowed: AtomicU64,
}

impl<S: PageSource> FailureInjecting<S> {
    /// Wrap `inner`, with no rules yet (every read goes through).
    pub fn new(inner: S) -> FailureInjecting<S> {
        FailureInjecting {
            inner,
            rules: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            retryable: AtomicU64::new(0),
            permanent: AtomicU64::new(0),
            short_reads: AtomicU64::new(0),
            slowed: AtomicU64::new(0),
        }
    }

    /// Add a rule (builder form of [`FailureInjecting::add_rule`]).
    pub fn with_rule(self, failure: Failure) -> FailureInjecting<S> {
        self.add_rule(failure);
        self
    }

    /// Add a rule after the existing ones.
    pub fn add_rule(&self, failure: Failure) {
        self.rules().push(Rule::new(failure));
    }

    /// Remove every rule: from now on reads go through.
    pub fn clear_rules(&self) {
        self.rules().clear();
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// What happened so far.
    pub fn stats(&self) -> FailureStats {
        let retryable = self.retryable.load(Ordering::Relaxed);
        let permanent = self.permanent.load(Ordering::Relaxed);
        let short_reads = self.short_reads.load(Ordering::Relaxed);
        FailureStats {
            reads: self.reads.load(Ordering::Relaxed),
            injected: retryable + permanent + short_reads,
            retryable,
            permanent,
            short_reads,
            slowed: self.slowed.load(Ordering::Relaxed),
        }
    }

    /// The rules, even if a thread panicked holding them (they are plain data).
    fn rules(&self) -> MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any rule would act on a read of `offset..offset + len`.
    fn any_applies(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.rules().iter().any(|r| r.applies(offset, end))
    }

    /// Decide what the rules do to a read of `offset..end`: the total delay and the first
    /// failure, consuming one firing of that rule.
    fn decide(&self, offset: u64, end: u64) -> (Duration, Option<Injected>) {
        let mut rules = self.rules();
        let delay = rules
            .iter()
            .filter_map(|r| match r.failure {
                Failure::Slow(d) => Some(d),
                _ => None,
            })
            .sum();
        for rule in rules.iter_mut() {
            if matches!(rule.failure, Failure::Slow(_)) || !rule.applies(offset, end) {
                continue;
            }
            let injected = match rule.failure {
                Failure::FirstReads(_) => Injected::Fail {
                    retry: Retry::Retryable,
                    at: None,
                },
                Failure::RetryableAt { offset: at, .. } => Injected::Fail {
                    retry: Retry::Retryable,
                    at: Some(at),
                },
                Failure::PermanentAt { offset: at } => Injected::Fail {
                    retry: Retry::Permanent,
                    at: Some(at),
                },
                Failure::ShortReadAt { offset: at } => Injected::Short { at },
                Failure::PanicAt { offset: at } => Injected::Panic { at },
                Failure::HangAt { delay, .. } => Injected::Hang { delay },
                Failure::Slow(_) => continue,
            };
            rule.remaining = rule.remaining.saturating_sub(1);
            return (delay, Some(injected));
        }
        (delay, None)
    }
}

impl<S: PageSource> PageSource for FailureInjecting<S> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn name(&self) -> String {
        self.inner.name()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let len = buf.len() as u64;
        let name = self.inner.name();
        check_bounds(&name, offset, len, self.inner.len())?;
        let (delay, injected) = self.decide(offset, offset + len);
        if !delay.is_zero() {
            self.slowed.fetch_add(1, Ordering::Relaxed);
            // The injected behaviour itself (a slow source), not synchronisation.
            std::thread::sleep(delay);
        }
        match injected {
            None => self.inner.read_at(offset, buf),
            Some(Injected::Fail { retry, at }) => {
                let counter = match retry {
                    Retry::Retryable => &self.retryable,
                    Retry::Permanent => &self.permanent,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let kind = match retry {
                    Retry::Retryable => "retryable",
                    Retry::Permanent => "permanent",
                };
                let what = match at {
                    Some(at) => format!("injected {kind} failure at offset {at:#x}"),
                    None => format!("injected {kind} failure"),
                };
                Err(SourceError {
                    offset,
                    len,
                    source_name: name,
                    what,
                    retry,
                    cause: None,
                })
            }
            Some(Injected::Panic { at }) => {
                self.permanent.fetch_add(1, Ordering::Relaxed);
                panic!("injected panic reading {name} at offset {at:#x}")
            }
            Some(Injected::Hang { delay }) => {
                self.slowed.fetch_add(1, Ordering::Relaxed);
                // The injected behaviour itself (a hung read), not synchronisation.
                std::thread::sleep(delay);
                self.inner.read_at(offset, buf)
            }
            Some(Injected::Short { at }) => {
                self.short_reads.fetch_add(1, Ordering::Relaxed);
                let got = at - offset;
                let prefix = &mut buf[..usize::try_from(got)
                    .expect("the rule applies: `at` lies inside the read, below buf.len()")];
                self.inner.read_at(offset, prefix)?;
                Err(SourceError::short_read(&name, offset, len, got))
            }
        }
    }

    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        if self.any_applies(offset, len) {
            return None;
        }
        self.inner.ptr_at(offset, len)
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        if self.any_applies(offset, len) {
            return None;
        }
        self.inner.is_zero(offset, len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::{MemorySource, ZeroSource};
    use std::sync::Arc;
    use std::time::Instant;

    const P: u64 = 4096;
    /// [`P`] as a buffer length.
    const PB: usize = 4096;

    fn data() -> Vec<u8> {
        (0..4 * P).map(|i| (i % 199) as u8 + 1).collect()
    }

    fn page(s: &impl PageSource, n: u64) -> Result<Vec<u8>, SourceError> {
        let mut buf = vec![0u8; PB];
        s.read_at(n * P, &mut buf).map(|()| buf)
    }

    #[test]
    fn no_rules_is_transparent() {
        let d = data();
        let s = FailureInjecting::new(MemorySource::new(d.clone()));
        assert_eq!(page(&s, 1).unwrap(), d[PB..2 * PB]);
        assert!(s.ptr_at(0, P).is_some());
        assert_eq!(s.is_zero(0, P), Some(false));
        assert_eq!(s.name(), "memory");
        assert_eq!(s.len(), 4 * P);
        assert_eq!(
            s.stats(),
            FailureStats {
                reads: 1,
                ..FailureStats::default()
            }
        );
    }

    #[test]
    fn first_reads_fail_then_succeed() {
        let d = data();
        let s =
            FailureInjecting::new(MemorySource::new(d.clone())).with_rule(Failure::FirstReads(2));
        // While the rule is live, shortcuts are hidden so the failure is met.
        assert_eq!(s.ptr_at(3 * P, P), None);
        for _ in 0..2 {
            let e = page(&s, 0).unwrap_err();
            assert!(e.is_retryable());
            assert_eq!(e.offset, 0);
            assert!(e.what.contains("injected retryable"), "{e}");
        }
        assert_eq!(page(&s, 0).unwrap(), d[..PB]);
        assert!(s.ptr_at(3 * P, P).is_some());
        let st = s.stats();
        assert_eq!(
            (st.reads, st.injected, st.retryable, st.permanent),
            (3, 2, 2, 0)
        );
    }

    #[test]
    fn retryable_at_fails_only_that_offset_the_given_times() {
        let d = data();
        let s =
            FailureInjecting::new(MemorySource::new(d.clone())).with_rule(Failure::RetryableAt {
                offset: 2 * P + 10,
                times: 3,
            });
        assert!(page(&s, 1).is_ok());
        assert!(s.ptr_at(P, P).is_some());
        assert_eq!(s.ptr_at(2 * P, P), None);
        for _ in 0..3 {
            let e = page(&s, 2).unwrap_err();
            assert!(e.is_retryable());
            assert!(e.to_string().contains("0x200a"), "{e}");
        }
        assert_eq!(page(&s, 2).unwrap(), d[2 * PB..3 * PB]);
        assert!(s.ptr_at(2 * P, P).is_some());
        let st = s.stats();
        assert_eq!((st.reads, st.retryable, st.injected), (5, 3, 3));
    }

    #[test]
    fn permanent_at_fails_forever_and_hides_zero() {
        let s = FailureInjecting::new(ZeroSource::new(4 * P))
            .with_rule(Failure::PermanentAt { offset: P });
        assert_eq!(s.is_zero(0, P), Some(true));
        assert_eq!(s.is_zero(0, 2 * P), None);
        for _ in 0..5 {
            let e = page(&s, 1).unwrap_err();
            assert_eq!(e.retry, Retry::Permanent);
            assert_eq!(e.offset, P);
            assert_eq!(e.source_name, "zero");
        }
        assert!(page(&s, 0).is_ok());
        let st = s.stats();
        assert_eq!(
            (st.reads, st.permanent, st.injected, st.retryable),
            (6, 5, 5, 0)
        );
        s.clear_rules();
        assert!(page(&s, 1).is_ok());
        assert_eq!(s.is_zero(0, 2 * P), Some(true));
        assert_eq!(s.stats().injected, 5);
    }

    #[test]
    fn short_read_fills_the_prefix_then_fails() {
        let d = data();
        let s = FailureInjecting::new(MemorySource::new(d.clone()))
            .with_rule(Failure::ShortReadAt { offset: P + 100 });
        let mut buf = vec![0u8; 2 * PB];
        let e = s.read_at(P, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert!(e.to_string().contains("short read"), "{e}");
        assert!(e.to_string().contains("100 of 8192"), "{e}");
        assert_eq!(buf[..100], d[PB..PB + 100]);
        assert!(buf[100..].iter().all(|&b| b == 0));
        // Reads ending before the offset go through.
        let mut ok = vec![0u8; 100];
        s.read_at(P, &mut ok).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.reads, st.short_reads, st.injected, st.permanent),
            (2, 1, 1, 0)
        );
    }

    #[test]
    fn slow_delays_every_read_and_rules_apply_in_order() {
        let s = FailureInjecting::new(MemorySource::new(data()))
            .with_rule(Failure::PermanentAt { offset: 0 })
            .with_rule(Failure::FirstReads(1))
            .with_rule(Failure::Slow(Duration::from_millis(20)));
        assert_eq!(s.ptr_at(P, P), None, "slow reads hide the pointer too");
        let t = Instant::now();
        // Page 0: the permanent rule fires first; FirstReads is not consumed.
        assert_eq!(page(&s, 0).unwrap_err().retry, Retry::Permanent);
        assert!(page(&s, 1).unwrap_err().is_retryable());
        assert!(page(&s, 1).is_ok());
        assert!(t.elapsed() >= Duration::from_millis(60));
        let st = s.stats();
        assert_eq!(
            (st.reads, st.slowed, st.permanent, st.retryable),
            (3, 3, 1, 1)
        );
    }

    #[test]
    fn out_of_range_is_counted_not_injected() {
        let s = FailureInjecting::new(MemorySource::new(data())).with_rule(Failure::FirstReads(1));
        let e = page(&s, 4).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(
            s.stats(),
            FailureStats {
                reads: 1,
                ..FailureStats::default()
            }
        );
        // The rule is still armed.
        assert!(page(&s, 0).unwrap_err().is_retryable());
    }

    #[test]
    fn rules_can_be_added_while_shared() {
        let s = Arc::new(FailureInjecting::new(MemorySource::new(data())));
        let shared: Arc<dyn PageSource> = s.clone();
        assert!(shared.read_at(0, &mut [0u8; 8]).is_ok());
        s.add_rule(Failure::PermanentAt { offset: 4 });
        assert!(shared.read_at(0, &mut [0u8; 8]).is_err());
        assert_eq!(s.stats().reads, 2);
    }
}
