//! The faultline runtime: page sources, regions and a multi-threaded fault server on top of
//! `faultline-uffd`.
#![deny(unsafe_code)]

pub use faultline_uffd as uffd;

pub mod firecracker;
pub mod policy;
pub mod region;
pub mod server;
pub mod source;
pub mod state;
pub mod stats;

pub use policy::{Readahead, WorkingSet};
pub use region::{Backing, Region, RegionError};
pub use server::{EndHook, Server, ServerConfig, ServerError, SessionHandle, SessionOptions};
pub use source::{PageSource, SourceError};
pub use stats::Stats;
