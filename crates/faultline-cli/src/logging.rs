//! Logging set-up of the `faultline` commands.

use clap::ValueEnum;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Set up logging once.
pub fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// Set up logging once, at `default_level` unless `RUST_LOG` says otherwise.
pub fn init_logging_at(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: a daemon's stderr is usually a pipe, a file or the journal.
    // A log line that cannot be written is dropped: by default tracing-subscriber reports the
    // failed write with `eprintln!`, which panics when stderr is a closed pipe, killing whichever
    // thread logged (a fault-serving thread, or the worker's control thread on its way to exit
    // when the supervisor is gone — which left the worker running forever, orphaned).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
