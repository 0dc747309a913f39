//! The flags of `faultline bench`, shared by its runners (`local`, `serve`, `sources`, `fc`) so
//! that none imports another's.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// Access pattern of the touch pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Pattern {
    /// Each thread walks its own contiguous slice in order.
    Seq,
    /// Each thread touches its slice in a random order.
    Rand,
    /// Every thread touches every page, all in the same order.
    Storm,
}

/// CPU placement of the server's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    /// The scheduler decides.
    Free,
    /// Worker i is pinned to CPU i.
    Pinned,
    /// Measure both.
    Both,
}

/// Readahead choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadaheadArg {
    /// Only the faulting page.
    Off,
    /// A fixed window of `--readahead-pages`.
    Fixed,
    /// Grow on sequential faults up to `--readahead-pages`.
    Adaptive,
}

/// `faultline bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Page size: 4096, or 2097152 (hugetlbfs; huge pages are reserved as needed).
    #[arg(long, default_value_t = 4096)]
    pub page_size: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Seq)]
    pub pattern: Pattern,
    /// Touching threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Server worker threads (default: number of CPUs; one more for the remote rows, as `serve
    /// --remote` runs).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Readahead policy.
    #[arg(long, value_enum, default_value_t = ReadaheadArg::Adaptive)]
    pub readahead: ReadaheadArg,
    /// Readahead window (pages; the maximum for adaptive).
    #[arg(long, default_value_t = 512)]
    pub readahead_pages: usize,
    /// Worker CPU placement.
    #[arg(long, value_enum, default_value_t = Placement::Both)]
    pub placement: Placement,
    /// Baselines to measure, comma separated: kernel,naive,crate,eager.
    #[arg(long, default_value = "kernel,naive,crate,eager")]
    pub baselines: String,
    /// Repeat every variant this many times; min and median are reported.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Also measure working-set record and prefetch replay (fraction of pages in the set, %).
    #[arg(long)]
    pub working_set_pct: Option<u32>,
    /// Serve this file instead of a generated one.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure the end-to-end Firecracker path instead: client processes restore through
    /// `faultline serve` and through a naive external handler (one page per fault).
    #[arg(long)]
    pub serve: bool,
    /// With --serve: client processes restoring at once.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Measure sequential restore from a remote page server on loopback (`faultline export` +
    /// `serve --remote`, on demand and with the background stream) against the local raw file.
    #[arg(long)]
    pub remote: bool,
    /// Measure every page source of a snapshot against the local raw file in one run: images
    /// (size and restore time), the remote page server, and an S3-compatible store with the
    /// working set prefetched (with --object-endpoint and --object-bucket).
    #[arg(long, conflicts_with_all = ["serve", "remote"])]
    pub sources: bool,
    /// With --sources: the S3-compatible store's endpoint, e.g. http://127.0.0.1:4568.
    /// Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "URL", requires = "object_bucket")]
    pub object_endpoint: Option<String>,
    /// With --sources: an existing bucket to upload the snapshot to (key faultline-bench/...).
    #[arg(long, value_name = "NAME", requires = "object_endpoint")]
    pub object_bucket: Option<String>,
    /// Restore a real Firecracker guest (the kit in ../shared/firecracker, --fc-kit or
    /// $FAULTLINE_FC_KIT; needs /dev/kvm) from its snapshot through the File backend and through
    /// `faultline serve` (on demand, --background-fill, --prefetch-ws), --repeat times each,
    /// with --fc-clones restores at once: time from the load request to the guest's first tick,
    /// CPU and faults per restore, as ratios to the File backend.
    #[arg(long, conflicts_with_all = ["serve", "remote", "sources"])]
    pub firecracker: bool,
    /// With --firecracker: the kit's directory (firecracker, vmlinux, boot_args.txt).
    #[arg(long, value_name = "DIR", requires = "firecracker")]
    pub fc_kit: Option<PathBuf>,
    /// With --firecracker: how many clones restore at once, each count in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub fc_clones: Vec<usize>,
    /// With --firecracker: guest memory (MiB).
    #[arg(long, default_value_t = 256)]
    pub fc_mem_mib: u64,
    /// With --firecracker: more flags for every `faultline serve` it starts, e.g.
    /// `--fc-serve-flag=--workers --fc-serve-flag=1` (to compare settings in the same way).
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub fc_serve_flag: Vec<String>,
    /// With --firecracker: also measure an on-demand daemon started with these flags (one
    /// quoted list per use, e.g. `--fc-variant "--readahead-min-pages 1"`; repeatable), in the
    /// same rounds, to compare settings against the default in one run; `{ws}` stands for the
    /// working set the run records, e.g. `--fc-variant "--prefetch-ws {ws} --workers 1"`.
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub fc_variant: Vec<String>,
    /// With --firecracker: the backends to measure besides the File baseline.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "on-demand,background-fill,prefetch"
    )]
    pub fc_backends: Vec<FcBackend>,
    /// With --sources: KiB per ranged GET and cache block of the S3 rows (a multiple of 4).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    pub object_block_kib: u64,
}

/// A backend of `bench --firecracker` (the File baseline always runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FcBackend {
    /// `faultline serve`, on demand.
    OnDemand,
    /// `faultline serve --background-fill`.
    BackgroundFill,
    /// `faultline serve --prefetch-ws` (a working set recorded first).
    Prefetch,
}
