//! The remote page exporter ([`Exporter`]): serve any [`PageSource`] over TCP (`faultline export`).

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::dedup::DedupIndex;
use super::wire::{
    self, read_frame, Frame, Priority, Welcome, WireError, WireRange, MAX_RANGES, MAX_RANGE_LEN,
    MIN_VERSION, VERSION,
};
use super::RemoteError;
use crate::source::PageSource;

/// Options of an [`Exporter`].
#[derive(Debug, Clone)]
pub struct ExporterOptions {
    /// The page size announced to clients (a power of two, 4 KiB ..= 2 MiB).
    pub page_size: u32,
    /// The source id announced to clients (default: a hash of the source's name and length).
    pub source_id: Option<u64>,
    /// Most connections served at once; more are refused.
    pub max_connections: usize,
    /// Requests queued per connection and priority before the server stops reading from it.
    pub queue_depth: usize,
    /// Scan the source for repeated pages when starting and send each repeated page once per
    /// (version-2) connection. The scan reads the whole source once, in the background.
    pub dedup: bool,
}

impl Default for ExporterOptions {
    fn default() -> Self {
        ExporterOptions {
            page_size: 4096,
            source_id: None,
            max_connections: 64,
            queue_depth: 64,
            dedup: true,
        }
    }
}

/// Counters of an [`Exporter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExporterStats {
    /// Connections accepted (welcomed).
    pub connections: u64,
    /// Connections open now.
    pub live_connections: u64,
    /// Connections refused or dropped for breaking the protocol.
    pub rejected: u64,
    /// `READ` frames with demand priority received.
    pub demand_requests: u64,
    /// `READ` frames with background priority received.
    pub background_requests: u64,
    /// Ranges received.
    pub ranges: u64,
    /// Demand requests served while background requests were waiting (demand overtook them).
    pub demand_overtook: u64,
    /// `DATA` frames sent.
    pub data_frames: u64,
    /// `ZERO` frames sent.
    pub zero_frames: u64,
    /// `ERROR` frames sent.
    pub error_frames: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Bytes answered with `ZERO` frames (not sent).
    pub zero_bytes: u64,
    /// `KEEP` frames sent (a repeated page's bytes, once per connection).
    pub keep_frames: u64,
    /// `SAME` frames sent.
    pub same_frames: u64,
    /// Bytes answered with `SAME` frames (not sent).
    pub same_bytes: u64,
    /// The duplicate-page scan has finished (successfully or not).
    pub dedup_done: bool,
    /// Distinct repeated contents found by the scan (slots).
    pub dedup_slots: u64,
    /// Pages that hold one of those contents.
    pub dedup_pages: u64,
    /// How long the scan took (ms).
    pub dedup_scan_ms: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    live: AtomicU64,
    rejected: AtomicU64,
    demand_requests: AtomicU64,
    background_requests: AtomicU64,
    ranges: AtomicU64,
    demand_overtook: AtomicU64,
    data_frames: AtomicU64,
    zero_frames: AtomicU64,
    error_frames: AtomicU64,
    bytes_sent: AtomicU64,
    zero_bytes: AtomicU64,
    keep_frames: AtomicU64,
    same_frames: AtomicU64,
    same_bytes: AtomicU64,
    dedup_scan_ms: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A live connection: a clone of its socket (to cut it) and its thread.
type Registered = (TcpStream, Option<JoinHandle<()>>);

struct Shared {
    source: Arc<dyn PageSource>,
    welcome: Welcome,
    options: ExporterOptions,
    counters: Counters,
    /// Live connections (a clone of each socket, to cut them) and their threads.
    conns: Mutex<HashMap<u64, Registered>>,
    /// Notified whenever a request arrives (for [`Exporter::wait_stats`]).
    changed: Condvar,
    changed_lock: Mutex<()>,
    stop: AtomicBool,
    /// The duplicate-page index, once the scan has built it.
    dedup: OnceLock<DedupIndex>,
    dedup_done: AtomicBool,
}

impl Shared {
    fn notify(&self) {
        let _g = self
            .changed_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    fn stats(&self) -> ExporterStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExporterStats {
            connections: l(&c.connections),
            live_connections: l(&c.live),
            rejected: l(&c.rejected),
            demand_requests: l(&c.demand_requests),
            background_requests: l(&c.background_requests),
            ranges: l(&c.ranges),
            demand_overtook: l(&c.demand_overtook),
            data_frames: l(&c.data_frames),
            zero_frames: l(&c.zero_frames),
            error_frames: l(&c.error_frames),
            bytes_sent: l(&c.bytes_sent),
            zero_bytes: l(&c.zero_bytes),
            keep_frames: l(&c.keep_frames),
            same_frames: l(&c.same_frames),
            same_bytes: l(&c.same_bytes),
            dedup_done: self.dedup_done.load(Ordering::Acquire),
            dedup_slots: self.dedup.get().map_or(0, |d| d.slots() as u64),
            dedup_pages: self.dedup.get().map_or(0, |d| d.pages),
            dedup_scan_ms: l(&c.dedup_scan_ms),
        }
    }
}

/// Serves a [`PageSource`] over TCP with the remote page protocol (`docs/remote-protocol.md`).
///
/// One accept thread, and per connection a reader thread (checks frames, queues requests by
/// priority) and a writer thread (reads the source, answers demand before background). Dropping
/// the server (or [`Exporter::shutdown`]) stops accepting, cuts every connection and joins
/// every thread.
pub struct Exporter {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    scan: Option<JoinHandle<()>>,
    wake: UnixStream,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("addr", &self.addr)
            .field("source", &self.shared.welcome.name)
            .finish()
    }
}

/// A stable 64-bit id for a source: FNV-1a over its name, length and page size.
pub fn default_source_id(name: &str, len: u64, page_size: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (len, page_size) = (len.to_le_bytes(), page_size.to_le_bytes());
    for b in name.as_bytes().iter().chain(&len).chain(&page_size) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Exporter {
    /// Bind `addr` and serve `source` with default options.
    pub fn bind(
        addr: impl ToSocketAddrs,
        source: Arc<dyn PageSource>,
    ) -> Result<Exporter, RemoteError> {
        let listener = TcpListener::bind(addr).map_err(RemoteError::Bind)?;
        Exporter::start(listener, source, ExporterOptions::default())
    }

    /// Serve `source` on an already bound listener.
    pub fn start(
        listener: TcpListener,
        source: Arc<dyn PageSource>,
        options: ExporterOptions,
    ) -> Result<Exporter, RemoteError> {
        let ps = options.page_size;
        if !ps.is_power_of_two() || !(wire::MIN_PAGE_SIZE..=wire::MAX_PAGE_SIZE).contains(&ps) {
            return Err(RemoteError::Config(format!(
                "page size {ps} is not a power of two from 4 KiB to 2 MiB"
            )));
        }
        let name = source.name();
        let len = source.len();
        let welcome = Welcome {
            version: VERSION,
            page_size: ps,
            source_len: len,
            source_id: options
                .source_id
                .unwrap_or_else(|| default_source_id(&name, len, ps)),
            max_ranges: MAX_RANGES,
            max_range_len: MAX_RANGE_LEN,
            name: wire::clip(&name, wire::MAX_NAME).to_string(),
        };
        let addr = listener.local_addr().map_err(RemoteError::Bind)?;
        let shared = Arc::new(Shared {
            source,
            welcome,
            options,
            counters: Counters::default(),
            conns: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            changed_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            dedup: OnceLock::new(),
            dedup_done: AtomicBool::new(false),
        });
        let scan = if shared.options.dedup {
            let s = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(SCAN_THREAD.into())
                .spawn(move || scan_main(&s))
                .map_err(RemoteError::Bind)?;
            Some(h)
        } else {
            shared.dedup_done.store(true, Ordering::Release);
            None
        };
        let (wake_rx, wake) = UnixStream::pair().map_err(RemoteError::Bind)?;
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("faultline-export".into())
            .spawn(move || accept_loop(s, listener, wake_rx))
            .map_err(RemoteError::Bind)?;
        Ok(Exporter {
            shared,
            addr,
            accept: Some(accept),
            scan,
            wake,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server announces to clients.
    pub fn welcome(&self) -> &Welcome {
        &self.shared.welcome
    }

    /// The counters.
    pub fn stats(&self) -> ExporterStats {
        self.shared.stats()
    }

    /// Wait until `pred` holds for the counters (checked whenever a request arrives or a
    /// connection opens or closes); `false` after `timeout`.
    pub fn wait_stats(&self, timeout: Duration, pred: impl Fn(&ExporterStats) -> bool) -> bool {
        let end = Instant::now() + timeout;
        let mut g = self
            .shared
            .changed_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if pred(&self.shared.stats()) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Cut every live connection (both directions), as a network failure would: clients see an
    /// error or an end of stream and reconnect. Returns how many were cut.
    pub fn cut_connections(&self) -> usize {
        let conns = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (s, _) in conns.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// Stop accepting, cut every connection, join every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = (&self.wake).write_all(b"x");
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        if let Some(h) = self.scan.take() {
            let _ = h.join();
        }
        let conns: Vec<_> = {
            let mut c = self
                .shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.drain().collect()
        };
        for (_, (s, _)) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, (_, thread)) in conns {
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop();
        }
    }
}

/// The duplicate-page scan's thread name (15 bytes at most: what `/proc/…/comm` shows whole).
const SCAN_THREAD: &str = "faultline-scan";

/// The nice value the scan runs at: it is start-up work that must not slow the first demand
/// reads of a post-copy restore, which the exporter serves at the same time.
const SCAN_NICE: i32 = 19;

/// Build the duplicate-page index (see [`DedupIndex`]); connections use it once it is set.
fn scan_main(shared: &Shared) {
    // PRIO_PROCESS with a thread id sets that thread's nice value (Linux). Failing to lower our
    // own priority is harmless: the scan runs at the exporter's.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), SCAN_NICE)
    {
        tracing::debug!(error = %e, "could not lower the scan thread's priority");
    }
    let start = Instant::now();
    let page = shared.welcome.page_size as usize;
    if let Some(ix) = DedupIndex::scan(&*shared.source, page, &shared.stop) {
        tracing::info!(
            slots = ix.slots(),
            pages = ix.pages,
            ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            "duplicate-page scan done"
        );
        let _ = shared.dedup.set(ix);
    }
    shared.counters.dedup_scan_ms.store(
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    shared.dedup_done.store(true, Ordering::Release);
    shared.notify();
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener, wake: UnixStream) {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut next_id = 0u64;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "poll on the export socket failed");
                return;
            }
        }
        if !fds[1].revents().is_empty() || shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        // Join the threads of connections that ended.
        reap(&shared);
        let Ok(reg) = stream.try_clone() else {
            continue;
        };
        // Registered before its thread starts, so that `stop` always finds (cuts and joins) it.
        let mut conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let s = Arc::clone(&shared);
        let r = std::thread::Builder::new()
            .name("faultline-export-conn".into())
            .spawn(move || serve_connection(s, stream));
        match r {
            Ok(h) => {
                conns.insert(id, (reg, Some(h)));
            }
            Err(e) => tracing::error!(error = %e, "cannot start a connection thread"),
        }
    }
}

/// Join the threads of connections that ended.
fn reap(shared: &Shared) {
    let done: Vec<JoinHandle<()>> = {
        let mut conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<u64> = conns
            .iter()
            .filter(|(_, (_, h))| h.as_ref().is_none_or(|h| h.is_finished()))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| conns.remove(&id).and_then(|(_, h)| h))
            .collect()
    };
    for h in done {
        let _ = h.join();
    }
}

/// A queued `READ`.
struct Job {
    id: u64,
    ranges: Vec<WireRange>,
}

fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let version = match handshake(&shared, &stream) {
        Ok(Some(v)) => v,
        Ok(None) => {
            add(&shared.counters.rejected, 1);
            return;
        }
        Err(e) => {
            add(&shared.counters.rejected, 1);
            tracing::warn!(peer, error = %e, "remote page client refused");
            return;
        }
    };
    let Ok(writer_stream) = stream.try_clone() else {
        return;
    };
    add(&shared.counters.connections, 1);
    add(&shared.counters.live, 1);
    shared.notify();
    tracing::info!(peer, version, "remote page client connected");

    let depth = shared.options.queue_depth.max(1);
    let (demand_tx, demand_rx) = crossbeam_channel::bounded::<Job>(depth);
    let (bg_tx, bg_rx) = crossbeam_channel::bounded::<Job>(depth);
    let s = Arc::clone(&shared);
    let writer = std::thread::Builder::new()
        .name("faultline-export-tx".into())
        .spawn(move || write_loop(s, writer_stream, version, demand_rx, bg_rx));
    let (why, writer) = match writer {
        Ok(h) => (read_loop(&shared, &stream, &demand_tx, &bg_tx), Some(h)),
        Err(e) => (Err(WireError::Io(e)), None),
    };
    // Whatever ended the reading side ends the connection: the writer stops when its queues
    // close (or its socket fails).
    drop((demand_tx, bg_tx));
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(h) = writer {
        let _ = h.join();
    }
    shared.counters.live.fetch_sub(1, Ordering::Relaxed);
    shared.notify();
    match why {
        Ok(()) => tracing::info!(peer, "remote page client disconnected"),
        Err(e) => tracing::info!(peer, error = %e, "remote page connection ended"),
    }
}

/// Receive the hello and answer it: the version the connection speaks, or `Ok(None)` when
/// refused (answered with a refusal).
fn handshake(shared: &Shared, stream: &TcpStream) -> Result<Option<u16>, WireError> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut scratch = Vec::new();
    let hello = read_frame(&mut &*stream, &mut scratch)?;
    stream.set_read_timeout(None)?;
    let Frame::Hello {
        min_version,
        max_version,
    } = hello
    else {
        return Err(WireError::Invalid("first frame is not a hello".into()));
    };
    let mut out = Vec::new();
    let live = shared.counters.live.load(Ordering::Relaxed);
    let version = max_version.min(VERSION);
    let refuse = if version < min_version || version < MIN_VERSION {
        Some(format!(
            "this server speaks versions {MIN_VERSION}..={VERSION}, the client {min_version}..={max_version}"
        ))
    } else if live >= shared.options.max_connections as u64 {
        Some(format!(
            "the server is full ({live} connections); try again later"
        ))
    } else {
        None
    };
    if let Some(reason) = refuse {
        tracing::warn!(reason, "remote page client refused");
        Frame::Refused { reason }.encode(&mut out);
        (&*stream).write_all(&out)?;
        return Ok(None);
    }
    Frame::Welcome(Welcome {
        version,
        ..shared.welcome.clone()
    })
    .encode(&mut out);
    (&*stream).write_all(&out)?;
    Ok(Some(version))
}

fn read_loop(
    shared: &Shared,
    stream: &TcpStream,
    demand: &Sender<Job>,
    bg: &Sender<Job>,
) -> Result<(), WireError> {
    let mut r = BufReader::with_capacity(64 << 10, stream);
    let mut scratch = Vec::new();
    loop {
        let frame = match read_frame(&mut r, &mut scratch) {
            Ok(f) => f,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let Frame::Read {
            id,
            priority,
            ranges,
        } = frame
        else {
            add(&shared.counters.rejected, 1);
            return Err(WireError::Invalid(
                "a client may only send READ frames after its hello".into(),
            ));
        };
        add(&shared.counters.ranges, ranges.len() as u64);
        let job = Job { id, ranges };
        let sent = match priority {
            Priority::Demand => {
                add(&shared.counters.demand_requests, 1);
                demand.send(job)
            }
            Priority::Background => {
                add(&shared.counters.background_requests, 1);
                bg.send(job)
            }
        };
        shared.notify();
        if sent.is_err() {
            // The writer is gone (its socket failed).
            return Ok(());
        }
    }
}

mod writer;
use writer::write_loop;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::{MemorySource, SourceError};

    /// A source whose reads take a while, so that the scan is still running when looked at.
    #[derive(Debug)]
    struct Slow(MemorySource);

    impl PageSource for Slow {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn name(&self) -> String {
            "slow".into()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
            std::thread::sleep(Duration::from_millis(2));
            self.0.read_at(offset, buf)
        }
    }

    /// The nice value of this process's thread named `name`, if it runs.
    fn nice_of_thread(name: &str) -> Option<i32> {
        // A thread that ends while we look (the scan, when it finishes) is skipped, not the end
        // of the search.
        for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let dir = t.path();
            match std::fs::read_to_string(dir.join("comm")) {
                Ok(comm) if comm.trim_end() == name => {}
                _ => continue,
            }
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            // After the ")" that ends the name come field 3 (state) on; nice is field 19.
            let rest = &stat[stat.rfind(')')? + 2..];
            return rest.split(' ').nth(16)?.parse().ok();
        }
        None
    }

    #[test]
    fn the_duplicate_page_scan_runs_at_the_lowest_priority() {
        let source = Arc::new(Slow(MemorySource::new(vec![1u8; 64 << 20])));
        let server = Exporter::start(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            source,
            ExporterOptions::default(),
        )
        .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        let mut seen = None;
        while Instant::now() < until && !server.stats().dedup_done {
            if let Some(n) = nice_of_thread(SCAN_THREAD) {
                seen = Some(n);
                if n == SCAN_NICE {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(seen, Some(SCAN_NICE), "the scan thread's nice value");
        // The exporter's own threads keep theirs. On a loaded machine the accept thread may not
        // have run yet (until it does, it bears its parent's name): wait for it, bounded.
        let mut exporter = None;
        while exporter.is_none() && Instant::now() < until {
            exporter = nice_of_thread("faultline-expor");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The test may itself run niced: the exporter keeps the nice value it started with.
        let own = rustix::process::getpriority_process(None).unwrap();
        assert_eq!(exporter, Some(own), "the exporter thread's nice value");
    }
}
