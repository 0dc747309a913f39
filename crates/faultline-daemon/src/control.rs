//! The control socket between a supervisor and its worker: the messages each way, and sending
//! them (JSON, one per `SOCK_SEQPACKET` datagram, fds attached as `SCM_RIGHTS`).

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use faultline::firecracker::fdpass::{recv_with_fds, send_message};
use faultline::Stats;
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use serde::{Deserialize, Serialize};

use crate::config::DaemonConfig;

/// Most ranges per `Removed` message (a few dozen bytes each in JSON): the messages stay far
/// below a `SOCK_SEQPACKET` socket's send buffer whatever the balloon did.
pub(crate) const REMOVED_CHUNK: usize = 2048;

/// How often the worker reports each session's counters.
pub(crate) const COUNTERS_EVERY: Duration = Duration::from_millis(500);

/// The worker exits with this code when it cannot start (it reported why first).
pub(crate) const EXIT_CANNOT_START: i32 = 3;

/// Most files a snapshot hands to a worker (an image and its layers of diffs).
pub(crate) const MAX_FILES: usize = 32;

/// A region as the supervisor keeps it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Reg {
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) page_size: u64,
    pub(crate) offset: u64,
}

/// Supervisor → worker, first: the snapshot, its files attached in this order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitMsg {
    pub(crate) len: u64,
    pub(crate) modified: Option<(i64, i64)>,
    pub(crate) names: Vec<String>,
    pub(crate) remote_id: Option<u64>,
    pub(crate) image_id: Option<[u8; 32]>,
    /// What to serve and how: the worker needs no command line of its own.
    pub(crate) config: DaemonConfig,
    /// Sessions whose guests run now are handed over next (a restart): the worker serves at
    /// once and scans the memory file for zero pages in the background.
    #[serde(default)]
    pub(crate) resuming: bool,
}

/// Supervisor → worker, after [`InitMsg`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Ranges a session's balloon removed, sent in bounded chunks before its `Session`.
    Removed { id: u64, ranges: Vec<(u64, u64)> },
    /// A session, its userfaultfd and socket attached.
    Session(Box<SessionMsg>),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionMsg {
    pub(crate) id: u64,
    pub(crate) pid: i32,
    pub(crate) uid: u32,
    pub(crate) regions: Vec<Reg>,
    /// Taken over from a dead worker (its removed ranges came before this message).
    pub(crate) resume: bool,
    /// The session's counters so far.
    pub(crate) carried: Option<Stats>,
    /// The second fd is a pidfd of the client process (else the client's socket, whose
    /// hang-up then ends the session).
    #[serde(default)]
    pub(crate) pidfd: bool,
    /// The last fd is the session's served log (a memfd the supervisor keeps: which pages were
    /// made present, so that a successor serves zeros where they were zapped since).
    #[serde(default)]
    pub(crate) served: bool,
}

/// Worker → supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The worker serves.
    Ready,
    /// The worker cannot start, and exits.
    CannotStart {
        error: String,
    },
    Ended {
        id: u64,
        stats: Option<Stats>,
    },
    Removed {
        id: u64,
        start: u64,
        end: u64,
    },
    /// A session's counters (its whole life so far).
    Counters {
        id: u64,
        stats: Stats,
    },
    /// The worker runs (sent every [`COUNTERS_EVERY`]): one that says nothing for
    /// the worker hang limit (SIGSTOPped, wedged) is killed and replaced.
    Alive,
}

/// Byte ranges, kept merged: overlapping and adjacent ranges are one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RangeSet(pub(crate) BTreeMap<u64, u64>);

impl RangeSet {
    /// Add `start..end`.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let within: Vec<u64> = self.0.range(s..=e).map(|(&k, _)| k).collect();
        for k in within {
            if let Some(v) = self.0.remove(&k) {
                e = e.max(v);
            }
        }
        self.0.insert(s, e);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The ranges in order, at most `n` at a time.
    pub(crate) fn chunks(&self, n: usize) -> Vec<Vec<(u64, u64)>> {
        let all: Vec<(u64, u64)> = self.0.iter().map(|(&s, &e)| (s, e)).collect();
        all.chunks(n.max(1)).map(<[_]>::to_vec).collect()
    }
}

/// Send one message with fds on a SEQPACKET socket.
pub(crate) fn send_msg(
    fd: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    send_msg_with(fd, msg, fds, SendFlags::NOSIGNAL)
}

/// [`send_msg`] that gives up at once (EAGAIN) when the socket's buffer is full: for reports
/// that a later one replaces (a session's counters), so the sender never waits on a supervisor
/// that is itself waiting on this worker.
pub(crate) fn try_send_msg(fd: BorrowedFd<'_>, msg: &impl Serialize) -> std::io::Result<()> {
    send_msg_with(fd, msg, &[], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

fn send_msg_with(
    fd: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg)?;
    send_message(fd, &bytes, fds, flags)
}

/// Receive one message with its fds; `None` when the peer is gone.
pub(crate) fn recv_msg(fd: BorrowedFd<'_>) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 1 << 20];
    let received = loop {
        match recv_with_fds(fd, &mut buf, MAX_FILES, RecvFlags::empty()) {
            Ok(r) => break r,
            // A peer that exits with messages unread in its queue (sessions handed to a worker
            // that could not start) reports ECONNRESET once; what it sent before is still
            // queued, then the end.
            Err(Errno::INTR) | Err(Errno::CONNRESET) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if received.bytes == 0 && received.fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(received.bytes);
    Ok(Some((buf, received.fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &RangeSet) -> Vec<(u64, u64)> {
        s.0.iter().map(|(&a, &b)| (a, b)).collect()
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let mut s = RangeSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(ranges(&s), [(10, 20), (30, 40)]);
        s.insert(20, 25); // adjacent to the first
        assert_eq!(ranges(&s), [(10, 25), (30, 40)]);
        s.insert(5, 10); // adjacent before
        assert_eq!(ranges(&s), [(5, 25), (30, 40)]);
        s.insert(24, 31); // bridges both
        assert_eq!(ranges(&s), [(5, 40)]);
        s.insert(0, 100); // swallows everything
        assert_eq!(ranges(&s), [(0, 100)]);
        s.insert(50, 60); // inside
        s.insert(7, 7); // empty
        assert_eq!(ranges(&s), [(0, 100)]);
    }

    #[test]
    fn the_same_page_removed_again_and_again_stays_one_range() {
        let mut s = RangeSet::default();
        for _ in 0..100_000 {
            s.insert(4096, 8192);
        }
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn chunks_bound_every_message() {
        let mut s = RangeSet::default();
        for i in 0..10_000u64 {
            s.insert(2 * i * 4096, (2 * i + 1) * 4096);
        }
        let chunks = s.chunks(REMOVED_CHUNK);
        assert_eq!(chunks.len(), 10_000usize.div_ceil(REMOVED_CHUNK));
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 10_000);
        // The largest message (ranges near the top of a 64-bit address space) is far below a
        // SEQPACKET socket's default send buffer (~208 KiB).
        let msg = ToWorker::Removed {
            id: u64::MAX,
            ranges: vec![(u64::MAX - 1, u64::MAX); REMOVED_CHUNK],
        };
        let len = serde_json::to_vec(&msg).expect("json").len();
        assert!(len < 100 << 10, "{len} bytes");
    }
}
