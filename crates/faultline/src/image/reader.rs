//! Reading images: [`ImageSource`] (a [`PageSource`] serving an image, and its base when it is a
//! diff) over an [`Image`] (the validated header and tables over a [`RangeRead`], in `open`).
//!
//! [`Image::open`] reads the header and then all the tables in one read (they are contiguous at
//! the end of the file, so an object store fetches them with one ranged GET), checks both hashes
//! and every entry, and keeps the tables in memory: the page index lookup is then an array index.
//! Chunk data is read only when a page is asked for.
//!
//! [`ImageSource`] keeps the last few decompressed chunks in a small LRU cache (`chunk_cache`; a
//! fault's neighbours are usually in the same chunk, and readahead asks for them next). A stored
//! page is checked against its hash the first time it is served out of a decompressed chunk; the
//! check is remembered with the cached chunk (which lives in this process's memory, not in the
//! image), so a page shared by many duplicates, or read by many clones, is hashed once per
//! decompression. A mismatch evicts the chunk and fails the read with a permanent error naming the
//! page, so the server poisons it; the other pages of the chunk still verify, or fail, on their
//! own.

use crate::sync::lock;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::chunk_cache::{CachedChunk, ChunkCache};
use super::format::{ChunkEntry, HashAlg, PageHash, PageLoc};
use super::open::{ChunkError, Image};
use super::{hex, FileRange, ImageError, RangeRead};
use crate::source::{check_bounds, PageSource, Retry, SourceError};

/// Layers deep a chain of diffs may go (a guard against a cycle of base names).
const MAX_DEPTH: usize = 16;

/// Counters of an [`ImageSource`] (this layer only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Chunks read from the image (and decompressed).
    pub chunk_reads: u64,
    /// Bytes read from the image for them.
    pub bytes_read: u64,
    /// Chunk lookups served from the cache.
    pub cache_hits: u64,
    /// Stored pages checked against their hash (by their own, or by their chunk's).
    pub pages_verified: u64,
    /// Chunks checked whole against their chunk hash (version 2 images).
    pub chunks_verified: u64,
    /// Pages that failed the check.
    pub hash_mismatches: u64,
    /// Chunks that could not be decompressed.
    pub corrupt_chunks: u64,
    /// Pages read straight into the caller's buffer (uncompressed, unshared), not through the
    /// cache.
    pub direct_pages: u64,
}

#[derive(Debug, Default)]
struct Counters {
    chunk_reads: AtomicU64,
    bytes_read: AtomicU64,
    cache_hits: AtomicU64,
    pages_verified: AtomicU64,
    chunks_verified: AtomicU64,
    hash_mismatches: AtomicU64,
    corrupt_chunks: AtomicU64,
    direct_pages: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What a page of a (possibly layered) image holds, through the layers: zeros, or stored bytes
/// known by their hash (compared by a diff against its base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageContent {
    Zero,
    /// Stored, with this hash by this algorithm (the layer's).
    Stored(HashAlg, PageHash),
}

/// How much of a raw chunk (in quarters) a read must cover for the reader to check it with the
/// chunk's hash, reading the rest of the chunk beside it, instead of hashing its pages one by
/// one. Worth it when one hash over the whole chunk costs less than page hashes over the part
/// read: BLAKE3 hashes a 128 KiB chunk about 3× faster per byte than 4 KiB pages with AVX-512
/// (half a chunk is enough), only 1.35× faster with AVX2 (2.7 against 2.0 GB/s measured here:
/// three quarters); XXH3 is as fast on pages as on chunks, so only whole chunks. Measured
/// (`bench --sources`, 256 MiB, AVX2): 145 MiB read for 127 MiB of pages with "half" for both
/// hashes, 127–129 MiB with these, XXH3 restores 1.25–1.28× the raw file against 1.31–1.32×.
pub(crate) fn partial_check_quarters(hash: HashAlg) -> usize {
    match hash {
        HashAlg::Xxh3 => 4,
        HashAlg::Blake3 => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            3
        }
    }
}

/// An image served as a [`PageSource`], over its base when it is a diff.
#[derive(Debug)]
pub struct ImageSource {
    image: Image,
    base: Option<Arc<ImageSource>>,
    /// Per stored page: whether more than one index entry uses it.
    shared: Vec<bool>,
    cache: Mutex<ChunkCache>,
    counters: Counters,
    name: String,
    depth: usize,
}

/// Bytes of decompressed chunks cached by default.
const DEFAULT_CACHE_BYTES: usize = 32 << 20;

impl ImageSource {
    /// Serve a full image (an error for a diff: use [`ImageSource::with_base`] or
    /// [`ImageSource::open`]).
    pub fn new(image: Image) -> Result<ImageSource, ImageError> {
        if let Some(id) = image.base_id() {
            return Err(ImageError::Layer(format!(
                "{} is a diff over base {} (id {}): open it with its base",
                image.name(),
                image.base_name().unwrap_or("(unnamed)"),
                hex(&id)
            )));
        }
        Ok(ImageSource::build(image, None, 0))
    }

    /// Serve the diff `image` over `base`, which must be the image it names (same id) with the
    /// same page size and every page the diff takes from it.
    pub fn with_base(image: Image, base: Arc<ImageSource>) -> Result<ImageSource, ImageError> {
        let Some(want) = image.base_id() else {
            return Err(ImageError::Layer(format!(
                "{} is not a diff: it has no base",
                image.name()
            )));
        };
        let got = base.image.id();
        if want != got {
            return Err(ImageError::Layer(format!(
                "{} is a diff over the image with id {}, but {} has id {}",
                image.name(),
                hex(&want),
                base.image.name(),
                hex(&got)
            )));
        }
        if image.page_size() != base.image.page_size() {
            return Err(ImageError::Layer(format!(
                "{} has {}-byte pages but its base {} has {}-byte pages",
                image.name(),
                image.page_size(),
                base.image.name(),
                base.image.page_size()
            )));
        }
        let base_pages = base.image.page_count();
        if let Some(p) = image
            .tables
            .index
            .iter()
            .enumerate()
            .skip(usize::try_from(base_pages).unwrap_or(usize::MAX))
            .find(|(_, l)| **l == PageLoc::Base)
            .map(|(p, _)| p)
        {
            return Err(ImageError::Layer(format!(
                "page {p} of {} comes from its base, which has only {base_pages} pages",
                image.name()
            )));
        }
        let depth = base.depth + 1;
        if depth > MAX_DEPTH {
            return Err(ImageError::Layer(format!(
                "more than {MAX_DEPTH} layers of diffs"
            )));
        }
        Ok(ImageSource::build(image, Some(base), depth))
    }

    /// Open the image at `path`; when it is a diff, open its base too (by the name it gives,
    /// relative to the diff's directory unless absolute), recursively, checking each id.
    pub fn open(path: impl AsRef<Path>) -> Result<ImageSource, ImageError> {
        ImageSource::open_at_depth(path.as_ref(), 0)
    }

    /// Open the image file at `path` and, when it is a diff, its base files (found as
    /// [`ImageSource::open`] finds them), each once: the top layer first. Build the source from
    /// them with [`ImageSource::from_layers`] — in this process or, after handing the open files
    /// over, in another one, which then serves exactly these files whatever is renamed over
    /// their paths meanwhile.
    pub fn open_layer_files(path: impl AsRef<Path>) -> Result<Vec<Arc<FileRange>>, ImageError> {
        let mut layers = Vec::new();
        let mut path = path.as_ref().to_path_buf();
        loop {
            let r =
                Arc::new(FileRange::open(&path).map_err(|e| {
                    ImageError::io(format!("opening the image {}", path.display()), e)
                })?);
            let image = Image::from_reader(Arc::clone(&r) as Arc<dyn RangeRead>)?;
            layers.push(r);
            if image.base_id().is_none() {
                return Ok(layers);
            }
            if layers.len() > MAX_DEPTH {
                return Err(ImageError::Layer(format!(
                    "more than {MAX_DEPTH} layers of diffs (a cycle of base names?) at {}",
                    path.display()
                )));
            }
            let Some(name) = image.base_name() else {
                return Err(ImageError::Layer(format!(
                    "{} is a diff but does not name its base file: open the base and use ImageSource::with_base",
                    path.display()
                )));
            };
            path = match path.parent() {
                Some(dir) if Path::new(name).is_relative() => dir.join(name),
                _ => PathBuf::from(name),
            };
        }
    }

    /// Serve the image read through `layers[0]`, over its bases `layers[1..]` in order (what
    /// [`ImageSource::open_layer_files`] returns); each base's id is checked against the one its
    /// diff names.
    pub fn from_layers(layers: Vec<Arc<dyn RangeRead>>) -> Result<ImageSource, ImageError> {
        if layers.len() > MAX_DEPTH + 1 {
            return Err(ImageError::Layer(format!(
                "{} layers: more than {MAX_DEPTH} layers of diffs",
                layers.len()
            )));
        }
        let mut below: Option<ImageSource> = None;
        for reader in layers.into_iter().rev() {
            let image = Image::from_reader(reader)?;
            below = Some(match below {
                None => ImageSource::new(image)?,
                Some(base) => ImageSource::with_base(image, Arc::new(base))?,
            });
        }
        below.ok_or_else(|| ImageError::Layer("no image file".into()))
    }

    fn open_at_depth(path: &Path, depth: usize) -> Result<ImageSource, ImageError> {
        let image = Image::open(path)?;
        if image.base_id().is_none() {
            return ImageSource::new(image);
        }
        if depth >= MAX_DEPTH {
            return Err(ImageError::Layer(format!(
                "more than {MAX_DEPTH} layers of diffs (a cycle of base names?) at {}",
                path.display()
            )));
        }
        let Some(name) = image.base_name() else {
            return Err(ImageError::Layer(format!(
                "{} is a diff but does not name its base file: open the base and use ImageSource::with_base",
                path.display()
            )));
        };
        let base_path = match path.parent() {
            Some(dir) if Path::new(name).is_relative() => dir.join(name),
            _ => PathBuf::from(name),
        };
        let base = ImageSource::open_at_depth(&base_path, depth + 1).map_err(|e| {
            ImageError::Layer(format!(
                "opening the base {} of {}: {e}",
                base_path.display(),
                path.display()
            ))
        })?;
        ImageSource::with_base(image, Arc::new(base))
    }

    fn build(image: Image, base: Option<Arc<ImageSource>>, depth: usize) -> ImageSource {
        let name = image.name().to_string();
        let mut refs = vec![0u8; image.tables.hashes.len()];
        for loc in &image.tables.index {
            if let PageLoc::Stored { chunk, offset } = *loc {
                let r = &mut refs[image.slot(chunk, offset)];
                *r = r.saturating_add(1);
            }
        }
        let shared = refs.into_iter().map(|r| r > 1).collect();
        ImageSource {
            image,
            base,
            shared,
            cache: Mutex::new(ChunkCache {
                entries: Vec::new(),
                tick: 0,
                bytes: 0,
                capacity: DEFAULT_CACHE_BYTES,
                free: Vec::new(),
            }),
            counters: Counters::default(),
            name,
            depth,
        }
    }

    /// Keep up to `bytes` of decompressed chunks (default 32 MiB; the newest chunk is always
    /// kept). Many clones restoring one image at once share what is cached, each chunk
    /// decompressed and each page verified once while it stays.
    pub fn with_cache_bytes(self, bytes: usize) -> ImageSource {
        {
            let mut c = lock(&self.cache);
            c.capacity = bytes;
        }
        self
    }

    /// The image of this layer.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The base, for a diff.
    pub fn base(&self) -> Option<&Arc<ImageSource>> {
        self.base.as_ref()
    }

    /// Check that this is the image `want` names and that the id vouches for every byte it
    /// serves: the id is the BLAKE3 hash of a header that holds the tables' hash, the tables hold
    /// each page's hash, and every page is checked against its hash before it is served — so the
    /// chain holds only if the page hashes are cryptographic. Every layer (a diff names its base
    /// by id, checked when the diff is opened) must therefore use BLAKE3 page hashes; an
    /// XXH3-128 layer is refused by name, since pages matching its hashes can be crafted.
    pub fn check_id(&self, want: &[u8; 32]) -> Result<(), ImageError> {
        let got = self.image.id();
        if &got != want {
            return Err(ImageError::Id(format!(
                "{} has image id {}, not the expected {}",
                self.image.name(),
                hex(&got),
                hex(want)
            )));
        }
        let mut layer = Some(self);
        while let Some(l) = layer {
            let h = l.image.header().hash;
            if h != HashAlg::Blake3 {
                return Err(ImageError::Id(format!(
                    "{} has {} page hashes, which its id cannot vouch for (anyone who can write \
                     it can make pages that match them); pack it with --hash blake3",
                    l.image.name(),
                    h.name()
                )));
            }
            layer = l.base.as_deref();
        }
        Ok(())
    }

    /// This layer's counters.
    pub fn stats(&self) -> ImageStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ImageStats {
            chunk_reads: l(&c.chunk_reads),
            bytes_read: l(&c.bytes_read),
            cache_hits: l(&c.cache_hits),
            pages_verified: l(&c.pages_verified),
            chunks_verified: l(&c.chunks_verified),
            hash_mismatches: l(&c.hash_mismatches),
            corrupt_chunks: l(&c.corrupt_chunks),
            direct_pages: l(&c.direct_pages),
        }
    }

    /// Where in the image file the stored pages at the source offsets `offsets` (a recorded
    /// working set, first touch first) are: the byte range of each chunk holding one, each chunk
    /// once, in the order of the first offset that needs it. Zero pages need nothing; pages of a
    /// base layer and offsets past the end are skipped. For an image in an object store this is
    /// what to fetch first ([`crate::source::ObjectSource::offsets_of_ranges`]).
    pub fn working_set_ranges(&self, offsets: &[u64]) -> Vec<(u64, u64)> {
        let ps = u64::from(self.image.page_size());
        let mut seen = vec![false; self.image.tables.chunks.len()];
        let mut out = Vec::new();
        for &off in offsets {
            if let Some(PageLoc::Stored { chunk, .. }) = self.image.page(off / ps) {
                let c = chunk as usize;
                if !seen[c] {
                    seen[c] = true;
                    let e = self.image.tables.chunks[c];
                    out.push((e.offset, u64::from(e.stored_len)));
                }
            }
        }
        out
    }

    /// What page `page` is, through the layers (`None` past the end).
    pub(crate) fn page_content(&self, page: u64) -> Option<PageContent> {
        match self.image.page(page)? {
            PageLoc::Zero => Some(PageContent::Zero),
            PageLoc::Stored { chunk, offset } => Some(PageContent::Stored(
                self.image.header.hash,
                self.image.tables.hashes[self.image.slot(chunk, offset)],
            )),
            PageLoc::Base => self.base.as_ref().and_then(|b| b.page_content(page)),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, ChunkCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chunk `chunk`, decompressed, from the cache or the image.
    fn chunk(&self, chunk: u32) -> Result<Arc<CachedChunk>, ChunkError> {
        if let Some(c) = self.lock_cache().get(chunk) {
            bump(&self.counters.cache_hits, 1);
            return Ok(c);
        }
        // Read and decompress without holding the lock.
        let mut data = self.lock_cache().free.pop().unwrap_or_default();
        self.image
            .read_chunk_into(chunk, &mut data)
            .inspect_err(|e| {
                if matches!(e, ChunkError::Corrupt(_)) {
                    bump(&self.counters.corrupt_chunks, 1);
                }
            })?;
        bump(&self.counters.chunk_reads, 1);
        let entry = self.image.tables.chunks[chunk as usize];
        bump(&self.counters.bytes_read, u64::from(entry.stored_len));
        let pages = data.len() / self.image.page_size() as usize;
        // One hash over the whole chunk checks every page in it (version 2); when it does not
        // match, or the image has no chunk hashes, each page is checked on its own when used.
        let whole = self.chunk_hash_matches(&entry, &data);
        if whole {
            bump(&self.counters.pages_verified, pages as u64);
            bump(&self.counters.chunks_verified, 1);
        }
        let cached = Arc::new(CachedChunk {
            data,
            verified: (0..pages).map(|_| AtomicBool::new(whole)).collect(),
        });
        Ok(self.lock_cache().insert(chunk, cached))
    }

    /// Where a whole stored page can be read straight into the caller's buffer: a page of an
    /// uncompressed chunk that no other index entry shares (shared pages are served from the
    /// cache, verified once). Its offset in the image.
    fn direct(&self, loc: PageLoc) -> Option<u64> {
        let PageLoc::Stored { chunk, offset } = loc else {
            return None;
        };
        let c = self.image.tables.chunks[chunk as usize];
        if !c.is_raw() || self.shared[self.image.slot(chunk, offset)] {
            return None;
        }
        Some(c.offset + u64::from(offset))
    }

    /// Whether `entry` has a chunk hash and `data` (its raw bytes) matches it.
    fn chunk_hash_matches(&self, entry: &ChunkEntry, data: &[u8]) -> bool {
        entry.hash.is_some_and(|h| {
            data.len() == entry.raw_len as usize && self.image.header.hash.chunk(&[data]) == h
        })
    }

    /// Whether `run`, the bytes at `offset` of raw chunk `entry`, covers at least
    /// [`partial_check_quarters`] quarters of the chunk and the chunk's hash matches it with the
    /// rest of the chunk (read from the image here). `false` when it does not apply or does not
    /// match: the pages are then checked one by one, which names the bad ones.
    fn run_matches_chunk_hash(&self, entry: &ChunkEntry, offset: u32, run: &[u8]) -> bool {
        let (Some(want), true) = (entry.hash, entry.is_raw()) else {
            return false;
        };
        let raw = entry.raw_len as usize;
        let (before, covered) = (offset as usize, run.len());
        let quarters = partial_check_quarters(self.image.header.hash);
        if covered * 4 < raw * quarters || before + covered > raw {
            return false;
        }
        if covered == raw {
            return self.chunk_hash_matches(entry, run);
        }
        thread_local! {
            /// The rest of the chunk, read beside a run on this thread (reused: no allocation
            /// per check).
            static REST: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        REST.with(|cell| {
            let mut rest = cell.borrow_mut();
            // Every byte is overwritten by the reads below.
            rest.resize(raw - covered, 0);
            let (head, tail) = rest.split_at_mut(before);
            let after = entry.offset + (before + covered) as u64;
            if self.image.reader.read_at(entry.offset, head).is_err()
                || self.image.reader.read_at(after, tail).is_err()
            {
                return false;
            }
            bump(&self.counters.bytes_read, (raw - covered) as u64);
            self.image.header.hash.chunk(&[head, run, tail]) == want
        })
    }

    /// How many pages from `page` (at image offset `file_off`, at most `max`) are direct and
    /// stored one after another in the image, in the same chunk: one read. A run never crosses
    /// the end of its chunk, so a run that starts where a chunk starts and is long enough covers
    /// it whole, and is checked with one hash of the chunk.
    fn direct_run(&self, page: u64, file_off: u64, max: u64) -> u64 {
        let ps = u64::from(self.image.page_size());
        let chunk_end = match self.image.page(page) {
            Some(PageLoc::Stored { chunk, offset }) => {
                let c = self.image.tables.chunks[chunk as usize];
                u64::from(c.raw_len.saturating_sub(offset)) / ps
            }
            _ => 1,
        };
        let max = max.min(chunk_end).max(1);
        let mut pages = 1;
        while pages < max {
            match self.image.page(page + pages).and_then(|l| self.direct(l)) {
                Some(f) if f == file_off + pages * ps => pages += 1,
                _ => break,
            }
        }
        pages
    }

    /// Read the direct pages from `page` at image offset `file_off` into `run` (whole pages),
    /// then check each against its hash, while the bytes are still in the CPU's cache.
    fn read_direct(
        &self,
        page: u64,
        file_off: u64,
        run: &mut [u8],
        offset: u64,
        len: u64,
    ) -> Result<(), SourceError> {
        let ps = self.image.page_size() as usize;
        self.image.reader.read_at(file_off, run).map_err(|e| {
            let mut err = SourceError::from_io(&self.name, offset, len, e);
            err.what = format!(
                "page {page}: reading {} bytes at byte {file_off} of the image",
                run.len()
            );
            err
        })?;
        bump(&self.counters.bytes_read, run.len() as u64);
        // A run is inside one chunk (see `direct_run`). One that covers enough of its chunk
        // (`partial_check_quarters`) is checked with the chunk's hash, the rest of the chunk
        // read beside it: one hash over the whole chunk then costs less than one per page.
        if let Some(PageLoc::Stored { chunk, offset }) = self.image.page(page) {
            let entry = self.image.tables.chunks[chunk as usize];
            if self.run_matches_chunk_hash(&entry, offset, run) {
                let n = (run.len() / ps) as u64;
                bump(&self.counters.pages_verified, n);
                bump(&self.counters.direct_pages, n);
                bump(&self.counters.chunks_verified, 1);
                return Ok(());
            }
        }
        for (i, bytes) in run.chunks_exact(ps).enumerate() {
            let p = page + i as u64;
            let want = self.image.page_hash(p).unwrap_or_default();
            let got = self.image.header.hash.page(bytes);
            if got != want {
                bump(&self.counters.hash_mismatches, 1);
                let (chunk, off) = match self.image.page(p) {
                    Some(PageLoc::Stored { chunk, offset }) => (chunk, offset),
                    _ => (u32::MAX, 0),
                };
                return Err(self.error(
                    offset,
                    len,
                    format!(
                        "page {p}: content hash mismatch in chunk {chunk} at offset {off} (expected {}, got {})",
                        hex(&want),
                        hex(&got)
                    ),
                ));
            }
        }
        let n = (run.len() / ps) as u64;
        bump(&self.counters.pages_verified, n);
        bump(&self.counters.direct_pages, n);
        Ok(())
    }

    fn error(&self, offset: u64, len: u64, what: String) -> SourceError {
        SourceError {
            offset,
            len,
            source_name: self.name.clone(),
            what,
            retry: Retry::Permanent,
            cause: None,
        }
    }

    /// The verified bytes of stored page `page` at (`chunk`, `off`), within a read of
    /// `offset..offset+len`; `cur` keeps the chunk last used.
    fn stored_page<'c>(
        &self,
        page: u64,
        chunk: u32,
        off: u32,
        cur: &'c mut Option<(u32, Arc<CachedChunk>)>,
        offset: u64,
        len: u64,
    ) -> Result<&'c [u8], SourceError> {
        let have = matches!(cur, Some((c, _)) if *c == chunk);
        if !have {
            let data = self.chunk(chunk).map_err(|e| match e {
                ChunkError::Io(e) => {
                    let entry = self.image.tables.chunks[chunk as usize];
                    let mut err = SourceError::from_io(&self.name, offset, len, e);
                    err.what = format!(
                        "page {page}: reading chunk {chunk} ({} bytes at byte {} of the image)",
                        entry.stored_len, entry.offset
                    );
                    err
                }
                ChunkError::Corrupt(why) => self.error(
                    offset,
                    len,
                    format!("page {page}: chunk {chunk} is corrupt: {why}"),
                ),
            })?;
            *cur = Some((chunk, data));
        }
        let Some((_, data)) = cur.as_ref() else {
            unreachable!("set above")
        };
        let ps = self.image.page_size() as usize;
        let at = off as usize;
        let bytes = &data.data[at..at + ps];
        let k = at / ps;
        if !data.verified[k].load(Ordering::Acquire) {
            let want = self.image.tables.hashes[self.image.slot(chunk, off)];
            let got = self.image.header.hash.page(bytes);
            if got != want {
                bump(&self.counters.hash_mismatches, 1);
                // Re-read next time (a transfer error would not repeat), but fail this read.
                self.lock_cache().remove(chunk);
                return Err(self.error(
                    offset,
                    len,
                    format!(
                        "page {page}: content hash mismatch in chunk {chunk} at offset {off} (expected {}, got {})",
                        hex(&want),
                        hex(&got)
                    ),
                ));
            }
            bump(&self.counters.pages_verified, 1);
            data.verified[k].store(true, Ordering::Release);
        }
        Ok(bytes)
    }
}

impl PageSource for ImageSource {
    /// Flush the image's reader (an object store's cache), then the base's.
    fn flush(&self) -> std::io::Result<()> {
        self.image.reader.flush()?;
        match &self.base {
            Some(b) => b.flush(),
            None => Ok(()),
        }
    }

    fn len(&self) -> u64 {
        self.image.source_len()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        check_bounds(&self.name, offset, len, self.len())?;
        let ps = u64::from(self.image.page_size());
        let mut cur = None;
        let mut pos = offset;
        let end = offset + len;
        // Offsets inside `buf` (and inside one page): below its length, a usize.
        let at_buf = |x: u64| usize::try_from(x).expect("inside the caller's buffer");
        while pos < end {
            let page = pos / ps;
            let in_page = pos % ps;
            let n = (ps - in_page).min(end - pos);
            // Inside buf: pos - offset + n <= len.
            let loc = self.image.page(page);
            if n == ps {
                if let Some(file_off) = loc.and_then(|l| self.direct(l)) {
                    let pages = self.direct_run(page, file_off, (end - pos) / ps);
                    let at = at_buf(pos - offset);
                    let run = &mut buf[at..at + at_buf(pages * ps)];
                    self.read_direct(page, file_off, run, offset, len)?;
                    pos += pages * ps;
                    continue;
                }
            }
            let dst = &mut buf[at_buf(pos - offset)..at_buf(pos - offset + n)];
            match loc {
                Some(PageLoc::Zero) => dst.fill(0),
                Some(PageLoc::Stored { chunk, offset: off }) => {
                    let bytes = self.stored_page(page, chunk, off, &mut cur, offset, len)?;
                    dst.copy_from_slice(&bytes[at_buf(in_page)..at_buf(in_page + n)]);
                }
                Some(PageLoc::Base) => match &self.base {
                    Some(base) => {
                        // A base shorter than this image: its last page reads as zero-padded.
                        let in_base = base.len().saturating_sub(pos).min(n);
                        let (from_base, pad) = dst.split_at_mut(at_buf(in_base));
                        base.read_at(pos, from_base)?;
                        pad.fill(0);
                    }
                    None => {
                        return Err(self.error(
                            offset,
                            len,
                            format!("page {page} comes from a base that is not open"),
                        ))
                    }
                },
                None => {
                    return Err(SourceError::out_of_range(
                        &self.name,
                        offset,
                        len,
                        self.len(),
                    ))
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len())?;
        if len == 0 {
            return Some(true);
        }
        let ps = u64::from(self.image.page_size());
        let mut unknown = false;
        let mut p = offset / ps;
        while p * ps < end {
            // Is the page's content (a short last page ends with the source) all inside the range?
            let whole = p * ps >= offset && ((p + 1) * ps).min(self.len()) <= end;
            match self.image.page(p)? {
                PageLoc::Zero => {}
                PageLoc::Stored { .. } if whole => return Some(false),
                PageLoc::Stored { .. } => unknown = true,
                PageLoc::Base => {
                    let base = self.base.as_ref()?;
                    let from = (p * ps).max(offset);
                    let to = ((p + 1) * ps).min(end).min(base.len());
                    if from < to {
                        match base.is_zero(from, to - from) {
                            Some(true) => {}
                            Some(false) => return Some(false),
                            None => unknown = true,
                        }
                    }
                }
            }
            p += 1;
        }
        if unknown {
            None
        } else {
            Some(true)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::image::format::{self, Header, HEADER_LEN};
    use crate::image::open::PageCounts;
    use crate::image::Codec;
    use crate::image::{pack, pack_diff, PackOptions};
    use std::io::Cursor;

    const PS: usize = 4096;

    /// A size or offset of a test image, all small.
    fn us(x: u64) -> usize {
        usize::try_from(x).expect("a test image's offsets fit usize")
    }

    fn page_of(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// Pages: 0 zero, 1 a, 2 b, 3 a, 4 zero, 5 c (compressible), 6..8 unique.
    fn raw() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(vec![0u8; PS]);
        v.extend(page_of(1));
        v.extend(page_of(2));
        v.extend(page_of(1));
        v.extend(vec![0u8; PS]);
        v.extend((0..PS).map(|i| (i / 64).to_le_bytes()[0]));
        for s in 10..13 {
            v.extend(page_of(s));
        }
        v
    }

    fn packed(raw: &[u8], opts: &PackOptions) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        pack(raw, &mut out, opts, |_| {}).unwrap();
        out.into_inner()
    }

    fn source(bytes: Vec<u8>) -> ImageSource {
        ImageSource::new(Image::from_reader(Arc::new(bytes)).unwrap()).unwrap()
    }

    fn small_chunks() -> PackOptions {
        PackOptions {
            chunk_pages: 2,
            ..PackOptions::default()
        }
    }

    /// [`small_chunks`] with BLAKE3 page hashes (version 1 had only those; an id vouches only
    /// for them).
    fn small_blake3_chunks() -> PackOptions {
        PackOptions {
            hash: HashAlg::Blake3,
            ..small_chunks()
        }
    }

    #[test]
    fn every_codec_reads_back_every_byte() {
        for hash in [HashAlg::Blake3, HashAlg::Xxh3] {
            let raw = raw();
            for codec in [Codec::None, Codec::Zstd, Codec::Lz4] {
                let opts = PackOptions {
                    codec,
                    hash,
                    ..small_chunks()
                };
                let s = source(packed(&raw, &opts));
                assert_eq!(s.len(), raw.len() as u64);
                let mut all = vec![1u8; raw.len()];
                s.read_at(0, &mut all).unwrap();
                assert_eq!(s.image().header().hash, hash);
                assert_eq!(all, raw, "{codec:?} {hash}");
                // Unaligned reads across pages.
                let mut part = vec![0u8; 3 * PS + 17];
                s.read_at(PS as u64 + 100, &mut part).unwrap();
                assert_eq!(part, raw[PS + 100..PS + 100 + part.len()]);
                // Whole unshared pages of uncompressed chunks are read straight into the buffer
                // (b, the unique pages, and b again); the shared page a, partial pages and the
                // pages of a compressed chunk (c and its neighbour) go through the cache.
                let st = s.stats();
                let want = if codec == Codec::None { (6, 1) } else { (4, 2) };
                assert_eq!((st.direct_pages, st.chunk_reads), want, "{codec:?}: {st:?}");
                assert_eq!(st.cache_hits, 1, "{codec:?}: {st:?}");
                let counts = s.image().page_counts();
                assert_eq!(
                    counts,
                    PageCounts {
                        zero: 2,
                        base: 0,
                        stored: 7,
                        distinct: 6
                    }
                );
            }
        }
    }

    #[test]
    fn an_image_id_vouches_only_for_blake3_layers() {
        let blake3 = small_blake3_chunks();
        let b = source(packed(&raw(), &blake3));
        let id = b.image().id();
        b.check_id(&id).unwrap();
        let mut other = id;
        other[31] ^= 1;
        let e = b.check_id(&other).unwrap_err().to_string();
        assert!(e.contains("not the expected"), "{e}");
        // XXH3-128 (the default): the right id is still refused.
        let x = source(packed(&raw(), &small_chunks()));
        let e = x.check_id(&x.image().id()).unwrap_err().to_string();
        assert!(e.contains("xxh3 page hashes"), "{e}");
        // A BLAKE3 diff over an XXH3-128 base: refused, for the base.
        let base = Arc::new(x);
        let mut changed = raw();
        changed[2 * PS] ^= 0xff;
        let mut out = Cursor::new(Vec::new());
        pack_diff(&base, &changed[..], &mut out, &blake3, None, |_| {}).unwrap();
        let diff = Image::from_reader(Arc::new(out.into_inner())).unwrap();
        let d = ImageSource::with_base(diff, Arc::clone(&base)).unwrap();
        let e = d.check_id(&d.image().id()).unwrap_err().to_string();
        assert!(e.contains("xxh3 page hashes"), "{e}");
    }

    #[test]
    fn zero_pages_come_from_the_index() {
        let s = source(packed(&raw(), &small_chunks()));
        assert_eq!(s.is_zero(0, PS as u64), Some(true));
        assert_eq!(s.is_zero(4 * PS as u64, PS as u64), Some(true));
        assert_eq!(s.is_zero(PS as u64, PS as u64), Some(false));
        assert_eq!(s.is_zero(0, 2 * PS as u64), Some(false));
        // Part of a stored page: unknown.
        assert_eq!(s.is_zero(PS as u64 + 8, 8), None);
        assert_eq!(s.is_zero(0, 100 * PS as u64), None);
        let mut buf = vec![1u8; PS];
        s.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Nothing was read for it.
        assert_eq!(s.stats().chunk_reads, 0);
    }

    #[test]
    fn cache_hits_and_each_page_is_verified_once_per_decompression() {
        // Version 2: a decompressed chunk is checked whole, with its chunk hash.
        let s = source(packed(&raw(), &small_chunks())).with_cache_bytes(1);
        let pages_in = |c: usize| u64::from(s.image().chunks()[c].raw_len) / PS as u64;
        let mut buf = vec![0u8; PS];
        s.read_at(PS as u64, &mut buf).unwrap(); // chunk 0 (a, b)
        s.read_at(3 * PS as u64, &mut buf).unwrap(); // a again: cached, verified
        let st = s.stats();
        assert_eq!(
            (st.chunk_reads, st.cache_hits, st.chunks_verified),
            (1, 1, 1)
        );
        assert_eq!(st.pages_verified, pages_in(0));
        s.read_at(5 * PS as u64, &mut buf).unwrap(); // chunk 1: evicts chunk 0
        s.read_at(PS as u64, &mut buf).unwrap(); // chunk 0 again: re-read, re-verified
        let st = s.stats();
        assert_eq!((st.chunk_reads, st.chunks_verified), (3, 3));
        assert_eq!(st.pages_verified, 2 * pages_in(0) + pages_in(1));

        // Version 1 (no chunk hashes, BLAKE3 page hashes only): each page is checked on its
        // own, once per decompression.
        let s = source(to_v1(&packed(&raw(), &small_blake3_chunks()))).with_cache_bytes(1);
        assert_eq!(s.image().header().version, 1);
        s.read_at(PS as u64, &mut buf).unwrap();
        s.read_at(3 * PS as u64, &mut buf).unwrap();
        let st = s.stats();
        assert_eq!(
            (
                st.chunk_reads,
                st.cache_hits,
                st.chunks_verified,
                st.pages_verified
            ),
            (1, 1, 0, 1)
        );
        s.read_at(5 * PS as u64, &mut buf).unwrap();
        s.read_at(PS as u64, &mut buf).unwrap();
        let st = s.stats();
        assert_eq!((st.chunk_reads, st.pages_verified), (3, 3));
    }

    /// `img` (version 2) rewritten as the version-1 image of the same pages: 16-byte chunk
    /// entries without hashes, the sections after them moved up, both hashes recomputed.
    fn to_v1(img: &[u8]) -> Vec<u8> {
        let image = Image::from_reader(Arc::new(img.to_vec())).unwrap();
        let mut h = image.header().clone();
        let old = h.clone();
        let shrink = h.chunk_count * (format::CHUNK_ENTRY_LEN - format::CHUNK_ENTRY_LEN_V1);
        h.version = 1;
        h.hash_table_offset -= shrink;
        h.base_name_offset -= shrink;
        let mut tables = img[us(old.index_offset)..us(old.chunk_table_offset)].to_vec();
        for c in image.chunks() {
            tables.extend_from_slice(&c.encode_v1());
        }
        tables.extend_from_slice(&img[us(old.hash_table_offset)..]);
        h.tables_hash = *blake3::hash(&tables).as_bytes();
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&img[HEADER_LEN..us(old.index_offset)]);
        out.extend_from_slice(&tables);
        out
    }

    /// `raw` packed uncompressed in chunks of four pages, with `hash`.
    fn raw_chunks_of_four(raw: &[u8], hash: HashAlg) -> Vec<u8> {
        let opts = PackOptions {
            codec: Codec::None,
            chunk_pages: 4,
            hash,
            ..PackOptions::default()
        };
        packed(raw, &opts)
    }

    #[test]
    fn a_read_covering_a_raw_chunk_is_checked_with_the_chunk_hash() {
        for hash in [HashAlg::Blake3, HashAlg::Xxh3] {
            // Unique pages only, stored raw in chunks of 4: reading everything reads each chunk
            // whole, straight into the caller's buffer, and checks it with one hash.
            let raw: Vec<u8> = (0..8).flat_map(|p| page_of(100 + p)).collect();
            let img = raw_chunks_of_four(&raw, hash);
            let s = source(img.clone());
            let mut all = vec![0u8; raw.len()];
            s.read_at(0, &mut all).unwrap();
            assert!(all == raw);
            let st = s.stats();
            assert_eq!(
                (st.direct_pages, st.chunks_verified, st.pages_verified),
                (8, 2, 8)
            );
            // A byte flipped in chunk 1: the chunk hash fails, the pages are checked one by one,
            // and exactly the bad one is named.
            let mut bad = img;
            let chunk1 = Image::from_reader(Arc::new(bad.clone())).unwrap().chunks()[1];
            bad[us(chunk1.offset) + 2 * PS + 7] ^= 1;
            let s = source(bad);
            let e = s.read_at(0, &mut all).unwrap_err();
            assert!(e.what.starts_with("page 6: content hash mismatch"), "{e}");
            let st = s.stats();
            assert_eq!((st.chunks_verified, st.hash_mismatches), (1, 1));
        }
    }

    #[test]
    fn a_run_over_most_of_a_raw_chunk_is_checked_with_the_chunk_hash() {
        // Unique pages stored raw in chunks of 4: a read of the last q pages of a chunk covers
        // q quarters of it; from `partial_check_quarters` on, the first pages are read beside it
        // and the chunk is checked with one hash, else its pages one by one.
        let raw: Vec<u8> = (0..8).flat_map(|p| page_of(200 + p)).collect();
        for hash in [HashAlg::Blake3, HashAlg::Xxh3] {
            let need = partial_check_quarters(hash);
            let img = raw_chunks_of_four(&raw, hash);
            for q in 1..=3usize {
                let s = source(img.clone());
                let mut part = vec![0u8; q * PS];
                // Twice on this thread: the buffer for the rest of the chunk is reused.
                for c in 0..2 {
                    let at = (c * 4 + 4 - q) * PS;
                    s.read_at(at as u64, &mut part).unwrap();
                    assert!(part == raw[at..at + q * PS], "{hash} {q}");
                }
                let whole = q >= need;
                let st = s.stats();
                assert_eq!(
                    (st.chunks_verified, st.pages_verified, st.bytes_read),
                    (
                        2 * u64::from(whole),
                        2 * q as u64,
                        2 * (if whole { 4 } else { q }) as u64 * PS as u64
                    ),
                    "{hash} {q}: {st:?}"
                );
            }
            // Page 0, outside a run of pages 1..4, corrupt: the chunk hash fails (or is not
            // tried), the run's own pages are checked one by one and are fine.
            let mut bad = img;
            let c0 = Image::from_reader(Arc::new(bad.clone())).unwrap().chunks()[0];
            bad[us(c0.offset) + 5] ^= 1;
            let s = source(bad);
            let mut part = vec![0u8; 3 * PS];
            s.read_at(PS as u64, &mut part).unwrap();
            assert!(part == raw[PS..4 * PS], "{hash}");
            let st = s.stats();
            assert_eq!(
                (st.chunks_verified, st.pages_verified, st.hash_mismatches),
                (0, 3, 0),
                "{hash}: {st:?}"
            );
            let mut p0 = vec![0u8; PS];
            let e = s.read_at(0, &mut p0).unwrap_err();
            assert!(e.what.starts_with("page 0: content hash mismatch"), "{e}");
        }
    }

    #[test]
    fn a_flipped_byte_fails_only_its_page_permanently() {
        for hash in [HashAlg::Blake3, HashAlg::Xxh3] {
            let raw = raw();
            let mut img = packed(
                &raw,
                &PackOptions {
                    codec: Codec::None,
                    hash,
                    ..small_chunks()
                },
            );
            // Chunk 0 holds pages a (slot 0) and b (slot 1); flip a byte of b.
            let at = HEADER_LEN + PS + 10;
            img[at] ^= 0xff;
            let s = source(img);
            let mut buf = vec![0u8; PS];
            let e = s.read_at(2 * PS as u64, &mut buf).unwrap_err();
            assert_eq!(e.retry, Retry::Permanent);
            assert!(
                e.what
                    .starts_with("page 2: content hash mismatch in chunk 0 at offset 4096"),
                "{e}"
            );
            // Page a, in the same chunk, and its duplicate are fine.
            s.read_at(PS as u64, &mut buf).unwrap();
            assert_eq!(buf, raw[PS..2 * PS]);
            s.read_at(3 * PS as u64, &mut buf).unwrap();
            assert_eq!(s.stats().hash_mismatches, 1);
            // A read spanning the bad page fails too.
            let mut big = vec![0u8; 4 * PS];
            assert!(s.read_at(0, &mut big).is_err());
            // verify() names it.
            let r = s.image().verify(|_| {});
            assert_eq!(r.bad.len(), 1);
            assert_eq!(r.bad[0].0, Some(2));
        }
    }

    #[test]
    fn a_corrupt_compressed_chunk_is_a_permanent_error_naming_the_page() {
        // Compressible pages only, two per chunk.
        let raw: Vec<u8> = (0..6 * PS)
            .map(|i| ((i / 64) ^ (i / PS * 31)).to_le_bytes()[0])
            .collect();
        for codec in [Codec::Zstd, Codec::Lz4] {
            let opts = PackOptions {
                codec,
                ..small_chunks()
            };
            let img = packed(&raw, &opts);
            let image = Image::from_reader(Arc::new(img.clone())).unwrap();
            let c = image.chunks()[1];
            assert!(!c.is_raw(), "{codec:?}: {c:?}");
            let (start, len) = (us(c.offset), c.stored_len as usize);

            // A broken frame: the codec fails; both pages of the chunk name themselves.
            let mut bad = img.clone();
            bad[start..start + len].fill(0xff);
            let s = source(bad);
            let mut buf = vec![0u8; PS];
            for page in [2u64, 3] {
                let e = s.read_at(page * PS as u64, &mut buf).unwrap_err();
                assert_eq!(e.retry, Retry::Permanent);
                let want = format!("page {page}: chunk 1 is corrupt: ");
                assert!(e.what.starts_with(&want), "{codec:?}: {e}");
            }
            assert_eq!(s.stats().corrupt_chunks, 2);
            // The other chunks are fine.
            for page in [0u64, 1, 4, 5] {
                s.read_at(page * PS as u64, &mut buf).unwrap();
                assert_eq!(buf, raw[us(page) * PS..][..PS]);
            }

            // Flipped bytes inside the frame: decoding fails or yields other bytes; either way
            // no wrong byte is returned.
            let mut bad = img.clone();
            for b in &mut bad[start + len / 2..start + len / 2 + 2] {
                *b ^= 0x5a;
            }
            let s = source(bad);
            let mut failed = 0;
            for page in [2u64, 3] {
                match s.read_at(page * PS as u64, &mut buf) {
                    Ok(()) => assert_eq!(buf, raw[us(page) * PS..][..PS], "{codec:?}"),
                    Err(e) => {
                        assert!(e.what.starts_with(&format!("page {page}: ")), "{e}");
                        failed += 1;
                    }
                }
            }
            assert!(failed > 0, "{codec:?}: corruption went unnoticed");
        }
    }

    #[test]
    fn a_diff_serves_the_new_bytes_and_says_zero_over_the_base() {
        let old = raw();
        let mut new = old.clone();
        new[2 * PS..3 * PS].copy_from_slice(&page_of(99)); // changed
        new[PS..2 * PS].fill(0); // zero over a non-zero base page
        new.extend(page_of(100)); // grown by a page
        let base = Arc::new(source(packed(&old, &small_chunks())));
        let mut out = Cursor::new(Vec::new());
        let st = pack_diff(&base, &new[..], &mut out, &small_chunks(), None, |_| {}).unwrap();
        assert_eq!(
            (st.unique_pages, st.zero_pages, st.duplicate_pages),
            (2, 1, 0)
        );
        assert_eq!(st.base_pages, 7);
        let diff = Image::from_reader(Arc::new(out.into_inner())).unwrap();
        assert_eq!(diff.base_id(), Some(base.image().id()));
        let e = ImageSource::new(diff_copy(&diff)).unwrap_err();
        assert!(e.to_string().contains("open it with its base"), "{e}");
        let s = ImageSource::with_base(diff, Arc::clone(&base)).unwrap();
        let mut all = vec![7u8; new.len()];
        s.read_at(0, &mut all).unwrap();
        assert_eq!(all, new);
        assert_eq!(s.is_zero(PS as u64, PS as u64), Some(true));
        assert_eq!(s.is_zero(0, PS as u64), Some(true));
        assert_eq!(s.is_zero(3 * PS as u64, PS as u64), Some(false));
        // The wrong base is refused.
        let other = Arc::new(source(packed(&new, &small_chunks())));
        let diff2 = {
            let mut out = Cursor::new(Vec::new());
            pack_diff(&base, &new[..], &mut out, &small_chunks(), None, |_| {}).unwrap();
            Image::from_reader(Arc::new(out.into_inner())).unwrap()
        };
        let e = ImageSource::with_base(diff2, other).unwrap_err();
        assert!(
            e.to_string().contains("is a diff over the image with id"),
            "{e}"
        );
    }

    #[test]
    fn an_xxh3_image_stores_canonical_xxh3_128_hashes() {
        let raw = raw();
        let opts = |hash| PackOptions {
            codec: Codec::None,
            hash,
            ..small_chunks()
        };
        let img = packed(&raw, &opts(HashAlg::Xxh3));
        assert_eq!(img[22], format::HASH_XXH3_128);
        let image = Image::from_reader(Arc::new(img.clone())).unwrap();
        assert_eq!(image.header().hash, HashAlg::Xxh3);
        let a = &raw[PS..2 * PS];
        let xxh = |b: &[u8]| xxhash_rust::xxh3::xxh3_128(b).to_be_bytes();
        assert_eq!(image.page_hash(1), Some(xxh(a)));
        assert_eq!(image.page_hash(3), Some(xxh(a)));
        // Chunk 0 holds a and b, stored raw: its hash is XXH3-128 of both, then 16 zeros.
        let c0 = image.chunks()[0];
        let bytes = &img[us(c0.offset)..][..c0.raw_len as usize];
        assert_eq!(bytes, &raw[PS..3 * PS]);
        let mut want = [0u8; 32];
        want[..16].copy_from_slice(&xxh(bytes));
        assert_eq!(c0.hash, Some(want));
        // The same memory with BLAKE3: BLAKE3 hashes, a different image id.
        let b = Image::from_reader(Arc::new(packed(&raw, &opts(HashAlg::Blake3)))).unwrap();
        assert_eq!(img.len(), us(b.file_len()));
        assert_eq!(
            b.page_hash(1),
            Some(format::truncate(blake3::hash(a).as_bytes()))
        );
        assert_ne!(b.id(), image.id());
    }

    #[test]
    fn layers_may_use_different_hashes() {
        use HashAlg::{Blake3, Xxh3};
        let v0 = raw();
        let mut v1 = v0.clone();
        v1[2 * PS..3 * PS].copy_from_slice(&page_of(99));
        let mut v2 = v1.clone();
        v2[6 * PS..7 * PS].copy_from_slice(&page_of(98));
        let with = |hash| PackOptions {
            hash,
            ..small_chunks()
        };
        let diff = |base: &Arc<ImageSource>, new: &[u8], hash| {
            let mut out = Cursor::new(Vec::new());
            let st = pack_diff(base, new, &mut out, &with(hash), None, |_| {}).unwrap();
            let image = Image::from_reader(Arc::new(out.into_inner())).unwrap();
            (st, ImageSource::with_base(image, Arc::clone(base)).unwrap())
        };
        for (a0, a1, a2) in [
            (Blake3, Xxh3, Blake3),
            (Xxh3, Blake3, Xxh3),
            (Xxh3, Xxh3, Xxh3),
        ] {
            let l0 = Arc::new(source(packed(&v0, &with(a0))));
            let (st1, l1) = diff(&l0, &v1, a1);
            // Only the changed page is stored; the others, zero ones included, are the base's.
            assert_eq!((st1.unique_pages, st1.base_pages), (1, 8), "{a0}/{a1}");
            let l1 = Arc::new(l1);
            // Page 2 of the middle layer is judged unchanged by that layer's hash.
            let (st2, l2) = diff(&l1, &v2, a2);
            assert_eq!((st2.unique_pages, st2.base_pages), (1, 8), "{a0}/{a1}/{a2}");
            let mut all = vec![7u8; v2.len()];
            l2.read_at(0, &mut all).unwrap();
            assert!(all == v2, "{a0}/{a1}/{a2}");
            l1.read_at(0, &mut all).unwrap();
            assert!(all == v1, "{a0}/{a1}");
        }
    }

    /// A second handle on the same diff bytes (Image is not Clone).
    fn diff_copy(d: &Image) -> Image {
        let mut bytes = vec![0u8; us(d.file_len())];
        d.reader.read_at(0, &mut bytes).unwrap();
        Image::from_reader(Arc::new(bytes)).unwrap()
    }

    #[test]
    fn a_short_last_page_is_padded_and_served_short() {
        let mut raw = raw();
        raw.truncate(raw.len() - 1000);
        let s = source(packed(&raw, &small_chunks()));
        assert_eq!(s.len(), raw.len() as u64);
        let mut all = vec![0u8; raw.len()];
        s.read_at(0, &mut all).unwrap();
        assert_eq!(all, raw);
        let mut past = vec![0u8; 2000];
        let e = s.read_at(raw.len() as u64 - 1000, &mut past).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
    }

    #[test]
    fn a_truncated_image_names_what_is_missing() {
        let img = packed(&raw(), &small_chunks());
        let h = Header::decode(&img, img.len() as u64).unwrap();
        for (cut, needle) in [
            (100, "the header ends at byte 256"),
            (HEADER_LEN + 10, "the chunk data ends at byte"),
            (us(h.index_offset) + 3, "the page index ends at byte"),
            (img.len() - 1, "the hash table ends at byte"),
        ] {
            let e = Image::from_reader(Arc::new(img[..cut].to_vec())).unwrap_err();
            assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{cut}: {e}");
        }
        assert!(matches!(
            Image::from_reader(Arc::new(Vec::new())),
            Err(ImageError::Truncated { .. })
        ));
    }
}
