//! One object in an object store (S3 and S3-compatible servers; anything the `object_store`
//! crate reaches), read with ranged GETs through a local on-disk cache.
//!
//! [`ObjectSource`] serves a raw memory file or an image that lives in a bucket:
//!
//! - **Blocks.** The object is read in aligned blocks of [`ObjectSourceOptions::block_size`]
//!   (1 MiB by default): a 4 KiB fault fetches its whole block, so neighbouring pages share one
//!   GET and one round trip. Every fetched block goes into the cache.
//! - **Cache.** Blocks are kept on local disk under [`ObjectSourceOptions::cache_dir`], at most
//!   [`ObjectSourceOptions::cache_bytes`], least recently used evicted first. A cached block
//!   never touches the network: it is read with `pread`, or, when the limit is at least the
//!   object's size (so nothing is ever evicted), lent straight from a mapping of the cache file
//!   ([`PageSource::ptr_at`]: one copy, as from a local memory file). The zero pages of each block
//!   are noted when it is fetched ([`PageSource::is_zero`]: mapped with `UFFDIO_ZEROPAGE`). The
//!   cache outlives the source: a new process (a restarted `faultline serve` worker, the next
//!   restore) finds it warm. See the `cache` module for its layout and crash safety.
//! - **One GET per block.** Concurrent readers of a block that is being fetched wait for that
//!   fetch instead of starting their own.
//! - **Bounded parallelism, demand first.** At most [`ObjectSourceOptions::max_parallel`] GETs
//!   run at once. Demand reads ([`PageSource::read_at`]) take a free slot before any prefetch
//!   does, so a faulting vCPU never queues behind background traffic.
//! - **Working set first.** [`ObjectSource::prefetch`] fetches the blocks of a list of offsets
//!   (a recorded working set, in first-touch order) in that order, in parallel, into the cache.
//! - **Pinned version.** The object's ETag is taken when it is opened and every GET carries
//!   `If-Match`: if the object is replaced while VMs restore from it, reads fail (permanently)
//!   instead of mixing bytes of two snapshots.
//! - **Errors** name the object and the byte range of the GET. Network failures, timeouts and
//!   5xx answers (and 408/429) are retryable; 404, 403, 401, 412 (the object changed), 416 (range
//!   not satisfiable) and other 4xx answers are permanent. The HTTP status is observed on the
//!   wire (an instrumented HTTP client, see [`ObjectStats::http_requests`]) for stores opened
//!   from a URL; for a store passed in by the caller it is inferred from the error's type, and an
//!   error that says nothing is treated as retryable (the server retries a few times, then
//!   poisons the page).
//!
//! `object_store` is async; the source owns a small tokio runtime (two I/O threads) and the
//! calling thread waits for each fetch, so [`PageSource::read_at`] works from the fault server's
//! plain worker threads (and from inside another runtime: the fetch runs on the source's own).
//!
//! Where things live: this module holds the source, its options and statistics and the fetch of
//! a block; `store` sets up the S3 store (and the instrumented HTTP client), `error` classifies
//! failures, `flight` makes concurrent readers of a block share one GET, `permits` bounds the GETs
//! in flight with demand first, and `cache` is the on-disk block cache. Uploading an object is
//! [`crate::object_upload`].

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3ConfigKey;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, ObjectStore, RetryConfig};

use super::{check_bounds, PageSource, Retry, SourceError};

mod cache;
pub(crate) mod error;
mod flight;
mod permits;
pub(crate) mod store;
mod tls;

use cache::{block_len, BlockCache, Identity, TempRoot};
use error::{classify, FetchFailure};
use flight::{Completion, Flight};
use permits::{Permit, Permits, Priority};
use store::{build_store, run, s3_builder, Instrumented, StatusSlot};

pub use error::ObjectError;
pub use store::S3Config;
pub use tls::install_crypto_provider;

/// How an [`ObjectSource`] fetches and caches.
#[derive(Debug, Clone)]
pub struct ObjectSourceOptions {
    /// Bytes per GET and per cache entry; a multiple of 4096 (default 1 MiB).
    pub block_size: u64,
    /// GETs in flight at once (default 8).
    pub max_parallel: usize,
    /// The cache root (one directory per object inside). `None`: a private directory under the
    /// system's temporary directory, removed when the source is dropped.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache keeps on disk (default 1 GiB).
    pub cache_bytes: u64,
    /// Retries of one GET inside `object_store` before the error is returned (default 2; the
    /// fault server retries retryable errors again with its own backoff).
    pub retries: usize,
    /// Connection timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Whole-request timeout (default 30 s).
    pub request_timeout: Duration,
    /// Send `If-Match: <ETag at open>` with every GET (default true).
    pub pin_etag: bool,
}

impl Default for ObjectSourceOptions {
    fn default() -> Self {
        ObjectSourceOptions {
            block_size: 1 << 20,
            max_parallel: 8,
            cache_dir: None,
            cache_bytes: 1 << 30,
            retries: 2,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            pin_etag: true,
        }
    }
}

/// Counters of an [`ObjectSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectStats {
    /// Ranged GETs started (one per block fetch, not counting `object_store`'s own retries).
    pub gets: u64,
    /// GETs that failed.
    pub get_errors: u64,
    /// Bytes received by successful GETs.
    pub bytes_fetched: u64,
    /// HTTP requests sent on the wire, including HEADs and retries (counted for stores opened
    /// from a URL; 0 for a store passed in).
    pub http_requests: u64,
    /// Block reads served from the cache.
    pub cache_hits: u64,
    /// Block reads that had to fetch (or wait for a fetch).
    pub cache_misses: u64,
    /// Reads that waited for a GET another reader had started.
    pub joined: u64,
    /// Blocks fetched by [`ObjectSource::prefetch`].
    pub prefetched: u64,
    /// Bytes in the cache now.
    pub cached_bytes: u64,
    /// Blocks in the cache now.
    pub cached_blocks: u64,
    /// Blocks evicted from the cache.
    pub evictions: u64,
    /// Most GETs in flight at once.
    pub peak_parallel: u64,
}

/// What [`ObjectSource::prefetch`] did.
#[derive(Debug, Default)]
pub struct PrefetchReport {
    /// Distinct blocks the offsets fell in.
    pub blocks: u64,
    /// Blocks fetched.
    pub fetched: u64,
    /// Blocks already cached.
    pub cached: u64,
    /// Blocks whose GET failed.
    pub failed: u64,
    /// The first failure.
    pub first_error: Option<SourceError>,
}

/// An object in an object store, read in cached blocks. See the [module docs](self).
#[derive(Debug)]
pub struct ObjectSource {
    shared: Arc<Shared>,
    permits: Arc<Permits>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Debug)]
struct Shared {
    name: String,
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    len: u64,
    etag: Option<String>,
    block_size: u64,
    cache: BlockCache,
    /// The cache's data file mapped, when the cache never evicts: cached blocks are then lent
    /// to `UFFDIO_COPY` straight from the page cache ([`PageSource::ptr_at`]).
    map: Option<super::MmapSource>,
    flights: Mutex<HashMap<u64, Arc<Flight>>>,
    counters: Counters,
    /// Block indices in the order their GETs started (the first `FETCH_LOG_MAX`).
    fetch_log: Mutex<Vec<u64>>,
    /// Kept so a private temporary cache root is removed after the cache itself.
    _temp_root: Option<TempRoot>,
}

const FETCH_LOG_MAX: usize = 1 << 16;

#[derive(Debug, Default)]
struct Counters {
    gets: AtomicU64,
    get_errors: AtomicU64,
    bytes_fetched: AtomicU64,
    http_requests: Arc<AtomicU64>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    joined: AtomicU64,
    prefetched: AtomicU64,
    in_flight: AtomicU64,
    peak_parallel: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent; a panic elsewhere must not stop
    // the fault server from reading.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ObjectSource {
    /// Open `url` (`s3://bucket/key`) with `s3` (endpoint, region, credentials; the rest from
    /// `AWS_*` variables). One HEAD request: the object's length and ETag.
    pub fn open_url(
        url: &str,
        s3: &S3Config,
        opts: ObjectSourceOptions,
    ) -> Result<ObjectSource, ObjectError> {
        let (b, path) = s3_builder(url, s3)?;
        let http_requests = Arc::new(AtomicU64::new(0));
        let b = b
            .with_http_connector(Instrumented {
                requests: Arc::clone(&http_requests),
            })
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(20),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: opts.retries,
                retry_timeout: opts.request_timeout,
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", opts.connect_timeout.as_millis().max(1)),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", opts.request_timeout.as_millis().max(1)),
            );
        let store = build_store(url, b)?;
        Self::open_with(Arc::new(store), path, url.to_string(), opts, http_requests)
    }

    /// Read `path` in `store` (any `object_store` backend: GCS, Azure, HTTP, local, memory...),
    /// named `name` in logs and errors. One HEAD request: the object's length and ETag.
    /// (An HTTPS store built by the caller needs a rustls crypto provider installed first:
    /// [`install_crypto_provider`].)
    pub fn open(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        name: impl Into<String>,
        opts: ObjectSourceOptions,
    ) -> Result<ObjectSource, ObjectError> {
        Self::open_with(store, path, name.into(), opts, Arc::new(AtomicU64::new(0)))
    }

    fn open_with(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        name: String,
        opts: ObjectSourceOptions,
        http_requests: Arc<AtomicU64>,
    ) -> Result<ObjectSource, ObjectError> {
        if opts.block_size == 0 || opts.block_size % 4096 != 0 || opts.block_size > 1 << 30 {
            return Err(ObjectError::Options(format!(
                "block size {} is not a multiple of 4096 between 4 KiB and 1 GiB",
                opts.block_size
            )));
        }
        if opts.max_parallel == 0 {
            return Err(ObjectError::Options("max_parallel is 0".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("faultline-object")
            .enable_all()
            .build()
            .map_err(ObjectError::Runtime)?;
        // A HEAD, as `get_opts` so the status slot rides along.
        let status = StatusSlot::default();
        let meta = {
            let (store, path) = (Arc::clone(&store), path.clone());
            let mut o = GetOptions::new();
            o.head = true;
            o.extensions.insert(status.clone());
            run(&runtime, async move {
                store.get_opts(&path, o).await.map(|r| r.meta)
            })
        };
        let meta = match meta {
            Some(Ok(m)) => m,
            Some(Err(source)) => {
                let (retry, what) = classify(&source, status.get());
                return Err(ObjectError::Open {
                    object: name,
                    what: format!("HEAD failed: {what}"),
                    retry,
                    source: Box::new(source),
                });
            }
            None => {
                return Err(ObjectError::Runtime(io::Error::other(
                    "the HEAD request was cancelled",
                )))
            }
        };
        let etag = if opts.pin_etag {
            meta.e_tag.clone()
        } else {
            None
        };
        let (root, temp_root) = match &opts.cache_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = TempRoot::new().map_err(|source| ObjectError::Cache {
                    path: std::env::temp_dir(),
                    source,
                })?;
                (t.0.clone(), Some(t))
            }
        };
        let id = Identity::new(&name, meta.size, meta.e_tag.as_deref(), opts.block_size);
        let cache = BlockCache::open(&root, &id, opts.cache_bytes).map_err(|source| {
            ObjectError::Cache {
                path: root.clone(),
                source,
            }
        })?;
        tracing::debug!(object = %name, len = meta.size, etag = ?meta.e_tag, cache = %cache.dir().display(), "object source opened");
        // Only when nothing is ever evicted: a pointer handed out must not turn into a hole.
        let map = if cache.holds_everything() && meta.size > 0 {
            match super::MmapSource::from_file(cache.data_file()) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::debug!(object = %name, error = %e, "cannot map the cache; reads copy");
                    None
                }
            }
        } else {
            None
        };
        let counters = Counters {
            http_requests,
            ..Counters::default()
        };
        Ok(ObjectSource {
            shared: Arc::new(Shared {
                name,
                store,
                path,
                len: meta.size,
                etag,
                block_size: opts.block_size,
                cache,
                map,
                flights: Mutex::new(HashMap::new()),
                counters,
                fetch_log: Mutex::new(Vec::new()),
                _temp_root: temp_root,
            }),
            permits: Arc::new(Permits::new(opts.max_parallel)),
            runtime: Some(runtime),
        })
    }

    /// The object's ETag when it was opened.
    pub fn etag(&self) -> Option<&str> {
        self.shared.etag.as_deref()
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.shared.block_size
    }

    /// The directory of this object's cache.
    pub fn cache_dir(&self) -> &std::path::Path {
        self.shared.cache.dir()
    }

    /// Counters so far.
    pub fn stats(&self) -> ObjectStats {
        let c = &self.shared.counters;
        let u = self.shared.cache.usage();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ObjectStats {
            gets: get(&c.gets),
            get_errors: get(&c.get_errors),
            bytes_fetched: get(&c.bytes_fetched),
            http_requests: get(&c.http_requests),
            cache_hits: get(&c.cache_hits),
            cache_misses: get(&c.cache_misses),
            joined: get(&c.joined),
            prefetched: get(&c.prefetched),
            cached_bytes: u.bytes,
            cached_blocks: u.blocks,
            evictions: u.evictions,
            peak_parallel: get(&c.peak_parallel),
        }
    }

    /// Block indices in the order their GETs started (the first 65536).
    pub fn fetch_log(&self) -> Vec<u64> {
        lock(&self.shared.fetch_log).clone()
    }

    /// Fetch the blocks holding `offsets` (source offsets, e.g. a recorded working set in
    /// first-touch order) into the cache, in that order, up to `max_parallel` at a time and
    /// always after waiting demand reads. Returns when every block is cached or has failed.
    /// Offsets past the end are ignored.
    pub fn prefetch(&self, offsets: &[u64]) -> PrefetchReport {
        let bs = self.shared.block_size;
        let mut seen = std::collections::HashSet::new();
        let blocks: Vec<u64> = offsets
            .iter()
            .filter(|&&o| o < self.shared.len)
            .map(|&o| o / bs)
            .filter(|b| seen.insert(*b))
            .collect();
        let mut report = PrefetchReport {
            blocks: blocks.len() as u64,
            ..PrefetchReport::default()
        };
        let mut waits = Vec::new();
        for b in blocks {
            // Take the slot first, so a demand read that joins this fetch never waits behind
            // a queued prefetch.
            let permit = self.permits.acquire(Priority::Prefetch);
            match self.start(b, permit, true) {
                Start::Cached => report.cached += 1,
                Start::Joined(f) => waits.push((b, f)),
                Start::Started(f) => {
                    self.shared
                        .counters
                        .prefetched
                        .fetch_add(1, Ordering::Relaxed);
                    report.fetched += 1;
                    waits.push((b, f));
                }
            }
        }
        for (b, f) in waits {
            if let Err(fail) = f.wait() {
                report.failed += 1;
                if report.first_error.is_none() {
                    let (start, end) = self.shared.block_range(b);
                    report.first_error =
                        Some(fail.to_source_error(&self.shared.name, start, end - start));
                }
            }
        }
        report
    }

    /// One offset in each block that the byte ranges `(offset, len)` overlap, in order: what
    /// to hand [`ObjectSource::prefetch`] to fetch whole ranges (an image's working-set chunks,
    /// [`crate::image::ImageSource::working_set_ranges`]) rather than single pages.
    pub fn offsets_of_ranges(&self, ranges: &[(u64, u64)]) -> Vec<u64> {
        let bs = self.shared.block_size;
        let mut out = Vec::new();
        for &(off, len) in ranges {
            let Some(end) = off.checked_add(len).filter(|_| len > 0) else {
                continue;
            };
            out.extend((off / bs..=(end - 1) / bs).map(|b| b.saturating_mul(bs).max(off)));
        }
        out
    }

    /// Run [`ObjectSource::prefetch`] on a thread of its own.
    pub fn prefetch_in_background(
        self: &Arc<Self>,
        offsets: Vec<u64>,
    ) -> io::Result<std::thread::JoinHandle<PrefetchReport>> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("faultline-prefetch".into())
            .spawn(move || {
                let r = me.prefetch(&offsets);
                tracing::info!(object = %me.shared.name, blocks = r.blocks, fetched = r.fetched, cached = r.cached, failed = r.failed, "working set prefetched");
                r
            })
    }

    /// Register a fetch of block `b` holding `permit`, or join the one in flight, or (when
    /// `check_cache`) find it cached. The permit is given back unless a fetch starts.
    fn start(&self, b: u64, permit: Permit, check_cache: bool) -> Start {
        let flight = {
            let mut flights = lock(&self.shared.flights);
            if let Some(f) = flights.get(&b) {
                self.shared.counters.joined.fetch_add(1, Ordering::Relaxed);
                return Start::Joined(Arc::clone(f));
            }
            // Checked under the flights lock: a fetch inserts into the cache before it leaves
            // the table, so a block is never fetched twice by racing readers.
            if check_cache && self.shared.cache.contains(b) {
                return Start::Cached;
            }
            let f = Arc::new(Flight::default());
            flights.insert(b, Arc::clone(&f));
            f
        };
        {
            let mut log = lock(&self.shared.fetch_log);
            if log.len() < FETCH_LOG_MAX {
                log.push(b);
            }
        }
        let done = Completion::new(&self.shared, b, &flight);
        let shared = Arc::clone(&self.shared);
        match &self.runtime {
            Some(rt) => {
                rt.spawn(async move {
                    let result = shared.fetch(b).await;
                    // The GET is over: its slot is free while the block is written locally.
                    drop(permit);
                    // If the runtime is shutting down and this never runs, dropping `done`
                    // still wakes the waiters and retires the flight.
                    let _ = tokio::task::spawn_blocking(move || done.settle(result)).await;
                });
            }
            // Never: the runtime lives as long as `self`. Dropping `done` fails the flight.
            None => drop(done),
        }
        Start::Started(flight)
    }

    /// Block `b`'s bytes for a demand read: from the flight in progress, or a new fetch.
    fn demand(&self, b: u64) -> Start {
        if let Some(f) = lock(&self.shared.flights).get(&b) {
            self.shared.counters.joined.fetch_add(1, Ordering::Relaxed);
            return Start::Joined(Arc::clone(f));
        }
        let permit = self.permits.acquire(Priority::Demand);
        self.start(b, permit, true)
    }
}

impl Drop for ObjectSource {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Inside another runtime, waiting is not allowed: fetches in flight are
                // abandoned (their tasks keep the cache alive until they are dropped).
                rt.shutdown_background();
            } else {
                // Waits for the I/O threads, so the tasks' references to the cache are gone and
                // the cache directory is free for the next source when this returns.
                rt.shutdown_timeout(Duration::from_secs(5));
            }
        }
        if let Err(e) = self.shared.cache.commit() {
            tracing::warn!(object = %self.shared.name, error = %e, "cannot commit cached blocks; they will be fetched again");
        }
    }
}

enum Start {
    Cached,
    Joined(Arc<Flight>),
    Started(Arc<Flight>),
}

impl Shared {
    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.block_size;
        (start, start + block_len(b, self.block_size, self.len))
    }

    /// One ranged GET of block `b`.
    async fn fetch(&self, b: u64) -> Result<Bytes, Arc<FetchFailure>> {
        let (start, end) = self.block_range(b);
        let c = &self.counters;
        c.gets.fetch_add(1, Ordering::Relaxed);
        let now = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak_parallel.fetch_max(now, Ordering::Relaxed);
        let status = StatusSlot::default();
        let mut o = GetOptions::new().with_range(Some(start..end));
        if let Some(e) = &self.etag {
            o = o.with_if_match(Some(e.clone()));
        }
        o.extensions.insert(status.clone());
        let got = match self.store.get_opts(&self.path, o).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        c.in_flight.fetch_sub(1, Ordering::Relaxed);
        let fail = |retry, what: String, cause| {
            c.get_errors.fetch_add(1, Ordering::Relaxed);
            Err(Arc::new(FetchFailure {
                start,
                end,
                retry,
                what,
                cause,
            }))
        };
        match got {
            Ok(bytes) if bytes.len() as u64 == end - start => {
                c.bytes_fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes)
            }
            Ok(bytes) => fail(
                Retry::Retryable,
                format!("the store sent {} bytes", bytes.len()),
                None,
            ),
            Err(e) => {
                let (retry, what) = classify(&e, status.get());
                tracing::debug!(object = %self.name, start, end, error = %e, ?retry, "GET failed");
                fail(retry, what, Some(Arc::new(e)))
            }
        }
    }
}

impl PageSource for ObjectSource {
    /// Commit the cache's pending blocks (waiting for a commit already under way).
    fn flush(&self) -> io::Result<()> {
        self.shared.cache.commit()
    }

    fn len(&self) -> u64 {
        self.shared.len
    }

    fn name(&self) -> String {
        self.shared.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let sh = &self.shared;
        let len = buf.len() as u64;
        check_bounds(&sh.name, offset, len, sh.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = sh.block_size;
        let end = offset + len;
        let mut waits: Vec<(u64, Arc<Flight>)> = Vec::new();
        // Offsets inside `buf` or inside one block's bytes: below their lengths, a usize.
        let at_buf = |x: u64| usize::try_from(x).expect("inside a buffer in memory");
        for b in offset / bs..end.div_ceil(bs) {
            let (bstart, bend) = sh.block_range(b);
            let (lo, hi) = (offset.max(bstart), end.min(bend));
            let dst = &mut buf[at_buf(lo - offset)..at_buf(hi - offset)];
            // A block found cached but evicted before it could be read is looked up again; a
            // cache that keeps losing it (a limit below the working set) is bypassed.
            let mut attempts = 0;
            loop {
                match sh.cache.read(b, lo - bstart, dst) {
                    Ok(true) => {
                        sh.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(object = %sh.name, block = b, error = %e, "reading the cache failed; fetching");
                    }
                }
                attempts += 1;
                let start = if attempts > 2 {
                    // Found cached and lost twice: fetch regardless of the cache.
                    let permit = self.permits.acquire(Priority::Demand);
                    self.start(b, permit, false)
                } else {
                    self.demand(b)
                };
                match start {
                    Start::Cached => continue,
                    Start::Joined(f) | Start::Started(f) => {
                        sh.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                        waits.push((b, f));
                        break;
                    }
                }
            }
        }
        for (b, f) in waits {
            let (bstart, bend) = sh.block_range(b);
            let (lo, hi) = (offset.max(bstart), end.min(bend));
            let bytes = f
                .wait()
                .map_err(|fail| fail.to_source_error(&sh.name, offset, len))?;
            buf[at_buf(lo - offset)..at_buf(hi - offset)]
                .copy_from_slice(&bytes[at_buf(lo - bstart)..at_buf(hi - bstart)]);
        }
        Ok(())
    }

    /// For cached blocks when the cache may hold the whole object (it then never evicts, so the
    /// bytes stay where the pointer points): the mapped cache file.
    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        let sh = &self.shared;
        let map = sh.map.as_ref()?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= sh.len && len > 0)?;
        let blocks = offset / sh.block_size..end.div_ceil(sh.block_size);
        if !blocks.clone().all(|b| sh.cache.is_ready(b)) {
            return None;
        }
        sh.counters
            .cache_hits
            .fetch_add(blocks.end - blocks.start, Ordering::Relaxed);
        map.ptr_at(offset, len)
    }

    /// Known for cached blocks (their zero pages are noted when they are fetched); `None` when
    /// any block of the range is not cached and none is known to hold data there.
    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        let sh = &self.shared;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= sh.len && len > 0)?;
        let mut all_known = true;
        for b in offset / sh.block_size..end.div_ceil(sh.block_size) {
            let (bstart, bend) = sh.block_range(b);
            let (lo, hi) = (offset.max(bstart), end.min(bend));
            match sh.cache.is_zero(b, lo - bstart, hi - lo) {
                Some(false) => return Some(false),
                Some(true) => {}
                None => all_known = false,
            }
        }
        all_known.then_some(true)
    }
}

/// An image can live in an object store: [`Image::from_reader`](crate::image::Image::from_reader)
/// reads its header, tables and chunks through the same blocks and cache.
#[cfg(feature = "image")]
impl crate::image::RangeRead for ObjectSource {
    fn flush(&self) -> io::Result<()> {
        self.shared.cache.commit()
    }

    fn len(&self) -> u64 {
        self.shared.len
    }

    fn name(&self) -> String {
        self.shared.name.clone()
    }

    /// Past the end is `UnexpectedEof`; a retryable failure is `TimedOut` (which
    /// [`SourceError::from_io`] retries); the [`SourceError`] is the payload.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let inside = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.shared.len);
        if !inside {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                SourceError::out_of_range(
                    &self.shared.name,
                    offset,
                    buf.len() as u64,
                    self.shared.len,
                ),
            ));
        }
        PageSource::read_at(self, offset, buf).map_err(|e| {
            let kind = match e.retry {
                Retry::Retryable => io::ErrorKind::TimedOut,
                Retry::Permanent => io::ErrorKind::Other,
            };
            io::Error::new(kind, e)
        })
    }
}
