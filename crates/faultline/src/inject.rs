//! Failure injection under the fault server's resolve calls.
//!
//! The kernel answers a resolve ioctl with a handful of errors that a healthy test machine almost
//! never produces: `EFAULT` (the source mapping is gone: a memory file truncated under the
//! daemon), `ENOMEM`, `EINVAL` (a range the memory cannot take, e.g. 4 KiB pages declared for
//! hugetlbfs memory), `ENOENT` (unregistered), `ESRCH` (the client's memory is gone), `EAGAIN`
//! (an unread event). Each must still end its fault in the right bytes, a poisoned page, or an
//! explicit end of the client. A [`ResolveFaults`] given in
//! [`ServerConfig::inject`](crate::ServerConfig::inject) makes chosen calls fail with chosen
//! errnos *instead of* reaching the kernel, so every such path is tested
//! (`crates/faultline/tests/unservable.rs`). When none is given, the cost is one `Option` check.
//!
//! [`ServerConfig::missing_features`](crate::ServerConfig::missing_features) is the other half:
//! it makes the server behave as on a kernel without, say, `UFFDIO_POISON` (before Linux 6.6).

use std::sync::Mutex;
use std::time::Duration;

use faultline_uffd::{ResolveError, ResolveOp};
use rustix::io::Errno;

/// One injection rule: calls of `op` fail with `errno`, after `skip` calls that pass, `times`
/// times (`u32::MAX`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    op: ResolveOp,
    errno: Errno,
    skip: u32,
    times: u32,
    /// Only calls whose range covers this address (None: any).
    at: Option<u64>,
}

/// One pause rule: calls of `op` whose range covers `at` sleep `pause` first, `times` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pause {
    op: ResolveOp,
    at: u64,
    pause: Duration,
    times: u32,
}

/// Whether a call on `start..start+len` covers address `at` (`None`: any address).
fn covers(at: Option<u64>, start: u64, len: u64) -> bool {
    at.is_none_or(|a| a >= start && a < start.saturating_add(len.max(1)))
}

/// Chosen failures of the fault server's resolve ioctls (see the module docs).
#[derive(Debug, Default)]
pub struct ResolveFaults {
    rules: Mutex<Vec<Rule>>,
    /// Calls that pause before they go on ([`ResolveFaults::pause_at`]).
    pauses: Mutex<Vec<Pause>>,
    injected: Mutex<Vec<(ResolveOp, Errno, u64)>>,
}

impl ResolveFaults {
    /// No failures yet.
    pub fn new() -> ResolveFaults {
        ResolveFaults::default()
    }

    /// The next `times` calls of `op` fail with `errno` (`u32::MAX`: every call from now on).
    pub fn fail(self, op: ResolveOp, errno: Errno, times: u32) -> ResolveFaults {
        self.push(Rule {
            op,
            errno,
            skip: 0,
            times,
            at: None,
        })
    }

    /// Calls of `op` whose range covers address `at` fail with `errno`, `times` times.
    pub fn fail_at(self, op: ResolveOp, at: u64, errno: Errno, times: u32) -> ResolveFaults {
        self.push(Rule {
            op,
            errno,
            skip: 0,
            times,
            at: Some(at),
        })
    }

    /// Calls of `op` whose range covers address `at`: after `skip` that pass, the next `times`
    /// fail with `errno`.
    pub fn fail_at_after(
        self,
        op: ResolveOp,
        at: u64,
        skip: u32,
        errno: Errno,
        times: u32,
    ) -> ResolveFaults {
        self.push(Rule {
            op,
            errno,
            skip,
            times,
            at: Some(at),
        })
    }

    /// After `skip` calls of `op` that pass, the next `times` fail with `errno`.
    pub fn fail_after(self, op: ResolveOp, skip: u32, errno: Errno, times: u32) -> ResolveFaults {
        self.push(Rule {
            op,
            errno,
            skip,
            times,
            at: None,
        })
    }

    /// The next `times` calls of `op` whose range covers address `at` pause for `pause` right
    /// before the ioctl (with whatever the call holds: its claims, the install lock), then go on:
    /// a slow copy, to look at what waits for it.
    pub fn pause_at(self, op: ResolveOp, at: u64, pause: Duration, times: u32) -> ResolveFaults {
        crate::sync::lock(&self.pauses).push(Pause {
            op,
            at,
            pause,
            times,
        });
        self
    }

    /// Pause if a [`ResolveFaults::pause_at`] rule covers the call `op` on `start..start+len`.
    pub(crate) fn pause(&self, op: ResolveOp, start: u64, len: u64) {
        let hit = crate::sync::lock(&self.pauses)
            .iter_mut()
            .find(|p| p.op == op && p.times > 0 && covers(Some(p.at), start, len))
            .map(|p| {
                p.times -= 1;
                p.pause
            });
        if let Some(d) = hit {
            std::thread::sleep(d);
        }
    }

    fn push(self, rule: Rule) -> ResolveFaults {
        crate::sync::lock(&self.rules).push(rule);
        self
    }

    /// The failures injected so far: (ioctl, errno, destination start).
    pub fn injected(&self) -> Vec<(ResolveOp, Errno, u64)> {
        crate::sync::lock(&self.injected).clone()
    }

    /// Whether the call `op` on `start..start+len` is to fail, and how.
    pub(crate) fn check(&self, op: ResolveOp, start: u64, len: u64) -> Result<(), ResolveError> {
        let mut rules = crate::sync::lock(&self.rules);
        let hit = rules.iter_mut().find_map(|r| {
            if r.op != op || !covers(r.at, start, len) || r.times == 0 {
                return None;
            }
            if r.skip > 0 {
                r.skip -= 1;
                return None;
            }
            if r.times != u32::MAX {
                r.times -= 1;
            }
            Some(r.errno)
        });
        drop(rules);
        match hit {
            None => Ok(()),
            Some(errno) => {
                crate::sync::lock(&self.injected).push((op, errno, start));
                Err(ResolveError::from_errno(op, start, len, errno))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_uffd::ResolveErrorKind;

    #[test]
    fn rules_fire_where_and_as_often_as_asked() {
        let f = ResolveFaults::new()
            .fail(ResolveOp::Copy, Errno::FAULT, 2)
            .fail_after(ResolveOp::Zeropage, 1, Errno::NOMEM, 1)
            .fail_at(ResolveOp::Poison, 0x5000, Errno::INVAL, u32::MAX);
        let kinds = |r: Result<(), ResolveError>| r.err().map(|e| e.kind);
        assert_eq!(
            kinds(f.check(ResolveOp::Copy, 0, 4096)),
            Some(ResolveErrorKind::BadAddress)
        );
        assert_eq!(
            kinds(f.check(ResolveOp::Copy, 0, 4096)),
            Some(ResolveErrorKind::BadAddress)
        );
        assert_eq!(kinds(f.check(ResolveOp::Copy, 0, 4096)), None);
        assert_eq!(kinds(f.check(ResolveOp::Zeropage, 0, 4096)), None);
        assert_eq!(
            kinds(f.check(ResolveOp::Zeropage, 0, 4096)),
            Some(ResolveErrorKind::OutOfMemory)
        );
        assert_eq!(kinds(f.check(ResolveOp::Zeropage, 0, 4096)), None);
        assert_eq!(kinds(f.check(ResolveOp::Poison, 0x1000, 4096)), None);
        for _ in 0..3 {
            assert_eq!(
                kinds(f.check(ResolveOp::Poison, 0x4000, 0x2000)),
                Some(ResolveErrorKind::InvalidRange)
            );
        }
        assert_eq!(f.injected().len(), 2 + 1 + 3);
    }
}
