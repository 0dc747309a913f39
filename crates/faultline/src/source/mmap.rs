//! A file mapped into this process with `mmap(2)`: one copy per page.
//!
//! [`MmapSource`] maps the file read-only (`MAP_SHARED`, `PROT_READ`) and lends pointers into the
//! mapping ([`PageSource::ptr_at`]). The server hands them to `UFFDIO_COPY`, so the kernel copies
//! each page straight from the page cache into the faulting process: one copy in total, against
//! two for `pread` into a buffer and then `UFFDIO_COPY` from it. `populate(true)` adds
//! `MAP_POPULATE`, which reads the whole file in at open so no fault of ours is taken on the
//! source side later (worth it when most of the file will be served).
//!
//! # Why this module uses `unsafe`, and the rules it keeps
//! A file mapping is memory that can change underneath us: another process may write the file,
//! and that write shows through our mapping (it is a shared mapping; a private one would show it
//! too, as long as we never write). So, following STYLE.md rule 3, this module never forms a
//! `&[u8]` over the mapping (memmap2's `Deref` is never used): it only takes the mapping's base
//! pointer and copies out of it with `std::ptr::copy_nonoverlapping` into the caller's buffer.
//! Because no reference exists, a concurrent writer cannot break a Rust aliasing guarantee; at
//! worst a read returns a mix of old and new bytes, which is the caller's problem: a source serves
//! a snapshot file that must not be written while it is served.
//!
//! Truncation is the other hazard: touching a page of the mapping past the new end of the file
//! raises `SIGBUS` in this process (`read_at`, `with_zero_scan`), and makes a `UFFDIO_COPY` from a
//! lent pointer fail with `EFAULT`. The file must therefore keep its length while the source
//! lives. This is the same contract as every mmap-based reader (and the reason memmap2's
//! constructors are `unsafe`); we take it on in [`MmapSource::open`] and document it rather than
//! pass `unsafe` on to every caller, as `vm-memory` does for its file-backed regions.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::Mmap;

use super::memory::{bytes_are_zero, ZeroPages, ZERO_GRANULE};
use super::{check_bounds, PageSource, SourceError};

/// A read-only shared mapping of a file, lending pointers into it for one-copy resolves.
///
/// The file must keep its length while the source lives: copying from a page past a new, shorter
/// end raises `SIGBUS` in this process (and a `UFFDIO_COPY` from a lent pointer fails with
/// `EFAULT`). Writes to the file show through the mapping; the source copies out of it only
/// through raw pointers, never through `&[u8]`, so a writer can change the bytes served but not
/// break memory safety.
#[derive(Debug)]
pub struct MmapSource {
    map: Mmap,
    name: String,
    zero: Option<ZeroPages>,
}

/// How to map a file: see [`MmapSource::options`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmapSourceOptions {
    populate: bool,
}

impl MmapSourceOptions {
    /// Pre-fault the whole mapping at open (`MAP_POPULATE`): open reads the file in, later
    /// copies out of the mapping find it resident. Off by default.
    pub fn populate(mut self, populate: bool) -> MmapSourceOptions {
        self.populate = populate;
        self
    }

    /// Map the file at `path`.
    pub fn open(self, path: impl AsRef<Path>) -> io::Result<MmapSource> {
        let path = path.as_ref();
        let file = File::open(path)?;
        let mut source = self.map_file(&file)?;
        source.name = path.display().to_string();
        Ok(source)
    }

    /// Map an open file (open for reading). The file may be closed afterwards: the mapping
    /// keeps its own reference.
    pub fn map_file(self, file: &File) -> io::Result<MmapSource> {
        let mut options = memmap2::MmapOptions::new();
        if self.populate {
            options.populate();
        }
        // SAFETY: memmap2 asks the caller to make sure the file is not modified or truncated
        // while mapped, because its `Mmap` dereferences to `&[u8]`. This module never uses that
        // `Deref` (it only copies out through the raw base pointer, see the module docs), so a
        // concurrent write cannot invalidate a reference; truncation (SIGBUS) is the documented
        // contract of `MmapSource`.
        let map = unsafe { options.map(file) }?;
        Ok(MmapSource {
            map,
            name: "mmap".to_string(),
            zero: None,
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
    /// `UFFDIO_ZEROPAGE`). Without it `is_zero` answers `None`. Reads every page of the file.
    pub fn with_zero_scan(mut self) -> MmapSource {
        let mut page = [0u8; ZERO_GRANULE as usize];
        let zero = ZeroPages::build(self.len(), |offset, len| {
            let buf = &mut page[..len as usize];
            self.read_at(offset, buf).map(|()| bytes_are_zero(buf))
        });
        self.zero = Some(zero.expect("ZeroPages::build only asks for granules inside the source"));
        self
    }

    /// How many 4 KiB pages (counting a shorter last page) are all zeros, if
    /// [`MmapSource::with_zero_scan`] was called.
    pub fn zero_pages(&self) -> Option<u64> {
        self.zero.as_ref().map(ZeroPages::zero_granules)
    }

    /// The address of byte `offset` of the mapping, for an `offset` already checked against the
    /// length. `wrapping_add` keeps this safe code: the result is only dereferenced (by
    /// `read_at`, or by the kernel) within the checked range.
    fn addr(&self, offset: u64) -> *const u8 {
        let offset = usize::try_from(offset).expect("offset checked against the mapping length");
        self.map.as_ptr().wrapping_add(offset)
    }
}

impl PageSource for MmapSource {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_bounds(&self.name, offset, buf.len() as u64, self.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let src = self.addr(offset);
        // SAFETY: `src..src + buf.len()` lies inside the mapping (checked above), which stays
        // mapped and readable while `self` lives (and the file keeps its length, the documented
        // contract). `buf` is an exclusively borrowed allocation of ours, not part of the
        // read-only mapping, so the ranges do not overlap. `u8` needs no alignment and every bit
        // pattern is valid. No reference to the mapping is formed, so a concurrent writer of the
        // file can only change which bytes we copy.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        check_bounds(&self.name, offset, len, self.len()).ok()?;
        Some(self.addr(offset))
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        self.zero.as_ref()?.query(offset, len, |o, l| {
            let mut page = [0u8; ZERO_GRANULE as usize];
            let buf = &mut page[..l as usize];
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
        (0..len).map(|i| (i % 253) as u8 ^ (i / P) as u8).collect()
    }

    fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// Copy `len` bytes from a pointer lent by `ptr_at`.
    fn copy_from_lent(ptr: *const u8, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: `ptr` came from `ptr_at(_, len)` of a source that is still alive, so it
        // points at `len` readable bytes of the mapping; `out` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), len) };
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
        let s = MmapSource::open(f.path()).unwrap().with_zero_scan();
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
    fn zero_scan_finds_zero_pages() {
        let mut data = vec![0u8; 5 * P + 10];
        data[P + 5] = 1; // page 1 non-zero
        data[3 * P..4 * P].fill(9); // page 3 non-zero
        let f = temp_with(&data);
        let plain = MmapSource::open(f.path()).unwrap();
        assert_eq!(plain.is_zero(0, P as u64), None);
        assert_eq!(plain.zero_pages(), None);
        let s = plain.with_zero_scan();
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
}
