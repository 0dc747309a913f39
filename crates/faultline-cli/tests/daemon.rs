//! `faultline serve` as an operator sees it: its socket (mode 0600, a stale one replaced, a live
//! one refused), clean stops on SIGTERM and SIGINT, Prometheus metrics, session summaries in the
//! log, and a working set recorded by one daemon and prefetched by the next.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use common::{
    fields, free_local_addr, http_get, is_message, sample, signal, summary, wait_until, workdir,
    Daemon, HeldClient, MEM_LEN,
};
use faultline::WorkingSet;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::Signal;

const PAGES: u64 = MEM_LEN / 4096;

#[test]
fn socket_is_private_and_removed_on_sigterm() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    let socket = daemon.socket().to_owned();
    let meta = std::fs::metadata(&socket).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    daemon.client(&mem, &[]);
    daemon.wait_session_ended(1);
    let log = daemon.log().lines();
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}: {log:?}");
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn sigterm_with_a_live_session_exits_cleanly() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &[]);
    let socket = daemon.socket().to_owned();
    // A client that handshakes and then waits (touching nothing, so the stop cannot strand it
    // in a fault).
    let held = HeldClient::spawn(&socket, &mem, &["--touch", "none"]);
    let pid = held.pid();
    daemon.log().wait_for("the held session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    signal(daemon.pid(), Signal::TERM);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}: {}", daemon.log().text());
    assert!(!socket.exists());
    // It ended the live session on its way out, and said so.
    let ended = daemon.wait_session_ended_for(pid);
    assert_eq!(fields(&ended)["reason"], "removed", "{ended}");
    let stopping = daemon
        .log()
        .wait_for("the stop line", |l| is_message(l, "stopping"));
    assert_eq!(fields(&stopping)["sessions"], 1, "{stopping}");
    assert_eq!(fields(&stopping)["started"], 1, "{stopping}");
    // The client itself is unaffected and exits normally once released.
    let out = held.release();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn sigint_stops_it_too() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &[]);
    signal(daemon.pid(), Signal::INT);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!daemon.socket().exists());
}

#[test]
fn stale_socket_is_replaced() {
    let (dir, mem) = workdir();
    let socket = dir.path().join("fl.sock");
    // A socket file whose listener is gone (a handler that died without cleaning up).
    drop(UnixListener::bind(&socket).expect("binding"));
    assert!(socket.exists());
    let daemon = Daemon::start_on(&socket, &mem, &[]);
    let line = daemon.log().wait_for("the replacement", |l| {
        is_message(l, "replaced a stale socket")
    });
    assert!(line.contains("fl.sock"), "{line}");
    let meta = std::fs::metadata(&socket).expect("the socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    daemon.client(&mem, &[]);
}

#[test]
fn second_daemon_on_a_live_socket_fails() {
    let (dir, mem) = workdir();
    let mut first = Daemon::start(dir.path(), &mem, &[]);
    let mut second = Daemon::spawn(first.socket(), &mem, &[]);
    let status = second.wait_exit();
    assert!(
        !status.success(),
        "a second handler started on a live socket"
    );
    let err = second.log().text();
    assert!(
        err.contains("is a live socket: another handler is serving it"),
        "{err}"
    );
    // The first is untouched: its socket is still there and it still serves.
    first.assert_alive();
    assert!(first.socket().exists());
    first.client(&mem, &[]);
    // (The second's liveness check connected and closed: the first logged that as a refusal.)
    let probe = first.next_refusal();
    assert!(probe.contains("after 0 bytes"), "{probe}");
}

#[test]
fn metrics_have_totals_and_sessions() {
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    daemon.client(&mem, &[]);
    daemon.wait_session_ended(1);
    // A second client that restores everything and then stays: its session is live.
    let held = HeldClient::spawn(daemon.socket(), &mem, &[]);
    let pid = held.pid();
    let started = daemon.log().wait_for("the live session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    let id = fields(&started)["session"].as_u64().expect("session id");
    let session = format!("session=\"{id}\"");
    // Its pages appear in the metrics as the client touches them (polled, bounded).
    let mut text = String::new();
    wait_until("the live session's metrics show every page", || {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        text = body;
        // The total counts the ended session and the live one.
        sample(&text, "faultline_pages", &session) == Some(PAGES)
            && sample(&text, "faultline_pages", "scope=\"total\"") == Some(2 * PAGES)
    });
    assert!(text.contains("# TYPE faultline_pages counter"), "{text}");
    assert!(
        sample(&text, "faultline_faults", &session) > Some(0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "faultline_bytes", &session),
        Some(MEM_LEN),
        "{text}"
    );
    // Only the live session is listed.
    assert_eq!(
        text.matches("faultline_pages{session=").count(),
        1,
        "{text}"
    );
    let (status, _) = http_get(&addr, "/nothing-here");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let out = held.release();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn metrics_request_in_pieces_is_answered() {
    // TCP may split a request anywhere: the endpoint must wait for the whole request head
    // rather than judge a half-read request line (and answer 404 to a valid request).
    use std::io::{Read, Write};
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    daemon.client(&mem, &[]);
    daemon.wait_session_ended(1);
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_nodelay(true).expect("TCP_NODELAY");
    conn.write_all(b"GET /met").expect("first piece");
    // No answer to half a request line (a handler that answered would do so at once).
    let mut fds = [PollFd::new(&conn, PollFlags::IN)];
    let window = Timespec {
        tv_sec: 0,
        tv_nsec: 300_000_000,
    };
    let early = poll(&mut fds, Some(&window)).expect("poll");
    assert_eq!(early, 0, "the endpoint answered a half-sent request");
    conn.write_all(b"rics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("the rest");
    conn.set_read_timeout(Some(common::DEADLINE))
        .expect("read timeout");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains(&format!("faultline_pages{{scope=\"total\"}} {PAGES}\n")),
        "{response}"
    );
}

/// Prometheus' text format allows one `# TYPE` line per metric name, with all of a metric's
/// samples grouped after it; a scraper rejects the whole page otherwise.
#[test]
fn metrics_are_valid_prometheus_text_with_live_sessions() {
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    let held = HeldClient::spawn(daemon.socket(), &mem, &["--touch", "none"]);
    let pid = held.pid();
    daemon.log().wait_for("the live session", |l| {
        is_message(l, "session started") && fields(l)["pid"] == pid
    });
    let (_, text) = http_get(&addr, "/metrics");
    let mut seen = std::collections::HashSet::new();
    for name in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = name.split_whitespace().next().unwrap_or_default();
        assert!(
            seen.insert(name.to_owned()),
            "second TYPE line for {name}:\n{text}"
        );
    }
}

#[test]
fn session_summary_is_logged_in_text_format() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &["--log-format", "text"]);
    daemon.client(&mem, &[]);
    let ended = daemon
        .log()
        .wait_for("the session end", |l| l.contains("session ended"));
    // A pipe gets plain text: no terminal colour codes to confuse log collectors.
    assert!(!daemon.log().text().contains('\u{1b}'), "{ended}");
    let json = ended
        .split_once("summary=")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no summary in {ended}"));
    let s: serde_json::Value = serde_json::from_str(json).expect("the summary is JSON");
    let pages = s["pages"].as_u64().expect("pages");
    assert!(pages > 0 && pages <= PAGES, "{s}");
    assert_eq!(s["bytes"].as_u64().map(|b| b % 4096), Some(0), "{s}");
    assert!(ended.contains("reason=\"client gone"), "{ended}");
}

#[test]
fn working_set_recorded_then_prefetched() {
    let (dir, mem) = workdir();
    let ws = dir.path().join("mem.ws");
    let ws_arg = ws.to_str().expect("utf-8 path");
    // A first restore records which pages its workload touched.
    let recorder = Daemon::start(dir.path(), &mem, &["--record-ws", ws_arg]);
    let report = recorder.client(&mem, &["--ws-pct", "20", "--ws-only"]);
    assert!(report["working_set_ms"].as_f64() > Some(0.0), "{report}");
    let recorded = recorder
        .log()
        .wait_for("the recording", |l| is_message(l, "working set recorded"));
    // 20% of 64 clusters of 16 pages: 12 clusters, every page of them faulted (recording turns
    // readahead off so each touch is seen).
    assert_eq!(fields(&recorded)["pages"], 12 * 16, "{recorded}");
    let set = WorkingSet::load(&ws).expect("a working-set file");
    assert_eq!(set.page_size, 4096);
    assert_eq!(set.offsets.len(), 12 * 16);
    assert!(set.offsets.iter().all(|&o| o < MEM_LEN && o % 4096 == 0));
    let status = recorder.terminate();
    assert_eq!(status.code(), Some(0));
    // A second daemon pushes that set into a new client while it "loads the VM state".
    let replayer = Daemon::start(dir.path(), &mem, &["--prefetch-ws", ws_arg]);
    let report = replayer.client(&mem, &["--resume-after-ms", "200", "--ws-pct", "20"]);
    assert_eq!(report["pages"], PAGES);
    let s = summary(&replayer.wait_session_ended(1));
    assert!(s["prefetch_pages"].as_u64() > Some(0), "{s}");
    assert!(s["prefetch_pages"].as_u64() <= Some(12 * 16), "{s}");
    // The summary is logged once no worker is inside the session: every page, resolved once.
    assert_eq!(s["pages"], PAGES, "{s}");
}
