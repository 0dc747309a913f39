//! `faultline serve` when a page has no right bytes any more: the memory file is truncated under
//! the daemon in the middle of a restore. Every page the client reads before the cut is right;
//! the first page past it ends the client explicitly — SIGBUS at that page (POISON), or the
//! Firecracker process killed where the kernel has no POISON or `--on-unservable kill` says so —
//! and the daemon logs it a bounded number of times. Before, the failed copy (EFAULT) released
//! the page's claim with no resolve and no wake: the client slept for ever, nothing logged.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{fields, is_message, summary, workdir, Daemon, HeldClient, MEM_LEN};

/// Restore a client whose daemon's memory file loses its second half before the client touches
/// it; returns how the client ended and the daemon's log.
fn truncated_mid_restore(extra: &[&str]) -> (std::process::ExitStatus, Daemon, tempfile::TempDir) {
    let (dir, served) = workdir();
    let original = dir.path().join("original");
    std::fs::copy(&served, &original).expect("copy of the snapshot");
    let mut args = vec!["--readahead", "off"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(dir.path(), &served, &args);
    // The client checks every byte against the untouched copy; it waits 1.5 s after the
    // handshake before touching, in address order, one thread.
    let client = HeldClient::spawn(
        daemon.socket(),
        &original,
        &[
            "--touch",
            "seq",
            "--threads",
            "1",
            "--resume-after-ms",
            "1500",
        ],
    );
    daemon
        .log()
        .wait_for("session started", |l| is_message(l, "session started"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&served)
        .expect("open the served file");
    f.set_len(MEM_LEN / 2).expect("truncate");
    let out = client.release();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("wrong"),
        "no wrong byte: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, daemon, dir)
}

#[test]
fn a_memory_file_truncated_mid_restore_poisons_the_lost_pages() {
    let (status, daemon, _dir) = truncated_mid_restore(&[]);
    assert_eq!(
        status.signal(),
        Some(7 /* SIGBUS */),
        "SIGBUS at the first lost page ({status}); log:\n{}",
        daemon.log().text()
    );
    let ended = daemon.wait_session_ended(1);
    let st = summary(&ended);
    assert!(st["poisoned_pages"].as_u64() >= Some(1), "{ended}");
    assert_eq!(st["unservable"], 0, "{ended}");
    // Said a bounded number of times (5 a cause per window, then counted).
    let poisoned = daemon.log().count(|l| {
        is_message(
            l,
            "page poisoned: no right bytes for it (the client gets SIGBUS there)",
        )
    });
    assert!((1..=5).contains(&poisoned), "{poisoned} lines");
}

#[test]
fn without_poison_a_lost_page_kills_the_client() {
    let (status, daemon, _dir) = truncated_mid_restore(&["--simulate-no-poison"]);
    assert_eq!(
        status.signal(),
        Some(9 /* SIGKILL */),
        "the client is killed ({status}); log:\n{}",
        daemon.log().text()
    );
    let line = daemon.log().wait_for("the end of the client", |l| {
        fields(l)["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("unservable page: ending the client")
    });
    assert!(line.contains("the client process was killed"), "{line}");
    let st = summary(&daemon.wait_session_ended(1));
    assert_eq!(
        (st["unservable"].as_u64(), st["poison"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn on_unservable_kill_kills_the_client_where_poison_exists() {
    let (status, daemon, _dir) = truncated_mid_restore(&["--on-unservable", "kill"]);
    assert_eq!(
        status.signal(),
        Some(9 /* SIGKILL */),
        "the client is killed ({status}); log:\n{}",
        daemon.log().text()
    );
    let st = summary(&daemon.wait_session_ended(1));
    assert_eq!(
        (st["unservable"].as_u64(), st["poison"].as_u64()),
        (Some(1), Some(0))
    );
}

/// A client that lies about its page size: hugetlbfs memory declared as 4 KiB pages. The kernel
/// refuses every 4 KiB resolve there (EINVAL) and the 4 KiB POISON too, so the only explicit end
/// is the client's: it is killed, logged. (Such a failed resolve used to release the claim with no
/// resolve and no wake: the client slept for ever.)
#[test]
fn hugetlb_memory_declared_with_4k_pages_ends_the_client() {
    let Some(_huge) =
        faultline_testing::need_huge_pages("hugetlb_declared_4k", MEM_LEN / (2 << 20))
    else {
        return;
    };
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    let out = common::output_within(
        common::client_command(
            daemon.socket(),
            &mem,
            &["--page-size", "2097152", "--declare-page-size", "4096"],
        )
        .spawn()
        .expect("spawning the client"),
        common::DEADLINE,
    );
    assert_eq!(
        out.status.signal(),
        Some(9 /* SIGKILL */),
        "the lying client is killed ({}); log:\n{}",
        out.status,
        daemon.log().text()
    );
    let st = summary(&daemon.wait_session_ended(1));
    assert_eq!(st["unservable"].as_u64(), Some(1), "{st}");
    assert_eq!(st["pages"].as_u64(), Some(0), "no page was served: {st}");
}
