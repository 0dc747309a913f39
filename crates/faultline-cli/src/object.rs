//! `faultline serve --object-url s3://bucket/key` (a raw memory file in an S3-compatible store)
//! and `faultline serve --image s3://bucket/key` (an image there): the `--object-*` and
//! `--cache-*` flags (the daemon opens the source they describe: `faultline_daemon::snapshot`).
//!
//! Credentials come from the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; also `AWS_ENDPOINT`, `AWS_REGION`), never from
//! the command line, where other users could read them.

use std::path::PathBuf;

use clap::Args;
use faultline_daemon::ObjectConfig;

/// The object-store flags of `faultline serve`.
#[derive(Debug, Clone, Args)]
pub struct ObjectFlags {
    /// Serve a raw memory file stored in an S3-compatible object store (`s3://bucket/key`),
    /// read in blocks with ranged GETs through a local cache (instead of --mem-file). For an
    /// image in a store, give its URL to --image.
    #[arg(long, value_name = "URL", conflicts_with_all = ["mem_file", "image", "remote"])]
    pub object_url: Option<String>,
    /// The store's endpoint, e.g. http://127.0.0.1:9000 for a local S3-compatible server
    /// (default: AWS_ENDPOINT, else AWS itself). Plain http is allowed when the endpoint says so.
    #[arg(long, value_name = "URL")]
    pub object_endpoint: Option<String>,
    /// The store's region (default: AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub object_region: Option<String>,
    /// Keep fetched blocks in DIR (kept across restarts: a restarted worker or the next restore
    /// finds them warm). Default: a private temporary directory removed at exit.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most MiB the cache keeps on disk (least recently used blocks are evicted).
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub cache_mib: u64,
    /// KiB per ranged GET and cache block (a multiple of 4).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    pub object_block_kib: u64,
    /// Most GETs in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub object_parallel: usize,
}

impl Default for ObjectFlags {
    fn default() -> Self {
        ObjectFlags {
            object_url: None,
            object_endpoint: None,
            object_region: None,
            cache_dir: None,
            cache_mib: 1024,
            object_block_kib: 1024,
            object_parallel: 8,
        }
    }
}

impl ObjectFlags {
    /// The store settings these flags ask for.
    pub fn config(&self) -> ObjectConfig {
        ObjectConfig {
            url: self.object_url.clone(),
            endpoint: self.object_endpoint.clone(),
            region: self.object_region.clone(),
            cache_dir: self.cache_dir.clone(),
            cache_mib: self.cache_mib,
            block_kib: self.object_block_kib,
            parallel: self.object_parallel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The supervised worker gets the flags in the config the supervisor sends it (JSON), no
    /// longer on its command line: every flag reaches it unchanged.
    #[test]
    fn flags_round_trip_to_the_worker_command_line() {
        let f = ObjectFlags {
            object_url: Some("s3://b/k".into()),
            object_endpoint: Some("http://127.0.0.1:9".into()),
            cache_dir: Some("/tmp/c".into()),
            cache_mib: 7,
            ..ObjectFlags::default()
        };
        let sent = serde_json::to_vec(&f.config()).expect("json");
        let c: ObjectConfig = serde_json::from_slice(&sent).expect("json back");
        assert_eq!(c.url.as_deref(), Some("s3://b/k"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(c.cache_dir.as_deref(), Some(std::path::Path::new("/tmp/c")));
        assert_eq!(c.cache_mib, 7);
        assert_eq!(c.region, None);
        assert_eq!(c.block_kib, 1024);
        assert_eq!(c, f.config());
    }
}
