//! Embed the Firecracker page-fault handler in a program: start a daemon on a temporary socket
//! (in this process, unsupervised), print what it serves, and shut it down.
//!
//! `cargo run -p faultline-daemon --example embed [MEM_FILE]` (without a file, a 1 MiB one is
//! made). Point Firecracker's `mem_backend.backend_path` at the printed socket to restore a
//! snapshot through it; a supervised daemon is `Supervisor::start(&config, socket,
//! WorkerCommand::current_exe()?)`, with `faultline_daemon::worker::main_if_worker()` first in
//! `main`, as here.

use std::time::Duration;

use faultline_daemon::{Daemon, DaemonConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Needed only for the supervised mode; harmless otherwise.
    faultline_daemon::worker::main_if_worker();
    let dir = std::env::temp_dir().join(format!("faultline-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mem = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => {
            let p = dir.join("vm.mem");
            std::fs::write(&p, vec![7u8; 1 << 20])?;
            p
        }
    };
    let config = DaemonConfig {
        workers: Some(1),
        handshake_timeout: Duration::from_secs(2),
        ..DaemonConfig::mem_file(&mem)
    };
    let socket = dir.join("faultline.sock");
    let daemon = Daemon::start(&config, &socket)?;
    println!(
        "serving {} on {} ({} sessions)",
        mem.display(),
        daemon.socket().display(),
        daemon.sessions().len()
    );
    daemon.shutdown();
    println!("stopped; socket removed: {}", !socket.exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
