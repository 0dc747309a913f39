//! `faultline bench --firecracker`: a real Firecracker (the kit, see [`crate::fckit`]) restores
//! one snapshot of a running guest again and again, its memory served by each backend in turn:
//!
//! - `file`: Firecracker maps the memory file itself (the kernel's page-cache path): the baseline;
//! - `faultline`: `faultline serve`, pages served on demand;
//! - `faultline --background-fill`: demand first, every other page filled in the background;
//! - `faultline --prefetch-ws`: a working set recorded once (`--record-ws`, up to the guest's
//!   first ticks) replayed into each restore ahead of demand, then the background fill.
//!
//! Each restore is timed from the `PUT /snapshot/load` request to the first new `FCTICK ...
//! verify=ok` line on the guest's console (the guest is running right again), beside the load
//! call's own time. Per restore the bench also reads, from /proc: the CPU time of the
//! `faultline serve` processes (supervisor and worker; every thread's `se.sum_exec_runtime`,
//! or the processes' user + system clock ticks when a thread ended meanwhile), and Firecracker's own system time
//! and page faults from the load request to its first tick (with the File backend the kernel
//! serves the memory file's pages inside Firecracker: its system time holds their cost — and,
//! on a PVM host, the guest's emulation too). The handler's fault count comes from its session
//! summary. Every figure is shown as a ratio to the File backend measured in the same run.
//!
//! Backends alternate within every repetition (each repetition starting one backend later, so
//! that none always comes first or after the same other one), and 1, 2 and 4 clones are
//! restored at once (each clone its own Firecracker, one daemon serving them all). The daemons start once, before the
//! first measured round, and a warm-up restore through each runs first (it also brings the
//! memory file into the page cache for every backend alike).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::fckit::{self, Backend, Kit, Snapshot, Vm};

/// Any single step of a restore (a safety net, never a delay).
const LIMIT: Duration = Duration::from_secs(120);

/// Boot to the first ticks (~60 s on a quiet machine).
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// What `faultline bench --firecracker` takes.
#[derive(Debug, Clone)]
pub struct FcBenchArgs {
    /// Restores per backend and clone count.
    pub repeat: usize,
    /// Clone counts restored at once.
    pub clones: Vec<usize>,
    /// The kit's directory (else `$FAULTLINE_FC_KIT`, else the build's `../shared/firecracker`).
    pub kit: Option<PathBuf>,
    /// Guest memory (MiB).
    pub mem_mib: u64,
    /// More flags for every daemon.
    pub serve_flags: Vec<String>,
    /// Flags of more on-demand daemons measured beside the first, one list per daemon.
    pub variants: Vec<Vec<String>>,
    /// The backends to measure (the File baseline always runs).
    pub backends: Vec<Which>,
}

/// The backends, in the order every repetition runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    /// Firecracker maps the file.
    File,
    /// `faultline serve`, on demand.
    OnDemand,
    /// `faultline serve --background-fill`.
    BackgroundFill,
    /// `faultline serve --prefetch-ws`.
    Prefetch,
    /// `faultline serve` on demand with the flags of the n-th `--fc-variant`.
    Variant(u8),
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::File => "file (kernel)",
            Which::OnDemand => "faultline on demand",
            Which::BackgroundFill => "faultline --background-fill",
            Which::Prefetch => "faultline --prefetch-ws",
            Which::Variant(_) => "faultline variant",
        }
    }

    fn label(self) -> String {
        match self {
            Which::Variant(i) => format!("faultline variant {}", i + 1),
            other => other.name().to_string(),
        }
    }
}

/// One restore's measurements.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Load request to the first new tick (ms).
    pub first_tick_ms: f64,
    /// The load call (ms).
    pub load_ms: f64,
    /// Firecracker's system time, load request to first tick (ms).
    pub fc_sys_ms: f64,
    /// Firecracker's page faults (minor + major), load request to first tick.
    pub fc_faults: u64,
}

/// One backend at one clone count.
#[derive(Debug, Clone, Serialize)]
pub struct FcRow {
    /// Backend.
    pub backend: Which,
    /// Clones restored at once.
    pub clones: usize,
    /// Every restore.
    pub samples: Vec<Sample>,
    /// Time to first tick: min, median, max (ms).
    pub first_tick_ms: [f64; 3],
    /// Median load call (ms).
    pub load_ms: f64,
    /// The daemon's CPU time (user + system, supervisor and worker) per restore, median over
    /// rounds (ms; 0 for the File backend).
    pub daemon_cpu_ms: f64,
    /// Firecracker's system time per restore, median (ms).
    pub fc_sys_ms: f64,
    /// Firecracker's page faults per restore, median.
    pub fc_faults: f64,
    /// The handler's faults per restore, median over rounds (0 for the File backend).
    pub handler_faults: f64,
    /// Ratios to the File backend at the same clone count: median time to first tick, median
    /// load call, CPU (daemon + Firecracker system time), Firecracker's page faults.
    pub ratio_first_tick: f64,
    /// See `ratio_first_tick`.
    pub ratio_load: f64,
    /// See `ratio_first_tick`.
    pub ratio_cpu: f64,
    /// See `ratio_first_tick`.
    pub ratio_fc_faults: f64,
    /// Time to the first tick against File's *in the same round* (each round restores every
    /// backend once, back to back, so a slow minute of the host weighs on both): the median of
    /// the per-round ratios and a distribution-free 95% confidence interval of that median
    /// ([`median_ci`]): `[low, median, high]` (NaN bounds below 6 rounds).
    pub paired_first_tick: [f64; 3],
}

/// The report.
#[derive(Debug, Serialize)]
pub struct FcReport {
    /// Kernel release.
    pub kernel: String,
    /// Guest memory (MiB).
    pub mem_mib: u64,
    /// Restores per backend and clone count.
    pub repeat: usize,
    /// Pages the recorded working set holds.
    pub working_set_pages: u64,
    /// Rows.
    pub rows: Vec<FcRow>,
}

/// One backend's measurements at one clone count: every restore, and per round the daemon's
/// CPU and the handler's faults per restore.
#[derive(Default)]
struct Collected {
    samples: Vec<Sample>,
    cpu: Vec<f64>,
    faults: Vec<f64>,
    /// Per round, the median time to the first tick of its clones.
    round_ticks: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median of `v` and a confidence interval of at least 95% for it that assumes nothing of
/// the distribution: the order statistics of ranks `k` and `n + 1 - k`, `k` the largest rank
/// with P(Binomial(n, 1/2) < k) ≤ 2.5% (for 21 samples: the 6th and the 16th). Bounds are NaN
/// below 6 samples (no such `k`).
fn median_ci(v: &[f64]) -> [f64; 3] {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let mid = v.get(n / 2).copied().unwrap_or(f64::NAN);
    // P(X = j) and P(X <= j) for X ~ Binomial(n, 1/2), j counting up.
    let mut pmf = 0.5f64.powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut cdf = 0.0;
    let mut k = 0;
    for j in 0..n {
        cdf += pmf;
        if cdf > 0.025 {
            break;
        }
        k = j + 1;
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return [f64::NAN, mid, f64::NAN];
    }
    [v[k - 1], mid, v[n - k]]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Fields of /proc/<pid>/stat after the command name: (utime + stime, stime) in clock ticks,
/// and minflt + majflt.
fn proc_stat(pid: u32) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("a /proc/<pid>/stat without a command name")?;
    // After ')': state(3) ppid(4) ... minflt(10) cminflt(11) majflt(12) cmajflt(13) utime(14)
    // stime(15): index = field number - 3.
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let get = |field: usize| f.get(field - 4).copied().unwrap_or(0);
    Ok((get(14) + get(15), get(15), get(10) + get(12)))
}

/// A daemon's CPU time at one moment.
struct Cpu {
    /// User + system clock ticks of its processes (dead threads included; 10 ms steps).
    ticks: u64,
    /// Run time (ms, to the nanosecond) of every live thread by tid.
    threads: BTreeMap<u32, f64>,
}

impl Cpu {
    /// The CPU time (ms) from `self` to `later`: to the nanosecond from the threads' run times
    /// when every thread of `self` still lives (threads born since count whole), else in the
    /// processes' clock ticks.
    fn since(&self, later: &Cpu) -> f64 {
        if self.threads.keys().all(|t| later.threads.contains_key(t)) {
            later
                .threads
                .iter()
                .map(|(t, ms)| ms - self.threads.get(t).copied().unwrap_or(0.0))
                .sum()
        } else {
            ticks_to_ms(later.ticks.saturating_sub(self.ticks))
        }
    }
}

/// `se.sum_exec_runtime` (ms) of every thread of `pid`, from /proc/<pid>/task/<tid>/sched.
fn thread_runtimes(pid: u32) -> Result<BTreeMap<u32, f64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading /proc/{pid}/task"))?
    {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that exits meanwhile has no file any more: it is simply not counted.
        let Ok(sched) = std::fs::read_to_string(entry.path().join("sched")) else {
            continue;
        };
        let ms = sched
            .lines()
            .find_map(|l| l.strip_prefix("se.sum_exec_runtime"))
            .and_then(|v| v.trim_start_matches([' ', ':']).trim().parse::<f64>().ok())
            .with_context(|| format!("no se.sum_exec_runtime in /proc/{pid}/task/{tid}/sched"))?;
        out.insert(tid, ms);
    }
    Ok(out)
}

fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 1e3 / rustix::param::clock_ticks_per_second() as f64
}

/// A `faultline serve` process of this binary, its JSON log read line by line.
struct ServeProc {
    child: Child,
    socket: PathBuf,
    lines: Arc<LogLines>,
    /// `--no-supervisor`: one process, no worker.
    single: bool,
}

/// A daemon's log lines so far, and whether its stderr closed.
#[derive(Default)]
struct LogLines {
    state: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

fn message(line: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?.clone();
    Some((fields["message"].as_str()?.to_owned(), fields))
}

impl ServeProc {
    fn start(socket: &Path, mem: &Path, flags: &[&str]) -> Result<ServeProc> {
        let exe = std::env::current_exe().context("finding the faultline binary")?;
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new(exe)
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--mem-file")
            .arg(mem)
            .args(["--log-format", "json"])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting faultline serve")?;
        let stderr = child.stderr.take().context("the daemon's stderr")?;
        let lines = Arc::new(LogLines::default());
        let writer = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
                    .push(line);
                writer.changed.notify_all();
            }
            writer
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1 = true;
            writer.changed.notify_all();
        });
        let d = ServeProc {
            child,
            socket: socket.to_owned(),
            lines,
            single: flags.contains(&"--no-supervisor"),
        };
        // Bounded poll: the daemon's readiness is its socket accepting (the probe is logged as
        // a refused handshake, harmlessly).
        let end = Instant::now() + LIMIT;
        while UnixStream::connect(socket).is_err() {
            ensure!(
                Instant::now() < end,
                "faultline serve did not come up; log:\n{}",
                d.tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    fn tail(&self) -> String {
        let g = self
            .lines
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.0[g.0.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `pred` holds over the log's lines, returning what it returns.
    fn wait<T>(&self, what: &str, pred: impl Fn(&[String]) -> Option<T>) -> Result<T> {
        let end = Instant::now() + LIMIT;
        let mut g = self
            .lines
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(t) = pred(&g.0) {
                return Ok(t);
            }
            let now = Instant::now();
            if g.1 || now >= end {
                let tail = g.0[g.0.len().saturating_sub(20)..].join("\n");
                bail!("waiting for {what}: the daemon's log ended or time ran out:\n{tail}");
            }
            g = self
                .lines
                .changed
                .wait_timeout(g, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The CPU time of the supervisor and its live worker: the processes' clock ticks, and
    /// every live thread's run time.
    fn cpu(&self) -> Result<Cpu> {
        if self.single {
            return Ok(Cpu {
                ticks: proc_stat(self.child.id())?.0,
                threads: thread_runtimes(self.child.id())?,
            });
        }
        let worker = self.wait("the worker's start", |lines| {
            lines.iter().rev().find_map(|l| match message(l) {
                Some((m, f)) if m == "worker started" => f["worker"].as_u64(),
                _ => None,
            })
        })?;
        let worker = u32::try_from(worker).context("a worker pid")?;
        let mut threads = thread_runtimes(self.child.id())?;
        threads.extend(thread_runtimes(worker)?);
        Ok(Cpu {
            ticks: proc_stat(self.child.id())?.0 + proc_stat(worker)?.0,
            threads,
        })
    }

    /// The summaries of the ended sessions of the clients `pids` (awaited).
    fn summaries(&self, pids: &[u32]) -> Result<Vec<Value>> {
        pids.iter()
            .map(|pid| {
                let label = format!("pid {pid}");
                self.wait(&format!("the end of {label}'s session"), |lines| {
                    lines.iter().find_map(|l| match message(l) {
                        Some((m, f)) if m == "session ended" && f["label"] == label.as_str() => {
                            serde_json::from_str::<Value>(f["summary"].as_str()?).ok()
                        }
                        _ => None,
                    })
                })
            })
            .collect()
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round: `n` Firecrackers restore at once from `backend`; returns their samples, the
/// daemon's CPU time and the handler's faults (totals over the round).
fn round(
    kit: &Kit,
    dir: &Path,
    snap: &Snapshot,
    which: Which,
    daemon: Option<&ServeProc>,
    n: usize,
) -> Result<(Vec<Sample>, f64, u64)> {
    let backend = match daemon {
        Some(d) => Backend::Uffd(d.socket.clone()),
        None => Backend::File(snap.mem.clone()),
    };
    let mut vms = (0..n)
        .map(|i| Vm::start(kit, dir, &format!("fc{i}"), LIMIT))
        .collect::<Result<Vec<Vm>>>()?;
    let cpu0 = daemon.map(ServeProc::cpu).transpose()?;
    let samples = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| {
                let backend = &backend;
                s.spawn(move || -> Result<Sample> {
                    let before = proc_stat(vm.pid())?;
                    let loaded = vm.load(snap, backend, LIMIT)?;
                    let ticks = fckit::verified_ticks(vm, snap, 1, LIMIT)?;
                    let after = proc_stat(vm.pid())?;
                    Ok(Sample {
                        first_tick_ms: ms(ticks[0].at.duration_since(loaded.start)),
                        load_ms: ms(loaded.took),
                        fc_sys_ms: ticks_to_ms(after.1 - before.1),
                        fc_faults: after.2 - before.2,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a restore thread panicked"))?
            })
            .collect::<Result<Vec<Sample>>>()
    })
    .with_context(|| {
        format!(
            "restoring through {}; daemon log tail:\n{}",
            which.name(),
            daemon.map_or_else(String::new, ServeProc::tail)
        )
    })?;
    let pids: Vec<u32> = vms.iter().map(Vm::pid).collect();
    for vm in &mut vms {
        vm.kill();
    }
    let (cpu, faults) = match daemon {
        Some(d) => {
            let summaries = d.summaries(&pids)?;
            let cpu1 = d.cpu()?;
            let faults = summaries
                .iter()
                .map(|s| s["faults"].as_u64().unwrap_or(0))
                .sum();
            for s in &summaries {
                ensure!(
                    s["poisoned_pages"] == 0 && s["source_errors"] == 0,
                    "a session ended with errors: {s}"
                );
            }
            (cpu0.map_or(0.0, |c| c.since(&cpu1)), faults)
        }
        None => (0.0, 0),
    };
    Ok((samples, cpu, faults))
}

/// Runs the benchmark; prints the table and returns the report.
pub fn run(args: &FcBenchArgs) -> Result<FcReport> {
    let kit_dir = args.kit.clone().unwrap_or_else(Kit::default_dir);
    let kit = Kit::open(&kit_dir).map_err(anyhow::Error::msg)?;
    let repeat = args.repeat.max(1);
    let dir = tempfile::Builder::new()
        .prefix("faultline-bench-fc")
        .tempdir()?;
    eprintln!(
        "booting a {} MiB guest (about a minute on a quiet machine) ...",
        args.mem_mib
    );
    let t0 = Instant::now();
    let snap = fckit::boot_and_snapshot(&kit, dir.path(), false, args.mem_mib, 2, BOOT_LIMIT)?;
    eprintln!(
        "  snapshotted at tick {} after {:.0} s",
        snap.last_tick,
        t0.elapsed().as_secs_f64()
    );

    // The working set: what a restore touches up to its first ticks.
    let ws = dir.path().join("mem.ws");
    let ws_arg = ws.to_str().context("a UTF-8 temporary path")?;
    let ws_pages = {
        let recorder = ServeProc::start(
            &dir.path().join("record.sock"),
            &snap.mem,
            &["--record-ws", ws_arg],
        )?;
        let mut vm = Vm::start(&kit, dir.path(), "record", LIMIT)?;
        vm.load(&snap, &Backend::Uffd(recorder.socket.clone()), LIMIT)?;
        fckit::verified_ticks(&vm, &snap, 2, LIMIT)?;
        let pid = vm.pid();
        vm.kill();
        recorder.summaries(&[pid])?;
        // The set is written once the session has ended, after its summary is logged.
        recorder
            .wait("the working set's save", |lines| {
                lines.iter().find_map(|l| match message(l) {
                    Some((m, f)) if m == "working set recorded" => Some(Ok(f["pages"].clone())),
                    Some((m, f)) if m == "cannot write the working set" => {
                        Some(Err(f["error"].clone()))
                    }
                    _ => None,
                })
            })?
            .map_err(|e| anyhow::anyhow!("cannot write the working set: {e}"))?
            .as_u64()
            .unwrap_or(0)
    };
    ensure!(ws_pages > 0, "an empty working set was recorded");

    let mut which_all: Vec<Which> = args.backends.clone();
    which_all.push(Which::File);
    let variants = u8::try_from(args.variants.len()).context("at most 255 variants")?;
    which_all.extend((0..variants).map(Which::Variant));
    which_all.sort();
    which_all.dedup();
    let mut daemons: BTreeMap<Which, ServeProc> = BTreeMap::new();
    let mut configs = vec![
        (Which::OnDemand, vec![]),
        (Which::BackgroundFill, vec!["--background-fill"]),
        (Which::Prefetch, vec!["--prefetch-ws", ws_arg]),
    ];
    // `{ws}` in a variant's flags stands for the working set recorded above.
    for (i, v) in (0..variants).zip(&args.variants) {
        let flags = v
            .iter()
            .map(|f| if f == "{ws}" { ws_arg } else { f.as_str() })
            .collect();
        configs.push((Which::Variant(i), flags));
    }
    for (which, flags) in configs {
        if !which_all.contains(&which) {
            continue;
        }
        let mut flags = flags;
        flags.extend(args.serve_flags.iter().map(String::as_str));
        let socket = dir.path().join(format!("{which:?}.sock"));
        daemons.insert(which, ServeProc::start(&socket, &snap.mem, &flags)?);
    }
    eprintln!("warm-up restores ...");
    for &which in &which_all {
        round(&kit, dir.path(), &snap, which, daemons.get(&which), 1)?;
    }

    let mut rows = Vec::new();
    for &n in &args.clones {
        let mut samples: BTreeMap<Which, Collected> = BTreeMap::new();
        for r in 0..repeat {
            eprintln!("{n} clone(s) at once, round {}/{repeat} ...", r + 1);
            // Each round starts one backend later: none is always the first after a pause (or
            // always right after the same other one).
            let len = which_all.len();
            for &which in which_all.iter().cycle().skip(r % len).take(len) {
                let (s, cpu, faults) =
                    round(&kit, dir.path(), &snap, which, daemons.get(&which), n)?;
                let e = samples.entry(which).or_default();
                e.round_ticks.push(median(
                    &s.iter().map(|x| x.first_tick_ms).collect::<Vec<_>>(),
                ));
                e.samples.extend(s);
                e.cpu.push(cpu / n as f64);
                e.faults.push(faults as f64 / n as f64);
            }
        }
        let base_rounds = samples
            .get(&Which::File)
            .map(|c| c.round_ticks.clone())
            .context("the File baseline's rounds")?;
        let mut clone_rows: Vec<FcRow> = samples
            .into_iter()
            .map(
                |(
                    which,
                    Collected {
                        samples: s,
                        cpu,
                        faults,
                        round_ticks,
                    },
                )| {
                    let per_round: Vec<f64> = round_ticks
                        .iter()
                        .zip(&base_rounds)
                        .map(|(t, b)| t / b)
                        .collect();
                    let first: Vec<f64> = s.iter().map(|x| x.first_tick_ms).collect();
                    FcRow {
                        backend: which,
                        clones: n,
                        first_tick_ms: [
                            first.iter().copied().fold(f64::INFINITY, f64::min),
                            median(&first),
                            first.iter().copied().fold(0.0, f64::max),
                        ],
                        load_ms: median(&s.iter().map(|x| x.load_ms).collect::<Vec<_>>()),
                        daemon_cpu_ms: median(&cpu),
                        fc_sys_ms: median(&s.iter().map(|x| x.fc_sys_ms).collect::<Vec<_>>()),
                        fc_faults: median(
                            &s.iter().map(|x| x.fc_faults as f64).collect::<Vec<_>>(),
                        ),
                        handler_faults: median(&faults),
                        samples: s,
                        ratio_first_tick: 0.0,
                        ratio_load: 0.0,
                        ratio_cpu: 0.0,
                        ratio_fc_faults: 0.0,
                        paired_first_tick: median_ci(&per_round),
                    }
                },
            )
            .collect();
        let base = clone_rows
            .iter()
            .find(|r| r.backend == Which::File)
            .cloned()
            .context("the File baseline row")?;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        for r in &mut clone_rows {
            r.ratio_first_tick = ratio(r.first_tick_ms[1], base.first_tick_ms[1]);
            r.ratio_load = ratio(r.load_ms, base.load_ms);
            r.ratio_cpu = ratio(r.daemon_cpu_ms + r.fc_sys_ms, base.fc_sys_ms);
            r.ratio_fc_faults = ratio(r.fc_faults, base.fc_faults);
        }
        rows.extend(clone_rows);
    }
    let report = FcReport {
        kernel: rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned(),
        mem_mib: args.mem_mib,
        repeat,
        working_set_pages: ws_pages,
        rows,
    };
    print_table(&report);
    Ok(report)
}

fn print_table(r: &FcReport) {
    println!(
        "\nfaultline bench --firecracker: a {} MiB guest restored {} time(s) per backend and \
         clone count (working set: {} pages); times from PUT /snapshot/load, medians, \
         ratios to the File backend of the same clone count; paired: the median of each \
         round's ratio to File's restore in that round, with its 95% confidence interval",
        r.mem_mib, r.repeat, r.working_set_pages
    );
    println!(
        "{:<28} {:>6} {:>24} {:>8} {:>9} {:>9} {:>9} {:>9} {:>22} {:>24}",
        "backend",
        "clones",
        "first tick min/med/max",
        "load",
        "daemon",
        "fc sys",
        "fc flt",
        "uffd flt",
        "ratio tick/load/cpu/flt",
        "paired tick (95% CI)"
    );
    for row in &r.rows {
        println!(
            "{:<28} {:>6} {:>7.0}/{:>5.0}/{:>5.0} ms {:>5.1} ms {:>6.0} ms {:>6.0} ms {:>9.0} {:>9.0} {:>5.2}/{:>5.2}/{:>4.2}/{:>4.2} {:>9.3} {}",
            row.backend.label(),
            row.clones,
            row.first_tick_ms[0],
            row.first_tick_ms[1],
            row.first_tick_ms[2],
            row.load_ms,
            row.daemon_cpu_ms,
            row.fc_sys_ms,
            row.fc_faults,
            row.handler_faults,
            row.ratio_first_tick,
            row.ratio_load,
            row.ratio_cpu,
            row.ratio_fc_faults,
            row.paired_first_tick[1],
            match row.paired_first_tick {
                [lo, _, hi] if lo.is_finite() && hi.is_finite() => format!("({lo:.3}-{hi:.3})"),
                _ => "(no interval below 6 rounds)".to_string(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::median_ci;

    #[test]
    fn the_median_interval_takes_the_binomial_ranks() {
        // 21 samples: the 6th and 16th smallest (P(Bin(21, 1/2) <= 5) = 1.3%, <= 6: 3.9%).
        let v: Vec<f64> = (1..=21).rev().map(f64::from).collect();
        assert_eq!(median_ci(&v), [6.0, 11.0, 16.0]);
        // 6 samples: min and max (1/64 = 1.6% on each side).
        let v: Vec<f64> = [3.0, 1.0, 6.0, 2.0, 5.0, 4.0].to_vec();
        assert_eq!(median_ci(&v), [1.0, 4.0, 6.0]);
        // 5 samples: no interval of 95% exists (1/32 = 3.1% on each side).
        let [lo, mid, hi] = median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(lo.is_nan() && hi.is_nan() && mid == 3.0);
        // 84 samples: ranks 33 and 52 (P(Bin(84, 1/2) <= 32) = 1.9%, <= 33: 3.1%).
        let v: Vec<f64> = (1..=84).map(f64::from).collect();
        assert_eq!(median_ci(&v), [33.0, 43.0, 52.0]);
    }
}
