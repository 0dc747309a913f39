//! `faultline export` + `faultline serve --remote` over loopback: a `faultline client` (playing
//! Firecracker) restores through a handler whose pages come from another process's page server,
//! every byte verified — from a memory file, from an image, with the background stream, and
//! with the exporter killed mid-restore and restarted on the same port.

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{
    fields, is_message, run_client, signal, try_metric, verified_report, wait_until,
    wait_until_within, workdir, HeldClient, Log, EXE,
};
use rustix::process::Signal;

/// A `faultline` process with its stderr captured.
struct Proc {
    child: Child,
    log: Arc<Log>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(EXE)
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
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

    /// SIGTERM, then the exit status (bounded).
    fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), Signal::TERM);
        self.wait()
    }

    /// SIGKILL, then reap.
    fn kill(mut self) -> ExitStatus {
        signal(self.child.id(), Signal::KILL);
        self.wait()
    }

    fn wait(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the process exits", || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status.expect("exited")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// `faultline export --listen <listen> <what>`; returns it and the address it listens on.
fn export(listen: &str, what: &[&str]) -> (Proc, String) {
    let mut args = vec!["export", "--listen", listen];
    args.extend_from_slice(what);
    let p = Proc::spawn(&args);
    let line = p
        .log
        .wait_for("the exporter listening", |l| is_message(l, "exporting"));
    let addr = fields(&line)["addr"]
        .as_str()
        .expect("the exporting line names its address")
        .to_string();
    (p, addr)
}

/// `faultline serve --socket <socket> --remote <addr> --workers 2 <extra>`, ready to accept.
fn serve_remote(socket: &Path, addr: &str, extra: &[&str]) -> Proc {
    let socket_arg = socket.display().to_string();
    let mut args = vec![
        "serve",
        "--socket",
        &socket_arg,
        "--remote",
        addr,
        "--workers",
        "2",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    wait_until("the handler accepts", || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("faultline serve exited ({status}); log:\n{}", p.log.text());
        }
        socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    p
}

#[test]
fn a_client_restores_from_a_remote_memory_file() {
    let (dir, mem) = workdir();
    let mem_arg = mem.display().to_string();
    let (exporter, addr) = export("127.0.0.1:0", &["--mem-file", &mem_arg]);
    let sock = dir.path().join("fl.sock");
    let server = serve_remote(&sock, &addr, &[]);
    let report = run_client(&sock, &mem, &["--threads", "2"]);
    assert_eq!(report["pages"], 1024);
    // Clones of the same snapshot share the remote source.
    run_client(&sock, &mem, &["--touch", "rand"]);
    assert!(server.terminate().success());
    let log = exporter.log.clone();
    assert!(exporter.terminate().success(), "{}", log.text());
    let stop = log.wait_for("the exporter's summary", |l| is_message(l, "stopping"));
    assert!(
        fields(&stop)["bytes_sent"].as_u64().unwrap_or(0) > 0,
        "{stop}"
    );
}

#[test]
fn a_client_restores_from_a_remote_stream() {
    let (dir, mem) = workdir();
    let mem_arg = mem.display().to_string();
    let (exporter, addr) = export("127.0.0.1:0", &["--mem-file", &mem_arg, "--no-dedup"]);
    let sock = dir.path().join("fl.sock");
    // Unsupervised, streaming into a cache smaller than the memory.
    let server = serve_remote(
        &sock,
        &addr,
        &[
            "--no-supervisor",
            "--remote-stream",
            "--remote-cache-mib",
            "1",
        ],
    );
    run_client(&sock, &mem, &["--touch", "rand"]);
    assert!(server.terminate().success());
    let log = exporter.log.clone();
    assert!(exporter.terminate().success());
    // Without the scan, nothing goes as a reference to a kept page.
    let stop = log.wait_for("the exporter's summary", |l| is_message(l, "stopping"));
    let f = fields(&stop);
    assert_eq!(
        (f["same_bytes"].as_u64(), f["keep_frames"].as_u64()),
        (Some(0), Some(0)),
        "{stop}"
    );
    assert!(f["bytes_sent"].as_u64().unwrap_or(0) > 0, "{stop}");
}

#[test]
fn a_client_restores_from_a_remote_image() {
    let (dir, mem) = workdir();
    let img = dir.path().join("snap.img");
    let out = Command::new(EXE)
        .args(["image", "pack"])
        .arg(&mem)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("running image pack");
    assert!(out.status.success(), "image pack: {out:?}");
    let img_arg = img.display().to_string();
    let (exporter, addr) = export("127.0.0.1:0", &["--image", &img_arg]);
    let sock = dir.path().join("fl.sock");
    let server = serve_remote(&sock, &addr, &[]);
    run_client(&sock, &mem, &[]);
    assert!(server.terminate().success());
    assert!(exporter.terminate().success());
}

#[test]
fn a_restore_survives_the_exporter_dying_and_coming_back() {
    let (dir, mem) = workdir();
    let mem_arg = mem.display().to_string();
    let (exporter, addr) = export("127.0.0.1:0", &["--mem-file", &mem_arg]);
    let sock = dir.path().join("fl.sock");
    let metrics = common::free_local_addr();
    // Supervised (the remote flags go through to the worker); no readahead, so pages move one
    // fault at a time and half the memory is still remote when the exporter dies.
    let server = serve_remote(
        &sock,
        &addr,
        &[
            "--readahead",
            "off",
            "--metrics",
            &metrics,
            "--remote-deadline",
            "60",
        ],
    );
    // Touch half the memory, hold, then read all of it once stdin closes.
    let client = HeldClient::spawn(
        &sock,
        &mem,
        &["--ws-pct", "50", "--ws-only", "--verify-after-hold"],
    );
    wait_until("some pages were restored", || {
        try_metric(&metrics, "faultline_pages", "scope=\"total\"").unwrap_or(0) >= 64
    });
    assert!(!exporter.kill().success());
    // The rest of the restore waits for the page server...
    let done = std::thread::spawn(move || client.release());
    // ... which comes back on the same port.
    let mut again = None;
    wait_until_within(
        "the exporter restarts on its port",
        Duration::from_secs(10),
        || {
            let p = Proc::spawn(&["export", "--listen", &addr, "--mem-file", &mem_arg]);
            match p.log.wait_for("start-up", |l| {
                is_message(l, "exporting") || l.contains("binding")
            }) {
                l if is_message(&l, "exporting") => {
                    again = Some(p);
                    true
                }
                _ => false,
            }
        },
    );
    let out = done.join().expect("the client waiter");
    let report = verified_report(&out);
    assert_eq!(report["verified"], true);
    server.log.wait_for("the reconnect", |l| {
        is_message(l, "reconnected to the remote page server")
    });
    assert!(server.terminate().success());
    assert!(again.expect("restarted").terminate().success());
}
