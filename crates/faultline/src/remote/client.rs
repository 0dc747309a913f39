//! [`RemoteSource`]: a [`PageSource`] whose bytes come from an [`super::Exporter`].
//!
//! Here: the options, the statistics, connecting and the reads (waiting for pages, taking them
//! from the cache or lending them); `state` holds what the client knows of each page, `io` the
//! thread that sends requests and reconnects, `reader` the thread that applies the answers.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// Keys are page numbers and request ids: a multiply-and-rotate hash serves them as well as
// SipHash at a fraction of its cost (a map operation per page received and per page read).
use rustc_hash::FxHashMap as HashMap;

use super::wire::{read_frame, Frame, Welcome, WireError, MIN_VERSION, VERSION};
use super::RemoteError;
use crate::source::{check_bounds, Lend, Lent, PageSource, Retry, SourceError};

mod io;
mod reader;
mod state;

use io::Io;
use state::{
    add, Cmd, Counters, Pages, Shared, State, ABSENT, BG, CACHED, DEMAND, READ_ONCE, STATE, ZERO,
};

/// Options of a [`RemoteSource`].
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// How long a `read_at` waits for its pages before it returns a retryable error (the pages
    /// stay requested: a retry finds them).
    pub read_timeout: Duration,
    /// Once the connection has been down this long, reads fail permanently (the fault server
    /// then poisons the page). Also bounds the first connection attempt.
    pub deadline: Duration,
    /// Time allowed for one connection attempt (TCP connect and the hello exchange).
    pub connect_timeout: Duration,
    /// First pause between reconnection attempts (doubles up to `reconnect_max`).
    pub reconnect_min: Duration,
    /// Longest pause between reconnection attempts.
    pub reconnect_max: Duration,
    /// Requests outstanding with nothing received for this long: the connection is declared
    /// dead and re-made.
    pub io_timeout: Duration,
    /// Stream the whole source in the background from the start (see
    /// [`RemoteSource::start_stream`]).
    pub stream: bool,
    /// Most bytes of received pages not yet read (the background stream stops at this limit
    /// until reads make room).
    pub cache_bytes: u64,
    /// Bytes per background request (default 1 MiB: what `faultline bench --remote` measures;
    /// 256 KiB and 4 MiB measured the same within noise on loopback).
    pub stream_chunk: u64,
    /// Background requests outstanding at once.
    pub stream_window: usize,
    /// After a read wakes the I/O thread, wait this long for more reads to join its request
    /// frame (0: send at once; reads that arrive while a frame is being written still share
    /// the next one).
    pub batch_delay: Duration,
    /// Most ranges per request frame (also bounded by the server's limit).
    pub max_batch_ranges: usize,
    /// How long a read waits for pages already asked for by the background stream before it
    /// asks for them again as demand (which the server answers first, but which sends the pages
    /// twice when the background answer was already on its way).
    pub background_grace: Duration,
    /// The source id the server must announce (pinned from an earlier connection, e.g. by a
    /// supervisor whose sessions started on it): a server announcing another is refused, on the
    /// first connection as on every reconnect — never served.
    pub expect_source_id: Option<u64>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            read_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_secs(1),
            io_timeout: Duration::from_secs(10),
            stream: false,
            cache_bytes: 64 << 20,
            stream_chunk: 1 << 20,
            stream_window: 4,
            batch_delay: Duration::ZERO,
            max_batch_ranges: 256,
            background_grace: Duration::from_millis(GRACE_MS),
            expect_source_id: None,
        }
    }
}

/// Counters of a [`RemoteSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemoteStats {
    /// `read_at` and `wait_ready` calls (the server readies each run, then reads it through
    /// `read_or_lend`, which is not counted again).
    pub reads: u64,
    /// Of those, the ones whose pages were all in the cache when asked for (prefetched).
    pub reads_from_cache: u64,
    /// Demand `READ` frames sent.
    pub demand_requests: u64,
    /// Background `READ` frames sent.
    pub background_requests: u64,
    /// Ranges sent (in all frames).
    pub ranges_sent: u64,
    /// Answer frames received.
    pub frames_received: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Bytes answered as zero (no payload).
    pub zero_bytes_received: u64,
    /// Bytes answered as copies of a kept page (`SAME`, protocol version 2; no payload).
    pub same_bytes_received: u64,
    /// Pages the server asked us to keep (`KEEP`; their bytes count in `bytes_received`).
    pub kept_pages: u64,
    /// Bytes of kept pages held now.
    pub kept_bytes: u64,
    /// The protocol version of the current (or last) connection.
    pub version: u16,
    /// Pages received that were not wanted any more (cached or read already).
    pub duplicate_pages: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// Requests sent again on a new connection.
    pub resent_requests: u64,
    /// Reads that returned a retryable error.
    pub retryable_errors: u64,
    /// Reads that returned a permanent error.
    pub permanent_errors: u64,
    /// Bytes of received pages held now.
    pub cached_bytes: u64,
    /// Most bytes held at once.
    pub peak_cached_bytes: u64,
    /// The background stream's position (bytes).
    pub stream_position: u64,
    /// The background stream has asked for every page and all its requests were answered.
    pub stream_complete: bool,
    /// Connected now.
    pub connected: bool,
}

/// The fewest pages [`PageSource::read_or_lend`] lends from one received buffer: below that,
/// copying them out with their neighbours (one `UFFDIO_COPY` for all) is cheaper than a
/// `UFFDIO_COPY` of their own.
const MIN_LEND_PAGES: u64 = 16;

/// Default [`RemoteOptions::background_grace`], in ms.
const GRACE_MS: u64 = 2;

/// A [`PageSource`] served by an [`super::Exporter`] over TCP.
///
/// Reads from any number of threads are batched into request frames by one I/O thread; answers
/// land in a bounded page cache, from which each read takes its pages. An optional background
/// stream fills the cache in source order ahead of demand. A dropped connection is re-made with
/// backoff and unanswered requests are sent again; meanwhile reads wait up to
/// [`RemoteOptions::read_timeout`] and then fail with a retryable error, until the connection
/// has been down for [`RemoteOptions::deadline`], after which they fail permanently. See
/// `docs/remote-protocol.md`.
pub struct RemoteSource {
    shared: Arc<Shared>,
    io: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("addr", &self.shared.addr)
            .field("source", &self.shared.welcome.name)
            .field("len", &self.shared.len)
            .finish()
    }
}

/// One connection attempt: TCP connect and the hello exchange.
fn connect_once(addr: &str, timeout: Duration) -> Result<(TcpStream, Welcome), RemoteError> {
    let conn_err = |source| RemoteError::Connect {
        addr: addr.to_string(),
        source,
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(conn_err)?.collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the address resolved to nothing",
    );
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let Some(stream) = stream else {
        return Err(conn_err(last));
    };
    let hs_err = |source| RemoteError::Handshake {
        addr: addr.to_string(),
        source,
    };
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| hs_err(e.into()))?;
    let mut out = Vec::new();
    Frame::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
    }
    .encode(&mut out);
    (&stream).write_all(&out).map_err(|e| hs_err(e.into()))?;
    let answer = read_frame(&mut &stream, &mut Vec::new()).map_err(hs_err)?;
    stream
        .set_read_timeout(None)
        .map_err(|e| hs_err(e.into()))?;
    match answer {
        Frame::Welcome(w) if (MIN_VERSION..=VERSION).contains(&w.version) => Ok((stream, w)),
        Frame::Welcome(w) => Err(hs_err(WireError::Invalid(format!(
            "the server chose version {}, which this client does not speak",
            w.version
        )))),
        Frame::Refused { reason } => Err(RemoteError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        _ => Err(hs_err(WireError::Invalid(
            "the answer to the hello is not a welcome".into(),
        ))),
    }
}

/// Connect to `addr` and return what its server announces (length, page size, source id,
/// name), then hang up.
pub fn probe(addr: &str, timeout: Duration) -> Result<Welcome, RemoteError> {
    connect_once(addr, timeout).map(|(_, w)| w)
}

impl RemoteSource {
    /// Connect to the server at `addr` (`host:port`), retrying with backoff for up to
    /// `options.deadline`, and start the I/O thread.
    pub fn connect(addr: &str, options: RemoteOptions) -> Result<RemoteSource, RemoteError> {
        if options.cache_bytes == 0 || options.stream_window == 0 {
            return Err(RemoteError::Config(
                "cache_bytes and stream_window must be positive".into(),
            ));
        }
        let start = Instant::now();
        let mut pause = options.reconnect_min;
        let (stream, welcome) = loop {
            match connect_once(addr, options.connect_timeout) {
                Ok(c) => break c,
                Err(e @ RemoteError::Refused { .. }) => return Err(e),
                Err(e) if start.elapsed() + pause >= options.deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(addr, error = %e, "remote page server not reachable yet");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(options.reconnect_max);
                }
            }
        };
        if let Some(want) = options.expect_source_id {
            if welcome.source_id != want {
                return Err(RemoteError::SourceChanged {
                    addr: addr.to_string(),
                    got: welcome.source_id,
                    want,
                });
            }
        }
        let version = welcome.version;
        let page = u64::from(welcome.page_size);
        let len = welcome.source_len;
        let npages = len.div_ceil(page);
        let n = usize::try_from(npages)
            .map_err(|_| RemoteError::Config(format!("a {len}-byte source is too large")))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let stream_on = options.stream;
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                pages: Pages::new(n),
                cache: HashMap::default(),
                partial: HashMap::default(),
                failed: HashMap::default(),
                queue: Vec::new(),
                requests: HashMap::default(),
                next_id: 1,
                gen: 0,
                up: false,
                down_since: None,
                fatal: None,
                last_progress: Instant::now(),
                stream_on,
                stream_cursor: 0,
                stream_follow: Vec::new(),
                stream_turn: 0,
                stream_pass_sent: false,
                stream_done: false,
                stream_starved: false,
                bg_outstanding: 0,
                bg_bytes: 0,
            }),
            cv: Condvar::new(),
            opts: options,
            addr: addr.to_string(),
            welcome,
            page,
            len,
            npages,
            zero: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            cached: Arc::new(AtomicU64::new(0)),
            kept: Arc::new(AtomicU64::new(0)),
            version: AtomicU16::new(version),
            c: Counters::default(),
            tx,
            connected: AtomicBool::new(false),
        });
        let mut io = Io {
            shared: Arc::clone(&shared),
            rx,
            conn: None,
        };
        io.install(stream, version, false)
            .map_err(RemoteError::Thread)?;
        let handle = std::thread::Builder::new()
            .name("faultline-remote-io".into())
            .spawn(move || io.run())
            .map_err(RemoteError::Thread)?;
        if stream_on {
            // The stream starts now, not at the I/O thread's first tick.
            let _ = shared.tx.send(Cmd::Wake);
        }
        tracing::info!(
            addr,
            source = %shared.welcome.name,
            len,
            page_size = page,
            "connected to the remote page server"
        );
        Ok(RemoteSource {
            shared,
            io: Some(handle),
        })
    }

    /// What the server announced on the first connection.
    pub fn welcome(&self) -> &Welcome {
        &self.shared.welcome
    }

    /// The counters.
    pub fn stats(&self) -> RemoteStats {
        self.shared.stats()
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Start streaming the whole source, in order, into the cache ahead of demand (pages not
    /// cached and not read yet; at most [`RemoteOptions::cache_bytes`] held).
    pub fn start_stream(&self) {
        self.shared.lock().stream_on = true;
        let _ = self.shared.tx.send(Cmd::Wake);
    }

    /// Stop asking for background pages (those asked for still arrive).
    pub fn stop_stream(&self) {
        self.shared.lock().stream_on = false;
    }

    /// Wait until `pred` holds for the counters (checked whenever an answer arrives or the
    /// connection changes); `false` after `timeout`.
    pub fn wait_stats(&self, timeout: Duration, pred: impl Fn(&RemoteStats) -> bool) -> bool {
        let end = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if pred(&self.shared.stats_of(&st)) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        let _ = self.shared.tx.send(Cmd::Shutdown);
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

impl PageSource for RemoteSource {
    fn len(&self) -> u64 {
        self.shared.len
    }

    fn name(&self) -> String {
        self.shared.name()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let Some((mut st, first, last)) = self.wait_for(offset, buf.len() as u64, true)? else {
            return Ok(());
        };
        let taken = self.take(&mut st, offset, buf, first, last);
        self.done_with(st);
        taken.map_err(|p| self.lost(offset, buf.len() as u64, p))
    }

    fn wait_ready(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        if let Some((st, _, _)) = self.wait_for(offset, len, true)? {
            drop(st);
        }
        Ok(())
    }

    fn read_or_lend(&self, offset: u64, buf: &mut [u8]) -> Result<Lend, SourceError> {
        let len = buf.len() as u64;
        // Not counted as a read: the server readied the range just before.
        let Some((mut st, first, last)) = self.wait_for(offset, len, false)? else {
            return Ok(Lend::Read(0));
        };
        let sh = &*self.shared;
        let whole = |p: u64| {
            let (ps, pe) = sh.page_span(p);
            ps >= offset && pe <= offset + len && pe - ps == sh.page
        };
        // The stretch of whole pages from `p` that one received buffer holds in order.
        let stretch = |st: &State, p: u64| -> u64 {
            let Some((c0, at0)) = st.cache.get(&p) else {
                return 0;
            };
            let mut n = 0;
            while p + n <= last && whole(p + n) {
                match st.cache.get(&(p + n)) {
                    Some((c, at))
                        if Arc::ptr_eq(c, c0) && *at as u64 == *at0 as u64 + n * sh.page =>
                    {
                        n += 1
                    }
                    _ => break,
                }
            }
            n
        };
        let here = stretch(&st, first);
        let answer = if here >= MIN_LEND_PAGES && offset % sh.page == 0 {
            let (chunk, at) = st
                .cache
                .get(&first)
                .cloned()
                .expect("the stretch starts here");
            for p in first..first + here {
                st.cache.remove(&p);
                st.partial.remove(&p);
                st.pages[p] = ABSENT | READ_ONCE;
            }
            let bytes = usize::try_from(here * sh.page).expect("inside the caller's buffer");
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = chunk;
            let lent =
                Lent::new(owner, at..at + bytes).expect("cached pages lie inside their chunk");
            Ok(Lend::Lent(lent))
        } else {
            // Copy up to where a stretch worth lending begins.
            let mut upto = first + here.max(1);
            while upto <= last && stretch(&st, upto) < MIN_LEND_PAGES {
                upto += 1;
            }
            let end = (upto * sh.page).min(offset + len);
            let n = usize::try_from(end - offset).expect("inside the caller's buffer");
            self.take(&mut st, offset, &mut buf[..n], first, upto - 1)
                .map(|()| Lend::Read(n))
                .map_err(|p| self.lost(offset, len, p))
        };
        self.done_with(st);
        answer
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        if len == 0 || check_bounds("", offset, len, self.shared.len).is_err() {
            return None;
        }
        let first = offset / self.shared.page;
        let last = (offset + len - 1) / self.shared.page;
        (first..=last)
            .all(|p| self.shared.is_known_zero(p))
            .then_some(true)
    }
}

impl RemoteSource {
    /// Wait until every page of `offset..offset + len` has been received (asking for those
    /// neither here nor asked for as demand), and return the locked state and the range's first
    /// and last page; `None` for an empty range. `count`: count it in the read statistics.
    fn wait_for(
        &self,
        offset: u64,
        len: u64,
        count: bool,
    ) -> Result<Option<(MutexGuard<'_, State>, u64, u64)>, SourceError> {
        let sh = &*self.shared;
        if offset.checked_add(len).is_none_or(|end| end > sh.len) {
            // The name is only made when needed: this is the hot path.
            return Err(SourceError::out_of_range(&sh.name(), offset, len, sh.len));
        }
        if len == 0 {
            return Ok(None);
        }
        if count {
            add(&sh.c.reads, 1);
        }
        let first = offset / sh.page;
        let last = (offset + len - 1) / sh.page;
        let started = Instant::now();
        let until = started + sh.opts.read_timeout;
        let patient_until = started + sh.opts.background_grace;
        let mut st = sh.lock();
        let mut first_look = true;
        loop {
            if let Some(f) = &st.fatal {
                let what = f.clone();
                return Err(sh.error(offset, len, Retry::Permanent, what));
            }
            for p in first..=last {
                if let Some((retry, msg)) = st.failed.remove(&p) {
                    return Err(sh.error(offset, len, retry, format!("the server says: {msg}")));
                }
            }
            // Ask for what is neither here nor asked for as demand.
            let mut missing = false;
            let mut run: Option<u64> = None;
            let mut asked = false;
            let patient = Instant::now() < patient_until;
            let mut awaits_background = false;
            for p in first..=last + 1 {
                let s = if p > last {
                    CACHED
                } else if sh.is_known_zero(p) {
                    // Zero whatever the cache says: nothing to wait for, nothing to ask.
                    ZERO
                } else {
                    st.pages[p]
                };
                match s & STATE {
                    BG if patient => {
                        missing = true;
                        awaits_background = true;
                        if let Some(from) = run.take() {
                            st.queue.push((from, p));
                            asked = true;
                        }
                    }
                    ABSENT | BG => {
                        missing = true;
                        st.pages[p] = DEMAND | (s & READ_ONCE);
                        run.get_or_insert(p);
                    }
                    other => {
                        if other == DEMAND {
                            missing = true;
                        }
                        if let Some(from) = run.take() {
                            st.queue.push((from, p));
                            asked = true;
                        }
                    }
                }
            }
            if !missing {
                if first_look && count {
                    add(&sh.c.reads_from_cache, 1);
                }
                return Ok(Some((st, first, last)));
            }
            first_look = false;
            if asked {
                let _ = sh.tx.send(Cmd::Wake);
            }
            let now = Instant::now();
            let mut wait = until.saturating_duration_since(now);
            if awaits_background {
                wait = wait.min(patient_until.saturating_duration_since(now));
            }
            if let Some(down) = st.down_since {
                let gone = now.duration_since(down);
                if gone >= sh.opts.deadline {
                    let what = format!(
                        "the remote page server has been unreachable for {:.1} s (deadline {:.1} s)",
                        gone.as_secs_f64(),
                        sh.opts.deadline.as_secs_f64()
                    );
                    return Err(sh.error(offset, len, Retry::Permanent, what));
                }
                wait = wait.min(sh.opts.deadline - gone);
            }
            if now >= until {
                let what = if st.up {
                    format!(
                        "no answer from the remote page server within {} ms",
                        sh.opts.read_timeout.as_millis()
                    )
                } else {
                    "disconnected from the remote page server; reconnecting".to_string()
                };
                return Err(sh.error(offset, len, Retry::Retryable, what));
            }
            st = sh
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Release the state after a read, letting the stream go on if it waited for room.
    fn done_with(&self, mut st: MutexGuard<'_, State>) {
        let wake = std::mem::take(&mut st.stream_starved);
        drop(st);
        if wake {
            let _ = self.shared.tx.send(Cmd::Wake);
        }
    }

    fn lost(&self, offset: u64, len: u64, page: u64) -> SourceError {
        self.shared.error(
            offset,
            len,
            Retry::Retryable,
            format!("page {page} was lost from the cache; it is asked for again"),
        )
    }

    /// Copy pages `first..=last` (all received) into `buf` and drop from the cache every page
    /// that has now been read whole (at once, or in parts adding up to it).
    /// `Err(page)` if a page marked received has no bytes (never expected: the page is marked
    /// absent so that a retry asks for it again, and nothing wrong is served).
    fn take(
        &self,
        st: &mut State,
        offset: u64,
        buf: &mut [u8],
        first: u64,
        last: u64,
    ) -> Result<(), u64> {
        let sh = &*self.shared;
        let end = offset + buf.len() as u64;
        for p in first..=last {
            let (ps, pe) = sh.page_span(p);
            let lo = ps.max(offset);
            let hi = pe.min(end);
            let at_buf = |x: u64| usize::try_from(x - offset).expect("inside the caller's buffer");
            let dst = &mut buf[at_buf(lo)..at_buf(hi)];
            let s = st.pages[p];
            if s & STATE == CACHED {
                let Some((chunk, at)) = st.cache.get(&p) else {
                    st.pages[p] = ABSENT;
                    return Err(p);
                };
                let from = at + usize::try_from(lo - ps).expect("inside one page");
                dst.copy_from_slice(&chunk.bytes[from..from + dst.len()]);
            } else {
                dst.fill(0);
            }
            let read = if hi - lo == pe - ps {
                hi - lo
            } else {
                let r = st.partial.entry(p).or_insert(0);
                *r += hi - lo;
                *r
            };
            if read >= pe - ps {
                st.partial.remove(&p);
                st.cache.remove(&p);
                st.pages[p] = ABSENT | READ_ONCE;
            }
        }
        Ok(())
    }
}
