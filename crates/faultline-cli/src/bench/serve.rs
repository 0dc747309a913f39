//! `faultline bench --serve`: the end-to-end Firecracker path through the socket.
//!
//! Client processes (`faultline client`, which behave exactly like Firecracker restoring a
//! snapshot) restore the same memory file through (1) `faultline serve` running in this process,
//! and (2) a naive external handler in this process: same socket protocol, then one thread, one
//! message per read, one 4 KiB COPY per fault — what the public example handlers do. Each client
//! touches its memory, then touches it again (present memory), then checks every byte; fault
//! overhead = first pass − second pass.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use faultline::firecracker::{self, Limits};
use faultline::source::{MmapSource, PageSource};
use faultline_uffd::Uffd;
use serde::{Deserialize, Serialize};

use crate::logging::LogFormat;
use faultline_daemon::{Daemon, DaemonConfig};

#[derive(Debug, Deserialize)]
struct ClientReport {
    first_touch_ms: f64,
    full_restore_ms: f64,
    present_pass_ms: f64,
    verified: bool,
}

/// One handler's results.
#[derive(Debug, Serialize)]
pub struct ServeRow {
    /// Handler.
    pub name: String,
    /// Clients restored at once.
    pub clients: usize,
    /// Median restore time over clients (ms).
    pub restore_median_ms: f64,
    /// Fastest and slowest client (ms): the spread shows starvation.
    pub restore_min_ms: f64,
    /// Slowest client (ms).
    pub restore_max_ms: f64,
    /// Median fault overhead (first pass − present pass, ms).
    pub overhead_median_ms: f64,
    /// Median first touch after the handshake (ms).
    pub first_touch_median_ms: f64,
    /// Fault messages read by the handler.
    pub faults: u64,
    /// p99 fault latency (µs), where the handler measures it.
    pub p99_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn run_clients(socket: &Path, mem: &Path, n: usize, threads: usize) -> Result<Vec<ClientReport>> {
    let exe = std::env::current_exe().context("finding the faultline binary")?;
    let mut children = Vec::new();
    for _ in 0..n {
        children.push(
            Command::new(&exe)
                .arg("client")
                .arg("--socket")
                .arg(socket)
                .arg("--mem-file")
                .arg(mem)
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--present-pass")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    let mut out = Vec::new();
    for c in children {
        let o = c.wait_with_output()?;
        if !o.status.success() {
            bail!(
                "a client failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let r: ClientReport = serde_json::from_slice(&o.stdout).context("client report")?;
        ensure!(r.verified, "a client reported unverified memory");
        out.push(r);
    }
    Ok(out)
}

fn row(name: &str, reports: &[ClientReport], faults: u64, p99_us: f64) -> ServeRow {
    let restore: Vec<f64> = reports.iter().map(|r| r.full_restore_ms).collect();
    ServeRow {
        name: name.to_string(),
        clients: reports.len(),
        restore_median_ms: median(restore.clone()),
        restore_min_ms: restore.iter().cloned().fold(f64::INFINITY, f64::min),
        restore_max_ms: restore.iter().cloned().fold(0.0, f64::max),
        overhead_median_ms: median(
            reports
                .iter()
                .map(|r| (r.full_restore_ms - r.present_pass_ms).max(0.0))
                .collect(),
        ),
        first_touch_median_ms: median(reports.iter().map(|r| r.first_touch_ms).collect()),
        faults,
        p99_us,
    }
}

/// A naive external handler: accept clients on `socket`, then per client one thread serving one
/// message per read with one page-sized COPY per fault, until the client hangs up.
fn naive_handler(
    listener: UnixListener,
    src: Arc<MmapSource>,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    listener.set_nonblocking(true)?;
    let faults = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        stream.set_nonblocking(false)?;
        let limits = Limits {
            mem_len: Some(src.len()),
            ..Limits::default()
        };
        let hs = firecracker::receive_handshake(&stream, &limits)?;
        let uffd = Uffd::from_received_fd(hs.uffd)?;
        let (src, faults) = (Arc::clone(&src), Arc::clone(&faults));
        threads.push(std::thread::spawn(move || {
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    // The client's socket closes when it exits.
                    let mut b = [0u8; 1];
                    let _ = std::io::Read::read(&mut &stream, &mut b);
                    done.store(true, Ordering::Release);
                });
                // The client maps one region (the default of `faultline client`).
                if let Some(r) = hs.mappings.first() {
                    let base = src
                        .ptr_at(r.offset, r.len)
                        .expect("mmap source lends pointers");
                    let st = super::baseline::naive_faultline(
                        &uffd,
                        r.start,
                        r.len,
                        r.page_size,
                        base,
                        &done,
                    );
                    faults.fetch_add(st.faults, Ordering::Relaxed);
                }
            });
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(faults.load(Ordering::Relaxed))
}

/// Run the end-to-end serve benchmark.
pub fn run(
    size_mib: u64,
    clients: usize,
    threads: usize,
    file: Option<PathBuf>,
) -> Result<Vec<ServeRow>> {
    crate::logging::init_logging_at(LogFormat::Text, "warn");
    let dir = tempfile::Builder::new()
        .prefix("faultline-bench-serve")
        .tempdir()?;
    let mem = match file {
        Some(f) => f,
        None => {
            let p = dir.path().join("snapshot.mem");
            crate::demo::write_snapshot(&p, (size_mib.max(1) << 20).next_multiple_of(4096))?;
            p
        }
    };
    let mut rows = Vec::new();
    // (1) faultline serve
    // `faultline serve`'s defaults (the library's), on the generated memory file.
    let socket = dir.path().join("faultline.sock");
    let config = DaemonConfig::mem_file(&mem);
    eprintln!("restoring {clients} client(s) through faultline serve ...");
    let daemon = Daemon::start(&config, &socket)?;
    let start = Instant::now();
    let reports = run_clients(&socket, &mem, clients, threads)?;
    let wall = start.elapsed();
    for s in daemon.server().sessions() {
        s.wait_closed(Duration::from_secs(10));
    }
    let st = daemon.server().stats();
    daemon.shutdown();
    rows.push(row(
        "faultline serve",
        &reports,
        st.faults,
        st.latency_p99_ns as f64 / 1e3,
    ));
    eprintln!("  done in {:.0} ms", wall.as_secs_f64() * 1e3);
    // (2) the naive external handler
    eprintln!("restoring {clients} client(s) through a naive handler ...");
    let sock = dir.path().join("naive.sock");
    let listener = UnixListener::bind(&sock)?;
    let src = Arc::new(MmapSource::options().populate(true).open(&mem)?);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let h = std::thread::spawn(move || naive_handler(listener, src, stop2));
    let reports = run_clients(&sock, &mem, clients, threads)?;
    stop.store(true, Ordering::Release);
    let faults = h
        .join()
        .map_err(|_| anyhow::anyhow!("naive handler panicked"))??;
    rows.push(row("naive external handler", &reports, faults, 0.0));
    println!(
        "\nfaultline bench --serve: {} client(s), {} MiB each, {} touching threads per client",
        clients,
        std::fs::metadata(&mem)?.len() >> 20,
        threads
    );
    println!(
        "{:<26} {:>8} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "handler",
        "clients",
        "restore p50",
        "fastest",
        "slowest",
        "overhead p50",
        "first touch",
        "faults",
        "p99 µs"
    );
    for r in &rows {
        println!(
            "{:<26} {:>8} {:>9.1} ms {:>9.1} ms {:>9.1} ms {:>9.1} ms {:>9.2} ms {:>9} {:>9.1}",
            r.name,
            r.clients,
            r.restore_median_ms,
            r.restore_min_ms,
            r.restore_max_ms,
            r.overhead_median_ms,
            r.first_touch_median_ms,
            r.faults,
            r.p99_us
        );
    }
    println!(
        "\n  faultline serve fault overhead / naive external handler: {:.3}",
        rows[0].overhead_median_ms / rows[1].overhead_median_ms
    );
    println!(
        "  faultline serve slowest / fastest client: {:.2}",
        rows[0].restore_max_ms / rows[0].restore_min_ms.max(1e-9)
    );
    Ok(rows)
}
