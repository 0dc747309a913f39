//! [`RemoteSource`]: a [`PageSource`] whose bytes come from an [`super::Exporter`].

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
// Keys are page numbers and request ids: a multiply-and-rotate hash serves them as well as
// SipHash at a fraction of its cost (a map operation per page received and per page read).
use rustc_hash::FxHashMap as HashMap;

use super::wire::{
    self, read_frame, Frame, Priority, Welcome, WireError, WireRange, MAX_KEPT_BYTES, MIN_VERSION,
    VERSION,
};
use super::RemoteError;
use crate::source::{check_bounds, Lend, Lent, PageSource, Retry, SourceError};

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

// Per-page state (low bits), and a flag.
const ABSENT: u8 = 0;
const BG: u8 = 1;
const DEMAND: u8 = 2;
/// Received: bytes in `State::cache`.
const CACHED: u8 = 3;
/// Received: all zero (no bytes kept).
const ZERO: u8 = 4;
const STATE: u8 = 0b111;
/// Read once already (the stream skips it).
const READ_ONCE: u8 = 0b1000;

/// Received bytes, shared by the pages they cover; its size is accounted while it lives.
struct Chunk {
    bytes: Vec<u8>,
    acct: Arc<AtomicU64>,
}

impl Chunk {
    /// `bytes`, counted in `acct` while the chunk lives; also returns what `acct` counts now.
    fn accounted(bytes: Vec<u8>, acct: &Arc<AtomicU64>) -> (Arc<Chunk>, u64) {
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

/// The fewest pages [`PageSource::read_or_lend`] lends from one received buffer: below that,
/// copying them out with their neighbours (one `UFFDIO_COPY` for all) is cheaper than a
/// `UFFDIO_COPY` of their own.
const MIN_LEND_PAGES: u64 = 16;

impl Drop for Chunk {
    fn drop(&mut self) {
        self.acct
            .fetch_sub(self.bytes.len() as u64, Ordering::AcqRel);
    }
}

/// An outstanding request: its ranges and how far the answer got.
struct Req {
    priority: Priority,
    ranges: Vec<(u64, u64)>,
    idx: usize,
    pos: u64,
}

impl Req {
    fn remaining(&self) -> u64 {
        let rest: u64 = self.ranges[self.idx..].iter().map(|r| r.1).sum();
        rest - self.pos
    }
}

struct State {
    pages: Vec<u8>,
    cache: HashMap<u64, (Arc<Chunk>, usize)>,
    /// Bytes read so far of pages read in parts (dropped once read whole).
    partial: HashMap<u64, u64>,
    failed: HashMap<u64, (Retry, String)>,
    /// Demand page runs `[from, to)` not sent yet.
    queue: Vec<(u64, u64)>,
    requests: HashMap<u64, Req>,
    next_id: u64,
    gen: u64,
    up: bool,
    down_since: Option<Instant>,
    fatal: Option<String>,
    last_progress: Instant,
    stream_on: bool,
    stream_cursor: u64,
    /// Where the stream was when a fault elsewhere made it jump (at most [`MAX_FOLLOW`]): those
    /// places are streamed on too, in turn with the cursor, so that every vCPU touching memory
    /// in order finds its next pages streamed, not just the one that faulted last.
    stream_follow: Vec<u64>,
    /// Whose turn it is: 0 the cursor, `i` the follower `i - 1`.
    stream_turn: usize,
    /// The current pass over the source asked for pages, or the cursor jumped: another pass
    /// follows. A pass from the start that asks for nothing ends the stream.
    stream_pass_sent: bool,
    stream_done: bool,
    stream_starved: bool,
    bg_outstanding: usize,
    bg_bytes: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    reads_from_cache: AtomicU64,
    demand_requests: AtomicU64,
    background_requests: AtomicU64,
    ranges_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    zero_bytes_received: AtomicU64,
    same_bytes_received: AtomicU64,
    kept_pages: AtomicU64,
    duplicate_pages: AtomicU64,
    reconnects: AtomicU64,
    disconnects: AtomicU64,
    resent_requests: AtomicU64,
    retryable_errors: AtomicU64,
    permanent_errors: AtomicU64,
    peak: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

enum Cmd {
    Wake,
    Lost(u64),
    Shutdown,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    opts: RemoteOptions,
    addr: String,
    welcome: Welcome,
    page: u64,
    len: u64,
    npages: u64,
    cached: Arc<AtomicU64>,
    /// Bytes of `KEEP` pages alive (not counted in `cached`: they are not stream pages).
    kept: Arc<AtomicU64>,
    /// The current connection's protocol version.
    version: AtomicU16,
    c: Counters,
    tx: Sender<Cmd>,
    connected: AtomicBool,
    /// Pages answered as zero, one bit each. Zero is a fact about the source's bytes, not about
    /// the cache: a bit once set stays (a page read already is still zero), and it is read
    /// without the lock — by [`PageSource::is_zero`], which the fault server asks page by page.
    zero: Vec<AtomicU64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_known_zero(&self, p: u64) -> bool {
        self.zero[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    fn mark_zero(&self, p: u64) {
        self.zero[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
    }

    fn page_span(&self, p: u64) -> (u64, u64) {
        let start = p * self.page;
        (start, (start + self.page).min(self.len))
    }

    fn error(&self, offset: u64, len: u64, retry: Retry, what: String) -> SourceError {
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

    fn name(&self) -> String {
        format!("remote {} ({})", self.addr, self.welcome.name)
    }

    fn stats(&self) -> RemoteStats {
        let st = self.lock();
        self.stats_of(&st)
    }

    fn stats_of(&self, st: &State) -> RemoteStats {
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
                pages: vec![ABSENT; n],
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
                    Some((c, at)) if Arc::ptr_eq(c, c0) && *at == at0 + (n * sh.page) as usize => {
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
                st.pages[p as usize] = ABSENT | READ_ONCE;
            }
            let bytes = (here * sh.page) as usize;
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
            let n = (end - offset) as usize;
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
                    st.pages[p as usize]
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
                        st.pages[p as usize] = DEMAND | (s & READ_ONCE);
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
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            let s = st.pages[p as usize];
            if s & STATE == CACHED {
                let Some((chunk, at)) = st.cache.get(&p) else {
                    st.pages[p as usize] = ABSENT;
                    return Err(p);
                };
                let from = at + (lo - ps) as usize;
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
                st.pages[p as usize] = ABSENT | READ_ONCE;
            }
        }
        Ok(())
    }
}

/// The current connection, owned by the I/O thread.
struct Conn {
    stream: TcpStream,
    reader: JoinHandle<()>,
    gen: u64,
}

/// The I/O thread: owns the connection, sends requests, reconnects.
struct Io {
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    conn: Option<Conn>,
}

/// An answer frame, for [`apply`].
enum Answer {
    Data(Arc<Chunk>),
    /// Every page holds these (one page of) bytes.
    Same(Arc<Chunk>),
    Zero,
    Error(Retry, String),
}

impl Io {
    fn run(mut self) {
        let sh = Arc::clone(&self.shared);
        let mut pause = sh.opts.reconnect_min;
        let mut next_try = Instant::now();
        let tick =
            (sh.opts.io_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let timeout = if self.conn.is_some() {
                tick
            } else {
                next_try.saturating_duration_since(Instant::now())
            };
            let mut cmds = Vec::new();
            match self.rx.recv_timeout(timeout) {
                Ok(c) => cmds.push(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if !sh.opts.batch_delay.is_zero()
                && self.conn.is_some()
                && matches!(cmds.first(), Some(Cmd::Wake))
            {
                let until = Instant::now() + sh.opts.batch_delay;
                while let Ok(c) = self.rx.recv_deadline(until) {
                    cmds.push(c);
                }
            }
            cmds.extend(self.rx.try_iter());
            let mut shutdown = false;
            for c in cmds {
                match c {
                    Cmd::Wake => {}
                    Cmd::Lost(g) => {
                        if self.conn.as_ref().is_some_and(|c| c.gen == g) {
                            self.drop_conn("connection lost");
                            // Not at once: a server that accepts and drops would make a
                            // busy loop.
                            next_try = Instant::now() + pause;
                        }
                    }
                    Cmd::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                break;
            }
            if self.conn.is_none() && Instant::now() >= next_try {
                match connect_once(&sh.addr, sh.opts.connect_timeout) {
                    Ok((stream, w)) if w.same_source(&sh.welcome) => {
                        match self.install(stream, w.version, true) {
                            Ok(()) => {
                                pause = sh.opts.reconnect_min;
                                tracing::info!(addr = %sh.addr, "reconnected to the remote page server");
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start a reader thread");
                                next_try = Instant::now() + sh.opts.reconnect_max;
                            }
                        }
                    }
                    Ok((_, w)) => {
                        let why = format!(
                            "{} now serves a different source ({} bytes, page size {}, id {:#x}; was {} bytes, page size {}, id {:#x})",
                            sh.addr, w.source_len, w.page_size, w.source_id,
                            sh.welcome.source_len, sh.welcome.page_size, sh.welcome.source_id
                        );
                        tracing::error!(why, "remote page server changed; reads fail from now on");
                        sh.lock().fatal = Some(why);
                        sh.cv.notify_all();
                        next_try = Instant::now() + sh.opts.reconnect_max;
                    }
                    Err(e) => {
                        tracing::debug!(addr = %sh.addr, error = %e, "reconnect failed");
                        next_try = Instant::now() + pause;
                        pause = (pause * 2).min(sh.opts.reconnect_max);
                    }
                }
            }
            if self.conn.is_some() {
                if let Err(e) = self.pump() {
                    tracing::warn!(error = %e, "remote page connection failed while sending");
                    self.drop_conn("send failed");
                }
            }
            if self.conn.is_some() {
                let st = sh.lock();
                let stuck =
                    !st.requests.is_empty() && st.last_progress.elapsed() >= sh.opts.io_timeout;
                drop(st);
                if stuck {
                    tracing::warn!(
                        addr = %sh.addr,
                        "no answer from the remote page server within the I/O timeout; reconnecting"
                    );
                    self.drop_conn("I/O timeout");
                }
            }
        }
        if self.conn.is_some() {
            self.drop_conn("shut down");
        }
    }

    /// Adopt a connected, welcomed stream: start its reader and re-send what is outstanding.
    fn install(&mut self, stream: TcpStream, version: u16, again: bool) -> std::io::Result<()> {
        let sh = &self.shared;
        let reader_stream = stream.try_clone()?;
        stream.set_write_timeout(Some(sh.opts.io_timeout))?;
        let gen = {
            let mut st = sh.lock();
            st.gen += 1;
            st.up = true;
            st.down_since = None;
            st.last_progress = Instant::now();
            st.gen
        };
        let s = Arc::clone(sh);
        let reader = std::thread::Builder::new()
            .name("faultline-remote-rx".into())
            .spawn(move || reader_main(s, reader_stream, gen, version));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let mut st = sh.lock();
                st.up = false;
                st.down_since.get_or_insert_with(Instant::now);
                return Err(e);
            }
        };
        sh.connected.store(true, Ordering::Release);
        sh.version.store(version, Ordering::Relaxed);
        if again {
            add(&sh.c.reconnects, 1);
        }
        self.conn = Some(Conn {
            stream,
            reader,
            gen,
        });
        // Re-send what the last connection left unanswered: demand first.
        let mut out = Vec::new();
        {
            let mut st = sh.lock();
            let mut ids: Vec<(bool, u64)> = st
                .requests
                .iter()
                .map(|(id, r)| (r.priority == Priority::Background, *id))
                .collect();
            ids.sort_unstable();
            for (_, id) in ids {
                let Some(r) = st.requests.get_mut(&id) else {
                    continue;
                };
                let mut ranges: Vec<(u64, u64)> = r.ranges[r.idx..].to_vec();
                ranges[0].0 += r.pos;
                ranges[0].1 -= r.pos;
                r.ranges = ranges;
                r.idx = 0;
                r.pos = 0;
                encode_read(&mut out, id, r);
                add(&sh.c.resent_requests, 1);
            }
        }
        // Waiters look again: a connection is up, counters changed.
        sh.cv.notify_all();
        if !out.is_empty() {
            if let Some(c) = &self.conn {
                if let Err(e) = (&c.stream).write_all(&out) {
                    tracing::warn!(error = %e, "re-sending requests failed");
                    self.drop_conn("send failed");
                }
            }
        }
        Ok(())
    }

    fn drop_conn(&mut self, why: &str) {
        let Some(c) = self.conn.take() else {
            return;
        };
        let sh = &self.shared;
        {
            let mut st = sh.lock();
            st.up = false;
            st.gen += 1;
            st.down_since.get_or_insert_with(Instant::now);
        }
        sh.connected.store(false, Ordering::Release);
        add(&sh.c.disconnects, 1);
        let _ = c.stream.shutdown(Shutdown::Both);
        let _ = c.reader.join();
        sh.cv.notify_all();
        tracing::info!(addr = %sh.addr, why, "disconnected from the remote page server");
    }

    /// Send the queued demand reads, then background requests the stream may make.
    fn pump(&mut self) -> std::io::Result<()> {
        let sh = Arc::clone(&self.shared);
        let mut out = Vec::new();
        {
            let mut st = sh.lock();
            let idle = st.requests.is_empty();
            self.demand_frames(&mut st, &mut out);
            self.stream_frames(&mut st, &mut out);
            if idle && !st.requests.is_empty() {
                st.last_progress = Instant::now();
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        match &self.conn {
            Some(c) => (&c.stream).write_all(&out),
            None => Ok(()),
        }
    }

    fn max_ranges(&self) -> usize {
        usize::from(self.shared.welcome.max_ranges)
            .min(self.shared.opts.max_batch_ranges)
            .max(1)
    }

    /// Turn page runs into byte ranges within the server's range limit.
    fn byte_ranges(&self, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let sh = &self.shared;
        let max = u64::from(sh.welcome.max_range_len);
        let mut v = Vec::new();
        for &(a, b) in runs {
            let mut off = a * sh.page;
            let end = (b * sh.page).min(sh.len);
            while off < end {
                let n = (end - off).min(max);
                v.push((off, n));
                off += n;
            }
        }
        v
    }

    fn new_request(
        &self,
        st: &mut State,
        out: &mut Vec<u8>,
        priority: Priority,
        ranges: Vec<(u64, u64)>,
    ) {
        let sh = &self.shared;
        let id = st.next_id;
        st.next_id += 1;
        let r = Req {
            priority,
            ranges,
            idx: 0,
            pos: 0,
        };
        encode_read(out, id, &r);
        add(&sh.c.ranges_sent, r.ranges.len() as u64);
        match priority {
            Priority::Demand => add(&sh.c.demand_requests, 1),
            Priority::Background => {
                add(&sh.c.background_requests, 1);
                st.bg_outstanding += 1;
                st.bg_bytes += r.remaining();
            }
        }
        st.requests.insert(id, r);
    }

    fn demand_frames(&self, st: &mut State, out: &mut Vec<u8>) {
        if st.queue.is_empty() {
            return;
        }
        let mut q = std::mem::take(&mut st.queue);
        q.sort_unstable();
        // Pages still waiting as demand, merged into runs.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut seen_to = 0u64;
        for (a, b) in q {
            for p in a.max(seen_to)..b {
                if st.pages[p as usize] & STATE != DEMAND {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.1 == p => r.1 = p + 1,
                    _ => runs.push((p, p + 1)),
                }
            }
            seen_to = seen_to.max(b);
        }
        // The stream follows demand (as post-copy migration does): a fault away from where the
        // stream is makes it go on from there, where the next faults are likely; what it
        // skipped is picked up by a later pass.
        if let Some(&(a, b)) = runs.last() {
            let window =
                (self.stream_chunk() / self.shared.page) * self.shared.opts.stream_window as u64;
            let c = st.stream_cursor;
            let near = |f: u64| a < f + window && a + window >= f;
            let follower = st.stream_follow.iter().position(|&f| near(f));
            if !st.stream_on || st.stream_done {
                // Nothing to steer.
            } else if let Some(i) = follower {
                // Near where a follower streams: it goes on from here if it lags.
                st.stream_follow[i] = st.stream_follow[i].max(b);
                st.stream_pass_sent = true;
            } else if a >= c || a + window < c {
                // Away from the cursor: the cursor goes there, and where it was is followed.
                if c < self.shared.npages {
                    if st.stream_follow.len() == MAX_FOLLOW {
                        st.stream_follow.remove(0);
                    }
                    st.stream_follow.push(c);
                }
                st.stream_cursor = b;
                st.stream_pass_sent = true;
            }
        }
        let ranges = self.byte_ranges(&runs);
        for batch in ranges.chunks(self.max_ranges()) {
            self.new_request(st, out, Priority::Demand, batch.to_vec());
        }
    }

    /// Bytes per background request (whole pages, at most the cache).
    fn stream_chunk(&self) -> u64 {
        let sh = &self.shared;
        sh.opts
            .stream_chunk
            .min(sh.opts.cache_bytes)
            .max(sh.page)
            .next_multiple_of(sh.page)
    }

    fn stream_frames(&self, st: &mut State, out: &mut Vec<u8>) {
        let sh = &self.shared;
        if !st.stream_on {
            return;
        }
        let chunk = self.stream_chunk();
        let chunk_pages = chunk / sh.page;
        // Room for at least one request, whatever the options say.
        let cap = sh.opts.cache_bytes.max(chunk);
        let mut changed = false;
        while st.bg_outstanding < sh.opts.stream_window && !st.stream_done {
            if st.stream_cursor >= sh.npages {
                if !st.stream_pass_sent {
                    st.stream_done = true;
                    changed = true;
                    break;
                }
                st.stream_cursor = 0;
                st.stream_pass_sent = false;
                continue;
            }
            if sh.cached.load(Ordering::Acquire) + st.bg_bytes + chunk > cap {
                st.stream_starved = true;
                break;
            }
            let turn = st.stream_turn % (st.stream_follow.len() + 1);
            st.stream_turn = st.stream_turn.wrapping_add(1);
            let (from, to) = if turn == 0 {
                let from = st.stream_cursor;
                let to = (from + chunk_pages).min(sh.npages);
                st.stream_cursor = to;
                (from, to)
            } else {
                let from = st.stream_follow[turn - 1];
                (from, (from + chunk_pages).min(sh.npages))
            };
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for p in from..to {
                let s = st.pages[p as usize];
                if s != ABSENT {
                    continue; // asked for, received, or read already
                }
                st.pages[p as usize] = BG;
                match runs.last_mut() {
                    Some(r) if r.1 == p => r.1 = p + 1,
                    _ => runs.push((p, p + 1)),
                }
            }
            if turn > 0 {
                // A follower ends at the end of the source, or where it finds nothing left to
                // ask for (it has caught up with what was streamed before).
                if runs.is_empty() || to >= sh.npages {
                    st.stream_follow.remove(turn - 1);
                } else {
                    st.stream_follow[turn - 1] = to;
                }
            }
            changed = true;
            if runs.is_empty() {
                continue;
            }
            st.stream_pass_sent = true;
            let ranges = self.byte_ranges(&runs);
            for batch in ranges.chunks(self.max_ranges()) {
                self.new_request(st, out, Priority::Background, batch.to_vec());
            }
        }
        if changed {
            sh.cv.notify_all();
        }
    }
}

fn encode_read(out: &mut Vec<u8>, id: u64, r: &Req) {
    Frame::Read {
        id,
        priority: r.priority,
        ranges: r
            .ranges
            .iter()
            .map(|&(offset, len)| WireRange {
                offset,
                len: len as u32,
            })
            .collect(),
    }
    .encode(out);
}

/// Most places the stream follows besides its cursor (see `State::stream_follow`).
const MAX_FOLLOW: usize = 3;

/// Default [`RemoteOptions::background_grace`], in ms.
const GRACE_MS: u64 = 2;

/// Most answer frames applied under one lock.
const BATCH: usize = 256;

/// The reader's receive buffer (see [`reader_main`]).
const RECV_BUFFER: usize = 16 << 10;

/// The connection's reader: receives answer frames and applies them to the cache. Frames that
/// arrived together (all that the read buffer holds, up to [`BATCH`]) are applied under one
/// lock with one wake-up of the waiting reads: with repeated pages a 1 MiB answer is hundreds
/// of small frames.
fn reader_main(sh: Arc<Shared>, stream: TcpStream, gen: u64, version: u16) {
    // Small: it holds the headers and small frames of one receive. A DATA payload larger than
    // what is left buffered is read from the socket straight into its own buffer (BufReader
    // passes reads of at least its capacity through), so page bytes are copied once here.
    let mut r = BufReader::with_capacity(RECV_BUFFER, stream);
    let mut scratch = Vec::new();
    // The pages this connection's server asked us to keep (version 2): slot -> bytes.
    let mut kept: HashMap<u32, Arc<Chunk>> = HashMap::default();
    let slots = MAX_KEPT_BYTES / sh.welcome.page_size;
    let mut batch: Vec<(u64, u64, u64, Answer)> = Vec::with_capacity(BATCH);
    let why = 'conn: loop {
        let mut failed = None;
        loop {
            let frame = match read_frame(&mut r, &mut scratch) {
                Ok(f) => f,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            };
            add(&sh.c.frames_received, 1);
            match answer_of(&sh, frame, version, slots, &mut kept) {
                Ok(Some(a)) => batch.push(a),
                Ok(None) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            // Go on only while the next frame can be read without blocking.
            if batch.len() >= BATCH || !wire::holds_whole_frame(r.buffer()) {
                break;
            }
        }
        // What arrived before a failure is applied: it is good, and saves asking again.
        let mut st = sh.lock();
        if st.gen != gen {
            break "connection replaced".to_string();
        }
        st.last_progress = Instant::now();
        let mut bg_done = false;
        let mut bad = None;
        for (id, offset, len, answer) in batch.drain(..) {
            match apply(&sh, &mut st, id, offset, len, answer) {
                Ok(done) => bg_done |= done,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        drop(st);
        sh.cv.notify_all();
        if bg_done {
            let _ = sh.tx.send(Cmd::Wake);
        }
        if let Some(e) = bad.or(failed) {
            break 'conn e;
        }
    };
    tracing::debug!(why, "remote page reader ends");
    let _ = sh.tx.send(Cmd::Lost(gen));
}

/// What an answer frame says, as `(request id, offset, len, answer)`; `Ok(None)` for a `KEEP`
/// (stored in `kept`), `Err` for a frame that breaks the protocol.
fn answer_of(
    sh: &Shared,
    frame: Frame,
    version: u16,
    slots: u32,
    kept: &mut HashMap<u32, Arc<Chunk>>,
) -> Result<Option<(u64, u64, u64, Answer)>, String> {
    Ok(Some(match frame {
        Frame::Data { id, offset, bytes } => {
            let n = bytes.len() as u64;
            add(&sh.c.bytes_received, n);
            let (chunk, now) = Chunk::accounted(bytes, &sh.cached);
            sh.c.peak.fetch_max(now, Ordering::Relaxed);
            (id, offset, n, Answer::Data(chunk))
        }
        Frame::Zero { id, offset, len } => {
            add(&sh.c.zero_bytes_received, u64::from(len));
            (id, offset, u64::from(len), Answer::Zero)
        }
        Frame::Error {
            id,
            offset,
            len,
            retry,
            message,
        } => (id, offset, u64::from(len), Answer::Error(retry, message)),
        Frame::Keep { slot, bytes } if version >= 2 => {
            if slot >= slots || bytes.len() as u64 != sh.page {
                return Err(format!(
                    "KEEP of {} bytes into slot {slot} (pages are {} bytes, {slots} slots)",
                    bytes.len(),
                    sh.page
                ));
            }
            add(&sh.c.kept_pages, 1);
            add(&sh.c.bytes_received, sh.page);
            kept.insert(slot, Chunk::accounted(bytes, &sh.kept).0);
            return Ok(None);
        }
        Frame::Same {
            id,
            offset,
            len,
            slot,
        } if version >= 2 => {
            let Some(c) = kept.get(&slot) else {
                return Err(format!("SAME refers to slot {slot}, which was never kept"));
            };
            add(&sh.c.same_bytes_received, u64::from(len));
            (id, offset, u64::from(len), Answer::Same(Arc::clone(c)))
        }
        other => return Err(format!("unexpected frame from the server: {other:?}")),
    }))
}

/// Apply one answer frame to its request and to the pages it covers. `Ok(true)` when a
/// background request completed (the stream may go on).
fn apply(
    sh: &Shared,
    st: &mut State,
    id: u64,
    offset: u64,
    len: u64,
    answer: Answer,
) -> Result<bool, String> {
    let Some(req) = st.requests.get_mut(&id) else {
        return Err(format!("answer to unknown request {id}"));
    };
    let (roff, rlen) = req.ranges[req.idx];
    let expect = roff + req.pos;
    if offset != expect || len == 0 || req.pos + len > rlen {
        return Err(format!(
            "answer {offset:#x}+{len:#x} to request {id} does not continue it at {expect:#x} (range {roff:#x}+{rlen:#x})"
        ));
    }
    if offset % sh.page != 0 || (len % sh.page != 0 && offset + len != sh.len) {
        return Err(format!(
            "answer {offset:#x}+{len:#x} does not cover whole pages"
        ));
    }
    if let Answer::Data(c) = &answer {
        if c.bytes.len() as u64 != len {
            return Err("data length mismatch".into());
        }
    }
    req.pos += len;
    if req.pos == rlen {
        req.idx += 1;
        req.pos = 0;
    }
    let done = req.idx == req.ranges.len();
    let bg = req.priority == Priority::Background;
    if bg {
        st.bg_bytes = st.bg_bytes.saturating_sub(len);
    }
    if done {
        st.requests.remove(&id);
        if bg {
            st.bg_outstanding = st.bg_outstanding.saturating_sub(1);
        }
    }
    let first = offset / sh.page;
    let n = len.div_ceil(sh.page);
    let mut dup = 0;
    for i in 0..n {
        let p = first + i;
        if matches!(answer, Answer::Zero) {
            sh.mark_zero(p);
        }
        let s = st.pages[p as usize];
        if !matches!(s & STATE, BG | DEMAND) {
            dup += 1;
            continue;
        }
        let keep = s & READ_ONCE;
        match &answer {
            Answer::Data(c) => {
                st.cache.insert(p, (Arc::clone(c), (i * sh.page) as usize));
                st.pages[p as usize] = CACHED | keep;
            }
            Answer::Same(c) => {
                st.cache.insert(p, (Arc::clone(c), 0));
                st.pages[p as usize] = CACHED | keep;
            }
            Answer::Zero => st.pages[p as usize] = ZERO | keep,
            Answer::Error(retry, msg) => {
                st.pages[p as usize] = ABSENT | keep;
                st.failed.insert(p, (*retry, msg.clone()));
            }
        }
    }
    add(&sh.c.duplicate_pages, dup);
    Ok(done && bg)
}
