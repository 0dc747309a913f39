//! A file mapped into this process with `mmap(2)`: one copy per page.
//!
//! [`MmapSource`] maps the file read-only (`MAP_SHARED`, `PROT_READ`) and lends pointers into the
//! mapping ([`PageSource::ptr_at`]). The server hands them to `UFFDIO_COPY`, so the kernel copies
//! each page straight from the page cache into the faulting process: one copy in total, against
//! two for `pread` into a buffer and then `UFFDIO_COPY` from it. `populate(true)` adds
//! `MAP_POPULATE`, which makes the kernel read the whole file in at open so no fault is taken on
//! the source side later (worth it when most of the file will be served).
//!
//! # The mapping is for the kernel; user space reads the file with `pread`
//! A file mapping is memory that can change underneath us, and worse, can stop existing: if the
//! file is truncated while mapped, touching a page past its new end from user space raises
//! `SIGBUS`, which would kill the whole daemon serving every client. The kernel, reading the same
//! page for a `UFFDIO_COPY` (`copy_from_user`), gets `EFAULT` instead, and the server turns that
//! into an error for the one fault. So this module keeps one rule (STYLE.md rule 3): **user space
//! never reads the mapping.** The mapping is a [`faultline_uffd::FileMapping`], which forms no
//! `&[u8]` over it and lends only raw addresses; the mapping's only use here is
//! [`PageSource::ptr_at`], a raw pointer handed to the kernel. Every byte this process looks at — [`PageSource::read_at`], the
//! zero scan of [`MmapSource::with_zero_scan`] (1 MiB `pread`s into one reused buffer), the edges
//! of an unaligned [`PageSource::is_zero`] — comes from positioned reads (`pread`) on a descriptor
//! of the same file, kept by the source. Both read the same page cache.
//!
//! The source's length is the file's length when it was mapped. A read that meets the file's
//! current end before that fails with a permanent [`SourceError`] naming the file, the offset and
//! that the file is shorter than when it was opened: never a short read, never zeros, never a
//! signal. Writes to the file show through (the source is a view, not a snapshot): a source serves
//! a snapshot file that must not be written while it is served, and a writer can change which
//! bytes are served but cannot break memory safety, as no reference to the mapping exists.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use faultline_uffd::FileMapping;

use super::memory::{bytes_are_zero, ZeroPages, ZERO_GRANULE, ZERO_GRANULE_BYTES};
use super::{check_bounds, PageSource, Retry, SourceError};

/// The zero scan reads the file in `pread`s of this size, into one buffer reused for the whole
/// scan: large enough that the system call cost vanishes next to the copy, small enough to stay
/// in the L2/L3 cache while its 256 granules are checked. A multiple of [`ZERO_GRANULE`], so a
/// granule never straddles two reads.
const ZERO_SCAN_CHUNK: usize = 1 << 20;
const _: () = assert!(ZERO_SCAN_CHUNK as u64 % ZERO_GRANULE == 0);

/// A read-only shared mapping of a file, lending pointers into it for one-copy resolves.
///
/// The mapping is only ever handed to the kernel ([`PageSource::ptr_at`]); this process reads the
/// file with `pread` on its own descriptor. A file truncated while the source lives makes reads
/// past its new end fail with a permanent [`SourceError`] (and a `UFFDIO_COPY` from a lent
/// pointer fail with `EFAULT`), never `SIGBUS` in this process. Writes to the file show through.
#[derive(Debug)]
pub struct MmapSource {
    map: FileMapping,
    /// The mapped file, for `pread`: every user-space read of the file goes through it.
    file: File,
    name: String,
    /// The zero-page map, once the scan has run (set once: by [`MmapSource::with_zero_scan`],
    /// or by the thread of [`MmapSource::with_background_zero_scan`] when it ends).
    zero: OnceLock<ZeroPages>,
}

/// How to map a file: see [`MmapSource::options`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmapSourceOptions {
    populate: bool,
}

impl MmapSourceOptions {
    /// Pre-fault the whole mapping at open (`MAP_POPULATE`, done by the kernel): open reads the
    /// file in, later copies out of the mapping find it resident. Off by default.
    pub fn populate(mut self, populate: bool) -> MmapSourceOptions {
        self.populate = populate;
        self
    }

    /// Map the file at `path`.
    pub fn open(self, path: impl AsRef<Path>) -> io::Result<MmapSource> {
        let path = path.as_ref();
        let file = File::open(path)?;
        let mut source = self.map_owned(file)?;
        source.name = path.display().to_string();
        Ok(source)
    }

    /// Map an open file (open for reading). The source keeps a duplicate of the descriptor (for
    /// `pread`), so `file` may be closed afterwards.
    pub fn map_file(self, file: &File) -> io::Result<MmapSource> {
        self.map_owned(file.try_clone()?)
    }

    fn map_owned(self, file: File) -> io::Result<MmapSource> {
        // The mapping is only lent to the kernel as raw addresses (see the module docs), so
        // neither a concurrent write nor a truncation can invalidate a reference or raise a
        // signal in this process.
        let map = FileMapping::new(&file, self.populate).map_err(|e| match e.errno() {
            Some(errno) => io::Error::from(errno),
            None => io::Error::other(e),
        })?;
        Ok(MmapSource {
            map,
            file,
            name: "mmap".to_string(),
            zero: OnceLock::new(),
        })
    }
}

impl MmapSource {
    /// Map the file at `path` read-only, without populating it.
    pub fn open(path: impl AsRef<Path>) -> io::Result<MmapSource> {
        MmapSource::options().open(path)
    }

    /// Map an open file read-only, without populating it.
    pub fn from_file(file: &File) -> io::Result<MmapSource> {
        MmapSource::options().map_file(file)
    }

    /// Options for mapping: `MmapSource::options().populate(true).open(path)`.
    pub fn options() -> MmapSourceOptions {
        MmapSourceOptions::default()
    }

    /// Use `name` in logs and errors (the path for [`MmapSource::open`], "mmap" otherwise).
    pub fn with_name(mut self, name: impl Into<String>) -> MmapSource {
        self.name = name.into();
        self
    }

    /// Scan the whole file once and remember which 4 KiB pages are all zeros, so
    /// [`PageSource::is_zero`] answers (and the server resolves those pages with
    /// `UFFDIO_ZEROPAGE`). Without it `is_zero` answers `None`. Reads every page of the file, with
    /// `pread`s of 1 MiB into one buffer; fails (naming the file and offset) if the file is now
    /// shorter than when it was opened, or on an I/O error.
    pub fn with_zero_scan(self) -> Result<MmapSource, SourceError> {
        let zero = self.scan_zero_pages(|| true)?;
        // A fresh source: nothing set it yet.
        let _ = self.zero.set(zero);
        Ok(self)
    }

    /// [`MmapSource::with_zero_scan`], on a thread of its own: the source serves at once, its
    /// `is_zero` answering `None` (every page read and copied) until the scan ends and `Some`
    /// from then on. For a server that must not keep its clients waiting for a scan (a
    /// restarted worker whose sessions' guests are running); the result is the same bytes,
    /// with zero pages copied rather than mapped until the scan is done. A failing scan (a file
    /// truncated under it) is logged and leaves `is_zero` at `None`. The thread holds the source
    /// only while it reads: it stops when the last other holder drops it.
    pub fn with_background_zero_scan(self) -> Arc<MmapSource> {
        let source = Arc::new(self);
        let weak = Arc::downgrade(&source);
        let spawned = std::thread::Builder::new()
            .name("faultline-zeroscan".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let Some(s) = weak.upgrade() else { return };
                let name = s.name.clone();
                drop(s);
                let scan = weak
                    .upgrade()
                    .map(|s| s.scan_zero_pages(|| weak.strong_count() > 1));
                match (scan, weak.upgrade()) {
                    (Some(Ok(zero)), Some(s)) => {
                        let pages = zero.zero_granules();
                        let _ = s.zero.set(zero);
                        tracing::info!(source = %name, zero_pages = pages, ms = t.elapsed().as_millis(), "zero scan done");
                    }
                    (Some(Err(e)), _) => {
                        tracing::warn!(source = %name, error = %e, "zero scan failed: zero pages are copied, not mapped");
                    }
                    _ => {} // the source was dropped
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the zero scan: zero pages are copied, not mapped");
        }
        source
    }

    /// Read the whole file and build its zero-page map; `go_on()` is asked before each read
    /// and stops the scan (an error) when false.
    fn scan_zero_pages(&self, go_on: impl Fn() -> bool) -> Result<ZeroPages, SourceError> {
        let len = self.len();
        let mut chunk = vec![0u8; ZERO_SCAN_CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX))];
        // The bytes of the file at `held.start..held.end` are in `chunk[..held.len()]`.
        let mut held = 0u64..0u64;
        ZeroPages::build(len, |offset, granule| {
            let end = offset + granule; // inside the source: `build` asks for its granules only
            if offset < held.start || end > held.end {
                if !go_on() {
                    return Err(SourceError {
                        offset,
                        len: granule,
                        source_name: self.name.clone(),
                        what: "zero scan stopped: the source is no longer used".into(),
                        retry: Retry::Permanent,
                        cause: None,
                    });
                }
                // Granules come in order and a chunk holds whole granules: read the next chunk.
                let n = chunk
                    .len()
                    .min(usize::try_from(len - offset).unwrap_or(usize::MAX));
                self.pread_exact(offset, &mut chunk[..n])?;
                held = offset..offset + n as u64;
            }
            let at = usize::try_from(offset - held.start).expect("inside the held chunk");
            let g = usize::try_from(granule).expect("a granule is at most 4 KiB");
            Ok::<bool, SourceError>(bytes_are_zero(&chunk[at..at + g]))
        })
    }

    /// How many 4 KiB pages (counting a shorter last page) are all zeros, if
    /// [`MmapSource::with_zero_scan`] was called.
    pub fn zero_pages(&self) -> Option<u64> {
        self.zero.get().map(ZeroPages::zero_granules)
    }

    /// Fill `buf` from the file at `offset` (already checked against the length) with `pread`,
    /// retrying `EINTR` and continuing after short reads. End of file before `buf` is full means
    /// the file shrank since it was opened: a permanent error, never a short read.
    #[doc(alias = "pread")]
    fn pread_exact(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            // In range: offset + len was checked not to overflow.
            let at = offset + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => return Err(self.shrunk(offset, len, at)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SourceError::from_io(&self.name, offset, len, e)),
            }
        }
        Ok(())
    }

    /// The error for a read at `offset` that met the end of the file at `at`.
    fn shrunk(&self, offset: u64, len: u64, at: u64) -> SourceError {
        SourceError {
            offset,
            len,
            source_name: self.name.clone(),
            what: format!(
                "the file is shorter than when it was opened ({} bytes then; no data at offset \
                 {at:#x} now): truncated under the source",
                self.len()
            ),
            retry: Retry::Permanent,
            cause: None,
        }
    }
}

impl PageSource for MmapSource {
    fn len(&self) -> u64 {
        u64::try_from(self.map.len()).expect("a mapping's length fits u64")
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    /// `pread` from the mapped file (never a copy out of the mapping: see the module docs).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_bounds(&self.name, offset, buf.len() as u64, self.len())?;
        self.pread_exact(offset, buf)
    }

    /// A pointer into the mapping, for the kernel (`UFFDIO_COPY`): this process never reads
    /// through it. If the file was truncated, the kernel's read fails with `EFAULT`.
    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        check_bounds(&self.name, offset, len, self.len()).ok()?;
        // Both fit usize: they lie inside the mapping (checked above).
        self.map
            .ptr_at(usize::try_from(offset).ok()?, usize::try_from(len).ok()?)
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        self.zero.get()?.query(offset, len, |o, l| {
            let mut page = [0u8; ZERO_GRANULE_BYTES];
            let buf = &mut page[..usize::try_from(l).ok()?];
            self.read_at(o, buf).ok()?;
            Some(bytes_are_zero(buf))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::Retry;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const P: usize = 4096;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 253).to_le_bytes()[0] ^ (i / P).to_le_bytes()[0])
            .collect()
    }

    fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// The `len` bytes at a pointer lent by `ptr_at`, as the kernel reads them: written to a
    /// socket with `writev` (this process never reads through a lent pointer) and read back.
    fn copy_from_lent(ptr: *const u8, len: usize) -> Vec<u8> {
        use std::io::Read;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let piece = faultline_uffd::socket::IoPiece::from_raw(ptr, len);
        assert_eq!(faultline_uffd::socket::writev(&a, &[piece]).unwrap(), len);
        let mut out = vec![0u8; len];
        b.read_exact(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_back_what_was_written() {
        let data = pattern(6 * P + 77);
        let f = temp_with(&data);
        let s = MmapSource::open(f.path()).unwrap();
        assert_eq!(s.len(), data.len() as u64);
        assert_eq!(s.name(), f.path().display().to_string());
        let mut buf = vec![0u8; 3 * P];
        s.read_at(2 * P as u64, &mut buf).unwrap();
        assert_eq!(buf, data[2 * P..5 * P]);
        let mut tail = vec![0u8; P + 77];
        s.read_at(5 * P as u64, &mut tail).unwrap();
        assert_eq!(tail, data[5 * P..]);
    }

    #[test]
    fn populated_from_file_reads_back_and_outlives_the_file() {
        let data = pattern(4 * P);
        let f = temp_with(&data);
        let file = f.reopen().unwrap();
        let s = MmapSource::options()
            .populate(true)
            .map_file(&file)
            .unwrap()
            .with_name("snap");
        drop(file);
        assert_eq!(s.name(), "snap");
        let mut all = vec![0u8; data.len()];
        s.read_at(0, &mut all).unwrap();
        assert_eq!(all, data);
    }

    #[test]
    fn ptr_at_bytes_equal_read_at_bytes() {
        let data = pattern(4 * P);
        let f = temp_with(&data);
        let s = MmapSource::open(f.path()).unwrap();
        let ptr = s.ptr_at(P as u64, 2 * P as u64).unwrap();
        let mut buf = vec![0u8; 2 * P];
        s.read_at(P as u64, &mut buf).unwrap();
        assert_eq!(copy_from_lent(ptr, 2 * P), buf);
        assert_eq!(buf, data[P..3 * P]);
        // Pointers are into one mapping: offsets translate to addresses.
        assert_eq!(s.ptr_at(0, 1).unwrap().wrapping_add(P), ptr);
        assert_eq!(s.ptr_at(3 * P as u64, P as u64 + 1), None);
    }

    #[test]
    fn out_of_range_is_permanent_and_names_offset() {
        let f = temp_with(&pattern(2 * P));
        let s = MmapSource::open(f.path()).unwrap();
        let mut buf = vec![0u8; P];
        let e = s.read_at(P as u64 + 8, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, P as u64 + 8);
        assert!(e.to_string().contains("0x1008"), "{e}");
        assert!(s.read_at(u64::MAX - 1, &mut buf).is_err());
    }

    #[test]
    fn empty_file_maps_as_an_empty_source() {
        let f = temp_with(&[]);
        let s = MmapSource::open(f.path())
            .unwrap()
            .with_zero_scan()
            .unwrap();
        assert!(s.is_empty());
        s.read_at(0, &mut []).unwrap();
        assert!(s.read_at(0, &mut [0u8; 1]).is_err());
        assert_eq!(s.zero_pages(), Some(0));
    }

    #[test]
    fn writes_to_the_file_show_through_the_shared_mapping() {
        // Pins the documented semantics: the source is a view of the file, not a copy.
        let f = temp_with(&pattern(2 * P));
        let s = MmapSource::open(f.path()).unwrap();
        f.as_file().write_all_at(&[0xee; 16], P as u64).unwrap();
        let mut buf = [0u8; 16];
        s.read_at(P as u64, &mut buf).unwrap();
        assert_eq!(buf, [0xee; 16]);
    }

    #[test]
    fn a_background_zero_scan_serves_at_once_and_answers_once_done() {
        let mut data = vec![0u8; 8 * P];
        data[P + 5] = 1; // page 1 non-zero
        data[3 * P..4 * P].fill(9); // page 3 non-zero
        let f = temp_with(&data);
        let s = MmapSource::open(f.path())
            .unwrap()
            .with_background_zero_scan();
        // Serves the right bytes whether or not the scan is done.
        let mut page = vec![0u8; P];
        s.read_at(3 * P as u64, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 9));
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.zero_pages().is_none() {
            assert!(std::time::Instant::now() < end, "the scan never ended");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(s.zero_pages(), Some(6));
        assert_eq!(s.is_zero(0, P as u64), Some(true));
        assert_eq!(s.is_zero(P as u64, P as u64), Some(false));
        assert_eq!(s.is_zero(4 * P as u64, 4 * P as u64), Some(true));
    }

    #[test]
    fn zero_scan_finds_zero_pages() {
        let mut data = vec![0u8; 5 * P + 10];
        data[P + 5] = 1; // page 1 non-zero
        data[3 * P..4 * P].fill(9); // page 3 non-zero
        let f = temp_with(&data);
        let plain = MmapSource::open(f.path()).unwrap();
        assert_eq!(plain.is_zero(0, P as u64), None);
        assert_eq!(plain.zero_pages(), None);
        let s = plain.with_zero_scan().unwrap();
        assert_eq!(s.zero_pages(), Some(4));
        assert_eq!(s.is_zero(0, P as u64), Some(true));
        assert_eq!(s.is_zero(P as u64, P as u64), Some(false));
        assert_eq!(s.is_zero(2 * P as u64, P as u64), Some(true));
        assert_eq!(s.is_zero(2 * P as u64, 2 * P as u64), Some(false));
        assert_eq!(s.is_zero(4 * P as u64, P as u64 + 10), Some(true));
        // Unaligned: the zero part of page 1 is zero.
        assert_eq!(s.is_zero(P as u64 + 6, P as u64 - 6), Some(true));
        assert_eq!(s.is_zero(P as u64, 6), Some(false));
        assert_eq!(s.is_zero(5 * P as u64, P as u64), None);
    }

    /// A file of 300 pages and 10 bytes (more than one 1 MiB scan chunk, not a whole number of
    /// pages) with non-zero bytes at the first and last byte of pages on both sides of the chunk
    /// boundary (page 256): the scan marks exactly the pages that are zero, as a byte-by-byte
    /// look at the data does.
    #[test]
    fn zero_scan_marks_exactly_the_zero_pages_across_chunks() {
        let pages = 300;
        let mut data = vec![0u8; pages * P + 10];
        let non_zero = [
            (1, 0),
            (3, P - 1),
            (255, P - 1),
            (256, 0),
            (257, 17),
            (299, P - 1),
        ];
        for &(page, at) in &non_zero {
            data[page * P + at] = 0x5a;
        }
        let f = temp_with(&data);
        let s = MmapSource::open(f.path())
            .unwrap()
            .with_zero_scan()
            .unwrap();
        assert_eq!(s.zero_pages(), Some((pages + 1 - non_zero.len()) as u64));
        for page in 0..=pages {
            let start = page * P;
            let len = P.min(data.len() - start);
            let want = !non_zero.iter().any(|&(p, _)| p == page);
            assert_eq!(want, data[start..start + len].iter().all(|&b| b == 0));
            assert_eq!(
                s.is_zero(start as u64, len as u64),
                Some(want),
                "page {page}"
            );
        }
        // The last, 10-byte page is zero; a range running past the end is not answered.
        assert_eq!(s.is_zero((pages * P) as u64, 10), Some(true));
        assert_eq!(s.is_zero((pages * P) as u64, 11), None);
        // A range across the chunk boundary holding a non-zero page.
        assert_eq!(s.is_zero(254 * P as u64, 4 * P as u64), Some(false));
    }

    /// A file truncated under the source: reads past its new end are errors naming the file and
    /// the offset (never a SIGBUS, a short read or zeros), reads before it still work, the zero
    /// scan fails the same way, and `ptr_at` still lends a pointer, which this process never
    /// reads. That this test returns at all shows that no signal was raised.
    #[test]
    fn truncated_file_gives_errors_not_sigbus() {
        let data = pattern(8 * P);
        let f = temp_with(&data);
        let s = MmapSource::open(f.path()).unwrap();
        let scanned = MmapSource::open(f.path())
            .unwrap()
            .with_zero_scan()
            .unwrap();
        f.as_file().set_len(2 * P as u64 + 100).unwrap();
        let name = f.path().display().to_string();

        let mut buf = vec![0u8; P];
        let e = s.read_at(4 * P as u64, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, 4 * P as u64);
        let msg = e.to_string();
        assert!(msg.contains(&name), "{msg}");
        assert!(msg.contains("0x4000"), "{msg}");
        assert!(msg.contains("shorter than when it was opened"), "{msg}");

        // A read that meets the new end part-way fails too: no short read, no zero fill.
        let mut two = vec![0xffu8; 2 * P];
        let e = s.read_at(P as u64, &mut two).unwrap_err();
        assert_eq!((e.offset, e.len), (P as u64, 2 * P as u64));
        assert!(e.to_string().contains("0x2064"), "{e}");

        // Bytes before the new end are still served.
        s.read_at(P as u64, &mut buf).unwrap();
        assert_eq!(buf, data[P..2 * P]);

        // `ptr_at` hands out an address, no read: it is the kernel that will find the hole.
        let base = s.ptr_at(0, 1).unwrap();
        assert_eq!(
            s.ptr_at(4 * P as u64, P as u64),
            Some(base.wrapping_add(4 * P))
        );

        // A source scanned before the truncation answers whole pages from its bitmap and the
        // unaligned edges (which need a read) with "don't know".
        assert_eq!(scanned.is_zero(4 * P as u64, P as u64), Some(false));
        assert_eq!(scanned.is_zero(4 * P as u64 + 1, 8), None);

        // The zero scan reads every page: it reports the truncation instead of dying.
        let e = s.with_zero_scan().map(|_| ()).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        let msg = e.to_string();
        assert!(msg.contains(&name), "{msg}");
        assert!(msg.contains("no data at offset 0x2064"), "{msg}");
        assert!(msg.contains("shorter than when it was opened"), "{msg}");
    }

    /// The lent pointer's bytes are read by the kernel only: a `UFFDIO_COPY` from a page the
    /// file no longer has fails with EFAULT (an error for the one fault), where a read by this
    /// process would have raised SIGBUS. A page still in the file copies as before.
    #[test]
    fn kernel_copy_from_a_truncated_page_fails_with_efault() {
        use faultline_uffd::{CopyMode, Features, Mapping, RegisterMode, ResolveErrorKind, Uffd};
        let data = pattern(4 * P);
        let f = temp_with(&data);
        let s = MmapSource::open(f.path()).unwrap();
        f.as_file().set_len(P as u64).unwrap();
        let uffd = Uffd::new(Features::empty()).unwrap();
        let region = Mapping::anonymous(2 * P).unwrap();
        uffd.register(&region, RegisterMode::MISSING).unwrap();
        let lent = |offset: usize| s.ptr_at(offset as u64, P as u64).unwrap();

        let done = uffd
            .copy_from_ptr(region.addr(), lent(0), P, CopyMode::empty())
            .unwrap();
        assert!(done.is_complete(), "{done:?}");
        let mut page = vec![0u8; P];
        region.read(0, &mut page).unwrap();
        assert_eq!(page, data[..P]);

        let e = uffd
            .copy_from_ptr(region.addr() + P as u64, lent(2 * P), P, CopyMode::empty())
            .unwrap_err();
        assert_eq!(e.kind, ResolveErrorKind::BadAddress, "{e}");
    }
}
