//! `faultline serve`: the Firecracker page-fault handler daemon.
//!
//! Listens on a Unix stream socket; every connection is one Firecracker process restoring a
//! snapshot (many clones of one snapshot at once is the normal case). The handshake (one JSON
//! message with the userfaultfd attached) is received and validated on its own thread with a
//! timeout, so a slow or silent client never holds up anyone else; a bad one is logged with the
//! problem named and its connection closed. A good one becomes a session of the shared fault
//! server, which ends when the client **process** exits (a pidfd, see [`faultline::peer`]), not
//! when its socket hangs up: Firecracker before v1.12 closes the socket right after the handshake
//! and goes on running the guest.
//!
//! # The front door's limits
//! - The client's credentials (`SO_PEERCRED`) are vetted against `--allow-uid` right after
//!   `accept`, before a byte is read and before any thread is started for it.
//! - At most `--max-handshakes` handshakes are received at once, each on its own thread and each
//!   holding at most [`Limits::max_message`] bytes: threads and bytes in flight are bounded. A
//!   connection over the cap is refused at once.
//! - An `accept` that fails (out of fds: `EMFILE`, `ENFILE`; out of memory) is retried after a
//!   pause that doubles from 5 ms to 1 s, instead of at once in a loop; the open-file soft limit
//!   is raised to the hard limit at start.
//! - Refusals and accept errors are logged at most [`faultline::ratelimit::LOG_BURST`] lines per cause per second; the
//!   rest are counted and reported in one line per cause and second ("similar log lines
//!   suppressed").
//! - The session's socket is kept open (by the supervisor) until the session ends, though it no
//!   longer decides anything: a client that watches it (Firecracker v1.12+ keeps its end open)
//!   still sees the handler hang up when, and only when, its session is over.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use faultline::firecracker::{self, Limits};
use faultline::ratelimit::LogLimit;
use faultline::source::{MmapSource, PageSource};
use faultline::{EndHook, Readahead, Region, Server, ServerConfig, SessionOptions, WorkingSet};
use faultline_uffd::{Features, MemoryKind, Uffd};

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
    /// Adaptive readahead's smallest window, in 4 KiB pages: a fault that continues no
    /// sequential stream is served with the aligned block of this many pages that holds it
    /// (16: 64 KiB, like the kernel's fault-around; one huge page at least). 1 serves such
    /// faults one page each.
    #[arg(long, default_value_t = 16)]
    pub readahead_min_pages: usize,
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
    /// Handshakes received at once, at most (each on its own thread, holding at most 1 MiB); a
    /// connection over the cap is refused at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_handshakes: u64,
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
                min_pages: args.readahead_min_pages,
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
        if from_store(args) {
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
        // With a pidfd the session follows the process; the socket (if we hold it) is only kept
        // open until the session ends. Without one (see `faultline::peer`), its hang-up is all
        // that tells the client is gone.
        let follows = if c.pidfd.is_some() {
            "process"
        } else {
            "socket"
        };
        let (pidfd, watch, keep) = match c.pidfd {
            Some(p) => (Some(p), None, c.socket),
            None => (None, c.socket, None),
        };
        let on_end = EndHook(Box::new(move |s: &faultline::SessionHandle| {
            drop(keep);
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
            watch,
            pidfd,
            readahead: None,
            on_end: Some(on_end),
            on_remove: hooks.removed,
            resume: handover.resume,
            removed: handover.removed,
            id: handover.id,
            carried: handover.carried,
            on_unservable: self.on_unservable,
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
                    follows,
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
        if from_store(args) {
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

/// Whether `args` serve from an object store (`--object-url`, or an `s3://` `--image`).
fn from_store(args: &ServeArgs) -> bool {
    args.object.object_url.is_some()
        || args
            .image
            .as_deref()
            .and_then(crate::object::url_of)
            .is_some()
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
    /// Its userfaultfd (checked to be one, without `EVENT_FORK`).
    pub uffd: Uffd,
    /// Its guest memory regions.
    pub regions: Vec<firecracker::ValidatedRegion>,
    /// Who it is.
    pub peer: firecracker::PeerCred,
    /// The client process: its exit ends the session. `None` where the kernel cannot name it
    /// (see [`faultline::peer`]); the session then follows `socket`.
    pub pidfd: Option<OwnedFd>,
    /// Its socket, if held here: kept open for the session's life (with a pidfd), or its
    /// hang-up ends the session (without one).
    pub socket: Option<OwnedFd>,
}

/// Why a connection was refused: a short cause (the key of the log's rate limit) and the error.
pub struct Refusal {
    /// `uid`, `busy`, `gone`, `pidfd`, `event-fork`, `fds`, `thread`, or a
    /// [`firecracker::HandshakeError::cause`].
    pub cause: &'static str,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl Refusal {
    fn new(cause: &'static str, error: impl Into<anyhow::Error>) -> Refusal {
        Refusal {
            cause,
            error: error.into(),
        }
    }
}

impl From<firecracker::HandshakeError> for Refusal {
    fn from(e: firecracker::HandshakeError) -> Refusal {
        Refusal::new(e.cause(), e)
    }
}

/// Receive, validate and vet the handshake of a client whose credentials (`peer`) were vetted
/// already and whose process is `pidfd`.
pub fn accept_client(
    stream: UnixStream,
    peer: firecracker::PeerCred,
    pidfd: Option<OwnedFd>,
    limits: &Limits,
) -> Result<Accepted, Refusal> {
    let hs = firecracker::receive_handshake(&stream, limits)?;
    let uffd = Uffd::from_received_fd(hs.uffd).map_err(|e| Refusal::new("fds", e))?;
    if uffd.features().contains(Features::EVENT_FORK) {
        // Every fork() of the client would hand us the userfaultfd of a child that no pidfd ties
        // to a process (the kernel names none): a session that could never end. Firecracker
        // never asks for it.
        return Err(Refusal::new(
            "event-fork",
            anyhow!(
                "client pid {}'s userfaultfd has EVENT_FORK enabled: the sessions of its forked \
                 children could not be tied to a process, so they are not served (Firecracker \
                 never enables EVENT_FORK)",
                peer.pid
            ),
        ));
    }
    Ok(Accepted {
        uffd,
        regions: hs.mappings,
        peer,
        pidfd,
        socket: Some(OwnedFd::from(stream)),
    })
}

/// How long a stopping daemon waits for its sessions to finish ending (summaries logged, working
/// sets written).
pub const SESSION_END_LIMIT: Duration = Duration::from_secs(5);

/// The window of the log's rate limit.
pub const LOG_WINDOW: Duration = Duration::from_secs(1);

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
        let dispatch = Box::new(move |c: Accepted| {
            let _ = core.start_session(c, Handover::default(), Hooks::default());
        });
        let ctx = Arc::new(ConnCtx::new(
            args,
            core_keep.limits(args),
            Arc::clone(&refused),
            dispatch,
        ));
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
        if !self.server.end_sessions(SESSION_END_LIMIT) {
            tracing::warn!("some sessions did not finish ending in time");
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

/// The accept loop's state: the limits a connection is held to, and what is done with a good
/// handshake (on the handshake's thread).
pub(crate) struct ConnCtx {
    limits: Limits,
    allow_uids: Vec<u32>,
    max_handshakes: usize,
    /// Handshakes being received now.
    in_flight: AtomicUsize,
    refused: Arc<AtomicU64>,
    log: LogLimit,
    #[allow(clippy::type_complexity)]
    dispatch: Box<dyn Fn(Accepted) + Send + Sync>,
}

impl ConnCtx {
    pub(crate) fn new(
        args: &ServeArgs,
        limits: Limits,
        refused: Arc<AtomicU64>,
        dispatch: Box<dyn Fn(Accepted) + Send + Sync>,
    ) -> ConnCtx {
        ConnCtx {
            limits,
            allow_uids: args.allow_uid.clone(),
            max_handshakes: usize::try_from(args.max_handshakes).unwrap_or(usize::MAX),
            in_flight: AtomicUsize::new(0),
            refused,
            log: LogLimit::with_window(LOG_WINDOW),
            dispatch,
        }
    }

    /// Counts and logs (rate-limited per cause) a refused connection; the caller closes it.
    fn refuse(&self, r: Refusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.log.allow(r.cause) {
            tracing::warn!(cause = r.cause, error = %format!("{:#}", r.error), "handshake refused; connection closed");
        }
    }

    /// A new connection: vetted by its credentials and the cap before anything is read, then
    /// its handshake received on a thread of its own. Returns `false` when the process is out of
    /// fds (the client could not be named): the accept loop then pauses as for a failed accept.
    fn admit(self: &Arc<Self>, stream: UnixStream) -> bool {
        let peer = match firecracker::peer_cred(&stream) {
            Ok(p) => p,
            Err(e) => {
                self.refuse(e.into());
                return true;
            }
        };
        if !self.allow_uids.is_empty() && !self.allow_uids.contains(&peer.uid) {
            self.refuse(Refusal::new(
                "uid",
                anyhow!(
                    "client pid {} runs as uid {}, which --allow-uid does not list",
                    peer.pid,
                    peer.uid
                ),
            ));
            return true;
        }
        // Only this thread adds to `in_flight`, so the check holds until the add.
        let busy = self.in_flight.load(Ordering::Acquire);
        if busy >= self.max_handshakes {
            self.refuse(Refusal::new(
                "busy",
                anyhow!(
                    "client pid {}: {busy} handshakes are in progress, the most --max-handshakes \
                     allows",
                    peer.pid
                ),
            ));
            return true;
        }
        // Name the client process now, before its pid can be reused (see `faultline::peer`).
        // Only a kernel that cannot name the client at all leaves its socket as the session's
        // life line; a client already gone, a reused pid, or a failing call (out of fds) is
        // refused: it could not be served as promised.
        let pidfd = match faultline::peer::client_pidfd(&stream, &peer) {
            Ok(fd) => Some(fd),
            Err(e @ faultline::peer::PeerError::Unsupported { .. }) => {
                if self.log.allow("no-pidfd") {
                    tracing::warn!(pid = peer.pid, error = %e, "the client's session will follow its socket, not its process");
                }
                None
            }
            Err(e @ faultline::peer::PeerError::Gone { .. }) => {
                self.refuse(Refusal::new("gone", e));
                return true;
            }
            Err(e) => {
                let out_of_fds = matches!(&e, faultline::peer::PeerError::Os { source, .. }
                    if matches!(source.raw_os_error(), Some(n) if n == rustix::io::Errno::MFILE.raw_os_error()
                        || n == rustix::io::Errno::NFILE.raw_os_error()));
                self.refuse(Refusal::new("pidfd", e));
                return !out_of_fds;
            }
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let ctx = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("faultline-handshake".into())
            .spawn(move || {
                let result = accept_client(stream, peer, pidfd, &ctx.limits);
                // The slot is free once the handshake is in (a session's set-up is not a
                // handshake's: it cannot be stalled by the client).
                ctx.in_flight.fetch_sub(1, Ordering::AcqRel);
                match result {
                    Ok(c) => (ctx.dispatch)(c),
                    Err(r) => ctx.refuse(r),
                }
            });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.refuse(Refusal::new(
                "thread",
                anyhow::Error::new(e).context("cannot start a handshake thread"),
            ));
            return false;
        }
        true
    }
}

/// Create the listening socket: mode 0600. What is at `path` already is replaced only if it is a
/// socket nobody listens on (a daemon that died); a live socket, and anything that is not a
/// socket (a file, a directory, a symlink — never followed), is an error naming it and left in
/// place.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "{} is a live socket: another handler is serving it",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
                tracing::info!(socket = %path.display(), "replaced a stale socket");
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{} is a socket that cannot be checked for a listener; not replacing it",
                        path.display()
                    )
                })
            }
        },
        Ok(meta) => bail!(
            "{} exists and is {}, not a socket: refusing to replace it (remove it or choose \
             another --socket)",
            path.display(),
            file_kind(&meta.file_type())
        ),
    }
    // Created 0600 from the start: no window in which others may connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = UnixListener::bind(path);
    rustix::process::umask(old);
    l.with_context(|| format!("binding {}", path.display()))
}

/// "a regular file", "a symlink", ... for errors.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a socket"
    }
}

/// The first pause after a failed `accept`, and the longest.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// The rate-limit cause of an `accept` error.
fn accept_cause(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(n) if n == rustix::io::Errno::MFILE.raw_os_error() => "accept-emfile",
        Some(n) if n == rustix::io::Errno::NFILE.raw_os_error() => "accept-enfile",
        Some(n)
            if n == rustix::io::Errno::NOMEM.raw_os_error()
                || n == rustix::io::Errno::NOBUFS.raw_os_error() =>
        {
            "accept-nomem"
        }
        _ => "accept-other",
    }
}

/// Accepts connections until `wake` is readable or `stop` set; each goes to [`ConnCtx::admit`].
/// A failed `accept` (out of fds, out of memory) is retried after a pause doubling from 5 ms to
/// 1 s, during which the listener is not polled (its pending connection would wake us at once);
/// the log's suppressed counts are reported at least once a second.
pub(crate) fn accept_loop(
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    ctx: Arc<ConnCtx>,
) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!(error = %e, "cannot make the listening socket non-blocking");
    }
    let mut backoff: Option<Duration> = None;
    while !stop.load(Ordering::Acquire) {
        let timeout = Timespec::try_from(backoff.unwrap_or(LOG_WINDOW)).ok();
        let mut fds = [
            PollFd::new(&wake, PollFlags::IN),
            PollFd::new(&listener, PollFlags::IN),
        ];
        let watched = if backoff.is_some() { 1 } else { 2 };
        let polled = poll(&mut fds[..watched], timeout.as_ref());
        ctx.log.flush();
        match polled {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                let pause = next_backoff(backoff);
                backoff = Some(pause);
                if ctx.log.allow("poll") {
                    tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64, "poll on the listening socket failed");
                }
                continue;
            }
        }
        if !fds[0].revents().is_empty() || stop.load(Ordering::Acquire) {
            return;
        }
        if backoff.is_none() && fds[1].revents().is_empty() {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(false) {
                    ctx.refuse(Refusal::new("io", e));
                    continue;
                }
                backoff = if ctx.admit(stream) {
                    None
                } else {
                    Some(next_backoff(backoff))
                };
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                backoff = None;
            }
            Err(e) => {
                let pause = next_backoff(backoff);
                backoff = Some(pause);
                if ctx.log.allow(accept_cause(&e)) {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "accept failed; retrying after a pause");
                }
            }
        }
    }
}

fn next_backoff(now: Option<Duration>) -> Duration {
    match now {
        None => ACCEPT_BACKOFF.0,
        Some(d) => d.saturating_mul(2).min(ACCEPT_BACKOFF.1),
    }
}

/// Raises the open-file soft limit to the hard limit (systemd's default soft limit, 1024, is
/// reached with about 500 VMs: each session holds a few fds).
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    // An unlimited hard limit still cannot exceed fs.nr_open.
    let hard = now.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let (Some(soft), Some(hard)) = (now.current, hard) else {
        return;
    };
    if soft >= hard {
        return;
    }
    let want = Rlimit {
        current: Some(hard),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, want) {
        Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit")
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
    raise_fd_limit();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..12 {
            let next = next_backoff(d);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(
            seen,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000]
        );
    }
}
