//! The supervisor/worker split of `faultline serve` under daemon faults (issue 12):
//!
//! - a restarted worker serves the very file its sessions started on, not whatever was renamed
//!   over its path (`--mem-file`, `--image`), and a `--remote` exporter restarted on another
//!   file is refused, never served;
//! - a SIGKILLed supervisor leaves its worker serving every session to its end;
//! - 10,000 balloon REMOVEs survive a worker restart (merged, resent in bounded messages);
//! - a worker that cannot start is restarted with backoff, its cause logged once, and VMs left
//!   without a worker past `--worker-down-limit` are ended (SIGKILL, logged);
//! - a session keeps its id and its counters across a worker restart.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    fields, is_message, signal, summary, verified_report, wait_until, within, HeldClient, Log,
    DEADLINE, EXE, MEM_LEN, SEED,
};
use faultline::firecracker::{send_handshake, GuestRegionUffdMapping, JsonShape};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};
use rustix::process::Signal;

/// A `faultline` process (serve or export) with its stderr captured, killed if the test fails.
struct Proc {
    child: Child,
    log: Arc<Log>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    fn spawn(args: &[&str], rust_log: &str) -> Proc {
        let mut child = Command::new(EXE)
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning faultline");
        let (log, reader) = Log::capture(child.stderr.take().expect("piped stderr"));
        Proc {
            child,
            log,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) until every process holding its stderr (it, and a worker it started)
    /// has exited; reaps it.
    fn wait_gone(&mut self) {
        self.log.wait_eof();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = self.child.wait();
    }

    /// The pid of the `n`-th worker it started.
    fn worker_pid(&self, n: usize) -> u32 {
        let line = self
            .log
            .wait_for_nth("a worker start", n, |l| is_message(l, "worker started"));
        fields(&line)["worker"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("no worker pid in {line}"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), Signal::TERM);
            let _ = self.child.wait();
        }
    }
}

/// `faultline serve --socket <socket> --workers 2 <what>`, accepting.
fn serve(socket: &Path, what: &[&str], rust_log: &str) -> Proc {
    serve_with_workers(socket, 2, what, rust_log)
}

/// `faultline serve --socket <socket> --workers <workers> <what>`, accepting.
fn serve_with_workers(socket: &Path, workers: usize, what: &[&str], rust_log: &str) -> Proc {
    let socket_arg = socket.display().to_string();
    let workers = workers.to_string();
    let mut args = vec!["serve", "--socket", &socket_arg, "--workers", &workers];
    args.extend_from_slice(what);
    let mut p = Proc::spawn(&args, rust_log);
    wait_until("the daemon accepts", || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("faultline serve exited ({status}); log:\n{}", p.log.text());
        }
        socket.exists() && UnixStream::connect(socket).is_ok()
    });
    p
}

fn is_resume(line: &str) -> bool {
    is_message(line, "resuming a session of a dead worker")
}

fn is_cannot_start(line: &str) -> bool {
    is_message(line, "the serve worker cannot start; retrying with backoff")
}

fn is_vm_ended(line: &str) -> bool {
    is_message(
        line,
        "no serve worker for the limit: ended the VM (SIGKILL)",
    )
}

/// A test-process "guest": `len` bytes of guest memory registered with a userfaultfd (with
/// REMOVE events) and handed to the daemon. Accesses run on a helper thread with a deadline, as
/// a page nobody serves blocks forever.
struct Guest {
    map: Arc<Mapping>,
    len: u64,
    _uffd: Uffd,
    _stream: UnixStream,
}

impl Guest {
    fn connect(socket: &Path, len: u64) -> Guest {
        Guest::connect_with(socket, len, Features::EVENT_REMOVE)
    }

    /// A guest whose userfaultfd has `features` (e.g. none: its zaps are seen by nobody).
    fn connect_with(socket: &Path, len: u64, features: Features) -> Guest {
        let uffd = Uffd::new(features).expect("creating a userfaultfd");
        let size = usize::try_from(len).expect("fits");
        let map = Mapping::new(MemoryKind::PrivateAnonymous, size).expect("mapping");
        uffd.register(&map, RegisterMode::MISSING)
            .expect("registering");
        let stream = UnixStream::connect(socket).expect("connecting");
        let region = GuestRegionUffdMapping::new(map.addr(), len, 0, 4096);
        send_handshake(&stream, &[region], uffd.as_fd(), None, JsonShape::Both)
            .expect("sending the handshake");
        Guest {
            map: Arc::new(map),
            len,
            _uffd: uffd,
            _stream: stream,
        }
    }

    /// Pages `from..to` as the guest reads them.
    fn read(&self, from: u64, to: u64) -> Vec<u8> {
        let map = Arc::clone(&self.map);
        within(
            &format!("reading pages {from}..{to}"),
            DEADLINE,
            move || {
                let mut buf = vec![0u8; usize::try_from((to - from) * 4096).expect("fits")];
                map.read(usize::try_from(from * 4096).expect("fits"), &mut buf)
                    .expect("in range");
                buf
            },
        )
    }

    /// Reads every page and asserts it equals `want` (the snapshot), pages in `zero` aside,
    /// which must read zero.
    fn assert_all(&self, want: &[u8], zero: &dyn Fn(u64) -> bool) {
        let got = self.read(0, self.len / 4096);
        for (p, (g, w)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
            let p = p as u64;
            if zero(p) {
                assert!(g.iter().all(|&b| b == 0), "removed page {p} is not zero");
            } else {
                assert!(g == w, "page {p} is not the snapshot's");
            }
        }
    }
}

/// A memory file of `len` bytes like [`write_mem_file`]'s, but every non-zero page different
/// from the one at the same offset of a file written with another `salt`.
fn write_salted(path: &Path, len: u64, salt: u64) {
    let mut bytes = vec![0u8; usize::try_from(len).expect("fits")];
    for (p, page) in bytes.chunks_mut(4096).enumerate() {
        faultline_testing::fill_pattern(SEED ^ salt, p as u64, page);
        page[..8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
    }
    std::fs::write(path, &bytes).expect("writing the memory file");
}

/// Renames a same-size file with other content over `target`.
fn rename_other_over(target: &Path) {
    let other = target.with_extension("other");
    let len = std::fs::metadata(target).expect("target").len();
    write_salted(&other, len, 0xbad);
    assert_ne!(
        std::fs::read(&other).expect("other"),
        std::fs::read(target).expect("target")
    );
    std::fs::rename(&other, target).expect("renaming over the snapshot");
}

/// Finding 1 (`--mem-file`): the first half of the memory is restored; a same-size file with
/// other content is renamed over `--mem-file`; the worker is SIGKILLed. The restarted worker
/// serves the file the session started on (the supervisor handed it the open file): every byte
/// of the restore is the original's. (A worker that reopened the path served the new file.)
#[test]
fn a_restarted_worker_serves_the_file_the_session_started_on() {
    let (dir, mem) = common::workdir();
    let original = std::fs::read(&mem).expect("reading the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--readahead", "off"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let guest = Guest::connect(&socket, MEM_LEN);
    let half = MEM_LEN / 4096 / 2;
    assert!(guest.read(0, half) == original[..usize::try_from(half * 4096).expect("fits")]);
    rename_other_over(&mem);
    signal(worker, Signal::KILL);
    daemon.log.wait_for("the resumed session", is_resume);
    guest.assert_all(&original, &|_| false);
}

/// Finding 1 (`--image`): the same with an image renamed over `--image` (another image of a
/// same-size memory file): the restarted worker serves the image the session started on.
#[test]
fn a_restarted_worker_serves_the_image_the_session_started_on() {
    let (dir, mem) = common::workdir();
    let original = std::fs::read(&mem).expect("reading the memory file");
    let img = dir.path().join("mem.img");
    let other_mem = dir.path().join("other");
    write_salted(&other_mem, MEM_LEN, 0xbad);
    let other_img = dir.path().join("other.img");
    for (m, i) in [(&mem, &img), (&other_mem, &other_img)] {
        let out = Command::new(EXE)
            .args(["image", "pack"])
            .arg(m)
            .arg("-o")
            .arg(i)
            .output()
            .expect("running faultline image pack");
        assert!(out.status.success(), "image pack: {out:?}");
    }
    let socket = dir.path().join("fl.sock");
    let img_arg = img.display().to_string();
    let daemon = serve(
        &socket,
        &["--image", &img_arg, "--readahead", "off"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let guest = Guest::connect(&socket, MEM_LEN);
    let half = MEM_LEN / 4096 / 2;
    assert!(guest.read(0, half) == original[..usize::try_from(half * 4096).expect("fits")]);
    std::fs::rename(&other_img, &img).expect("renaming over the image");
    signal(worker, Signal::KILL);
    daemon.log.wait_for("the resumed session", is_resume);
    guest.assert_all(&original, &|_| false);
}

/// Finding 1 (in place): the memory file is rewritten in place (same inode and size, other
/// bytes) and the worker is killed. The open file the supervisor hands over now holds other
/// bytes: the new worker sees the file was written since the session started and refuses it
/// (logged); the VM, left without a worker, is ended after `--worker-down-limit` — it never
/// reads a byte of the new content.
#[test]
fn a_memory_file_rewritten_in_place_is_refused_by_a_restarted_worker() {
    let (dir, mem) = common::workdir();
    let copy = dir.path().join("copy");
    std::fs::copy(&mem, &copy).expect("copying the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--worker-down-limit", "1"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let held = HeldClient::spawn(&socket, &copy, &["--touch", "none", "--verify-after-hold"]);
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    let other = dir.path().join("other");
    write_salted(&other, MEM_LEN, 0xbad);
    std::fs::write(&mem, std::fs::read(&other).expect("other")).expect("rewriting in place");
    signal(worker, Signal::KILL);
    let refused = daemon
        .log
        .wait_for("the new worker's refusal", is_cannot_start);
    assert!(
        fields(&refused)["error"]
            .as_str()
            .is_some_and(|e| e.contains("was written since")),
        "{refused}"
    );
    let out = held.release();
    let ended = daemon.log.wait_for("the VM's end", is_vm_ended);
    assert_eq!(fields(&ended)["pid"], pid, "{ended}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// `faultline export --listen <listen> --mem-file <mem>`; returns it and its address.
fn export(listen: &str, mem: &Path) -> (Proc, String) {
    let mem_arg = mem.display().to_string();
    let p = Proc::spawn(
        &["export", "--listen", listen, "--mem-file", &mem_arg],
        "info",
    );
    let line = p
        .log
        .wait_for("the exporter listening", |l| is_message(l, "exporting"));
    let addr = fields(&line)["addr"]
        .as_str()
        .expect("the exporting line names its address")
        .to_string();
    (p, addr)
}

/// Finding 1 (`--remote`): the exporter is restarted, on the same port, serving another file of
/// the same name and size; then the worker is SIGKILLed. The new worker's connection announces
/// another source id than the one the supervisor pinned at start: the worker refuses to serve it
/// (logged), and the VM, left without a worker, is ended after `--worker-down-limit` — it never
/// reads a byte of the other file.
#[test]
fn a_changed_remote_source_is_refused_after_a_worker_restart() {
    let (dir, mem) = common::workdir();
    // The client verifies against a copy: `mem` itself is replaced below.
    let copy = dir.path().join("copy");
    std::fs::copy(&mem, &copy).expect("copying the memory file");
    let (exporter, addr) = export("127.0.0.1:0", &mem);
    let socket = dir.path().join("fl.sock");
    let daemon = serve(
        &socket,
        &["--remote", &addr, "--worker-down-limit", "2"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let held = HeldClient::spawn(&socket, &copy, &["--touch", "none", "--verify-after-hold"]);
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    // The exporter restarts on another file with the same name and size.
    drop(exporter);
    rename_other_over(&mem);
    let (_exporter, again) = export(&addr, &mem);
    assert_eq!(again, addr);
    signal(worker, Signal::KILL);
    let refused = daemon
        .log
        .wait_for("the new worker's refusal", is_cannot_start);
    let error = fields(&refused)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("not the expected"), "{refused}");
    // The client now reads its memory: no worker serves it, and none can start; after the
    // limit its VM is ended.
    let out = held.release();
    let ended = daemon.log.wait_for("the VM's end", is_vm_ended);
    assert_eq!(fields(&ended)["pid"], pid, "{ended}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "the client was not killed: {out:?}"
    );
    // It never reported a page (a wrong byte would have made it exit with an error report).
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// Finding 5: the supervisor is SIGKILLed while a client is mid-restore. The worker keeps
/// serving: the restore completes byte for byte; once the session ends, the worker exits.
#[test]
fn the_worker_serves_its_sessions_to_their_end_when_the_supervisor_dies() {
    let (dir, mem) = common::workdir();
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let mut daemon = serve(&socket, &["--mem-file", &mem_arg], "info");
    let worker = daemon.worker_pid(1);
    let held = HeldClient::spawn(
        &socket,
        &mem,
        &["--ws-pct", "30", "--ws-only", "--verify-after-hold"],
    );
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    signal(daemon.pid(), Signal::KILL);
    daemon.log.wait_for("the orphaned worker's notice", |l| {
        is_message(
            l,
            "the supervisor is gone; serving the live sessions until they end, then exiting",
        )
    });
    assert!(
        Path::new(&format!("/proc/{worker}")).exists(),
        "the worker exited with the supervisor"
    );
    // The rest of the restore (70% of the pages) is served by the orphaned worker.
    let report = verified_report(&held.release());
    assert_eq!(report["pages"], MEM_LEN / 4096, "{report}");
    daemon.log.wait_for("the worker's exit", |l| {
        is_message(l, "the last session ended; the worker exits")
    });
    daemon.wait_gone();
}

/// Finding 7: 10,000 distinct balloon REMOVEs (every other page of 80 MiB), then a worker kill:
/// the supervisor hands them to the new worker in bounded messages, the session resumes, the
/// removed pages read zero and every other page is the snapshot's. (All ranges in one message
/// failed with `Message too long` and the session was dropped.)
#[test]
fn ten_thousand_removes_survive_a_worker_restart() {
    const LEN: u64 = 80 << 20;
    const REMOVES: u64 = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("mem");
    common::write_large_mem_file(&mem, LEN);
    let original = std::fs::read(&mem).expect("reading the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(&socket, &["--mem-file", &mem_arg], "info");
    let worker = daemon.worker_pid(1);
    let guest = Guest::connect(&socket, LEN);
    let removed = |p: u64| p % 2 == 0 && p < 2 * REMOVES;
    let map = Arc::clone(&guest.map);
    within("10,000 REMOVEs", Duration::from_secs(60), move || {
        for i in 0..REMOVES {
            let at = usize::try_from(2 * i * 4096).expect("fits");
            map.discard(at, 4096).expect("MADV_DONTNEED");
        }
    });
    // The last REMOVE is applied (and reported) before this fault of the same session is served.
    assert!(guest.read(0, 1).iter().all(|&b| b == 0));
    signal(worker, Signal::KILL);
    let resumed = daemon.log.wait_for("the resumed session", is_resume);
    assert_eq!(fields(&resumed)["removed_ranges"], REMOVES, "{resumed}");
    guest.assert_all(&original, &removed);
}

/// The guest zaps pages the worker served with no REMOVE event for anyone to read (as when a
/// worker dies between reading a REMOVE and passing it on), then the worker is killed: its
/// successor serves those pages zeros — the supervisor keeps each session's served log (a memfd)
/// and hands it on — and every other page the snapshot's bytes. (The successor served the
/// snapshot's older bytes there before.)
#[test]
fn pages_zapped_unseen_read_zero_after_a_worker_restart() {
    let (dir, mem) = common::workdir();
    let original = std::fs::read(&mem).expect("reading the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve_with_workers(
        &socket,
        1,
        &["--mem-file", &mem_arg, "--readahead", "off"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let guest = Guest::connect_with(&socket, MEM_LEN, Features::empty());
    let pages = MEM_LEN / 4096;
    let half = pages / 2;
    assert!(guest.read(0, half) == original[..usize::try_from(half * 4096).expect("fits")]);
    // One worker: this fault is read after the pages before it were resolved and marked.
    let _ = guest.read(pages - 1, pages);
    let zapped = |p: u64| (100..164).contains(&p);
    guest
        .map
        .discard(100 * 4096, 64 * 4096)
        .expect("MADV_DONTNEED");
    signal(worker, Signal::KILL);
    daemon.log.wait_for("the resumed session", is_resume);
    guest.assert_all(&original, &zapped);
}

/// Finding 8: the worker is killed and no successor can start (the memory file was truncated:
/// a worker refuses a source that is no longer the one its sessions started on). Workers are
/// restarted with backoff (a handful of starts, not ~18 a second), the cause is logged once,
/// without a backtrace, and the live VM is ended (SIGKILL through its pidfd, logged) after
/// `--worker-down-limit`.
#[test]
fn a_worker_that_cannot_start_is_retried_with_backoff_and_its_vms_are_ended() {
    let (dir, mem) = common::workdir();
    // The client verifies against a copy: `mem` itself is truncated below.
    let copy = dir.path().join("copy");
    std::fs::copy(&mem, &copy).expect("copying the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--worker-down-limit", "3"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let held = HeldClient::spawn(&socket, &copy, &["--touch", "none", "--verify-after-hold"]);
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .and_then(|f| f.set_len(MEM_LEN / 2))
        .expect("truncating the memory file");
    let t = Instant::now();
    signal(worker, Signal::KILL);
    let out = held.release();
    let ended = daemon.log.wait_for("the VM's end", is_vm_ended);
    let took = t.elapsed();
    assert_eq!(fields(&ended)["pid"], pid, "{ended}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(took >= Duration::from_secs(3), "ended after {took:?}");
    let starts = daemon.log.count(|l| is_message(l, "worker started"));
    let causes = daemon.log.matching(is_cannot_start);
    eprintln!(
        "{starts} worker starts and {} cause lines in {took:?}",
        causes.len()
    );
    // 0, 100, 200, 400, 800, 1600 ms: about 6 restarts in 3 s (without backoff: over 50).
    assert!(
        (3..=10).contains(&starts),
        "{starts} worker starts in {took:?}"
    );
    assert_eq!(causes.len(), 1, "{causes:#?}");
    assert!(
        fields(&causes[0])["error"]
            .as_str()
            .is_some_and(|e| e.contains("refusing to serve it")),
        "{}",
        causes[0]
    );
    let text = daemon.log.text();
    assert!(
        !text.contains("backtrace") && !text.contains("panicked"),
        "{text}"
    );
}

/// Finding 15: the worker is killed mid-restore. The session keeps the supervisor's id, and its
/// end summary counts the whole restore: the pages the first worker served (reported to the
/// supervisor) and those the second served.
#[test]
fn a_session_keeps_its_id_and_counters_across_a_worker_restart() {
    let (dir, mem) = common::workdir();
    let original = std::fs::read(&mem).expect("reading the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--readahead", "off"],
        "info,faultline_daemon::supervisor=debug",
    );
    let worker = daemon.worker_pid(1);
    // A first session comes and goes: the one under test is the worker's second (a restarted
    // worker that numbered sessions itself called it 1).
    common::run_client(&socket, &mem, &[]);
    daemon.log.wait_for("the first session's end", |l| {
        is_message(l, "session ended")
    });
    let guest = Guest::connect(&socket, MEM_LEN);
    let started = daemon
        .log
        .wait_for_nth("the session start", 2, |l| is_message(l, "session started"));
    let id = fields(&started)["session"].clone();
    assert_eq!(id, 2, "{started}");
    let pages = MEM_LEN / 4096;
    let half = pages / 2;
    assert!(guest.read(0, half) == original[..usize::try_from(half * 4096).expect("fits")]);
    // The supervisor has the first worker's counters for all of the first half.
    daemon.log.wait_for("the first half's counters", |l| {
        is_message(l, "session counters")
            && fields(l)["session"] == id
            && fields(l)["pages"].as_u64().is_some_and(|p| p >= half)
    });
    signal(worker, Signal::KILL);
    let resumed = daemon.log.wait_for("the resumed session", is_resume);
    assert_eq!(fields(&resumed)["session"], id, "{resumed}");
    guest.assert_all(&original, &|_| false);
    // The restarted worker served at once and scanned for zero pages in the background (the
    // first one scanned before it served, without that line): a resumed guest does not wait for
    // a scan of the whole memory file (~40 ms per 256 MiB).
    daemon
        .log
        .wait_for("the restarted worker's zero scan", |l| {
            is_message(l, "zero scan done")
        });
    assert_eq!(daemon.log.count(|l| is_message(l, "zero scan done")), 1);
    // The guest lives in this test process, which outlives the session: a session follows its
    // client process (not its socket), so the daemon's stop ends it.
    signal(daemon.pid(), Signal::TERM);
    let ended = daemon
        .log
        .wait_for_nth("the session end", 2, |l| is_message(l, "session ended"));
    drop(guest);
    assert_eq!(fields(&ended)["session"], id, "{ended}");
    let s = summary(&ended);
    assert!(
        s["pages"].as_u64().is_some_and(|p| p >= pages),
        "the summary does not cover the whole restore ({pages} pages): {s}"
    );
}

/// SIGSTOP of the worker in the middle of a restore: it stops reporting, the supervisor takes it
/// for wedged after `--worker-hang-limit`, kills it and resumes the session in a new worker; the
/// restore completes byte for byte. (A stopped worker used to hold every VM until a SIGCONT that
/// may never come.)
#[test]
fn a_stopped_worker_is_replaced_and_the_restore_completes() {
    let (dir, mem) = common::workdir();
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--worker-hang-limit", "1"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let held = HeldClient::spawn(
        &socket,
        &mem,
        &["--ws-pct", "30", "--ws-only", "--verify-after-hold"],
    );
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    signal(worker, Signal::STOP);
    daemon.log.wait_for("the hung worker's kill", |l| {
        fields(l)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the worker has said nothing for the hang limit"))
    });
    let next = daemon.worker_pid(2);
    assert_ne!(next, worker);
    // The rest of the restore (70% of the pages) is served by the new worker.
    let report = verified_report(&held.release());
    assert_eq!(report["pages"], MEM_LEN / 4096, "{report}");
}

/// SIGSTOP of the supervisor: the worker does not depend on it to serve, so a restore under way
/// completes; once the supervisor runs again, new clients are served too.
#[test]
fn a_stopped_supervisor_does_not_stop_the_restores() {
    let (dir, mem) = common::workdir();
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(&socket, &["--mem-file", &mem_arg], "info");
    let held = HeldClient::spawn(
        &socket,
        &mem,
        &["--ws-pct", "30", "--ws-only", "--verify-after-hold"],
    );
    let pid = held.pid();
    daemon.log.wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    signal(daemon.pid(), Signal::STOP);
    let report = verified_report(&held.release());
    assert_eq!(report["pages"], MEM_LEN / 4096, "{report}");
    signal(daemon.pid(), Signal::CONT);
    let again = common::run_client(&socket, &mem, &[]);
    assert_eq!(again["verified"], true, "{again}");
}

/// The memory file is deleted mid-restore, then the worker is
/// killed: the new worker serves from the open file the supervisor holds, byte for byte. (Run as
/// root, a `chmod 000` alone would not stop a reopen; a deleted file stops any.)
#[test]
fn a_restarted_worker_serves_a_memory_file_deleted_under_it() {
    let (dir, mem) = common::workdir();
    let original = std::fs::read(&mem).expect("reading the memory file");
    let socket = dir.path().join("fl.sock");
    let mem_arg = mem.display().to_string();
    let daemon = serve(
        &socket,
        &["--mem-file", &mem_arg, "--readahead", "off"],
        "info",
    );
    let worker = daemon.worker_pid(1);
    let guest = Guest::connect(&socket, MEM_LEN);
    let half = MEM_LEN / 4096 / 2;
    assert!(guest.read(0, half) == original[..usize::try_from(half * 4096).expect("fits")]);
    std::fs::remove_file(&mem).expect("deleting the memory file");
    signal(worker, Signal::KILL);
    daemon.log.wait_for("the resumed session", is_resume);
    guest.assert_all(&original, &|_| false);
}
