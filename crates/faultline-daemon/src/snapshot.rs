//! Opening what a daemon serves: a memory file, an image (local, or in an object store), raw
//! memory in an object store, or a remote page server; and pinning it for a supervisor.
//!
//! A supervised daemon opens the snapshot once ([`Pinned::open`]) and hands the open files to
//! every worker ([`Handed`]): a worker never reopens by path, so a file renamed over the path, or
//! rewritten in place, is refused rather than served to sessions that started on another.

use std::path::Path;
use std::sync::Arc;

use faultline::image::{Image, ImageSource, RangeRead};
use faultline::source::{MmapSource, ObjectSource, ObjectSourceOptions, PageSource, S3Config};
use faultline::WorkingSet;

use crate::config::{DaemonConfig, ObjectConfig};
use crate::error::{Error, Result};

/// What is served: an image (through its hash-verifying source; a diff over its base), raw
/// memory in an object store, a remote page server, or a memory file (mmapped, zero pages found
/// by a start-up scan unless [`DaemonConfig::zero_scan`] is off).
pub fn open_snapshot(config: &DaemonConfig) -> Result<Arc<dyn PageSource>> {
    open_snapshot_from(config, None)
}

/// memory file, or an image's layers, top first) with their names, and the identity its sessions
/// started on. A worker serves exactly these files, whatever is renamed over their paths later,
/// and only a remote source announcing this id.
#[derive(Debug, Default)]
pub struct Handed {
    /// The open files and their names (for logs), in the order [`Pinned::files`] gives.
    pub files: Vec<(std::fs::File, String)>,
    /// The remote source's id (`--remote`).
    pub remote_id: Option<u64>,
    /// The image's id (`--image`, a local file).
    pub image_id: Option<[u8; 32]>,
    /// The length served when the supervisor opened it: a memory file of another length now
    /// (truncated or extended since) is refused, never served.
    pub len: Option<u64>,
    /// The memory file's modification time (seconds, nanoseconds) when the supervisor opened
    /// it: a file written since (in place: same inode, other bytes) is refused, never served.
    pub modified: Option<(i64, i64)>,
    /// Serve at once and scan the memory file for zero pages in the background (a restarted
    /// worker: the guests of its resumed sessions are running and must not wait for the scan).
    pub background_zero_scan: bool,
}

/// The snapshot as the supervisor opens it, once, at start: see [`Handed`].
#[derive(Debug)]
pub struct Pinned {
    /// The length served (the guest memory size a handshake may use).
    pub len: u64,
    /// The open files handed to every worker (empty for sources that are not local files: an
    /// object store).
    pub files: Vec<(std::fs::File, String)>,
    /// See [`Handed::remote_id`].
    pub remote_id: Option<u64>,
    /// See [`Handed::image_id`].
    pub image_id: Option<[u8; 32]>,
    /// See [`Handed::modified`].
    pub modified: Option<(i64, i64)>,
}

impl Pinned {
    /// Open and validate what `args` serve, and pin its identity.
    pub fn open(config: &DaemonConfig) -> Result<Pinned> {
        check_image_id_flag(config)?;
        let mut pinned = Pinned {
            len: 0,
            files: Vec::new(),
            remote_id: None,
            image_id: None,
            modified: None,
        };
        if let Some(addr) = &config.remote {
            let w = remote_source(addr)?;
            pinned.len = w.source_len;
            pinned.remote_id = Some(w.source_id);
            return Ok(pinned);
        }
        if from_store(config) {
            pinned.len = snapshot_len(config)?;
            return Ok(pinned);
        }
        if let Some(img) = &config.image {
            let layers = ImageSource::open_layer_files(img).map_err(|e| Error::OpenImage {
                path: img.clone(),
                source: Box::new(e),
            })?;
            let readers = layers
                .iter()
                .map(|l| Arc::clone(l) as Arc<dyn RangeRead>)
                .collect();
            let src = ImageSource::from_layers(readers).map_err(|e| Error::OpenImage {
                path: img.clone(),
                source: Box::new(e),
            })?;
            if let Some(id) = &config.image_id {
                check_id(&src, id, &img.display().to_string())?;
            }
            pinned.len = src.len();
            pinned.image_id = Some(src.image().id());
            drop(src);
            for l in layers {
                let name = RangeRead::name(&*l);
                let file = match l.file().try_clone() {
                    Ok(f) => f,
                    Err(source) => return Err(Error::KeepImageOpen { name, source }),
                };
                pinned.files.push((file, name));
            }
            return Ok(pinned);
        }
        let Some(mem) = &config.mem_file else {
            return Err(Error::NothingToServe);
        };
        let open_error = |source| Error::OpenMemFile {
            path: mem.clone(),
            source,
        };
        let file = std::fs::File::open(mem).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        pinned.len = meta.len();
        pinned.modified = Some(modified(&meta));
        pinned.files.push((file, mem.display().to_string()));
        Ok(pinned)
    }
}

/// [`open_snapshot`] from what a supervisor handed over, when it did.
pub fn open_snapshot_from(
    config: &DaemonConfig,
    handed: Option<Handed>,
) -> Result<Arc<dyn PageSource>> {
    check_image_id_flag(config)?;
    if let Some(addr) = &config.remote {
        let expect = handed.as_ref().and_then(|h| h.remote_id);
        return open_remote(addr, &config.remote_options, expect);
    }
    let handed = handed.filter(|h| !h.files.is_empty());
    if let Some(url) = &config.object.url {
        return open_memory(&config.object, url, config.prefetch_ws.as_deref());
    }
    if let Some(url) = config.image.as_deref().and_then(url_of) {
        return open_image(
            &config.object,
            url,
            config.prefetch_ws.as_deref(),
            config.image_id.as_ref(),
        );
    }
    if let Some(img) = &config.image {
        let src = match handed {
            Some(h) => {
                let mut layers: Vec<Arc<dyn RangeRead>> = Vec::new();
                for (file, name) in h.files {
                    let r = match faultline::image::FileRange::from_file(file, &name) {
                        Ok(r) => r,
                        Err(source) => return Err(Error::ReadImageLayer { name, source }),
                    };
                    layers.push(Arc::new(r));
                }
                let src = ImageSource::from_layers(layers).map_err(|e| Error::OpenImage {
                    path: img.clone(),
                    source: Box::new(e),
                })?;
                // The same open file: its header (and so its id) changes only if it was
                // rewritten in place; then it is refused, never served.
                if let Some(id) = &h.image_id {
                    if src.image().id() != *id {
                        return Err(Error::ImageChanged {
                            path: img.clone(),
                            id: src.image().id(),
                            was: *id,
                        });
                    }
                }
                src
            }
            None => ImageSource::open(img).map_err(|e| Error::OpenImage {
                path: img.clone(),
                source: Box::new(e),
            })?,
        };
        if let Some(id) = &config.image_id {
            check_id(&src, id, &img.display().to_string())?;
        }
        return Ok(Arc::new(src));
    }
    let Some(mem) = &config.mem_file else {
        return Err(Error::NothingToServe);
    };
    let (want_len, want_modified) = handed
        .as_ref()
        .map_or((None, None), |h| (h.len, h.modified));
    let background = handed.as_ref().is_some_and(|h| h.background_zero_scan);
    let src = match handed.and_then(|h| h.files.into_iter().next()) {
        Some((file, name)) => {
            let meta = match file.metadata() {
                Ok(m) => m,
                Err(source) => return Err(Error::ReadMemFile { name, source }),
            };
            let now = meta.len();
            if let Some(want) = want_len.filter(|&w| w != now) {
                return Err(Error::MemFileResized { name, now, want });
            }
            if want_modified.is_some_and(|w| w != modified(&meta)) {
                return Err(Error::MemFileWritten { name });
            }
            match MmapSource::options().populate(false).map_file(&file) {
                Ok(src) => src.with_name(name),
                Err(source) => return Err(Error::MapMemFile { name, source }),
            }
        }
        None => MmapSource::options()
            .populate(false)
            .open(mem)
            .map_err(|source| Error::OpenMemFile {
                path: mem.clone(),
                source,
            })?,
    };
    if !config.zero_scan {
        return Ok(Arc::new(src));
    }
    if background {
        return Ok(src.with_background_zero_scan());
    }
    let src = src.with_zero_scan().map_err(|e| Error::ZeroScan {
        path: mem.clone(),
        source: Box::new(e),
    })?;
    Ok(Arc::new(src))
}

/// [`ImageSource::check_id`] of the image named `image` (a path or a URL).
fn check_id(src: &ImageSource, id: &[u8; 32], image: &str) -> Result<()> {
    src.check_id(id).map_err(|e| Error::ImageId {
        image: image.to_string(),
        source: Box::new(e),
    })
}

/// A file's modification time, to the nanosecond.
fn modified(meta: &std::fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), meta.mtime_nsec())
}

/// Whether `args` serve from an object store (`--object-url`, or an `s3://` `--image`).
pub(crate) fn from_store(config: &DaemonConfig) -> bool {
    config.object.url.is_some() || config.image.as_deref().and_then(url_of).is_some()
}

/// `--image-id` names an image: it goes with `--image`; and one snapshot is served.
fn check_image_id_flag(config: &DaemonConfig) -> Result<()> {
    if config.image_id.is_some() && config.image.is_none() {
        return Err(Error::ImageIdWithoutImage);
    }
    let given = [
        config.mem_file.is_some(),
        config.image.is_some(),
        config.remote.is_some(),
        config.object.url.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(Error::SeveralSnapshots);
    }
    Ok(())
}

/// The length of what `args` serves (the guest memory size a handshake may use), checking the
/// snapshot can be opened (an image's header and tables are validated).
pub fn snapshot_len(config: &DaemonConfig) -> Result<u64> {
    check_image_id_flag(config)?;
    if let Some(url) = &config.object.url {
        return object_len(&config.object, url);
    }
    if let Some(addr) = &config.remote {
        return remote_len(addr);
    }
    match (&config.image, &config.mem_file) {
        (Some(_), _) => Ok(open_snapshot(config)?.len()),
        (None, Some(mem)) => Ok(std::fs::metadata(mem)
            .map_err(|source| Error::OpenMemFile {
                path: mem.clone(),
                source,
            })?
            .len()),
        (None, None) => Err(Error::NothingToServe),
    }
}

/// Connect to the page server at `addr` (waiting up to the deadline for it to come up); with
/// `expect_id`, only if it serves that source (a supervised worker's sessions started on it).
pub fn open_remote(
    addr: &str,
    config: &crate::config::RemoteConfig,
    expect_id: Option<u64>,
) -> Result<Arc<dyn PageSource>> {
    let options = faultline::remote::RemoteOptions {
        expect_source_id: expect_id,
        ..config.options()
    };
    let src = faultline::remote::RemoteSource::connect(addr, options).map_err(|e| {
        Error::ConnectRemote {
            addr: addr.to_string(),
            source: Box::new(e),
        }
    })?;
    Ok(Arc::new(src))
}

/// What the page server at `addr` announces: the source's length and id (asked with one hello).
pub fn remote_source(addr: &str) -> Result<faultline::remote::Welcome> {
    faultline::remote::probe(addr, std::time::Duration::from_secs(5)).map_err(|e| {
        Error::ProbeRemote {
            addr: addr.to_string(),
            source: Box::new(e),
        }
    })
}

/// The length of the source served at `addr`.
pub fn remote_len(addr: &str) -> Result<u64> {
    Ok(remote_source(addr)?.source_len)
}

/// Whether `s` names an object in a store rather than a local file.
pub fn is_url(s: &str) -> bool {
    s.starts_with("s3://") || s.starts_with("s3a://")
}

/// `path` as an object URL, if it is one.
pub fn url_of(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| is_url(s))
}

impl ObjectConfig {
    /// Open the object at `url`: one HEAD request, and the cache directory.
    pub fn open(&self, url: &str) -> Result<Arc<ObjectSource>> {
        let Some(block_size) = self
            .block_kib
            .checked_mul(1024)
            .filter(|b| *b > 0 && b % 4096 == 0)
        else {
            return Err(Error::ObjectBlockSize {
                block_kib: self.block_kib,
            });
        };
        let s3 = S3Config {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            ..S3Config::default()
        };
        let opts = ObjectSourceOptions {
            block_size,
            max_parallel: self.parallel.max(1),
            cache_dir: self.cache_dir.clone(),
            cache_bytes: self.cache_mib.saturating_mul(1 << 20),
            ..ObjectSourceOptions::default()
        };
        let src = ObjectSource::open_url(url, &s3, opts).map_err(|e| Error::OpenObject {
            url: url.to_string(),
            source: Box::new(e),
        })?;
        tracing::info!(object = url, len = PageSource::len(&src), block_kib = self.block_kib, cache = %src.cache_dir().display(), "object opened");
        Ok(Arc::new(src))
    }
}

/// `--object-url`: the raw memory in the store. With a working set, its blocks are fetched in the
/// background, in first-touch order and in parallel, ahead of the faults that need them.
pub fn open_memory(
    flags: &ObjectConfig,
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
    let ws = WorkingSet::load(path).map_err(|source| Error::WorkingSet {
        path: path.to_path_buf(),
        source,
    })?;
    drop(
        obj.prefetch_in_background(to_store(ws.offsets))
            .map_err(|source| Error::StartPrefetch { source })?,
    );
    Ok(())
}

/// `--image s3://...`: a full image in the store, its header and tables read through the cache.
/// With a working set, the chunks holding its pages are fetched in the background, in
/// first-touch order and in parallel, ahead of the faults that need them. With `expect_id`, the
/// image must be the one it names ([`ImageSource::check_id`]).
pub fn open_image(
    flags: &ObjectConfig,
    url: &str,
    prefetch_ws: Option<&Path>,
    expect_id: Option<&[u8; 32]>,
) -> Result<Arc<dyn PageSource>> {
    let obj = flags.open(url)?;
    let image = Image::from_reader(Arc::clone(&obj) as Arc<dyn RangeRead>).map_err(|e| {
        Error::ReadObjectImage {
            url: url.to_string(),
            source: Box::new(e),
        }
    })?;
    let src = ImageSource::new(image).map_err(|e| Error::ObjectImageDiff {
        url: url.to_string(),
        source: Box::new(e),
    })?;
    if let Some(id) = expect_id {
        check_id(&src, id, url)?;
    }
    if let Some(p) = prefetch_ws {
        prefetch_detached(&obj, p, |offsets| {
            obj.offsets_of_ranges(&src.working_set_ranges(&offsets))
        })?;
    }
    Ok(Arc::new(src))
}

/// The length of the raw memory at `url` (one HEAD; no prefetch).
pub fn object_len(flags: &ObjectConfig, url: &str) -> Result<u64> {
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
    fn a_block_size_not_a_multiple_of_four_kib_is_refused() {
        let f = ObjectConfig {
            block_kib: 6,
            ..ObjectConfig::default()
        };
        let e = f.open("s3://b/k").err();
        assert!(
            matches!(e, Some(Error::ObjectBlockSize { block_kib: 6 })),
            "{e:?}"
        );
        let e = e.map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("multiple of 4")),
            "{e:?}"
        );
    }

    #[test]
    fn more_than_one_snapshot_is_refused() {
        let c = DaemonConfig {
            remote: Some("127.0.0.1:1".into()),
            ..DaemonConfig::mem_file("/nonexistent")
        };
        let e = open_snapshot(&c).err();
        assert!(matches!(e, Some(Error::SeveralSnapshots)), "{e:?}");
        let e = e.map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("only one")),
            "{e:?}"
        );
    }
}
