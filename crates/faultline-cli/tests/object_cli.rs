//! `faultline serve --object-url s3://...` and `--image s3://...` through the real binary against
//! a real S3-compatible server (moto's `moto_server`, installed by `.ci/run`, started here on a
//! free loopback port): restores by `faultline client` verified byte for byte, through the
//! supervisor (so the object flags reach the worker), cold and then warm from the cache
//! directory. Skipped with a printed reason when `moto_server` is not installed.
#![allow(unsafe_code)] // pre_exec: the S3 server dies with the test process

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{fields, is_message, run_client, signal, wait_until, workdir, Log, EXE};
use rustix::process::Signal;

const BUCKET: &str = "faultline-cli-test";

/// A `moto_server` on a loopback port, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    /// Ranged GETs the server has answered (counted from its request log).
    gets: Arc<AtomicUsize>,
}

impl Moto {
    fn start(test: &str) -> Option<Moto> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let Some(exe) = std::env::split_paths(&path)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
        else {
            faultline_testing::skip(
                test,
                "moto_server not found on PATH (pip install 'moto[server]')",
            );
            return None;
        };
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if let Some(m) = Moto::start_on(&exe, port) {
                return Some(m);
            }
        }
        panic!("moto_server did not start on any of 5 ports");
    }

    fn start_on(exe: &Path, port: u16) -> Option<Moto> {
        let mut cmd = Command::new(exe);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the hook runs in the forked child before exec and makes one prctl(2) call,
        // which is async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawning moto_server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let gets = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&gets);
        // Drained for the server's whole life (a full pipe would stall it).
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"GET /") && line.contains(" 206 ") {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                if line.contains("Running on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let m = Moto { child, port, gets };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            return None; // dropped: killed
        }
        m.request("PUT", &format!("/{BUCKET}"), &[]).ok()?;
        Some(m)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One request; the answer must be 200. (moto accepts unsigned requests.)
    fn request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(std::io::Error::other(
                resp.lines().next().unwrap_or("").to_string(),
            ))
        }
    }

    fn upload(&self, key: &str, file: &Path) {
        let bytes = std::fs::read(file).expect("reading the file to upload");
        self.request("PUT", &format!("/{BUCKET}/{key}"), &bytes)
            .expect("upload");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `faultline serve` (supervised) on `socket` with `args`, S3 credentials in its environment;
/// returns once it accepts connections.
fn serve(socket: &Path, args: &[&str]) -> (Child, std::sync::Arc<Log>) {
    let mut child = Command::new(EXE)
        .arg("serve")
        .arg("--socket")
        .arg(socket)
        .args(["--workers", "2", "--log-format", "json"])
        .args(args)
        .env("RUST_LOG", "info")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning faultline serve");
    let (log, _reader) = Log::capture(child.stderr.take().expect("piped stderr"));
    wait_until("the daemon accepts connections", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("faultline serve exited ({status}); log:\n{}", log.text());
        }
        socket.exists() && UnixStream::connect(socket).is_ok()
    });
    (child, log)
}

fn stop(mut child: Child) {
    signal(child.id(), Signal::TERM);
    let _ = child.wait();
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn serve_restores_from_an_object_url_cold_then_warm_through_the_supervisor() {
    let Some(s3) = Moto::start("serve_restores_from_an_object_url") else {
        return;
    };
    let (dir, mem) = workdir();
    s3.upload("vm/mem.raw", &mem);
    let cache: PathBuf = dir.path().join("cache");
    let endpoint = s3.endpoint();
    let url = format!("s3://{BUCKET}/vm/mem.raw");
    let args = [
        "--object-url",
        url.as_str(),
        "--object-endpoint",
        endpoint.as_str(),
        "--cache-dir",
        s(&cache),
        "--cache-mib",
        "64",
        "--object-block-kib",
        "256",
    ];
    let socket = dir.path().join("fl.sock");
    let (daemon, log) = serve(&socket, &args);
    // Cold: every 256 KiB block fetched once from the store (4 MiB: 16 blocks).
    run_client(&socket, &mem, &["--threads", "2"]);
    // A second VM of the same snapshot: from the cache.
    run_client(&socket, &mem, &["--threads", "2", "--touch", "rand"]);
    stop(daemon);
    assert!(
        log.text().contains(&url),
        "the worker served the object; log:\n{}",
        log.text()
    );
    let cold_gets = s3.gets.load(Ordering::Relaxed);
    assert_eq!(cold_gets, 16, "ranged GETs the store answered");

    // The next daemon on the same cache directory (a restart, the next host boot) restores
    // from the blocks cached by the first: no GET reaches the store.
    let (daemon, _log) = serve(&socket, &args);
    run_client(&socket, &mem, &["--threads", "2"]);
    stop(daemon);
    assert_eq!(s3.gets.load(Ordering::Relaxed), cold_gets);
}

/// `faultline image pack` the memory file `mem` (into `dir`) and upload the image as `key`; its
/// URL.
fn pack_and_upload(s3: &Moto, dir: &Path, mem: &Path, key: &str) -> String {
    let img = dir.join("mem.img");
    let out = Command::new(EXE)
        .args(["image", "pack", s(mem), "-o", s(&img)])
        .output()
        .expect("faultline image pack");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s3.upload(key, &img);
    format!("s3://{BUCKET}/{key}")
}

#[test]
fn serve_restores_from_an_image_in_the_store() {
    let Some(s3) = Moto::start("serve_restores_from_an_image_in_the_store") else {
        return;
    };
    let (dir, mem) = workdir();
    let url = pack_and_upload(&s3, dir.path(), &mem, "images/mem.img");
    let endpoint = s3.endpoint();
    let socket = dir.path().join("fl.sock");
    let (daemon, _log) = serve(
        &socket,
        &[
            "--image",
            url.as_str(),
            "--object-endpoint",
            endpoint.as_str(),
            "--cache-dir",
            s(&dir.path().join("cache")),
        ],
    );
    run_client(&socket, &mem, &["--threads", "2"]);
    stop(daemon);
}

#[test]
fn an_image_in_the_store_prefetches_a_recorded_working_set() {
    let Some(s3) = Moto::start("an_image_in_the_store_prefetches_a_recorded_working_set") else {
        return;
    };
    let (dir, mem) = workdir();
    let url = pack_and_upload(&s3, dir.path(), &mem, "images/ws.img");
    let endpoint = s3.endpoint();
    let ws = dir.path().join("mem.ws");
    let socket = dir.path().join("fl.sock");
    let common = |cache: &str| {
        vec![
            "--image".to_string(),
            url.clone(),
            "--object-endpoint".to_string(),
            endpoint.clone(),
            "--object-block-kib".to_string(),
            "64".to_string(),
            "--cache-dir".to_string(),
            s(&dir.path().join(cache)).to_string(),
        ]
    };
    // A first restore records its working set.
    let mut args = common("cache-a");
    args.extend(["--record-ws".to_string(), s(&ws).to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (daemon, log) = serve(&socket, &argv);
    run_client(&socket, &mem, &["--ws-pct", "20", "--ws-only"]);
    log.wait_for("the recording", |l| is_message(l, "working set recorded"));
    stop(daemon);
    // A daemon on a cold cache fetches the chunks of that set first, then restores in full.
    let before = s3.gets.load(Ordering::Relaxed);
    let mut args = common("cache-b");
    args.extend(["--prefetch-ws".to_string(), s(&ws).to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (daemon, log) = serve(&socket, &argv);
    let done = log.wait_for("the store prefetch", |l| {
        is_message(l, "working set prefetched") && l.contains("object")
    });
    let f = fields(&done);
    assert_eq!(f["failed"], 0, "{done}");
    assert!(f["fetched"].as_u64() > Some(0), "{done}");
    assert!(s3.gets.load(Ordering::Relaxed) > before);
    run_client(&socket, &mem, &["--threads", "2"]);
    stop(daemon);
}

#[test]
fn a_missing_object_fails_at_start_naming_it() {
    let Some(s3) = Moto::start("a_missing_object_fails_at_start_naming_it") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("s3://{BUCKET}/no/such/mem");
    let out = Command::new(EXE)
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("fl.sock"))
        .args(["--object-url", &url, "--object-endpoint", &s3.endpoint()])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdin(Stdio::null())
        .output()
        .expect("faultline serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("not found") && err.contains("404"), "{err}");
}
