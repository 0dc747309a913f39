//! The decompressed-chunk cache of an [`super::ImageSource`]: a small LRU bounded in bytes, with
//! which pages of each chunk were checked against their hash, and the buffers of evicted chunks
//! kept for reuse.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A decompressed chunk in the cache, with which of its pages were checked against their hash.
#[derive(Debug)]
pub(super) struct CachedChunk {
    pub(super) data: Vec<u8>,
    pub(super) verified: Vec<AtomicBool>,
}

#[derive(Debug)]
pub(super) struct CacheEntry {
    pub(super) chunk: u32,
    pub(super) data: Arc<CachedChunk>,
    pub(super) used: u64,
}

/// A small LRU of decompressed chunks, bounded in bytes (it always keeps the newest chunk), with
/// the buffers of evicted chunks kept for reuse. A linear scan finds a chunk: it holds a few
/// hundred at most, and is searched once per chunk a read moves to, not per page.
#[derive(Debug)]
pub(super) struct ChunkCache {
    pub(super) entries: Vec<CacheEntry>,
    pub(super) tick: u64,
    pub(super) bytes: usize,
    pub(super) capacity: usize,
    pub(super) free: Vec<Vec<u8>>,
}

/// Evicted chunk buffers kept for reuse.
pub(super) const FREE_BUFFERS: usize = 4;

impl ChunkCache {
    pub(super) fn get(&mut self, chunk: u32) -> Option<Arc<CachedChunk>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.iter_mut().find(|e| e.chunk == chunk).map(|e| {
            e.used = tick;
            Arc::clone(&e.data)
        })
    }

    /// Insert `data` for `chunk`; if another thread inserted it meanwhile, keep and return
    /// theirs (so verification marks are shared).
    pub(super) fn insert(&mut self, chunk: u32, data: Arc<CachedChunk>) -> Arc<CachedChunk> {
        if let Some(existing) = self.get(chunk) {
            return existing;
        }
        while !self.entries.is_empty() && self.bytes + data.data.len() > self.capacity {
            let Some((i, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used) else {
                break;
            };
            let old = self.entries.swap_remove(i);
            self.bytes -= old.data.data.len();
            // Still in use by a reader: it is freed when that reader is done.
            if let Ok(c) = Arc::try_unwrap(old.data) {
                if self.free.len() < FREE_BUFFERS {
                    self.free.push(c.data);
                }
            }
        }
        self.bytes += data.data.len();
        self.tick += 1;
        self.entries.push(CacheEntry {
            chunk,
            data: Arc::clone(&data),
            used: self.tick,
        });
        data
    }

    pub(super) fn remove(&mut self, chunk: u32) {
        if let Some(i) = self.entries.iter().position(|e| e.chunk == chunk) {
            let old = self.entries.swap_remove(i);
            self.bytes -= old.data.data.len();
        }
    }
}
