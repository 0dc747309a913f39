//! `faultline image`: pack a raw memory file into an image, inspect, verify, unpack, diff.
//!
//! Every command that writes a file writes `<output>.partial` first, syncs it and renames it
//! into place, so an interrupted run never leaves something that looks like a finished file.
//! `pack` and `diff` print a table (or `--json`) of what was stored; `verify` exits non-zero
//! naming the first bad page.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use faultline::image::{
    hex, pack, pack_diff, Codec, HashAlg, Image, ImageSource, PackOptions, PackStats, VerifyReport,
};
use faultline::PageSource;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// `faultline image` flags.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pack a raw memory file into an image: zero pages elided, identical pages stored once,
    /// chunks compressed, every page hashed.
    Pack(PackArgs),
    /// Print an image's header, page counts and layers.
    Inspect(InspectArgs),
    /// Read every chunk of an image (and of its bases) and check every page's hash; exits
    /// non-zero naming the first bad page.
    Verify(InspectArgs),
    /// Write the raw memory an image holds (zero pages become holes).
    Unpack(UnpackArgs),
    /// Pack NEW (a raw memory file) as a diff over the image BASE: only pages that differ are
    /// stored.
    Diff(DiffArgs),
}

/// Chunk codec flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CodecFlag {
    /// zstd (best ratio).
    Zstd,
    /// LZ4 (fastest to decompress).
    Lz4,
    /// No compression (zero and duplicate pages are still elided).
    None,
}

impl From<CodecFlag> for Codec {
    fn from(c: CodecFlag) -> Codec {
        match c {
            CodecFlag::Zstd => Codec::Zstd,
            CodecFlag::Lz4 => Codec::Lz4,
            CodecFlag::None => Codec::None,
        }
    }
}

/// Page hash flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HashFlag {
    /// BLAKE3 (cryptographic: the image id commits to every page, for images from storage the
    /// host does not trust, whose id it checks).
    Blake3,
    /// XXH3-128 (the default): about 4x cheaper to check on restore; catches corruption as
    /// surely, not tampering.
    Xxh3,
}

impl From<HashFlag> for HashAlg {
    fn from(h: HashFlag) -> HashAlg {
        match h {
            HashFlag::Blake3 => HashAlg::Blake3,
            HashFlag::Xxh3 => HashAlg::Xxh3,
        }
    }
}

#[derive(Debug, Args)]
struct PackFlags {
    /// Chunk compression.
    #[arg(long, value_enum, default_value_t = CodecFlag::Zstd)]
    codec: CodecFlag,
    /// zstd compression level (-7..=22; default 3). Only with `--codec zstd`.
    #[arg(long, allow_negative_numbers = true)]
    level: Option<i32>,
    /// Pages per chunk: the unit of compression and of reading.
    #[arg(long, default_value_t = 32)]
    chunk_pages: u32,
    /// The hash every page is checked against before it is served.
    #[arg(long, value_enum, default_value_t = HashFlag::Xxh3)]
    hash: HashFlag,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl PackFlags {
    fn options(&self, page_size: u32) -> Result<PackOptions> {
        if self.level.is_some() && self.codec != CodecFlag::Zstd {
            bail!("--level applies to --codec zstd only");
        }
        let opts = PackOptions {
            codec: self.codec.into(),
            level: self.level.unwrap_or(3),
            chunk_pages: self.chunk_pages,
            page_size,
            hash: self.hash.into(),
        };
        opts.validate()?;
        Ok(opts)
    }
}

#[derive(Debug, Args)]
struct PackArgs {
    /// The raw memory file.
    raw: PathBuf,
    /// The image to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Page size of the memory (4096, or 2097152 for a hugetlb guest).
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    #[command(flatten)]
    flags: PackFlags,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The image.
    image: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct UnpackArgs {
    /// The image (a diff is unpacked over its base).
    image: PathBuf,
    /// The raw memory file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// The base image.
    base: PathBuf,
    /// The new raw memory file.
    new: PathBuf,
    /// The diff image to write.
    #[arg(short, long)]
    output: PathBuf,
    /// The base's name recorded in the diff, used to find the base when the diff is opened
    /// (relative to the diff's directory unless absolute). Default: BASE's file name when both
    /// are in one directory, else BASE's absolute path.
    #[arg(long)]
    base_name: Option<String>,
    #[command(flatten)]
    flags: PackFlags,
}

/// Run `faultline image ...`.
pub fn run(args: ImageArgs) -> Result<()> {
    match args.command {
        ImageCommand::Pack(a) => run_pack(a),
        ImageCommand::Inspect(a) => inspect(&a),
        ImageCommand::Verify(a) => verify(&a),
        ImageCommand::Unpack(a) => unpack(&a),
        ImageCommand::Diff(a) => diff(a),
    }
}

fn bar(len: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    // Drawn on stderr when it is a terminal, hidden otherwise.
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// The temporary path an output is written to before it is renamed into place.
fn partial(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Sync `file` (written at `tmp`) and rename it to `output`.
fn commit(file: File, tmp: &Path, output: &Path) -> Result<()> {
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(tmp, output)
        .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))
}

/// Write an image to `output` (through a `.partial` file) with `write`.
fn write_image(
    output: &Path,
    write: impl FnOnce(&mut File) -> Result<PackStats>,
) -> Result<PackStats> {
    let tmp = partial(output);
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    match write(&mut file) {
        Ok(stats) => {
            commit(file, &tmp, output)?;
            Ok(stats)
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// A rate in bytes per second, in MiB per second: [`mib`] of its whole bytes.
fn mib_per_s(bytes_per_s: f64) -> f64 {
    bytes_per_s.trunc() / f64::from(1u32 << 20)
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

fn print_stats(s: &PackStats, opts: &PackOptions, json: bool, diff: bool) {
    let ratio = if s.raw_bytes == 0 {
        0.0
    } else {
        s.image_bytes as f64 / s.raw_bytes as f64
    };
    if json {
        let v = json!({
            "raw_bytes": s.raw_bytes,
            "image_bytes": s.image_bytes,
            "ratio": ratio,
            "pages": s.pages,
            "zero_pages": s.zero_pages,
            "duplicate_pages": s.duplicate_pages,
            "unique_pages": s.unique_pages,
            "base_pages": s.base_pages,
            "chunks": s.chunks,
            "raw_chunks": s.raw_chunks,
            "codec": opts.codec.name(),
            "hash": opts.hash.name(),
            "seconds": s.elapsed.as_secs_f64(),
            "throughput_mib_s": mib_per_s(s.throughput()),
            "image_id": hex(&s.image_id),
        });
        println!("{v}");
        return;
    }
    let codec = match opts.codec {
        Codec::Zstd => format!("zstd level {}", opts.level),
        c => c.name().to_string(),
    };
    let rows: Vec<(&str, String)> = [
        (
            "raw size",
            format!("{} bytes ({:.1} MiB)", s.raw_bytes, mib(s.raw_bytes)),
        ),
        (
            "image size",
            format!(
                "{} bytes ({:.1} MiB, {:.1}% of raw)",
                s.image_bytes,
                mib(s.image_bytes),
                100.0 * ratio
            ),
        ),
        ("pages", s.pages.to_string()),
    ]
    .into_iter()
    .chain(diff.then(|| {
        (
            "  unchanged",
            format!("{} ({:.1}%)", s.base_pages, pct(s.base_pages, s.pages)),
        )
    }))
    .chain([
        (
            "  zero",
            format!("{} ({:.1}%)", s.zero_pages, pct(s.zero_pages, s.pages)),
        ),
        (
            "  duplicate",
            format!(
                "{} ({:.1}%)",
                s.duplicate_pages,
                pct(s.duplicate_pages, s.pages)
            ),
        ),
        (
            "  unique",
            format!("{} ({:.1}%)", s.unique_pages, pct(s.unique_pages, s.pages)),
        ),
        (
            "chunks",
            format!(
                "{} of {} pages, {} stored uncompressed",
                s.chunks, opts.chunk_pages, s.raw_chunks
            ),
        ),
        ("codec", codec),
        ("page hash", opts.hash.name().to_string()),
        (
            "throughput",
            format!(
                "{:.1} MiB/s ({:.3} s)",
                mib_per_s(s.throughput()),
                s.elapsed.as_secs_f64()
            ),
        ),
        ("image id", hex(&s.image_id)),
    ])
    .collect();
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
}

fn run_pack(a: PackArgs) -> Result<()> {
    let opts = a.flags.options(a.page_size)?;
    let raw = File::open(&a.raw).with_context(|| format!("opening {}", a.raw.display()))?;
    let len = raw.metadata()?.len();
    let bar = bar(len, a.flags.quiet, "packing");
    let stats = write_image(&a.output, |out| {
        pack(BufReader::with_capacity(1 << 20, raw), out, &opts, |n| {
            bar.set_position(n)
        })
        .with_context(|| format!("packing {} into {}", a.raw.display(), a.output.display()))
    })?;
    bar.finish_and_clear();
    print_stats(&stats, &opts, a.flags.json, false);
    Ok(())
}

fn diff(a: DiffArgs) -> Result<()> {
    let base = ImageSource::open(&a.base)
        .with_context(|| format!("opening the base image {}", a.base.display()))?;
    let opts = a.flags.options(base.image().page_size())?;
    let name = match a.base_name.clone() {
        Some(n) => n,
        None => default_base_name(&a.base, &a.output)?,
    };
    let raw = File::open(&a.new).with_context(|| format!("opening {}", a.new.display()))?;
    let len = raw.metadata()?.len();
    let bar = bar(len, a.flags.quiet, "diffing");
    let stats = write_image(&a.output, |out| {
        pack_diff(
            &base,
            BufReader::with_capacity(1 << 20, raw),
            out,
            &opts,
            Some(name),
            |n| bar.set_position(n),
        )
        .with_context(|| format!("writing the diff {}", a.output.display()))
    })?;
    bar.finish_and_clear();
    print_stats(&stats, &opts, a.flags.json, true);
    Ok(())
}

/// BASE's file name when BASE and DIFF share a directory, else BASE's absolute path.
fn default_base_name(base: &Path, diff: &Path) -> Result<String> {
    let base_abs =
        std::fs::canonicalize(base).with_context(|| format!("resolving {}", base.display()))?;
    let diff_dir = match diff.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let same_dir = std::fs::canonicalize(&diff_dir)
        .map(|d| Some(d.as_path()) == base_abs.parent())
        .unwrap_or(false);
    let name = if same_dir {
        base_abs.file_name().map(PathBuf::from).unwrap_or(base_abs)
    } else {
        base_abs
    };
    name.to_str()
        .map(str::to_string)
        .context("the base's path is not UTF-8: give --base-name")
}

/// One layer's description.
fn describe(image: &Image) -> serde_json::Value {
    let h = image.header();
    let c = image.page_counts();
    let stored: u64 = image.chunks().iter().map(|c| u64::from(c.stored_len)).sum();
    let raw_chunks = image.chunks().iter().filter(|c| c.is_raw()).count();
    json!({
        "path": image.name(),
        "id": hex(&image.id()),
        "version": h.version,
        "page_size": h.page_size,
        "source_len": h.source_len,
        "pages": h.page_count,
        "zero_pages": c.zero,
        "base_pages": c.base,
        "stored_pages": c.stored,
        "distinct_pages": c.distinct,
        "codec": h.codec.name(),
        "hash": h.hash.name(),
        "chunks": h.chunk_count,
        "chunk_pages": h.chunk_pages,
        "raw_chunks": raw_chunks,
        "data_bytes": stored,
        "image_bytes": image.file_len(),
        "base_id": image.base_id().map(|id| hex(&id)),
        "base_name": image.base_name(),
    })
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let image = Image::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?;
    let mut layers = vec![describe(&image)];
    // The bases, when they can be found (a missing base is reported, not an error).
    let mut base_error = None;
    if image.base_id().is_some() {
        match ImageSource::open(&a.image) {
            Ok(src) => {
                let mut b = src.base().cloned();
                while let Some(s) = b {
                    layers.push(describe(s.image()));
                    b = s.base().cloned();
                }
            }
            Err(e) => base_error = Some(format!("{e:#}")),
        }
    }
    if a.json {
        println!("{}", json!({ "layers": layers, "base_error": base_error }));
        return Ok(());
    }
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            println!("\nbase (layer {i}):");
        }
        let n = |k: &str| l[k].as_u64().unwrap_or(0);
        println!("path           {}", l["path"].as_str().unwrap_or(""));
        println!("id             {}", l["id"].as_str().unwrap_or(""));
        println!(
            "format         version {}, {} page hashes",
            n("version"),
            l["hash"].as_str().unwrap_or("")
        );
        println!(
            "source         {} bytes ({:.1} MiB) in {} pages of {} bytes",
            n("source_len"),
            mib(n("source_len")),
            n("pages"),
            n("page_size")
        );
        println!(
            "pages          {} zero, {} from the base, {} stored ({} distinct)",
            n("zero_pages"),
            n("base_pages"),
            n("stored_pages"),
            n("distinct_pages")
        );
        println!(
            "chunks         {} x up to {} pages, {}, {} stored uncompressed",
            n("chunks"),
            n("chunk_pages"),
            l["codec"].as_str().unwrap_or(""),
            n("raw_chunks")
        );
        println!(
            "size           {} bytes ({:.1}% of the source; {} bytes of chunk data)",
            n("image_bytes"),
            pct(n("image_bytes"), n("source_len")),
            n("data_bytes")
        );
        if let Some(id) = l["base_id"].as_str() {
            println!(
                "base           {} (id {id})",
                l["base_name"].as_str().unwrap_or("(no name)")
            );
        }
    }
    if let Some(e) = base_error {
        println!("\nbase not opened: {e}");
    }
    Ok(())
}

fn verify(a: &InspectArgs) -> Result<()> {
    let src =
        ImageSource::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?;
    let mut layers: Vec<&ImageSource> = vec![&src];
    while let Some(b) = layers.last().and_then(|s| s.base()) {
        layers.push(b);
    }
    let mut reports: Vec<(String, VerifyReport)> = Vec::new();
    let started = Instant::now();
    for layer in &layers {
        let image = layer.image();
        let bar = bar(image.chunks().len() as u64, a.json, "verifying");
        let r = image.verify(|n| bar.set_position(n));
        bar.finish_and_clear();
        reports.push((image.name().to_string(), r));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bad: Vec<_> = reports.iter().filter(|(_, r)| !r.bad.is_empty()).collect();
    if a.json {
        let v: Vec<_> = reports
            .iter()
            .map(|(name, r)| {
                json!({
                    "path": name,
                    "chunks": r.chunks,
                    "pages_checked": r.pages_checked,
                    "bad": r.bad.iter().map(|(p, why)| json!({"page": p, "why": why})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "layers": v, "ok": bad.is_empty(), "seconds": elapsed })
        );
    } else {
        for (name, r) in &reports {
            println!(
                "{name}: {} chunks, {} stored pages checked, {} bad",
                r.chunks,
                r.pages_checked,
                r.bad.len()
            );
        }
    }
    if let Some((name, r)) = bad.first() {
        let (page, why) = &r.bad[0];
        let total: usize = bad.iter().map(|(_, r)| r.bad.len()).sum();
        match page {
            Some(p) => bail!("{name}: page {p} is bad: {why} ({total} bad pages in all)"),
            None => bail!(
                "{name}: an unreferenced stored page is bad: {why} ({total} bad pages in all)"
            ),
        }
    }
    Ok(())
}

fn unpack(a: &UnpackArgs) -> Result<()> {
    let src = Arc::new(
        ImageSource::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?,
    );
    let len = src.len();
    let ps = u64::from(src.image().page_size());
    let tmp = partial(&a.output);
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        // Zero pages stay holes.
        file.set_len(len)?;
        let bar = bar(len, a.quiet, "unpacking");
        let run = (1u64 << 20).max(ps);
        let mut buf = vec![0u8; usize::try_from(run).context("the image's page size")?];
        let mut pos = 0u64;
        while pos < len {
            // The next run of non-zero pages, up to `run` bytes.
            let page_len = ps.min(len - pos);
            if src.is_zero(pos, page_len) == Some(true) {
                pos += page_len;
                continue;
            }
            let mut end = pos + page_len;
            while end < len && end - pos < run {
                let n = ps.min(len - end);
                if src.is_zero(end, n) == Some(true) {
                    break;
                }
                end += n;
            }
            let b =
                &mut buf[..usize::try_from(end - pos).expect("at most `run`, the buffer's length")];
            src.read_at(pos, b)
                .with_context(|| format!("reading {}", a.image.display()))?;
            file.write_all_at(b, pos)
                .with_context(|| format!("writing {}", tmp.display()))?;
            pos = end;
            bar.set_position(pos);
        }
        bar.finish_and_clear();
        Ok(())
    })();
    match result {
        Ok(()) => {
            commit(file, &tmp, &a.output)?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{}: {} bytes written to {}",
                a.image.display(),
                len,
                a.output.display()
            )?;
            Ok(())
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
