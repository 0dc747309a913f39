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
    let mut bytes = vec![0u8; usize::try_from(len).expect("fits usize")];
    for (p, page) in bytes
        .chunks_mut(usize::try_from(unit).expect("fits usize"))
        .enumerate()
    {
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

    /// Starts `faultline serve --socket <socket> --image <image> --workers 2 --log-format json
    /// <extra>` and waits until it accepts connections.
    pub fn start_image(socket: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let mut daemon = Daemon::spawn_serving(socket, "--image", image, extra);
        daemon.wait_ready();
        daemon
    }

    /// Spawns the daemon without waiting for it (for tests of start-up failures).
    pub fn spawn(socket: &Path, mem: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn_serving(socket, "--mem-file", mem, extra)
    }

    /// Spawns the daemon serving `source` (`--mem-file` or `--image`) without waiting for it.
    fn spawn_serving(socket: &Path, flag: &str, source: &Path, extra: &[&str]) -> Daemon {
        let mut cmd = Command::new(EXE);
        cmd.arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg(flag)
            .arg(source)
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
        // With --allow-uid not listing us, the probe is refused before anything is read.
        assert!(
            probe.contains("after 0 bytes") || probe.contains("--allow-uid"),
            "{probe}"
        );
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

// Helpers of the reliability tests (tests/reliability.rs): large memory files, the supervised
// daemon's worker, per-process resource usage, long logs and waits with their own deadline.

/// Writes a `len`-byte memory file fast enough for hundreds of MiB in a debug build: every page
/// is one of 64 pattern pages (see [`write_mem_file`]) with its first 8 bytes replaced by its own
/// page number + 1, so no two pages are equal and none is all zero, except runs of zero pages
/// (pages 8..16 of every 40) for the handler's zero-page path.
pub fn write_large_mem_file(path: &Path, len: u64) {
    use std::io::Write;
    const PAGE: usize = 4096;
    assert_eq!(
        len % PAGE as u64,
        0,
        "file length must be a multiple of 4096"
    );
    let mut table = vec![0u8; 64 * PAGE];
    for (t, page) in table.chunks_mut(PAGE).enumerate() {
        faultline_testing::fill_pattern(SEED, t as u64, page);
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("creating the file"));
    let mut chunk = vec![0u8; 4 << 20];
    let pages = len / PAGE as u64;
    let mut p = 0u64;
    while p < pages {
        let n = usize::try_from(pages - p)
            .expect("fits usize")
            .min(chunk.len() / PAGE);
        for (i, page) in chunk[..n * PAGE].chunks_mut(PAGE).enumerate() {
            let q = p + i as u64;
            if (q % 40) / 8 == 1 {
                page.fill(0);
            } else {
                let t = (q % 64) as usize;
                page.copy_from_slice(&table[t * PAGE..(t + 1) * PAGE]);
                page[..8].copy_from_slice(&(q + 1).to_le_bytes());
            }
        }
        file.write_all(&chunk[..n * PAGE])
            .expect("writing the memory file");
        p += n as u64;
    }
    file.flush().expect("flushing the memory file");
}

impl Log {
    /// Waits (at most `limit`) until `n` lines satisfy `pred`; returns the n-th. Each line is
    /// tested once per call (the scan resumes where it stopped), so it stays cheap on logs of
    /// thousands of lines.
    pub fn wait_count_within(
        &self,
        what: &str,
        n: usize,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let end = Instant::now() + limit;
        let (mut scanned, mut found) = (0, 0);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while scanned < state.lines.len() {
                let line = &state.lines[scanned];
                scanned += 1;
                if pred(line) {
                    found += 1;
                    if found == n {
                        return line.clone();
                    }
                }
            }
            let now = Instant::now();
            if state.eof || now >= end {
                let why = if state.eof {
                    "stderr closed"
                } else {
                    "timed out"
                };
                let tail = state.lines.len().saturating_sub(40);
                panic!(
                    "{why} waiting for {what} (#{n}, {found} so far); last lines of the log:\n{}",
                    state.lines[tail..].join("\n")
                );
            }
            state = self
                .changed
                .wait_timeout(state, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Every line satisfying `pred`.
    pub fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }
}

impl Daemon {
    /// The pid of the `n`-th serve worker the supervisor started (1-based), from its "worker
    /// started" line (awaited, at most `limit`).
    pub fn worker_pid(&self, n: usize, limit: Duration) -> u32 {
        let line = self.log.wait_count_within("a worker start", n, limit, |l| {
            is_message(l, "worker started")
        });
        fields(&line)["worker"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("no worker pid in {line}"))
    }
}

/// What a process holds: open fds, threads, resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Entries of /proc/<pid>/fd.
    pub fds: usize,
    /// `Threads:` of /proc/<pid>/status.
    pub threads: usize,
    /// `VmRSS:` of /proc/<pid>/status, in KiB.
    pub rss_kib: u64,
}

/// The `key:` value of /proc/<pid>/status (its first number).
pub fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// The resources `pid` holds now.
pub fn usage_of(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .count();
    Usage {
        fds,
        threads: usize::try_from(proc_status(pid, "Threads")).expect("fits usize"),
        rss_kib: proc_status(pid, "VmRSS"),
    }
}

/// The names of `pid`'s threads (truncated by the kernel to 15 bytes).
pub fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/task: {e}"))
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

/// [`wait_until`] with its own deadline (for waits that legitimately take longer, such as
/// restores of hundreds of MiB in a debug build).
pub fn wait_until_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The value of `name{labels}` at the metrics address `addr`, or `None` when nothing answers
/// there (e.g. while a serve worker is being restarted) or the sample is absent.
pub fn try_metric(addr: &str, name: &str, labels: &str) -> Option<u64> {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(DEADLINE)).ok()?;
    conn.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    sample(body, name, labels)
}

/// Runs `f` on its own thread and returns its result, failing the test if it takes longer than
/// `limit` (for work that blocks forever when a page is never served; the blocked thread is
/// left behind, the test fails).
pub fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("{what}: not done within {limit:?} ({e})"))
}

/// Page faults the handler has read but not yet resolved, over every userfaultfd `pid` holds:
/// the kernel's fdinfo of a userfaultfd counts `total` waiting faults, of which `pending` are
/// not read yet (the fdinfo describes the shared file, so any process holding a duplicate
/// sees the same counts).
pub fn read_unresolved_faults(pid: u32) -> u64 {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("reading /proc/<pid>/fd") {
        let Ok(entry) = entry else { continue };
        let is_uffd = std::fs::read_link(entry.path())
            .is_ok_and(|link| link.as_os_str() == "anon_inode:[userfaultfd]");
        if !is_uffd {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue; // closed meanwhile
        };
        let count = |key: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {key} in the userfaultfd fdinfo:\n{info}"))
        };
        n += count("total:") - count("pending:");
    }
    n
}

/// Whether every thread of `pid` is stopped (by SIGSTOP).
pub fn all_threads_stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("reading /proc/<pid>/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .all(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
}

/// A running count of the log lines that satisfy a predicate, advanced incrementally (each line
/// is tested once over the counter's life), for tests that pace themselves on thousands of lines.
pub struct LineCount<P> {
    pred: P,
    scanned: usize,
    found: usize,
}

impl<P: Fn(&str) -> bool> LineCount<P> {
    /// A counter of the lines satisfying `pred`, starting at the top of the log.
    pub fn new(pred: P) -> LineCount<P> {
        LineCount {
            pred,
            scanned: 0,
            found: 0,
        }
    }

    /// Waits (at most `limit`) until `n` lines have matched; returns how many have.
    pub fn wait(&mut self, log: &Log, what: &str, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        let mut state = log.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while self.scanned < state.lines.len() {
                if (self.pred)(&state.lines[self.scanned]) {
                    self.found += 1;
                }
                self.scanned += 1;
            }
            if self.found >= n {
                return self.found;
            }
            let now = Instant::now();
            if state.eof || now >= end {
                let tail = state.lines.len().saturating_sub(40);
                panic!(
                    "waiting for {what} (#{n}, {} so far): {}; last lines of the log:\n{}",
                    self.found,
                    if state.eof {
                        "stderr closed"
                    } else {
                        "timed out"
                    },
                    state.lines[tail..].join("\n")
                );
            }
            state = log
                .changed
                .wait_timeout(state, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Waits (bounded, all at once) for the outputs of `children`, returned in their order. On
/// timeout the ones still running are killed and the test fails naming them.
pub fn outputs_within(children: Vec<Child>, limit: Duration) -> Vec<Output> {
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, child) in children.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((i, child.wait_with_output()));
        });
    }
    drop(tx);
    let end = Instant::now() + limit;
    let mut outputs: Vec<Option<Output>> = pids.iter().map(|_| None).collect();
    let mut received = 0;
    while received < pids.len() {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, out)) => {
                outputs[i] = Some(out.expect("waiting for a child"));
                received += 1;
            }
            Err(_) => {
                let late: Vec<u32> = (0..pids.len())
                    .filter(|&i| outputs[i].is_none())
                    .map(|i| pids[i])
                    .collect();
                for &pid in &late {
                    signal(pid, Signal::KILL);
                }
                // Reap them (their waiters report once they are dead).
                while rx.recv().is_ok() {}
                panic!("children {late:?} did not finish within {limit:?}");
            }
        }
    }
    outputs.into_iter().flatten().collect()
}

// Helpers of the front-door tests (tests/front_door.rs) and of tests whose client is a forked
// child of the test process (a session follows its client process, which must be able to exit).

/// Waits (bounded by [`DEADLINE`]) for a forked client to exit and says how; on timeout the child
/// is killed and the test fails with the daemon's log.
pub fn wait_child(
    child: faultline_testing::ChildProcess,
    daemon: &Daemon,
) -> faultline_testing::ChildExit {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pidfd = child.pidfd().expect("pidfd_open of the child");
    let limit = Timespec {
        tv_sec: DEADLINE.as_secs() as i64,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let ready = loop {
        match poll(&mut fds, Some(&limit)) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.expect("poll on the child's pidfd"),
        }
    };
    assert!(
        ready > 0,
        "the client {} did not finish within {DEADLINE:?}; daemon log:\n{}",
        child.pid(),
        daemon.log().text()
    );
    child.wait()
}

/// How many connections the daemon refused for `cause`: its "handshake refused" lines of that
/// cause plus the counts of its "similar log lines suppressed" lines (refusals are logged at most
/// a few a second per cause).
pub fn refusals_of(log: &Log, cause: &str) -> u64 {
    let mut n = 0;
    let key = format!("\"cause\":\"{cause}\"");
    for line in log.matching(|l| l.contains(&key)) {
        let f = fields(&line);
        if f["cause"].as_str() != Some(cause) {
            continue;
        }
        if is_refusal(&line) {
            n += 1;
        } else if f["message"].as_str() == Some("similar log lines suppressed") {
            n += f["suppressed"].as_u64().unwrap_or(0);
        }
    }
    n
}
