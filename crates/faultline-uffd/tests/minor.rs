//! MINOR faults, after the kernel's uffd-unit-tests `minor`, `minor-wp` and `minor-collapse`, on
//! the memory kinds that have a page cache (shmem, shared hugetlbfs).
//!
//! The registered mapping and an unregistered alias share one memfd. The test fills the page cache
//! through the alias (which must not fault on the registered side); reading the registered side
//! then takes one MINOR fault per page. Like the selftest's handler, ours first changes the page
//! through the alias (inverting every byte, to prove the faulting thread sees the page cache as it
//! is when CONTINUE maps it), then resolves with `UFFDIO_CONTINUE`, then checks that a second
//! CONTINUE of the same page answers EEXIST.
//! - `minor-wp`: CONTINUE with `MODE_WP` maps the pages write-protected; a write is a WP fault.
//! - `minor-collapse`: `MADV_COLLAPSE` of a MINOR-registered shmem range builds a huge page and
//!   maps it with a PMD, without faults and without changing a byte.
#![allow(unsafe_code)]

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use faultline_testing::{
    minor_features, need_features, need_kind, pattern_page, skip, uffd_wp_bit, within, wp_features,
    FaultServer, Flow,
};
use faultline_uffd::{
    ContinueMode, Error, Event, Features, Ioctls, Mapping, MemoryKind, PagefaultFlags,
    RegisterMode, ResolveErrorKind, Resolved, Uffd, WriteprotectMode, HUGE_PAGE_SIZE, PAGE_SIZE,
};

const LIMIT: Duration = Duration::from_secs(20);

type FaultLog = (u64, PagefaultFlags);

/// The selftest's MINOR handler: invert the page through `alias` (the unregistered side), then
/// CONTINUE (once successfully, once more for EEXIST). WP faults clear the protection.
fn handle(
    uffd: &Uffd,
    ev: Event,
    base: u64,
    alias: &Mapping,
    page_size: usize,
    mode: ContinueMode,
    log: &Sender<FaultLog>,
) {
    let Event::Pagefault { address, flags, .. } = ev else {
        panic!("unexpected event {ev:?}");
    };
    let _ = log.send((address, flags));
    let ps = page_size as u64;
    let page = address & !(ps - 1);
    if flags.contains(PagefaultFlags::WP) {
        uffd.writeprotect(page, ps, WriteprotectMode::empty())
            .expect("clear WP");
        return;
    }
    assert!(
        flags.contains(PagefaultFlags::MINOR),
        "not a MINOR fault: {flags:?}"
    );
    let offset = usize::try_from(page - base).expect("offset");
    let mut page_bytes = vec![0; page_size];
    alias.read(offset, &mut page_bytes).expect("read alias");
    alias
        .write(offset, &inverted(&page_bytes))
        .expect("write alias");
    assert_eq!(
        uffd.continue_minor(page, ps, mode),
        Ok(Resolved::Complete(ps))
    );
    let again = uffd
        .continue_minor(page, ps, mode)
        .expect_err("second CONTINUE");
    assert_eq!(again.kind, ResolveErrorKind::AlreadyPresent);
}

/// One page of `m` at `offset`.
fn read_page(m: &Mapping, offset: usize) -> Vec<u8> {
    let mut buf = vec![0; m.page_size()];
    m.read(offset, &mut buf).expect("read");
    buf
}

fn inverted(page: &[u8]) -> Vec<u8> {
    page.iter().map(|b| !b).collect()
}

fn minor(kind: MemoryKind, wp: bool) {
    let test = if wp { "minor-wp" } else { "minor" };
    let pages = if kind.is_hugetlb() { 2 } else { 8 };
    if !need_kind(test, kind, pages as u64) {
        return;
    }
    let mut features = minor_features(kind).expect("a kind with a page cache");
    let mut mode = RegisterMode::MINOR;
    if wp {
        // As the selftest: no feature flag says "CONTINUE can write-protect"; WP_UNPOPULATED
        // (Linux 6.4) came with it.
        features |= wp_features(kind) | Features::WP_UNPOPULATED;
        mode |= RegisterMode::WP;
    }
    if !need_features(test, features) {
        return;
    }
    let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
    let m = Arc::new(Mapping::new(kind, pages * kind.page_size()).expect("mapping"));
    let alias = Arc::new(m.alias().expect("alias"));
    let (base, ps) = (m.addr(), m.page_size());
    let ioctls = uffd.register(&m, mode).expect("register MINOR");
    assert!(ioctls.contains(Ioctls::CONTINUE));
    if wp {
        assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    }

    // Fill the page cache through the unregistered alias: no faults.
    let data: Vec<Vec<u8>> = (0..pages as u64).map(|p| pattern_page(3, p, ps)).collect();
    for (p, d) in data.iter().enumerate() {
        alias.write(p * ps, d).expect("fill page cache");
    }
    assert_eq!(uffd.stats().events, 0);

    let (tx, faults) = mpsc::channel();
    let a = Arc::clone(&alias);
    let cmode = if wp {
        ContinueMode::WP
    } else {
        ContinueMode::empty()
    };
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        handle(u, ev, base, &a, ps, cmode, &tx);
        Flow::Continue
    });

    // Each page: one MINOR read fault; the reader sees the page cache as the handler left it.
    let reader = Arc::clone(&m);
    let seen_pages = within(LIMIT, move || {
        (0..pages)
            .map(|p| read_page(&reader, p * ps))
            .collect::<Vec<_>>()
    });
    for (p, got) in seen_pages.iter().enumerate() {
        assert!(
            *got == inverted(&data[p]),
            "page {p}: not the page cache's bytes"
        );
    }
    let want: Vec<FaultLog> = (0..pages)
        .map(|p| (base + (p * ps) as u64, PagefaultFlags::MINOR))
        .collect();
    assert_eq!(faults.try_iter().collect::<Vec<_>>(), want);

    if wp {
        // Mapped write-protected: the first write to a page is a WP fault.
        assert!((0..pages).all(|p| uffd_wp_bit(base + (p * ps) as u64)));
        let writer = Arc::clone(&m);
        within(LIMIT, move || writer.write_u8(ps + 7, 0xa5)).expect("write");
        assert_eq!(
            faults.try_iter().collect::<Vec<_>>(),
            vec![(base + ps as u64, PagefaultFlags::WP | PagefaultFlags::WRITE)]
        );
        assert!(!uffd_wp_bit(base + ps as u64) && uffd_wp_bit(base));
    } else {
        let writer = Arc::clone(&m);
        within(LIMIT, move || writer.write_u8(ps + 7, 0xa5)).expect("write");
        assert_eq!(faults.try_iter().count(), 0);
    }
    // Shared memory: the write is in the page cache, visible through the alias.
    assert_eq!(alias.read_u8(ps + 7), Ok(0xa5));
    server.stop();
    let s = uffd.stats();
    let p = pages as u64;
    assert_eq!(
        (s.continue_, s.eexist, s.writeprotect),
        (2 * p, p, u64::from(wp))
    );
}

#[test]
fn minor_shmem() {
    minor(MemoryKind::Shmem, false);
}

#[test]
fn minor_hugetlb_shared() {
    minor(MemoryKind::HugetlbShared, false);
}

#[test]
fn minor_wp_shmem() {
    minor(MemoryKind::Shmem, true);
}

#[test]
fn minor_wp_hugetlb_shared() {
    minor(MemoryKind::HugetlbShared, true);
}

/// MINOR mode needs a page cache: the crate refuses it on private memory (the kernel would
/// answer EINVAL) before any ioctl.
#[test]
fn minor_is_refused_on_private_memory() {
    let uffd = Uffd::builder()
        .request(Features::MINOR_SHMEM | Features::MINOR_HUGETLBFS)
        .create()
        .expect("userfaultfd");
    let m = Mapping::anonymous(PAGE_SIZE).expect("mapping");
    assert!(matches!(
        uffd.register(&m, RegisterMode::MINOR),
        Err(Error::ModeNotSupported {
            kind: MemoryKind::PrivateAnonymous,
            ..
        })
    ));
    assert_eq!(uffd.stats().register, 0);
}

/// A shared mapping of a memfd at a 2 MiB-aligned address (a [`Mapping`] cannot choose its
/// address), which MADV_COLLAPSE needs to map a huge page with a PMD. Unmapped on drop.
struct AlignedShared {
    addr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory, only accessed through raw pointers with volatile operations.
unsafe impl Send for AlignedShared {}
// SAFETY: as above.
unsafe impl Sync for AlignedShared {}

impl AlignedShared {
    fn new(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> AlignedShared {
        use std::os::fd::AsRawFd;
        let span = len + HUGE_PAGE_SIZE;
        // SAFETY: a fresh inaccessible reservation at an address the kernel picks.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(r, libc::MAP_FAILED, "reserve address space");
        let start = r as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_SIZE);
        // SAFETY: replaces part of our own reservation (MAP_FIXED inside it) with the memfd.
        let p = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_eq!(p as usize, aligned, "map the memfd at {aligned:#x}");
        if aligned > start {
            // SAFETY: the unused head of our reservation; nothing refers to it.
            unsafe { libc::munmap(r, aligned - start) };
        }
        let tail = aligned + len;
        if start + span > tail {
            // SAFETY: the unused tail of our reservation; nothing refers to it.
            unsafe { libc::munmap(tail as *mut libc::c_void, start + span - tail) };
        }
        AlignedShared {
            addr: p.cast(),
            len,
        }
    }

    fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= self.len);
        for (i, b) in buf.iter_mut().enumerate() {
            let at = self.addr.wrapping_add(offset + i);
            // SAFETY: in bounds of our live mapping (checked above); volatile, no reference.
            *b = unsafe { at.read_volatile() };
        }
    }
}

impl Drop for AlignedShared {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no references into it.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// `ShmemPmdMapped` of the mapping starting at `addr`, in kB, from `/proc/self/smaps`.
fn shmem_pmd_mapped_kb(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let head = format!("{addr:x}-");
    let mut in_vma = false;
    for line in smaps.lines() {
        if let Some(first) = line.split_whitespace().next() {
            if first.contains('-') && !first.ends_with(':') {
                in_vma = line.starts_with(&head);
                continue;
            }
        }
        if in_vma {
            if let Some(v) = line.strip_prefix("ShmemPmdMapped:") {
                let kb = v.trim().trim_end_matches("kB").trim();
                return kb.parse().expect("ShmemPmdMapped value");
            }
        }
    }
    panic!("no ShmemPmdMapped for the mapping at {addr:#x}");
}

#[test]
fn minor_collapse_shmem() {
    let test = "minor-collapse";
    if !need_features(test, Features::MINOR_SHMEM) {
        return;
    }
    let len = HUGE_PAGE_SIZE;
    let pages = len / PAGE_SIZE;
    let uffd = Arc::new(Uffd::new(Features::MINOR_SHMEM).expect("userfaultfd"));
    // The unregistered side (it owns the memfd) and the registered, PMD-aligned side.
    let plain = Arc::new(Mapping::new(MemoryKind::Shmem, len).expect("memfd"));
    let reg = Arc::new(AlignedShared::new(plain.fd().expect("memfd"), len));
    let base = reg.addr as u64;
    // SAFETY: no Rust reference ever points into `reg`: it is only read with volatile loads
    // through raw pointers, and unmapping it (at the end of the test) ends the registration.
    let ioctls =
        unsafe { uffd.register_raw(base, len as u64, RegisterMode::MINOR) }.expect("register");
    assert!(ioctls.contains(Ioctls::CONTINUE));

    let data: Vec<Vec<u8>> = (0..pages as u64)
        .map(|p| pattern_page(4, p, PAGE_SIZE))
        .collect();
    for (p, d) in data.iter().enumerate() {
        plain.write(p * PAGE_SIZE, d).expect("fill page cache");
    }
    let (tx, faults) = mpsc::channel();
    let a = Arc::clone(&plain);
    let server = FaultServer::spawn(Arc::clone(&uffd), move |u, ev| {
        handle(u, ev, base, &a, PAGE_SIZE, ContinueMode::empty(), &tx);
        Flow::Continue
    });
    let check = |reg: &Arc<AlignedShared>| {
        let reg = Arc::clone(reg);
        within(LIMIT, move || {
            let mut buf = vec![0; PAGE_SIZE];
            (0..pages)
                .map(|p| {
                    reg.read(p * PAGE_SIZE, &mut buf);
                    buf.clone()
                })
                .collect::<Vec<_>>()
        })
    };
    for (p, got) in check(&reg).iter().enumerate() {
        assert!(*got == inverted(&data[p]), "page {p}");
    }
    assert_eq!(faults.try_iter().count(), pages);
    server.stop();

    // SAFETY: collapsing our own mapping keeps its contents; no references point into it.
    let r = unsafe { libc::madvise(reg.addr.cast(), len, libc::MADV_COLLAPSE) };
    if r != 0 {
        // The selftest accepts a refusal too (no THP support, memory pressure).
        let e = std::io::Error::last_os_error();
        skip(
            test,
            &format!("MADV_COLLAPSE on a MINOR-registered shmem range failed: {e}"),
        );
        return;
    }
    assert_eq!(
        shmem_pmd_mapped_kb(base),
        (len / 1024) as u64,
        "not PMD-mapped"
    );
    // No corruption, and no faults: the huge page is mapped.
    let (tx, faults) = mpsc::channel();
    let server = FaultServer::spawn(Arc::clone(&uffd), move |_, ev| {
        let _ = tx.send(ev.fault_address());
        Flow::Continue
    });
    for (p, got) in check(&reg).iter().enumerate() {
        assert!(*got == inverted(&data[p]), "page {p} after the collapse");
    }
    server.stop();
    assert_eq!(faults.try_iter().count(), 0);
    let s = uffd.stats();
    assert_eq!((s.continue_, s.eexist), (2 * pages as u64, pages as u64));
}
