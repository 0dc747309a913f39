//! The faultline runtime: regions, page sources and a fault server on top of `faultline-uffd`.
#![deny(unsafe_code)]

pub use faultline_uffd as uffd;
