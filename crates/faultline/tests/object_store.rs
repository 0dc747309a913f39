//! `ObjectSource` against a real S3-compatible server: moto's `moto_server` (PyPI
//! `moto[server]`, installed by `.ci/run`), started by each test on a free loopback port.
//! Tests print `skipped: ...` and pass when `moto_server` is not installed. Tests that leave the
//! server running share one (each with its own keys); tests that kill it start their own.
#![allow(unsafe_code)] // pre_exec: the server dies with the test process
#![allow(clippy::unwrap_used)] // unwrap_err is how a test expects an error

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use faultline::source::object::PrefetchReport;
use faultline::source::{
    ObjectError, ObjectSource, ObjectSourceOptions, PageSource, Retry, S3Config,
};
use faultline::{Region, Server, ServerConfig, SessionOptions};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const BUCKET: &str = "faultline-test";
const KIB: u64 = 1024;

/// A `moto_server` process on a loopback port, killed when dropped.
struct Moto {
    child: Option<Child>,
    port: u16,
    exe: PathBuf,
}

fn find_moto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
}

/// A private S3 server, or `None` (and a printed skip line) when `moto_server` is not installed.
fn moto(test: &str) -> Option<Moto> {
    let Some(exe) = find_moto() else {
        faultline_testing::skip(
            test,
            "moto_server not found on PATH (pip install 'moto[server]')",
        );
        return None;
    };
    // A port that was free a moment ago; moto binds it. Retried if someone took it meanwhile.
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut m = Moto {
            child: None,
            port,
            exe: exe.clone(),
        };
        if m.start().is_ok() {
            return Some(m);
        }
    }
    panic!("moto_server did not start on any of 5 ports");
}

/// The server shared by tests that do not stop it. It is started by a thread that lives as long
/// as the test process, so the parent-death signal kills it when the process exits.
fn shared_moto(test: &str) -> Option<&'static Moto> {
    static SHARED: OnceLock<Option<Moto>> = OnceLock::new();
    let m = SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(moto("shared S3 server"));
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the keeper thread answers")
    });
    if m.is_none() {
        faultline_testing::skip(test, "no moto_server");
    }
    m.as_ref()
}

impl Moto {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start the server on `self.port`, wait until it listens, create the bucket.
    fn start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the hook runs in the forked child before exec and only makes one prctl(2)
        // system call, which is async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(|| {
                // Killed if the thread that started it ends (or the whole test process dies),
                // so no server outlives the tests.
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning moto_server: {e}"))?;
        // Ready when it logs its address; its stderr is drained for the rest of its life (a full
        // pipe would stall it).
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Running on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(30));
        self.child = Some(child);
        if ready.is_err() {
            self.kill();
            return Err(format!("moto_server did not come up on port {}", self.port));
        }
        self.http("PUT", &format!("/{BUCKET}"))
            .map_err(|e| format!("creating the bucket: {e}"))?;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A bodiless request; the status line must say 200.
    fn http(&self, method: &str, path: &str) -> std::io::Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(std::io::Error::other(
                resp.lines().next().unwrap_or("").to_string(),
            ))
        }
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        // A store built here, not by faultline, needs the one TLS provider installed first.
        faultline::source::object::install_crypto_provider();
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(BUCKET)
                .with_endpoint(self.endpoint())
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_allow_http(true)
                .build()
                .expect("store"),
        )
    }

    /// Upload `bytes` as `key` with object_store's put.
    fn put(&self, key: &str, bytes: &[u8]) {
        let store = self.store();
        let (key, bytes) = (ObjectPath::from(key), bytes.to_vec());
        block_on(async move { store.put(&key, PutPayload::from(bytes)).await }).expect("put");
    }

    fn delete(&self, key: &str) {
        let store = self.store();
        let key = ObjectPath::from(key);
        block_on(async move { store.delete(&key).await }).expect("delete");
    }

    fn s3(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            ..S3Config::default()
        }
    }

    fn url(key: &str) -> String {
        format!("s3://{BUCKET}/{key}")
    }

    fn open(&self, key: &str, opts: ObjectSourceOptions) -> Result<ObjectSource, ObjectError> {
        ObjectSource::open_url(&Self::url(key), &self.s3(), opts)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Deterministic, incompressible, never-zero-page bytes.
/// A test offset or length as an index.
fn ix(x: u64) -> usize {
    usize::try_from(x).expect("a test size fits usize")
}

fn object_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

fn opts(block: u64, cache: &tempfile::TempDir) -> ObjectSourceOptions {
    ObjectSourceOptions {
        block_size: block,
        cache_dir: Some(cache.path().to_path_buf()),
        retries: 0,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        ..ObjectSourceOptions::default()
    }
}

fn read(src: &ObjectSource, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; ix(len)];
    src.read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
    buf
}

#[test]
fn reads_equal_the_uploaded_object_at_random_unaligned_ranges() {
    let Some(s3) = shared_moto("reads_equal_the_uploaded_object_at_random_unaligned_ranges") else {
        return;
    };
    let block = 256 * KIB;
    let len = 20 * block + 1234; // the last block is short
    let data = object_bytes(len, 1);
    s3.put("snap/mem.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    let src = s3.open("snap/mem.raw", opts(block, &cache)).expect("open");
    assert_eq!(src.len(), len);
    // The cache may hold it all, so cached blocks are lent by pointer; uncached ones are not.
    assert_eq!(src.ptr_at(0, 4096), None);
    assert_eq!(read(&src, 0, 1), data[..1]);
    let p = src.ptr_at(4096, 4096).expect("a cached block is lent");
    // SAFETY: `ptr_at` promises 4096 readable bytes at `p` while `src` lives; nothing writes
    // block 0 of the cache again (it never evicts: its limit exceeds the object).
    let lent = unsafe { std::slice::from_raw_parts(p, 4096) };
    assert_eq!(lent, &data[4096..8192]);
    assert_eq!(
        src.ptr_at(block - 4096, 8192),
        None,
        "block 1 is not cached"
    );
    assert_eq!(src.name(), "s3://faultline-test/snap/mem.raw");
    assert!(src.etag().is_some());
    let mut x: u64 = 0x1234_5678;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for i in 0..300 {
        let offset = next(len);
        // Mostly small reads, some spanning several blocks.
        let max = if i % 10 == 0 { 3 * block } else { 20 * KIB };
        let n = 1 + next(max.min(len - offset));
        assert_eq!(
            read(&src, offset, n),
            data[ix(offset)..ix(offset + n)],
            "range {offset}+{n}"
        );
    }
    // Exactly across a block boundary, the short tail, and the whole object.
    assert_eq!(read(&src, block - 1, 2), data[ix(block) - 1..ix(block) + 1]);
    assert_eq!(read(&src, len - 1234, 1234), data[ix(len - 1234)..]);
    assert_eq!(read(&src, 0, len), data);
    // Past the end: permanent, no request.
    let before = src.stats().http_requests;
    let e = src.read_at(len - 10, &mut [0u8; 11]).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent);
    let st = src.stats();
    assert_eq!(st.http_requests, before);
    // Every block was fetched exactly once: one HEAD plus one GET per block.
    assert_eq!(st.gets, 21, "{st:?}");
    assert_eq!(st.http_requests, 22, "{st:?}");
    assert_eq!(st.bytes_fetched, len);
    assert_eq!(st.get_errors, 0);
    assert_eq!(st.cached_blocks, 21);
}

#[test]
fn eight_threads_read_concurrently_and_each_block_is_fetched_once() {
    let Some(s3) = shared_moto("eight_threads_read_concurrently_and_each_block_is_fetched_once")
    else {
        return;
    };
    let block = 128 * KIB;
    let len = 32 * block;
    let data = Arc::new(object_bytes(len, 2));
    s3.put("c.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    let src = Arc::new(
        s3.open(
            "c.raw",
            ObjectSourceOptions {
                max_parallel: 4,
                ..opts(block, &cache)
            },
        )
        .expect("open"),
    );
    let barrier = Arc::new(Barrier::new(8));
    let pages = len / PAGE_SIZE as u64;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (src, data, barrier) = (&src, &data, &barrier);
            s.spawn(move || {
                barrier.wait();
                // Each thread walks every page, starting at a different place, so threads
                // collide on blocks being fetched.
                for i in 0..pages {
                    let p = (i * 7 + t * pages / 8) % pages;
                    let off = p * PAGE_SIZE as u64;
                    assert_eq!(
                        read(src, off, PAGE_SIZE as u64),
                        data[ix(off)..ix(off) + PAGE_SIZE],
                        "thread {t} page {p}"
                    );
                }
            });
        }
    });
    let st = src.stats();
    assert_eq!(
        st.gets, 32,
        "one GET per block however many readers: {st:?}"
    );
    assert_eq!(st.get_errors, 0);
    assert!(st.peak_parallel <= 4, "{st:?}");
    assert_eq!(st.cache_hits + st.cache_misses, 8 * pages);
}

#[test]
fn a_cached_block_is_read_without_the_network_even_by_the_next_process() {
    let Some(mut s3) = moto("a_cached_block_is_read_without_the_network_even_by_the_next_process")
    else {
        return;
    };
    let block = 256 * KIB;
    let len = 8 * block;
    let data = object_bytes(len, 3);
    s3.put("w.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    {
        let src = s3.open("w.raw", opts(block, &cache)).expect("open");
        assert_eq!(src.stats().http_requests, 1, "the HEAD");
        assert_eq!(read(&src, 5000, 100), data[5000..5100]);
        let st = src.stats();
        assert_eq!((st.gets, st.http_requests, st.cache_misses), (1, 2, 1));
        // Another page of the same block, and the same page again: the cache.
        assert_eq!(read(&src, 200 * KIB, 4096), data[200 * 1024..204 * 1024]);
        assert_eq!(read(&src, 5000, 100), data[5000..5100]);
        let st = src.stats();
        assert_eq!((st.gets, st.http_requests, st.cache_hits), (1, 2, 2));
        // Warm three more blocks.
        assert_eq!(read(&src, block, 3 * block), data[ix(block)..4 * ix(block)]);
        assert_eq!(src.stats().gets, 4);
    }
    // A new source on the same cache directory (a restarted worker) finds the blocks warm: its
    // only request is the HEAD.
    let src = s3.open("w.raw", opts(block, &cache)).expect("reopen");
    assert_eq!(read(&src, 0, 4 * block), data[..4 * ix(block)]);
    let st = src.stats();
    assert_eq!(
        (st.gets, st.http_requests, st.cache_hits),
        (0, 1, 4),
        "{st:?}"
    );
    // With the server gone, cached blocks are still served; others fail.
    s3.kill();
    assert_eq!(
        read(&src, 2 * block + 17, 9000),
        data[2 * ix(block) + 17..][..9000]
    );
    assert!(src.read_at(6 * block, &mut [0u8; 1]).is_err());
    let st = src.stats();
    assert_eq!(
        (st.gets, st.get_errors, st.http_requests),
        (1, 1, 2),
        "{st:?}"
    );
}

#[test]
fn the_cache_size_limit_evicts_least_recently_used_blocks() {
    use std::os::unix::fs::MetadataExt;
    let Some(s3) = shared_moto("the_cache_size_limit_evicts_least_recently_used_blocks") else {
        return;
    };
    let block = 128 * KIB;
    let len = 10 * block;
    let data = object_bytes(len, 4);
    s3.put("e.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    let src = s3
        .open(
            "e.raw",
            ObjectSourceOptions {
                cache_bytes: 3 * block,
                ..opts(block, &cache)
            },
        )
        .expect("open");
    for b in 0..3 {
        read(&src, b * block, 10);
    }
    // A cache that evicts never lends pointers (an evicted block becomes a hole).
    assert_eq!(src.ptr_at(0, 4096), None);
    read(&src, 0, 10); // block 0 is now the most recent; block 1 the oldest
    read(&src, 3 * block, 10); // evicts block 1
    let st = src.stats();
    assert_eq!(
        (st.gets, st.evictions, st.cached_blocks),
        (4, 1, 3),
        "{st:?}"
    );
    assert_eq!(st.cached_bytes, 3 * block);
    // Blocks 0, 2 and 3 are hits; block 1 is fetched again.
    for b in [0, 2, 3] {
        assert_eq!(read(&src, b * block + 1, 7), data[ix(b * block + 1)..][..7]);
    }
    assert_eq!(src.stats().gets, 4);
    assert_eq!(read(&src, block + 5, 5), data[ix(block) + 5..][..5]);
    assert_eq!(src.stats().gets, 5);
    // The whole object streamed through a 3-block cache: always within the limit, on disk too.
    assert_eq!(read(&src, 0, len), data);
    let st = src.stats();
    assert!(st.cached_bytes <= 3 * block, "{st:?}");
    let on_disk = std::fs::metadata(src.cache_dir().join("data"))
        .expect("cache data file")
        .blocks()
        * 512;
    assert!(
        on_disk <= 4 * block,
        "{on_disk} bytes allocated for a 3-block cache"
    );
}

#[test]
fn prefetch_fetches_the_working_set_blocks_first() {
    let Some(s3) = shared_moto("prefetch_fetches_the_working_set_blocks_first") else {
        return;
    };
    let block = 64 * KIB;
    let len = 16 * block;
    let data = object_bytes(len, 5);
    s3.put("ws.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    // One GET at a time, so the order GETs start in is the order they were asked for.
    let src = s3
        .open(
            "ws.raw",
            ObjectSourceOptions {
                max_parallel: 1,
                ..opts(block, &cache)
            },
        )
        .expect("open");
    // A working set in first-touch order: pages of blocks 7, 2, 9, 2 (again), 4, then an
    // offset past the end (ignored).
    let ws: Vec<u64> = [
        7 * block + 4096,
        2 * block,
        9 * block + 8192,
        2 * block + 4096,
        4 * block,
        len + 4096,
    ]
    .to_vec();
    let r: PrefetchReport = src.prefetch(&ws);
    assert_eq!(
        (r.blocks, r.fetched, r.cached, r.failed),
        (4, 4, 0, 0),
        "{r:?}"
    );
    assert_eq!(src.fetch_log(), [7, 2, 9, 4]);
    assert_eq!(src.stats().prefetched, 4);
    // Demand reads of the working set are now cache hits; others fetch.
    for &o in &ws[..5] {
        assert_eq!(read(&src, o, 4096), data[ix(o)..ix(o) + 4096]);
    }
    let st = src.stats();
    assert_eq!(
        (st.gets, st.cache_hits, st.cache_misses),
        (4, 5, 0),
        "{st:?}"
    );
    assert_eq!(read(&src, 0, 10), data[..10]);
    assert_eq!(src.fetch_log(), [7, 2, 9, 4, 0]);
    // Prefetching again fetches nothing; with several slots, still every block once.
    let r = src.prefetch(&ws);
    assert_eq!((r.fetched, r.cached), (0, 4));
    let src2 = Arc::new(
        s3.open(
            "ws.raw",
            ObjectSourceOptions {
                max_parallel: 4,
                cache_dir: Some(cache.path().join("other")),
                ..opts(block, &cache)
            },
        )
        .expect("open"),
    );
    let all: Vec<u64> = (0..len / 4096).rev().map(|p| p * 4096).collect();
    let h = src2.prefetch_in_background(all).expect("thread");
    let r = h.join().expect("prefetch thread");
    assert_eq!((r.blocks, r.fetched, r.failed), (16, 16, 0));
    assert_eq!(src2.fetch_log(), (0..16).rev().collect::<Vec<u64>>());
    assert_eq!(read(&src2, 0, len), data);
    assert_eq!(src2.stats().gets, 16);
}

#[test]
fn a_missing_or_replaced_object_is_a_permanent_error_naming_it() {
    let Some(s3) = shared_moto("a_missing_or_replaced_object_is_a_permanent_error_naming_it")
    else {
        return;
    };
    let cache = tempfile::tempdir().expect("tempdir");
    let e = s3.open("no/such.raw", opts(64 * KIB, &cache)).unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("s3://faultline-test/no/such.raw"), "{msg}");
    assert!(msg.contains("not found") && msg.contains("404"), "{msg}");
    assert!(matches!(
        e,
        ObjectError::Open {
            retry: Retry::Permanent,
            ..
        }
    ));

    let block = 64 * KIB;
    let data = object_bytes(4 * block, 6);
    s3.put("r.raw", &data);
    let src = s3.open("r.raw", opts(block, &cache)).expect("open");
    assert_eq!(read(&src, 0, 10), data[..10]);
    // Replaced under the source: an uncached block is refused (If-Match), not mixed in.
    s3.put("r.raw", &object_bytes(4 * block, 7));
    let e = src.read_at(block + 4096, &mut [0u8; 4096]).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("s3://faultline-test/r.raw"), "{msg}");
    assert!(
        msg.contains("0x10000..0x20000"),
        "names the GET's range: {msg}"
    );
    assert!(msg.contains("412") && msg.contains("changed"), "{msg}");
    assert_eq!((e.offset, e.len), (block + 4096, 4096));
    // Deleted under the source: 404, permanent.
    s3.delete("r.raw");
    let e = src.read_at(2 * block, &mut [0u8; 4096]).unwrap_err();
    assert_eq!(e.retry, Retry::Permanent, "{e}");
    assert!(e.to_string().contains("404"), "{e}");
    // The cached block is still served.
    assert_eq!(read(&src, 0, 10), data[..10]);
    assert_eq!(src.stats().get_errors, 2);
}

#[test]
fn a_dead_server_gives_retryable_errors_and_a_restarted_one_serves_again() {
    let Some(mut s3) =
        moto("a_dead_server_gives_retryable_errors_and_a_restarted_one_serves_again")
    else {
        return;
    };
    let block = 64 * KIB;
    let data = object_bytes(8 * block, 8);
    s3.put("k.raw", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    let src = s3.open("k.raw", opts(block, &cache)).expect("open");
    assert_eq!(read(&src, 0, 4096), data[..4096]);
    s3.kill();
    let e = src.read_at(5 * block, &mut [0u8; 4096]).unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("s3://faultline-test/k.raw"), "{msg}");
    assert!(msg.contains("0x50000..0x60000"), "{msg}");
    assert!(msg.contains("network error"), "{msg}");
    assert!(std::error::Error::source(&e).is_some());
    // Back (same port, same bytes, so the same ETag): the same read now works.
    s3.start().expect("restart");
    s3.put("k.raw", &data);
    assert_eq!(read(&src, 5 * block, 4096), data[5 * ix(block)..][..4096]);
    assert_eq!(src.stats().get_errors, 1);
}

/// Restore `src` into a fresh mapping through `server` from 4 threads, every byte checked.
fn restore(server: &Server, src: &Arc<ObjectSource>, data: &Arc<Vec<u8>>) -> faultline::Stats {
    let pages = data.len() / PAGE_SIZE;
    let uffd = Uffd::new(Features::empty()).expect("uffd");
    let m = Arc::new(Mapping::anonymous(data.len()).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(
                &m,
                Arc::clone(src) as Arc<dyn PageSource>,
            )],
            SessionOptions::default(),
        )
        .expect("session");
    let (m2, d2) = (Arc::clone(&m), Arc::clone(data));
    faultline_testing::within(Duration::from_secs(60), move || {
        std::thread::scope(|s| {
            for t in 0..4 {
                let (m, data) = (&m2, &d2);
                s.spawn(move || {
                    let mut got = vec![0u8; PAGE_SIZE];
                    // Interleaved: thread t touches pages t, t+4, ...
                    for p in (t..pages).step_by(4) {
                        m.read(p * PAGE_SIZE, &mut got).expect("read");
                        assert_eq!(got, data[p * PAGE_SIZE..][..PAGE_SIZE], "page {p}");
                    }
                });
            }
        });
    });
    // Every byte, once more, now that all is present.
    let mut all = vec![0u8; data.len()];
    m.read(0, &mut all).expect("read");
    assert!(all == **data, "mapping differs from the object");
    let st = session.stats();
    server
        .remove_session(session.id())
        .expect("end the session");
    st
}

#[test]
fn the_fault_server_serves_a_mapping_from_the_object_store() {
    let Some(s3) = shared_moto("the_fault_server_serves_a_mapping_from_the_object_store") else {
        return;
    };
    // 4 MiB; every fourth run of 32 pages is zero.
    let pages = 1024usize;
    let mut data = object_bytes((pages * PAGE_SIZE) as u64, 9);
    for p in (0..pages).filter(|p| (p / 32) % 4 == 3) {
        data[p * PAGE_SIZE..][..PAGE_SIZE].fill(0);
    }
    let data = Arc::new(data);
    s3.put("vm/mem", &data);
    let cache = tempfile::tempdir().expect("tempdir");
    let src = Arc::new(s3.open("vm/mem", opts(256 * KIB, &cache)).expect("open"));
    let server = Server::start(ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    })
    .expect("server");
    let cold = restore(&server, &src, &data);
    assert!(cold.faults >= 1);
    assert_eq!(
        (cold.poisoned_pages, cold.source_errors),
        (0, 0),
        "{cold:?}"
    );
    let st = src.stats();
    assert_eq!(st.gets, 16, "each 256 KiB block fetched once: {st:?}");
    // A second VM from the warm cache: no request, and the zero pages noted when the blocks
    // were fetched are mapped with ZEROPAGE instead of copied.
    let warm = restore(&server, &src, &data);
    assert_eq!(src.stats().gets, 16);
    assert_eq!(src.stats().http_requests, st.http_requests);
    // (Short stretches cut off by a readahead window may still be copied.)
    assert!((128..=256).contains(&warm.zero_pages), "{warm:?}");
    server.shutdown();
}

#[test]
fn an_image_in_the_object_store_serves_the_raw_memory() {
    use faultline::image::{pack, Image, ImageSource, PackOptions};
    let Some(s3) = shared_moto("an_image_in_the_object_store_serves_the_raw_memory") else {
        return;
    };
    // 2 MiB of memory: zero runs, repeated pages and unique pages.
    let pages = 512usize;
    let mut raw = vec![0u8; pages * PAGE_SIZE];
    for (p, page) in raw.chunks_mut(PAGE_SIZE).enumerate() {
        match p % 8 {
            0..=2 => {}
            3 => page.copy_from_slice(&object_bytes(PAGE_SIZE as u64, 42)),
            _ => page.copy_from_slice(&object_bytes(PAGE_SIZE as u64, 100 + p as u64)),
        }
    }
    let mut img = std::io::Cursor::new(Vec::new());
    pack(&raw[..], &mut img, &PackOptions::default(), |_| {}).expect("pack");
    let img = img.into_inner();
    assert!(img.len() < raw.len());
    s3.put("images/vm.img", &img);
    let cache = tempfile::tempdir().expect("tempdir");
    let obj = Arc::new(
        s3.open("images/vm.img", opts(64 * KIB, &cache))
            .expect("open"),
    );
    let image = Image::from_reader(Arc::clone(&obj) as Arc<dyn faultline::image::RangeRead>)
        .expect("image header and tables read from the store");
    let src = ImageSource::new(image).expect("image source");
    assert_eq!(src.len(), raw.len() as u64);
    let mut got = vec![0u8; raw.len()];
    src.read_at(0, &mut got).expect("read the image");
    assert!(
        got == raw,
        "image read through the store differs from the raw memory"
    );
    let st = obj.stats();
    assert_eq!(st.gets, (img.len() as u64).div_ceil(64 * KIB), "{st:?}");
    // Past the end of the object: UnexpectedEof, no request.
    let e = faultline::image::RangeRead::read_at(&*obj, img.len() as u64 - 1, &mut [0u8; 2])
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn an_image_in_the_object_store_fetches_its_working_set_chunks_first() {
    use faultline::image::{pack, Codec, Image, ImageSource, PackOptions};
    let test = "an_image_in_the_object_store_fetches_its_working_set_chunks_first";
    let Some(s3) = shared_moto(test) else {
        return;
    };
    // 8 zero pages, then 64 unique pages stored raw in chunks of 16 (64 KiB).
    let pages = 72usize;
    let mut raw = vec![0u8; pages * PAGE_SIZE];
    for (p, page) in raw.chunks_mut(PAGE_SIZE).enumerate().skip(8) {
        page.copy_from_slice(&object_bytes(PAGE_SIZE as u64, 500 + p as u64));
    }
    let opts_pack = PackOptions {
        codec: Codec::None,
        chunk_pages: 16,
        ..PackOptions::default()
    };
    let mut img = std::io::Cursor::new(Vec::new());
    pack(&raw[..], &mut img, &opts_pack, |_| {}).expect("pack");
    let img = img.into_inner();
    s3.put("images/ws.img", &img);
    let block = 16 * KIB;
    let cache = tempfile::tempdir().expect("tempdir");
    let obj = Arc::new(
        s3.open(
            "images/ws.img",
            ObjectSourceOptions {
                max_parallel: 1,
                ..opts(block, &cache)
            },
        )
        .expect("open"),
    );
    let image = Image::from_reader(Arc::clone(&obj) as Arc<dyn faultline::image::RangeRead>)
        .expect("image");
    let chunks = image.chunks().to_vec();
    let src = ImageSource::new(image).expect("image source");
    let opened = obj.fetch_log(); // the header's and the tables' blocks
                                  // First touch: pages 40 and 41 (chunk 2), a zero page, page 10 (chunk 0), page 70 (chunk 3),
                                  // page 42 (chunk 2 again).
    let ws: Vec<u64> = [40u64, 41, 3, 10, 70, 42]
        .iter()
        .map(|p| p * PAGE_SIZE as u64)
        .collect();
    let ranges = src.working_set_ranges(&ws);
    let want_ranges: Vec<(u64, u64)> = [2usize, 0, 3]
        .iter()
        .map(|&c| (chunks[c].offset, u64::from(chunks[c].stored_len)))
        .collect();
    assert_eq!(ranges, want_ranges);
    let r = obj.prefetch(&obj.offsets_of_ranges(&ranges));
    assert_eq!(r.failed, 0, "{r:?}");
    // Every block of those chunks, in that order, each once; none already fetched.
    let mut want_blocks: Vec<u64> = Vec::new();
    for (off, len) in &want_ranges {
        for b in off / block..=(off + len - 1) / block {
            if !want_blocks.contains(&b) && !opened.contains(&b) {
                want_blocks.push(b);
            }
        }
    }
    assert_eq!(obj.fetch_log()[opened.len()..], want_blocks[..]);
    // The working set is then served from the cache, verified, without another GET.
    let gets = obj.stats().gets;
    for &o in &ws {
        let mut page = vec![1u8; PAGE_SIZE];
        src.read_at(o, &mut page).expect("read");
        assert!(page[..] == raw[ix(o)..ix(o) + PAGE_SIZE], "page at {o}");
    }
    assert_eq!(obj.stats().gets, gets);
    assert_eq!(src.stats().hash_mismatches, 0);
}
