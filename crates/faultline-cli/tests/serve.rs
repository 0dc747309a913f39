//! `faultline serve` restores Firecracker clients in full: every JSON shape, handshakes sent in
//! pieces, several regions, 2 MiB pages, balloon removes and many clones at once, each client
//! (`faultline client`, Firecracker's side of the protocol) checking every byte of its memory
//! against the snapshot file. A client killed mid-restore ends its session and the daemon keeps
//! serving.

mod common;

use std::path::Path;

use common::{
    client_command, fields, free_local_addr, is_message, output_within, summary, userfaultfds_of,
    wait_metric, wait_until, workdir, write_mem_file, Daemon, HeldClient, DEADLINE, MEM_LEN,
};
use serde_json::Value;

const PAGES: u64 = MEM_LEN / 4096;

/// Runs a client with `extra` flags; returns its report and the summary its session (labelled
/// with the client's pid) logged when it ended, the daemon's `nth_session` end.
fn restore(daemon: &Daemon, mem: &Path, extra: &[&str], nth_session: usize) -> (Value, Value) {
    let child = client_command(daemon.socket(), mem, extra)
        .spawn()
        .expect("spawning faultline client");
    let pid = child.id();
    let report = daemon.verified(&output_within(child, DEADLINE));
    let ended = daemon.wait_session_ended(nth_session);
    assert_eq!(fields(&ended)["label"], format!("pid {pid}"), "{ended}");
    (report, summary(&ended))
}

/// A session summary of a full restore without balloon: every page resolved exactly once,
/// nothing poisoned or failed. (The summary is logged once no worker is inside the session any
/// more, so it has the resolve that woke the client's last fault too.)
fn assert_served_once(s: &Value, pages: u64, page_size: u64) {
    assert_eq!(s["pages"], pages, "{s}");
    assert_eq!(s["bytes"], pages * page_size, "{s}");
    assert_eq!(s["poisoned_pages"], 0, "{s}");
    assert_eq!(s["source_errors"], 0, "{s}");
}

#[test]
fn every_json_shape_is_served() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    for (n, shape) in ["legacy", "kib", "both"].into_iter().enumerate() {
        let (report, s) = restore(&daemon, &mem, &["--shape", shape], n + 1);
        assert_eq!(report["pages"], PAGES, "{shape}: {report}");
        assert_served_once(&s, PAGES, 4096);
    }
}

#[test]
fn handshake_in_7_byte_pieces_is_reassembled() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    for (n, shape) in ["legacy", "both"].into_iter().enumerate() {
        let (_, s) = restore(&daemon, &mem, &["--chunk", "7", "--shape", shape], n + 1);
        assert_served_once(&s, PAGES, 4096);
    }
}

#[test]
fn three_regions_are_served() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    let (_, s) = restore(&daemon, &mem, &["--regions", "3", "--touch", "rand"], 1);
    assert_served_once(&s, PAGES, 4096);
    let started = daemon
        .log()
        .wait_for("the session start", |l| is_message(l, "session started"));
    assert_eq!(fields(&started)["regions"], 3, "{started}");
    assert_eq!(fields(&started)["pages"], PAGES, "{started}");
}

const HUGE: u64 = 2 << 20;

/// A directory with an 8 MiB memory file of four huge pages (the second all zero), a daemon
/// serving it and its metrics address; `None` (test skipped) when 4 huge pages cannot be
/// reserved.
/// What a huge-page test holds: its directory, memory file, daemon, metrics address, and the
/// huge pages it reserved.
type HugeSetup = (
    tempfile::TempDir,
    std::path::PathBuf,
    Daemon,
    String,
    faultline_testing::HugePages,
);

fn huge_setup(test: &str) -> Option<HugeSetup> {
    let huge = faultline_testing::need_huge_pages(test, 4)?;
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("mem");
    write_mem_file(&mem, 4 * HUGE, HUGE);
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    Some((dir, mem, daemon, addr, huge))
}

#[test]
fn huge_pages_are_served() {
    let Some((_dir, mem, daemon, addr, _huge)) = huge_setup("huge_pages_are_served") else {
        return;
    };
    let huge = HUGE.to_string();
    for (n, extra) in [
        &["--shape", "kib"][..],
        &["--shape", "both", "--regions", "2", "--touch", "rand"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let mut args = vec!["--page-size", huge.as_str()];
        args.extend_from_slice(extra);
        let (report, s) = restore(&daemon, &mem, &args, n + 1);
        assert_eq!(report["pages"], 4, "{report}");
        assert_served_once(&s, 4, HUGE);
        // Whole huge pages, the zero one copied too (hugetlbfs has no zero page).
        assert_eq!(s["zeropage"], 0, "{s}");
        let total = "scope=\"total\"";
        let clients = n as u64 + 1;
        wait_metric(&addr, "faultline_pages", total, 4 * clients);
        wait_metric(&addr, "faultline_bytes", total, 4 * HUGE * clients);
        wait_metric(&addr, "faultline_zero_pages", total, clients);
    }
}

/// See `balloon_page_touched_right_after_removal_reads_zero`: with one ballooned huge page per
/// region, each is read back right after its own MADV_DONTNEED.
#[test]
fn huge_page_balloon_removes_read_zero() {
    let Some((_dir, mem, daemon, addr, _huge)) = huge_setup("huge_page_balloon_removes_read_zero")
    else {
        return;
    };
    let huge = HUGE.to_string();
    let args = [
        "--page-size",
        huge.as_str(),
        "--regions",
        "2",
        "--balloon-pct",
        "50",
    ];
    let (report, s) = restore(&daemon, &mem, &args, 1);
    let ballooned = report["ballooned_pages"].as_u64().expect("ballooned_pages");
    assert_eq!(ballooned, 2, "{report}");
    assert_eq!(s["events_remove"], ballooned, "{s}");
    // The ballooned pages refaulted and were served as zeros.
    wait_metric(&addr, "faultline_pages", "scope=\"total\"", 4 + ballooned);
    wait_metric(
        &addr,
        "faultline_zero_pages",
        "scope=\"total\"",
        1 + ballooned,
    );
}

#[test]
fn balloon_removes_read_zero() {
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    let mut total = 0;
    for (n, regions) in ["1", "3"].into_iter().enumerate() {
        let (report, s) = restore(
            &daemon,
            &mem,
            &["--balloon-pct", "10", "--regions", regions],
            n + 1,
        );
        // The client dropped every 10th page and checked each reads zero afterwards.
        let ballooned = report["ballooned_pages"].as_u64().expect("ballooned_pages");
        assert!(ballooned >= PAGES / 10, "{report}");
        assert_eq!(s["events_remove"], ballooned, "{s}");
        assert_eq!(s["poisoned_pages"], 0, "{s}");
        // Every page was served once, and each removed page once more when it refaulted.
        total += PAGES + ballooned;
        wait_metric(&addr, "faultline_pages", "scope=\"total\"", total);
    }
}

/// Every page is its own region and is ballooned, so each page is touched right after its own
/// MADV_DONTNEED. The kernel lets madvise return once the REMOVE message is *read*, so the
/// refault can reach another worker before the reader has marked the page missing; the page
/// must still read zero, not the snapshot's old bytes. (Against server.rs before its per-session
/// read lock, this failed 10 runs out of 10: the "present refault" was served by COPY from the
/// memory file.)
#[test]
fn balloon_page_touched_right_after_removal_reads_zero() {
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    let (report, s) = restore(
        &daemon,
        &mem,
        &["--regions", "1024", "--balloon-pct", "100"],
        1,
    );
    assert_eq!(report["ballooned_pages"], PAGES, "{report}");
    assert_eq!(s["events_remove"], PAGES, "{s}");
    wait_metric(&addr, "faultline_pages", "scope=\"total\"", 2 * PAGES);
}

#[test]
fn eight_clones_at_once_are_each_served_in_full() {
    let (dir, mem) = workdir();
    let addr = free_local_addr();
    let daemon = Daemon::start(dir.path(), &mem, &["--metrics", &addr]);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let touch = if i % 2 == 0 { "seq" } else { "rand" };
            client_command(daemon.socket(), &mem, &["--touch", touch, "--threads", "2"])
                .spawn()
                .expect("spawning a clone")
        })
        .collect();
    let pids: Vec<u32> = clients.iter().map(|c| c.id()).collect();
    for client in clients {
        let report = daemon.verified(&output_within(client, DEADLINE));
        assert_eq!(report["pages"], PAGES, "{report}");
    }
    // Eight sessions, one per clone, which together resolved every page of every clone
    // exactly once.
    for pid in pids {
        let s = summary(&daemon.wait_session_ended_for(pid));
        assert_served_once(&s, PAGES, 4096);
    }
    assert_eq!(daemon.log().count(|l| is_message(l, "session started")), 8);
    wait_metric(&addr, "faultline_pages", "scope=\"total\"", 8 * PAGES);
    wait_metric(&addr, "faultline_bytes", "scope=\"total\"", 8 * MEM_LEN);
}

#[test]
fn killed_client_ends_its_session() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &[]);
    // One killed after it touched (part of) its working set, one while it is still "loading the
    // VM state" (nothing touched yet): both are Firecracker dying mid-restore.
    for extra in [
        &["--ws-pct", "20", "--ws-only"][..],
        &["--resume-after-ms", "60000"][..],
    ] {
        let held = HeldClient::spawn(daemon.socket(), &mem, extra);
        let pid = held.pid();
        let label = format!("pid {pid}");
        daemon.log().wait_for("the held client's session", |l| {
            is_message(l, "session started") && fields(l)["pid"] == pid
        });
        assert!(userfaultfds_of(daemon.pid()) >= 1);
        let status = held.kill();
        assert!(!status.success());
        let ended = daemon.wait_session_ended_for(pid);
        let f = fields(&ended);
        assert_eq!(f["label"], label.as_str());
        assert!(
            f["reason"]
                .as_str()
                .is_some_and(|r| r.contains("client gone")),
            "{ended}"
        );
        // The session's userfaultfd is closed: the daemon keeps nothing of a dead client.
        wait_until("the daemon closed the dead client's userfaultfd", || {
            userfaultfds_of(daemon.pid()) == 0
        });
        daemon.assert_alive();
        let report = daemon.client(&mem, &[]);
        assert_eq!(report["pages"], PAGES);
    }
}
