//! `faultline bench --sources` through the real binary, on a small snapshot: every source is
//! restored and verified byte for byte by the bench itself (it fails otherwise), the images obey
//! the size bound, and the report names every variant and why the S3 rows were left out. The
//! timings are the bench's business, not this test's.

mod common;

use std::process::Command;

use common::EXE;
use serde_json::Value;

#[test]
fn every_source_is_restored_verified_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(EXE)
        .args(["bench", "--sources", "--size-mib", "16", "--json"])
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running faultline bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let r: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    assert_eq!(r["size"], 16 << 20, "{r}");
    let names: Vec<&str> = r["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| row["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "local raw file (mmap)",
            "local image (zstd)",
            "local image (lz4)",
            "local image (zstd, blake3)",
            "remote, on demand (loopback)",
            "remote, background stream (loopback)",
            "local raw file (mmap), working set",
        ]
    );
    for row in r["rows"].as_array().expect("rows") {
        assert_eq!(row["restore_ms"].as_array().map(Vec::len), Some(1), "{row}");
        // A restore that touches pages through the fault server uses CPU time.
        let cpu = row["cpu_ms"][0].as_f64().expect("cpu_ms");
        assert!(cpu > 0.0, "{row}");
    }
    // The CPU bound of each remote row: above zero, and a ratio at most 1.
    let bounds = r["remote_cpu_bounds"].as_array().expect("bounds");
    assert_eq!(bounds.len(), 2, "{r}");
    for b in bounds {
        let (ms, ratio) = (b[1].as_f64().expect("ms"), b[2].as_f64().expect("ratio"));
        assert!(ms > 0.0 && ratio > 0.0 && ratio <= 1.0, "{b}");
    }
    assert!(
        r["tcp_cpu_ms_per_mib"].as_f64().is_some_and(|c| c > 0.0),
        "{r}"
    );
    // The synthetic snapshot: 30% zero pages, 20% copies of 16 pages, 50% unique pages.
    let pages = (16u64 << 20) / 4096;
    for img in r["images"].as_array().expect("images") {
        let n = |k: &str| img[k].as_u64().expect(k);
        assert_eq!(
            n("zero_pages") + n("duplicate_pages") + n("unique_pages"),
            pages,
            "{img}"
        );
        assert!(n("image_bytes") <= n("bound_bytes"), "{img}");
        assert!(n("image_bytes") < n("raw_bytes") * 6 / 10, "{img}");
    }
    let size_targets: Vec<&Value> = r["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("image size"))
        })
        .collect();
    assert_eq!(size_targets.len(), 3, "{r}");
    assert!(size_targets.iter().all(|t| t["met"] == true), "{r}");
    // The restore targets hold the default image hash and the streamed remote restore; the
    // BLAKE3 image and the on-demand remote rows are shown for comparison.
    let compared: Vec<&str> = r["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| !t["comparison"].is_null())
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        compared,
        [
            "local image (zstd, blake3) restore time / raw file",
            "remote, on demand (loopback) throughput / raw file",
        ],
        "{r}"
    );
    assert!(
        r["skipped"][0]
            .as_str()
            .is_some_and(|s| s.contains("--object-endpoint")),
        "{r}"
    );
}
