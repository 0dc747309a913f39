//! The faultline runtime: page sources, regions and a multi-threaded fault server on top of
//! `faultline-uffd`.
//!
//! A [`Server`] carries many userfaultfds (sessions: one per process or VM), each with many
//! [`Region`]s mapping client addresses to a [`PageSource`] at an offset. Its workers read fault
//! messages in batches, resolve each page exactly once (a lock-free page-state bitmap per region),
//! read ahead on sequential streams, replay recorded working sets, fill the rest in the background,
//! poison pages whose source cannot be read, and count everything ([`Stats`]). The
//! [`firecracker`] module speaks Firecracker's UFFD handshake.
//!
//! # Example: serve a region from an in-memory source
//! ```
//! use std::sync::Arc;
//! use faultline::{Region, Server, ServerConfig, SessionOptions, source::MemorySource};
//! use faultline_uffd::{Features, Mapping, RegisterMode, Uffd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bytes: Vec<u8> = (0..64 * 4096).map(|i| (i / 4096) as u8).collect();
//! let source = Arc::new(MemorySource::new(bytes));
//!
//! let uffd = Uffd::new(Features::empty())?;
//! let memory = Mapping::anonymous(64 * 4096)?;
//! uffd.register(&memory, RegisterMode::MISSING)?;
//!
//! let server = Server::start(ServerConfig { workers: 2, ..ServerConfig::default() })?;
//! let session = server.add_session(uffd, vec![Region::for_mapping(&memory, source)], SessionOptions::default())?;
//! assert_eq!(memory.read_u8(17 * 4096)?, 17); // faults, and is served
//! assert_eq!(session.stats().faults, 1);
//! server.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//!
//! A plain dependency is the lean core: the fault server, the Firecracker handshake, policies,
//! stats and the zero, memory, file, mmap, layered and failure-injecting sources, on rustix and a
//! handful of crates (no async runtime, no HTTP or TLS stack, no C build). The rest is opt-in; the
//! `faultline` command enables all of it.
//!
//! | feature | adds | and brings |
//! |---|---|---|
//! | `image` | `image`: packed, compressed, content-hashed snapshot images | zstd (a C build), lz4_flex, blake3, xxhash-rust |
//! | `object-store` | `source::object`: the S3 source, and `object_upload::put_object`; with `image`, images in S3 | object_store, reqwest, rustls on ring; `tokio` |
//! | `remote` | `remote`: the page exporter and the remote source | crossbeam-channel, rustc-hash, xxhash-rust |
//! | `tokio` | `uffd::tokio`: the async userfaultfd event stream | tokio |
//!
//! Measured when the features came (issue 14, 2-core machine): without features `faultline`
//! depends on 32 crates, itself included (`cargo tree -e normal`, unique name and version), with
//! all of them on 150, about as many as before (151), when all of it was always built; a clean debug build
//! of it took 24 s of CPU without features, 94 s with all of them and 116 s before (aws-lc-rs's C
//! build is gone). The README has the details.
//!
//! This crate forbids `unsafe` code: the raw memory and kernel calls it needs (file mappings lent
//! to `UFFDIO_COPY`, `writev` from them, `SO_PEERPIDFD`) are safe APIs of `faultline-uffd`.
#![forbid(unsafe_code)]

pub use faultline_uffd as uffd;

pub mod firecracker;
#[cfg(feature = "image")]
pub mod image;
pub mod inject;
#[cfg(feature = "object-store")]
pub mod object_upload;
pub mod peer;
pub mod policy;
pub mod ratelimit;
pub mod region;
#[cfg(feature = "remote")]
pub mod remote;
pub mod served;
pub mod server;
pub mod source;
pub mod state;
pub mod stats;
mod sync;

pub use policy::{Readahead, WorkingSet};
pub use region::{Backing, Region, RegionError};
pub use served::ServedLog;
pub use server::{
    EndHook, RemoveHook, Server, ServerConfig, ServerError, SessionHandle, SessionOptions,
    Unservable,
};
pub use source::{PageSource, SourceError};
pub use stats::Stats;
