//! The worker process of a supervised daemon, and how a host program runs it.
//!
//! A [`Supervisor`](crate::Supervisor) serves its sessions in a worker **process**, so that a
//! crash of the fault server (a bug, an OOM kill) costs no VM: the supervisor starts a new worker
//! and resumes every session in it. The worker is a program the supervisor starts with a
//! [`WorkerCommand`]: by default the running program itself ([`std::env::current_exe`]) with
//! the single argument [`WORKER_ARG`], its stdin a socket to the supervisor. Everything else (the
//! [`DaemonConfig`], the snapshot's open files, the sessions) arrives on that socket, so the
//! worker needs no command line of its own.
//!
//! A program that embeds a supervised daemon therefore calls [`main_if_worker`] first thing in
//! `main` (after setting up its logging, which the worker shares):
//!
//! ```no_run
//! fn main() {
//!     // When started as the worker, this serves until told to stop, then exits the process.
//!     faultline_daemon::worker::main_if_worker();
//!     // ... the program's own work, e.g. a Supervisor::start(...)
//! }
//! ```
//!
//! A program with its own command line (as `faultline` with its hidden `serve-worker`
//! subcommand) gives a [`WorkerCommand`] with its own arguments and calls [`run`] when it sees
//! them.

// The example above is about what goes first in `main`.
#![allow(clippy::needless_doctest_main)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline::firecracker::{PeerCred, ValidatedRegion};
use faultline_uffd::Uffd;

use crate::accept::Accepted;
use crate::config::{DaemonConfig, OnExit};
use crate::control::{
    recv_msg, send_msg, try_send_msg, InitMsg, Report, ToWorker, COUNTERS_EVERY, EXIT_CANNOT_START,
};
use crate::daemon::SESSION_END_LIMIT;
use crate::error::{chain, Error, Result};
use crate::sessions::{Core, Handover, Hooks};
use crate::snapshot::Handed;

/// The argument that makes a program the worker (see [`main_if_worker`]).
pub const WORKER_ARG: &str = "__faultline-daemon-worker";

/// How the supervisor starts a worker: a program and its arguments; the program must then run
/// [`run`] (its stdin is the control socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This program again, with [`WORKER_ARG`]: for hosts that call [`main_if_worker`].
    pub fn current_exe() -> Result<WorkerCommand> {
        Ok(WorkerCommand {
            program: std::env::current_exe().map_err(|source| Error::CurrentExe { source })?,
            args: vec![WORKER_ARG.into()],
        })
    }
}

/// Whether this process was started as a worker by [`WorkerCommand::current_exe`].
pub fn is_worker() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == WORKER_ARG)
}

/// When this process was started as a worker ([`is_worker`]): serve as one, then exit the
/// process (status 0 when stopped cleanly, 1 when it failed: the error is logged). Otherwise
/// return at once.
pub fn main_if_worker() {
    if !is_worker() {
        return;
    }
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(error = %chain(&e), "the serve worker failed");
            std::process::exit(1);
        }
    }
}

/// The worker's first message: the snapshot the supervisor opened.
fn receive_snapshot(control: BorrowedFd<'_>) -> Result<(Handed, DaemonConfig)> {
    let (bytes, fds) = recv_msg(control)
        .map_err(|source| Error::ControlSocket { source })?
        .ok_or(Error::SupervisorGone)?;
    let init: InitMsg =
        serde_json::from_slice(&bytes).map_err(|source| Error::InitMessage { source })?;
    if init.names.len() != fds.len() {
        return Err(Error::InitFiles {
            names: init.names.len(),
            fds: fds.len(),
        });
    }
    let handed = Handed {
        files: fds.into_iter().map(File::from).zip(init.names).collect(),
        remote_id: init.remote_id,
        image_id: init.image_id,
        len: Some(init.len),
        modified: init.modified,
        background_zero_scan: init.resuming,
    };
    Ok((handed, init.config))
}

/// Serve as the worker of the supervisor that started this process (its stdin is the control
/// socket): until SIGTERM or SIGINT, or, once the supervisor is gone, until the last session
/// ends (the process then exits). A worker that cannot serve what the supervisor hands it says
/// why to the supervisor and exits with status 3.
pub fn run() -> Result<()> {
    crate::raise_fd_limit();
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair().map_err(|source| Error::SocketPair {
        purpose: "the signal socket pair",
        source,
    })?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let registered = signal_hook::flag::register(sig, Arc::clone(&term))
            .and_then(|_| signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?));
        registered.map_err(|source| Error::Signals { source })?;
    }
    let stdin = std::io::stdin();
    let control: OwnedFd = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::ControlSocket { source })?;
    let control = Arc::new(control);
    // The snapshot comes from the supervisor (open files, never a path); a worker that cannot
    // serve it says why, once, to the supervisor, which logs it (rate-limited) and backs off.
    let built = receive_snapshot(control.as_fd())
        .and_then(|(h, config)| Ok((Core::build_from(&config, Some(h))?, config)));
    let (core, args) = match built {
        Ok((core, config)) => (Arc::new(core), config),
        Err(e) => {
            let error = chain(&e);
            if send_msg(
                control.as_fd(),
                &Report::CannotStart {
                    error: error.clone(),
                },
                &[],
            )
            .is_err()
            {
                tracing::error!(error, "cannot start, and the supervisor is gone");
            }
            std::process::exit(EXIT_CANNOT_START);
        }
    };
    let _ = send_msg(control.as_fd(), &Report::Ready, &[]);
    // Each session's counters go to the supervisor every COUNTERS_EVERY: a restarted worker
    // starts the session with them, so its summary covers its whole life.
    {
        let (core, control) = (Arc::clone(&core), Arc::clone(&control));
        std::thread::Builder::new()
            .name("faultline-counters".into())
            .spawn(move || loop {
                std::thread::sleep(COUNTERS_EVERY);
                let _ = try_send_msg(control.as_fd(), &Report::Alive);
                for s in core.server.sessions() {
                    let report = Report::Counters {
                        id: s.id(),
                        stats: s.stats(),
                    };
                    let _ = try_send_msg(control.as_fd(), &report);
                }
            })
            .map_err(|source| Error::Thread {
                name: "counters",
                source,
            })?;
    }
    // Sessions arrive on a thread; the main thread waits for the signal.
    {
        let (core, control) = (Arc::clone(&core), Arc::clone(&control));
        std::thread::Builder::new()
            .name("faultline-control".into())
            .spawn(move || control_loop(&core, &control))
            .map_err(|source| Error::Thread {
                name: "control",
                source,
            })?;
    }
    let mut b = [0u8; 16];
    while !term.load(Ordering::Acquire) {
        let _ = (&sig_rx).read(&mut b);
    }
    tracing::info!(
        sessions = core.server.sessions().len(),
        started = core.started.load(Ordering::Relaxed),
        refused = core.refused.load(Ordering::Relaxed),
        "stopping"
    );
    if args.on_exit == OnExit::Drain {
        core.drain();
    }
    if !core.server.end_sessions(SESSION_END_LIMIT) {
        tracing::warn!("some sessions did not finish ending in time");
    }
    core.flush();
    Ok(())
}

/// The worker's side of the control socket: sessions from the supervisor until it is gone; then
/// the live sessions are served until each ends, and the worker exits.
fn control_loop(core: &Core, control: &Arc<OwnedFd>) {
    let mut removed: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    loop {
        let (bytes, fds) = match recv_msg(control.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let msg = match serde_json::from_slice::<ToWorker>(&bytes) {
            Ok(ToWorker::Session(m)) => *m,
            Ok(ToWorker::Removed { id, ranges }) => {
                removed.entry(id).or_default().extend(ranges);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "malformed message from the supervisor");
                continue;
            }
        };
        let id = msg.id;
        let removed = removed.remove(&id).unwrap_or_default();
        let mut fds = fds;
        let served = if msg.served { fds.pop() } else { None };
        let served = served.map(|fd| faultline::ServedLog::new(std::fs::File::from(fd)));
        let mut fds = fds.into_iter();
        let (Some(uffd), second) = (fds.next(), fds.next()) else {
            tracing::error!(session = id, "session without its userfaultfd");
            continue;
        };
        let (pidfd, socket) = if msg.pidfd {
            (second, None)
        } else {
            (None, second)
        };
        let uffd = match Uffd::from_received_fd(uffd) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(session = id, error = %e, "not a userfaultfd");
                continue;
            }
        };
        let (c1, c2) = (Arc::clone(control), Arc::clone(control));
        let hooks = Hooks {
            ended: Some(Box::new(move |s: &faultline::SessionHandle| {
                let report = Report::Ended {
                    id,
                    stats: Some(s.stats()),
                };
                let _ = send_msg(c1.as_fd(), &report, &[]);
            })),
            removed: Some(faultline::RemoveHook(Box::new(move |start, end| {
                let _ = send_msg(c2.as_fd(), &Report::Removed { id, start, end }, &[]);
            }))),
        };
        let accepted = Accepted {
            uffd,
            regions: msg
                .regions
                .iter()
                .map(|r| ValidatedRegion {
                    start: r.start,
                    len: r.len,
                    page_size: r.page_size,
                    offset: r.offset,
                })
                .collect(),
            peer: PeerCred {
                pid: msg.pid,
                uid: msg.uid,
                gid: 0,
            },
            pidfd,
            socket,
        };
        if msg.resume {
            tracing::info!(
                session = id,
                pid = msg.pid,
                removed_ranges = removed.len(),
                carried_pages = msg.carried.map_or(0, |s| s.pages),
                "resuming a session of a dead worker"
            );
        }
        let handover = Handover {
            id: Some(id),
            resume: msg.resume,
            removed,
            carried: msg.carried,
            served,
        };
        if core.start_session(accepted, handover, hooks).is_err() {
            // From another thread: this one must go on reading, or a supervisor blocked sending
            // to it could never read this.
            let c = Arc::clone(control);
            let _ = std::thread::Builder::new()
                .name("faultline-report".into())
                .spawn(move || {
                    let _ = send_msg(c.as_fd(), &Report::Ended { id, stats: None }, &[]);
                });
        }
    }
    // The supervisor is gone (killed): nothing new can come, but the VMs served here must not
    // freeze. Serve each live session until it ends, then exit.
    let live = core.server.sessions();
    tracing::error!(
        sessions = live.len(),
        "the supervisor is gone; serving the live sessions until they end, then exiting"
    );
    loop {
        let live = core.server.sessions();
        let Some(s) = live.first() else { break };
        s.wait_closed(Duration::from_secs(1));
    }
    tracing::info!("the last session ended; the worker exits");
    core.flush();
    std::process::exit(0);
}
