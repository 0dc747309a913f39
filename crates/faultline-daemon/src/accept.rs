//! The front door: the listening socket, the accept loop, and each client's handshake.
//!
//! Listens on a Unix stream socket; every connection is one Firecracker process restoring a
//! snapshot (many clones of one snapshot at once is the normal case). The handshake (one JSON
//! message with the userfaultfd attached) is received and validated on its own thread with a
//! timeout, so a slow or silent client never holds up anyone else; a bad one is logged with the
//! problem named and its connection closed. A good one is dispatched (to become a session of the
//! fault server, in this process or in the supervised worker), which ends when the client
//! **process** exits (a pidfd, see [`faultline::peer`]), not when its socket hangs up:
//! Firecracker before v1.12 closes the socket right after the handshake and goes on running the
//! guest.
//!
//! # The front door's limits
//! - The client's credentials (`SO_PEERCRED`) are vetted against
//!   [`DaemonConfig::allow_uid`](crate::DaemonConfig::allow_uid) right after `accept`, before a
//!   byte is read and before any thread is started for it.
//! - At most [`DaemonConfig::max_handshakes`](crate::DaemonConfig::max_handshakes) handshakes are
//!   received at once, each on its own thread and each holding at most [`Limits::max_message`]
//!   bytes: threads and bytes in flight are bounded. Over the cap, a connection whose whole
//!   handshake is already there (Firecracker sends it in one message right after connecting;
//!   10 ms of grace) is received at once on the accept thread; any other is refused.
//! - An `accept` that fails (out of fds: `EMFILE`, `ENFILE`; out of memory) is retried after a
//!   pause that doubles from 5 ms to 1 s, instead of at once in a loop; the open-file soft limit
//!   is raised to the hard limit at start ([`raise_fd_limit`](crate::raise_fd_limit)).
//! - Refusals and accept errors are logged at most [`faultline::ratelimit::LOG_BURST`] lines per
//!   cause per second; the rest are counted and reported in one line per cause and second
//!   ("similar log lines suppressed").
//! - The session's socket is kept open (by the supervisor) until the session ends, though it no
//!   longer decides anything: a client that watches it (Firecracker v1.12+ keeps its end open)
//!   still sees the handler hang up when, and only when, its session is over.
//!
//! # A refused client that handed over its memory is ended
//! Firecracker connects, sends its regions with its userfaultfd and goes on: it never reads an
//! answer, and its memory is registered. Refused after that (a handshake that fails validation, a
//! userfaultfd with `EVENT_FORK`, fds the kernel could not deliver because this process is out of
//! them, a session the fault server or the snapshot cannot take, no worker to serve it), its vCPUs
//! would wait on their first fault for ever. So such a client is ended explicitly — SIGKILL
//! through the pidfd taken before its handshake was read — and the end is logged
//! ([`end_refused_client`]). A connection refused before it handed anything (credentials, the
//! handshake cap, garbage without a userfaultfd) is only closed.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline::firecracker::{self, Limits};
use faultline::ratelimit::LogLimit;
use faultline_uffd::{Features, Uffd};

use crate::config::DaemonConfig;
use crate::error::{chain, Error, Result};

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
    pub error: Error,
    /// The client had handed over its userfaultfd (its memory is registered): it must be ended.
    pub handed_uffd: bool,
}

impl Refusal {
    fn new(cause: &'static str, error: impl Into<Error>) -> Refusal {
        Refusal {
            cause,
            error: error.into(),
            handed_uffd: false,
        }
    }

    fn after_handover(cause: &'static str, error: impl Into<Error>) -> Refusal {
        Refusal {
            handed_uffd: true,
            ..Refusal::new(cause, error)
        }
    }
}

impl From<firecracker::HandshakeError> for Refusal {
    fn from(e: firecracker::HandshakeError) -> Refusal {
        Refusal::new(e.cause(), e)
    }
}

impl From<firecracker::Rejected> for Refusal {
    fn from(r: firecracker::Rejected) -> Refusal {
        Refusal {
            handed_uffd: r.handed_uffd,
            ..Refusal::from(r.error)
        }
    }
}

/// End a client that was refused after it handed over its userfaultfd (see the module docs):
/// SIGKILL through its pidfd, logged at error level with `why`. Without a pidfd (a kernel that
/// cannot name processes) the client cannot be ended safely by pid; that is logged too.
/// Returns whether the client was ended (or had exited already).
pub fn end_refused_client(pidfd: Option<&OwnedFd>, pid: i32, why: &str) -> bool {
    let Some(pidfd) = pidfd else {
        tracing::error!(
            pid,
            why,
            "refused after it handed over its memory, and no pidfd names it: it cannot be ended \
             and will wait on its first fault"
        );
        return false;
    };
    match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
        Ok(()) => {
            tracing::error!(
                pid,
                why,
                "client ended (SIGKILL): refused after it handed over its memory, which nobody \
                 would serve"
            );
            true
        }
        Err(rustix::io::Errno::SRCH) => true,
        Err(e) => {
            tracing::error!(pid, why, error = %e, "cannot end a refused client that handed over its memory");
            false
        }
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
    let hs = firecracker::receive_handshake_or_rejected(&stream, limits)?;
    let uffd = Uffd::from_received_fd(hs.uffd).map_err(|source| {
        Refusal::after_handover(
            "fds",
            Error::ClientUffd {
                pid: peer.pid,
                source,
            },
        )
    })?;
    if uffd.features().contains(Features::EVENT_FORK) {
        // Every fork() of the client would hand us the userfaultfd of a child that no pidfd ties
        // to a process (the kernel names none): a session that could never end. Firecracker
        // never asks for it.
        return Err(Refusal::after_handover(
            "event-fork",
            Error::EventFork { pid: peer.pid },
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

/// What became of a new connection in [`ConnCtx::admit`].
enum Admit {
    /// Taken or refused.
    Done,
    /// Refused for want of a resource (a thread): pause before the next accept.
    Pause,
    /// The process is out of fds to name the client with: keep the connection, pause, and try
    /// it again.
    Later(UnixStream),
}

/// At the handshake cap, how long a new connection's message may take to arrive whole before it
/// is refused (a client connects, then sends at once; one that trickles keeps a slot waiting).
const AT_CAP_GRACE: Duration = Duration::from_millis(10);

/// The window of the log's rate limit.
pub const LOG_WINDOW: Duration = Duration::from_secs(1);

/// The accept loop's state: the limits a connection is held to, and what is done with a good
/// handshake (on the handshake's thread).
pub(crate) struct ConnCtx {
    limits: Limits,
    allow_uids: Vec<u32>,
    max_handshakes: usize,
    end_refused: bool,
    /// The threads receiving handshakes (those ended are joined by the accept loop).
    in_flight: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    refused: Arc<AtomicU64>,
    log: LogLimit,
    #[allow(clippy::type_complexity)]
    dispatch: Box<dyn Fn(Accepted) + Send + Sync>,
}

impl ConnCtx {
    pub(crate) fn new(
        config: &DaemonConfig,
        limits: Limits,
        refused: Arc<AtomicU64>,
        dispatch: Box<dyn Fn(Accepted) + Send + Sync>,
    ) -> ConnCtx {
        ConnCtx {
            limits,
            allow_uids: config.allow_uid.clone(),
            max_handshakes: usize::try_from(config.max_handshakes).unwrap_or(usize::MAX),
            end_refused: config.end_refused_clients,
            in_flight: std::sync::Mutex::new(Vec::new()),
            refused,
            log: LogLimit::with_window(LOG_WINDOW),
            dispatch,
        }
    }

    /// A received handshake becomes a session (dispatched), or is refused; a client refused
    /// after it handed over its userfaultfd is ended through `pidfd`.
    fn conclude(
        &self,
        result: Result<Accepted, Refusal>,
        pidfd: Option<OwnedFd>,
        peer: firecracker::PeerCred,
    ) {
        match result {
            Ok(mut c) => {
                c.pidfd = pidfd;
                (self.dispatch)(c)
            }
            Err(r) => {
                let handed = r.handed_uffd;
                let why = format!("{}: {}", r.cause, chain(&r.error));
                self.refuse(r);
                if handed && self.end_refused {
                    end_refused_client(pidfd.as_ref(), peer.pid, &why);
                }
            }
        }
    }

    /// Counts and logs (rate-limited per cause) a refused connection; the caller closes it.
    fn refuse(&self, r: Refusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.log.allow(r.cause) {
            tracing::warn!(cause = r.cause, error = %chain(&r.error), "handshake refused; connection closed");
        }
    }

    /// A new connection: vetted by its credentials and the cap before anything is read, then
    /// its handshake received on a thread of its own. [`Admit::Later`] when the process is out
    /// of fds to name the client with: the accept loop keeps the connection, pauses as for a
    /// failed accept and tries it again (a client dropped here would have handed over its memory
    /// for nothing: it would wait on its first fault for ever).
    fn admit(self: &Arc<Self>, stream: UnixStream) -> Admit {
        let peer = match firecracker::peer_cred(&stream) {
            Ok(p) => p,
            Err(e) => {
                self.refuse(e.into());
                return Admit::Done;
            }
        };
        if !self.allow_uids.is_empty() && !self.allow_uids.contains(&peer.uid) {
            self.refuse(Refusal::new(
                "uid",
                Error::UidNotAllowed {
                    pid: peer.pid,
                    uid: peer.uid,
                },
            ));
            return Admit::Done;
        }
        // Only this thread adds to `in_flight`, so the check holds until the add. The threads
        // whose handshake is over are joined first: a slot is free only once its thread is gone,
        // so the threads alive never exceed the cap (counted by a number freed as each thread's
        // work ended, a flood on a loaded machine was seen with 99 threads for a cap of 64:
        // threads that had freed their slot but not yet exited). At the cap, a
        // client whose whole handshake already waits (Firecracker sends it in one message right
        // after connecting) is still taken, here, at once: it costs no wait, and refusing it
        // would leave its registered memory unserved. Only clients that keep a handshake slot
        // waiting are refused.
        let busy = {
            let mut threads = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (ended, live): (Vec<_>, Vec<_>) = threads
                .drain(..)
                .partition(std::thread::JoinHandle::is_finished);
            *threads = live;
            for t in ended {
                // It has returned: the join only waits for the thread itself to exit.
                let _ = t.join();
            }
            threads.len()
        };
        let inline = busy >= self.max_handshakes
            && firecracker::handshake_waiting(&stream, self.limits.max_message, AT_CAP_GRACE);
        if busy >= self.max_handshakes && !inline {
            self.refuse(Refusal::new(
                "busy",
                Error::HandshakesBusy {
                    pid: peer.pid,
                    in_progress: busy,
                },
            ));
            return Admit::Done;
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
            Err(source @ faultline::peer::PeerError::Gone { .. }) => {
                self.refuse(Refusal::new(
                    "gone",
                    Error::ClientProcess {
                        pid: peer.pid,
                        source,
                    },
                ));
                return Admit::Done;
            }
            Err(e) => {
                let out_of_fds = matches!(&e, faultline::peer::PeerError::Os { source, .. }
                    if matches!(source.raw_os_error(), Some(n) if n == rustix::io::Errno::MFILE.raw_os_error()
                        || n == rustix::io::Errno::NFILE.raw_os_error()));
                if out_of_fds {
                    if self.log.allow("pidfd-later") {
                        tracing::warn!(pid = peer.pid, error = %e, "out of fds to name a client: it is kept and tried again after a pause");
                    }
                    return Admit::Later(stream);
                }
                self.refuse(Refusal::new(
                    "pidfd",
                    Error::ClientProcess {
                        pid: peer.pid,
                        source: e,
                    },
                ));
                return Admit::Done;
            }
        };
        if inline {
            let result = accept_client(stream, peer, None, &self.limits);
            self.conclude(result, pidfd, peer);
            return Admit::Done;
        }
        let ctx = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("faultline-handshake".into())
            .spawn(move || {
                // The pidfd stays here until the handshake is good: a client refused after it
                // handed over its userfaultfd is ended through it.
                let result = accept_client(stream, peer, None, &ctx.limits);
                ctx.conclude(result, pidfd, peer);
            });
        match spawned {
            Ok(t) => self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(t),
            Err(e) => {
                self.refuse(Refusal::new(
                    "thread",
                    Error::Thread {
                        name: "handshake",
                        source: e,
                    },
                ));
                return Admit::Pause;
            }
        }
        Admit::Done
    }
}

/// Create the listening socket: mode 0600. What is at `path` already is replaced only if it is a
/// socket nobody listens on (a daemon that died); a live socket, and anything that is not a
/// socket (a file, a directory, a symlink — never followed), is an error naming it and left in
/// place.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::CheckSocket {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::SocketInUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| Error::RemoveStaleSocket {
                    path: path.to_path_buf(),
                    source,
                })?;
                tracing::info!(socket = %path.display(), "replaced a stale socket");
            }
            Err(source) => {
                return Err(Error::SocketUncheckable {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
        Ok(meta) => {
            return Err(Error::NotASocket {
                path: path.to_path_buf(),
                kind: file_kind(&meta.file_type()),
            })
        }
    }
    // Created 0600 from the start: no window in which others may connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = UnixListener::bind(path);
    rustix::process::umask(old);
    l.map_err(|source| Error::BindSocket {
        path: path.to_path_buf(),
        source,
    })
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
    // A connection kept for want of fds to name its client, and since when: tried again after
    // each pause, refused once it has waited as long as a handshake may take.
    let mut pending: Option<(UnixStream, std::time::Instant)> = None;
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
                    tracing::error!(error = %e, retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "poll on the listening socket failed");
                }
                continue;
            }
        }
        if !fds[0].revents().is_empty() || stop.load(Ordering::Acquire) {
            return;
        }
        if let Some((stream, since)) = pending.take() {
            match ctx.admit(stream) {
                Admit::Later(stream) if since.elapsed() < ctx.limits.timeout => {
                    pending = Some((stream, since));
                    backoff = Some(next_backoff(backoff));
                }
                Admit::Later(_) => {
                    ctx.refuse(Refusal::new(
                        "pidfd",
                        Error::OutOfFdsToNameClient {
                            waited: since.elapsed(),
                        },
                    ));
                    backoff = Some(next_backoff(backoff));
                }
                Admit::Pause => backoff = Some(next_backoff(backoff)),
                Admit::Done => backoff = None,
            }
            continue;
        }
        if backoff.is_none() && fds[1].revents().is_empty() {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(false) {
                    ctx.refuse(Refusal::new("io", Error::ClientSocket { source: e }));
                    continue;
                }
                backoff = match ctx.admit(stream) {
                    Admit::Done => None,
                    Admit::Pause => Some(next_backoff(backoff)),
                    Admit::Later(stream) => {
                        pending = Some((stream, std::time::Instant::now()));
                        Some(next_backoff(backoff))
                    }
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
                    tracing::warn!(error = %e, retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "accept failed; retrying after a pause");
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
