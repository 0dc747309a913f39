//! The `faultline` command: user-space page-fault serving from the command line.
#![forbid(unsafe_code)]

use std::time::Instant;

mod bench;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use faultline_uffd::{
    CopyMode, Event, EventBuffer, Features, Mapping, RegisterMode, Uffd, ZeropageMode, PAGE_SIZE,
};

#[derive(Parser)]
#[command(
    name = "faultline",
    version,
    about = "User-space page-fault handling for Linux (userfaultfd)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the kernel's userfaultfd features and ioctls, and how the fd was created.
    Features,
    /// End-to-end benchmark against baselines measured in the same run.
    Bench(bench::BenchArgs),
    /// Serve faults on an embedded synthetic snapshot and verify every byte (no files needed).
    Demo {
        /// Size of the synthetic snapshot in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: usize,
        /// Threads touching the memory.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Features => features(),
        Command::Bench(args) => bench::run(args).map(|_| ()),
        Command::Demo { size_mib, threads } => demo(size_mib, threads),
    }
}

fn features() -> Result<()> {
    let uffd = Uffd::builder()
        .create_uninit()
        .context("creating a userfaultfd")?;
    let created = uffd.creation();
    let info = Uffd::builder().probe().context("UFFDIO_API probe")?;
    println!("created via: {}", created.path);
    if let Some((path, errno)) = created.fallback_from {
        println!("  (fallback: {path} failed with {errno})");
    }
    println!("features:    {}", info.features);
    let missing = Features::KNOWN - info.features;
    println!(
        "missing:     {}",
        if missing.is_empty() {
            "(none)".into()
        } else {
            missing.names()
        }
    );
    println!("ioctls:      {:?}", info.ioctls);
    Ok(())
}

/// Content of the synthetic snapshot: one page in four is zero, the rest a per-page pattern.
fn snapshot_page(page: usize, buf: &mut [u8]) -> bool {
    if page % 4 == 3 {
        buf.fill(0);
        return false;
    }
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (page as u64).wrapping_mul(31).wrapping_add(i as u64 * 7) as u8 ^ 0x5a;
    }
    true
}

fn demo(size_mib: usize, threads: usize) -> Result<()> {
    let len = size_mib.max(1) << 20;
    let pages = len / PAGE_SIZE;
    let uffd = Uffd::new(Features::empty()).context("creating a userfaultfd")?;
    let region = Mapping::anonymous(len)?;
    uffd.register(&region, RegisterMode::MISSING)?;
    let start = Instant::now();
    let (copies, zeros) = std::thread::scope(|s| -> Result<(u64, u64)> {
        let touchers: Vec<_> = (0..threads.max(1))
            .map(|t| {
                let region = &region;
                s.spawn(move || -> Result<()> {
                    let mut want = vec![0u8; PAGE_SIZE];
                    let mut got = vec![0u8; PAGE_SIZE];
                    for page in (t..pages).step_by(threads.max(1)) {
                        snapshot_page(page, &mut want);
                        region.read(page * PAGE_SIZE, &mut got)?;
                        anyhow::ensure!(got == want, "page {page} has wrong content");
                    }
                    Ok(())
                })
            })
            .collect();
        let mut events = EventBuffer::new(64);
        let mut buf = vec![0u8; PAGE_SIZE];
        let (mut copies, mut zeros, mut served) = (0u64, 0u64, 0usize);
        while served < pages {
            if !uffd.poll_readable(Some(std::time::Duration::from_millis(100)))? {
                if touchers.iter().all(|t| t.is_finished()) {
                    break;
                }
                continue;
            }
            uffd.read_events(&mut events)?;
            for ev in events.events() {
                let Event::Pagefault { address, .. } = ev else {
                    continue;
                };
                let page_addr = address & !(PAGE_SIZE as u64 - 1);
                let page = ((page_addr - region.addr()) / PAGE_SIZE as u64) as usize;
                let r = if snapshot_page(page, &mut buf) {
                    copies += 1;
                    uffd.copy(page_addr, &buf, CopyMode::empty())
                } else {
                    zeros += 1;
                    uffd.zeropage(page_addr, PAGE_SIZE as u64, ZeropageMode::empty())
                };
                match r {
                    Ok(_) => served += 1,
                    Err(e) if e.is_already_present() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for t in touchers {
            t.join()
                .map_err(|_| anyhow::anyhow!("toucher panicked"))??;
        }
        Ok((copies, zeros))
    })?;
    let secs = start.elapsed().as_secs_f64();
    let st = uffd.stats();
    println!("faultline demo: {size_mib} MiB, {threads} touching threads, every byte verified");
    println!("  pages        {pages}");
    println!("  COPY         {copies}");
    println!("  ZEROPAGE     {zeros}");
    println!("  EEXIST       {}", st.eexist);
    println!("  reads        {} ({} messages)", st.reads, st.events);
    println!(
        "  time         {:.3} s ({:.0} MiB/s)",
        secs,
        size_mib as f64 / secs
    );
    Ok(())
}
