//! Sessions: what serving needs (the fault server, the snapshot's source, the policies new
//! sessions get), shared by the in-process daemon and the supervised worker, and how an accepted
//! client becomes a session of the fault server.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline::firecracker::Limits;
use faultline::source::PageSource;
use faultline::{EndHook, Readahead, Region, Server, ServerConfig, SessionOptions, WorkingSet};
use faultline_uffd::MemoryKind;

use crate::accept::Accepted;
use crate::config::{DaemonConfig, ReadaheadPolicy};
use crate::error::{Error, Result};
use crate::snapshot::{from_store, open_snapshot_from, Handed};

/// What serving needs, shared by the in-process daemon and the supervised worker: the fault
/// server, the memory file, and how new sessions are set up.
pub(crate) struct Core {
    /// The fault server.
    pub server: Arc<Server>,
    src: Arc<dyn PageSource>,
    prefetch: Option<WorkingSet>,
    background_fill: bool,
    /// [`DaemonConfig::fill_after_quiet`] for sessions given a working set.
    fill_after_quiet: Duration,
    record: Option<PathBuf>,
    on_unservable: faultline::Unservable,
    end_refused: bool,
    /// Sessions started so far.
    pub started: Arc<AtomicU64>,
    /// Handshakes refused so far.
    pub refused: Arc<AtomicU64>,
}

impl Core {
    /// Open the memory file, load the working set, start the fault server and metrics.
    pub(crate) fn build(config: &DaemonConfig) -> Result<Core> {
        Core::build_from(config, None)
    }

    /// [`Core::build`], serving `handed` (the snapshot a supervisor opened and pinned) instead
    /// of opening the snapshot by its path.
    pub(crate) fn build_from(config: &DaemonConfig, handed: Option<Handed>) -> Result<Core> {
        let src = open_snapshot_from(config, handed)?;
        let prefetch = match &config.prefetch_ws {
            Some(p) => Some(WorkingSet::load(p).map_err(|source| Error::WorkingSet {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        let readahead = match config.readahead {
            ReadaheadPolicy::Off => Readahead::Off,
            ReadaheadPolicy::Fixed => Readahead::Fixed {
                pages: config.readahead_pages,
            },
            ReadaheadPolicy::Adaptive => Readahead::Adaptive {
                min_pages: config.readahead_min_pages,
                max_pages: config.readahead_pages,
            },
        };
        let mut server_config = ServerConfig {
            readahead,
            pin_workers: config.pin_workers,
            fault_deadline: config.fault_deadline.max(Duration::from_secs(1)),
            ..ServerConfig::default()
        };
        if config.simulate_no_poison {
            server_config.missing_features = faultline_uffd::Features::POISON;
        }
        if config.remote.is_some() {
            server_config.workers = ServerConfig::network_workers();
            // A remote read that waits for a reconnect fails as retryable and is retried; the
            // remote source's deadline (--remote-deadline) decides when a page is given up.
            server_config.source_attempts = u32::MAX;
        }
        server_config.background_workers = background_workers(config);
        server_config.idle_fill = config.idle_fill;
        if let Some(w) = config.workers {
            server_config.workers = w.max(1);
        }
        if from_store(config) {
            // A store that blips (a dropped connection, a 503) gets about 1.5 s of retries
            // (50, 100, 200, 400, 800 ms) before a page is poisoned.
            server_config.source_attempts = 6;
            server_config.retry_backoff = Duration::from_millis(50);
        }
        let server =
            Arc::new(Server::start(server_config).map_err(|source| Error::StartServer { source })?);
        if let Some(addr) = &config.metrics {
            serve_metrics(addr, Arc::clone(&server))?;
        }
        Ok(Core {
            server,
            src,
            prefetch,
            background_fill: config.background_fill
                || config.prefetch_ws.is_some()
                || (config.remote.is_some() && config.remote_options.stream),
            fill_after_quiet: if config.prefetch_ws.is_some() {
                config.fill_after_quiet
            } else {
                Duration::ZERO
            },
            record: config.record_ws.clone(),
            on_unservable: config.on_unservable.into(),
            end_refused: config.end_refused_clients,
            started: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The handshake limits for this memory file.
    pub fn limits(&self, config: &DaemonConfig) -> Limits {
        Limits {
            timeout: config.handshake_timeout.max(Duration::from_secs(1)),
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
        // Kept until the session is in: a client refused now has handed over its memory and is
        // ended through it (see `crate::accept`).
        let ender = c
            .pidfd
            .as_ref()
            .filter(|_| self.end_refused)
            .and_then(|p| p.try_clone().ok());
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
            fill_after_quiet: self.fill_after_quiet,
            watch,
            pidfd,
            readahead: None,
            on_end: Some(on_end),
            on_remove: hooks.removed,
            resume: handover.resume,
            removed: handover.removed,
            id: handover.id,
            carried: handover.carried,
            served_log: handover.served,
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
                if self.end_refused {
                    crate::accept::end_refused_client(
                        ender.as_ref(),
                        peer.pid,
                        &format!("cannot serve this client: {e}"),
                    );
                }
                Err(Error::AddSession {
                    pid: peer.pid,
                    source: e,
                })
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
    /// Where the pages made present are marked, kept by the supervisor across workers.
    pub served: Option<faultline::ServedLog>,
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

/// A minimal HTTP endpoint with the Prometheus text of the server and its sessions.
fn serve_metrics(addr: &str, server: Arc<Server>) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::BindMetrics {
        addr: addr.to_string(),
        source,
    })?;
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
    }).map_err(|source| Error::Thread { name: "metrics", source })?;
    Ok(())
}

/// [`DaemonConfig::background_workers`], resolved: one for a local snapshot, every worker (0)
/// for a remote page server or an object store, or what was asked for.
fn background_workers(config: &DaemonConfig) -> usize {
    let network = config.remote.is_some() || from_store(config);
    config
        .background_workers
        .unwrap_or(if network { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_takes_one_worker_for_a_local_snapshot_and_all_for_the_network() {
        let mut config = DaemonConfig::mem_file("/snap/mem");
        assert_eq!(background_workers(&config), 1, "a memory file");
        config.background_workers = Some(3);
        assert_eq!(background_workers(&config), 3, "as asked");
        let mut config = DaemonConfig::mem_file("/snap/mem");
        config.mem_file = None;
        config.remote = Some("127.0.0.1:7000".into());
        assert_eq!(
            background_workers(&config),
            0,
            "a remote page server: every worker"
        );
        let mut config = DaemonConfig::mem_file("/snap/mem");
        config.mem_file = None;
        config.image = Some("s3://bucket/mem.img".into());
        assert_eq!(
            background_workers(&config),
            0,
            "an image in an object store"
        );
        config.image = Some("/snap/mem.img".into());
        assert_eq!(background_workers(&config), 1, "a local image");
    }
}
