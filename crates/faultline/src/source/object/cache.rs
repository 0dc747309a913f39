//! The local on-disk block cache of an [`ObjectSource`](super::ObjectSource).
//!
//! One directory per object under the cache root, holding:
//! - `data`: a sparse file as long as the object; block `b` lives at `b * block_size`;
//! - `index`: one record per block: a presence byte (1 = the block's data is complete and on
//!   disk) followed by the block's zero-page bitmap (bit `i` set: page `i` of the block is all
//!   zeros, so the server can map it with `UFFDIO_ZEROPAGE` instead of copying it);
//! - `meta.json`: the object's name, length, ETag and the block size. A cache whose metadata does
//!   not match the object being opened (it was replaced, or the block size changed) is emptied;
//! - `lock`: held with `flock(LOCK_EX)` while a source uses the directory. The kernel drops the
//!   lock when the process dies, so a restarted `faultline serve` worker takes over a warm cache.
//!   A second user of the same object at the same time gets a private directory instead, removed
//!   when it is dropped.
//!
//! **Crash safety.** A block is usable in this process as soon as its data and bitmap are written
//! (the page cache is coherent). Its presence byte — what a *later* process trusts — is written
//! only after `fdatasync` of both files, in batches (a group commit every
//! [`FLUSH_EVERY`] blocks and when the cache is dropped). A process killed between the two leaves
//! a block without its presence byte: absent, fetched again. A power loss cannot leave a presence
//! byte whose data did not reach the disk. So a warm cache is served without re-reading or
//! hashing its blocks.
//!
//! **Size limit.** The limit counts the bytes of cached blocks. When an insert goes over it, the
//! least recently used blocks are evicted: the presence byte is cleared, then the range is
//! punched out of the sparse file (`fallocate(PUNCH_HOLE)`), giving the space back. A block being
//! read is pinned and is never evicted under its reader; a block being written is pinned and
//! invisible to readers until its write is complete. Every step that changes which blocks exist
//! on disk (evicting, committing presence bytes) runs under the state lock, so a presence byte is
//! never written for a block that was evicted meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::source::bytes_are_zero;

/// The cache layout this code writes.
const FORMAT: u32 = 2;
/// Bytes per page for the zero-page bitmap.
const PAGE: u64 = 4096;
/// [`PAGE`] as a buffer length.
const PAGE_BYTES: usize = 4096;
/// Blocks written between two commits of presence bytes.
pub(crate) const FLUSH_EVERY: usize = 16;

/// What a cache directory holds: checked against `meta.json` when it is opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    format: u32,
    /// The object's name (its URL).
    pub object: String,
    /// Its length.
    pub len: u64,
    /// Its ETag when it was opened, if the store gives one.
    pub etag: Option<String>,
    /// Bytes per block (a multiple of 4096).
    pub block_size: u64,
}

impl Identity {
    pub(crate) fn new(object: &str, len: u64, etag: Option<&str>, block_size: u64) -> Identity {
        Identity {
            format: FORMAT,
            object: object.to_string(),
            len,
            etag: etag.map(str::to_string),
            block_size,
        }
    }
}

/// Cache occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub bytes: u64,
    pub blocks: u64,
    pub evictions: u64,
}

#[derive(Debug)]
struct Entry {
    tick: u64,
    len: u64,
    pins: u32,
    /// Being written: not readable yet.
    writing: bool,
    /// Bit `i`: page `i` of the block is all zeros.
    zeros: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<u64, Entry>,
    /// Last use → block, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    bytes: u64,
    evictions: u64,
    /// Blocks written whose presence byte is not committed yet.
    pending: Vec<u64>,
    punch_warned: bool,
}

impl State {
    fn touch(&mut self, block: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&block) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, block);
        }
    }
}

/// The on-disk cache of one object's blocks.
#[derive(Debug)]
pub(crate) struct BlockCache {
    dir: PathBuf,
    data: File,
    index: File,
    block_size: u64,
    /// Bytes of one index record.
    record: u64,
    len: u64,
    limit: u64,
    state: Mutex<State>,
    /// Held for the whole of a commit, so a commit that finds nothing pending (another thread
    /// took it) still returns only once that other commit is on disk.
    committing: Mutex<()>,
    remove_on_drop: bool,
    _lock: File,
}

/// Distinguishes the private directories of several sources of one object in one process.
static PRIVATE: AtomicU64 = AtomicU64::new(0);

impl BlockCache {
    /// Open (or create) the cache of `id` under `root`, holding at most `limit` bytes.
    pub(crate) fn open(root: &Path, id: &Identity, limit: u64) -> io::Result<BlockCache> {
        if id.block_size == 0 || id.block_size % PAGE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block size {} is not a multiple of {PAGE}", id.block_size),
            ));
        }
        std::fs::create_dir_all(root)?;
        let name = dir_name(&id.object);
        let shared = root.join(&name);
        std::fs::create_dir_all(&shared)?;
        let (dir, lock, remove_on_drop) = match try_lock(&shared)? {
            Some(lock) => (shared, lock, false),
            None => {
                let n = PRIVATE.fetch_add(1, Ordering::Relaxed);
                let dir = root.join(format!("{name}.private-{}-{n}", std::process::id()));
                // A leftover of an earlier process that had our pid: nobody uses it.
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                }
                std::fs::create_dir_all(&dir)?;
                let lock = try_lock(&dir)?.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is locked", dir.display()),
                    )
                })?;
                tracing::info!(cache = %dir.display(), "cache directory in use by another source; using a private one");
                (dir, lock, true)
            }
        };
        let open = |file: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(file))
        };
        let data = open("data")?;
        let index = open("index")?;
        let blocks = id.len.div_ceil(id.block_size);
        let record = 1 + (id.block_size / PAGE).div_ceil(8);
        let index_len = blocks
            .checked_mul(record)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "object too large"))?;
        let meta_path = dir.join("meta.json");
        let known = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Identity>(&b).ok());
        let reuse = known.as_ref() == Some(id)
            && data.metadata()?.len() == id.len
            && index.metadata()?.len() == index_len;
        let mut cache = BlockCache {
            dir,
            data,
            index,
            block_size: id.block_size,
            record,
            len: id.len,
            limit,
            state: Mutex::new(State::default()),
            committing: Mutex::new(()),
            remove_on_drop,
            _lock: lock,
        };
        if reuse {
            cache.load(blocks)?;
        } else {
            if known.is_some() {
                tracing::info!(cache = %cache.dir.display(), "cached object changed (length, ETag or block size); cache emptied");
            }
            // Remove the old metadata first: a crash while resetting leaves no metadata, so the
            // next open resets again instead of trusting half-reset files.
            match std::fs::remove_file(&meta_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            cache.data.set_len(0)?;
            cache.data.set_len(id.len)?;
            cache.index.set_len(0)?;
            cache.index.set_len(index_len)?;
            let tmp = cache.dir.join("meta.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(id).map_err(io::Error::other)?)?;
            std::fs::rename(&tmp, &meta_path)?;
        }
        // A smaller limit than last time: shrink now.
        let mut st = cache.lock();
        cache.evict_over_limit(&mut st);
        drop(st);
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of one index record: a presence byte and a bitmap of one block's pages.
    fn record_len(&self) -> usize {
        usize::try_from(self.record).expect("one bit per page of a block in memory, and a byte")
    }

    /// Rebuild the in-memory index from the `index` file: every committed block.
    fn load(&mut self, blocks: u64) -> io::Result<()> {
        let size = usize::try_from(blocks * self.record).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the cache index does not fit in memory",
            )
        })?;
        let mut index = vec![0u8; size];
        self.index.read_exact_at(&mut index, 0)?;
        let record = self.record_len();
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (b, rec) in index.chunks_exact(record).enumerate() {
            if rec[0] != 1 {
                continue;
            }
            let b = b as u64;
            let len = block_len(b, self.block_size, self.len);
            st.tick += 1;
            st.entries.insert(
                b,
                Entry {
                    tick: st.tick,
                    len,
                    pins: 0,
                    writing: false,
                    zeros: rec[1..].to_vec(),
                },
            );
            st.lru.insert(st.tick, b);
            st.bytes += len;
        }
        Ok(())
    }

    /// Whether block `b` is cached and readable.
    pub(crate) fn is_ready(&self, b: u64) -> bool {
        self.lock().entries.get(&b).is_some_and(|e| !e.writing)
    }

    /// Whether the cache can never evict: it may hold the whole object.
    pub(crate) fn holds_everything(&self) -> bool {
        self.limit >= self.len
    }

    /// The sparse data file (block `b` at `b * block_size`).
    pub(crate) fn data_file(&self) -> &File {
        &self.data
    }

    /// Whether block `b` is cached (readable, or being written).
    pub(crate) fn contains(&self, b: u64) -> bool {
        self.lock().entries.contains_key(&b)
    }

    /// Copy `buf.len()` bytes at `at` inside block `b` into `buf`. `Ok(false)` on a miss.
    pub(crate) fn read(&self, b: u64, at: u64, buf: &mut [u8]) -> io::Result<bool> {
        {
            let mut st = self.lock();
            let Some(e) = st.entries.get_mut(&b) else {
                return Ok(false);
            };
            if e.writing {
                return Ok(false);
            }
            e.pins += 1;
            st.touch(b);
        }
        let _pin = Pin { cache: self, b };
        self.data.read_exact_at(buf, b * self.block_size + at)?;
        Ok(true)
    }

    /// Whether the `len` bytes at `at` inside block `b` are all zero pages: `None` when the block
    /// is not cached (or the range is not whole pages).
    pub(crate) fn is_zero(&self, b: u64, at: u64, len: u64) -> Option<bool> {
        if at % PAGE != 0 || len % PAGE != 0 || len == 0 {
            return None;
        }
        let st = self.lock();
        let e = st.entries.get(&b).filter(|e| !e.writing)?;
        let first = at / PAGE;
        let all = (first..first + len / PAGE).all(|p| {
            e.zeros
                .get((p / 8) as usize)
                .is_some_and(|byte| byte & (1 << (p % 8)) != 0)
        });
        Some(all)
    }

    /// Store block `b`. Does nothing if it is already cached or larger than the whole limit.
    /// `Ok(true)` when enough blocks wait for their commit that [`BlockCache::commit`] is due.
    pub(crate) fn insert(&self, b: u64, bytes: &[u8]) -> io::Result<bool> {
        let len = bytes.len() as u64;
        let want = block_len(b, self.block_size, self.len);
        if len != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block {b} is {len} bytes, expected {want}"),
            ));
        }
        if len > self.limit {
            return Ok(false);
        }
        let zeros = zero_map(bytes, self.record_len() - 1);
        {
            let mut st = self.lock();
            if st.entries.contains_key(&b) {
                return Ok(false);
            }
            st.tick += 1;
            let tick = st.tick;
            st.entries.insert(
                b,
                Entry {
                    tick,
                    len,
                    pins: 1,
                    writing: true,
                    zeros: zeros.clone(),
                },
            );
            st.lru.insert(tick, b);
            st.bytes += len;
            self.evict_over_limit(&mut st);
        }
        // Data and bitmap; the presence byte waits for the next commit.
        let written = self
            .data
            .write_all_at(bytes, b * self.block_size)
            .and_then(|()| self.index.write_all_at(&zeros, b * self.record + 1));
        let mut st = self.lock();
        match written {
            Ok(()) => {
                if let Some(e) = st.entries.get_mut(&b) {
                    e.pins -= 1;
                    e.writing = false;
                }
                st.pending.push(b);
                self.evict_over_limit(&mut st);
                Ok(st.pending.len() >= FLUSH_EVERY)
            }
            Err(e) => {
                if let Some(en) = st.entries.get_mut(&b) {
                    en.pins -= 1;
                }
                self.remove_locked(&mut st, b);
                Err(e)
            }
        }
    }

    /// Make the blocks written so far durable, then mark them present on disk (group commit).
    /// Returns once every block inserted before the call is committed (or has failed to be),
    /// including blocks another thread's commit took and is still syncing.
    pub(crate) fn commit(&self) -> io::Result<()> {
        let _one_at_a_time = self
            .committing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pending = std::mem::take(&mut self.lock().pending);
        if pending.is_empty() {
            return Ok(());
        }
        let synced = self.data.sync_data().and_then(|()| self.index.sync_data());
        // Not durable: leave them unmarked (absent for the next process).
        synced?;
        let st = self.lock();
        for b in pending {
            // Evicted since (its bytes may be a hole now): no presence byte.
            if st.entries.get(&b).is_some_and(|e| !e.writing) {
                self.index.write_all_at(&[1], b * self.record)?;
            }
        }
        Ok(())
    }

    /// Evict least recently used, unpinned blocks until the limit holds (or only pinned ones
    /// are left).
    fn evict_over_limit(&self, st: &mut State) {
        if st.bytes <= self.limit {
            return;
        }
        let victims: Vec<u64> = {
            let mut over = st.bytes - self.limit;
            let mut v = Vec::new();
            for &b in st.lru.values() {
                if over == 0 {
                    break;
                }
                let Some(e) = st.entries.get(&b) else {
                    continue;
                };
                if e.pins > 0 {
                    continue;
                }
                over = over.saturating_sub(e.len);
                v.push(b);
            }
            v
        };
        for b in victims {
            self.remove_locked(st, b);
            st.evictions += 1;
        }
    }

    /// Forget block `b`: clear its presence byte, then give its space back. Called with the state
    /// locked, so no insert or commit of the same block interleaves with the hole punch.
    fn remove_locked(&self, st: &mut State, b: u64) {
        let Some(e) = st.entries.remove(&b) else {
            return;
        };
        st.lru.remove(&e.tick);
        st.bytes -= e.len;
        st.pending.retain(|&p| p != b);
        if let Err(err) = self.index.write_all_at(&[0], b * self.record) {
            tracing::warn!(cache = %self.dir.display(), block = b, error = %err, "cannot clear a cache presence byte");
        }
        let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if let Err(err) = rustix::fs::fallocate(&self.data, mode, b * self.block_size, e.len) {
            if !st.punch_warned {
                st.punch_warned = true;
                tracing::warn!(cache = %self.dir.display(), error = %err, "cannot punch holes in the cache file: evicted blocks keep their disk space");
            }
        }
    }

    /// Occupancy and eviction counts.
    pub(crate) fn usage(&self) -> Usage {
        let st = self.lock();
        Usage {
            bytes: st.bytes,
            blocks: st.entries.len() as u64,
            evictions: st.evictions,
        }
    }

    /// The directory this cache lives in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else if let Err(e) = self.commit() {
            tracing::warn!(cache = %self.dir.display(), error = %e, "cannot commit the last cached blocks; they will be fetched again");
        }
    }
}

/// Holds a read pin on a block.
struct Pin<'a> {
    cache: &'a BlockCache,
    b: u64,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.cache.lock().entries.get_mut(&self.b) {
            e.pins -= 1;
        }
    }
}

/// Length of block `b` of an object of `len` bytes.
pub(crate) fn block_len(b: u64, block_size: u64, len: u64) -> u64 {
    let start = b.saturating_mul(block_size);
    len.saturating_sub(start).min(block_size)
}

/// The zero-page bitmap of a block (`bytes` long bitmap; a short last page counts by its bytes).
fn zero_map(block: &[u8], bytes: usize) -> Vec<u8> {
    let mut map = vec![0u8; bytes];
    for (i, page) in block.chunks(PAGE_BYTES).enumerate() {
        if bytes_are_zero(page) {
            map[i / 8] |= 1 << (i % 8);
        }
    }
    map
}

/// Take the directory's lock file without waiting. `None` when another holder has it.
fn try_lock(dir: &Path) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A directory name for an object: its name made safe for a file name (shortened), and a hash of
/// the full name so different objects never share a directory.
fn dir_name(object: &str) -> String {
    let safe: String = object
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(96)
        .collect();
    format!("{safe}-{:016x}", fnv1a(object.as_bytes()))
}

/// FNV-1a, 64-bit: stable across builds and Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A private cache root under the temporary directory, removed on drop.
#[derive(Debug)]
pub(super) struct TempRoot(pub(super) PathBuf);

impl TempRoot {
    pub(super) fn new() -> io::Result<TempRoot> {
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

    const BS: u64 = 8192;

    /// A test size or offset, all small.
    fn us(x: u64) -> usize {
        usize::try_from(x).expect("a test size fits usize")
    }

    /// Block `b`: page 0 pattern bytes, page 1 zero (so the zero map has something to say).
    fn block(b: u64, len: u64) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if i >= PAGE {
                    0
                } else {
                    i.to_le_bytes()[0] ^ b.to_le_bytes()[0].wrapping_mul(31) | 1
                }
            })
            .collect()
    }

    fn id(len: u64) -> Identity {
        Identity::new("s3://bucket/key", len, Some("\"etag1\""), BS)
    }

    #[test]
    fn block_lengths_cover_the_object() {
        assert_eq!(block_len(0, BS, 3 * BS + 5), BS);
        assert_eq!(block_len(3, BS, 3 * BS + 5), 5);
        assert_eq!(block_len(4, BS, 3 * BS + 5), 0);
        assert_eq!(block_len(u64::MAX, BS, 10), 0);
    }

    #[test]
    fn directory_names_are_safe_and_distinct() {
        let a = dir_name("s3://bucket/a/b");
        let b = dir_name("s3://bucket/a_b");
        assert!(!a.contains('/') && !a.contains(':'), "{a}");
        assert_ne!(a, b);
        assert!(dir_name(&"x".repeat(1000)).len() < 120);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn zero_maps_mark_exactly_the_zero_pages() {
        let mut blk = vec![0u8; 3 * us(PAGE) + 100];
        blk[us(PAGE) + 4095] = 1; // page 1: one byte at its very end
        blk[3 * us(PAGE) + 99] = 7; // the short page 3
        assert_eq!(zero_map(&blk, 1), [0b0101]);
        assert!(
            bytes_are_zero(&[0; 33])
                && !bytes_are_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
        );
    }

    #[test]
    fn inserted_blocks_read_back_and_misses_say_so() {
        let root = tempfile::tempdir().unwrap();
        let len = 3 * BS + 100;
        let c = BlockCache::open(root.path(), &id(len), 1 << 20).unwrap();
        let mut buf = vec![0u8; 16];
        assert!(!c.read(1, 0, &mut buf).unwrap());
        assert_eq!(c.is_zero(1, PAGE, PAGE), None);
        c.insert(1, &block(1, BS)).unwrap();
        c.insert(3, &block(3, 100)).unwrap();
        assert!(c.read(1, 100, &mut buf).unwrap());
        assert_eq!(buf, block(1, BS)[100..116]);
        let mut tail = vec![0u8; 100];
        assert!(c.read(3, 0, &mut tail).unwrap());
        assert_eq!(tail, block(3, 100));
        assert_eq!(c.usage().bytes, BS + 100);
        assert_eq!(c.usage().blocks, 2);
        // Zero pages are known once cached.
        assert_eq!(c.is_zero(1, PAGE, PAGE), Some(true));
        assert_eq!(c.is_zero(1, 0, PAGE), Some(false));
        assert_eq!(c.is_zero(1, 0, 2 * PAGE), Some(false));
        assert_eq!(c.is_zero(1, 10, PAGE), None, "not whole pages");
        // A block of the wrong size is refused.
        assert!(c.insert(0, &block(0, 10)).is_err());
        assert!(!c.contains(0));
    }

    #[test]
    fn least_recently_used_blocks_are_evicted_and_their_space_returned() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let c = BlockCache::open(root.path(), &id(16 * BS), 3 * BS).unwrap();
        for b in 0..3 {
            c.insert(b, &block(b, BS)).unwrap();
        }
        let mut buf = vec![0u8; 8];
        // Use block 0 so block 1 is the oldest.
        assert!(c.read(0, 0, &mut buf).unwrap());
        c.insert(5, &block(5, BS)).unwrap();
        assert!(!c.contains(1));
        assert!(c.contains(0) && c.contains(2) && c.contains(5));
        let u = c.usage();
        assert_eq!((u.bytes, u.blocks, u.evictions), (3 * BS, 3, 1));
        // The file holds only what is cached (allocated blocks; tmpfs and ext4 punch holes).
        let allocated = c.data.metadata().unwrap().blocks() * 512;
        assert!(allocated <= 4 * BS, "allocated {allocated}");
        // A block larger than the whole limit is not cached at all.
        let tiny = BlockCache::open(&root.path().join("t"), &id(16 * BS), BS - 1).unwrap();
        tiny.insert(0, &block(0, BS)).unwrap();
        assert!(!tiny.contains(0));
    }

    #[test]
    fn pinned_blocks_are_not_evicted() {
        let root = tempfile::tempdir().unwrap();
        let c = BlockCache::open(root.path(), &id(16 * BS), 2 * BS).unwrap();
        c.insert(0, &block(0, BS)).unwrap();
        c.lock().entries.get_mut(&0).unwrap().pins += 1;
        c.insert(1, &block(1, BS)).unwrap();
        c.insert(2, &block(2, BS)).unwrap();
        assert!(c.contains(0), "a pinned block stays");
        assert!(!c.contains(1));
        c.lock().entries.get_mut(&0).unwrap().pins -= 1;
        c.insert(3, &block(3, BS)).unwrap();
        assert!(!c.contains(0));
    }

    #[test]
    fn a_reopened_cache_has_the_committed_blocks_and_their_zero_maps() {
        let root = tempfile::tempdir().unwrap();
        let len = 4 * BS;
        {
            let c = BlockCache::open(root.path(), &id(len), 1 << 20).unwrap();
            c.insert(0, &block(0, BS)).unwrap();
            c.insert(2, &block(2, BS)).unwrap();
            // Dropping commits.
        }
        let c = BlockCache::open(root.path(), &id(len), 1 << 20).unwrap();
        assert_eq!(c.usage().blocks, 2);
        let mut buf = vec![0u8; us(BS)];
        assert!(c.read(0, 0, &mut buf).unwrap());
        assert_eq!(buf, block(0, BS));
        assert!(c.read(2, 0, &mut buf).unwrap());
        assert_eq!(buf, block(2, BS));
        assert_eq!(c.is_zero(2, PAGE, PAGE), Some(true));
        assert_eq!(c.is_zero(2, 0, PAGE), Some(false));
        assert!(!c.contains(1));
        drop(c);
        // Another ETag: the object changed, the cache starts empty.
        let other = Identity::new("s3://bucket/key", len, Some("\"etag2\""), BS);
        let c = BlockCache::open(root.path(), &other, 1 << 20).unwrap();
        assert_eq!(c.usage().blocks, 0);
        assert!(!c.read(0, 0, &mut buf).unwrap());
    }

    #[test]
    fn blocks_not_yet_committed_are_absent_for_the_next_process() {
        let root = tempfile::tempdir().unwrap();
        let len = 64 * BS;
        let c = BlockCache::open(root.path(), &id(len), 1 << 20).unwrap();
        // FLUSH_EVERY blocks make a commit due; it commits them as a group. The next one stays
        // pending.
        for b in 0..FLUSH_EVERY as u64 {
            let due = c.insert(b, &block(b, BS)).unwrap();
            assert_eq!(due, b + 1 == FLUSH_EVERY as u64);
        }
        c.commit().unwrap();
        assert!(!c.insert(FLUSH_EVERY as u64, &block(0, BS)).unwrap());
        // A process killed now never runs Drop: read what is on disk as a new process would.
        let index = std::fs::read(c.dir().join("index")).unwrap();
        let record = us(c.record);
        let present: Vec<usize> = (0..64).filter(|&b| index[b * record] == 1).collect();
        assert_eq!(present, (0..FLUSH_EVERY).collect::<Vec<_>>());
        // Evicting a committed block clears its presence byte at once.
        let mut st = c.lock();
        c.remove_locked(&mut st, 3);
        drop(st);
        let index = std::fs::read(c.dir().join("index")).unwrap();
        assert_eq!(index[3 * record], 0);
        // A block evicted while pending is never marked.
        let mut st = c.lock();
        c.remove_locked(&mut st, FLUSH_EVERY as u64);
        drop(st);
        c.commit().unwrap();
        let index = std::fs::read(c.dir().join("index")).unwrap();
        assert_eq!(index[FLUSH_EVERY * record], 0);
    }

    #[test]
    fn a_busy_directory_gives_a_private_one_removed_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let a = BlockCache::open(root.path(), &id(4 * BS), 1 << 20).unwrap();
        let b = BlockCache::open(root.path(), &id(4 * BS), 1 << 20).unwrap();
        assert_ne!(a.dir(), b.dir());
        b.insert(0, &block(0, BS)).unwrap();
        assert!(!a.contains(0));
        let private = b.dir().to_path_buf();
        drop(b);
        assert!(!private.exists());
        assert!(a.dir().exists());
    }

    #[test]
    fn a_smaller_limit_on_reopen_shrinks_the_cache() {
        let root = tempfile::tempdir().unwrap();
        {
            let c = BlockCache::open(root.path(), &id(8 * BS), 1 << 20).unwrap();
            for b in 0..6 {
                c.insert(b, &block(b, BS)).unwrap();
            }
        }
        let c = BlockCache::open(root.path(), &id(8 * BS), 2 * BS).unwrap();
        assert_eq!(c.usage().bytes, 2 * BS);
    }
}
