//! The `faultline` command.
#![forbid(unsafe_code)]

fn main() {}
