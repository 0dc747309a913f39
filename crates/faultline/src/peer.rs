//! The process behind a Unix socket: a pidfd that names the client, so a session can follow the
//! client's life rather than its socket's.
//!
//! # Why not the socket
//! Firecracker before v1.12 closed its end of the handler's socket right after sending the
//! userfaultfd (`send_with_fd`), then loaded the snapshot and ran the guest. A handler that ends a
//! session when the socket hangs up stops serving that VM 0.1 ms after it started: the next guest
//! page fault sleeps forever (inside `PUT /snapshot/load` already). The socket says nothing about
//! whether the guest still needs its pages; the process does.
//!
//! # How the process is named
//! - **`SO_PEERPIDFD`** (Linux 6.5+): the kernel hands out a pidfd of the process that called
//!   `connect()`, taken at connect time: exact, even if that process has exited since (a pidfd of
//!   a process that is gone is readable at once) and whatever pid namespace it lives in.
//! - **Fallback** (older kernels): `pidfd_open(pid)` with the pid `SO_PEERCRED` reported, called
//!   right after `accept` (before a byte of the handshake is read) and checked afterwards to run
//!   as the uid `SO_PEERCRED` reported. A pid is reused only once its process has been reaped and
//!   the kernel's pids wrapped round, so the window is the instant between the client's
//!   `connect()` and our `accept()`; the check narrows it, it cannot close it (only
//!   `SO_PEERPIDFD` can). The socket's state is no evidence either way: Firecracker before
//!   v1.12 closes its end right after the handshake while it lives on. Where the peer's pid is
//!   not visible (0: a client in a sibling pid namespace) there is no pidfd at all.
//!
//! The `getsockopt(SO_PEERPIDFD)` itself is [`faultline_uffd::socket::peer_pidfd`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::io::Errno;
use rustix::process::{pidfd_open, Pid, PidfdFlags};

use crate::firecracker::PeerCred;

/// Why the client process could not be named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The client process has already been reaped: nothing is left to serve.
    #[error("the client process (pid {pid}) is gone")]
    Gone {
        /// Its pid as `SO_PEERCRED` reported it.
        pid: i32,
    },
    /// The kernel cannot give a pidfd of this client: no `SO_PEERPIDFD` and no visible pid
    /// (a client in another pid namespace), or no pidfd support at all (before Linux 5.3).
    #[error("the kernel cannot name the client process ({why})")]
    Unsupported {
        /// What was missing.
        why: &'static str,
    },
    /// The pid `SO_PEERCRED` reported now names another process (reused after the client
    /// exited).
    #[error("pid {pid} can no longer be tied to the client: {why}")]
    NotTheClient {
        /// The pid.
        pid: i32,
        /// What failed.
        why: String,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// The call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl PeerError {
    fn os(op: &'static str, errno: Errno) -> PeerError {
        PeerError::Os {
            op,
            source: errno.into(),
        }
    }
}

/// A pidfd of the process at the other end of the connected Unix socket `socket`, whose
/// `SO_PEERCRED` credentials are `cred` (see the [module docs](self)). Close-on-exec.
pub fn client_pidfd(socket: impl AsFd, cred: &PeerCred) -> Result<OwnedFd, PeerError> {
    let socket = socket.as_fd();
    match faultline_uffd::socket::peer_pidfd(socket) {
        Ok(fd) => return Ok(fd),
        // Reaped before we asked (6.9+ refuse a pidfd of a process with no task left).
        Err(Errno::SRCH) => return Err(PeerError::Gone { pid: cred.pid }),
        // Before Linux 6.5 (or an architecture without the number here): the fallback.
        Err(Errno::NOPROTOOPT | Errno::INVAL | Errno::NOSYS) => {}
        Err(e) => return Err(PeerError::os("getsockopt(SO_PEERPIDFD)", e)),
    }
    pidfd_from_cred(cred)
}

/// The fallback of [`client_pidfd`]: `pidfd_open` of the credentials' pid, checked to run as
/// the client's uid. Call it right after `accept`.
pub fn pidfd_from_cred(cred: &PeerCred) -> Result<OwnedFd, PeerError> {
    let Some(pid) = Pid::from_raw(cred.pid) else {
        return Err(PeerError::Unsupported {
            why: "its pid is not visible in this pid namespace",
        });
    };
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(Errno::SRCH) => return Err(PeerError::Gone { pid: cred.pid }),
        Err(Errno::NOSYS) => {
            return Err(PeerError::Unsupported {
                why: "no pidfd_open (Linux 5.3+)",
            })
        }
        Err(e) => return Err(PeerError::os("pidfd_open", e)),
    };
    // The pidfd is taken: from now on it names one process whatever happens to the pid. Check
    // that process is the client's uid (a reused pid most likely is not).
    let uid = effective_uid(pid).map_err(|why| PeerError::NotTheClient { pid: cred.pid, why })?;
    if uid != cred.uid {
        return Err(PeerError::NotTheClient {
            pid: cred.pid,
            why: format!(
                "it runs as uid {uid}, the client connected as uid {}",
                cred.uid
            ),
        });
    }
    Ok(pidfd)
}

/// The effective uid of `pid` (`/proc/<pid>/status`, `Uid:` second field).
fn effective_uid(pid: Pid) -> Result<u32, String> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero()))
        .map_err(|e| format!("reading its /proc status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| "its /proc status has no Uid line".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// The pid a pidfd names (`Pid:` of its fdinfo).
    fn pid_of(pidfd: &OwnedFd) -> i32 {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
            .expect("fdinfo");
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Pid line")
    }

    fn me() -> PeerCred {
        PeerCred {
            pid: std::process::id() as i32,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    #[test]
    fn names_the_connecting_process() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let fd = client_pidfd(&a, &me()).expect("a pidfd");
        assert_eq!(pid_of(&fd), me().pid);
    }

    #[test]
    fn fallback_names_the_connecting_process() {
        let fd = pidfd_from_cred(&me()).expect("a pidfd");
        assert_eq!(pid_of(&fd), me().pid);
    }

    #[test]
    fn fallback_refuses_another_uid_and_a_hidden_pid() {
        let other = PeerCred {
            uid: me().uid.wrapping_add(1),
            ..me()
        };
        assert!(matches!(
            pidfd_from_cred(&other),
            Err(PeerError::NotTheClient { .. })
        ));
        let hidden = PeerCred { pid: 0, ..me() };
        assert!(matches!(
            pidfd_from_cred(&hidden),
            Err(PeerError::Unsupported { .. })
        ));
        let fd = pidfd_from_cred(&me()).expect("a pidfd");
        assert_eq!(pid_of(&fd), me().pid);
    }
}
