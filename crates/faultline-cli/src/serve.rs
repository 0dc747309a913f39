//! `faultline serve`: the Firecracker page-fault handler daemon's command line. The daemon
//! itself (accept loop, handshakes, sessions, supervisor and worker) is the `faultline-daemon`
//! library; this module turns the flags into its [`DaemonConfig`], runs it until SIGTERM or
//! SIGINT, and is the entry point of the supervised worker (`faultline serve-worker`).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};
use faultline_daemon::{Daemon, DaemonConfig, ReadaheadPolicy, Supervisor, WorkerCommand};

use crate::logging::{init_logging, LogFormat};
use crate::object::ObjectFlags;
use crate::remote::RemoteFlags;

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
    pub remote_flags: RemoteFlags,
    /// `--object-url s3://...` (the memory in an object store) and its cache.
    #[command(flatten)]
    pub object: ObjectFlags,
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
    /// (64: 256 KiB, beyond the kernel's 64 KiB fault-around: a restored guest's scattered
    /// touches cluster wider; one huge page at least). 1 serves such faults one page each. Only
    /// the faulting page's first chunk is served before the thread wakes; the rest of the
    /// block follows in the background.
    #[arg(long, default_value_t = 64)]
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
    /// With --prefetch-ws: the fill of the pages outside the working set starts once a client
    /// has gone this many milliseconds without a demand fault (the working set is pushed first
    /// either way), so that it does not compete with the restored guest's start-up; 0: at once.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub fill_after_quiet_ms: u64,
    /// Workers that do background work (readahead past a fault's first chunk, the working set,
    /// the fill) at once; the others serve demand faults only (0: every worker). Default: 1 for
    /// a local snapshot (a restored guest's VMM and vCPUs keep the other CPUs), every worker for
    /// --remote and object stores (their background work waits on the network).
    #[arg(long, value_name = "N")]
    pub background_workers: Option<usize>,
    /// Scheduling class of the background fill's copies: `idle` (SCHED_IDLE: they take only CPU
    /// time the restored guest leaves; a worker a fault waits for is raised at once) or `normal`.
    /// Readahead and the working set, which the guest is about to touch, always run at normal
    /// priority. Idle needs a process that may leave SCHED_IDLE again (root or CAP_SYS_NICE);
    /// elsewhere the fill runs at normal priority, with a warning
    #[arg(long, value_enum, default_value_t = FillPriority::Idle)]
    pub fill_priority: FillPriority,
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
    /// What happens to a client refused after it handed over its userfaultfd (a handshake that
    /// fails validation, fds lost at the open-file limit, a session the snapshot cannot take):
    /// `kill` ends it (SIGKILL through its pidfd, logged), since its memory is registered and
    /// nobody will serve it; `close` only closes its connection (it then waits on its first fault
    /// for ever: for tests that send handshakes from their own process).
    #[arg(long, value_enum, default_value_t = OnRefused::Kill)]
    pub on_refused: OnRefused,
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

/// `--fill-priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FillPriority {
    /// SCHED_IDLE: CPU time nobody else wants.
    Idle,
    /// The normal class, like every other worker.
    Normal,
}

/// `--on-refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnRefused {
    /// SIGKILL the client through its pidfd.
    Kill,
    /// Only close its connection.
    Close,
}

/// What ends a fault that has no right bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnUnservable {
    /// Poison the page (SIGBUS there); kill the client where the kernel lacks POISON.
    Poison,
    /// Kill the client.
    Kill,
}

impl From<OnUnservable> for faultline_daemon::OnUnservable {
    fn from(o: OnUnservable) -> Self {
        match o {
            OnUnservable::Poison => faultline_daemon::OnUnservable::Poison,
            OnUnservable::Kill => faultline_daemon::OnUnservable::Kill,
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

impl From<OnExit> for faultline_daemon::OnExit {
    fn from(o: OnExit) -> Self {
        match o {
            OnExit::Abandon => faultline_daemon::OnExit::Abandon,
            OnExit::Drain => faultline_daemon::OnExit::Drain,
        }
    }
}

impl From<ReadaheadFlag> for ReadaheadPolicy {
    fn from(r: ReadaheadFlag) -> Self {
        match r {
            ReadaheadFlag::Off => ReadaheadPolicy::Off,
            ReadaheadFlag::Fixed => ReadaheadPolicy::Fixed,
            ReadaheadFlag::Adaptive => ReadaheadPolicy::Adaptive,
        }
    }
}

impl ServeArgs {
    /// The daemon's config these flags ask for (not the socket, the log format or the
    /// supervision: those are how it is run).
    pub fn config(&self) -> DaemonConfig {
        DaemonConfig {
            mem_file: self.mem_file.clone(),
            image: self.image.clone(),
            image_id: self.image_id,
            remote: self.remote.clone(),
            remote_options: self.remote_flags.config(),
            object: self.object.config(),
            zero_scan: !self.no_zero_scan,
            workers: self.workers,
            pin_workers: self.pin_workers,
            readahead: self.readahead.into(),
            readahead_pages: self.readahead_pages,
            readahead_min_pages: self.readahead_min_pages,
            record_ws: self.record_ws.clone(),
            prefetch_ws: self.prefetch_ws.clone(),
            background_fill: self.background_fill,
            fill_after_quiet: Duration::from_millis(self.fill_after_quiet_ms),
            background_workers: self.background_workers,
            idle_fill: self.fill_priority == FillPriority::Idle,
            metrics: self.metrics.clone(),
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            max_handshakes: self.max_handshakes,
            allow_uid: self.allow_uid.clone(),
            on_exit: self.on_exit.into(),
            on_unservable: self.on_unservable.into(),
            end_refused_clients: self.on_refused == OnRefused::Kill,
            fault_deadline: Duration::from_secs(self.fault_deadline),
            simulate_no_poison: self.simulate_no_poison,
            worker_down_limit: Duration::from_secs(self.worker_down_limit),
            worker_hang_limit: Duration::from_secs(self.worker_hang_limit),
        }
    }
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

/// SIGTERM and SIGINT, caught from [`Term::catch`] on.
struct Term {
    flag: Arc<AtomicBool>,
    pipe: UnixStream,
}

impl Term {
    /// Catch SIGTERM and SIGINT from now on (registered before the daemon starts, so a signal
    /// during its start is not lost).
    fn catch() -> Result<Term> {
        let flag = Arc::new(AtomicBool::new(false));
        let (pipe, sig_tx) = UnixStream::pair()?;
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
            signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
        }
        Ok(Term { flag, pipe })
    }

    /// Block until one came.
    fn wait(&self) {
        let mut b = [0u8; 16];
        while !self.flag.load(Ordering::Acquire) {
            let _ = (&self.pipe).read(&mut b);
        }
    }
}

/// `faultline serve`: run until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    faultline_daemon::raise_fd_limit();
    let config = args.config();
    let term = Term::catch()?;
    if !args.no_supervisor {
        let worker = WorkerCommand {
            program: std::env::current_exe()?,
            args: vec![
                "serve-worker".into(),
                "--log-format".into(),
                format!("{:?}", args.log_format).to_lowercase().into(),
            ],
        };
        let supervisor = Supervisor::start(&config, &args.socket, worker)?;
        // The signal stops the supervisor; a supervisor whose main loop fails ends the command
        // (with its error) without one.
        let stop = supervisor.stop_handle()?;
        std::thread::Builder::new()
            .name("faultline-signals".into())
            .spawn(move || {
                term.wait();
                stop.stop();
            })?;
        return Ok(supervisor.wait()?);
    }
    let daemon = Daemon::start(&config, &args.socket)?;
    term.wait();
    tracing::info!(
        sessions = daemon.sessions().len(),
        started = daemon.started(),
        refused = daemon.refused(),
        "stopping"
    );
    daemon.shutdown();
    Ok(())
}

/// `faultline serve-worker` flags: the rest comes from the supervisor.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `faultline serve-worker`: the serving half of a supervised `faultline serve` (its stdin is the
/// control socket).
pub fn run_worker(args: WorkerArgs) -> Result<()> {
    init_logging(args.log_format);
    Ok(faultline_daemon::worker::run()?)
}
