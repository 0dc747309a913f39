//! The `faultline` command: user-space page-fault serving from the command line.
#![deny(unsafe_code)] // allowed in src/bench/baseline.rs alone (the benchmark's baselines)

mod bench;
mod client;
mod demo;
// Shared with tests/firecracker.rs, which includes it with #[path] and uses parts the bench
// does not (the hugetlbfs guest, the console's tail, liveness).
#[allow(dead_code)]
mod fckit;
mod hugepages;
mod image;
mod logging;
mod object;
mod remote;
mod serve;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use faultline_uffd::{Features, Uffd};

#[derive(Parser)]
#[command(
    name = "faultline",
    version,
    about = "User-space page-fault handling for Linux (userfaultfd)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the kernel's userfaultfd features and ioctls, and how the fd was created.
    Features,
    /// End-to-end benchmark against baselines measured in the same run.
    Bench(bench::args::BenchArgs),
    /// Restore clones of an embedded synthetic snapshot through the handler, every byte verified:
    /// on demand vs working-set prefetch vs eager copy (no files needed).
    Demo(demo::DemoArgs),
    /// Snapshot images: pack a raw memory file (zero pages elided, duplicates stored once,
    /// compressed chunks, every page hashed), inspect, verify, unpack, diff.
    Image(image::ImageArgs),
    /// Serve a snapshot's pages over TCP to `faultline serve --remote` on another host (post-copy
    /// migration): demand first, the rest streamed, reconnects survived.
    Export(remote::ExportArgs),
    /// Run the Firecracker page-fault handler daemon.
    Serve(serve::ServeArgs),
    /// Act as Firecracker restoring a snapshot: map memory, register a userfaultfd, hand it to the
    /// handler over its socket, touch and verify every page (used by demo, tests and bench).
    #[command(hide = true)]
    Client(client::ClientArgs),
    /// The serving half of a supervised `faultline serve` (its stdin is the control socket).
    #[command(hide = true)]
    ServeWorker(serve::WorkerArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Features => features(),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Image(args) => image::run(args),
        Command::Export(args) => remote::run_export(args),
        Command::Serve(args) => serve::run(args),
        Command::ServeWorker(args) => serve::run_worker(args),
        Command::Client(args) => {
            let report = client::run(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn features() -> Result<()> {
    let uffd = Uffd::builder()
        .create_uninit()
        .context("creating a userfaultfd")?;
    let created = uffd.creation();
    let info = Uffd::builder().probe().context("UFFDIO_API probe")?;
    println!("created via: {}", created.path);
    if let Some((path, errno)) = created.fallback_from {
        println!("  (fallback: {path} failed with {errno})");
    }
    println!("features:    {}", info.features);
    let missing = Features::KNOWN - info.features;
    println!(
        "missing:     {}",
        if missing.is_empty() {
            "(none)".into()
        } else {
            missing.names()
        }
    );
    println!("ioctls:      {:?}", info.ioctls);
    Ok(())
}
