//! Shared fixtures for the `faultline serve` integration tests: a generated snapshot memory file,
//! the real `faultline serve` binary as a daemon on a temporary socket (`Daemon`), and
//! `faultline client` processes that play Firecracker's side.
//!
//! Nothing here sleeps to synchronise: readiness is a bounded poll of the socket, log lines are
//! awaited on a condition variable fed by the daemon's stderr, and every wait has a deadline that
//! fails the test (with the daemon's log) instead of hanging the suite.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

/// The binary under test.
pub const EXE: &str = env!("CARGO_BIN_EXE_faultline");

/// Longest any single wait may take before the test fails (a safety net, never a delay).
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The seed of the generated memory files' content.
pub const SEED: u64 = 0x5eed_f11e;

/// 4 MiB: 1024 base pages, two huge pages.
pub const MEM_LEN: u64 = 4 << 20;

/// Writes a `len`-byte snapshot memory file: pattern pages (every page different, never all
/// zero) with runs of zero pages in between (pages 8..16 of every 40, plus every 13th page), so
/// the handler's zero-page path and its copy path are both exercised and a wrong or zero page
/// is always caught by the client's byte-for-byte check. `unit` is the page size the zero runs
/// are counted in (4096, or 2 MiB for hugetlb guests, where one whole huge page is zero).
pub fn write_mem_file(path: &Path, len: u64, unit: u64) {
    assert_eq!(
        len % unit,
        0,
        "file length must be a multiple of the page size"
    );
    let mut bytes = vec![0u8; len as usize];
    for (p, page) in bytes.chunks_mut(unit as usize).enumerate() {
        let p = p as u64;
        let zero = if unit == 4096 {
            (p % 40) / 8 == 1 || p % 13 == 0
        } else {
            p % 4 == 1
        };
        if !zero {
            faultline_testing::fill_pattern(SEED, p, page);
        }
    }
    std::fs::write(path, &bytes).expect("writing the memory file");
}

/// A temporary directory with a 4 MiB memory file `mem` in it.
pub fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("mem");
    write_mem_file(&mem, MEM_LEN, 4096);
    (dir, mem)
}

/// The daemon's stderr, line by line, as it arrives.
#[derive(Default)]
pub struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

impl Log {
    /// Starts a thread that reads `stream` into a new log until end of file.
    pub fn capture(stream: impl Read + Send + 'static) -> (Arc<Log>, JoinHandle<()>) {
        let log = Arc::new(Log::default());
        let writer = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                writer
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .lines
                    .push(line);
                writer.changed.notify_all();
            }
            writer
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .eof = true;
            writer.changed.notify_all();
        });
        (log, reader)
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .clone()
    }

    /// Every line so far, one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits until a line satisfies `pred` and returns it. Fails the test (showing the log)
    /// after [`DEADLINE`] or when the stream ends without one.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth(what, 1, pred)
    }

    /// Waits until `n` lines satisfy `pred`; returns the n-th.
    pub fn wait_for_nth(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(line) = state.lines.iter().filter(|l| pred(l)).nth(n - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if state.eof || now >= end {
                let why = if state.eof {
                    "stderr closed"
                } else {
                    "timed out"
                };
                panic!(
                    "{why} waiting for {what} (#{n}); daemon log:\n{}",
                    state.lines.join("\n")
                );
            }
            state = self
                .changed
                .wait_timeout(state, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// How many lines satisfy `pred` so far.
    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// Waits for the end of the stream (the process closed stderr, i.e. exited).
    pub fn wait_eof(&self) {
        let end = Instant::now() + DEADLINE;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.eof {
            let now = Instant::now();
            assert!(
                now < end,
                "the daemon did not exit; log:\n{}",
                state.lines.join("\n")
            );
            state = self
                .changed
                .wait_timeout(state, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A JSON log line's `fields` object (`--log-format json`), `Value::Null` for other lines.
pub fn fields(line: &str) -> Value {
    serde_json::from_str::<Value>(line)
        .map(|v| v["fields"].clone())
        .unwrap_or(Value::Null)
}

/// Whether a JSON log line's message is `message`.
pub fn is_message(line: &str, message: &str) -> bool {
    fields(line)["message"].as_str() == Some(message)
}

/// Whether a JSON log line is a refused handshake.
pub fn is_refusal(line: &str) -> bool {
    match fields(line)["message"].as_str() {
        Some(message) => message.starts_with("handshake refused"),
        // A text-format line.
        None => line.contains("handshake refused"),
    }
}

/// The parsed `summary` of a "session ended" line.
pub fn summary(line: &str) -> Value {
    let text = fields(line)["summary"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no summary in {line}"));
    serde_json::from_str(&text).expect("the summary is JSON")
}

/// A `faultline serve` process on a socket in a temporary directory.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    log: Arc<Log>,
    reader: Option<JoinHandle<()>>,
    refusals: usize,
}

impl Daemon {
    /// Starts `faultline serve --socket <dir>/fl.sock --mem-file <mem> --workers 2 <extra>` (with
    /// `--log-format json` unless `extra` names a format) and waits until it accepts
    /// connections.
    pub fn start(dir: &Path, mem: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_on(&dir.join("fl.sock"), mem, extra)
    }

    /// [`Daemon::start`] on a given socket path.
    pub fn start_on(socket: &Path, mem: &Path, extra: &[&str]) -> Daemon {
        let mut daemon = Daemon::spawn(socket, mem, extra);
        daemon.wait_ready();
        daemon
    }

    /// Spawns the daemon without waiting for it (for tests of start-up failures).
    pub fn spawn(socket: &Path, mem: &Path, extra: &[&str]) -> Daemon {
        let mut cmd = Command::new(EXE);
        cmd.arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--mem-file")
            .arg(mem)
            .args(["--workers", "2"]);
        if !extra.contains(&"--log-format") {
            cmd.args(["--log-format", "json"]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning faultline serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (log, reader) = Log::capture(stderr);
        Daemon {
            child,
            socket: socket.to_owned(),
            log,
            reader: Some(reader),
            refusals: 0,
        }
    }

    /// Polls (bounded) until the socket file exists and a connection to it is accepted. The
    /// probe connection sends nothing and closes, which the daemon logs as a refused handshake;
    /// that line is awaited too, so a test's later log checks start from a quiet daemon.
    fn wait_ready(&mut self) {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.log.wait_eof();
                panic!(
                    "faultline serve exited during start-up ({status}); log:\n{}",
                    self.log.text()
                );
            }
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < end,
                "the daemon did not accept on {} in time; log:\n{}",
                self.socket.display(),
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let probe = self.next_refusal();
        assert!(probe.contains("after 0 bytes"), "{probe}");
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Fails the test if the daemon has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            self.log.wait_eof();
            panic!("the daemon died ({status}); log:\n{}", self.log.text());
        }
    }

    /// Waits for the next handshake refusal (after those already awaited) and returns its error.
    pub fn next_refusal(&mut self) -> String {
        self.refusals += 1;
        let line = self
            .log
            .wait_for_nth("a handshake refusal", self.refusals, is_refusal);
        // The error field of a JSON line; the whole line in text format.
        fields(&line)["error"]
            .as_str()
            .map_or(line.clone(), str::to_owned)
    }

    /// Waits for the next handshake refusal and asserts its error contains `needle`; returns
    /// the error.
    pub fn wait_refusal(&mut self, needle: &str) -> String {
        let error = self.next_refusal();
        assert!(
            error.contains(needle),
            "the refusal {error:?} does not name {needle:?}; log:\n{}",
            self.log.text()
        );
        error
    }

    /// Waits for the `n`-th "session ended" line; returns it.
    pub fn wait_session_ended(&self, n: usize) -> String {
        self.log
            .wait_for_nth("a session end", n, |l| is_message(l, "session ended"))
    }

    /// Waits for the "session ended" line of the session labelled `pid <pid>`; returns it.
    pub fn wait_session_ended_for(&self, pid: u32) -> String {
        let label = format!("pid {pid}");
        self.log.wait_for(&format!("the end of {label}"), |l| {
            is_message(l, "session ended") && fields(l)["label"].as_str() == Some(&label)
        })
    }

    /// Runs a `faultline client` against this daemon (see [`run_client`]).
    pub fn client(&self, mem: &Path, extra: &[&str]) -> Value {
        let child = client_command(&self.socket, mem, extra)
            .spawn()
            .expect("spawning faultline client");
        self.verified(&output_within(child, DEADLINE))
    }

    /// [`verified_report`], with the daemon's log in the failure message.
    pub fn verified(&self, out: &Output) -> Value {
        check_report(out).unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", self.log.text()))
    }

    /// Sends SIGTERM and waits for the daemon to exit; returns its status.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), Signal::TERM);
        self.wait_exit()
    }

    /// Waits (bounded) for the daemon to exit by itself; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        // stderr closes when the process exits (it starts no children).
        self.log.wait_eof();
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        self.child.wait().expect("wait for the daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to our child process `pid`.
pub fn signal(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32")).expect("non-zero pid");
    kill_process(pid, sig).expect("kill");
}

/// The `faultline client` command line (Firecracker's side of the protocol).
pub fn client_command(socket: &Path, mem: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(EXE);
    cmd.arg("client")
        .arg("--socket")
        .arg(socket)
        .arg("--mem-file")
        .arg(mem)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits (bounded) for a spawned child's output; kills it and fails the test on timeout.
pub fn output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for the client"),
        Err(_) => {
            signal(pid, Signal::KILL);
            let out = rx.recv().expect("the waiter reports after the kill");
            panic!("client {pid} did not finish within {limit:?}: {out:?}");
        }
    }
}

/// The report a client printed, after checking it exited 0 and verified every byte.
pub fn verified_report(out: &Output) -> Value {
    check_report(out).unwrap_or_else(|e| panic!("{e}"))
}

/// The client's report if it exited 0 with `"verified": true`, else what went wrong.
fn check_report(out: &Output) -> Result<Value, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed = |why: &str| {
        format!(
            "client failed ({why}, {}): stdout {stdout} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if !out.status.success() {
        return Err(failed("exit status"));
    }
    let report: Value =
        serde_json::from_str(stdout.trim()).map_err(|_| failed("no JSON report line"))?;
    if report["verified"] != true {
        return Err(failed("not verified"));
    }
    Ok(report)
}

/// Runs a client to completion (bounded), asserts it exited 0 with `"verified": true`, returns
/// its report.
pub fn run_client(socket: &Path, mem: &Path, extra: &[&str]) -> Value {
    let child = client_command(socket, mem, extra)
        .spawn()
        .expect("spawning faultline client");
    verified_report(&output_within(child, DEADLINE))
}

/// A client whose stdin we hold (`--hold`: it stays alive after its work until stdin closes).
pub struct HeldClient {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl HeldClient {
    /// Spawns `faultline client ... --hold` with stdin piped.
    pub fn spawn(socket: &Path, mem: &Path, extra: &[&str]) -> HeldClient {
        let mut child = client_command(socket, mem, extra)
            .arg("--hold")
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning faultline client");
        let stdin = child.stdin.take();
        let pid = child.id();
        HeldClient {
            child: Some(child),
            stdin,
            pid,
        }
    }

    /// The client's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILLs the client and reaps it; returns how it ended.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not yet reaped");
        signal(self.pid, Signal::KILL);
        child.wait().expect("reaping the killed client")
    }

    /// Closes its stdin and returns its output (bounded).
    pub fn release(mut self) -> Output {
        drop(self.stdin.take());
        output_within(self.child.take().expect("not yet reaped"), DEADLINE)
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                signal(self.pid, Signal::KILL);
            }
            let _ = child.wait();
        }
    }
}

/// Polls `cond` (bounded by [`DEADLINE`]) until it holds: for state only observable from
/// outside, such as another process's open fds or its metrics.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How many userfaultfds process `pid` holds open.
pub fn userfaultfds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading /proc/<pid>/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| link.as_os_str() == "anon_inode:[userfaultfd]")
        .count()
}

/// `GET path` from the metrics endpoint at `addr`: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_request(addr, &[request.as_bytes()])
}

/// Sends a request in the given pieces (one write each, Nagle off, so each can travel in its
/// own segment) and returns (status line, body).
pub fn http_request(addr: &str, pieces: &[&[u8]]) -> (String, String) {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr).expect("connecting to the metrics port");
    conn.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    conn.set_nodelay(true).expect("TCP_NODELAY");
    for piece in pieces {
        conn.write_all(piece).expect("sending the request");
    }
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .expect("reading the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// A loopback address with a port that was free a moment ago.
pub fn free_local_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener.local_addr().expect("local_addr").to_string()
}

/// The value of the Prometheus sample `name{labels}` in `text`.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<u64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (bounded) until the metrics at `addr` show `name{labels} == expected`. Counters are
/// added by the worker right after its resolve ioctl, which already woke the client, so they
/// may trail a client that just exited by its last resolve: poll until they settle.
pub fn wait_metric(addr: &str, name: &str, labels: &str, expected: u64) {
    let mut last = None;
    let end = Instant::now() + DEADLINE;
    loop {
        let (_, text) = http_get(addr, "/metrics");
        last = sample(&text, name, labels).or(last);
        if last == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{name}{{{labels}}} is {last:?}, expected {expected}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
