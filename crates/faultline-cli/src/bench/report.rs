//! The in-process bench's rows and report, and the table it prints.

use serde::Serialize;

use super::args::Pattern;

/// One measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Variant name.
    pub name: String,
    /// First-touch pass, each repetition (ms).
    pub touch_ms: Vec<f64>,
    /// Present pass (ms, min).
    pub present_ms: f64,
    /// Fault overhead (ms, min over repetitions).
    pub overhead_ms: f64,
    /// Throughput of the first pass (MiB/s, best).
    pub mib_s: f64,
    /// Fault messages.
    pub faults: u64,
    /// Resolve ioctls.
    pub resolves: u64,
    /// UFFDIO_WAKE calls.
    pub wakes: u64,
    /// EEXIST answers.
    pub eexist: u64,
    /// Pages resolved successfully (each page once is the ideal).
    pub pages_resolved: u64,
    /// Median fault latency (µs).
    pub p50_us: f64,
    /// 99th percentile fault latency (µs).
    pub p99_us: f64,
    /// Memory the server accounts for itself (bitmaps, buffers, histograms), bytes.
    pub handler_bytes: Option<u64>,
    /// Growth of the process's anonymous memory outside the served region while serving (also
    /// counts glibc's cached thread stacks and arenas), bytes.
    pub handler_rss_delta: Option<u64>,
}

impl Row {
    pub(super) fn min_ms(&self) -> f64 {
        self.touch_ms.iter().cloned().fold(f64::INFINITY, f64::min)
    }
    pub(super) fn median_ms(&self) -> f64 {
        let mut v = self.touch_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Kernel release.
    pub kernel: String,
    /// Region size (bytes).
    pub size: u64,
    /// Page size.
    pub page_size: u64,
    /// Pattern.
    pub pattern: Pattern,
    /// Touching threads.
    pub threads: usize,
    /// Rows.
    pub rows: Vec<Row>,
    /// Ratios against baselines.
    pub ratios: Vec<(String, f64)>,
    /// Working-set results, if measured.
    pub working_set: Option<WsReport>,
}

/// Working-set record/replay results.
#[derive(Debug, Serialize)]
pub struct WsReport {
    /// Pages in the working set.
    pub pages: usize,
    /// Time until all were present when served on demand (ms).
    pub on_demand_ms: f64,
    /// Time until all were present with prefetch replay (ms).
    pub prefetch_ms: f64,
    /// on_demand / prefetch.
    pub speedup: f64,
}

pub(super) fn print_report(r: &Report) {
    println!(
        "\nfaultline bench: {} MiB, {} B pages, pattern {:?}, {} touching threads, kernel {}",
        r.size >> 20,
        r.page_size,
        r.pattern,
        r.threads,
        r.kernel
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>8} {:>9}",
        "variant",
        "min ms",
        "median",
        "overhead",
        "MiB/s",
        "faults",
        "resolves",
        "pages",
        "EEXIST",
        "wakes",
        "p50 µs",
        "p99 µs",
        "handler"
    );
    for row in &r.rows {
        println!(
            "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>7.0} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7.1} {:>8.1} {:>9}",
            row.name,
            row.min_ms(),
            row.median_ms(),
            row.overhead_ms,
            row.mib_s,
            row.faults,
            row.resolves,
            row.pages_resolved,
            row.eexist,
            row.wakes,
            row.p50_us,
            row.p99_us,
            row.handler_bytes.map(|b| format!("{} KiB", b >> 10)).unwrap_or_else(|| "-".into())
        );
    }
    println!();
    for (name, v) in &r.ratios {
        println!("  {name:<62} {v:>8.3}");
    }
    if let Some(ws) = &r.working_set {
        println!(
            "  working set of {} pages: on demand {:.1} ms, prefetch replay {:.1} ms: {:.2}x faster",
            ws.pages, ws.on_demand_ms, ws.prefetch_ms, ws.speedup
        );
    }
}
