//! `faultline demo`: the main job on an embedded default — no files needed.
//!
//! Writes a synthetic snapshot (zero pages in runs, duplicated pages, the rest unique) to a
//! temporary directory, starts the handler in this process, and restores several clones of it
//! with `faultline client` processes that speak Firecracker's side of the protocol. Every clone
//! touches a scattered working set first (what a function invocation after restore does), then
//! all of its memory, and checks every byte. Three strategies are compared: pages served on
//! demand, the working set recorded once and prefetched into every clone (REAP-style) with the
//! rest filled in the background, and an eager background copy of everything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::logging::LogFormat;
use faultline_daemon::{Daemon, DaemonConfig};

/// `faultline demo` flags.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Snapshot size in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Clones restored at once.
    #[arg(long, default_value_t = 4)]
    pub clones: usize,
    /// Working set touched first by every clone (% of pages).
    #[arg(long, default_value_t = 10)]
    pub ws_pct: u32,
    /// Milliseconds each clone spends "loading the VM state" after the handshake before its
    /// vCPUs touch memory (Firecracker's restore work; a prefetching handler works during it).
    #[arg(long, default_value_t = 20)]
    pub resume_after_ms: u64,
    /// Keep the snapshot and working set in this directory instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct ClientReport {
    pages: u64,
    first_touch_ms: f64,
    working_set_ms: f64,
    full_restore_ms: f64,
    verified: bool,
}

/// Write the synthetic snapshot: 30% zero pages in runs of 64, 20% copies of 16 "hot" pages,
/// the rest unique pseudo-random content. Returns (zero, duplicate, unique) page counts.
pub fn write_snapshot(path: &Path, size: u64) -> Result<(u64, u64, u64)> {
    let page = 4096usize;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; page];
    let (mut zero, mut dup, mut unique) = (0, 0, 0);
    let fill = |seed: u64, buf: &mut [u8]| {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    };
    for p in 0..size / page as u64 {
        let bucket = (p / 64) % 10;
        if bucket < 3 {
            buf.fill(0);
            zero += 1;
        } else if bucket < 5 {
            fill(1 + p % 16, &mut buf);
            dup += 1;
        } else {
            fill(1000 + p, &mut buf);
            unique += 1;
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok((zero, dup, unique))
}

struct ModeResult {
    name: &'static str,
    reports: Vec<ClientReport>,
    wall_ms: f64,
    faults: u64,
    resolved: u64,
    zero_pages: u64,
    prefetched: u64,
}

/// How the demo serves: `faultline serve`'s defaults (the library's), on `mem`.
fn serve_config(
    mem: &Path,
    record: Option<PathBuf>,
    prefetch: Option<PathBuf>,
    fill: bool,
) -> DaemonConfig {
    DaemonConfig {
        record_ws: record,
        prefetch_ws: prefetch,
        background_fill: fill,
        ..DaemonConfig::mem_file(mem)
    }
}

/// Launch `n` client processes against `socket`; wait for all; parse their reports.
fn run_clients(
    socket: &Path,
    mem: &Path,
    n: usize,
    ws_pct: u32,
    ws_only: bool,
    resume_after_ms: u64,
    bar: &ProgressBar,
) -> Result<Vec<ClientReport>> {
    let exe = std::env::current_exe().context("finding the faultline binary")?;
    let mut children = Vec::new();
    for _ in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.arg("client")
            .arg("--socket")
            .arg(socket)
            .arg("--mem-file")
            .arg(mem)
            .arg("--ws-pct")
            .arg(ws_pct.to_string())
            .arg("--threads")
            .arg("2")
            .arg("--resume-after-ms")
            .arg(resume_after_ms.to_string());
        if ws_only {
            cmd.arg("--ws-only");
        }
        children.push(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
    }
    let mut reports = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        bar.inc(1);
        if !out.status.success() {
            bail!(
                "a clone failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: ClientReport =
            serde_json::from_str(line.trim()).with_context(|| format!("clone report {line:?}"))?;
        ensure!(r.verified, "a clone reported unverified memory");
        reports.push(r);
    }
    Ok(reports)
}

fn run_mode(
    name: &'static str,
    config: &DaemonConfig,
    socket: &Path,
    demo: &DemoArgs,
    bar: &ProgressBar,
) -> Result<ModeResult> {
    let n = demo.clones;
    let mem = config
        .mem_file
        .as_deref()
        .context("the demo serves a memory file")?;
    let daemon = Daemon::start(config, socket)?;
    let start = Instant::now();
    let reports = run_clients(
        socket,
        mem,
        n,
        demo.ws_pct,
        false,
        demo.resume_after_ms,
        bar,
    )?;
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    // Sessions end when the clients' sockets close; the totals include ended sessions.
    for s in daemon.server().sessions() {
        s.wait_closed(Duration::from_secs(10));
    }
    let st = daemon.server().stats();
    ensure!(
        daemon.started() == n as u64,
        "not every clone got a session"
    );
    daemon.shutdown();
    Ok(ModeResult {
        name,
        reports,
        wall_ms,
        faults: st.faults,
        resolved: st.pages,
        zero_pages: st.zero_pages,
        prefetched: st.prefetch_pages + st.fill_pages,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Run the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    crate::logging::init_logging_at(LogFormat::Text, "warn");
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("faultline-demo")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let size = (args.size_mib.max(1) << 20).next_multiple_of(4096);
    let mem = dir.join("snapshot.mem");
    let ws = dir.join("snapshot.ws");
    println!(
        "faultline demo: {} clones of a {} MiB snapshot, every byte verified",
        args.clones,
        size >> 20
    );
    let t = Instant::now();
    let (zero, dup, unique) = write_snapshot(&mem, size)?;
    println!(
        "  snapshot {} written in {:.0} ms: {} zero, {} duplicate, {} unique pages",
        mem.display(),
        t.elapsed().as_secs_f64() * 1e3,
        zero,
        dup,
        unique
    );
    let total = (args.clones * 3 + 1) as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("  {spinner} {msg:<28} [{bar:30}] {pos}/{len} clones")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("recording the working set");
    let socket = dir.join("faultline.sock");
    let rec = serve_config(&mem, Some(ws.clone()), None, false);
    {
        let daemon = Daemon::start(&rec, &socket)?;
        run_clients(&socket, &mem, 1, args.ws_pct, true, 0, &bar)?;
        // The working set is written when the session ends (the clone's socket closed).
        for s in daemon.server().sessions() {
            s.wait_closed(Duration::from_secs(10));
        }
        daemon.shutdown();
    }
    ensure!(ws.exists(), "the working set was not recorded");
    let modes = [
        ("on demand", serve_config(&mem, None, None, false)),
        (
            "working-set prefetch",
            serve_config(&mem, None, Some(ws.clone()), true),
        ),
        ("eager copy", serve_config(&mem, None, None, true)),
    ];
    let mut results = Vec::new();
    for (name, sa) in &modes {
        bar.set_message(format!("restoring: {name}"));
        results.push(run_mode(name, sa, &socket, &args, &bar)?);
    }
    bar.finish_and_clear();
    println!(
        "\n  {:<22} {:>9} {:>14} {:>14} {:>14} {:>9} {:>10} {:>9} {:>11}",
        "strategy",
        "clones",
        "first touch",
        "working set",
        "full restore",
        "faults",
        "pages",
        "zero",
        "background"
    );
    for r in &results {
        let f = |sel: fn(&ClientReport) -> f64| median(r.reports.iter().map(sel).collect());
        println!(
            "  {:<22} {:>9} {:>11.1} ms {:>11.1} ms {:>11.1} ms {:>9} {:>10} {:>9} {:>11}",
            r.name,
            r.reports.len(),
            f(|c| c.first_touch_ms),
            f(|c| c.working_set_ms),
            f(|c| c.full_restore_ms),
            r.faults,
            r.resolved,
            r.zero_pages,
            r.prefetched
        );
    }
    let pages: u64 = results[0].reports.iter().map(|r| r.pages).sum();
    println!(
        "\n  (medians over clones, times from the handshake; each clone resumes {} ms after it; {} guest pages\n   per strategy, all verified; wall time {:.0} / {:.0} / {:.0} ms)",
        args.resume_after_ms, pages, results[0].wall_ms, results[1].wall_ms, results[2].wall_ms
    );
    Ok(())
}
