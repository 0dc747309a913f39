//! A driver for a real Firecracker (the kit in `../shared/firecracker`: the binary, a guest kernel
//! and its boot args), shared by `faultline bench --firecracker` and the real-client tests
//! (`tests/firecracker.rs` includes this file with `#[path]`, so the product does not depend on
//! test crates and the tests drive exactly the code the bench measures with).
//!
//! - [`Api`]: Firecracker's HTTP API on its Unix socket, hand-written HTTP/1.1: one connection
//!   per request, `PUT`/`PATCH` with a JSON body, the reply read as a status line, headers and a
//!   `Content-Length` body.
//! - [`Vm`]: one Firecracker process in a process group of its own (killed whole on drop), its
//!   stdout (the guest's serial console) read line by line into a [`Serial`], where every
//!   `FCTICK <n> verify=<ok|BAD> ...` line the guest's kernel workload prints is kept with the
//!   instant it arrived.
//!
//! Every wait is bounded by a caller's limit and fails with the console's last lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustix::process::{kill_process_group, Pid, Signal};
use serde_json::{json, Value};

/// The kit's location relative to the workspace root.
pub const KIT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/firecracker");

/// The environment variable that points at another kit.
pub const KIT_ENV: &str = "FAULTLINE_FC_KIT";

/// Firecracker, a guest kernel and its boot args.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The `firecracker` binary.
    pub firecracker: PathBuf,
    /// The guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// The kernel's boot args (`boot_args.txt`, one line).
    pub boot_args: String,
}

impl Kit {
    /// Where the kit is looked for: `$FAULTLINE_FC_KIT`, else [`KIT_DIR`].
    pub fn default_dir() -> PathBuf {
        std::env::var_os(KIT_ENV).map_or_else(|| PathBuf::from(KIT_DIR), PathBuf::from)
    }

    /// The kit in `dir`; `Err` says what is missing (the caller skips with it). `/dev/kvm` is
    /// checked too: without it the kit is of no use.
    pub fn open(dir: &Path) -> std::result::Result<Kit, String> {
        let firecracker = dir.join("firecracker");
        let kernel = dir.join("vmlinux");
        for f in [&firecracker, &kernel, &dir.join("boot_args.txt")] {
            if !f.is_file() {
                return Err(format!("no Firecracker kit: {} is missing", f.display()));
            }
        }
        let boot_args = std::fs::read_to_string(dir.join("boot_args.txt"))
            .map_err(|e| format!("reading {}: {e}", dir.join("boot_args.txt").display()))?
            .trim()
            .to_owned();
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Err("/dev/kvm is missing or not usable".into());
        }
        Ok(Kit {
            firecracker,
            kernel,
            boot_args,
        })
    }
}

/// An HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body (empty for 204).
    pub body: String,
}

/// Firecracker's API socket.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    /// The API on `socket`.
    pub fn new(socket: &Path) -> Api {
        Api {
            socket: socket.to_owned(),
        }
    }

    /// Sends `method path` with `body` as JSON and reads the reply (at most `limit` for it).
    pub fn call(&self, method: &str, path: &str, body: &Value, limit: Duration) -> Result<Reply> {
        let body = body.to_string();
        let mut conn = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        conn.set_read_timeout(Some(limit))?;
        conn.set_write_timeout(Some(limit))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes())
            .with_context(|| format!("sending {method} {path}"))?;
        read_reply(&mut BufReader::new(conn))
            .with_context(|| format!("the reply to {method} {path}"))
    }

    /// [`Api::call`], failing unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: &Value, limit: Duration) -> Result<Reply> {
        let reply = self.call(method, path, body, limit)?;
        ensure!(
            (200..300).contains(&reply.status),
            "{method} {path} {body}: HTTP {} {}",
            reply.status,
            reply.body
        );
        Ok(reply)
    }
}

/// Reads one HTTP/1.1 reply: the status line, headers up to the blank line, then exactly
/// `Content-Length` bytes of body (none without the header: Firecracker sends it whenever there
/// is a body).
fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    r.read_line(&mut line).context("reading the status line")?;
    let mut parts = line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("a malformed status line {line:?}");
    };
    ensure!(version.starts_with("HTTP/1."), "not HTTP/1.x: {line:?}");
    let status: u16 = code
        .parse()
        .with_context(|| format!("the status of {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        let n = r.read_line(&mut line).context("reading a header")?;
        ensure!(n > 0, "the connection closed inside the headers");
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .with_context(|| format!("Content-Length {value:?}"))?;
            }
        }
    }
    ensure!(length <= 1 << 20, "a {length}-byte reply body");
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).context("reading the body")?;
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One `FCTICK` line of the guest's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The guest's tick counter.
    pub n: u64,
    /// `verify=ok` (every page of the guest's buffer held its pattern).
    pub ok: bool,
    /// When the line arrived.
    pub at: Instant,
}

/// Parses `... FCTICK <n> verify=<ok|BAD> ...` (after the kernel's `[time]` prefix).
pub fn parse_tick(line: &str, at: Instant) -> Option<Tick> {
    let rest = &line[line.find("FCTICK ")? + "FCTICK ".len()..];
    let mut words = rest.split_whitespace();
    let n = words.next()?.parse().ok()?;
    let ok = words.next()?.strip_prefix("verify=")? == "ok";
    Some(Tick { n, ok, at })
}

#[derive(Default)]
struct SerialState {
    lines: Vec<String>,
    ticks: Vec<Tick>,
    eof: bool,
}

/// The guest's serial console as it arrives.
#[derive(Default)]
pub struct Serial {
    state: Mutex<SerialState>,
    changed: Condvar,
}

impl Serial {
    /// Reads `stream` into a new console on a thread of its own, until end of file.
    fn capture(stream: impl Read + Send + 'static) -> Arc<Serial> {
        let serial = Arc::new(Serial::default());
        let writer = Arc::clone(&serial);
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                let mut s = writer.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(tick) = parse_tick(&line, at) {
                    s.ticks.push(tick);
                }
                s.lines.push(line);
                drop(s);
                writer.changed.notify_all();
            }
            writer
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .eof = true;
            writer.changed.notify_all();
        });
        serial
    }

    /// Every tick so far.
    pub fn ticks(&self) -> Vec<Tick> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ticks
            .clone()
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.lines[s.lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits (at most `limit`) until `n` ticks have arrived and returns them all; fails when the
    /// console closes first (Firecracker exited) or time runs out, with the console's tail.
    pub fn wait_ticks(&self, n: usize, limit: Duration) -> Result<Vec<Tick>> {
        let end = Instant::now() + limit;
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if s.ticks.len() >= n {
                return Ok(s.ticks.clone());
            }
            let now = Instant::now();
            if s.eof || now >= end {
                bail!(
                    "{} waiting for {n} FCTICK lines ({} so far); serial console tail:\n{}",
                    if s.eof {
                        "the console closed (Firecracker exited)"
                    } else {
                        "timed out"
                    },
                    s.ticks.len(),
                    s.lines[s.lines.len().saturating_sub(20)..].join("\n")
                );
            }
            s = self
                .changed
                .wait_timeout(s, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Where a snapshot's memory comes from on restore.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Firecracker maps the memory file itself (the kernel's page-cache path).
    File(PathBuf),
    /// A page-fault handler listening on this socket.
    Uffd(PathBuf),
}

/// A snapshot on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Firecracker's VM state file.
    pub vmstate: PathBuf,
    /// Guest memory.
    pub mem: PathBuf,
    /// The last tick the guest printed before it was paused.
    pub last_tick: u64,
}

/// A Firecracker process (in its own process group) and its API.
pub struct Vm {
    child: Child,
    api: Api,
    serial: Arc<Serial>,
    log: PathBuf,
}

/// How long Firecracker may take to answer one API call that is not a snapshot load or create.
const CALL_LIMIT: Duration = Duration::from_secs(60);

impl Vm {
    /// Starts Firecracker with its API socket, log and stderr in `dir` (files named after
    /// `name`), and waits (at most `limit`) until its API answers.
    pub fn start(kit: &Kit, dir: &Path, name: &str, limit: Duration) -> Result<Vm> {
        let socket = dir.join(format!("{name}.api.sock"));
        let log = dir.join(format!("{name}.log"));
        // A stale socket of an earlier run would make Firecracker refuse to start.
        let _ = std::fs::remove_file(&socket);
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = std::fs::File::create(dir.join(format!("{name}.stderr")))?;
        let mut child = Command::new(&kit.firecracker)
            .arg("--api-sock")
            .arg(&socket)
            .args(["--no-seccomp", "--level", "Info", "--log-path"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", kit.firecracker.display()))?;
        let stdout = child.stdout.take().context("Firecracker's stdout")?;
        let vm = Vm {
            child,
            api: Api::new(&socket),
            serial: Serial::capture(stdout),
            log,
        };
        let end = Instant::now() + limit;
        // Bounded poll: Firecracker signals readiness only by accepting on its socket.
        while UnixStream::connect(&socket).is_err() {
            ensure!(
                Instant::now() < end,
                "Firecracker's API did not come up within {limit:?}; its log:\n{}",
                vm.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(vm)
    }

    /// Firecracker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its API.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The guest's console.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of Firecracker's own log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Configures and starts a fresh guest: `vcpus`, `mem_mib` of memory (on 2 MiB hugetlbfs
    /// pages with `huge`; reserve them first).
    pub fn boot(&self, kit: &Kit, vcpus: u32, mem_mib: u64, huge: bool) -> Result<()> {
        self.api.ok(
            "PUT",
            "/boot-source",
            &json!({
                "kernel_image_path": kit.kernel,
                "boot_args": kit.boot_args,
            }),
            CALL_LIMIT,
        )?;
        let mut machine = json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib });
        if huge {
            machine["huge_pages"] = json!("2M");
        }
        self.api
            .ok("PUT", "/machine-config", &machine, CALL_LIMIT)?;
        self.api.ok(
            "PUT",
            "/actions",
            &json!({ "action_type": "InstanceStart" }),
            CALL_LIMIT,
        )?;
        Ok(())
    }

    /// Pauses the guest and writes a full snapshot to `dir/vmstate` and `dir/mem`.
    pub fn snapshot(&self, dir: &Path) -> Result<Snapshot> {
        self.api
            .ok("PATCH", "/vm", &json!({ "state": "Paused" }), CALL_LIMIT)?;
        let last_tick = self.serial.ticks().last().map_or(0, |t| t.n);
        let snap = Snapshot {
            vmstate: dir.join("vmstate"),
            mem: dir.join("mem"),
            last_tick,
        };
        self.api.ok(
            "PUT",
            "/snapshot/create",
            &json!({
                "snapshot_type": "Full",
                "snapshot_path": snap.vmstate,
                "mem_file_path": snap.mem,
            }),
            Duration::from_secs(300),
        )?;
        Ok(snap)
    }

    /// `PUT /snapshot/load` of `snap` from `backend`, resuming the guest; returns when the call
    /// was sent and how long it took (Firecracker touches guest memory inside the call, so a
    /// handler must serve faults before it returns).
    pub fn load(&self, snap: &Snapshot, backend: &Backend, limit: Duration) -> Result<Loaded> {
        let mem_backend = match backend {
            Backend::File(path) => json!({ "backend_type": "File", "backend_path": path }),
            Backend::Uffd(path) => json!({ "backend_type": "Uffd", "backend_path": path }),
        };
        let body = json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": mem_backend,
            "resume_vm": true,
        });
        let start = Instant::now();
        self.api
            .ok("PUT", "/snapshot/load", &body, limit)
            .with_context(|| format!("Firecracker's log:\n{}", self.log_tail(15)))?;
        Ok(Loaded {
            start,
            took: start.elapsed(),
        })
    }

    /// SIGKILLs the whole process group and reaps Firecracker.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pgid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(pgid, Signal::KILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished `PUT /snapshot/load`.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// When the request was sent.
    pub start: Instant,
    /// How long the call took.
    pub took: Duration,
}

/// Boots a guest in a new Firecracker in `dir`, waits (at most `limit`) for `ticks` ticks, and
/// snapshots it into `dir` (the process is killed afterwards).
pub fn boot_and_snapshot(
    kit: &Kit,
    dir: &Path,
    huge: bool,
    mem_mib: u64,
    ticks: usize,
    limit: Duration,
) -> Result<Snapshot> {
    let mut vm = Vm::start(kit, dir, "boot", CALL_LIMIT)?;
    vm.boot(kit, 2, mem_mib, huge)
        .with_context(|| format!("Firecracker's log:\n{}", vm.log_tail(15)))?;
    let seen = vm.serial.wait_ticks(ticks, limit)?;
    if let Some(bad) = seen.iter().find(|t| !t.ok) {
        bail!(
            "the booted guest printed tick {} with verify=BAD:\n{}",
            bad.n,
            vm.serial.tail(20)
        );
    }
    let snap = vm.snapshot(dir)?;
    vm.kill();
    Ok(snap)
}

/// The ticks a restored guest printed: at least `n` (awaited at most `limit`), each newer than
/// the snapshot's last, every one `verify=ok`.
pub fn verified_ticks(vm: &Vm, snap: &Snapshot, n: usize, limit: Duration) -> Result<Vec<Tick>> {
    let ticks = vm.serial.wait_ticks(n, limit)?;
    for t in &ticks {
        ensure!(
            t.ok,
            "the restored guest printed tick {} with verify=BAD; serial console tail:\n{}",
            t.n,
            vm.serial.tail(20)
        );
        ensure!(
            t.n > snap.last_tick,
            "the restored guest printed tick {}, not newer than the snapshot's {}",
            t.n,
            snap.last_tick
        );
    }
    Ok(ticks)
}

/// 2 MiB huge pages added to `/proc/sys/vm/nr_hugepages` for a hugetlbfs guest, given back on
/// drop (the count is lowered by as many as were added, so other users' pages stay).
#[must_use = "the huge pages are given back when this is dropped"]
pub struct HugePages {
    added: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_count(path: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} holds {text:?}"))
}

impl HugePages {
    /// Adds `pages` 2 MiB pages to the pool; fails (having given them back) unless at least
    /// `pages` are free afterwards.
    pub fn reserve(pages: u64) -> Result<HugePages> {
        let before = read_count(NR_HUGEPAGES)?;
        std::fs::write(NR_HUGEPAGES, (before + pages).to_string())
            .with_context(|| format!("writing {NR_HUGEPAGES}"))?;
        let after = read_count(NR_HUGEPAGES)?;
        let held = HugePages {
            added: after.saturating_sub(before),
        };
        let free = read_count(FREE_HUGEPAGES)?;
        ensure!(
            free >= pages,
            "only {free} free 2 MiB huge pages after asking for {pages} more"
        );
        Ok(held)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Ok(now) = read_count(NR_HUGEPAGES) {
            let _ = std::fs::write(NR_HUGEPAGES, now.saturating_sub(self.added).to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_parse() {
        let at = Instant::now();
        let t = parse_tick(
            "[   76.676136] FCTICK 12 verify=ok bad=0 cpus=2 on_cpu=1 jiffies=4294911464",
            at,
        );
        assert_eq!(
            t,
            Some(Tick {
                n: 12,
                ok: true,
                at
            })
        );
        let t = parse_tick("[ 1.0] FCTICK 3 verify=BAD bad=7 cpus=2", at);
        assert_eq!(
            t,
            Some(Tick {
                n: 3,
                ok: false,
                at
            })
        );
        assert_eq!(
            parse_tick("FCMARKER: linux guest workload started", at),
            None
        );
        assert_eq!(parse_tick("FCTICK x verify=ok", at), None);
        assert_eq!(parse_tick("FCTICK 4", at), None);
    }

    #[test]
    fn replies_parse() {
        let raw = b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Length: 12\r\n\r\n{\"a\":\"bcde\"}";
        let r = read_reply(&mut &raw[..]).expect("a reply");
        assert_eq!(r.status, 400);
        assert_eq!(r.body, "{\"a\":\"bcde\"}");
        let raw = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        let r = read_reply(&mut &raw[..]).expect("a reply");
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert!(read_reply(&mut &b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\nab"[..]).is_err());
        assert!(read_reply(&mut &b"SSH-2.0\r\n\r\n"[..]).is_err());
    }
}
