//! What a daemon serves and how: [`DaemonConfig`], built by the host (the `faultline serve`
//! command line, or an orchestrator's own settings).
//!
//! The config is plain data (serde): a supervisor hands it to each worker process in its first
//! message, so a worker needs no command line of its own.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a daemon serves its clients' faults: the snapshot (exactly one of [`mem_file`],
/// [`image`], [`object`](ObjectConfig::url) and [`remote`]), the fault server's policies, and
/// the front door's limits.
///
/// [`mem_file`]: DaemonConfig::mem_file
/// [`image`]: DaemonConfig::image
/// [`remote`]: DaemonConfig::remote
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonConfig {
    /// The snapshot memory file (Firecracker's `mem_file_path`), mmapped.
    pub mem_file: Option<PathBuf>,
    /// A faultline image instead of a raw memory file (a local path, or `s3://bucket/key`
    /// read through [`DaemonConfig::object`]); a diff is served over its base. Every page is
    /// checked against its hash before it is served; a bad page is poisoned, never served.
    pub image: Option<PathBuf>,
    /// Serve the image only if its id is this one (with BLAKE3 page hashes only).
    pub image_id: Option<[u8; 32]>,
    /// Serve pages fetched from a remote page server (`host:port`, `faultline export`).
    pub remote: Option<String>,
    /// Tuning of [`DaemonConfig::remote`].
    pub remote_options: RemoteConfig,
    /// A raw memory file in an object store ([`ObjectConfig::url`]), and the store's settings
    /// (also used by an `s3://` [`DaemonConfig::image`]).
    pub object: ObjectConfig,
    /// Scan the memory file for zero pages at start (they are then served with ZEROPAGE).
    pub zero_scan: bool,
    /// Fault-serving worker threads (default: number of CPUs; one more for a remote source).
    pub workers: Option<usize>,
    /// Pin worker thread i to CPU i.
    pub pin_workers: bool,
    /// Readahead policy.
    pub readahead: ReadaheadPolicy,
    /// Readahead window in pages (the maximum for adaptive).
    pub readahead_pages: usize,
    /// Adaptive readahead's smallest window in 4 KiB pages: a fault that continues no sequential
    /// stream is served with the aligned block of this many pages that holds it (at least one
    /// huge page). Default 64 (256 KiB): a restored guest's scattered touches cluster, and 64-page
    /// blocks took Firecracker restores from ~70 handler faults to ~40 (docs/firecracker.md).
    pub readahead_min_pages: usize,
    /// Record each session's first-touch order into this file when it ends.
    pub record_ws: Option<PathBuf>,
    /// Replay this recorded working set into every new session ahead of demand, then fill the
    /// rest in the background.
    pub prefetch_ws: Option<PathBuf>,
    /// Fill every page in the background once demand is served (implied by `prefetch_ws` and
    /// a streaming remote).
    pub background_fill: bool,
    /// With `prefetch_ws`: the fill of the pages outside the working set starts once a session
    /// has gone this long without a demand fault (the working set is pushed first either way),
    /// so that it does not compete with the restored guest's start-up; zero: at once.
    pub fill_after_quiet: Duration,
    /// Workers that do background work (readahead past a fault's first chunk, the working set,
    /// the fill) at once; the others serve demand faults only. `None`: one for a local snapshot
    /// (a memory file or a local image: the work is copying, and a restored guest's VMM thread and
    /// vCPUs need the other CPUs), every worker for a remote page server or an object store (the
    /// work is waiting on the network). `Some(0)`: every worker.
    pub background_workers: Option<usize>,
    /// Make the background fill's copies in the idle scheduling class (`SCHED_IDLE`): they take
    /// only CPU time the restored guest leaves (see [`faultline::ServerConfig::idle_fill`]).
    pub idle_fill: bool,
    /// Serve Prometheus metrics on this TCP address, path `/metrics`.
    pub metrics: Option<String>,
    /// How long a client may take to send its handshake (at least a second).
    pub handshake_timeout: Duration,
    /// Handshakes received at once, at most; a connection over the cap is refused at once.
    pub max_handshakes: u64,
    /// Only clients running as these user ids are served (empty: any who can open the socket).
    pub allow_uid: Vec<u32>,
    /// What a stopping daemon does with its live sessions.
    pub on_exit: OnExit,
    /// What ends a fault that has no right bytes.
    pub on_unservable: OnUnservable,
    /// End (SIGKILL through its pidfd) a client refused after it handed over its userfaultfd:
    /// its memory is registered and nobody will serve it (see [`crate::accept`]). `false` only
    /// closes its connection, leaving it to wait on its first fault (tests that send handshakes
    /// from their own process).
    pub end_refused_clients: bool,
    /// How long a fault may stay unresolved before it is unservable (at least a second).
    pub fault_deadline: Duration,
    /// Behave as on a kernel without UFFDIO_POISON (tests of the kill fallback).
    pub simulate_no_poison: bool,
    /// Supervised: how long live sessions may go without a worker before their VMs are ended.
    pub worker_down_limit: Duration,
    /// Supervised: how long the worker may say nothing before it is killed and replaced.
    pub worker_hang_limit: Duration,
}

impl Default for DaemonConfig {
    /// Nothing to serve yet; every other setting as `faultline serve` defaults it.
    fn default() -> Self {
        DaemonConfig {
            mem_file: None,
            image: None,
            image_id: None,
            remote: None,
            remote_options: RemoteConfig::default(),
            object: ObjectConfig::default(),
            zero_scan: true,
            workers: None,
            pin_workers: false,
            readahead: ReadaheadPolicy::Adaptive,
            readahead_pages: 512,
            readahead_min_pages: 64,
            record_ws: None,
            prefetch_ws: None,
            background_fill: false,
            fill_after_quiet: Duration::from_millis(500),
            background_workers: None,
            idle_fill: true,
            metrics: None,
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 64,
            allow_uid: Vec::new(),
            on_exit: OnExit::Abandon,
            on_unservable: OnUnservable::Poison,
            end_refused_clients: true,
            fault_deadline: Duration::from_secs(60),
            simulate_no_poison: false,
            worker_down_limit: Duration::from_secs(30),
            worker_hang_limit: Duration::from_secs(5),
        }
    }
}

impl DaemonConfig {
    /// Serve the raw memory file at `path`.
    pub fn mem_file(path: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            mem_file: Some(path.into()),
            ..DaemonConfig::default()
        }
    }

    /// Serve the faultline image at `path` (or `s3://` URL).
    pub fn image(path: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            image: Some(path.into()),
            ..DaemonConfig::default()
        }
    }

    /// Serve the raw memory in an object store at `url` (`s3://bucket/key`).
    pub fn object(url: impl Into<String>) -> DaemonConfig {
        DaemonConfig {
            object: ObjectConfig {
                url: Some(url.into()),
                ..ObjectConfig::default()
            },
            ..DaemonConfig::default()
        }
    }

    /// Serve the pages of the remote page server at `addr` (`host:port`).
    pub fn remote(addr: impl Into<String>) -> DaemonConfig {
        DaemonConfig {
            remote: Some(addr.into()),
            ..DaemonConfig::default()
        }
    }

    /// The snapshot's name, for logs.
    pub fn snapshot_name(&self) -> String {
        if let Some(url) = &self.object.url {
            return url.clone();
        }
        if let Some(addr) = &self.remote {
            return format!("remote {addr}");
        }
        match (&self.image, &self.mem_file) {
            (Some(p), _) | (None, Some(p)) => p.display().to_string(),
            (None, None) => String::new(),
        }
    }
}

/// Readahead policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadaheadPolicy {
    /// Only the faulting page.
    Off,
    /// A fixed window of [`DaemonConfig::readahead_pages`].
    Fixed,
    /// Grow on sequential faults up to [`DaemonConfig::readahead_pages`], shrink on random ones.
    Adaptive,
}

/// What ends a fault that has no right bytes (its source cannot be read, the kernel refuses the
/// resolve, it lies outside every region, it is unresolved past the fault deadline). Either way
/// it is logged, and no wrong or zero page is ever served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What a stopping daemon does with live sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnExit {
    /// Stop serving at once (a guest touching a missing page then waits: Firecracker keeps its
    /// own userfaultfd).
    Abandon,
    /// Fill every session's remaining pages, then stop.
    Drain,
}

/// Settings of a remote source ([`DaemonConfig::remote`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfig {
    /// Stream the whole memory in the background, ahead of demand.
    pub stream: bool,
    /// How long the remote may stay unreachable before reads of missing pages fail for good.
    pub deadline: Duration,
    /// Most bytes of streamed pages held before the guest reads them.
    pub cache_bytes: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            stream: false,
            deadline: Duration::from_secs(30),
            cache_bytes: 256 << 20,
        }
    }
}

impl RemoteConfig {
    /// The source options these settings ask for.
    pub fn options(&self) -> faultline::remote::RemoteOptions {
        faultline::remote::RemoteOptions {
            stream: self.stream,
            deadline: self.deadline.max(Duration::from_secs(1)),
            cache_bytes: self.cache_bytes.max(1 << 20),
            ..faultline::remote::RemoteOptions::default()
        }
    }
}

/// An object store (S3-compatible): the memory's URL, the store and the local cache.
/// Credentials come from the usual `AWS_*` environment variables, never from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectConfig {
    /// A raw memory file in the store (`s3://bucket/key`); for an image there, use
    /// [`DaemonConfig::image`].
    pub url: Option<String>,
    /// The store's endpoint (default: `AWS_ENDPOINT`, else AWS itself).
    pub endpoint: Option<String>,
    /// The store's region (default: `AWS_REGION`, else us-east-1).
    pub region: Option<String>,
    /// Keep fetched blocks here, across restarts (default: a private temporary directory).
    pub cache_dir: Option<PathBuf>,
    /// Most MiB the cache keeps on disk.
    pub cache_mib: u64,
    /// KiB per ranged GET and cache block (a multiple of 4).
    pub block_kib: u64,
    /// Most GETs in flight at once.
    pub parallel: usize,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        ObjectConfig {
            url: None,
            endpoint: None,
            region: None,
            cache_dir: None,
            cache_mib: 1024,
            block_kib: 1024,
            parallel: 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor hands the config to each worker as JSON: every setting arrives unchanged.
    #[test]
    fn a_config_reaches_the_worker_unchanged() {
        let config = DaemonConfig {
            image_id: Some([0xab; 32]),
            remote_options: RemoteConfig {
                stream: true,
                deadline: Duration::from_millis(1500),
                cache_bytes: 3 << 20,
            },
            workers: Some(3),
            readahead: ReadaheadPolicy::Fixed,
            readahead_min_pages: 4,
            record_ws: Some("/tmp/ws".into()),
            allow_uid: vec![0, 1000],
            on_exit: OnExit::Drain,
            on_unservable: OnUnservable::Kill,
            end_refused_clients: false,
            fault_deadline: Duration::from_secs(7),
            ..DaemonConfig::image("s3://bucket/vm.img")
        };
        let sent = serde_json::to_vec(&config).expect("json");
        let got: DaemonConfig = serde_json::from_slice(&sent).expect("json back");
        assert_eq!(got, config);
    }

    #[test]
    fn the_snapshot_is_named_for_logs() {
        assert_eq!(DaemonConfig::mem_file("/m").snapshot_name(), "/m");
        assert_eq!(DaemonConfig::image("/i").snapshot_name(), "/i");
        assert_eq!(DaemonConfig::object("s3://b/k").snapshot_name(), "s3://b/k");
        assert_eq!(DaemonConfig::remote("h:1").snapshot_name(), "remote h:1");
        assert_eq!(DaemonConfig::default().snapshot_name(), "");
    }
}
