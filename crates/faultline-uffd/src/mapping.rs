//! [`Mapping`]: memory this process owns and lets a userfaultfd fill.
//!
//! Memory registered with a userfaultfd changes underneath the program: a resolve ioctl fills a
//! page that read as absent, MOVE takes pages away, REMOVE zaps them. Rust references (`&[u8]`)
//! over such memory would be unsound, so a `Mapping` never hands one out: it is accessed through
//! raw pointers and volatile reads and writes only (the discipline of rust-vmm's `vm-memory`).
//! Because of that, registering a `Mapping` is safe, while registering an arbitrary address range
//! is `unsafe` ([`crate::Uffd::register_raw`]).
//!
//! Kinds follow what userfaultfd distinguishes: private anonymous memory (MISSING, WP; resolved
//! with COPY / ZEROPAGE / MOVE / POISON), shared memory from a memfd (MISSING, WP, MINOR; the page
//! cache can be filled through a second mapping, [`Mapping::alias`], then mapped with CONTINUE),
//! and hugetlbfs with 2 MiB pages, private (anonymous `MAP_HUGETLB`) or shared (a hugetlb memfd).
//!
//! # All the crate's raw memory
//! This module and `sys` (the raw kernel calls) are the only files of the product with `unsafe`
//! code. Here is every mapping this process makes and every access to one:
//! - [`Mapping`]: memory a userfaultfd fills, reached only through volatile access;
//! - [`ScratchPages`] (documented in [`crate::scratch`]): an anonymous buffer never registered,
//!   lent as `&mut [u8]` while exclusively borrowed, whose pages `UFFDIO_MOVE` takes away;
//! - [`FileMapping`]: a read-only shared mapping of a file whose bytes only the kernel reads
//!   (`UFFDIO_COPY` from it, `writev` of it), so a file truncated or written underneath can
//!   cause an `EFAULT` for one call, never a `SIGBUS` or a changed `&[u8]` in this process.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::MemfdFlags;
use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, MremapFlags, ProtFlags};

use crate::error::{Error, RangeError};

/// The base page size of x86_64 and most Linux targets.
pub const PAGE_SIZE: usize = 4096;
/// The size of a PMD-level huge page on x86_64.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// What kind of memory a [`Mapping`] is, which decides the register modes and ioctls it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    PrivateAnonymous,
    /// `MAP_SHARED` of a memfd (shmem).
    Shmem,
    /// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB` with 2 MiB pages.
    HugetlbPrivate,
    /// `MAP_SHARED` of a `MFD_HUGETLB` memfd with 2 MiB pages.
    HugetlbShared,
}

impl MemoryKind {
    /// The page size of this kind.
    pub fn page_size(self) -> usize {
        match self {
            MemoryKind::PrivateAnonymous | MemoryKind::Shmem => PAGE_SIZE,
            MemoryKind::HugetlbPrivate | MemoryKind::HugetlbShared => HUGE_PAGE_SIZE,
        }
    }
    /// Whether this is hugetlbfs memory.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, MemoryKind::HugetlbPrivate | MemoryKind::HugetlbShared)
    }
    /// Whether the memory has a page cache (shmem or shared hugetlbfs), which MINOR mode needs.
    pub fn is_shared(self) -> bool {
        matches!(self, MemoryKind::Shmem | MemoryKind::HugetlbShared)
    }
    /// All kinds.
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::PrivateAnonymous,
        MemoryKind::Shmem,
        MemoryKind::HugetlbPrivate,
        MemoryKind::HugetlbShared,
    ];
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryKind::PrivateAnonymous => "private anonymous",
            MemoryKind::Shmem => "shmem",
            MemoryKind::HugetlbPrivate => "private hugetlbfs",
            MemoryKind::HugetlbShared => "shared hugetlbfs",
        })
    }
}

/// A memory mapping owned by this process, accessed only through raw pointers and volatile
/// operations, that can be registered with a userfaultfd. Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    kind: MemoryKind,
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain process memory; `Mapping` never creates references into it, and all
// access is through volatile reads/writes of raw pointers, which are fine from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access only performs volatile operations and kernel calls.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `kind` memory (rounded up to the kind's page size).
    pub fn new(kind: MemoryKind, len: usize) -> Result<Mapping, Error> {
        let page = kind.page_size();
        let len = len
            .checked_next_multiple_of(page)
            .filter(|l| *l > 0)
            .ok_or(RangeError::Empty { start: 0 })?;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let (ptr, fd) = match kind {
            MemoryKind::PrivateAnonymous | MemoryKind::HugetlbPrivate => {
                let mut flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
                if kind.is_hugetlb() {
                    flags |= MapFlags::HUGETLB;
                }
                // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
                let p =
                    unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, prot, flags) }
                        .map_err(Error::os("mmap"))?;
                (p, None)
            }
            MemoryKind::Shmem | MemoryKind::HugetlbShared => {
                let mut mflags = MemfdFlags::CLOEXEC;
                if kind.is_hugetlb() {
                    mflags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
                }
                let fd = rustix::fs::memfd_create("faultline", mflags)
                    .map_err(Error::os("memfd_create"))?;
                rustix::fs::ftruncate(&fd, len as u64).map_err(Error::os("ftruncate"))?;
                let p = map_shared(&fd, len)?;
                (p, Some(fd))
            }
        };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::Os {
            operation: "mmap",
            errno: Errno::NOMEM,
        })?;
        Ok(Mapping { ptr, len, kind, fd })
    }

    /// Private anonymous memory.
    pub fn anonymous(len: usize) -> Result<Mapping, Error> {
        Mapping::new(MemoryKind::PrivateAnonymous, len)
    }

    /// A second shared mapping of the same memfd (shmem / shared hugetlbfs only), not registered
    /// with anything: writing through it fills the page cache, as a MINOR-mode handler does before
    /// `UFFDIO_CONTINUE`.
    pub fn alias(&self) -> Result<Mapping, Error> {
        let fd = self.fd.as_ref().ok_or(Error::Os {
            operation: "alias of a private mapping",
            errno: Errno::INVAL,
        })?;
        let fd = fd.try_clone().map_err(|e| Error::Os {
            operation: "dup",
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        let p = map_shared(&fd, self.len)?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Error::Os {
            operation: "mmap",
            errno: Errno::NOMEM,
        })?;
        Ok(Mapping {
            ptr,
            len: self.len,
            kind: self.kind,
            fd: Some(fd),
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    /// Raw pointer to the start. Access through it must be volatile or by the kernel.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The kind of memory.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// The page size.
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }
    /// The memfd behind a shared mapping.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// Check `offset..offset+len` is inside the mapping; returns the absolute address.
    pub fn check(&self, offset: usize, len: usize) -> Result<u64, RangeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr() + offset as u64),
            _ => Err(RangeError::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                mapping_len: self.len as u64,
            }),
        }
    }

    /// Read one byte (a volatile load: touching a missing registered page faults here).
    pub fn read_u8(&self, offset: usize) -> Result<u8, RangeError> {
        self.check(offset, 1)?;
        // SAFETY: in bounds of a live mapping; volatile, no reference is created.
        Ok(unsafe { self.ptr.as_ptr().wrapping_add(offset).read_volatile() })
    }

    /// Write one byte (a volatile store).
    pub fn write_u8(&self, offset: usize, value: u8) -> Result<(), RangeError> {
        self.check(offset, 1)?;
        // SAFETY: in bounds of a live, writable mapping; volatile, no reference is created.
        unsafe { self.ptr.as_ptr().wrapping_add(offset).write_volatile(value) };
        Ok(())
    }

    /// Copy `buf.len()` bytes at `offset` into `buf` with volatile loads (8 bytes at a time).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), RangeError> {
        self.check(offset, buf.len())?;
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < buf.len() {
            let here = offset + i;
            if here % 8 == 0 && buf.len() - i >= 8 {
                // SAFETY: in bounds (checked above), 8-byte aligned because the mapping is
                // page-aligned and `here` is a multiple of 8; volatile load.
                let w = unsafe { base.wrapping_add(here).cast::<u64>().read_volatile() };
                buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: in bounds (checked above); volatile load of one byte.
                buf[i] = unsafe { base.wrapping_add(here).read_volatile() };
                i += 1;
            }
        }
        Ok(())
    }

    /// Copy `data` to `offset` with volatile stores (8 bytes at a time).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), RangeError> {
        self.check(offset, data.len())?;
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < data.len() {
            let here = offset + i;
            if here % 8 == 0 && data.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&data[i..i + 8]);
                // SAFETY: in bounds, 8-byte aligned (see `read`); volatile store.
                unsafe {
                    base.wrapping_add(here)
                        .cast::<u64>()
                        .write_volatile(u64::from_ne_bytes(w))
                };
                i += 8;
            } else {
                // SAFETY: in bounds; volatile store of one byte.
                unsafe { base.wrapping_add(here).write_volatile(data[i]) };
                i += 1;
            }
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` on a page-aligned sub-range: drops the pages (a registered range
    /// with EVENT_REMOVE reports a REMOVE event, and the pages fault again when touched).
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), Error> {
        self.advise(offset, len, Advice::LinuxDontNeed)
    }

    /// `madvise(MADV_REMOVE)`: frees the backing store of shared memory (punches a hole).
    pub fn remove(&self, offset: usize, len: usize) -> Result<(), Error> {
        self.advise(offset, len, Advice::LinuxRemove)
    }

    fn advise(&self, offset: usize, len: usize, advice: Advice) -> Result<(), Error> {
        let addr = self.check(offset, len)?;
        crate::error::check_range(addr, len as u64, self.page_size() as u64)?;
        // SAFETY: the range lies inside this mapping, which holds no Rust references; dropping
        // its pages only changes what later volatile reads return.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().wrapping_add(offset).cast(), len, advice) }
            .map_err(Error::os("madvise"))
    }

    /// Move the mapping to a new address with `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`-free
    /// semantics: grows or moves as the kernel chooses. With EVENT_REMAP negotiated on a registered
    /// range, the handler receives a REMAP event (and `mremap` waits until it has been read).
    pub fn remap(mut self, new_len: usize) -> Result<Mapping, (Mapping, Error)> {
        let new_len = match new_len.checked_next_multiple_of(self.page_size()) {
            Some(l) if l > 0 => l,
            _ => return Err((self, RangeError::Empty { start: 0 }.into())),
        };
        // Force a move: reserve a fresh area and move onto it, so the REMAP event is guaranteed.
        let mut target = match Mapping::new(self.kind, new_len) {
            Ok(t) => t,
            Err(e) => return Err((self, e)),
        };
        let dst = target.ptr.as_ptr();
        // Only the reservation's address range is kept; its memfd (shared kinds) is closed here,
        // else every remap would leak an fd and, for hugetlbfs, the file's huge page reservation.
        drop(target.fd.take());
        std::mem::forget(target);
        // SAFETY: `self` owns `self.len` bytes at `self.ptr`; `dst` is a reservation we own of
        // `new_len` bytes, which MREMAP_FIXED replaces. No references exist into either.
        let r = unsafe {
            rustix::mm::mremap_fixed(
                self.ptr.as_ptr().cast(),
                self.len,
                new_len,
                MremapFlags::MAYMOVE,
                dst.cast(),
            )
        };
        match r {
            Ok(p) => {
                self.ptr = NonNull::new(p.cast::<u8>()).expect("mremap never returns null");
                self.len = new_len;
                Ok(self)
            }
            Err(e) => {
                // SAFETY: the reservation at `dst` is ours and nothing points into it.
                let _ = unsafe { rustix::mm::munmap(dst.cast(), new_len) };
                Err((self, Error::os("mremap")(e)))
            }
        }
    }
}

fn map_shared(fd: &OwnedFd, len: usize) -> Result<*mut core::ffi::c_void, Error> {
    // SAFETY: a fresh shared mapping of our own memfd at an address the kernel picks; it aliases
    // only other `Mapping`s of the same memfd, which are also never referenced directly.
    unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )
    }
    .map_err(Error::os("mmap"))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers into it once `self` is dropped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A page-aligned, unregistered anonymous buffer of this process.
#[derive(Debug)]
/// See [`crate::scratch`] for what it is for.
pub struct ScratchPages {
    map: Mapping,
}

impl ScratchPages {
    /// At least `len` bytes (rounded up to whole pages).
    pub fn new(len: usize) -> Result<ScratchPages, Error> {
        let map = Mapping::new(MemoryKind::PrivateAnonymous, len)?;
        // Small pages only: moving 4 KiB pieces out of a transparent huge page would need a split.
        // SAFETY: advice on our own fresh mapping, which nothing refers into yet; it changes no
        // contents.
        let r = unsafe {
            rustix::mm::madvise(
                map.as_ptr().cast(),
                map.len(),
                rustix::mm::Advice::LinuxNoHugepage,
            )
        };
        r.map_err(Error::os("madvise(MADV_NOHUGEPAGE)"))?;
        Ok(ScratchPages { map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// The buffer as a slice, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is private anonymous memory of this process, live for `self`'s
        // lifetime, never registered with a userfaultfd (the type offers no way to) and reachable
        // only through `self`, which is exclusively borrowed for the slice's lifetime; pages moved
        // out earlier by UFFDIO_MOVE are plain holes that fault in zero pages on access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }

    /// Check `offset..offset+len` lies inside; returns the absolute address.
    pub(crate) fn check(&self, offset: usize, len: usize) -> Result<u64, RangeError> {
        self.map.check(offset, len)
    }
}

/// A read-only shared mapping of a file (`MAP_SHARED`, `PROT_READ`), whose bytes only the kernel
/// reads: it lends raw addresses ([`FileMapping::ptr_at`]) for `UFFDIO_COPY`
/// ([`crate::Uffd::copy_from_ptr`]) and for `writev` ([`crate::socket::IoPiece::from_raw`]).
///
/// A file mapping can change underneath the program (another writer) and can stop existing (a
/// truncation: touching a page past the new end from user space raises `SIGBUS`). So this type
/// never forms a `&[u8]` over it and never dereferences a pointer into it; the kernel, reading the
/// same page for one of those calls, fails that call with `EFAULT` instead. User space reads the
/// file with `pread` on its own descriptor. Unmapped on drop.
#[derive(Debug)]
pub struct FileMapping {
    ptr: NonNull<u8>,
    /// The file's length when it was mapped.
    len: usize,
    /// The length of the mapping itself: `len`, or one page for an empty file (`mmap(2)` refuses
    /// a length of zero).
    map_len: usize,
}

// SAFETY: the mapping is read-only process memory that this type never reads nor lends as a
// reference; it only hands out addresses, which are plain integers for the kernel. Nothing about it
// is tied to a thread.
unsafe impl Send for FileMapping {}
// SAFETY: as above; shared access only reads the pointer value.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Map all of `file` (open for reading) read-only and shared, with its length now;
    /// `populate` adds `MAP_POPULATE` (the kernel reads the whole file in at once). An empty file
    /// gives an empty mapping.
    pub fn new(file: impl AsFd, populate: bool) -> Result<FileMapping, Error> {
        let file = file.as_fd();
        let size = rustix::fs::fstat(file).map_err(Error::os("fstat"))?.st_size;
        let len = u64::try_from(size)
            .ok()
            .and_then(|l| usize::try_from(l).ok())
            .filter(|l| isize::try_from(*l).is_ok())
            .ok_or(Error::Os {
                operation: "mmap of a file larger than the address space",
                errno: Errno::FBIG,
            })?;
        let map_len = len.max(1);
        let mut flags = MapFlags::SHARED;
        if populate {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: a fresh read-only mapping of a file at an address the kernel picks aliases no
        // memory of this program. Its contents may change or vanish underneath (other writers, a
        // truncation), which is why this type never reads it nor lends a reference into it.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                ProtFlags::READ,
                flags,
                file,
                0,
            )
        }
        .map_err(Error::os("mmap"))?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Error::Os {
            operation: "mmap",
            errno: Errno::NOMEM,
        })?;
        Ok(FileMapping { ptr, len, map_len })
    }

    /// The file's length when it was mapped, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address, for the kernel. Nothing may read through it in user space.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The address of byte `offset`, if `offset..offset + len` lies inside the file as mapped:
    /// for the kernel only (`UFFDIO_COPY`, `writev`); this process must never read through it.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        // `wrapping_add` keeps this safe code: the result is only ever handed to the kernel.
        (end <= self.len).then(|| self.as_ptr().wrapping_add(offset))
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping of `map_len` bytes and no Rust reference into it was ever
        // made (the addresses it lent are for the kernel, which validates them on each call).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_read_write_round_trip() {
        let m = Mapping::anonymous(3 * PAGE_SIZE).expect("mmap");
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
        m.write(3, &data).expect("write");
        let mut back = vec![0u8; data.len()];
        m.read(3, &mut back).expect("read");
        assert_eq!(back, data);
        assert_eq!(m.read_u8(3 * PAGE_SIZE - 1), Ok(0));
        assert!(matches!(
            m.read_u8(3 * PAGE_SIZE),
            Err(RangeError::OutOfBounds { .. })
        ));
        assert!(m.write(3 * PAGE_SIZE - 2, &[1, 2, 3]).is_err());
    }

    /// A file mapping lends addresses inside the file as mapped and nothing past it; an empty
    /// file maps as empty. The bytes are checked as the kernel reads them (`writev`).
    #[test]
    fn a_file_mapping_lends_addresses_inside_the_file_only() {
        use std::io::{Read, Write};
        let path = std::env::temp_dir().join(format!("faultline-filemap-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).expect("create");
        let data: Vec<u8> = (0..3 * PAGE_SIZE + 10)
            .map(|i| (i % 251).to_le_bytes()[0])
            .collect();
        f.write_all(&data).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let map = FileMapping::new(&file, true).expect("mmap");
        assert_eq!(map.len(), data.len());
        let p = map.ptr_at(PAGE_SIZE, 100).expect("inside");
        assert_eq!(p, map.as_ptr().wrapping_add(PAGE_SIZE));
        assert!(map.ptr_at(data.len() - 5, 5).is_some());
        assert_eq!(map.ptr_at(data.len() - 5, 6), None);
        assert_eq!(map.ptr_at(usize::MAX, 2), None);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let n = crate::socket::writev(&a, &[crate::socket::IoPiece::from_raw(p, 100)]);
        assert_eq!(n, Ok(100));
        let mut got = [0u8; 100];
        b.read_exact(&mut got).expect("read");
        assert_eq!(got[..], data[PAGE_SIZE..PAGE_SIZE + 100]);

        f.set_len(0).expect("truncate");
        let empty = FileMapping::new(&file, false).expect("mmap of an empty file");
        assert!(empty.is_empty());
        assert_eq!(empty.ptr_at(0, 0), Some(empty.as_ptr()));
        assert_eq!(empty.ptr_at(0, 1), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn alias_shares_the_page_cache() {
        let m = Mapping::new(MemoryKind::Shmem, PAGE_SIZE).expect("memfd");
        let a = m.alias().expect("alias");
        a.write(100, b"hello").expect("write");
        let mut b = [0u8; 5];
        m.read(100, &mut b).expect("read");
        assert_eq!(&b, b"hello");
        assert!(Mapping::anonymous(PAGE_SIZE)
            .expect("mmap")
            .alias()
            .is_err());
    }
}
