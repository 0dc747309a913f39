//! Writing images: one streaming pass over the raw bytes.
//!
//! Each page is checked for zeros (not stored), hashed with BLAKE3 and looked up by its full
//! 32-byte hash among the pages stored so far (a duplicate becomes an index entry pointing at the
//! first copy), and otherwise hashed with the image's page hash (the truncated BLAKE3 hash, or
//! XXH3-128) and appended to the current chunk, which is compressed and written when it is full.
//! A diff additionally compares each page with the base's page at the same index, by the base's
//! stored 16-byte hash, and writes "base" for the pages that did not change. The
//! tables go after the chunk data and the header is written last, at offset 0, once the tables'
//! hash is known — so the output must be seekable (a file), and an interrupted pack leaves a file
//! with a zero header that no reader accepts.
//!
//! Memory: one chunk of pages, its compressed form, the read buffer, and per page 12 bytes of
//! index plus, per distinct stored page, its hash and a dedup-map entry (about 80 bytes) — never
//! the raw data.
//!
//! Dedup keys on the full 256-bit hash, so two different pages are merged only on a BLAKE3
//! collision; a guest that controls page contents cannot make one of its pages stand in for
//! another. A diff decides "unchanged" on the base's stored 128-bit hash, which would take a
//! second preimage to fool when it is BLAKE3; an XXH3 match is confirmed by comparing bytes.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use super::codec::Compressor;
use super::format::{
    self, ChunkEntry, HashAlg, Header, PageHash, PageLoc, FLAG_HAS_BASE, HEADER_LEN, MAX_BASE_NAME,
    MAX_CHUNK_BYTES, MAX_PAGE_SIZE, MIN_PAGE_SIZE, VERSION,
};
use super::reader::{ImageSource, PageContent};
use super::{Codec, ImageError};
use crate::source::{bytes_are_zero, PageSource};

/// How to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    /// Chunk compression (default zstd).
    pub codec: Codec,
    /// zstd level (default 3; ignored by the other codecs).
    pub level: i32,
    /// Pages per chunk (default 32: 128 KiB chunks of 4 KiB pages). Larger chunks compress a
    /// little better; smaller ones cost less to decompress for one random fault.
    pub chunk_pages: u32,
    /// Page size (default 4096; 2 MiB for a hugetlb guest's memory).
    pub page_size: u32,
    /// How the image hashes its pages and chunks for the reader to check (default XXH3-128;
    /// see [`HashAlg`] for when BLAKE3 is the better choice). Dedup does not depend on it.
    pub hash: HashAlg,
}

impl Default for PackOptions {
    fn default() -> PackOptions {
        PackOptions {
            codec: Codec::Zstd,
            level: 3,
            chunk_pages: 32,
            page_size: 4096,
            hash: HashAlg::Xxh3,
        }
    }
}

impl PackOptions {
    /// Check the options.
    pub fn validate(&self) -> Result<(), ImageError> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(ImageError::Invalid(format!(
                "page size {ps} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
            )));
        }
        let bytes = u64::from(self.chunk_pages) * u64::from(ps);
        if self.chunk_pages == 0 || (self.chunk_pages > 1 && bytes > MAX_CHUNK_BYTES) {
            return Err(ImageError::Invalid(format!(
                "{} pages per chunk: chunks hold 1 page or at most {} MiB",
                self.chunk_pages,
                MAX_CHUNK_BYTES >> 20
            )));
        }
        if self.codec == Codec::Zstd {
            let range = zstd::compression_level_range();
            if !range.contains(&self.level) {
                return Err(ImageError::Invalid(format!(
                    "zstd level {} is outside {}..={}",
                    self.level,
                    range.start(),
                    range.end()
                )));
            }
        }
        Ok(())
    }
}

/// What a pack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Bytes of raw input.
    pub raw_bytes: u64,
    /// Bytes of the image written.
    pub image_bytes: u64,
    /// Pages in the index.
    pub pages: u64,
    /// Pages recorded as zero (not stored).
    pub zero_pages: u64,
    /// Pages equal to an earlier page (stored once, referenced again).
    pub duplicate_pages: u64,
    /// Pages stored (distinct contents).
    pub unique_pages: u64,
    /// Diff only: pages unchanged from the base (not stored).
    pub base_pages: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Chunks stored uncompressed (compression did not make them smaller).
    pub raw_chunks: u64,
    /// Bytes of chunk data (compressed).
    pub data_bytes: u64,
    /// Wall time of the pack.
    pub elapsed: Duration,
    /// The image's id (the hash of its header).
    pub image_id: [u8; 32],
}

impl PackStats {
    /// Raw bytes per second.
    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.raw_bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// The base a diff is written against.
struct BaseRef<'b> {
    source: &'b ImageSource,
    name: Option<String>,
}

/// Writes an image page by page. [`pack`] and [`pack_diff`] drive it from a reader.
pub struct ImageWriter<'b, W: Write + Seek> {
    out: BufWriter<W>,
    pos: u64,
    opts: PackOptions,
    ps: usize,
    compressor: Compressor,
    pending: Vec<u8>,
    pending_pages: u32,
    chunks: Vec<ChunkEntry>,
    index: Vec<PageLoc>,
    hashes: Vec<PageHash>,
    dedup: HashMap<[u8; 32], PageLoc>,
    base: Option<BaseRef<'b>>,
    /// A base page read to compare with (diffs over an XXH3 base).
    base_page: Vec<u8>,
    stats: PackStats,
    started: Instant,
}

impl<W: Write + Seek> ImageWriter<'static, W> {
    /// A writer of a full image to `out` (which is overwritten from its current start: write
    /// to a new or truncated file).
    pub fn new(out: W, opts: PackOptions) -> Result<ImageWriter<'static, W>, ImageError> {
        ImageWriter::start(out, opts, None)
    }
}

impl<'b, W: Write + Seek> ImageWriter<'b, W> {
    /// A writer of a diff over `base`: pages equal to the base's page at the same index are
    /// recorded as "base" and not stored. `base_name` (a path relative to the diff's directory,
    /// or absolute) is stored as a hint for finding the base; the base is identified by its id.
    /// The diff's page size is the base's.
    pub fn diff(
        out: W,
        opts: PackOptions,
        base: &'b ImageSource,
        base_name: Option<String>,
    ) -> Result<ImageWriter<'b, W>, ImageError> {
        if let Some(n) = &base_name {
            if n.is_empty() || n.len() as u64 > MAX_BASE_NAME {
                return Err(ImageError::Invalid(format!(
                    "base name of {} bytes (1..={MAX_BASE_NAME})",
                    n.len()
                )));
            }
        }
        let opts = PackOptions {
            page_size: base.image().page_size(),
            ..opts
        };
        ImageWriter::start(
            out,
            opts,
            Some(BaseRef {
                source: base,
                name: base_name,
            }),
        )
    }

    fn start(
        out: W,
        opts: PackOptions,
        base: Option<BaseRef<'b>>,
    ) -> Result<ImageWriter<'b, W>, ImageError> {
        opts.validate()?;
        let compressor = Compressor::new(opts.codec, opts.level)
            .map_err(|e| ImageError::io("creating the compressor", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        // A zero header until the end: an interrupted pack is not a valid image.
        out.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| ImageError::io("writing the image", e))?;
        let ps = opts.page_size as usize;
        Ok(ImageWriter {
            out,
            pos: HEADER_LEN as u64,
            ps,
            pending: Vec::with_capacity(ps * opts.chunk_pages as usize),
            pending_pages: 0,
            compressor,
            opts,
            chunks: Vec::new(),
            index: Vec::new(),
            hashes: Vec::new(),
            dedup: HashMap::new(),
            base,
            base_page: Vec::new(),
            stats: PackStats::default(),
            started: Instant::now(),
        })
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.ps
    }

    /// Add the next page: exactly [`page_size`](Self::page_size) bytes (pad a short last page
    /// with zeros; [`finish`](Self::finish) is told the real length).
    pub fn write_page(&mut self, page: &[u8]) -> Result<(), ImageError> {
        if page.len() != self.ps {
            return Err(ImageError::Invalid(format!(
                "a page of {} bytes (the page size is {})",
                page.len(),
                self.ps
            )));
        }
        let p = self.index.len() as u64;
        let base = self.base.as_ref().map(|b| b.source.page_content(p));
        let loc = if bytes_are_zero(page) {
            match base {
                Some(Some(PageContent::Zero)) => {
                    self.stats.base_pages += 1;
                    PageLoc::Base
                }
                _ => {
                    self.stats.zero_pages += 1;
                    PageLoc::Zero
                }
            }
        } else {
            let full = *blake3::hash(page).as_bytes();
            let unchanged = match base {
                Some(Some(PageContent::Stored(alg, want))) => {
                    self.same_as_base(p, page, &full, alg, want)?
                }
                _ => false,
            };
            if unchanged {
                self.stats.base_pages += 1;
                PageLoc::Base
            } else if let Some(&loc) = self.dedup.get(&full) {
                self.stats.duplicate_pages += 1;
                loc
            } else {
                let chunk = u32::try_from(self.chunks.len())
                    .ok()
                    .filter(|&c| c < format::CHUNK_BASE)
                    .ok_or_else(|| ImageError::Invalid("too many chunks".into()))?;
                // pending_pages < chunk_pages and chunk bytes fit in u32 (at most 1 GiB).
                let offset = self.pending_pages * self.opts.page_size;
                let loc = PageLoc::Stored { chunk, offset };
                self.pending.extend_from_slice(page);
                self.pending_pages += 1;
                self.hashes.push(match self.opts.hash {
                    HashAlg::Blake3 => format::truncate(&full),
                    alg => alg.page(page),
                });
                self.dedup.insert(full, loc);
                self.stats.unique_pages += 1;
                if self.pending_pages == self.opts.chunk_pages {
                    self.flush_chunk()?;
                }
                loc
            }
        };
        self.index.push(loc);
        Ok(())
    }

    /// Whether `page` (index `p`, full BLAKE3 hash `full`) equals the base's page `p`, whose
    /// stored hash is `want` by `alg`. A BLAKE3 match is taken as equality (it would take a
    /// second preimage to fool); an XXH3 match is confirmed by reading the base's page, because
    /// a guest can craft XXH3 collisions and a false "unchanged" would serve the old page.
    fn same_as_base(
        &mut self,
        p: u64,
        page: &[u8],
        full: &[u8; 32],
        alg: HashAlg,
        want: PageHash,
    ) -> Result<bool, ImageError> {
        if alg == HashAlg::Blake3 {
            return Ok(format::truncate(full) == want);
        }
        if alg.page(page) != want {
            return Ok(false);
        }
        let Some(base) = &self.base else {
            return Ok(false);
        };
        // Past the base's end (a short last page) the page reads as zeros.
        let theirs = &mut self.base_page;
        theirs.clear();
        theirs.resize(self.ps, 0);
        let at = p * self.ps as u64;
        // What is left of the base from `at`, at most a page (more than fits usize is more).
        let n = usize::try_from(base.source.len().saturating_sub(at))
            .map_or(self.ps, |n| n.min(self.ps));
        base.source
            .read_at(at, &mut theirs[..n])
            .map_err(|e| ImageError::Invalid(format!("reading the base's page {p}: {e}")))?;
        Ok(theirs[..] == *page)
    }

    fn flush_chunk(&mut self) -> Result<(), ImageError> {
        if self.pending_pages == 0 {
            return Ok(());
        }
        let stored = self
            .compressor
            .compress(&self.pending)
            .map_err(|e| ImageError::io("compressing a chunk", e))?;
        // Both are at most `MAX_CHUNK_BYTES` (checked by `PackOptions::validate`; a chunk that
        // does not compress is stored raw): the error is for a broken compressor.
        let too_big = |_| ImageError::Invalid("a chunk of 4 GiB or more".into());
        let entry = ChunkEntry {
            offset: self.pos,
            stored_len: u32::try_from(stored.len()).map_err(too_big)?,
            raw_len: u32::try_from(self.pending.len()).map_err(too_big)?,
            hash: Some(self.opts.hash.chunk(&[&self.pending])),
        };
        self.out
            .write_all(stored)
            .map_err(|e| ImageError::io("writing the image", e))?;
        self.pos += stored.len() as u64;
        self.stats.data_bytes += stored.len() as u64;
        if entry.is_raw() {
            self.stats.raw_chunks += 1;
        }
        self.chunks.push(entry);
        self.pending.clear();
        self.pending_pages = 0;
        Ok(())
    }

    /// Write the last chunk, the tables and the header. `source_len` is the raw length: the
    /// pages written must be exactly `ceil(source_len / page_size)`. Returns what was packed and
    /// the output (flushed, not synced).
    pub fn finish(mut self, source_len: u64) -> Result<(PackStats, W), ImageError> {
        let pages = source_len.div_ceil(self.ps as u64);
        if pages != self.index.len() as u64 {
            return Err(ImageError::Invalid(format!(
                "{} pages written for a {source_len}-byte source ({pages} pages)",
                self.index.len()
            )));
        }
        if let Some(b) = &self.base {
            if b.source.image().page_size() != self.opts.page_size {
                return Err(ImageError::Invalid(
                    "page size differs from the base's".into(),
                ));
            }
        }
        self.flush_chunk()?;
        let data_len = self.pos - HEADER_LEN as u64;
        let mut hasher = blake3::Hasher::new();
        let mut put = |w: &mut BufWriter<W>, pos: &mut u64, bytes: &[u8]| {
            hasher.update(bytes);
            *pos += bytes.len() as u64;
            w.write_all(bytes)
                .map_err(|e| ImageError::io("writing the image tables", e))
        };
        let index_offset = self.pos;
        for loc in &self.index {
            put(&mut self.out, &mut self.pos, &loc.encode())?;
        }
        let chunk_table_offset = self.pos;
        for c in &self.chunks {
            put(&mut self.out, &mut self.pos, &c.encode())?;
        }
        let hash_table_offset = self.pos;
        for h in &self.hashes {
            put(&mut self.out, &mut self.pos, h)?;
        }
        let base_name_offset = self.pos;
        let (flags, base_id, name) = match &self.base {
            Some(b) => (
                FLAG_HAS_BASE,
                b.source.image().id(),
                b.name.clone().unwrap_or_default(),
            ),
            None => (0, [0u8; 32], String::new()),
        };
        put(&mut self.out, &mut self.pos, name.as_bytes())?;
        let header = Header {
            version: VERSION,
            page_size: self.opts.page_size,
            codec: self.opts.codec,
            flags,
            hash: self.opts.hash,
            source_len,
            page_count: pages,
            stored_pages: self.hashes.len() as u64,
            chunk_count: self.chunks.len() as u64,
            chunk_pages: self.opts.chunk_pages,
            data_offset: HEADER_LEN as u64,
            data_len,
            index_offset,
            chunk_table_offset,
            hash_table_offset,
            base_name_offset,
            base_name_len: name.len() as u64,
            base_id,
            tables_hash: *hasher.finalize().as_bytes(),
        };
        // What the reader will check, checked before anything claims to be an image.
        header.validate(self.pos)?;
        let encoded = header.encode();
        let end = self.pos;
        let mut out = self
            .out
            .into_inner()
            .map_err(|e| ImageError::io("writing the image", e.into_error()))?;
        let io = |e| ImageError::io("writing the image header", e);
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        out.write_all(&encoded).map_err(io)?;
        out.seek(SeekFrom::Start(end)).map_err(io)?;
        out.flush().map_err(io)?;
        let mut stats = self.stats;
        stats.raw_bytes = source_len;
        stats.image_bytes = end;
        stats.pages = pages;
        stats.chunks = self.chunks.len() as u64;
        stats.elapsed = self.started.elapsed();
        stats.image_id = Header::id_of(&encoded);
        Ok((stats, out))
    }
}

/// Read until `buf` is full or the input ends; how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ImageError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io("reading the raw memory", e)),
        }
    }
    Ok(n)
}

fn feed<W: Write + Seek>(
    w: &mut ImageWriter<'_, W>,
    mut raw: impl Read,
    mut progress: impl FnMut(u64),
) -> Result<u64, ImageError> {
    let ps = w.page_size();
    let mut buf = vec![0u8; ps.max(1 << 20)];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut raw, &mut buf)?;
        total += n as u64;
        let whole = n / ps * ps;
        for page in buf[..whole].chunks_exact(ps) {
            w.write_page(page)?;
        }
        if whole < n {
            // The short last page, padded with zeros.
            buf[n..whole + ps].fill(0);
            w.write_page(&buf[whole..whole + ps])?;
        }
        if n > 0 {
            progress(total);
        }
        if n < buf.len() {
            return Ok(total);
        }
    }
}

/// Pack the raw memory read from `raw` into an image written to `out` (a new file). `progress`
/// is called with the raw bytes read so far, about every MiB.
pub fn pack<W: Write + Seek>(
    raw: impl Read,
    out: W,
    opts: &PackOptions,
    progress: impl FnMut(u64),
) -> Result<PackStats, ImageError> {
    let mut w = ImageWriter::new(out, opts.clone())?;
    let total = feed(&mut w, raw, progress)?;
    Ok(w.finish(total)?.0)
}

/// Pack `raw` as a diff over `base`: only the pages that differ from the base's page at the same
/// index are stored. `base_name` is stored as a hint for finding the base (see
/// [`ImageWriter::diff`]).
pub fn pack_diff<W: Write + Seek>(
    base: &ImageSource,
    raw: impl Read,
    out: W,
    opts: &PackOptions,
    base_name: Option<String>,
    progress: impl FnMut(u64),
) -> Result<PackStats, ImageError> {
    let mut w = ImageWriter::diff(out, opts.clone(), base, base_name)?;
    let total = feed(&mut w, raw, progress)?;
    Ok(w.finish(total)?.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut p = vec![0u8; 4096];
        assert!(bytes_are_zero(&p));
        for at in [0, 15, 16, 4095] {
            p[at] = 1;
            assert!(!bytes_are_zero(&p), "{at}");
            p[at] = 0;
        }
        assert!(!bytes_are_zero(&[0, 0, 1]));
    }

    #[test]
    fn options_are_validated() {
        let bad = [
            PackOptions {
                page_size: 1000,
                ..PackOptions::default()
            },
            PackOptions {
                chunk_pages: 0,
                ..PackOptions::default()
            },
            PackOptions {
                chunk_pages: 1 << 20,
                ..PackOptions::default()
            },
            PackOptions {
                level: 99,
                ..PackOptions::default()
            },
        ];
        for o in bad {
            assert!(
                pack(&[][..], Cursor::new(Vec::new()), &o, |_| {}).is_err(),
                "{o:?}"
            );
        }
        // A 2 MiB page in chunks of one page is fine.
        let o = PackOptions {
            page_size: 2 << 20,
            chunk_pages: 1,
            ..PackOptions::default()
        };
        o.validate().unwrap();
    }

    #[test]
    fn counts_zero_duplicate_and_unique_pages_and_progress() {
        let mut raw = vec![0u8; 10 * 4096 + 100];
        for p in [1usize, 4, 7] {
            raw[p * 4096..(p + 1) * 4096].fill(9);
        }
        raw[2 * 4096] = 1;
        raw[10 * 4096 + 99] = 3; // the short last page
        let mut seen = Vec::new();
        let mut out = Cursor::new(Vec::new());
        let s = pack(&raw[..], &mut out, &PackOptions::default(), |n| {
            seen.push(n)
        })
        .unwrap();
        assert_eq!(s.pages, 11);
        assert_eq!((s.zero_pages, s.duplicate_pages, s.unique_pages), (6, 2, 3));
        assert_eq!(s.raw_bytes, raw.len() as u64);
        assert_eq!(s.image_bytes, out.get_ref().len() as u64);
        assert_eq!(seen, vec![raw.len() as u64]);
        assert_eq!(s.chunks, 1);
    }

    #[test]
    fn a_wrong_page_count_is_refused() {
        let mut w = ImageWriter::new(Cursor::new(Vec::new()), PackOptions::default()).unwrap();
        w.write_page(&[0u8; 4096]).unwrap();
        assert!(w.write_page(&[0u8; 100]).is_err());
        let e = w.finish(3 * 4096).unwrap_err();
        assert!(e.to_string().contains("1 pages written"), "{e}");
    }
}
