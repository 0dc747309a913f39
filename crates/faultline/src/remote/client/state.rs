//! What the client knows of each page (absent, asked for, cached, zero), the received bytes and
//! the outstanding requests, shared by the readers of pages, the I/O thread and the reader thread.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crossbeam_channel::Sender;
// Keys are page numbers and request ids: a multiply-and-rotate hash serves them as well as
// SipHash at a fraction of its cost (a map operation per page received and per page read).
use rustc_hash::FxHashMap as HashMap;

use super::super::wire::{Priority, Welcome};
use super::{RemoteOptions, RemoteStats};
use crate::source::{Retry, SourceError};

// Per-page state (low bits), and a flag.
pub(super) const ABSENT: u8 = 0;
pub(super) const BG: u8 = 1;
pub(super) const DEMAND: u8 = 2;
/// Received: bytes in `State::cache`.
pub(super) const CACHED: u8 = 3;
/// Received: all zero (no bytes kept).
pub(super) const ZERO: u8 = 4;
pub(super) const STATE: u8 = 0b111;
/// Read once already (the stream skips it).
pub(super) const READ_ONCE: u8 = 0b1000;

/// Received bytes, shared by the pages they cover; its size is accounted while it lives.
pub(super) struct Chunk {
    pub(super) bytes: Vec<u8>,
    pub(super) acct: Arc<AtomicU64>,
}

impl Chunk {
    /// `bytes`, counted in `acct` while the chunk lives; also returns what `acct` counts now.
    pub(super) fn accounted(bytes: Vec<u8>, acct: &Arc<AtomicU64>) -> (Arc<Chunk>, u64) {
        let n = bytes.len() as u64;
        let now = acct.fetch_add(n, Ordering::AcqRel) + n;
        let chunk = Arc::new(Chunk {
            bytes,
            acct: Arc::clone(acct),
        });
        (chunk, now)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.acct
            .fetch_sub(self.bytes.len() as u64, Ordering::AcqRel);
    }
}

/// An outstanding request: its ranges and how far the answer got.
pub(super) struct Req {
    pub(super) priority: Priority,
    pub(super) ranges: Vec<(u64, u64)>,
    pub(super) idx: usize,
    pub(super) pos: u64,
}

impl Req {
    pub(super) fn remaining(&self) -> u64 {
        let rest: u64 = self.ranges[self.idx..].iter().map(|r| r.1).sum();
        rest - self.pos
    }
}

pub(super) struct State {
    pub(super) pages: Pages,
    pub(super) cache: HashMap<u64, (Arc<Chunk>, usize)>,
    /// Bytes read so far of pages read in parts (dropped once read whole).
    pub(super) partial: HashMap<u64, u64>,
    pub(super) failed: HashMap<u64, (Retry, String)>,
    /// Demand page runs `[from, to)` not sent yet.
    pub(super) queue: Vec<(u64, u64)>,
    pub(super) requests: HashMap<u64, Req>,
    pub(super) next_id: u64,
    pub(super) gen: u64,
    pub(super) up: bool,
    pub(super) down_since: Option<Instant>,
    pub(super) fatal: Option<String>,
    pub(super) last_progress: Instant,
    pub(super) stream_on: bool,
    pub(super) stream_cursor: u64,
    /// Where the stream was when a fault elsewhere made it jump (at most [`MAX_FOLLOW`]): those
    /// places are streamed on too, in turn with the cursor, so that every vCPU touching memory
    /// in order finds its next pages streamed, not just the one that faulted last.
    pub(super) stream_follow: Vec<u64>,
    /// Whose turn it is: 0 the cursor, `i` the follower `i - 1`.
    pub(super) stream_turn: usize,
    /// The current pass over the source asked for pages, or the cursor jumped: another pass
    /// follows. A pass from the start that asks for nothing ends the stream.
    pub(super) stream_pass_sent: bool,
    pub(super) stream_done: bool,
    pub(super) stream_starved: bool,
    pub(super) bg_outstanding: usize,
    pub(super) bg_bytes: u64,
}

/// Per-page state bytes, indexed by page number. Their count was checked to fit in memory when
/// the source connected, so every page number of the source indexes them.
pub(super) struct Pages(Vec<u8>);

impl Pages {
    /// `npages` pages, all [`ABSENT`].
    pub(super) fn new(npages: usize) -> Pages {
        Pages(vec![ABSENT; npages])
    }

    fn index_of(p: u64) -> usize {
        usize::try_from(p).expect("a page number of the source, whose page count fits in usize")
    }
}

impl std::ops::Index<u64> for Pages {
    type Output = u8;
    fn index(&self, p: u64) -> &u8 {
        &self.0[Pages::index_of(p)]
    }
}

impl std::ops::IndexMut<u64> for Pages {
    fn index_mut(&mut self, p: u64) -> &mut u8 {
        &mut self.0[Pages::index_of(p)]
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) reads: AtomicU64,
    pub(super) reads_from_cache: AtomicU64,
    pub(super) demand_requests: AtomicU64,
    pub(super) background_requests: AtomicU64,
    pub(super) ranges_sent: AtomicU64,
    pub(super) frames_received: AtomicU64,
    pub(super) bytes_received: AtomicU64,
    pub(super) zero_bytes_received: AtomicU64,
    pub(super) same_bytes_received: AtomicU64,
    pub(super) kept_pages: AtomicU64,
    pub(super) duplicate_pages: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) disconnects: AtomicU64,
    pub(super) resent_requests: AtomicU64,
    pub(super) retryable_errors: AtomicU64,
    pub(super) permanent_errors: AtomicU64,
    pub(super) peak: AtomicU64,
}

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(super) enum Cmd {
    Wake,
    Lost(u64),
    Shutdown,
}

pub(super) struct Shared {
    pub(super) st: Mutex<State>,
    pub(super) cv: Condvar,
    pub(super) opts: RemoteOptions,
    pub(super) addr: String,
    pub(super) welcome: Welcome,
    pub(super) page: u64,
    pub(super) len: u64,
    pub(super) npages: u64,
    pub(super) cached: Arc<AtomicU64>,
    /// Bytes of `KEEP` pages alive (not counted in `cached`: they are not stream pages).
    pub(super) kept: Arc<AtomicU64>,
    /// The current connection's protocol version.
    pub(super) version: AtomicU16,
    pub(super) c: Counters,
    pub(super) tx: Sender<Cmd>,
    pub(super) connected: AtomicBool,
    /// Pages answered as zero, one bit each. Zero is a fact about the source's bytes, not about
    /// the cache: a bit once set stays (a page read already is still zero), and it is read
    /// without the lock — by [`PageSource::is_zero`](crate::source::PageSource::is_zero), which the fault server asks page by page.
    pub(super) zero: Vec<AtomicU64>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_known_zero(&self, p: u64) -> bool {
        self.zero[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    pub(super) fn mark_zero(&self, p: u64) {
        self.zero[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
    }

    pub(super) fn page_span(&self, p: u64) -> (u64, u64) {
        let start = p * self.page;
        (start, (start + self.page).min(self.len))
    }

    pub(super) fn error(&self, offset: u64, len: u64, retry: Retry, what: String) -> SourceError {
        match retry {
            Retry::Retryable => add(&self.c.retryable_errors, 1),
            Retry::Permanent => add(&self.c.permanent_errors, 1),
        }
        SourceError {
            offset,
            len,
            source_name: self.name(),
            what,
            retry,
            cause: None,
        }
    }

    pub(super) fn name(&self) -> String {
        format!("remote {} ({})", self.addr, self.welcome.name)
    }

    pub(super) fn stats(&self) -> RemoteStats {
        let st = self.lock();
        self.stats_of(&st)
    }

    pub(super) fn stats_of(&self, st: &State) -> RemoteStats {
        let c = &self.c;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            reads: l(&c.reads),
            reads_from_cache: l(&c.reads_from_cache),
            demand_requests: l(&c.demand_requests),
            background_requests: l(&c.background_requests),
            ranges_sent: l(&c.ranges_sent),
            frames_received: l(&c.frames_received),
            bytes_received: l(&c.bytes_received),
            zero_bytes_received: l(&c.zero_bytes_received),
            same_bytes_received: l(&c.same_bytes_received),
            kept_pages: l(&c.kept_pages),
            kept_bytes: self.kept.load(Ordering::Acquire),
            version: self.version.load(Ordering::Relaxed),
            duplicate_pages: l(&c.duplicate_pages),
            reconnects: l(&c.reconnects),
            disconnects: l(&c.disconnects),
            resent_requests: l(&c.resent_requests),
            retryable_errors: l(&c.retryable_errors),
            permanent_errors: l(&c.permanent_errors),
            cached_bytes: self.cached.load(Ordering::Acquire),
            peak_cached_bytes: l(&c.peak),
            stream_position: (st.stream_cursor * self.page).min(self.len),
            stream_complete: st.stream_on && st.stream_done && st.bg_outstanding == 0,
            connected: st.up,
        }
    }
}

/// Most places the stream follows besides its cursor (see `State::stream_follow`).
pub(super) const MAX_FOLLOW: usize = 3;
