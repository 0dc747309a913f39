//! `faultline image` and `faultline serve --image`, through the real binary: pack (table and
//! JSON), inspect, verify (clean and corrupt), unpack (byte for byte), diff (served and unpacked as
//! the new memory), and restores by `faultline client` from an image, from a diff, and from a
//! corrupt image (the client dies of SIGBUS at the bad page, which the daemon logs as poisoned).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Instant;

use common::{client_command, fields, output_within, signal, Log, DEADLINE, EXE};
use rustix::process::Signal;
use serde_json::Value;

const PS: usize = 4096;
/// 4 MiB of memory: 1024 pages.
const PAGES: usize = 1024;

/// Zero pages (30%), copies of 8 pattern pages (20%), unique pattern pages (50%).
fn raw_memory(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGES * PS];
    for (p, page) in v.chunks_exact_mut(PS).enumerate() {
        match p % 10 {
            0..=2 => {}
            3 | 4 => faultline_testing::fill_pattern(seed, 1_000_000 + (p % 8) as u64, page),
            _ => faultline_testing::fill_pattern(seed, p as u64, page),
        }
    }
    v
}

/// (zero, duplicate, unique) pages of [`raw_memory`]: the first copy of each of the 8 repeated
/// pages is unique, the others duplicates.
fn counts() -> (usize, usize, usize) {
    let of =
        |r: std::ops::RangeInclusive<usize>| (0..PAGES).filter(|p| r.contains(&(p % 10))).count();
    (of(0..=2), of(3..=4) - 8, of(5..=9) + 8)
}

fn faultline(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running faultline")
}

/// Runs `faultline image ...`, asserts success, returns stdout.
fn image_ok(args: &[&str]) -> String {
    let mut all = vec!["image"];
    all.extend_from_slice(args);
    let out = faultline(&all);
    assert!(
        out.status.success(),
        "faultline {all:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Files {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
    bytes: Vec<u8>,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("mem.raw");
    let bytes = raw_memory(7);
    std::fs::write(&raw, &bytes).expect("write raw");
    Files {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        raw,
        bytes,
    }
}

#[test]
fn pack_prints_a_table_and_inspect_verify_unpack_agree() {
    let f = files();
    let img = f.dir.join("mem.img");
    let table = image_ok(&["pack", s(&f.raw), "-o", s(&img)]);
    let (zero, dup, unique) = counts();
    let pct = |n: usize| 100.0 * n as f64 / PAGES as f64;
    for row in [
        "raw size       4194304 bytes (4.0 MiB)".to_string(),
        "pages          1024".to_string(),
        format!("  zero         {zero} ({:.1}%)", pct(zero)),
        format!("  duplicate    {dup} ({:.1}%)", pct(dup)),
        format!("  unique       {unique} ({:.1}%)", pct(unique)),
        "codec          zstd level 3".to_string(),
        "throughput ".to_string(),
        "image id ".to_string(),
    ] {
        assert!(table.contains(&row), "no {row:?} in:\n{table}");
    }
    assert!(!f.dir.join("mem.img.partial").exists());
    let size = std::fs::metadata(&img).expect("image").len();
    assert!(
        table.contains(&format!("image size     {size} bytes")),
        "{table}"
    );
    // The size target: <= raw x unique fraction x 1.1.
    assert!(
        (size as f64) <= f.bytes.len() as f64 * (unique as f64 / PAGES as f64) * 1.1,
        "{size}"
    );

    let info = json(&image_ok(&["inspect", s(&img), "--json"]));
    let layer = &info["layers"][0];
    assert_eq!(layer["pages"], 1024);
    assert_eq!(layer["zero_pages"], zero);
    assert_eq!(layer["stored_pages"], PAGES - zero);
    assert_eq!(layer["distinct_pages"], unique);
    assert_eq!(layer["image_bytes"], size);
    assert_eq!(layer["base_id"], Value::Null);
    let text = image_ok(&["inspect", s(&img)]);
    let row = format!(
        "pages          {zero} zero, 0 from the base, {} stored ({unique} distinct)",
        PAGES - zero
    );
    assert!(text.contains(&row), "{text}");

    let v = json(&image_ok(&["verify", s(&img), "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["layers"][0]["pages_checked"], unique);

    let back = f.dir.join("back.raw");
    image_ok(&["unpack", s(&img), "-o", s(&back)]);
    assert!(std::fs::read(&back).expect("unpacked") == f.bytes);

    // Every codec round-trips.
    for codec in ["lz4", "none"] {
        let img = f.dir.join(format!("mem-{codec}.img"));
        let st = json(&image_ok(&[
            "pack",
            s(&f.raw),
            "-o",
            s(&img),
            "--codec",
            codec,
            "--json",
        ]));
        assert_eq!(st["codec"], codec);
        assert_eq!(st["unique_pages"], unique);
        image_ok(&["verify", s(&img)]);
        image_ok(&["unpack", s(&img), "-o", s(&back)]);
        assert!(
            std::fs::read(&back).expect("unpacked") == f.bytes,
            "{codec}"
        );
    }
}

#[test]
fn bad_flags_and_inputs_are_refused_by_name() {
    let f = files();
    let img = f.dir.join("x.img");
    let out = faultline(&[
        "image",
        "pack",
        s(&f.raw),
        "-o",
        s(&img),
        "--codec",
        "lz4",
        "--level",
        "5",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--level applies to --codec zstd only"),
        "{out:?}"
    );
    let out = faultline(&["image", "pack", s(&f.raw), "-o", s(&img), "--level", "99"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("zstd level 99"));
    assert!(!img.exists() && !f.dir.join("x.img.partial").exists());
    // A raw file is not an image.
    let out = faultline(&["image", "inspect", s(&f.raw)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a faultline image"),
        "{out:?}"
    );
    // serve takes one of --mem-file and --image.
    let sock = f.dir.join("s.sock");
    let out = faultline(&[
        "serve",
        "--socket",
        s(&sock),
        "--mem-file",
        s(&f.raw),
        "--image",
        s(&img),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{out:?}"
    );
    let out = faultline(&["serve", "--socket", s(&sock)]);
    assert!(!out.status.success());
    // serve --image refuses a bad image at once.
    let out = faultline(&["serve", "--socket", s(&sock), "--image", s(&f.raw)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a faultline image"),
        "{out:?}"
    );
}

#[test]
fn verify_names_the_first_bad_page() {
    for hash in ["blake3", "xxh3"] {
        bad_pages_are_named(hash);
    }
}

fn bad_pages_are_named(hash: &str) {
    let f = files();
    let img = f.dir.join("mem.img");
    let table = image_ok(&[
        "pack",
        s(&f.raw),
        "-o",
        s(&img),
        "--codec",
        "none",
        "--hash",
        hash,
    ]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("page hash") && l.ends_with(hash)),
        "{table}"
    );
    let info = image_ok(&["inspect", s(&img)]);
    assert!(
        info.contains(&format!("version 2, {hash} page hashes")),
        "{info}"
    );
    image_ok(&["verify", s(&img)]);
    let image = faultline::image::Image::open(&img).expect("open");
    // Page 15 (unique) and page 27 (unique): corrupt both; 15 is named first.
    let mut bytes = std::fs::read(&img).expect("read");
    for p in [27u64, 15] {
        let Some(faultline::image::PageLoc::Stored { chunk, offset }) = image.page(p) else {
            panic!("page {p} is stored");
        };
        let at = image.chunks()[chunk as usize].offset + u64::from(offset) + 99;
        bytes[usize::try_from(at).expect("fits usize")] ^= 0x10;
    }
    std::fs::write(&img, &bytes).expect("write");
    let out = faultline(&["image", "verify", s(&img)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("page 15 is bad: content hash mismatch in chunk")
            && err.contains("(2 bad pages in all)"),
        "{err}"
    );
    // unpack refuses to write a wrong page.
    let out = faultline(&["image", "unpack", s(&img), "-o", s(&f.dir.join("u.raw"))]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("page 15: content hash mismatch"),
        "{out:?}"
    );
    assert!(!f.dir.join("u.raw").exists() && !f.dir.join("u.raw.partial").exists());
    // A truncated image: verify names the missing section.
    std::fs::write(&img, &bytes[..bytes.len() - 40]).expect("write");
    let out = faultline(&["image", "verify", s(&img)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("image truncated: the hash table ends"),
        "{out:?}"
    );
}

/// NEW: pages changed, zeroed and filled relative to the raw memory.
fn changed(base: &[u8]) -> Vec<u8> {
    let mut new = base.to_vec();
    for p in (0..PAGES).step_by(7) {
        let page = &mut new[p * PS..(p + 1) * PS];
        if p % 10 < 3 {
            faultline_testing::fill_pattern(99, p as u64, page);
        } else {
            page.fill(0);
        }
    }
    new[500 * PS + 1] ^= 0xFF;
    new
}

#[test]
fn a_diff_stores_only_changed_pages_and_unpacks_to_new() {
    let f = files();
    let base = f.dir.join("base.img");
    image_ok(&["pack", s(&f.raw), "-o", s(&base)]);
    let new = changed(&f.bytes);
    let new_raw = f.dir.join("new.raw");
    std::fs::write(&new_raw, &new).expect("write");
    let diff = f.dir.join("new.diff");
    let st = json(&image_ok(&[
        "diff",
        s(&base),
        s(&new_raw),
        "-o",
        s(&diff),
        "--json",
    ]));
    let changed_pages = (0..PAGES)
        .filter(|&p| new[p * PS..(p + 1) * PS] != f.bytes[p * PS..(p + 1) * PS])
        .count() as u64;
    assert_eq!(st["base_pages"], PAGES as u64 - changed_pages, "{st}");
    let table = image_ok(&["diff", s(&base), s(&new_raw), "-o", s(&diff)]);
    assert!(table.contains("  unchanged    "), "{table}");

    let info = json(&image_ok(&["inspect", s(&diff), "--json"]));
    assert_eq!(info["layers"][0]["base_name"], "base.img");
    assert_eq!(
        info["layers"][0]["base_id"], info["layers"][1]["id"],
        "{info}"
    );
    let v = json(&image_ok(&["verify", s(&diff), "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(2));
    let back = f.dir.join("back.raw");
    image_ok(&["unpack", s(&diff), "-o", s(&back)]);
    assert!(std::fs::read(&back).expect("unpacked") == new);
}

/// A `faultline serve --image` daemon.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: Arc<Log>,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("fl.sock");
        let mut child = Command::new(EXE)
            .args(["serve", "--socket", s(&socket), "--image", s(image)])
            .args(["--workers", "2", "--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let (log, _reader) = Log::capture(child.stderr.take().expect("stderr"));
        log.wait_for("serving", |l| {
            fields(l)["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving"))
        });
        let end = Instant::now() + DEADLINE;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < end, "no socket; log:\n{}", log.text());
            std::thread::yield_now();
        }
        Daemon { child, socket, log }
    }

    fn client(&self, mem: &Path) -> Output {
        let child = client_command(&self.socket, mem, &[])
            .spawn()
            .expect("spawn client");
        output_within(child, DEADLINE)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        signal(self.child.id(), Signal::TERM);
        let _ = self.child.wait();
    }
}

fn verified(out: &Output, log: &Log) -> Value {
    assert!(
        out.status.success(),
        "client failed: {out:?}\nlog:\n{}",
        log.text()
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["verified"], true, "{report}");
    report
}

#[test]
fn serve_image_restores_every_byte_supervised_and_not() {
    let f = files();
    let img = f.dir.join("mem.img");
    image_ok(&["pack", s(&f.raw), "-o", s(&img), "--codec", "lz4"]);
    for extra in [&[][..], &["--no-supervisor"][..]] {
        let d = Daemon::start(&f.dir, &img, extra);
        for _ in 0..2 {
            let r = verified(&d.client(&f.raw), &d.log);
            assert_eq!(r["pages"], PAGES as u64);
        }
    }
    // A diff is served over its base.
    let base = f.dir.join("base.img");
    std::fs::rename(&img, &base).expect("rename");
    let new = changed(&f.bytes);
    let new_raw = f.dir.join("new.raw");
    std::fs::write(&new_raw, &new).expect("write");
    let diff = f.dir.join("new.diff");
    image_ok(&["diff", s(&base), s(&new_raw), "-o", s(&diff)]);
    let d = Daemon::start(&f.dir, &diff, &[]);
    verified(&d.client(&new_raw), &d.log);
}

#[test]
fn a_corrupt_page_is_poisoned_and_the_client_dies_there() {
    for hash in ["blake3", "xxh3"] {
        poisoned_with(hash);
    }
}

fn poisoned_with(hash: &str) {
    let f = files();
    let img = f.dir.join("mem.img");
    image_ok(&["pack", s(&f.raw), "-o", s(&img), "--hash", hash]);
    const BAD: u64 = 705;
    let image = faultline::image::Image::open(&img).expect("open");
    let Some(faultline::image::PageLoc::Stored { chunk, offset }) = image.page(BAD) else {
        panic!("page {BAD} is stored");
    };
    assert!(image.chunks()[chunk as usize].is_raw());
    let at = image.chunks()[chunk as usize].offset + u64::from(offset) + 1;
    let mut bytes = std::fs::read(&img).expect("read");
    bytes[usize::try_from(at).expect("fits usize")] ^= 1;
    std::fs::write(&img, &bytes).expect("write");

    let d = Daemon::start(&f.dir, &img, &["--no-supervisor", "--readahead", "off"]);
    let out = d.client(&f.raw);
    assert_eq!(
        out.status.signal(),
        Some(Signal::BUS.as_raw()),
        "the client dies of SIGBUS: {out:?}\nlog:\n{}",
        d.log.text()
    );
    let line = d.log.wait_for("the poison log line", |l| {
        fields(l)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("page poisoned"))
    });
    let v = fields(&line);
    assert_eq!(v["offset"], BAD * PS as u64, "{line}");
    assert!(
        v["cause"]
            .as_str()
            .is_some_and(|c| c.contains(&format!("page {BAD}: content hash mismatch"))),
        "{line}"
    );
    // Exactly one page was poisoned.
    let poisoned = d
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("page poisoned"))
        .count();
    assert_eq!(poisoned, 1, "{}", d.log.text());
}

#[test]
fn serve_image_id_serves_the_named_blake3_image_and_refuses_others() {
    let f = files();
    let img = f.dir.join("mem.img");
    image_ok(&["pack", s(&f.raw), "-o", s(&img), "--hash", "blake3"]);
    let id_of = |img: &Path| {
        json(&image_ok(&["inspect", s(img), "--json"]))["layers"][0]["id"]
            .as_str()
            .expect("the image's id")
            .to_string()
    };
    let id = id_of(&img);
    assert_eq!(id.len(), 64, "{id}");
    // The right id: served (through the supervised worker, which gets the flag too).
    {
        let d = Daemon::start(&f.dir, &img, &["--image-id", &id]);
        verified(&d.client(&f.raw), &d.log);
    }
    let sock = f.dir.join("refused.sock");
    // `serve` with these flags fails at start, saying `want`.
    let refused = |flags: &[&str], want: &str| {
        let mut args = vec!["serve", "--socket", s(&sock)];
        args.extend_from_slice(flags);
        let out = faultline(&args);
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    };
    // Another id: refused at start, naming both.
    let mut other = id.clone().into_bytes();
    other[0] = if other[0] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).expect("hex");
    refused(
        &["--image", s(&img), "--image-id", &other],
        &format!("has image id {id}, not the expected {other}"),
    );
    // Not 64 hex digits.
    refused(
        &["--image", s(&img), "--image-id", &id[..63]],
        "64 hex digits",
    );
    let bad = format!("{}g", &id[..63]);
    refused(&["--image", s(&img), "--image-id", &bad], "64 hex digits");
    // An XXH3-128 image: its id cannot vouch for its pages.
    let fast = f.dir.join("fast.img");
    image_ok(&["pack", s(&f.raw), "-o", s(&fast)]);
    let fast_id = id_of(&fast);
    refused(
        &["--image", s(&fast), "--image-id", &fast_id],
        "xxh3 page hashes, which its id cannot vouch for",
    );
    // --image-id without --image.
    refused(
        &["--mem-file", s(&f.raw), "--image-id", &id],
        "--image-id checks the image given with --image",
    );
}
