//! `faultline bench --remote`: restore throughput from a remote page server on loopback
//! (`faultline export` + `serve --remote`, in this process) against the local raw file, measured
//! in the same run. A region is served by the fault server and touched in order (each thread its
//! own contiguous slice, one read per page), then every byte is verified against the file.
//!
//! Variants: `local` (the raw file, mmapped: the fault server copies straight from the page
//! cache), `remote demand` (every page fetched when the fault server asks for it: readahead
//! windows become batched requests), `remote stream` (the background stream fills the local
//! cache ahead of the faults). The target: remote ≥ 50% of local.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use faultline::remote::{RemoteOptions, RemoteServer, RemoteSource, RemoteStats};
use faultline::source::{MmapSource, PageSource};
use faultline::{Region, Server, ServerConfig, SessionOptions};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd};
use serde::Serialize;

use crate::bench::BenchArgs;

/// One measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteRow {
    /// Variant.
    pub name: String,
    /// Touch pass of each repetition (ms).
    pub touch_ms: Vec<f64>,
    /// Best throughput (MiB/s).
    pub mib_s: f64,
    /// The remote source's counters of the best run (remote variants).
    pub remote: Option<RemoteStats>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct RemoteReport {
    /// Region size (bytes).
    pub size: u64,
    /// Touching threads.
    pub threads: usize,
    /// Rows.
    pub rows: Vec<RemoteRow>,
    /// Throughput of each remote variant / local.
    pub ratios: Vec<(String, f64)>,
    /// Plain loopback TCP throughput measured in the same run (one connection, 1 MiB writes,
    /// MiB/s): the ceiling for bytes that do travel (zero pages do not).
    pub tcp_mib_s: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Local,
    Demand,
    Stream,
}

/// Touch every page of `m` in order, `threads` contiguous slices at once.
fn touch(m: &Mapping, threads: usize) -> Duration {
    let pages = m.len() / 4096;
    let per = pages.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut acc = 0u8;
                for p in t * per..((t + 1) * per).min(pages) {
                    acc ^= m.read_u8(p * 4096).unwrap_or(0);
                }
                std::hint::black_box(acc);
            });
        }
    });
    start.elapsed()
}

fn verify(m: &Mapping, src: &MmapSource) -> Result<()> {
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < m.len() {
        let n = (m.len() - off).min(got.len());
        m.read(off, &mut got[..n])?;
        src.read_at(off as u64, &mut want[..n])?;
        if got[..n] != want[..n] {
            bail!("the restored memory differs from the file near byte {off}");
        }
        off += n;
    }
    Ok(())
}

fn measure(
    v: Variant,
    args: &BenchArgs,
    file: &Arc<MmapSource>,
    size: u64,
) -> Result<(Duration, Option<RemoteStats>)> {
    let exporter;
    let mut remote: Option<Arc<RemoteSource>> = None;
    let src: Arc<dyn PageSource> = match v {
        Variant::Local => file.clone(),
        Variant::Demand | Variant::Stream => {
            exporter = RemoteServer::bind("127.0.0.1:0", file.clone())?;
            let opts = RemoteOptions {
                stream: v == Variant::Stream,
                cache_bytes: 256 << 20,
                stream_chunk: 1 << 20,
                stream_window: 4,
                ..RemoteOptions::default()
            };
            let r = Arc::new(RemoteSource::connect(
                &exporter.local_addr().to_string(),
                opts,
            )?);
            remote = Some(r.clone());
            r
        }
    };
    let m = Mapping::anonymous(size as usize)?;
    let uffd = Uffd::new(Features::empty())?;
    uffd.register(&m, RegisterMode::MISSING)?;
    let mut config = ServerConfig {
        source_attempts: u32::MAX,
        ..ServerConfig::default()
    };
    if let Some(w) = args.workers {
        config.workers = w.max(1);
    }
    let server = Server::start(config)?;
    let _session = server.add_session(
        uffd,
        vec![Region::for_mapping(&m, src)],
        SessionOptions::default(),
    )?;
    let took = touch(&m, args.threads.max(1));
    verify(&m, file).context("verifying the restored memory")?;
    server.shutdown();
    let stats = remote.as_ref().map(|r| r.stats());
    Ok((took, stats))
}

/// Plain loopback TCP: one connection, `total` bytes in 1 MiB writes; MiB/s.
fn tcp_ceiling(total: u64) -> Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        let buf = vec![0x5au8; 1 << 20];
        let mut sent = 0u64;
        while sent < total {
            c.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut got = 0u64;
    while got < total {
        match c.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    let took = start.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP writer panicked"))??;
    Ok((got >> 20) as f64 / took.as_secs_f64())
}

/// Run the comparison and print it.
pub fn run(args: &BenchArgs) -> Result<RemoteReport> {
    crate::serve::init_logging_at(crate::serve::LogFormat::Text, "warn");
    ensure!(args.page_size == 4096, "--remote measures 4 KiB pages only");
    let size = (args.size_mib.max(1) << 20).next_multiple_of(4096);
    let tmp = tempfile::Builder::new()
        .prefix("faultline-bench-remote")
        .tempdir()?;
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            let p = tmp.path().join("snapshot.mem");
            eprintln!("generating a {} MiB snapshot file ...", size >> 20);
            crate::demo::write_snapshot(&p, size)?;
            p
        }
    };
    let file = Arc::new(open(&path)?);
    ensure!(
        file.len() >= size,
        "{} is smaller than --size-mib",
        path.display()
    );
    let variants = [
        (Variant::Local, "local raw file (mmap)"),
        (Variant::Demand, "remote, on demand (loopback)"),
        (Variant::Stream, "remote, background stream (loopback)"),
    ];
    let mut rows: Vec<RemoteRow> = variants
        .iter()
        .map(|(_, name)| RemoteRow {
            name: name.to_string(),
            touch_ms: Vec::new(),
            mib_s: 0.0,
            remote: None,
        })
        .collect();
    // Repetitions interleave the variants, so that a change in the machine's load during the
    // run affects them alike; the best of each is compared.
    for _ in 0..args.repeat.max(1) {
        for ((v, _), row) in variants.iter().zip(rows.iter_mut()) {
            let (took, stats) = measure(*v, args, &file, size)?;
            let mib_s = (size >> 20) as f64 / took.as_secs_f64();
            if mib_s > row.mib_s {
                row.mib_s = mib_s;
                row.remote = stats;
            }
            row.touch_ms.push(took.as_secs_f64() * 1e3);
        }
    }
    for row in &rows {
        eprintln!("  {:<40} {:>9.0} MiB/s", row.name, row.mib_s);
    }
    let tcp_mib_s = tcp_ceiling(size.min(1 << 30))?;
    eprintln!(
        "  {:<40} {:>9.0} MiB/s",
        "plain loopback TCP (ceiling)", tcp_mib_s
    );
    let local = rows[0].mib_s;
    let ratios: Vec<(String, f64)> = rows[1..]
        .iter()
        .map(|r| (format!("{} / local", r.name), r.mib_s / local))
        .collect();
    let report = RemoteReport {
        size,
        threads: args.threads.max(1),
        rows,
        ratios,
        tcp_mib_s,
    };
    print(&report);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

fn open(path: &Path) -> Result<MmapSource> {
    Ok(MmapSource::options()
        .populate(true)
        .open(path)
        .with_context(|| format!("mapping {}", path.display()))?
        .with_zero_scan())
}

fn print(r: &RemoteReport) {
    println!(
        "sequential restore of {} MiB, {} touching thread(s), every byte verified",
        r.size >> 20,
        r.threads
    );
    println!("{:<40} {:>10} {:>12}", "variant", "MiB/s", "best ms");
    for row in &r.rows {
        let best = row.touch_ms.iter().cloned().fold(f64::INFINITY, f64::min);
        println!("{:<40} {:>10.0} {:>12.1}", row.name, row.mib_s, best);
        if let Some(s) = &row.remote {
            println!(
                "    requests: {} demand, {} background; {} MiB received, {} MiB as zero; {} reads from the cache of {}",
                s.demand_requests,
                s.background_requests,
                s.bytes_received >> 20,
                s.zero_bytes_received >> 20,
                s.reads_from_cache,
                s.reads
            );
        }
    }
    println!(
        "{:<40} {:>10.0}   (bytes on the wire; zero pages do not travel)",
        "plain loopback TCP, 1 MiB writes", r.tcp_mib_s
    );
    for (name, ratio) in &r.ratios {
        println!("{name}: {ratio:.2} (target ≥ 0.50)");
    }
    let local = r.rows.first().map_or(0.0, |row| row.mib_s);
    if local > 0.0 {
        println!(
            "plain loopback TCP / local: {:.2} (what this host's loopback allows for bytes that travel)",
            r.tcp_mib_s / local
        );
    }
}
