//! `faultline bench --sources` (and its subset `--remote`): restoring one snapshot from each page
//! source, against the local raw file, in the same run. A region is served by the fault server
//! and touched (each thread its own part, one read per page), then every touched byte is
//! verified against the file.
//!
//! Two workloads, each with its own baseline on the raw file:
//! - **full**: every page in order (a restore that reads all memory). Compared: images (zstd and
//!   lz4 with BLAKE3 page hashes, and lz4 with XXH3-128 ones; the size of each against the
//!   issue's bound, raw × unique-page fraction × 1.1), and the
//!   remote page server on loopback (`faultline export` + `serve --remote`, on demand and with
//!   the background stream).
//! - **working set**: only a working set (`--working-set-pct`, default 25%: clusters of 16 pages
//!   in a shuffled first-touch order), as a resuming VM touches it. Compared: the raw file in an
//!   S3-compatible store (`--object-endpoint`, `--object-bucket`), cold, with the working set
//!   prefetched from the moment the session starts (time until the working set is touched), and
//!   with the working set prefetched ahead into the local cache (time of the prefetch reported
//!   on its own).
//!
//! Repetitions interleave the variants, so that a change in the machine's load affects them
//! alike; the best of each is compared.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use faultline::image::{pack, Codec, HashAlg, PackOptions, PackStats};
use faultline::object_upload::put_object;
use faultline::remote::RemoteStats;
use faultline::source::{MmapSource, PageSource, S3Config};
use serde::Serialize;

use super::args::BenchArgs;

mod restore;

use self::restore::{cpu_time, image_label, measure, working_set, Ctx, Variant, PAGE};

/// One measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRow {
    /// Variant.
    pub name: String,
    /// Workload: "full" or "working set".
    pub workload: &'static str,
    /// Restore time of each repetition (ms): session start to the last page touched.
    pub restore_ms: Vec<f64>,
    /// CPU time this process used in each repetition's restore (ms, all threads: touchers, fault
    /// server, source, and the exporter of the remote rows).
    pub cpu_ms: Vec<f64>,
    /// Best throughput over the pages touched (MiB/s).
    pub mib_s: f64,
    /// What the source did in the best run, in words.
    pub detail: Option<String>,
    /// The remote source's counters of the best run (remote variants).
    pub remote: Option<RemoteStats>,
}

/// The smallest of `v` (infinity when empty).
fn least(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl SourceRow {
    fn best_ms(&self) -> f64 {
        least(&self.restore_ms)
    }
    fn min_cpu_ms(&self) -> f64 {
        least(&self.cpu_ms)
    }
    fn median_ms(&self) -> f64 {
        let mut v = self.restore_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// An image packed for the run.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    /// Codec.
    pub codec: &'static str,
    /// Page hash.
    pub hash: &'static str,
    /// Its name in the report ([`image_label`]).
    pub label: String,
    /// Raw bytes.
    pub raw_bytes: u64,
    /// Image bytes.
    pub image_bytes: u64,
    /// Zero, duplicate and unique (stored) pages.
    pub zero_pages: u64,
    /// Duplicates.
    pub duplicate_pages: u64,
    /// Distinct stored pages.
    pub unique_pages: u64,
    /// The bound: raw × unique fraction × 1.1.
    pub bound_bytes: u64,
    /// Pack throughput (MiB/s).
    pub pack_mib_s: f64,
}

/// A ratio against its target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured ratio.
    pub ratio: f64,
    /// The target, in words.
    pub target: String,
    /// Whether it is met.
    pub met: bool,
    /// Why a row is shown for comparison only, not held to the target (a variant other than
    /// the one the target is for); `None` for a target.
    pub comparison: Option<&'static str>,
}

impl Target {
    fn at_most(name: String, ratio: f64, bound: f64) -> Target {
        Target {
            name,
            ratio,
            target: format!("≤ {bound:.2}"),
            met: ratio <= bound,
            comparison: None,
        }
    }

    fn at_least(name: String, ratio: f64, bound: f64) -> Target {
        Target {
            name,
            ratio,
            target: format!("≥ {bound:.2}"),
            met: ratio >= bound,
            comparison: None,
        }
    }

    /// Shown beside the target, not held to it, for `why`.
    fn for_comparison(mut self, why: &'static str) -> Target {
        self.comparison = Some(why);
        self
    }
}

/// The report.
#[derive(Debug, Serialize)]
pub struct SourcesReport {
    /// Region size (bytes).
    pub size: u64,
    /// Touching threads.
    pub threads: usize,
    /// Pages in the working set.
    pub working_set_pages: usize,
    /// Images packed.
    pub images: Vec<ImageRow>,
    /// Rows.
    pub rows: Vec<SourceRow>,
    /// Ratios against the targets.
    pub targets: Vec<Target>,
    /// Plain loopback TCP throughput measured in the same run (one connection, 1 MiB writes,
    /// MiB/s): the ceiling for bytes that do travel (zero pages do not).
    pub tcp_mib_s: f64,
    /// CPU time of plain loopback TCP per MiB moved (ms), both ends.
    pub tcp_cpu_ms_per_mib: f64,
    /// For each remote row, the fastest a restore could be on this host by CPU alone (ms): the
    /// raw-file restore's CPU time plus plain loopback TCP's for the bytes that travelled, over
    /// the CPUs, and the ratio to the raw file that allows.
    pub remote_cpu_bounds: Vec<(String, f64, f64)>,
    /// Why rows were left out.
    pub skipped: Vec<String>,
}

/// Plain loopback TCP: one connection, `total` bytes in 1 MiB writes; MiB/s, and CPU ms per MiB
/// (both ends).
fn tcp_ceiling(total: u64) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        let buf = vec![0x5au8; 1 << 20];
        let mut sent = 0u64;
        while sent < total {
            c.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let cpu_start = cpu_time();
    let mut got = 0u64;
    while got < total {
        match c.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    let took = start.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP writer panicked"))??;
    let cpu = cpu_time().saturating_sub(cpu_start);
    let mib = (got >> 20).max(1) as f64;
    Ok((mib / took.as_secs_f64(), cpu.as_secs_f64() * 1e3 / mib))
}

fn pack_image(raw: &Path, out: &Path, codec: Codec, hash: HashAlg) -> Result<PackStats> {
    let opts = PackOptions {
        codec,
        hash,
        ..PackOptions::default()
    };
    let input = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?,
    );
    let output =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(pack(input, output, &opts, |_| {})?)
}

/// Upload the snapshot file and its image to the store given on the command line.
fn upload(
    args: &BenchArgs,
    raw: &Path,
    image: &Path,
) -> Result<Option<(String, String, S3Config)>> {
    let (Some(endpoint), Some(bucket)) = (&args.object_endpoint, &args.object_bucket) else {
        return Ok(None);
    };
    let s3 = S3Config {
        endpoint: Some(endpoint.clone()),
        ..S3Config::default()
    };
    let prefix = format!("s3://{bucket}/faultline-bench/{}", std::process::id());
    let mut urls = Vec::new();
    for (path, name) in [(raw, "snapshot.mem"), (image, "snapshot.img")] {
        let url = format!("{prefix}/{name}");
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        eprintln!("uploading {} MiB to {url} ...", bytes.len() >> 20);
        put_object(&url, &s3, bytes.into()).with_context(|| format!("uploading to {url}"))?;
        urls.push(url);
    }
    let image_url = urls.pop().unwrap_or_default();
    let raw_url = urls.pop().unwrap_or_default();
    Ok(Some((raw_url, image_url, s3)))
}

/// Run the comparison and print it.
pub fn run(args: &BenchArgs) -> Result<SourcesReport> {
    crate::logging::init_logging_at(crate::logging::LogFormat::Text, "warn");
    ensure!(
        args.page_size == 4096,
        "--sources and --remote measure 4 KiB pages only"
    );
    let size = (args.size_mib.max(1) << 20).next_multiple_of(PAGE as u64);
    let tmp = tempfile::Builder::new()
        .prefix("faultline-bench-sources")
        .tempdir()?;
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            let p = tmp.path().join("snapshot.mem");
            eprintln!("generating a {} MiB snapshot file ...", size >> 20);
            crate::demo::write_snapshot(&p, size)?;
            p
        }
    };
    let file = Arc::new(open(&path)?);
    ensure!(
        file.len() >= size,
        "{} is smaller than --size-mib",
        path.display()
    );
    let mut skipped = Vec::new();
    let mut images = Vec::new();
    let mut image_paths = Vec::new();
    let mut object = None;
    let mut variants = vec![Variant::Local];
    if args.sources {
        // XXH3-128 (the default) with both codecs; BLAKE3 (the page hash the image id can vouch
        // for) with the default codec.
        for (codec, hash) in [
            (Codec::Zstd, HashAlg::Xxh3),
            (Codec::Lz4, HashAlg::Xxh3),
            (Codec::Zstd, HashAlg::Blake3),
        ] {
            let label = image_label(codec, hash);
            let out = tmp
                .path()
                .join(format!("snapshot.{}.{}.img", codec.name(), hash.name()));
            eprintln!("packing an image ({label}) ...");
            let st = pack_image(&path, &out, codec, hash)?;
            // raw bytes × unique / all pages × 1.1, in integers.
            let bound = u128::from(st.raw_bytes) * u128::from(st.unique_pages) * 11
                / (u128::from(st.pages.max(1)) * 10);
            let bound = u64::try_from(bound).unwrap_or(u64::MAX);
            images.push(ImageRow {
                codec: codec.name(),
                hash: hash.name(),
                label,
                raw_bytes: st.raw_bytes,
                image_bytes: st.image_bytes,
                zero_pages: st.zero_pages,
                duplicate_pages: st.duplicate_pages,
                unique_pages: st.unique_pages,
                bound_bytes: bound,
                pack_mib_s: st.throughput() / f64::from(1 << 20),
            });
            image_paths.push(((codec, hash), out));
            variants.push(Variant::Image(codec, hash));
        }
    }
    variants.extend([Variant::Demand, Variant::Stream]);
    if args.sources {
        variants.push(Variant::LocalWs);
        let zstd_image = &image_paths
            .iter()
            .find(|(c, _)| *c == (Codec::Zstd, HashAlg::Xxh3))
            .context("the zstd image was packed")?
            .1;
        match upload(args, &path, zstd_image)? {
            Some(o) => {
                object = Some(o);
                variants.extend([
                    Variant::ObjectCold,
                    Variant::ObjectWarm,
                    Variant::ObjectImageCold,
                    Variant::ObjectImageWarm,
                ]);
            }
            None => skipped.push(
                "S3 rows: no --object-endpoint/--object-bucket given (see the README for a local S3 server)"
                    .to_string(),
            ),
        }
    }
    let ctx = Ctx {
        args,
        file,
        size,
        ws: working_set(
            usize::try_from(size).context("the snapshot's size")? / PAGE,
            args.working_set_pct.unwrap_or(25),
        ),
        images: image_paths,
        object,
    };
    let mut rows: Vec<SourceRow> = variants
        .iter()
        .map(|v| SourceRow {
            name: v.name(),
            workload: if v.working_set() {
                "working set"
            } else {
                "full"
            },
            restore_ms: Vec::new(),
            cpu_ms: Vec::new(),
            mib_s: 0.0,
            detail: None,
            remote: None,
        })
        .collect();
    for _ in 0..args.repeat.max(1) {
        for (v, row) in variants.iter().zip(rows.iter_mut()) {
            let (took, cpu, detail, remote) =
                measure(*v, &ctx).with_context(|| format!("measuring {}", v.name()))?;
            let bytes = if v.working_set() {
                (ctx.ws.len() * PAGE) as u64
            } else {
                size
            };
            let mib_s = bytes as f64 / f64::from(1 << 20) / took.as_secs_f64();
            if mib_s > row.mib_s {
                row.mib_s = mib_s;
                row.detail = detail;
                row.remote = remote;
            }
            row.restore_ms.push(took.as_secs_f64() * 1e3);
            row.cpu_ms.push(cpu.as_secs_f64() * 1e3);
            eprintln!("  {:<48} {:>9.1} ms", row.name, took.as_secs_f64() * 1e3);
        }
    }
    let (tcp_mib_s, tcp_cpu_ms_per_mib) = tcp_ceiling(size.min(1 << 30))?;
    let targets = targets(&variants, &rows, &images);
    let remote_cpu_bounds = remote_cpu_bounds(&variants, &rows, tcp_cpu_ms_per_mib);
    let report = SourcesReport {
        size,
        threads: args.threads.max(1),
        working_set_pages: ctx.ws.len(),
        images,
        rows,
        targets,
        tcp_mib_s,
        tcp_cpu_ms_per_mib,
        remote_cpu_bounds,
        skipped,
    };
    print(&report);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// The CPU bound of each remote row (see [`SourcesReport::remote_cpu_bounds`]): on a host whose
/// CPUs are all busy during the raw-file restore, the remote restore must also pay for moving
/// its bytes through loopback TCP, and cannot finish before that CPU work is done.
fn remote_cpu_bounds(
    variants: &[Variant],
    rows: &[SourceRow],
    tcp_cpu_ms_per_mib: f64,
) -> Vec<(String, f64, f64)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let Some(local) = variants
        .iter()
        .position(|v| *v == Variant::Local)
        .map(|i| &rows[i])
    else {
        return Vec::new();
    };
    variants
        .iter()
        .zip(rows)
        .filter(|(v, _)| matches!(v, Variant::Demand | Variant::Stream))
        .filter_map(|(_, r)| {
            let s = r.remote.as_ref()?;
            // Payload bytes (kept pages included; zero pages and copies have none).
            let mib = s.bytes_received as f64 / f64::from(1 << 20);
            let bound = (local.min_cpu_ms() + tcp_cpu_ms_per_mib * mib) / cpus;
            Some((
                r.name.clone(),
                bound,
                local.best_ms() / bound.max(local.best_ms()),
            ))
        })
        .collect()
}

fn targets(variants: &[Variant], rows: &[SourceRow], images: &[ImageRow]) -> Vec<Target> {
    let row = |v: Variant| variants.iter().position(|x| *x == v).map(|i| &rows[i]);
    let mut t = Vec::new();
    for i in images {
        t.push(Target::at_most(
            format!("image size ({}) / (raw × unique fraction × 1.1)", i.label),
            i.image_bytes as f64 / i.bound_bytes as f64,
            1.0,
        ));
    }
    let local = row(Variant::Local).map(SourceRow::best_ms);
    for v in variants {
        let (Some(r), Some(local)) = (row(*v), local) else {
            continue;
        };
        match v {
            Variant::Image(_, hash) => {
                let target = Target::at_most(
                    format!("{} restore time / raw file", r.name),
                    r.best_ms() / local,
                    1.3,
                );
                t.push(match hash {
                    HashAlg::Xxh3 => target,
                    _ => target.for_comparison("the target is for the default page hash, XXH3-128"),
                });
            }
            Variant::Demand | Variant::Stream => {
                let target = Target::at_least(
                    format!("{} throughput / raw file", r.name),
                    local / r.best_ms(),
                    0.5,
                );
                t.push(match v {
                    Variant::Stream => target,
                    _ => target.for_comparison(
                        "without the background stream every page waits for a round trip; the target is for the streamed restore",
                    ),
                });
            }
            _ => {}
        }
    }
    let local_ws = row(Variant::LocalWs).map(SourceRow::best_ms);
    for v in [
        Variant::ObjectCold,
        Variant::ObjectWarm,
        Variant::ObjectImageCold,
        Variant::ObjectImageWarm,
    ] {
        if let (Some(r), Some(base)) = (row(v), local_ws) {
            let target = Target::at_most(
                format!("{} / raw file, working set", r.name),
                r.best_ms() / base,
                2.0,
            );
            t.push(match v {
                Variant::ObjectWarm | Variant::ObjectImageWarm => target,
                _ => target.for_comparison(
                    "the working set is still being fetched while it is touched; the target is for it prefetched ahead",
                ),
            });
        }
    }
    t
}

fn open(path: &Path) -> Result<MmapSource> {
    MmapSource::options()
        .populate(true)
        .open(path)
        .with_context(|| format!("mapping {}", path.display()))?
        .with_zero_scan()
        .with_context(|| format!("scanning {} for zero pages", path.display()))
}

fn print(r: &SourcesReport) {
    println!(
        "restore of {} MiB ({} working-set pages), {} touching thread(s), every touched byte verified",
        r.size >> 20,
        r.working_set_pages,
        r.threads
    );
    for i in &r.images {
        println!(
            "image ({}): {} MiB of {} MiB raw ({} zero, {} duplicate, {} unique pages; bound {} MiB), packed at {:.0} MiB/s",
            i.label,
            i.image_bytes >> 20,
            i.raw_bytes >> 20,
            i.zero_pages,
            i.duplicate_pages,
            i.unique_pages,
            i.bound_bytes >> 20,
            i.pack_mib_s
        );
    }
    println!(
        "{:<48} {:>12} {:>10} {:>10} {:>9} {:>10}",
        "variant", "workload", "best ms", "median ms", "MiB/s", "min CPU ms"
    );
    for row in &r.rows {
        println!(
            "{:<48} {:>12} {:>10.1} {:>10.1} {:>9.0} {:>10.1}",
            row.name,
            row.workload,
            row.best_ms(),
            row.median_ms(),
            row.mib_s,
            row.min_cpu_ms()
        );
        if let Some(d) = &row.detail {
            println!("    {d}");
        }
        if let Some(s) = &row.remote {
            println!(
                "    requests: {} demand, {} background; {} MiB received, {} MiB as zero, {} MiB as copies of {} kept pages, {} pages received again; {} reads from the cache of {}",
                s.demand_requests,
                s.background_requests,
                s.bytes_received >> 20,
                s.zero_bytes_received >> 20,
                s.same_bytes_received >> 20,
                s.kept_pages,
                s.duplicate_pages,
                s.reads_from_cache,
                s.reads
            );
        }
    }
    println!(
        "{:<48} {:>12} {:>10} {:>10} {:>9.0}   (bytes on the wire; zero pages do not travel)",
        "plain loopback TCP, 1 MiB writes", "", "", "", r.tcp_mib_s
    );
    println!(
        "plain loopback TCP CPU time, both ends: {:.2} ms per MiB",
        r.tcp_cpu_ms_per_mib
    );
    for (name, bound, ratio) in &r.remote_cpu_bounds {
        println!(
            "{name}: CPU bound on this host {bound:.1} ms (the raw restore's CPU + loopback TCP's for the bytes that travelled, over the CPUs): throughput / raw file at most {ratio:.2}"
        );
    }
    for t in &r.targets {
        match t.comparison {
            None => println!(
                "{}: {:.2} (target {}) {}",
                t.name,
                t.ratio,
                t.target,
                if t.met { "met" } else { "NOT met" }
            ),
            Some(why) => println!(
                "{}: {:.2} (for comparison, not held to {}: {why})",
                t.name, t.ratio, t.target
            ),
        }
    }
    for s in &r.skipped {
        println!("skipped: {s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, best_ms: f64, cpu_ms: f64, remote: Option<RemoteStats>) -> SourceRow {
        SourceRow {
            name: name.into(),
            workload: "full",
            restore_ms: vec![best_ms + 5.0, best_ms],
            cpu_ms: vec![cpu_ms, cpu_ms + 7.0],
            mib_s: 0.0,
            detail: None,
            remote,
        }
    }

    #[test]
    fn the_remote_cpu_bound_adds_the_bytes_moved_to_the_raw_restores_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let remote = RemoteStats {
            bytes_received: 100 << 20,
            zero_bytes_received: 50 << 20,
            same_bytes_received: 30 << 20,
            ..RemoteStats::default()
        };
        let variants = [
            Variant::Local,
            Variant::Image(Codec::Lz4, HashAlg::Xxh3),
            Variant::Stream,
        ];
        let rows = [
            row("raw", 40.0, 80.0, None),
            row("image", 50.0, 90.0, None),
            row("stream", 150.0, 300.0, Some(remote)),
        ];
        let b = remote_cpu_bounds(&variants, &rows, 0.5);
        assert_eq!(b.len(), 1);
        let (name, ms, ratio) = &b[0];
        assert_eq!(name, "stream");
        // Min CPU of the raw restore (80) + 0.5 ms for each of the 100 MiB of payload.
        let want = (80.0 + 50.0) / cpus;
        assert!((ms - want).abs() < 1e-9, "{ms} vs {want}");
        assert!((ratio - 40.0 / want.max(40.0)).abs() < 1e-9, "{ratio}");
        // Without a raw row there is nothing to bound against.
        assert!(remote_cpu_bounds(&variants[1..], &rows[1..], 0.5).is_empty());
    }
}
