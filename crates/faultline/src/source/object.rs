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

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    RetryConfig,
};

use super::{check_bounds, PageSource, Retry, SourceError};

mod cache;
mod tls;

use cache::{block_len, BlockCache, Identity};
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

/// Where and how to reach an S3-compatible store. Anything left `None` comes from the usual
/// `AWS_*` environment variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, ...), then from
/// `object_store`'s defaults (AWS itself, region us-east-1, instance credentials).
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for a local server (path-style requests).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token.
    pub session_token: Option<String>,
    /// Allow plain HTTP. Default: true when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
}

/// A failure to open an object source.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The URL is not one this source can open.
    #[error("object URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The store could not be configured.
    #[error("configuring the object store for {url}")]
    Config {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object could not be opened (its HEAD failed).
    #[error("opening {object}: {what}")]
    Open {
        /// The object.
        object: String,
        /// What went wrong (the HTTP status when known).
        what: String,
        /// Whether trying again may help.
        retry: Retry,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object could not be stored ([`put_object`]).
    #[error("storing {object}: {what}")]
    Put {
        /// The object.
        object: String,
        /// What went wrong.
        what: String,
        /// Whether trying again may help.
        retry: Retry,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Bad options.
    #[error("invalid object source options: {0}")]
    Options(String),
    /// The cache directory could not be set up.
    #[error("setting up the cache directory {path}")]
    Cache {
        /// The cache root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The I/O runtime could not be started.
    #[error("starting the object store I/O threads")]
    Runtime(#[source] io::Error),
}

impl ObjectError {
    /// Whether trying again may help (the store was unreachable or answered 5xx).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ObjectError::Open {
                retry: Retry::Retryable,
                ..
            } | ObjectError::Put {
                retry: Retry::Retryable,
                ..
            }
        )
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
        for b in offset / bs..end.div_ceil(bs) {
            let (bstart, bend) = sh.block_range(b);
            let (lo, hi) = (offset.max(bstart), end.min(bend));
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
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
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&bytes[(lo - bstart) as usize..(hi - bstart) as usize]);
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

/// A failed GET, shared by every reader that waited for it.
#[derive(Debug)]
struct FetchFailure {
    start: u64,
    end: u64,
    retry: Retry,
    what: String,
    cause: Option<Arc<object_store::Error>>,
}

impl FetchFailure {
    fn to_source_error(&self, name: &str, offset: u64, len: u64) -> SourceError {
        let kind = match self.retry {
            Retry::Retryable => io::ErrorKind::TimedOut,
            Retry::Permanent => io::ErrorKind::Other,
        };
        SourceError {
            offset,
            len,
            source_name: name.to_string(),
            what: format!(
                "ranged GET of bytes {:#x}..{:#x} failed: {}",
                self.start, self.end, self.what
            ),
            retry: self.retry,
            cause: self
                .cause
                .as_ref()
                .map(|c| io::Error::new(kind, SharedCause(Arc::clone(c)))),
        }
    }
}

/// An `object_store` error shared between waiters, as an `io::Error` payload.
#[derive(Debug)]
struct SharedCause(Arc<object_store::Error>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// Whether an `object_store` error may go away, and a short description (without the error's
/// own text, which stays the `#[source]`). `status` is the HTTP status seen on the wire, if any.
fn classify(e: &object_store::Error, status: Option<u16>) -> (Retry, String) {
    use object_store::Error as E;
    let described = match e {
        E::NotFound { .. } => Some((Retry::Permanent, "object not found")),
        E::PermissionDenied { .. } => Some((Retry::Permanent, "permission denied")),
        E::Unauthenticated { .. } => Some((Retry::Permanent, "not authenticated")),
        E::Precondition { .. } => Some((
            Retry::Permanent,
            "the object changed since it was opened (its ETag no longer matches)",
        )),
        E::NotModified { .. } => Some((Retry::Permanent, "not modified")),
        E::InvalidPath { .. } => Some((Retry::Permanent, "invalid path")),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            Some((Retry::Permanent, "operation not supported by the store"))
        }
        E::UnknownConfigurationKey { .. } => Some((Retry::Permanent, "bad configuration")),
        E::AlreadyExists { .. } => Some((Retry::Permanent, "already exists")),
        E::JoinError { .. } => Some((Retry::Retryable, "task failed")),
        _ => None,
    };
    match status.filter(|s| !(200..300).contains(s)) {
        Some(s) => {
            let retry = match s {
                408 | 429 | 500..=599 => Retry::Retryable,
                _ => Retry::Permanent,
            };
            let what = match (s, described) {
                (416, _) => "range not satisfiable (the object is shorter than it was)".to_string(),
                (_, Some((_, d))) => d.to_string(),
                (500..=599, None) => "server error".to_string(),
                (408 | 429, None) => "throttled or timed out".to_string(),
                _ => "request refused".to_string(),
            };
            (retry, format!("{what} (HTTP {s})"))
        }
        None => match described {
            Some((r, d)) => (r, d.to_string()),
            None => match http_error_kind(e) {
                Some(kind) => (Retry::Retryable, format!("network error ({kind:?})")),
                // Nothing says it is permanent: let the caller retry a few times.
                None => (Retry::Retryable, "store error".to_string()),
            },
        },
    }
}

/// The transport error kind in `e`'s source chain, if the failure was a transport one.
fn http_error_kind(e: &object_store::Error) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

/// The S3 store of `url` (`s3://bucket/key`) configured from `s3`, then the `AWS_*` variables,
/// and the object's path in it.
fn s3_builder(url: &str, s3: &S3Config) -> Result<(AmazonS3Builder, ObjectPath), ObjectError> {
    let (bucket, key) = parse_s3_url(url)?;
    let path = ObjectPath::parse(key).map_err(|e| ObjectError::Url {
        url: url.to_string(),
        why: format!("invalid key: {e}"),
    })?;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    if let Some(t) = &s3.session_token {
        b = b.with_token(t);
    }
    let http_endpoint = s3
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    if let Some(allow) = s3.allow_http.or(http_endpoint.then_some(true)) {
        b = b.with_allow_http(allow);
    }
    Ok((b, path))
}

/// Build the store configured for `url`, naming it in the error.
fn build_store(url: &str, b: AmazonS3Builder) -> Result<object_store::aws::AmazonS3, ObjectError> {
    install_crypto_provider();
    b.build().map_err(|source| ObjectError::Config {
        url: url.to_string(),
        source: Box::new(source),
    })
}

/// Store `bytes` as the object at `url` (`s3://bucket/key`), replacing any object there: one
/// PUT, or a multipart upload of 64 MiB parts for larger objects. Returns the new ETag.
pub fn put_object(url: &str, s3: &S3Config, bytes: Bytes) -> Result<Option<String>, ObjectError> {
    let (b, path) = s3_builder(url, s3)?;
    let store = build_store(url, b)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ObjectError::Runtime)?;
    const PART: usize = 64 << 20;
    let put = rt.block_on(async {
        if bytes.len() <= PART {
            return store
                .put(&path, object_store::PutPayload::from(bytes))
                .await
                .map(|r| r.e_tag);
        }
        let mut upload = store.put_multipart(&path).await?;
        for part in bytes.chunks(PART) {
            upload
                .put_part(object_store::PutPayload::from(bytes.slice_ref(part)))
                .await?;
        }
        upload.complete().await.map(|r| r.e_tag)
    });
    put.map_err(|source| {
        let (retry, what) = classify(&source, None);
        ObjectError::Put {
            object: url.to_string(),
            what,
            retry,
            source: Box::new(source),
        }
    })
}

/// Parse `s3://bucket/key` (`s3a://` too).
fn parse_s3_url(url: &str) -> Result<(&str, &str), ObjectError> {
    let bad = |why: &str| ObjectError::Url {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = url
        .strip_prefix("s3://")
        .or_else(|| url.strip_prefix("s3a://"))
        .ok_or_else(|| bad("expected s3://bucket/key"))?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| bad("no key after the bucket"))?;
    if bucket.is_empty() {
        return Err(bad("empty bucket name"));
    }
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    Ok((bucket, key))
}

/// Run `fut` on `rt` and wait for it from this (non-async) thread. `None` if it was cancelled.
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// One block fetch in progress; readers wait on it.
#[derive(Debug, Default)]
struct Flight {
    result: Mutex<Option<Result<Bytes, Arc<FetchFailure>>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<Bytes, Arc<FetchFailure>> {
        let mut r = lock(&self.result);
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            r = self.done.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Finishes a flight: caches the block, wakes its waiters with the result, removes the flight
/// from the table (so a read that returns has put its block in the cache, and a reader that
/// misses the cache finds the flight until then), and finally, off everyone's path, commits a
/// batch of cached blocks to disk when one is due. If the fetch task is dropped before it
/// finishes (the runtime shut down), the waiters get an error and the flight is removed all the
/// same.
struct Completion {
    shared: Arc<Shared>,
    block: u64,
    flight: Arc<Flight>,
    woke: bool,
    removed: bool,
}

impl Completion {
    fn new(shared: &Arc<Shared>, block: u64, flight: &Arc<Flight>) -> Completion {
        Completion {
            shared: Arc::clone(shared),
            block,
            flight: Arc::clone(flight),
            woke: false,
            removed: false,
        }
    }

    fn wake(&mut self, result: Result<Bytes, Arc<FetchFailure>>) {
        self.woke = true;
        *lock(&self.flight.result) = Some(result);
        self.flight.done.notify_all();
    }

    /// Blocking file I/O: run it where blocking is allowed.
    fn settle(mut self, result: Result<Bytes, Arc<FetchFailure>>) {
        let sh = Arc::clone(&self.shared);
        let mut commit_due = false;
        if let Ok(bytes) = &result {
            match sh.cache.insert(self.block, bytes) {
                Ok(due) => commit_due = due,
                Err(e) => {
                    tracing::warn!(object = %sh.name, block = self.block, error = %e, "cannot write a block to the cache");
                }
            }
        }
        self.wake(result);
        self.remove();
        drop(self);
        if commit_due {
            if let Err(e) = sh.cache.commit() {
                tracing::warn!(object = %sh.name, error = %e, "cannot commit cached blocks; a restart fetches them again");
            }
        }
    }

    fn remove(&mut self) {
        self.removed = true;
        lock(&self.shared.flights).remove(&self.block);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.woke {
            let (start, end) = self.shared.block_range(self.block);
            self.wake(Err(Arc::new(FetchFailure {
                start,
                end,
                retry: Retry::Retryable,
                what: "the fetch was cancelled (the source is shutting down)".into(),
                cause: None,
            })));
        }
        if !self.removed {
            self.remove();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    Demand,
    Prefetch,
}

/// A counting semaphore on which demand readers go before prefetch.
#[derive(Debug)]
struct Permits {
    state: Mutex<PermitState>,
    freed: Condvar,
}

#[derive(Debug)]
struct PermitState {
    free: usize,
    demand_waiting: usize,
    /// Everyone waiting, demand and prefetch.
    waiting: usize,
}

impl Permits {
    fn new(n: usize) -> Permits {
        Permits {
            state: Mutex::new(PermitState {
                free: n,
                demand_waiting: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn acquire(self: &Arc<Self>, p: Priority) -> Permit {
        let mut st = lock(&self.state);
        if p == Priority::Demand {
            st.demand_waiting += 1;
        }
        st.waiting += 1;
        loop {
            let ready = st.free > 0 && (p == Priority::Demand || st.demand_waiting == 0);
            if ready {
                break;
            }
            st = self.freed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.free -= 1;
        st.waiting -= 1;
        if p == Priority::Demand {
            st.demand_waiting -= 1;
        }
        Permit(Arc::clone(self))
    }
}

/// One GET slot, given back when dropped.
#[derive(Debug)]
struct Permit(Arc<Permits>);

impl Drop for Permit {
    fn drop(&mut self) {
        lock(&self.0.state).free += 1;
        self.0.freed.notify_all();
    }
}

/// Where the HTTP client writes the final status of a request (object_store passes a GET's
/// extensions on to its HTTP request, retries included).
#[derive(Debug, Clone, Default)]
struct StatusSlot(Arc<std::sync::atomic::AtomicU16>);

impl StatusSlot {
    fn get(&self) -> Option<u16> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s),
        }
    }
}

/// The reqwest connector, counting requests and recording each response's status.
#[derive(Debug)]
struct Instrumented {
    requests: Arc<AtomicU64>,
}

impl HttpConnector for Instrumented {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(InstrumentedService {
            inner,
            requests: Arc::clone(&self.requests),
        }))
    }
}

#[derive(Debug)]
struct InstrumentedService {
    inner: HttpClient,
    requests: Arc<AtomicU64>,
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl HttpService for InstrumentedService {
    // The `async_trait` shape of `HttpService::call`, written out.
    fn call<'s, 'f>(&'s self, req: HttpRequest) -> BoxFuture<'f, Result<HttpResponse, HttpError>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let slot = req.extensions().get::<StatusSlot>().cloned();
            let r = self.inner.execute(req).await;
            if let (Some(slot), Ok(resp)) = (slot, &r) {
                slot.0.store(resp.status().as_u16(), Ordering::Relaxed);
            }
            r
        })
    }
}

/// A private cache root under the temporary directory, removed on drop.
#[derive(Debug)]
struct TempRoot(PathBuf);

impl TempRoot {
    fn new() -> io::Result<TempRoot> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("faultline-object-cache-{}-{n}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
        std::fs::create_dir_all(&p)?;
        Ok(TempRoot(p))
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use object_store::client::HttpErrorKind;

    fn generic(source: Box<dyn std::error::Error + Send + Sync>) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source,
        }
    }

    #[test]
    fn statuses_decide_retry() {
        let e = generic("x".into());
        for (s, want) in [
            (500, Retry::Retryable),
            (503, Retry::Retryable),
            (429, Retry::Retryable),
            (408, Retry::Retryable),
            (416, Retry::Permanent),
            (400, Retry::Permanent),
            (403, Retry::Permanent),
        ] {
            let (r, what) = classify(&e, Some(s));
            assert_eq!(r, want, "{s}");
            assert!(what.contains(&format!("HTTP {s}")), "{what}");
        }
        assert!(classify(&e, Some(416)).1.contains("range not satisfiable"));
        // A success status with a failed body read is a transport problem, not the status.
        let body = generic(Box::new(HttpError::new(
            HttpErrorKind::Decode,
            io::Error::other("cut"),
        )));
        assert_eq!(classify(&body, Some(206)).0, Retry::Retryable);
    }

    #[test]
    fn typed_errors_decide_retry_without_a_status() {
        let nf = object_store::Error::NotFound {
            path: "k".into(),
            source: "x".into(),
        };
        assert_eq!(
            classify(&nf, None),
            (Retry::Permanent, "object not found".into())
        );
        let pd = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "x".into(),
        };
        assert_eq!(classify(&pd, None).0, Retry::Permanent);
        assert!(classify(&nf, Some(404))
            .1
            .contains("object not found (HTTP 404)"));
        let net = generic(Box::new(HttpError::new(
            HttpErrorKind::Connect,
            io::Error::other("refused"),
        )));
        let (r, what) = classify(&net, None);
        assert_eq!(r, Retry::Retryable);
        assert_eq!(what, "network error (Connect)");
        // Unknown: retryable (a few retries cost little; a wrong "permanent" poisons a page).
        assert_eq!(classify(&generic("odd".into()), None).0, Retry::Retryable);
    }

    #[test]
    fn s3_urls_are_parsed() {
        assert_eq!(parse_s3_url("s3://b/k/x.img").unwrap(), ("b", "k/x.img"));
        assert_eq!(parse_s3_url("s3a://b/k").unwrap(), ("b", "k"));
        for bad in ["http://b/k", "s3://b", "s3:///k", "s3://b/"] {
            let e = parse_s3_url(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn failures_become_source_errors_naming_object_and_range() {
        let f = FetchFailure {
            start: 0x100000,
            end: 0x200000,
            retry: Retry::Permanent,
            what: "object not found (HTTP 404)".into(),
            cause: Some(Arc::new(object_store::Error::NotFound {
                path: "k".into(),
                source: "x".into(),
            })),
        };
        let e = f.to_source_error("s3://b/k", 0x101000, 4096);
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("s3://b/k"), "{msg}");
        assert!(msg.contains("0x100000..0x200000"), "{msg}");
        assert!(msg.contains("HTTP 404"), "{msg}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn demand_goes_before_prefetch() {
        let p = Arc::new(Permits::new(1));
        let held = p.acquire(Priority::Demand);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let (p1, tx1) = (Arc::clone(&p), tx.clone());
            s.spawn(move || {
                let _g = p1.acquire(Priority::Prefetch);
                tx1.send("prefetch").unwrap();
            });
            // Wait until the prefetcher is queued (it cannot get the held slot)...
            while lock(&p.state).waiting == 0 {
                std::thread::yield_now();
            }
            let (p2, tx2) = (Arc::clone(&p), tx);
            s.spawn(move || {
                let _g = p2.acquire(Priority::Demand);
                tx2.send("demand").unwrap();
            });
            // ...and the demand reader too.
            while lock(&p.state).demand_waiting == 0 {
                std::thread::yield_now();
            }
            drop(held);
        });
        let order: Vec<_> = rx.iter().collect();
        assert_eq!(order, ["demand", "prefetch"]);
    }
}
