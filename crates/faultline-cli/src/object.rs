//! `faultline serve --object-url s3://bucket/key` (a raw memory file in an S3-compatible store)
//! and `faultline serve --image s3://bucket/key` (an image there): the `--object-*` and
//! `--cache-*` flags, and opening the source they describe.
//!
//! Credentials come from the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; also `AWS_ENDPOINT`, `AWS_REGION`), never from
//! the command line, where other users could read them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use faultline::image::{Image, ImageSource, RangeRead};
use faultline::source::{ObjectSource, ObjectSourceOptions, PageSource, S3Config};
use faultline::WorkingSet;

/// The object-store flags of `faultline serve`.
#[derive(Debug, Clone, Args)]
pub struct ObjectFlags {
    /// Serve a raw memory file stored in an S3-compatible object store (`s3://bucket/key`),
    /// read in blocks with ranged GETs through a local cache (instead of --mem-file). For an
    /// image in a store, give its URL to --image.
    #[arg(long, value_name = "URL", conflicts_with_all = ["mem_file", "image", "remote"])]
    pub object_url: Option<String>,
    /// The store's endpoint, e.g. http://127.0.0.1:9000 for a local S3-compatible server
    /// (default: AWS_ENDPOINT, else AWS itself). Plain http is allowed when the endpoint says so.
    #[arg(long, value_name = "URL")]
    pub object_endpoint: Option<String>,
    /// The store's region (default: AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub object_region: Option<String>,
    /// Keep fetched blocks in DIR (kept across restarts: a restarted worker or the next restore
    /// finds them warm). Default: a private temporary directory removed at exit.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most MiB the cache keeps on disk (least recently used blocks are evicted).
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub cache_mib: u64,
    /// KiB per ranged GET and cache block (a multiple of 4).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    pub object_block_kib: u64,
    /// Most GETs in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub object_parallel: usize,
}

impl Default for ObjectFlags {
    fn default() -> Self {
        ObjectFlags {
            object_url: None,
            object_endpoint: None,
            object_region: None,
            cache_dir: None,
            cache_mib: 1024,
            object_block_kib: 1024,
            object_parallel: 8,
        }
    }
}

/// Whether `s` names an object in a store rather than a local file.
pub fn is_url(s: &str) -> bool {
    s.starts_with("s3://") || s.starts_with("s3a://")
}

/// `path` as an object URL, if it is one.
pub fn url_of(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| is_url(s))
}

impl ObjectFlags {
    /// The same flags on a command line (for the supervised worker); the URL is passed on only
    /// when set.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(u) = &self.object_url {
            v.extend(["--object-url".to_string(), u.clone()]);
        }
        if let Some(e) = &self.object_endpoint {
            v.extend(["--object-endpoint".to_string(), e.clone()]);
        }
        if let Some(r) = &self.object_region {
            v.extend(["--object-region".to_string(), r.clone()]);
        }
        if let Some(d) = &self.cache_dir {
            v.extend(["--cache-dir".to_string(), d.display().to_string()]);
        }
        v.extend([
            "--cache-mib".to_string(),
            self.cache_mib.to_string(),
            "--object-block-kib".to_string(),
            self.object_block_kib.to_string(),
            "--object-parallel".to_string(),
            self.object_parallel.to_string(),
        ]);
        v
    }

    /// Open the object at `url`: one HEAD request, and the cache directory.
    pub fn open(&self, url: &str) -> Result<Arc<ObjectSource>> {
        let Some(block_size) = self
            .object_block_kib
            .checked_mul(1024)
            .filter(|b| *b > 0 && b % 4096 == 0)
        else {
            bail!(
                "--object-block-kib {} is not a positive multiple of 4",
                self.object_block_kib
            );
        };
        let s3 = S3Config {
            endpoint: self.object_endpoint.clone(),
            region: self.object_region.clone(),
            ..S3Config::default()
        };
        let opts = ObjectSourceOptions {
            block_size,
            max_parallel: self.object_parallel.max(1),
            cache_dir: self.cache_dir.clone(),
            cache_bytes: self.cache_mib.saturating_mul(1 << 20),
            ..ObjectSourceOptions::default()
        };
        let src =
            ObjectSource::open_url(url, &s3, opts).with_context(|| format!("opening {url}"))?;
        tracing::info!(object = url, len = PageSource::len(&src), block_kib = self.object_block_kib, cache = %src.cache_dir().display(), "object opened");
        Ok(Arc::new(src))
    }
}

/// `--object-url`: the raw memory in the store. With a working set, its blocks are fetched in the
/// background, in first-touch order and in parallel, ahead of the faults that need them.
pub fn open_memory(
    flags: &ObjectFlags,
    url: &str,
    prefetch_ws: Option<&Path>,
) -> Result<Arc<dyn PageSource>> {
    let src = flags.open(url)?;
    if let Some(p) = prefetch_ws {
        prefetch_detached(&src, p, |offsets| offsets)?;
    }
    Ok(src)
}

/// Fetch the store offsets that `to_store` makes of the working set at `path` (source offsets,
/// first touch first) in the background. Detached: it ends when they are cached (or have
/// failed); the source lives while the thread holds it.
fn prefetch_detached(
    obj: &Arc<ObjectSource>,
    path: &Path,
    to_store: impl FnOnce(Vec<u64>) -> Vec<u64>,
) -> Result<()> {
    let ws = WorkingSet::load(path)
        .with_context(|| format!("reading the working set {}", path.display()))?;
    drop(
        obj.prefetch_in_background(to_store(ws.offsets))
            .context("starting the working-set prefetch")?,
    );
    Ok(())
}

/// `--image s3://...`: a full image in the store, its header and tables read through the cache.
/// With a working set, the chunks holding its pages are fetched in the background, in
/// first-touch order and in parallel, ahead of the faults that need them. With `expect_id`, the
/// image must be the one it names ([`ImageSource::check_id`]).
pub fn open_image(
    flags: &ObjectFlags,
    url: &str,
    prefetch_ws: Option<&Path>,
    expect_id: Option<&[u8; 32]>,
) -> Result<Arc<dyn PageSource>> {
    let obj = flags.open(url)?;
    let image = Image::from_reader(Arc::clone(&obj) as Arc<dyn RangeRead>)
        .with_context(|| format!("reading the image {url}"))?;
    let src = ImageSource::new(image).with_context(|| {
        format!("{url}: diffs in an object store are not supported yet; serve a full image")
    })?;
    if let Some(id) = expect_id {
        src.check_id(id)?;
    }
    if let Some(p) = prefetch_ws {
        prefetch_detached(&obj, p, |offsets| {
            obj.offsets_of_ranges(&src.working_set_ranges(&offsets))
        })?;
    }
    Ok(Arc::new(src))
}

/// The length of the raw memory at `url` (one HEAD; no prefetch).
pub fn object_len(flags: &ObjectFlags, url: &str) -> Result<u64> {
    Ok(PageSource::len(&*flags.open(url)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://b/k"));
        assert!(is_url("s3a://b/k"));
        assert!(!is_url("/var/snap/mem"));
        assert!(!is_url("s3:/b/k"));
        assert_eq!(url_of(Path::new("s3://b/k.img")), Some("s3://b/k.img"));
        assert_eq!(url_of(Path::new("k.img")), None);
    }

    #[test]
    fn flags_round_trip_to_the_worker_command_line() {
        let f = ObjectFlags {
            object_url: Some("s3://b/k".into()),
            object_endpoint: Some("http://127.0.0.1:9".into()),
            cache_dir: Some("/tmp/c".into()),
            cache_mib: 7,
            ..ObjectFlags::default()
        };
        let a = f.to_args();
        let at = |flag: &str| a.iter().position(|x| x == flag).map(|i| a[i + 1].as_str());
        assert_eq!(at("--object-url"), Some("s3://b/k"));
        assert_eq!(at("--object-endpoint"), Some("http://127.0.0.1:9"));
        assert_eq!(at("--cache-dir"), Some("/tmp/c"));
        assert_eq!(at("--cache-mib"), Some("7"));
        assert_eq!(at("--object-region"), None);
        assert_eq!(at("--object-block-kib"), Some("1024"));
    }

    #[test]
    fn a_block_size_not_a_multiple_of_four_kib_is_refused() {
        let f = ObjectFlags {
            object_block_kib: 6,
            ..ObjectFlags::default()
        };
        let e = f.open("s3://b/k").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("multiple of 4")),
            "{e:?}"
        );
    }
}
