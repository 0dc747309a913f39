//! Log lines limited per cause, so that a failure repeated on every page or every connection (a
//! truncated file, a source that is down, a client faulting outside its memory, a flood of bad
//! handshakes, accept at EMFILE) is said a few times, then counted, never written ten thousand
//! times a second.
//!
//! [`LogLimit::allow`] lets [`LOG_BURST`] lines of a cause through per window and counts the
//! rest; the count is logged ("similar log lines suppressed") when the cause's window is over,
//! at its next line or at a [`LogLimit::flush`], which the owner calls now and then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Log lines of one cause allowed per window.
pub const LOG_BURST: u32 = 5;

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// A rate limit on log lines, per cause (see the module docs).
pub struct LogLimit {
    window: Duration,
    causes: Mutex<HashMap<&'static str, Window>>,
}

impl std::fmt::Debug for LogLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLimit")
            .field("window", &self.window)
            .finish()
    }
}

impl LogLimit {
    /// A limit of [`LOG_BURST`] lines per cause per `window`.
    pub fn with_window(window: Duration) -> LogLimit {
        LogLimit {
            window,
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Lines of `cause` suppressed in its current window, not reported yet.
    pub fn pending(&self, cause: &str) -> u64 {
        lock(&self.causes).get(cause).map_or(0, |w| w.suppressed)
    }

    /// Whether a line of `cause` may be logged now; if not, it is counted.
    pub fn allow(&self, cause: &'static str) -> bool {
        let now = Instant::now();
        let mut causes = lock(&self.causes);
        let w = causes.entry(cause).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= self.window {
            report_suppressed(cause, w, self.window);
            w.start = now;
            w.logged = 0;
        }
        if w.logged < LOG_BURST {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Logs the counts of the causes whose window is over.
    pub fn flush(&self) {
        let now = Instant::now();
        let mut causes = lock(&self.causes);
        for (cause, w) in causes.iter_mut() {
            if w.suppressed > 0 && now.duration_since(w.start) >= self.window {
                report_suppressed(cause, w, self.window);
            }
        }
        // Quiet causes are forgotten, so the map holds only the causes of the last window.
        causes.retain(|_, w| now.duration_since(w.start) < self.window);
    }
}

fn report_suppressed(cause: &str, w: &mut Window, window: Duration) {
    if w.suppressed > 0 {
        tracing::warn!(
            cause,
            suppressed = w.suppressed,
            window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            "similar log lines suppressed"
        );
        w.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_cause_then_counted() {
        let limit = LogLimit::with_window(Duration::from_secs(3600));
        for _ in 0..LOG_BURST {
            assert!(limit.allow("a"));
        }
        for _ in 0..1000 {
            assert!(!limit.allow("a"));
        }
        assert_eq!(limit.pending("a"), 1000);
        // Another cause has its own budget.
        assert!(limit.allow("b"));
        // Within the window, a flush reports nothing and keeps the count.
        limit.flush();
        assert_eq!(limit.pending("a"), 1000);
    }

    #[test]
    fn reported_and_reset_once_the_window_is_over() {
        let limit = LogLimit::with_window(Duration::ZERO);
        // Every call opens a new window: nothing is ever suppressed.
        for _ in 0..100 {
            assert!(limit.allow("a"));
        }
        assert_eq!(limit.pending("a"), 0);
        limit.flush();
        assert_eq!(limit.pending("a"), 0);
    }
}
