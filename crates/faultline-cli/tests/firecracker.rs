//! The real client: Firecracker v1.16.1 (the kit in `../shared/firecracker`, or
//! `$FAULTLINE_FC_KIT`) restores a snapshot of a running guest through `faultline serve`.
//!
//! A guest is booted once per run (4 KiB pages; a second one on 2 MiB hugetlbfs pages) and
//! snapshotted; every scenario restores that snapshot in fresh Firecracker processes. A restore
//! passes only when Firecracker stays alive and the guest's kernel workload prints new
//! `FCTICK <n> verify=ok` lines after resume (it re-checks a 32 MiB buffer of per-page patterns
//! every tick, so a wrong or zero page shows as `verify=BAD`). Each session's summary (logged by
//! the daemon when the session ends: the test ends it by killing Firecracker) must show faults
//! and pages served, no more zero pages than the memory file holds, nothing poisoned and no
//! source errors.
//!
//! Without the kit or /dev/kvm the tests print why and pass; under CI=true, on a machine that
//! has both, a kit that cannot be used fails them.

#[path = "../src/fckit.rs"]
#[allow(dead_code)]
mod fckit;

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fields, is_message, signal, summary, Daemon, Log, EXE};
use fckit::{Backend, Kit, Snapshot, Vm};
use rustix::process::Signal;
use serde_json::Value;

/// Boot to the first ticks: ~60 s on a quiet machine, much more while others compile.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// Any single restore step (the load call, a few ticks, a session's end): ~0.3 s on a quiet
/// machine; a safety net, never a delay.
const LIMIT: Duration = Duration::from_secs(120);

/// New ticks a restored guest must print.
const NEW_TICKS: usize = 3;

/// Ticks the booted guest prints before it is snapshotted.
const BOOT_TICKS: usize = 2;

/// Guest memory: 4 KiB-page guest, and the hugetlbfs guest (64 huge pages).
const MEM_MIB: u64 = 256;
const HUGE_MEM_MIB: u64 = 128;

/// The kit, or `None` (printing why) when this machine has none. Under CI=true a machine with
/// the kit's directory and /dev/kvm must be able to use them.
fn kit(test: &str) -> Option<Kit> {
    let dir = Kit::default_dir();
    match Kit::open(&dir) {
        Ok(kit) => Some(kit),
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !(ci && dir.exists() && Path::new("/dev/kvm").exists()),
                "CI=true, {} and /dev/kvm exist, but: {why}",
                dir.display()
            );
            faultline_testing::skip(test, &why);
            None
        }
    }
}

/// The last lines of a daemon's log.
fn log_tail(log: &Log) -> String {
    let lines = log.lines();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Pages of `page` bytes in `mem`, and how many of them are all zero.
fn count_pages(mem: &Path, page: usize) -> (u64, u64) {
    let bytes = std::fs::read(mem).expect("reading the memory file");
    let zero = bytes
        .chunks(page)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as u64;
    ((bytes.len() / page) as u64, zero)
}

/// A booted guest's snapshot, its directory and what its memory file holds.
struct Guest {
    kit: Kit,
    dir: tempfile::TempDir,
    snap: Snapshot,
    /// Pages of the memory file (in 4 KiB units) and how many are zero.
    pages: u64,
    zero_pages: u64,
}

impl Guest {
    fn boot(kit: Kit, huge: bool, mem_mib: u64) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        let snap =
            fckit::boot_and_snapshot(&kit, dir.path(), huge, mem_mib, BOOT_TICKS, BOOT_LIMIT)
                .unwrap_or_else(|e| panic!("booting and snapshotting the guest: {e:#}"));
        let (pages, zero_pages) = count_pages(&snap.mem, 4096);
        eprintln!(
            "booted and snapshotted a {mem_mib} MiB guest{} in {:.1} s (last tick {}; {pages} \
             pages, {zero_pages} of them zero)",
            if huge { " on 2 MiB pages" } else { "" },
            t0.elapsed().as_secs_f64(),
            snap.last_tick
        );
        Guest {
            kit,
            dir,
            snap,
            pages,
            zero_pages,
        }
    }

    /// A fresh directory for one scenario.
    fn scenario_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).expect("creating a scenario directory");
        d
    }

    /// Starts Firecracker in `dir` as `name`.
    fn start_vm(&self, dir: &Path, name: &str) -> Vm {
        Vm::start(&self.kit, dir, name, LIMIT)
            .unwrap_or_else(|e| panic!("starting Firecracker: {e:#}"))
    }

    /// Restores into `vm` from `backend` and checks the restored guest: new ticks, all
    /// `verify=ok`, Firecracker alive. `daemon` (if any) is shown on failure.
    fn restore(&self, vm: &mut Vm, backend: &Backend, daemon: Option<&Daemon>) {
        let loaded = vm.load(&self.snap, backend, LIMIT);
        let checked = loaded.and_then(|loaded| {
            let ticks = fckit::verified_ticks(vm, &self.snap, NEW_TICKS, LIMIT)?;
            eprintln!(
                "  restored through {backend:?}: load {:.0} ms, first tick {:.0} ms, tick {} \
                 {:.0} ms after the load request",
                loaded.took.as_secs_f64() * 1e3,
                (ticks[0].at - loaded.start).as_secs_f64() * 1e3,
                NEW_TICKS,
                (ticks[NEW_TICKS - 1].at - loaded.start).as_secs_f64() * 1e3,
            );
            Ok(())
        });
        if let Err(e) = checked {
            panic!(
                "restore through {backend:?} failed: {e:#}\ndaemon log tail:\n{}",
                daemon.map_or_else(|| "(no daemon)".into(), |d| log_tail(d.log()))
            );
        }
        assert!(vm.alive(), "Firecracker exited after the restore");
    }

    /// Restores a fresh Firecracker named `name` through `daemon`, checks it, ends its session
    /// by killing it and returns the session's summary (checked too).
    fn restore_through(&self, dir: &Path, name: &str, daemon: &Daemon) -> Value {
        let mut vm = self.start_vm(dir, name);
        self.restore(
            &mut vm,
            &Backend::Uffd(daemon.socket().to_owned()),
            Some(daemon),
        );
        self.end_session(vm, daemon)
    }

    /// Kills `vm`, waits for its session's end and returns the checked summary.
    fn end_session(&self, mut vm: Vm, daemon: &Daemon) -> Value {
        let pid = vm.pid();
        vm.kill();
        let s = summary(&session_ended(daemon, pid));
        self.check_summary(&s);
        s
    }

    /// Faults and pages served, no more zero pages than the file holds, nothing poisoned, no
    /// source errors.
    fn check_summary(&self, s: &Value) {
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
        assert!(n("faults") > 0, "no faults served: {s}");
        assert!(n("pages") > 0, "no pages served: {s}");
        assert!(n("pages") <= self.pages, "more pages than the file: {s}");
        assert!(
            n("zero_pages") <= self.zero_pages,
            "more zero pages than the file's {}: {s}",
            self.zero_pages
        );
        check_clean(s);
    }
}

/// Nothing poisoned, no source errors.
fn check_clean(s: &Value) {
    assert_eq!(s["poison"], 0, "{s}");
    assert_eq!(s["poisoned_pages"], 0, "{s}");
    assert_eq!(s["source_errors"], 0, "{s}");
}

/// Waits for the "session ended" line of Firecracker `pid`'s session (labelled `pid <pid>`, or
/// carrying a `pid` field).
fn session_ended(daemon: &Daemon, pid: u32) -> String {
    let label = format!("pid {pid}");
    daemon
        .log()
        .wait_count_within(&format!("the end of {label}"), 1, LIMIT, |l| {
            let f = fields(l);
            is_message(l, "session ended")
                && (f["label"].as_str() == Some(&label) || f["pid"].as_u64() == Some(pid.into()))
        })
}

/// A scenario: its name and what it does with the guest in its own directory.
type Scenario<'a> = (&'a str, fn(&Guest, &Path));

/// Runs every scenario (each in its own directory), then fails naming those that failed.
fn run_scenarios(guest: &Guest, scenarios: &[Scenario<'_>]) {
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        let t0 = Instant::now();
        let dir = guest.scenario_dir(name);
        let ok = catch_unwind(AssertUnwindSafe(|| scenario(guest, &dir))).is_ok();
        eprintln!(
            "scenario {name}: {} in {:.1} s",
            if ok { "ok" } else { "FAILED" },
            t0.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(*name);
        }
    }
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}

/// The File backend (Firecracker maps the memory file itself): the baseline the others match.
fn file_backend(g: &Guest, dir: &Path) {
    let mut vm = g.start_vm(dir, "fc");
    g.restore(&mut vm, &Backend::File(g.snap.mem.clone()), None);
}

/// On demand: every page the restore touches is served when it faults.
fn on_demand(g: &Guest, dir: &Path) {
    let daemon = Daemon::start(dir, &g.snap.mem, &[]);
    let s = g.restore_through(dir, "fc", &daemon);
    assert_eq!(s["prefetch_pages"], 0, "{s}");
    assert_eq!(s["fill_pages"], 0, "{s}");
    assert!(
        s["pages"].as_u64() < Some(g.pages),
        "an on-demand restore of a few ticks touched every page: {s}"
    );
}

/// `--record-ws` on a first restore, then `--prefetch-ws` replays it into the next.
fn record_then_prefetch(g: &Guest, dir: &Path) {
    let ws = dir.join("mem.ws");
    let ws_arg = ws.to_str().expect("a UTF-8 path");
    let recorder = Daemon::start(dir, &g.snap.mem, &["--record-ws", ws_arg]);
    g.restore_through(dir, "record", &recorder);
    // The set is written when the session has ended, after its summary is logged.
    let saved = recorder
        .log()
        .wait_count_within("the working set's save", 1, LIMIT, |l| {
            is_message(l, "working set recorded") || is_message(l, "cannot write the working set")
        });
    assert!(is_message(&saved, "working set recorded"), "{saved}");
    assert!(fields(&saved)["pages"].as_u64() > Some(0), "{saved}");
    assert!(recorder.terminate().success());
    let replayer = Daemon::start(dir, &g.snap.mem, &["--prefetch-ws", ws_arg]);
    let s = g.restore_through(dir, "prefetch", &replayer);
    assert!(
        s["prefetch_pages"].as_u64() > Some(0),
        "nothing prefetched: {s}"
    );
}

/// `--background-fill`: once demand is served every other page is filled; the session ends
/// with every page of the file present, its zero pages among them.
fn background_fill(g: &Guest, dir: &Path) {
    let addr = common::free_local_addr();
    let daemon = Daemon::start(
        dir,
        &g.snap.mem,
        &["--background-fill", "--metrics", addr.as_str()],
    );
    let mut vm = g.start_vm(dir, "fc");
    g.restore(
        &mut vm,
        &Backend::Uffd(daemon.socket().to_owned()),
        Some(&daemon),
    );
    // The fill has no end signal of its own: poll the worker's page count (bounded).
    let end = Instant::now() + LIMIT;
    loop {
        let pages = common::try_metric(&addr, "faultline_pages", "scope=\"total\"");
        if pages == Some(g.pages) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the background fill stopped at {pages:?} of {} pages; log tail:\n{}",
            g.pages,
            log_tail(daemon.log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest still runs right on its filled memory.
    let seen = vm.serial().ticks().len();
    fckit::verified_ticks(&vm, &g.snap, seen + 1, LIMIT)
        .unwrap_or_else(|e| panic!("after the fill: {e:#}"));
    let s = g.end_session(vm, &daemon);
    assert_eq!(s["pages"], g.pages, "{s}");
    assert!(s["fill_pages"].as_u64() > Some(0), "{s}");
    assert!(
        s["zero_pages"].as_u64() > Some(0),
        "no zero page served: {s}"
    );
}

/// Four clones of one snapshot restored at once through one daemon.
fn four_clones(g: &Guest, dir: &Path) {
    const CLONES: usize = 4;
    let daemon = Daemon::start(dir, &g.snap.mem, &[]);
    let backend = Backend::Uffd(daemon.socket().to_owned());
    let mut vms: Vec<Vm> = (0..CLONES)
        .map(|i| g.start_vm(dir, &format!("clone{i}")))
        .collect();
    std::thread::scope(|s| {
        for vm in &mut vms {
            let backend = &backend;
            let daemon = &daemon;
            s.spawn(move || g.restore(vm, backend, Some(daemon)));
        }
    });
    let sessions = daemon.log().count(|l| is_message(l, "session started"));
    assert_eq!(sessions, CLONES, "{}", log_tail(daemon.log()));
    for vm in vms {
        g.end_session(vm, &daemon);
    }
}

/// The supervised daemon's worker is SIGKILLed at three moments of three restores: while the
/// load call is in flight (Firecracker touches memory inside it), right after it returned, and
/// once the guest is ticking. Each time the supervisor starts a new worker that resumes the
/// session, and the guest keeps ticking right.
fn worker_kills(g: &Guest, dir: &Path) {
    let daemon = Daemon::start(dir, &g.snap.mem, &[]);
    let log = daemon.log();
    let backend = Backend::Uffd(daemon.socket().to_owned());
    for (k, moment) in ["during the load", "after the load", "while ticking"]
        .into_iter()
        .enumerate()
    {
        let kill = k + 1;
        let worker = daemon.worker_pid(kill, LIMIT);
        let mut vm = g.start_vm(dir, &format!("kill{kill}"));
        let pid = vm.pid();
        let started = |l: &str| {
            is_message(l, "session started") && fields(l)["pid"].as_u64() == Some(u64::from(pid))
        };
        let loaded = std::thread::scope(|s| {
            let load = s.spawn(|| vm.load(&g.snap, &backend, LIMIT));
            if kill == 1 {
                log.wait_count_within("the session's start", 1, LIMIT, started);
                signal(worker, Signal::KILL);
                eprintln!(
                    "worker killed as the session started; the load call was {}",
                    if load.is_finished() {
                        "done by then"
                    } else {
                        "still in flight"
                    }
                );
            }
            load.join().expect("the load thread")
        });
        loaded.unwrap_or_else(|e| {
            panic!(
                "load with a worker killed {moment}: {e:#}\nlog:\n{}",
                log_tail(log)
            )
        });
        match kill {
            2 => signal(worker, Signal::KILL),
            3 => {
                fckit::verified_ticks(&vm, &g.snap, 1, LIMIT)
                    .unwrap_or_else(|e| panic!("before the kill: {e:#}\n{}", log_tail(log)));
                signal(worker, Signal::KILL);
            }
            _ => {}
        }
        let died = log.wait_count_within("the worker's death", kill, LIMIT, |l| {
            fields(l)["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("worker died"))
        });
        assert_eq!(fields(&died)["worker"], worker, "{died}");
        let seen = vm.serial().ticks().len();
        fckit::verified_ticks(&vm, &g.snap, seen + NEW_TICKS, LIMIT).unwrap_or_else(|e| {
            panic!(
                "after the worker was killed {moment}: {e:#}\nlog:\n{}",
                log_tail(log)
            )
        });
        assert!(
            vm.alive(),
            "Firecracker exited after a worker kill {moment}"
        );
        eprintln!("worker killed {moment}: the guest ticks on");
        vm.kill();
        // The new worker resumed the session and ends it clean (its counters start at the
        // resume: a guest whose memory was all present by then faults no more).
        check_clean(&summary(&session_ended(&daemon, pid)));
    }
    let next = daemon.worker_pid(4, LIMIT);
    assert_ne!(next, 0);
}

/// The memory file packed into a faultline image and served from it (`serve --image`).
fn image(g: &Guest, dir: &Path) {
    let img = dir.join("mem.img");
    let out = Command::new(EXE)
        .args(["image", "pack"])
        .arg(&g.snap.mem)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("running faultline image pack");
    assert!(
        out.status.success(),
        "image pack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = Daemon::start_image(&dir.join("fl.sock"), &img, &[]);
    g.restore_through(dir, "fc", &daemon);
}

#[test]
fn firecracker_restores_a_4k_guest_through_faultline_serve() {
    let test = "firecracker_restores_a_4k_guest_through_faultline_serve";
    let Some(kit) = kit(test) else { return };
    let guest = Guest::boot(kit, false, MEM_MIB);
    run_scenarios(
        &guest,
        &[
            ("file_backend", file_backend),
            ("on_demand", on_demand),
            ("record_then_prefetch", record_then_prefetch),
            ("background_fill", background_fill),
            ("four_clones", four_clones),
            ("worker_kills", worker_kills),
            ("image", image),
        ],
    );
}

#[test]
fn firecracker_restores_a_hugepage_guest_through_faultline_serve() {
    let test = "firecracker_restores_a_hugepage_guest_through_faultline_serve";
    let Some(kit) = kit(test) else { return };
    // The booted guest is killed before the restore maps its memory again: one guest's worth.
    let huge_pages = HUGE_MEM_MIB / 2;
    let _reserved = match fckit::HugePages::reserve(huge_pages) {
        Ok(r) => r,
        Err(e) => {
            faultline_testing::skip(test, &format!("{e:#}"));
            return;
        }
    };
    let guest = Guest::boot(kit, true, HUGE_MEM_MIB);
    run_scenarios(&guest, &[("hugepages_on_demand", on_demand)]);
}
