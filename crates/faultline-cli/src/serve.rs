//! `faultline serve`: the Firecracker page-fault handler daemon.
//!
//! Listens on a Unix stream socket; every connection is one Firecracker process restoring a
//! snapshot (many clones of one snapshot at once is the normal case). The handshake (one JSON
//! message with the userfaultfd attached) is received and validated on its own thread with a
//! timeout, so a slow or silent client never holds up anyone else; a bad one is logged with the
//! problem named and its connection closed. A good one becomes a session of the shared fault
//! server, which ends when the client's socket hangs up.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use faultline::firecracker::{self, Limits};
use faultline::source::{MmapSource, PageSource};
use faultline::{EndHook, Readahead, Region, Server, ServerConfig, SessionOptions, WorkingSet};
use faultline_uffd::{MemoryKind, Uffd};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Readahead policy flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadaheadFlag {
    /// Only the faulting page.
    Off,
    /// A fixed window of `--readahead-pages`.
    Fixed,
    /// Grow on sequential faults up to `--readahead-pages`, shrink on random ones.
    Adaptive,
}

/// `faultline serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Unix socket to listen on (created with mode 0600; a stale socket is replaced, a live one
    /// is an error). Firecracker's `mem_backend.backend_path`.
    #[arg(long)]
    pub socket: PathBuf,
    /// The snapshot memory file (Firecracker's `mem_file_path` of the snapshot). Give this or
    /// `--image`.
    #[arg(long, required_unless_present_any = ["image", "remote", "object_url"], conflicts_with = "image")]
    pub mem_file: Option<PathBuf>,
    /// Serve a faultline image (made by `faultline image pack` or `image diff`) instead of a raw
    /// memory file; a diff is served over its base, found by the name it records. Every page is
    /// checked against its hash before it is served; a bad page is poisoned, never served.
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// Serve the image only if its id (`faultline image inspect` shows it) is this one, 64 hex
    /// digits. The id vouches for every page only with BLAKE3 page hashes (`image pack --hash
    /// blake3`), so an image with XXH3-128 page hashes is refused with it.
    #[arg(long, value_name = "HEX", value_parser = parse_image_id)]
    pub image_id: Option<[u8; 32]>,
    /// Serve pages fetched from a remote page server (`faultline export --listen ADDR` on the
    /// host the VM is moving from) instead of a local file: host:port.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["mem_file", "image"])]
    pub remote: Option<String>,
    /// Tuning of `--remote`.
    #[command(flatten)]
    pub remote_flags: crate::remote::RemoteFlags,
    /// `--object-url s3://...` (the memory in an object store) and its cache.
    #[command(flatten)]
    pub object: crate::object::ObjectFlags,
    /// Fault-serving worker threads (default: number of CPUs; one more with `--remote`, whose
    /// reads wait on the network).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Pin worker i to CPU i.
    #[arg(long)]
    pub pin_workers: bool,
    /// Readahead policy.
    #[arg(long, value_enum, default_value_t = ReadaheadFlag::Adaptive)]
    pub readahead: ReadaheadFlag,
    /// Readahead window in pages (the maximum for adaptive).
    #[arg(long, default_value_t = 512)]
    pub readahead_pages: usize,
    /// Record the order in which each restore first touched pages into FILE (written when the
    /// session ends; readahead is off for recorded sessions so every touch is seen).
    #[arg(long, value_name = "FILE")]
    pub record_ws: Option<PathBuf>,
    /// Replay a recorded working set into every new client ahead of demand, then fill the rest
    /// in the background.
    #[arg(long, value_name = "FILE")]
    pub prefetch_ws: Option<PathBuf>,
    /// Fill every page in the background once demand is served (implied by --prefetch-ws).
    #[arg(long)]
    pub background_fill: bool,
    /// Serve Prometheus metrics on this TCP address (e.g. 127.0.0.1:9100), path /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Seconds a client may take to send its handshake.
    #[arg(long, default_value_t = 5)]
    pub handshake_timeout: u64,
    /// Skip the start-up scan for zero pages (which lets zero pages be served with ZEROPAGE).
    #[arg(long)]
    pub no_zero_scan: bool,
    /// Only clients running as these user ids (SO_PEERCRED) are served; repeat or comma-separate.
    /// Default: any user who can open the socket (it is 0600: its owner).
    #[arg(long, value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
    /// On SIGTERM/SIGINT: `abandon` stops serving at once (a guest touching a missing page then
    /// waits: Firecracker keeps its own userfaultfd); `drain` fills every session's remaining pages
    /// first, so the VMs keep running with all their memory, then exits.
    #[arg(long, value_enum, default_value_t = OnExit::Abandon)]
    pub on_exit: OnExit,
    /// Run in one process, without the supervisor that restarts a crashed worker.
    #[arg(long)]
    pub no_supervisor: bool,
    /// What ends a fault that has no right bytes (its source cannot be read, the kernel refuses
    /// the resolve, it lies outside every declared region, it is unresolved past
    /// `--fault-deadline`): `poison` makes the guest see SIGBUS at that page only (a machine
    /// check), and where the kernel has no UFFDIO_POISON (before Linux 6.6) kills the
    /// Firecracker process; `kill` always kills the Firecracker process. Either way it is
    /// logged, and no wrong or zero page is ever served.
    #[arg(long, value_enum, default_value_t = OnUnservable::Poison)]
    pub on_unservable: OnUnservable,
    /// Seconds a fault may stay unresolved (a source retried, a hung read) before it is
    /// unservable.
    #[arg(long, default_value_t = 60)]
    pub fault_deadline: u64,
    /// Behave as on a kernel without UFFDIO_POISON (tests of the kill fallback).
    #[arg(long, hide = true)]
    pub simulate_no_poison: bool,
    /// Seconds live sessions may go without a serve worker (one that keeps failing to start is
    /// restarted with backoff, 100 ms doubling to 10 s) before the supervisor ends their VMs
    /// (SIGKILL through a pidfd, logged): their faults are never left waiting without a bound.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub worker_down_limit: u64,
    /// Seconds the supervised worker may say nothing (it reports every 0.5 s) before the
    /// supervisor takes it for stopped or wedged, kills it and resumes its sessions in a new one.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub worker_hang_limit: u64,
}

/// `--on-unservable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnUnservable {
    /// Poison the page (SIGBUS there); kill the client where the kernel lacks POISON.
    Poison,
    /// Kill the client.
    Kill,
}

impl From<OnUnservable> for faultline::Unservable {
    fn from(o: OnUnservable) -> Self {
        match o {
            OnUnservable::Poison => faultline::Unservable::Poison,
            OnUnservable::Kill => faultline::Unservable::Kill,
        }
    }
}

/// What `faultline serve` does with live sessions when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnExit {
    /// Stop serving at once.
    Abandon,
    /// Fill every session's remaining pages, then stop.
    Drain,
}

/// Set up logging once.
pub fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// Set up logging once, at `default_level` unless `RUST_LOG` says otherwise.
pub fn init_logging_at(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: a daemon's stderr is usually a pipe, a file or the journal.
    // A log line that cannot be written is dropped: by default tracing-subscriber reports the
    // failed write with `eprintln!`, which panics when stderr is a closed pipe, killing whichever
    // thread logged (a fault-serving thread, or the worker's control thread on its way to exit
    // when the supervisor is gone — which left the worker running forever, orphaned).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A running daemon (in this process): used by `serve`, `demo` and tests.
pub struct Daemon {
    server: Arc<Server>,
    core: Arc<Core>,
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    accept: Option<std::thread::JoinHandle<()>>,
    wake: UnixStream,
    /// Sessions started so far.
    pub started: Arc<AtomicU64>,
    /// Handshakes refused so far.
    pub refused: Arc<AtomicU64>,
}

/// What serving needs, shared by the in-process daemon and the supervised worker: the fault
/// server, the memory file, and how new sessions are set up.
pub struct Core {
    /// The fault server.
    pub server: Arc<Server>,
    src: Arc<dyn PageSource>,
    prefetch: Option<WorkingSet>,
    background_fill: bool,
    record: Option<PathBuf>,
    on_unservable: faultline::Unservable,
    /// Sessions started so far.
    pub started: Arc<AtomicU64>,
    /// Handshakes refused so far.
    pub refused: Arc<AtomicU64>,
}

impl Core {
    /// Open the memory file, load the working set, start the fault server and metrics.
    pub fn build(args: &ServeArgs) -> Result<Core> {
        Core::build_from(args, None)
    }

    /// [`Core::build`], serving `handed` (the snapshot a supervisor opened and pinned) instead
    /// of opening the snapshot by its path.
    pub fn build_from(args: &ServeArgs, handed: Option<Handed>) -> Result<Core> {
        let src = open_snapshot_from(args, handed)?;
        let prefetch = match &args.prefetch_ws {
            Some(p) => Some(
                WorkingSet::load(p)
                    .with_context(|| format!("reading the working set {}", p.display()))?,
            ),
            None => None,
        };
        let readahead = match args.readahead {
            ReadaheadFlag::Off => Readahead::Off,
            ReadaheadFlag::Fixed => Readahead::Fixed {
                pages: args.readahead_pages,
            },
            ReadaheadFlag::Adaptive => Readahead::Adaptive {
                min_pages: 1,
                max_pages: args.readahead_pages,
            },
        };
        let mut config = ServerConfig {
            readahead,
            pin_workers: args.pin_workers,
            fault_deadline: Duration::from_secs(args.fault_deadline.max(1)),
            ..ServerConfig::default()
        };
        if args.simulate_no_poison {
            config.missing_features = faultline_uffd::Features::POISON;
        }
        if args.remote.is_some() {
            config.workers = ServerConfig::network_workers();
            // A remote read that waits for a reconnect fails as retryable and is retried; the
            // remote source's deadline (--remote-deadline) decides when a page is given up.
            config.source_attempts = u32::MAX;
        }
        if let Some(w) = args.workers {
            config.workers = w.max(1);
        }
        let from_store = args.object.object_url.is_some()
            || args
                .image
                .as_deref()
                .and_then(crate::object::url_of)
                .is_some();
        if from_store {
            // A store that blips (a dropped connection, a 503) gets about 1.5 s of retries
            // (50, 100, 200, 400, 800 ms) before a page is poisoned.
            config.source_attempts = 6;
            config.retry_backoff = Duration::from_millis(50);
        }
        let server = Arc::new(Server::start(config)?);
        if let Some(addr) = &args.metrics {
            serve_metrics(addr, Arc::clone(&server))?;
        }
        Ok(Core {
            server,
            src,
            prefetch,
            background_fill: args.background_fill
                || args.prefetch_ws.is_some()
                || args.remote_flags.remote_stream,
            record: args.record_ws.clone(),
            on_unservable: args.on_unservable.into(),
            started: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The handshake limits for this memory file.
    pub fn limits(&self, args: &ServeArgs) -> Limits {
        Limits {
            timeout: Duration::from_secs(args.handshake_timeout.max(1)),
            mem_len: Some(self.src.len()),
            ..Limits::default()
        }
    }

    /// Start serving an accepted client. `handover` says what a supervisor knows of it (its id,
    /// and for a session taken over from a worker that died, the ranges it removed so far and
    /// its counters); `hooks` report its end and its REMOVEs.
    pub fn start_session(&self, c: Accepted, handover: Handover, hooks: Hooks) -> Result<u64> {
        let peer = c.peer;
        let regions: Vec<Region> = c
            .regions
            .iter()
            .map(|r| {
                let kind = if r.page_size == 4096 {
                    MemoryKind::PrivateAnonymous
                } else {
                    MemoryKind::HugetlbPrivate
                };
                Region::new(r.start, r.len, kind, Arc::clone(&self.src), r.offset)
            })
            .collect();
        let record = self.record.clone();
        let ended = hooks.ended;
        let on_end = EndHook(Box::new(move |s: &faultline::SessionHandle| {
            if let Some(path) = record {
                let ws = s.working_set();
                match ws.save(&path) {
                    Ok(()) => {
                        tracing::info!(session = s.id(), pages = ws.offsets.len(), file = %path.display(), "working set recorded")
                    }
                    Err(e) => {
                        tracing::error!(session = s.id(), error = %e, "cannot write the working set")
                    }
                }
            }
            if let Some(f) = ended {
                f(s);
            }
        }));
        let n_regions = regions.len();
        let opts = SessionOptions {
            label: format!("pid {}", peer.pid),
            record_working_set: self.record.is_some(),
            prefetch: self.prefetch.clone(),
            background_fill: self.background_fill,
            watch: Some(c.watch),
            readahead: None,
            on_end: Some(on_end),
            on_remove: hooks.removed,
            resume: handover.resume,
            removed: handover.removed,
            id: handover.id,
            carried: handover.carried,
            on_unservable: self.on_unservable,
            ..SessionOptions::default()
        };
        match self.server.add_session(c.uffd, regions, opts) {
            Ok(s) => {
                self.started.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    session = s.id(),
                    pid = peer.pid,
                    uid = peer.uid,
                    regions = n_regions,
                    pages = s.total_pages(),
                    "session started"
                );
                Ok(s.id())
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pid = peer.pid, error = %e, "cannot serve this client; connection closed");
                Err(e.into())
            }
        }
    }

    /// On a clean stop: make durable what the source keeps for the next process (an object
    /// store's cache: the blocks fetched since its last group commit).
    pub fn flush(&self) {
        if let Err(e) = self.src.flush() {
            tracing::warn!(error = %e, "cannot make the source's cache durable; a restart fetches those blocks again");
        }
    }

    /// `--on-exit drain`: fill every session's remaining pages and wait until each is complete or
    /// its client is gone.
    pub fn drain(&self) {
        let sessions = self.server.sessions();
        tracing::info!(
            sessions = sessions.len(),
            "draining: filling every session's remaining pages"
        );
        self.server.fill_all();
        for s in sessions {
            while !s.wait_all_present(Duration::from_millis(200)) && !s.is_closed() {}
            tracing::info!(session = s.id(), complete = s.all_present(), "drained");
        }
    }
}

/// What is served: `--image IMG` (a faultline image, through its hash-verifying source; a diff
/// over its base) or `--mem-file F` (the raw file, mmapped, zero pages found by a start-up scan
/// unless `--no-zero-scan`). The two flags exclude each other.
pub fn open_snapshot(args: &ServeArgs) -> Result<Arc<dyn PageSource>> {
    open_snapshot_from(args, None)
}

/// The snapshot a supervisor opened once and hands to each of its workers: the open files (the
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
    pub fn open(args: &ServeArgs) -> Result<Pinned> {
        check_image_id_flag(args)?;
        let mut pinned = Pinned {
            len: 0,
            files: Vec::new(),
            remote_id: None,
            image_id: None,
            modified: None,
        };
        if let Some(addr) = &args.remote {
            let w = crate::remote::remote_source(addr)?;
            pinned.len = w.source_len;
            pinned.remote_id = Some(w.source_id);
            return Ok(pinned);
        }
        let from_store = args.object.object_url.is_some()
            || args
                .image
                .as_deref()
                .and_then(crate::object::url_of)
                .is_some();
        if from_store {
            pinned.len = snapshot_len(args)?;
            return Ok(pinned);
        }
        if let Some(img) = &args.image {
            let layers = faultline::image::ImageSource::open_layer_files(img)
                .with_context(|| format!("opening the image {}", img.display()))?;
            let readers = layers
                .iter()
                .map(|l| Arc::clone(l) as Arc<dyn faultline::image::RangeRead>)
                .collect();
            let src = faultline::image::ImageSource::from_layers(readers)
                .with_context(|| format!("opening the image {}", img.display()))?;
            if let Some(id) = &args.image_id {
                src.check_id(id)?;
            }
            pinned.len = src.len();
            pinned.image_id = Some(src.image().id());
            drop(src);
            for l in layers {
                let name = faultline::image::RangeRead::name(&*l);
                let file = l
                    .file()
                    .try_clone()
                    .with_context(|| format!("keeping the image {name} open"))?;
                pinned.files.push((file, name));
            }
            return Ok(pinned);
        }
        let Some(mem) = &args.mem_file else {
            bail!("nothing to serve: give --mem-file or --image");
        };
        let file = std::fs::File::open(mem)
            .with_context(|| format!("opening the memory file {}", mem.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("opening the memory file {}", mem.display()))?;
        pinned.len = meta.len();
        pinned.modified = Some(modified(&meta));
        pinned.files.push((file, mem.display().to_string()));
        Ok(pinned)
    }
}

/// [`open_snapshot`] from what a supervisor handed over, when it did.
pub fn open_snapshot_from(args: &ServeArgs, handed: Option<Handed>) -> Result<Arc<dyn PageSource>> {
    check_image_id_flag(args)?;
    if let Some(addr) = &args.remote {
        let expect = handed.as_ref().and_then(|h| h.remote_id);
        return crate::remote::open_remote(addr, &args.remote_flags, expect);
    }
    let handed = handed.filter(|h| !h.files.is_empty());
    if let Some(url) = &args.object.object_url {
        return crate::object::open_memory(&args.object, url, args.prefetch_ws.as_deref());
    }
    if let Some(url) = args.image.as_deref().and_then(crate::object::url_of) {
        return crate::object::open_image(
            &args.object,
            url,
            args.prefetch_ws.as_deref(),
            args.image_id.as_ref(),
        );
    }
    if let Some(img) = &args.image {
        let src = match handed {
            Some(h) => {
                let mut layers: Vec<Arc<dyn faultline::image::RangeRead>> = Vec::new();
                for (file, name) in h.files {
                    let r = faultline::image::FileRange::from_file(file, &name)
                        .with_context(|| format!("reading the image {name}"))?;
                    layers.push(Arc::new(r));
                }
                let src = faultline::image::ImageSource::from_layers(layers)
                    .with_context(|| format!("opening the image {}", img.display()))?;
                // The same open file: its header (and so its id) changes only if it was
                // rewritten in place; then it is refused, never served.
                if let Some(id) = &h.image_id {
                    if src.image().id() != *id {
                        bail!(
                            "the image {} is no longer the one the supervisor opened (id {}, was {}): refusing to serve it",
                            img.display(),
                            faultline::image::hex(&src.image().id()),
                            faultline::image::hex(id)
                        );
                    }
                }
                src
            }
            None => faultline::image::ImageSource::open(img)
                .with_context(|| format!("opening the image {}", img.display()))?,
        };
        if let Some(id) = &args.image_id {
            src.check_id(id)?;
        }
        return Ok(Arc::new(src));
    }
    let Some(mem) = &args.mem_file else {
        bail!("nothing to serve: give --mem-file or --image");
    };
    let (want_len, want_modified) = handed
        .as_ref()
        .map_or((None, None), |h| (h.len, h.modified));
    let src = match handed.and_then(|h| h.files.into_iter().next()) {
        Some((file, name)) => {
            let meta = file
                .metadata()
                .with_context(|| format!("reading the memory file {name}"))?;
            let now = meta.len();
            if let Some(want) = want_len.filter(|&w| w != now) {
                bail!(
                    "the memory file {name} is now {now} bytes, not the {want} its sessions started on: refusing to serve it"
                );
            }
            if want_modified.is_some_and(|w| w != modified(&meta)) {
                bail!(
                    "the memory file {name} was written since its sessions started on it: refusing to serve it"
                );
            }
            MmapSource::options()
                .populate(false)
                .map_file(&file)
                .with_context(|| format!("mapping the memory file {name}"))?
                .with_name(name)
        }
        None => MmapSource::options()
            .populate(false)
            .open(mem)
            .with_context(|| format!("opening the memory file {}", mem.display()))?,
    };
    let src = if args.no_zero_scan {
        src
    } else {
        src.with_zero_scan()
            .with_context(|| format!("scanning the memory file {} for zero pages", mem.display()))?
    };
    Ok(Arc::new(src))
}

/// A file's modification time, to the nanosecond.
fn modified(meta: &std::fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), meta.mtime_nsec())
}

/// `--image-id` names an image: it goes with `--image`.
fn check_image_id_flag(args: &ServeArgs) -> Result<()> {
    if args.image_id.is_some() && args.image.is_none() {
        bail!("--image-id checks the image given with --image; there is none");
    }
    Ok(())
}

/// `--image-id`: 64 hex digits.
pub(crate) fn parse_image_id(s: &str) -> Result<[u8; 32], String> {
    let digits = s.trim();
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "an image id is 64 hex digits (as `faultline image inspect` shows it); got {} characters",
            digits.len()
        ));
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|e| format!("image id: {e}"))?;
    }
    Ok(id)
}

/// The length of what `args` serves (the guest memory size a handshake may use), checking the
/// snapshot can be opened (an image's header and tables are validated).
pub fn snapshot_len(args: &ServeArgs) -> Result<u64> {
    check_image_id_flag(args)?;
    if let Some(url) = &args.object.object_url {
        return crate::object::object_len(&args.object, url);
    }
    if let Some(addr) = &args.remote {
        return crate::remote::remote_len(addr);
    }
    match (&args.image, &args.mem_file) {
        (Some(_), _) => Ok(open_snapshot(args)?.len()),
        (None, Some(mem)) => Ok(std::fs::metadata(mem)
            .with_context(|| format!("opening the memory file {}", mem.display()))?
            .len()),
        (None, None) => bail!("nothing to serve: give --mem-file or --image"),
    }
}

/// The snapshot's path, for logs.
pub fn snapshot_name(args: &ServeArgs) -> String {
    if let Some(url) = &args.object.object_url {
        return url.clone();
    }
    if let Some(addr) = &args.remote {
        return format!("remote {addr}");
    }
    match (&args.image, &args.mem_file) {
        (Some(p), _) | (None, Some(p)) => p.display().to_string(),
        (None, None) => String::new(),
    }
}

/// What a supervisor hands over with a session (see [`Core::start_session`]).
#[derive(Debug, Default)]
pub struct Handover {
    /// The supervisor's id for the session, kept across worker restarts.
    pub id: Option<u64>,
    /// Taken over from a worker that died: wake the threads it left waiting.
    pub resume: bool,
    /// The ranges the client removed so far (served as zeros).
    pub removed: Vec<(u64, u64)>,
    /// The session's counters so far (its earlier workers' work).
    pub carried: Option<faultline::Stats>,
}

/// A session's end hook: given the session as it ends.
pub type EndedHook = Box<dyn FnOnce(&faultline::SessionHandle) + Send>;

/// Callbacks of one session, used by the supervised worker to report to its supervisor.
#[derive(Default)]
pub struct Hooks {
    /// Run when the session ends.
    pub ended: Option<EndedHook>,
    /// Run for every REMOVE.
    pub removed: Option<faultline::RemoveHook>,
}

/// A client whose handshake was received and validated.
pub struct Accepted {
    /// Its userfaultfd (checked to be one).
    pub uffd: Uffd,
    /// Its guest memory regions.
    pub regions: Vec<firecracker::ValidatedRegion>,
    /// Who it is.
    pub peer: firecracker::PeerCred,
    /// Its socket: readiness means it is gone.
    pub watch: std::os::fd::OwnedFd,
}

/// Receive, validate and vet a client's handshake.
pub fn accept_client(stream: &UnixStream, limits: &Limits, allow_uids: &[u32]) -> Result<Accepted> {
    let hs = firecracker::receive_handshake(stream, limits)?;
    if !allow_uids.is_empty() && !allow_uids.contains(&hs.peer.uid) {
        bail!(
            "client pid {} runs as uid {}, which --allow-uid does not list",
            hs.peer.pid,
            hs.peer.uid
        );
    }
    let uffd = Uffd::from_received_fd(hs.uffd)?;
    let watch = stream
        .as_fd()
        .try_clone_to_owned()
        .context("keeping the client's socket")?;
    Ok(Accepted {
        uffd,
        regions: hs.mappings,
        peer: hs.peer,
        watch,
    })
}

impl Daemon {
    /// Bind the socket and start serving.
    pub fn start(args: &ServeArgs) -> Result<Daemon> {
        let core = Arc::new(Core::build(args)?);
        let core_keep = Arc::clone(&core);
        let listener = bind(&args.socket)?;
        let server = Arc::clone(&core.server);
        let started = Arc::clone(&core.started);
        let refused = Arc::clone(&core.refused);
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_rx, wake) = UnixStream::pair()?;
        let limits = core.limits(args);
        let allow = args.allow_uid.clone();
        let ctx = Arc::new(ConnCtx {
            limits,
            dispatch: Box::new(move |stream: UnixStream, limits: &Limits| {
                match accept_client(&stream, limits, &allow) {
                    Ok(c) => {
                        let _ = core.start_session(c, Handover::default(), Hooks::default());
                    }
                    Err(e) => {
                        core.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %format!("{e:#}"), "handshake refused; connection closed");
                    }
                }
            }),
        });
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("faultline-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, stop2, ctx))?;
        tracing::info!(socket = %args.socket.display(), snapshot = %snapshot_name(args), "serving");
        Ok(Daemon {
            server,
            core: core_keep,
            stop,
            socket: args.socket.clone(),
            accept: Some(accept),
            wake,
            started,
            refused,
        })
    }

    /// The fault server.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Stop accepting, remove the socket, end every session.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write_all(b"x");
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        for s in self.server.sessions() {
            let _ = self.server.remove_session(s.id());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

/// What the accept loop does with each connection (on its own thread).
pub(crate) struct ConnCtx {
    pub(crate) limits: Limits,
    #[allow(clippy::type_complexity)]
    pub(crate) dispatch: Box<dyn Fn(UnixStream, &Limits) + Send + Sync>,
}

/// Create the listening socket: mode 0600, a stale socket replaced, a live one refused.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => bail!(
                "{} is a live socket: another handler is serving it",
                path.display()
            ),
            Err(_) => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
                tracing::info!(socket = %path.display(), "replaced a stale socket");
            }
        }
    }
    // Created 0600 from the start: no window in which others may connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = UnixListener::bind(path);
    rustix::process::umask(old);
    l.with_context(|| format!("binding {}", path.display()))
}

pub(crate) fn accept_loop(
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    ctx: Arc<ConnCtx>,
) {
    use rustix::event::{poll, PollFd, PollFlags};
    while !stop.load(Ordering::Acquire) {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "poll on the listening socket failed");
                return;
            }
        }
        if !fds[1].revents().is_empty() || stop.load(Ordering::Acquire) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let ctx = Arc::clone(&ctx);
                let r = std::thread::Builder::new()
                    .name("faultline-handshake".into())
                    .spawn(move || (ctx.dispatch)(stream, &ctx.limits));
                if let Err(e) = r {
                    tracing::error!(error = %e, "cannot start a handshake thread; connection dropped");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}

/// A minimal HTTP endpoint with the Prometheus text of the server and its sessions.
fn serve_metrics(addr: &str, server: Arc<Server>) -> Result<()> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(addr, "metrics on http://{addr}/metrics");
    std::thread::Builder::new().name("faultline-metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            // The request head may arrive in several segments: read until its blank line (or
            // 1 KiB, EOF or the timeout), so the request line is never judged half-read.
            let mut req = [0u8; 1024];
            let mut n = 0;
            while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut req[n..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let head = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if head.starts_with("GET /metrics") || head.starts_with("GET / ") {
                ("200 OK", server.prometheus())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(())
}

/// `faultline serve`: run until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    if !args.no_supervisor {
        return crate::supervisor::run(args);
    }
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    let daemon = Daemon::start(&args)?;
    let mut b = [0u8; 16];
    while !term.load(Ordering::Acquire) {
        let _ = (&sig_rx).read(&mut b);
    }
    tracing::info!(
        sessions = daemon.server().sessions().len(),
        started = daemon.started.load(Ordering::Relaxed),
        refused = daemon.refused.load(Ordering::Relaxed),
        "stopping"
    );
    if args.on_exit == OnExit::Drain {
        daemon.core.drain();
    }
    let core = Arc::clone(&daemon.core);
    daemon.stop();
    core.flush();
    Ok(())
}
