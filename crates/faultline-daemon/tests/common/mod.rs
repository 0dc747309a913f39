//! Shared by the daemon's integration tests: a snapshot memory file, and a client that plays
//! Firecracker's side in this process (maps guest memory, registers a userfaultfd, sends the
//! handshake, touches and verifies every page).
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use faultline::firecracker::{send_handshake, GuestRegionUffdMapping, JsonShape};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};

/// The content's seed.
pub const SEED: u64 = 0xdae_0017;

/// Page size of the tests' guests.
pub const PAGE: u64 = 4096;

/// Writes a snapshot memory file of `pages` pages: pattern pages, every 5th page zero.
pub fn write_mem_file(path: &Path, pages: u64) {
    let mut bytes = vec![0u8; usize::try_from(pages * PAGE).expect("a test-sized file")];
    for (p, page) in (0u64..).zip(bytes.chunks_mut(4096)) {
        if p % 5 != 3 {
            faultline_testing::fill_pattern(SEED, p, page);
        }
    }
    std::fs::write(path, &bytes).expect("writing the memory file");
}

/// Whether this machine can run the tests (prints why not).
pub fn capable(test: &str) -> bool {
    faultline_testing::need_features(test, Features::EVENT_REMOVE)
}

/// What a restore did.
pub struct Restored {
    /// Pages touched and checked.
    pub pages: u64,
    /// The client's socket, kept open as Firecracker does.
    pub socket: UnixStream,
    /// The guest memory.
    pub mapping: Mapping,
}

/// Restore `mem` through the handler at `socket` in two regions: connect, hand over a fresh
/// userfaultfd, touch every page (each faults and is served), and compare every byte with the
/// file. Panics on any difference.
pub fn restore(socket: &Path, mem: &Path) -> Restored {
    let file = std::fs::File::open(mem).expect("opening the memory file");
    let len = file.metadata().expect("stat").len();
    let pages = len / PAGE;
    let uffd = Uffd::new(Features::EVENT_REMOVE).expect("a userfaultfd");
    let mapping = Mapping::new(
        MemoryKind::PrivateAnonymous,
        usize::try_from(len).expect("fits"),
    )
    .expect("mapping guest memory");
    uffd.register(&mapping, RegisterMode::MISSING)
        .expect("registering guest memory");
    let half = (pages / 2) * PAGE;
    let mappings = [
        GuestRegionUffdMapping {
            base_host_virt_addr: mapping.addr(),
            size: half,
            offset: 0,
            page_size: Some(PAGE),
            page_size_kib: Some(PAGE),
        },
        GuestRegionUffdMapping {
            base_host_virt_addr: mapping.addr() + half,
            size: len - half,
            offset: half,
            page_size: Some(PAGE),
            page_size_kib: Some(PAGE),
        },
    ];
    let stream = UnixStream::connect(socket).expect("connecting to the daemon");
    send_handshake(&stream, &mappings, uffd.as_fd(), None, JsonShape::Both)
        .expect("sending the handshake");
    let page = usize::try_from(PAGE).expect("fits");
    let mut got = vec![0u8; page];
    let mut want = vec![0u8; page];
    for p in 0..pages {
        let off = usize::try_from(p * PAGE).expect("fits");
        mapping.read(off, &mut got).expect("reading guest memory");
        file.read_exact_at(&mut want, p * PAGE)
            .expect("reading the file");
        assert!(got == want, "page {p} differs from the snapshot");
    }
    Restored {
        pages,
        socket: stream,
        mapping,
    }
}
