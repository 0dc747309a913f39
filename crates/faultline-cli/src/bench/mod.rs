//! `faultline bench`: end-to-end fault serving against baselines measured in the same run.
//!
//! A region (default 1 GiB) is served from a page-cached file and touched from several threads
//! (one read per page), then every byte is verified against the file. Variants:
//! - `faultline`: the runtime's server (with CPU placement free and pinned);
//! - `naive`: one thread, one message per read, one 4 KiB COPY per fault (the public examples);
//! - `crate`: the same naive loop on the `userfaultfd` crate (feature `crate-baseline`);
//! - `kernel`: the kernel's own path, a read-only file mapping of the same file;
//! - `eager`: the whole file copied in 2 MiB `UFFDIO_COPY`s before any touch: the ceiling of
//!   COPY-based serving.
//!
//! Fault overhead = the first touch pass minus a second pass over the now-present memory.
//!
//! Modules: [`local`] runs the in-process variants above ([`workload`] generates the file, orders
//! and checks the touches, [`report`] holds the rows and prints the table); `--serve` is [`serve`],
//! `--sources`/`--remote` [`sources`], `--firecracker` [`fc`]; [`baseline`] holds the naive
//! handlers and the kernel's file mapping the variants are compared against; [`args`] the flags.

use anyhow::Result;

use self::args::BenchArgs;

pub mod args;
pub mod baseline;
mod fc;
mod local;
mod report;
mod serve;
mod sources;
mod workload;

pub(crate) use workload::shuffle;

/// Run the benchmark and print the table (and JSON if asked).
pub fn run(args: BenchArgs) -> Result<()> {
    if args.remote || args.sources {
        return sources::run(&args).map(|_| ());
    }
    if args.firecracker {
        let report = fc::run(&fc::FcBenchArgs {
            repeat: args.repeat,
            clones: args.fc_clones.clone(),
            kit: args.fc_kit.clone(),
            mem_mib: args.fc_mem_mib,
            serve_flags: args.fc_serve_flag.clone(),
            variants: args
                .fc_variant
                .iter()
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .collect(),
            backends: args
                .fc_backends
                .iter()
                .map(|b| match b {
                    args::FcBackend::OnDemand => fc::Which::OnDemand,
                    args::FcBackend::BackgroundFill => fc::Which::BackgroundFill,
                    args::FcBackend::Prefetch => fc::Which::Prefetch,
                })
                .collect(),
        })?;
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    if args.serve {
        let rows = serve::run(args.size_mib, args.clients, args.threads, args.file.clone())?;
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
        }
        return Ok(());
    }
    local::run_local(args).map(|_| ())
}
