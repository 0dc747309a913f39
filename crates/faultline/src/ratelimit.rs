//! Log lines limited per cause, so that a failure repeated on every page (a truncated file, a
//! source that is down, a client that faults outside its memory) is said a few times, then
//! counted, never written ten thousand times a second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Lines allowed per cause in one window.
const BURST: u32 = 5;
/// The window.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Cause {
    window_start: Instant,
    lines: u32,
    suppressed: u64,
}

/// Per-cause log limiter: [`RateLimit::allow`] says whether to write a line now.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    causes: Mutex<HashMap<&'static str, Cause>>,
}

impl RateLimit {
    /// `Some(n)`: write the line, and say that `n` lines of this cause were left out before it;
    /// `None`: leave it out (it is counted).
    pub(crate) fn allow(&self, cause: &'static str) -> Option<u64> {
        self.allow_at(cause, Instant::now())
    }

    fn allow_at(&self, cause: &'static str, now: Instant) -> Option<u64> {
        let mut causes = lock(&self.causes);
        let c = causes.entry(cause).or_insert(Cause {
            window_start: now,
            lines: 0,
            suppressed: 0,
        });
        if now.duration_since(c.window_start) >= WINDOW {
            c.window_start = now;
            c.lines = 0;
        }
        if c.lines < BURST {
            c.lines += 1;
            Some(std::mem::take(&mut c.suppressed))
        } else {
            c.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_counted() {
        let r = RateLimit::default();
        let t0 = Instant::now();
        let allowed = (0..1000)
            .filter(|_| r.allow_at("poison", t0).is_some())
            .count();
        assert_eq!(allowed, BURST as usize);
        // Another cause has its own budget.
        assert_eq!(r.allow_at("orphan", t0), Some(0));
        // The next window says how many were left out.
        assert_eq!(
            r.allow_at("poison", t0 + WINDOW),
            Some(1000 - u64::from(BURST))
        );
        assert_eq!(r.allow_at("poison", t0 + WINDOW), Some(0));
    }
}
