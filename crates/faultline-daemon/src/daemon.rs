//! The daemon in this process (unsupervised): the accept loop on a thread of its own, every
//! session in this process's fault server.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline::{Server, SessionHandle, Stats};

use crate::accept::{accept_loop, bind, Accepted, ConnCtx};
use crate::config::{DaemonConfig, OnExit};
use crate::error::{Error, Result};
use crate::sessions::{Core, Handover, Hooks};

/// How long a stopping daemon waits for its sessions to finish ending (summaries logged, working
/// sets written).
pub const SESSION_END_LIMIT: Duration = Duration::from_secs(5);

/// A running daemon in this process: its socket accepts Firecracker clients, each served as a
/// session of one fault server. Dropping it shuts it down (as [`Daemon::shutdown`], without the
/// drain).
pub struct Daemon {
    server: Arc<Server>,
    core: Arc<Core>,
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    on_exit: OnExit,
    accept: Option<std::thread::JoinHandle<()>>,
    wake: UnixStream,
    started: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Daemon {
    /// Open the snapshot, start the fault server (and its metrics endpoint), bind `socket`
    /// (mode 0600; a stale socket is replaced, a live one or anything else there is an error)
    /// and start accepting clients.
    pub fn start(config: &DaemonConfig, socket: impl AsRef<Path>) -> Result<Daemon> {
        let socket = socket.as_ref();
        let core = Arc::new(Core::build(config)?);
        let core_keep = Arc::clone(&core);
        let listener = bind(socket)?;
        let server = Arc::clone(&core.server);
        let started = Arc::clone(&core.started);
        let refused = Arc::clone(&core.refused);
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_rx, wake) = UnixStream::pair().map_err(|source| Error::SocketPair {
            purpose: "the accept loop's wake-up socket pair",
            source,
        })?;
        let dispatch = Box::new(move |c: Accepted| {
            let _ = core.start_session(c, Handover::default(), Hooks::default());
        });
        let ctx = Arc::new(ConnCtx::new(
            config,
            core_keep.limits(config),
            Arc::clone(&refused),
            dispatch,
        ));
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("faultline-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, stop2, ctx))
            .map_err(|source| Error::Thread {
                name: "accept loop",
                source,
            })?;
        tracing::info!(socket = %socket.display(), snapshot = %config.snapshot_name(), "serving");
        Ok(Daemon {
            server,
            core: core_keep,
            stop,
            socket: socket.to_path_buf(),
            on_exit: config.on_exit,
            accept: Some(accept),
            wake,
            started,
            refused,
        })
    }

    /// The fault server: its sessions, counters ([`Server::stats`]) and Prometheus text
    /// ([`Server::prometheus`]).
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The live sessions.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.server.sessions()
    }

    /// The fault server's counters, all sessions together.
    pub fn stats(&self) -> Stats {
        self.server.stats()
    }

    /// Sessions started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Connections refused so far (a bad or unwelcome handshake, a source that cannot serve it).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop: with [`OnExit::Drain`], fill every session's remaining pages first; then stop
    /// accepting, remove the socket, end every session (waiting a bounded time for each to
    /// finish ending) and make the source's cache durable.
    pub fn shutdown(mut self) {
        if self.on_exit == OnExit::Drain {
            self.core.drain();
        }
        self.stop_accepting_and_end();
        self.core.flush();
    }

    fn stop_accepting_and_end(&mut self) {
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
            self.stop_accepting_and_end();
        }
    }
}
