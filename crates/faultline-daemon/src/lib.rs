//! The Firecracker page-fault handler daemon as a library: what `faultline serve` runs, for a
//! platform that embeds the handler in its own Rust process.
//!
//! A daemon listens on a Unix socket (Firecracker's `mem_backend.backend_path`); every
//! connection is one Firecracker process restoring a snapshot, which sends its guest memory
//! regions and its userfaultfd in one handshake ([`faultline::firecracker`]). The daemon
//! validates it and serves the client's page faults from the snapshot as a session of a
//! [`faultline::Server`], until the client process exits.
//!
//! - [`DaemonConfig`]: what is served (a memory file, an image, an object store, a remote page
//!   server) and how (readahead, working-set record and prefetch, background fill, fault
//!   deadline, what ends an unservable fault, the front door's limits).
//! - [`Daemon`]: the daemon in this process: [`Daemon::start`], its sessions and counters,
//!   [`Daemon::shutdown`].
//! - [`Supervisor`]: the same, crash-safe: sessions are served by a worker process that is
//!   restarted, its sessions resumed, when it dies. The worker is a program the supervisor
//!   starts; see [`worker`] for the one line a host's `main` needs.
//!
//! Modules: [`accept`] (the socket, the accept loop, the handshakes), `sessions` (a client
//! becomes a session), [`snapshot`] (opening and pinning what is served), [`supervisor`],
//! [`worker`], `control` (the supervisor–worker messages).
//!
//! # Example
//! Serve a memory file in this process, then stop:
//! ```no_run
//! # fn main() -> Result<(), faultline_daemon::Error> {
//! use faultline_daemon::{Daemon, DaemonConfig};
//!
//! let config = DaemonConfig {
//!     workers: Some(2),
//!     ..DaemonConfig::mem_file("/srv/snapshots/vm1.mem")
//! };
//! let daemon = Daemon::start(&config, "/run/faultline.sock")?;
//! // ... Firecracker restores with backend_path "/run/faultline.sock" ...
//! println!("{} sessions, {} pages served", daemon.sessions().len(), daemon.stats().pages);
//! daemon.shutdown();
//! # Ok(())
//! # }
//! ```
//! (`no_run`: serving needs userfaultfd; `examples/embed.rs` runs the same on a temporary
//! socket, and `tests/embed.rs` serves a real client through it.)
//!
//! # Cargo features of `faultline` it needs
//! Images (`image`), object stores (`object-store`) and remote page servers (`remote`).
#![forbid(unsafe_code)]

pub mod accept;
mod config;
mod control;
mod daemon;
mod error;
mod sessions;
pub mod snapshot;
pub mod supervisor;
pub mod worker;

pub use config::{DaemonConfig, ObjectConfig, OnExit, OnUnservable, ReadaheadPolicy, RemoteConfig};
pub use daemon::{Daemon, SESSION_END_LIMIT};
pub use error::{Error, Result};
pub use supervisor::{StopHandle, Supervisor};
pub use worker::WorkerCommand;

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
