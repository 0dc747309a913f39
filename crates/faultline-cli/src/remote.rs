//! `faultline export` (serve a snapshot's pages over TCP) and the `--remote-*` flags of
//! `faultline serve --remote ADDR` (the daemon opens the source: `faultline_daemon::snapshot`):
//! the post-copy path for moving a paused VM's memory to another host. The protocol is in `docs/remote-protocol.md`; the library side is `faultline::remote`.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use faultline::remote::{default_source_id, Exporter, ExporterOptions};
use faultline::source::{MmapSource, PageSource};
use faultline_daemon::RemoteConfig;

use crate::logging::{init_logging, LogFormat};

/// `faultline export` flags.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// TCP address to listen on, e.g. 0.0.0.0:7070 (port 0: any free port; the address is logged).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Serve this raw memory file.
    #[arg(
        long,
        value_name = "F",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub mem_file: Option<PathBuf>,
    /// Serve this faultline image (pages are verified against their hashes before they are sent).
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// The unit of requests (a power of two, 4096 ..= 2097152).
    #[arg(long, default_value_t = 4096)]
    pub page_size: u32,
    /// Most clients served at once.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Skip the start-up scan for zero pages of a memory file (they are still detected as they
    /// are read, and sent as lengths).
    #[arg(long)]
    pub no_zero_scan: bool,
    /// Skip the start-up scan for repeated pages (by default each repeated page travels once
    /// per connection and its copies as references; the scan reads the source once, in the
    /// background, and clients are served meanwhile).
    #[arg(long)]
    pub no_dedup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The page source `export` serves, and the id it announces: derived from what identifies the
/// bytes (an image's id; a memory file's path, device, inode, size and modification time), so a
/// client that reconnects to a different snapshot behind the same address notices.
fn open_export(args: &ExportArgs) -> Result<(Arc<dyn PageSource>, u64)> {
    if let Some(img) = &args.image {
        let src = faultline::image::ImageSource::open(img)
            .with_context(|| format!("opening the image {}", img.display()))?;
        let id = src.image().id();
        let mut first = [0u8; 8];
        first.copy_from_slice(&id[..8]);
        return Ok((Arc::new(src), u64::from_le_bytes(first)));
    }
    let Some(mem) = &args.mem_file else {
        bail!("nothing to export: give --mem-file or --image");
    };
    let meta = std::fs::metadata(mem)
        .with_context(|| format!("opening the memory file {}", mem.display()))?;
    let src = MmapSource::options()
        .populate(false)
        .open(mem)
        .with_context(|| format!("opening the memory file {}", mem.display()))?;
    let src = if args.no_zero_scan {
        src
    } else {
        src.with_zero_scan()
            .with_context(|| format!("scanning the memory file {} for zero pages", mem.display()))?
    };
    // The change time too: set by the kernel on every write, truncate, chmod or rename of the
    // inode, it tells an edited file from the one a client started on even when its size and
    // modification time were put back.
    let who = format!(
        "{}:{}:{}:{}.{}:{}.{}",
        mem.display(),
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let id = default_source_id(&who, meta.len(), args.page_size);
    Ok((Arc::new(src), id))
}

/// Start exporting as `args` say (in this process): used by `export`, `bench --remote` and tests.
pub fn start_export(args: &ExportArgs) -> Result<Exporter> {
    let (src, id) = open_export(args)?;
    let listener = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let options = ExporterOptions {
        page_size: args.page_size,
        source_id: Some(id),
        max_connections: args.max_connections.max(1),
        dedup: !args.no_dedup,
        ..ExporterOptions::default()
    };
    let len = src.len();
    let name = src.name();
    let server = Exporter::start(listener, src, options)?;
    tracing::info!(
        addr = %server.local_addr(),
        source = %name,
        len,
        page_size = args.page_size,
        "exporting"
    );
    Ok(server)
}

/// `faultline export`: run until SIGTERM or SIGINT.
pub fn run_export(args: ExportArgs) -> Result<()> {
    init_logging(args.log_format);
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    let server = start_export(&args)?;
    let mut b = [0u8; 16];
    while !term.load(Ordering::Acquire) {
        let _ = (&sig_rx).read(&mut b);
    }
    let st = server.stats();
    tracing::info!(
        connections = st.connections,
        bytes_sent = st.bytes_sent,
        zero_bytes = st.zero_bytes,
        same_bytes = st.same_bytes,
        keep_frames = st.keep_frames,
        demand_requests = st.demand_requests,
        background_requests = st.background_requests,
        "stopping"
    );
    server.shutdown();
    Ok(())
}

/// The `--remote-*` flags of `faultline serve` (used with `--remote ADDR`).
#[derive(Debug, Clone, Args)]
pub struct RemoteFlags {
    /// With --remote: stream the whole memory from the remote in the background, ahead of demand
    /// (implies --background-fill, which reads what was streamed).
    #[arg(long, requires = "remote")]
    pub remote_stream: bool,
    /// With --remote: seconds the remote may stay unreachable before reads of missing pages fail
    /// for good (the page is poisoned: SIGBUS in the guest, never a wrong page). Until then a
    /// missing page waits and is retried.
    #[arg(long, value_name = "SECS", default_value_t = 30, requires = "remote")]
    pub remote_deadline: u64,
    /// With --remote-stream: most MiB of streamed pages held before the guest reads them.
    #[arg(long, value_name = "MIB", default_value_t = 256, requires = "remote")]
    pub remote_cache_mib: u64,
}

impl Default for RemoteFlags {
    fn default() -> Self {
        RemoteFlags {
            remote_stream: false,
            remote_deadline: 30,
            remote_cache_mib: 256,
        }
    }
}

impl RemoteFlags {
    /// The remote source settings these flags ask for.
    pub fn config(&self) -> RemoteConfig {
        RemoteConfig {
            stream: self.remote_stream,
            deadline: Duration::from_secs(self.remote_deadline.max(1)),
            cache_bytes: self.remote_cache_mib.max(1) << 20,
        }
    }
}
