//! The daemon's error: one variant per thing that can fail, naming it and what it was given.
//!
//! A caller matches on what went wrong ([`Error::SocketInUse`], [`Error::OpenMemFile`], ...);
//! an operator reads it: each variant's message says what failed and with which path, address
//! or value ("opening the memory file /x"), and the error that caused it is its
//! [`source`](std::error::Error::source), never repeated in the message. A reporter that walks
//! the chain (`anyhow`'s `{:#}` or its "Caused by:" list) shows the whole story: "opening the
//! memory file /x: No such file or directory". The daemon's own logs print the chain on one line
//! the same way.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use faultline::firecracker::HandshakeError;
use faultline::image::ImageError;
use faultline::peer::PeerError;
use faultline::policy::WorkingSetError;
use faultline::remote::RemoteError;
use faultline::source::ObjectError;
use faultline::{ServerError, SourceError};

/// `Result` with the daemon's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What failed in the daemon: serving a snapshot, its socket, a client's handshake, a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // The configuration.
    /// Neither a memory file, an image, an object nor a remote page server was given.
    #[error("nothing to serve: give --mem-file or --image")]
    NothingToServe,
    /// More than one snapshot was given.
    #[error("serve one snapshot: give only one of --mem-file, --image, --remote and --object-url")]
    SeveralSnapshots,
    /// `--image-id` was given without `--image`.
    #[error("--image-id checks the image given with --image; there is none")]
    ImageIdWithoutImage,
    /// The object store's block size is not a positive multiple of 4 KiB.
    #[error("--object-block-kib {block_kib} is not a positive multiple of 4")]
    ObjectBlockSize {
        /// The block size given, in KiB.
        block_kib: u64,
    },

    // The snapshot.
    /// The memory file at `path` cannot be opened (or its length read).
    #[error("opening the memory file {}", path.display())]
    OpenMemFile {
        /// The memory file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file a supervisor handed over cannot be read (its length, its time).
    #[error("reading the memory file {name}")]
    ReadMemFile {
        /// The file's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file a supervisor handed over cannot be mapped.
    #[error("mapping the memory file {name}")]
    MapMemFile {
        /// The file's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The start-up scan of the memory file for zero pages failed.
    #[error("scanning the memory file {} for zero pages", path.display())]
    ZeroScan {
        /// The memory file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<SourceError>,
    },
    /// The memory file a supervisor handed over changed length since its sessions started.
    #[error(
        "the memory file {name} is now {now} bytes, not the {want} its sessions started on: \
         refusing to serve it"
    )]
    MemFileResized {
        /// The file's name.
        name: String,
        /// Its length now.
        now: u64,
        /// Its length when the supervisor opened it.
        want: u64,
    },
    /// The memory file a supervisor handed over was written (in place) since its sessions
    /// started.
    #[error(
        "the memory file {name} was written since its sessions started on it: refusing to serve it"
    )]
    MemFileWritten {
        /// The file's name.
        name: String,
    },
    /// The image at `path` cannot be opened (a file, or its base layers), or is not valid.
    #[error("opening the image {}", path.display())]
    OpenImage {
        /// The image (its top layer).
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// A layer of the image a supervisor handed over cannot be read.
    #[error("reading the image {name}")]
    ReadImageLayer {
        /// The layer's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A layer of the image cannot be kept open to hand it to the workers.
    #[error("keeping the image {name} open")]
    KeepImageOpen {
        /// The layer's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is not the one `--image-id` names, or its id cannot vouch for its pages.
    #[error("checking the image {image} against --image-id")]
    ImageId {
        /// The image (a path or a URL).
        image: String,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// The image a supervisor handed over was rewritten in place since it opened it.
    #[error(
        "the image {} is no longer the one the supervisor opened (id {}, was {}): refusing to \
         serve it",
        path.display(),
        faultline::image::hex(id),
        faultline::image::hex(was)
    )]
    ImageChanged {
        /// The image.
        path: PathBuf,
        /// Its id now.
        id: [u8; 32],
        /// Its id when the supervisor opened it.
        was: [u8; 32],
    },
    /// The object at `url` cannot be opened (its HEAD request, the cache directory).
    #[error("opening {url}")]
    OpenObject {
        /// The object.
        url: String,
        /// Why.
        #[source]
        source: Box<ObjectError>,
    },
    /// The image in an object store cannot be read (its header and tables).
    #[error("reading the image {url}")]
    ReadObjectImage {
        /// The image's object.
        url: String,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// The image in an object store is a diff, which is not served from a store.
    #[error("{url}: diffs in an object store are not supported yet; serve a full image")]
    ObjectImageDiff {
        /// The image's object.
        url: String,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// The remote page server at `addr` cannot be served from (connecting, its hello, the
    /// source it announces).
    #[error("connecting to the remote page server {addr}")]
    ConnectRemote {
        /// The page server's address.
        addr: String,
        /// Why.
        #[source]
        source: Box<RemoteError>,
    },
    /// The remote page server at `addr` did not say what it serves.
    #[error("asking the remote page server {addr}")]
    ProbeRemote {
        /// The page server's address.
        addr: String,
        /// Why.
        #[source]
        source: Box<RemoteError>,
    },
    /// The working-set file at `path` cannot be read.
    #[error("reading the working set {}", path.display())]
    WorkingSet {
        /// The working-set file.
        path: PathBuf,
        /// Why.
        #[source]
        source: WorkingSetError,
    },
    /// The background prefetch of the working set cannot be started.
    #[error("starting the working-set prefetch")]
    StartPrefetch {
        /// Why.
        #[source]
        source: std::io::Error,
    },

    // Serving.
    /// The fault server cannot be started.
    #[error("starting the fault server")]
    StartServer {
        /// Why.
        #[source]
        source: ServerError,
    },
    /// The metrics listener cannot be bound.
    #[error("binding the metrics address {addr}")]
    BindMetrics {
        /// The address given.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fault server cannot take an accepted client as a session.
    #[error("cannot serve client pid {pid}")]
    AddSession {
        /// The client's pid.
        pid: i32,
        /// Why.
        #[source]
        source: ServerError,
    },

    // The listening socket.
    /// What is at the socket's path cannot be examined.
    #[error("checking {}", path.display())]
    CheckSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another handler listens on the socket.
    #[error("{} is a live socket: another handler is serving it", path.display())]
    SocketInUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// A socket at the path cannot be checked for a listener, so it is not replaced.
    #[error(
        "{} is a socket that cannot be checked for a listener; not replacing it",
        path.display()
    )]
    SocketUncheckable {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket (nobody listens) cannot be removed.
    #[error("removing the stale socket {}", path.display())]
    RemoveStaleSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something that is not a socket is at the socket's path: it is left in place.
    #[error(
        "{} exists and is {kind}, not a socket: refusing to replace it (remove it or choose \
         another --socket)",
        path.display()
    )]
    NotASocket {
        /// The socket's path.
        path: PathBuf,
        /// What is there ("a regular file", "a directory", ...).
        kind: &'static str,
    },
    /// The listening socket cannot be bound.
    #[error("binding {}", path.display())]
    BindSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    // A client at the front door (see `crate::accept`).
    /// The handshake failed or is invalid (the error names the client and the problem).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The fd a client handed over as its userfaultfd cannot be adopted as one.
    #[error("client pid {pid}'s userfaultfd cannot be used")]
    ClientUffd {
        /// The client's pid.
        pid: i32,
        /// Why.
        #[source]
        source: faultline_uffd::Error,
    },
    /// The client's userfaultfd has `EVENT_FORK` enabled.
    #[error(
        "client pid {pid}'s userfaultfd has EVENT_FORK enabled: the sessions of its forked \
         children could not be tied to a process, so they are not served (Firecracker never \
         enables EVENT_FORK)"
    )]
    EventFork {
        /// The client's pid.
        pid: i32,
    },
    /// The client runs as a uid `--allow-uid` does not list.
    #[error("client pid {pid} runs as uid {uid}, which --allow-uid does not list")]
    UidNotAllowed {
        /// The client's pid.
        pid: i32,
        /// Its uid.
        uid: u32,
    },
    /// As many handshakes as `--max-handshakes` allows are in progress.
    #[error(
        "client pid {pid}: {in_progress} handshakes are in progress, the most --max-handshakes \
         allows"
    )]
    HandshakesBusy {
        /// The client's pid.
        pid: i32,
        /// Handshakes in progress.
        in_progress: usize,
    },
    /// The client's process cannot be named (a pidfd): it is gone, or the call failed.
    #[error("naming the process of client pid {pid}")]
    ClientProcess {
        /// The client's pid.
        pid: i32,
        /// Why.
        #[source]
        source: PeerError,
    },
    /// The process stayed out of fds to name the client with for as long as a handshake may
    /// take.
    #[error(
        "out of fds to name the client for {} ms: connection closed",
        waited.as_millis()
    )]
    OutOfFdsToNameClient {
        /// How long it waited.
        waited: Duration,
    },
    /// An accepted connection cannot be set up (made blocking).
    #[error("setting up an accepted connection")]
    ClientSocket {
        /// Why.
        #[source]
        source: std::io::Error,
    },

    // Threads, processes, the supervisor and its worker.
    /// A thread cannot be started.
    #[error("cannot start a {name} thread")]
    Thread {
        /// What the thread is for.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket pair (a wake-up or control channel) cannot be created or duplicated.
    #[error("creating {purpose}")]
    SocketPair {
        /// What it is for.
        purpose: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The SIGTERM and SIGINT handlers cannot be installed.
    #[error("installing the SIGTERM and SIGINT handlers")]
    Signals {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The running program cannot be found (to start it again as the worker).
    #[error("finding the running program")]
    CurrentExe {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker process cannot be started.
    #[error("starting the serve worker {}", program.display())]
    SpawnWorker {
        /// The worker's program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker's control socket (its stdin) cannot be taken or read.
    #[error("using the control socket (the worker's stdin)")]
    ControlSocket {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor closed the control socket before its first message.
    #[error("the supervisor closed the control socket")]
    SupervisorGone,
    /// The supervisor's first message cannot be parsed.
    #[error("parsing the supervisor's first message")]
    InitMessage {
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The supervisor's first message names another number of files than it sent.
    #[error("the supervisor named {names} snapshot files and sent {fds}")]
    InitFiles {
        /// Files named.
        names: usize,
        /// Files sent.
        fds: usize,
    },
    /// The supervisor's main loop cannot wait (`poll`) for its worker and signals.
    #[error("polling the worker's control socket")]
    Poll {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A dead worker cannot be reaped.
    #[error("waiting for the serve worker to exit")]
    ReapWorker {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor's main loop panicked.
    #[error("the supervisor's main loop panicked")]
    SupervisorPanicked,
}

/// `e` and every error below it, on one line: "opening the memory file /x: No such file or
/// directory", as the daemon logs and reports errors.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    struct Chain<'a>(&'a (dyn std::error::Error + 'static));
    impl fmt::Display for Chain<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}", self.0)?;
            let mut next = self.0.source();
            while let Some(e) = next {
                write!(f, ": {e}")?;
                next = e.source();
            }
            Ok(())
        }
    }
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-line form the daemon logs shows the whole chain; the message alone names what
    /// failed, and a transparent variant shows its source's message and chain.
    #[test]
    fn the_alternate_form_shows_the_whole_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Error::OpenMemFile {
            path: "x".into(),
            source: io,
        };
        assert_eq!(e.to_string(), "opening the memory file x");
        assert_eq!(chain(&e), "opening the memory file x: gone");
        assert!(matches!(&e, Error::OpenMemFile { path, .. } if path.as_os_str() == "x"));
        let t = Error::SupervisorGone;
        assert_eq!(chain(&t), "the supervisor closed the control socket");
    }
}
