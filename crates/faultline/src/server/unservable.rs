//! The way out for claimed pages with no right bytes: POISON, or an explicit end of the client;
//! and claimed pages that are not ours to serve, given back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use faultline_uffd::{ResolveError, ResolveErrorKind, ResolveOp};
use rustix::io::Errno;

use crate::stats::add;

use super::schedule::Job;
use super::session::Session;
use super::{Shared, Unservable};

/// Tries of a POISON answered EAGAIN (2 ms apart) before the client is ended instead.
pub(super) const POISON_EAGAIN_TRIES: u32 = 25;

impl Shared {
    /// Claimed pages that are not ours to serve (their range moved, went away or was
    /// unregistered): the claims go back, and the range is woken so that a thread asleep there
    /// faults again, to wherever that address now belongs. A wake is never wrong: at worst one
    /// thread faults once more.
    pub(super) fn give_back(&self, s: &Session, j: &Job) {
        if j.claimed {
            for i in 0..j.pages {
                j.states.release(j.state_index + i);
            }
        }
        add(&s.stats.wake, 1);
        let len = j.pages as u64 * s.page_size;
        if let Err(err) = self
            .injected(ResolveOp::Wake, j.addr, len)
            .and_then(|()| s.uffd.wake(j.addr, len))
        {
            tracing::debug!(session = s.id, addr = j.addr, error = %err, "wake of a range given back failed");
        }
    }

    /// The one way out for a page with no right bytes: `UFFDIO_POISON` where the session's policy
    /// and the kernel allow it (the client gets SIGBUS at that page only), else an explicit,
    /// logged end of the client ([`Shared::end_client`]). Never a wrong or zero page, never a
    /// thread left asleep.
    pub(super) fn unservable(
        &self,
        s: &Arc<Session>,
        addr: u64,
        len: u64,
        offset: Option<u64>,
        why: &dyn std::fmt::Display,
    ) -> Unserved {
        if s.on_unservable == Unservable::Poison && s.can_poison.load(Ordering::Acquire) {
            add(&s.stats.poison, 1);
            // EAGAIN (a REMOVE another worker has not read yet) passes within milliseconds:
            // worth a few short waits before it is taken for a POISON that cannot be done.
            let mut poisoned = Err(ResolveError::from_errno(
                ResolveOp::Poison,
                addr,
                len,
                Errno::AGAIN,
            ));
            for attempt in 0..POISON_EAGAIN_TRIES {
                if attempt > 0 {
                    add(&s.stats.eagain, 1);
                    // A pause while another worker reads the event, not synchronisation.
                    std::thread::sleep(Duration::from_millis(2));
                }
                poisoned = self
                    .injected(ResolveOp::Poison, addr, len)
                    .and_then(|()| s.uffd.poison(addr, len));
                if !matches!(&poisoned, Err(e) if e.kind == ResolveErrorKind::Retry) {
                    break;
                }
            }
            match poisoned {
                Ok(_) => {
                    add(&s.stats.poisoned_pages, len.div_ceil(s.page_size));
                    if self.logs.allow("poison") {
                        tracing::error!(
                            session = s.id,
                            label = %s.label,
                            addr = format_args!("{addr:#x}"),
                            offset,
                            cause = %why,
                            "page poisoned: no right bytes for it (the client gets SIGBUS there)"
                        );
                    }
                    return Unserved::Poisoned;
                }
                Err(err) if err.kind == ResolveErrorKind::AlreadyPresent => {
                    // Someone resolved it meanwhile (a late resolve of a stuck read).
                    add(&s.stats.eexist, 1);
                    return Unserved::Poisoned;
                }
                Err(err) if err.kind == ResolveErrorKind::ProcessGone => {
                    self.close(s, "client gone (ESRCH)");
                    return Unserved::Ended;
                }
                Err(err) => {
                    // EINVAL is also how a kernel without UFFDIO_POISON answers it: no more
                    // poisoning for this session.
                    if matches!(
                        err.kind,
                        ResolveErrorKind::InvalidRange | ResolveErrorKind::NotPermitted
                    ) {
                        s.can_poison.store(false, Ordering::Release);
                    }
                    return self.end_client(s, addr, &format!("{why}; and {err}"));
                }
            }
        }
        self.end_client(s, addr, why)
    }

    /// End the client explicitly: kill its process through its pidfd (as Firecracker's own
    /// example handler does), log it, close the session. Without a pidfd, the session is closed
    /// and the log says the client could not be ended.
    pub(super) fn end_client(
        &self,
        s: &Arc<Session>,
        addr: u64,
        why: &dyn std::fmt::Display,
    ) -> Unserved {
        if s.ending.swap(true, Ordering::AcqRel) {
            // Another worker is ending it (two threads faulted on unservable pages at once).
            return Unserved::Ended;
        }
        add(&s.stats.unservable, 1);
        let how = match &s.pidfd {
            Some(pidfd) => {
                match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
                    Ok(()) => "the client process was killed".to_string(),
                    Err(Errno::SRCH) => "the client process had already exited".to_string(),
                    Err(e) => format!("killing the client process failed: {e}"),
                }
            }
            None => "no pidfd to end the client by: only its session is closed".to_string(),
        };
        tracing::error!(
            session = s.id,
            label = %s.label,
            addr = format_args!("{addr:#x}"),
            cause = %why,
            policy = ?s.on_unservable,
            poison = s.can_poison.load(Ordering::Acquire),
            "unservable page: ending the client ({how})"
        );
        self.close(s, "client ended: unservable page");
        Unserved::Ended
    }
}

/// How an unservable page ended.
pub(super) enum Unserved {
    /// Poisoned (or found resolved meanwhile): the page is settled, the session goes on.
    Poisoned,
    /// The client was ended and the session closed.
    Ended,
}
