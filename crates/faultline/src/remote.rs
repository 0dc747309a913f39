//! A remote page server: serve a page source over TCP, and a page source that reads from one.
//!
//! This is the post-copy path for moving a paused VM's memory to another host: the source host
//! runs an [`Exporter`] over the VM's memory (`faultline export`), the destination restores
//! the VM at once with a [`RemoteSource`] behind its regions (`faultline serve --remote`), and
//! pages move as the guest touches them, while the rest streams behind. The protocol is specified
//! in `docs/remote-protocol.md`; in short:
//!
//! - **Batching.** Concurrent `read_at` calls put the pages they lack on one queue; a single I/O
//!   thread sends everything queued as one request frame (many ranges), so a burst of faults
//!   costs one round trip, not one each. Answers are large frames; zero pages travel as a length.
//! - **Demand first.** Requests carry a priority. The server answers demand before background
//!   requests (and between the pieces of a long background answer); the client sends demand
//!   requests before background ones and asks again, as demand, for a page that a background
//!   request already asked for when a thread is waiting on it.
//! - **Background stream.** [`RemoteSource::start_stream`] (or [`RemoteOptions::stream`]) walks
//!   the source in order, keeping a few background requests outstanding for pages neither cached
//!   nor read yet, so later faults find their pages local; a fault away from the stream moves it
//!   there (post-copy migration's "follow the fault"), later passes pick up what it skipped.
//!   Received, unread pages are held in a cache of at most [`RemoteOptions::cache_bytes`]; a
//!   read takes its pages out of it (a VM faults each page in once). Combine it with the fault
//!   server's background fill, which reads every page, so that streamed pages are consumed and
//!   the stream keeps moving.
//! - **Duplicate pages once.** The server scans its source when it starts and indexes the pages
//!   whose bytes repeat; on a version-2 connection such a page travels once (`KEEP`, the client
//!   holds it for the connection) and each copy as a 29-byte `SAME` frame. The writer compares
//!   every nominated page with the kept bytes before it says `SAME`.
//! - **Dropped connections.** The I/O thread reconnects with exponential backoff, checks that
//!   the server still serves the same source (length, page size, id), and re-sends the unanswered
//!   part of every request. While it is disconnected a read waits up to
//!   [`RemoteOptions::read_timeout`] and then fails with a *retryable* [`SourceError`] (the fault
//!   server retries with backoff); once the connection has been down for longer than
//!   [`RemoteOptions::deadline`], reads fail *permanently* and the fault server poisons the page:
//!   the guest gets SIGBUS there rather than a wrong page. Give the fault server enough attempts
//!   ([`crate::ServerConfig::source_attempts`]) for the deadline to be what decides.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use faultline::remote::{RemoteOptions, Exporter, RemoteSource};
//! use faultline::source::{MemorySource, PageSource};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bytes: Vec<u8> = (0..16 * 4096).map(|i| (i / 4096) as u8).collect();
//! let server = Exporter::bind("127.0.0.1:0", Arc::new(MemorySource::new(bytes)))?;
//! let source = RemoteSource::connect(&server.local_addr().to_string(), RemoteOptions::default())?;
//! assert_eq!(source.len(), 16 * 4096);
//! let mut page = vec![0u8; 4096];
//! source.read_at(5 * 4096, &mut page)?;
//! assert!(page.iter().all(|&b| b == 5));
//! # Ok(())
//! # }
//! ```
//!
//! [`SourceError`]: crate::SourceError

mod client;
mod dedup;
mod exporter;
mod send;
pub mod wire;

pub use client::{probe, RemoteOptions, RemoteSource, RemoteStats};
pub use exporter::{default_source_id, Exporter, ExporterOptions, ExporterStats};
pub use wire::{Welcome, WireError};

/// Setting up a remote page connection or server failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Binding or listening on the server's socket failed.
    #[error("setting up the remote page server socket")]
    Bind(#[source] std::io::Error),
    /// The TCP connection could not be made.
    #[error("connecting to the remote page server {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hello exchange failed.
    #[error("handshake with the remote page server {addr}")]
    Handshake {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: WireError,
    },
    /// The server refused the connection.
    #[error("the remote page server {addr} refused the connection: {reason}")]
    Refused {
        /// The address.
        addr: String,
        /// The server's reason.
        reason: String,
    },
    /// Options that cannot work.
    #[error("invalid remote page options: {0}")]
    Config(String),
    /// A thread could not be started.
    #[error("starting a remote page thread")]
    Thread(#[source] std::io::Error),
    /// The server serves another source than the one expected
    /// ([`RemoteOptions::expect_source_id`]).
    #[error(
        "the remote page server {addr} serves source {got:#x}, not the expected {want:#x}: refused"
    )]
    SourceChanged {
        /// The address.
        addr: String,
        /// The id it announced.
        got: u64,
        /// The id expected.
        want: u64,
    },
}

impl RemoteError {
    /// Whether trying again later may help (the server is not reachable or not answering yet).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RemoteError::Connect { .. } | RemoteError::Handshake { .. } | RemoteError::Thread(_)
        )
    }
}
