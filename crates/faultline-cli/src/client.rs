//! `faultline client`: a process that does exactly what Firecracker does when it restores a
//! snapshot with a UFFD memory backend — map guest memory, create a userfaultfd (close-on-exec,
//! non-blocking, EVENT_REMOVE), register every region in MISSING mode, connect to the handler's
//! socket and send the region mappings as JSON with the fd attached — and then behaves like a
//! guest: touches its memory and checks every byte against the snapshot file. Used by the demo,
//! the tests and `bench --serve`.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use faultline::firecracker::{self, GuestRegionUffdMapping, JsonShape};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};
use serde::Serialize;

/// How the client touches its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Touch {
    /// In address order.
    Seq,
    /// In a pseudo-random order.
    Rand,
    /// Do not touch (connect, handshake, then wait).
    None,
}

/// Which Firecracker release's JSON to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// Up to v1.6: no page-size field.
    Legacy,
    /// v1.7–v1.11: `page_size_kib` (in bytes).
    Kib,
    /// v1.12+: `page_size` and `page_size_kib`.
    Both,
}

/// `faultline client` flags.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The handler's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The snapshot memory file: its size is the guest memory size, its bytes what every page
    /// must read.
    #[arg(long)]
    pub mem_file: PathBuf,
    /// Guest memory regions (the file is split evenly, page-aligned).
    #[arg(long, default_value_t = 1)]
    pub regions: usize,
    /// Page size: 4096, or 2097152 (hugetlbfs).
    #[arg(long, default_value_t = 4096)]
    pub page_size: u64,
    /// JSON shape of the handshake.
    #[arg(long, value_enum, default_value_t = Shape::Both)]
    pub shape: Shape,
    /// Send the handshake in pieces of this many bytes (0: one write).
    #[arg(long, default_value_t = 0)]
    pub chunk: usize,
    /// Touch pattern.
    #[arg(long, value_enum, default_value_t = Touch::Seq)]
    pub touch: Touch,
    /// Touching threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// After verifying, drop this percentage of pages with MADV_DONTNEED (a balloon inflating)
    /// and check they read back as zeros.
    #[arg(long, default_value_t = 0)]
    pub balloon_pct: u32,
    /// Touch this percentage of pages first (a deterministic scattered "working set", as a
    /// function invocation after restore would) and report how long that took.
    #[arg(long, default_value_t = 0)]
    pub ws_pct: u32,
    /// Touch and verify only the working set, then exit (used to record one).
    #[arg(long)]
    pub ws_only: bool,
    /// Wait this long after the handshake before touching memory, as Firecracker does while it
    /// loads the VM state and resumes the vCPUs (a prefetching handler works during it).
    #[arg(long, default_value_t = 0)]
    pub resume_after_ms: u64,
    /// After the restore, touch every page again (present memory) and report that time too.
    #[arg(long)]
    pub present_pass: bool,
    /// Stay alive after the work is done until stdin closes.
    #[arg(long)]
    pub hold: bool,
    /// After stdin closes (with --hold), read every page again and check it against the snapshot
    /// file, then report `verified` from that check. Used to show a handler filled every page
    /// before it went away: with no handler left, a page still missing would block the read.
    #[arg(long, requires = "hold", conflicts_with = "balloon_pct")]
    pub verify_after_hold: bool,
    /// Lie in the handshake: declare this page size instead of the memory's own (a hostile
    /// client; e.g. 4096 for hugetlbfs memory, whose 4 KiB resolves the kernel refuses).
    #[arg(long, hide = true)]
    pub declare_page_size: Option<u64>,
}

/// What a client reports (one JSON line on stdout).
#[derive(Debug, Serialize)]
pub struct ClientReport {
    /// Pages of guest memory.
    pub pages: u64,
    /// Handshake sent → first page read (ms).
    pub first_touch_ms: f64,
    /// Handshake sent → every working-set page read (ms; 0 without --ws-pct).
    pub working_set_ms: f64,
    /// Handshake sent → every page read (ms).
    pub full_restore_ms: f64,
    /// A second pass over the now-present memory (ms; 0 without --present-pass).
    pub present_pass_ms: f64,
    /// Every byte matched the snapshot (and ballooned pages read zero).
    pub verified: bool,
    /// Pages dropped by the balloon and checked to read zero.
    pub ballooned_pages: u64,
}

/// Run the client; returns its report (printed by the caller).
pub fn run(args: &ClientArgs) -> Result<ClientReport> {
    let file = std::fs::File::open(&args.mem_file)
        .with_context(|| format!("opening {}", args.mem_file.display()))?;
    let size = file.metadata()?.len();
    let page = args.page_size;
    let kind = match page {
        4096 => MemoryKind::PrivateAnonymous,
        0x20_0000 => MemoryKind::HugetlbPrivate,
        p => bail!("--page-size {p} is not supported"),
    };
    let page_len = usize::try_from(page).expect("4 KiB or 2 MiB (matched above)");
    ensure!(
        size > 0 && size % page == 0,
        "the memory file's size {size} is not a multiple of {page}"
    );
    usize::try_from(size)
        .with_context(|| format!("the memory file's size {size} is too large for this machine"))?;
    let pages = size / page;
    let n = (args.regions.max(1) as u64).min(pages);
    if kind.is_hugetlb() {
        ensure!(
            crate::hugepages::reserve_huge_pages(pages),
            "cannot reserve {pages} huge pages"
        );
    }
    let mut features = Features::EVENT_REMOVE;
    if kind.is_hugetlb() {
        features |= Features::MISSING_HUGETLBFS;
    }
    let uffd = Uffd::new(features).context("creating the userfaultfd")?;
    let mut maps = Vec::new();
    let mut mappings = Vec::new();
    let mut offset = 0;
    for i in 0..n {
        let region_pages = pages / n + u64::from(i < pages % n);
        let len = region_pages * page;
        let m = Mapping::new(
            kind,
            usize::try_from(len).expect("at most the memory file's size, which fits usize"),
        )?;
        uffd.register(&m, RegisterMode::MISSING)?;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: m.addr(),
            size: len,
            offset,
            page_size: Some(args.declare_page_size.unwrap_or(page)),
            page_size_kib: Some(args.declare_page_size.unwrap_or(page)),
        });
        offset += len;
        maps.push(m);
    }
    let shape = match args.shape {
        Shape::Legacy => JsonShape::NoPageSize,
        Shape::Kib => JsonShape::PageSizeKib,
        Shape::Both => JsonShape::Both,
    };
    let stream = UnixStream::connect(&args.socket)
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    let t0 = Instant::now();
    if args.chunk > 0 {
        firecracker::send_handshake_chunked(
            &stream,
            &mappings,
            uffd.as_fd(),
            None,
            shape,
            args.chunk,
        )?;
    } else {
        firecracker::send_handshake(&stream, &mappings, uffd.as_fd(), None, shape)?;
    }
    // Like Firecracker, keep the socket open for as long as the process lives.
    let mut report = ClientReport {
        pages,
        first_touch_ms: 0.0,
        working_set_ms: 0.0,
        full_restore_ms: 0.0,
        present_pass_ms: 0.0,
        verified: false,
        ballooned_pages: 0,
    };
    std::thread::sleep(std::time::Duration::from_millis(args.resume_after_ms));
    if args.touch == Touch::None {
        hold(args.hold);
        if args.verify_after_hold {
            verify_all(&maps, &file, page)?;
            report.verified = true;
        }
        drop(stream);
        return Ok(report);
    }
    // Touch every page from `threads` threads, then verify every byte.
    let threads = args.threads.max(1);
    let first = std::sync::OnceLock::new();
    let locate = |p: u64| -> (&Mapping, usize) {
        let mut p = p;
        for m in &maps {
            let mp = m.len() as u64 / page;
            if p < mp {
                return (m, usize::try_from(p * page).expect("inside the mapping"));
            }
            p -= mp;
        }
        unreachable!("page index within the guest memory")
    };
    let touch_all = |order: &[u64]| {
        std::thread::scope(|s| {
            for t in 0..threads {
                let (first, locate) = (&first, &locate);
                s.spawn(move || {
                    for &p in order.iter().skip(t).step_by(threads) {
                        let (m, off) = locate(p);
                        let _ = std::hint::black_box(m.read_u8(off));
                        let _ = first.set(t0.elapsed());
                    }
                });
            }
        });
    };
    if args.ws_pct > 0 {
        let ws = working_set_pages(pages, args.ws_pct);
        touch_all(&ws);
        report.working_set_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut got = vec![0u8; page_len];
        let mut want = vec![0u8; page_len];
        for &p in &ws {
            let (m, off) = locate(p);
            m.read(off, &mut got)?;
            file.read_exact_at(&mut want, p * page)?;
            ensure!(
                got == want,
                "working-set page {p} differs from the snapshot"
            );
        }
        if args.ws_only {
            report.first_touch_ms = first.get().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0);
            report.verified = true;
            hold(args.hold);
            if args.verify_after_hold {
                verify_all(&maps, &file, page)?;
            }
            drop(stream);
            return Ok(report);
        }
    }
    touch_all(&page_order(args.touch, pages));
    report.full_restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.first_touch_ms = first.get().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0);
    if args.present_pass {
        let t = Instant::now();
        touch_all(&page_order(args.touch, pages));
        report.present_pass_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    verify_all(&maps, &file, page)?;
    if args.balloon_pct > 0 {
        // Inflate a balloon: drop every k-th page, then check each reads zero (whole pages,
        // possibly 2 MiB ones).
        let mut got = vec![0u8; page_len];
        let every = (100 / args.balloon_pct.clamp(1, 100)) as u64;
        for (i, m) in maps.iter().enumerate() {
            let mp = m.len() as u64 / page;
            for p in (0..mp).filter(|p| (p + i as u64) % every == 0) {
                let at = usize::try_from(p * page).expect("a page of the mapping");
                m.discard(at, page_len)?;
                report.ballooned_pages += 1;
            }
            for p in (0..mp).filter(|p| (p + i as u64) % every == 0) {
                let at = usize::try_from(p * page).expect("a page of the mapping");
                m.read(at, &mut got[..page_len])?;
                ensure!(
                    got[..page_len].iter().all(|&b| b == 0),
                    "ballooned page {p} of region {i} is not zero"
                );
            }
        }
    }
    report.verified = true;
    hold(args.hold);
    if args.verify_after_hold {
        verify_all(&maps, &file, page)?;
    }
    drop(stream);
    Ok(report)
}

/// Read every byte of the guest memory (`maps`, laid out one after the other in the file) and
/// check it against the snapshot file.
fn verify_all(maps: &[Mapping], file: &std::fs::File, page: u64) -> Result<()> {
    let buf_len = (1usize << 20).max(usize::try_from(page).expect("4 KiB or 2 MiB"));
    let mut got = vec![0u8; buf_len];
    let mut want = vec![0u8; buf_len];
    let mut base = 0u64;
    for m in maps {
        let mut off = 0usize;
        while off < m.len() {
            let k = (m.len() - off).min(got.len());
            m.read(off, &mut got[..k])?;
            file.read_exact_at(&mut want[..k], base + off as u64)?;
            if got[..k] != want[..k] {
                let at = got[..k]
                    .iter()
                    .zip(&want[..k])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                bail!(
                    "guest byte at file offset {} differs from the snapshot",
                    base + (off + at) as u64
                );
            }
            off += k;
        }
        base += m.len() as u64;
    }
    Ok(())
}

fn hold(on: bool) {
    if on {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    }
}

/// A deterministic working set of about `pct` percent of the pages: clusters of 16 contiguous
/// pages (code and heap are touched in runs, not single scattered pages) at random places, the
/// clusters in a fixed random order.
pub fn working_set_pages(pages: u64, pct: u32) -> Vec<u64> {
    const CLUSTER: u64 = 16;
    let clusters = pages.div_ceil(CLUSTER);
    let want = usize::try_from(((clusters * u64::from(pct.min(100))) / 100).max(1))
        .expect("at most the pages of a memory file whose size fits usize");
    let mut v = Vec::with_capacity(want * usize::try_from(CLUSTER).expect("16"));
    for c in page_order(Touch::Rand, clusters).into_iter().take(want) {
        v.extend((c * CLUSTER..((c + 1) * CLUSTER).min(pages)).collect::<Vec<_>>());
    }
    v
}

fn page_order(touch: Touch, pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..pages).collect();
    if touch == Touch::Rand {
        crate::bench::shuffle(&mut v, 0x9E37_79B9_7F4A_7C15u64);
    }
    v
}
