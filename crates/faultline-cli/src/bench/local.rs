//! The in-process variants of `faultline bench` (see [`super`]): the runtime's server, the naive
//! baselines, the kernel's file mapping and the eager ceiling, on one region, each measured
//! with the same touch passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use faultline::source::{MmapSource, PageSource};
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions, WorkingSet};
use faultline_uffd::{CopyMode, Features, Mapping, MemoryKind, RegisterMode, Uffd};

use super::args::{BenchArgs, Pattern, Placement, ReadaheadArg};

use super::baseline::{self, FileMapping};

use super::report::{print_report, Report, Row, WsReport};
use super::workload::{anon_outside, generate_file, kind_for, order, percentile, touch, verify};

struct Ctx {
    args: BenchArgs,
    src: Arc<MmapSource>,
    size: u64,
    page: u64,
    kind: MemoryKind,
    orders: Vec<Vec<usize>>,
    /// Anonymous memory of the process before any server ran.
    anon_at_start: u64,
}

impl Ctx {
    fn mapping(&self) -> Result<Mapping> {
        if self.kind.is_hugetlb() {
            let need = self.size / self.page;
            ensure!(
                crate::hugepages::reserve_huge_pages(need),
                "cannot reserve {need} huge pages"
            );
        }
        Ok(Mapping::new(self.kind, self.size_len())?)
    }

    /// The region's length in memory.
    fn size_len(&self) -> usize {
        usize::try_from(self.size).expect("checked to fit usize in run_local")
    }

    /// The page size in memory.
    fn page_len(&self) -> usize {
        usize::try_from(self.page).expect("4 KiB or 2 MiB (kind_for)")
    }

    fn uffd(&self) -> Result<Uffd> {
        let f = if self.kind.is_hugetlb() {
            Features::MISSING_HUGETLBFS
        } else {
            Features::empty()
        };
        Ok(Uffd::new(f)?)
    }

    /// Run a baseline `handler` on its own thread through [`Ctx::passes`], stopping it after the
    /// first pass; returns both pass times and the handler's stats.
    fn with_handler(
        &self,
        m: &Mapping,
        who: &str,
        handler: impl FnOnce(&AtomicBool) -> baseline::NaiveStats + Send,
    ) -> Result<(f64, f64, baseline::NaiveStats)> {
        let stop = AtomicBool::new(false);
        let (r, st) = std::thread::scope(|s| {
            let h = s.spawn(|| handler(&stop));
            let r = self.passes(m, || stop.store(true, Ordering::Release));
            stop.store(true, Ordering::Release);
            (r, h.join())
        });
        let (first, second) = r?;
        let st = st.map_err(|_| anyhow::anyhow!("{who} handler panicked"))?;
        Ok((first, second, st))
    }

    /// Touch, stop the handler, touch again, verify.
    fn passes(&self, m: &Mapping, stop: impl FnOnce()) -> Result<(f64, f64)> {
        let first = touch(m, self.page_len(), &self.orders);
        stop();
        let second = touch(m, self.page_len(), &self.orders);
        verify(m, &self.src, self.args.threads.max(2))?;
        Ok((first.as_secs_f64() * 1e3, second.as_secs_f64() * 1e3))
    }

    fn ours(&self, pinned: bool) -> Result<Row> {
        let mut row = self.row(if pinned {
            "faultline (pinned)"
        } else {
            "faultline"
        });
        for _ in 0..self.args.repeat.max(1) {
            let m = self.mapping()?;
            let uffd = self.uffd()?;
            uffd.register(&m, RegisterMode::MISSING)?;
            let readahead = match self.args.readahead {
                ReadaheadArg::Off => Readahead::Off,
                ReadaheadArg::Fixed => Readahead::Fixed {
                    pages: self.args.readahead_pages,
                },
                ReadaheadArg::Adaptive => Readahead::Adaptive {
                    min_pages: 1,
                    max_pages: self.args.readahead_pages,
                },
            };
            let mut config = ServerConfig {
                readahead,
                pin_workers: pinned,
                ..ServerConfig::default()
            };
            if let Some(w) = self.args.workers {
                config.workers = w;
            }
            let (ms, me) = (m.addr(), m.addr() + m.len() as u64);
            let before = anon_outside(ms, me);
            let server = Server::start(config)?;
            let src: Arc<dyn PageSource> = self.src.clone();
            let session = server.add_session(
                uffd,
                vec![Region::new(m.addr(), self.size, self.kind, src, 0)],
                SessionOptions::default(),
            )?;
            let mut during = 0;
            let mut footprint = 0;
            let (first, second) = self.passes(&m, || {
                during = anon_outside(ms, me);
                footprint = server.footprint_bytes();
            })?;
            let st = session.stats();
            let io = session.uffd_stats();
            server.shutdown();
            row.touch_ms.push(first);
            self.fill(
                &mut row,
                first,
                second,
                st.faults,
                st.resolves(),
                io.wake,
                io.eexist,
            );
            row.p50_us = st.latency_p50_ns as f64 / 1e3;
            row.p99_us = st.latency_p99_ns as f64 / 1e3;
            row.pages_resolved = st.pages;
            let measured = during.saturating_sub(self.anon_at_start.min(before));
            row.handler_bytes = Some(row.handler_bytes.unwrap_or(0).max(footprint));
            row.handler_rss_delta = Some(row.handler_rss_delta.unwrap_or(0).max(measured));
        }
        Ok(row)
    }

    fn naive(&self) -> Result<Row> {
        let mut row = self.row("naive (1 msg/read, 1 page/COPY)");
        let src_ptr = self
            .src
            .ptr_at(0, self.size)
            .context("mmap source lends no pointer")?;
        for _ in 0..self.args.repeat.max(1) {
            let m = self.mapping()?;
            let uffd = self.uffd()?;
            uffd.register(&m, RegisterMode::MISSING)?;
            let (region, size, page) = (m.addr(), self.size, self.page);
            let src_addr = src_ptr as usize;
            let (first, second, mut st) = self.with_handler(&m, "naive", |stop| {
                baseline::naive_faultline(&uffd, region, size, page, src_addr as *const u8, stop)
            })?;
            row.touch_ms.push(first);
            let io = uffd.stats();
            self.fill(
                &mut row,
                first,
                second,
                st.faults,
                io.resolves(),
                io.wake,
                io.eexist,
            );
            row.pages_resolved = st.copies;
            row.p50_us = percentile(&mut st.latencies_ns, 50);
            row.p99_us = percentile(&mut st.latencies_ns, 99);
        }
        Ok(row)
    }

    #[cfg(feature = "crate-baseline")]
    fn crate_baseline(&self) -> Result<Option<Row>> {
        let mut row = self.row("userfaultfd crate (naive)");
        let src_ptr = self
            .src
            .ptr_at(0, self.size)
            .context("mmap source lends no pointer")?;
        for _ in 0..self.args.repeat.max(1) {
            let m = self.mapping()?;
            let uffd = userfaultfd::UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .create()
                .context("userfaultfd crate: create")?;
            uffd.register(m.as_ptr().cast(), m.len())
                .context("userfaultfd crate: register")?;
            let (region, size, page) = (m.addr(), self.size, self.page);
            let src_addr = src_ptr as usize;
            let (first, second, mut st) = self.with_handler(&m, "crate", |stop| {
                baseline::naive_crate(&uffd, region, size, page, src_addr as *const u8, stop)
            })?;
            row.touch_ms.push(first);
            self.fill(
                &mut row,
                first,
                second,
                st.faults,
                st.copies + st.eexist,
                0,
                st.eexist,
            );
            row.pages_resolved = st.copies;
            row.p50_us = percentile(&mut st.latencies_ns, 50);
            row.p99_us = percentile(&mut st.latencies_ns, 99);
        }
        Ok(Some(row))
    }

    #[cfg(not(feature = "crate-baseline"))]
    fn crate_baseline(&self) -> Result<Option<Row>> {
        eprintln!("  (userfaultfd crate baseline skipped: build with --features crate-baseline)");
        Ok(None)
    }

    fn kernel(&self) -> Result<Row> {
        let mut row = self.row("kernel (file mapping)");
        let path = self.src.name();
        for _ in 0..self.args.repeat.max(1) {
            // The kernel's path is user space touching a file mapping; the runtime's mmap source
            // never does that (it reads files with pread), so the baseline maps the file itself.
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            let map = FileMapping::map(&file).with_context(|| format!("mapping {path}"))?;
            let page = self.page_len();
            let run = |map: &FileMapping| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for o in &self.orders {
                        s.spawn(move || {
                            for &p in o {
                                std::hint::black_box(map.touch(p * page));
                            }
                        });
                    }
                });
                start.elapsed().as_secs_f64() * 1e3
            };
            let first = run(&map);
            let second = run(&map);
            row.touch_ms.push(first);
            self.fill(&mut row, first, second, 0, 0, 0, 0);
        }
        Ok(row)
    }

    fn eager(&self) -> Result<Row> {
        let mut row = self.row("eager 2 MiB COPY (ceiling)");
        let src_ptr = self
            .src
            .ptr_at(0, self.size)
            .context("mmap source lends no pointer")? as usize;
        for _ in 0..self.args.repeat.max(1) {
            let m = self.mapping()?;
            let uffd = self.uffd()?;
            uffd.register(&m, RegisterMode::MISSING)?;
            let chunk = (2u64 << 20).max(self.page);
            let start = Instant::now();
            let mut off = 0;
            while off < self.size {
                let n = chunk.min(self.size - off);
                let at = usize::try_from(off).expect("below the size, which fits usize");
                let src = (src_ptr + at) as *const u8;
                match uffd.copy_from_ptr(
                    m.addr() + off,
                    src,
                    usize::try_from(n).expect("at most the size, which fits usize"),
                    CopyMode::empty(),
                ) {
                    Ok(r) => off += r.bytes(),
                    Err(e) if e.is_already_present() => off += self.page,
                    Err(e) => return Err(e.into()),
                }
            }
            let first = start.elapsed().as_secs_f64() * 1e3;
            let second = touch(&m, self.page_len(), &self.orders).as_secs_f64() * 1e3;
            verify(&m, &self.src, self.args.threads.max(2))?;
            row.touch_ms.push(first);
            let io = uffd.stats();
            row.faults = 0;
            row.resolves = io.resolves();
            row.present_ms = second;
            row.mib_s = row
                .mib_s
                .max(self.size as f64 / (1 << 20) as f64 / (first / 1e3));
        }
        Ok(row)
    }

    fn row(&self, name: &str) -> Row {
        Row {
            name: name.to_string(),
            touch_ms: Vec::new(),
            present_ms: f64::INFINITY,
            overhead_ms: f64::INFINITY,
            mib_s: 0.0,
            faults: 0,
            resolves: 0,
            wakes: 0,
            eexist: 0,
            pages_resolved: 0,
            p50_us: 0.0,
            p99_us: 0.0,
            handler_bytes: None,
            handler_rss_delta: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        row: &mut Row,
        first: f64,
        second: f64,
        faults: u64,
        resolves: u64,
        wakes: u64,
        eexist: u64,
    ) {
        row.present_ms = row.present_ms.min(second);
        row.overhead_ms = row.overhead_ms.min((first - second).max(0.0));
        row.mib_s = row
            .mib_s
            .max(self.size as f64 / (1 << 20) as f64 / (first / 1e3));
        row.faults = faults;
        row.resolves = resolves;
        row.wakes = wakes;
        row.eexist = eexist;
    }

    /// Record a working set, then compare on-demand and prefetch replay of it.
    fn working_set(&self, pct: u32) -> Result<WsReport> {
        let pages = self.size_len() / self.page_len();
        let want = (pages * pct.clamp(1, 100) as usize / 100).max(1);
        // A restore-like working set: scattered pages, in a random order.
        let mut set = order(Pattern::Storm, pages, 1, 0);
        set.truncate(want);
        let page = self.page_len();
        let src: Arc<dyn PageSource> = self.src.clone();
        let run = |opts: SessionOptions, touch_set: bool| -> Result<(f64, WorkingSet)> {
            let m = self.mapping()?;
            let uffd = self.uffd()?;
            uffd.register(&m, RegisterMode::MISSING)?;
            let config = ServerConfig {
                readahead: Readahead::Off,
                ..ServerConfig::default()
            };
            let server = Server::start(config)?;
            let start = Instant::now();
            let session = server.add_session(
                uffd,
                vec![Region::new(m.addr(), self.size, self.kind, src.clone(), 0)],
                opts,
            )?;
            let offsets: Vec<u64> = set.iter().map(|&p| (p * page) as u64).collect();
            if touch_set {
                for &p in &set {
                    std::hint::black_box(m.read_u8(p * page)?);
                }
            } else {
                ensure!(
                    session.wait_prefetched(Duration::from_secs(120)),
                    "prefetch did not finish"
                );
                ensure!(
                    session.offsets_present(&offsets),
                    "prefetch left recorded pages missing"
                );
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let ws = session.working_set();
            server.shutdown();
            Ok((ms, ws))
        };
        let (_, ws) = run(
            SessionOptions {
                record_working_set: true,
                ..SessionOptions::default()
            },
            true,
        )?;
        ensure!(
            ws.offsets.len() == want,
            "recorded {} pages, touched {want}",
            ws.offsets.len()
        );
        let (on_demand_ms, _) = run(SessionOptions::default(), true)?;
        let (prefetch_ms, _) = run(
            SessionOptions {
                prefetch: Some(ws),
                ..SessionOptions::default()
            },
            false,
        )?;
        Ok(WsReport {
            pages: want,
            on_demand_ms,
            prefetch_ms,
            speedup: on_demand_ms / prefetch_ms,
        })
    }
}

/// The in-process benchmark (see the module doc).
pub fn run_local(args: BenchArgs) -> Result<Report> {
    let page = args.page_size;
    let kind = kind_for(page)?;
    let size = (args.size_mib << 20).next_multiple_of(page);
    ensure!(size > 0, "--size-mib must be positive");
    let tmp;
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("faultline-bench")
                .tempfile()?;
            eprintln!("generating a {} MiB snapshot file ...", size >> 20);
            generate_file(tmp.path(), size, page)?;
            tmp.path().to_path_buf()
        }
    };
    let src = Arc::new(
        MmapSource::options()
            .populate(true)
            .open(&path)
            .with_context(|| format!("mapping {}", path.display()))?
            .with_zero_scan()
            .with_context(|| format!("scanning {} for zero pages", path.display()))?,
    );
    ensure!(
        src.len() >= size,
        "{} is smaller than --size-mib",
        path.display()
    );
    let size_len = usize::try_from(size).context("--size-mib is too large for this machine")?;
    let pages = size_len / usize::try_from(page).expect("4 KiB or 2 MiB (kind_for)");
    let threads = args.threads.max(1);
    let orders = (0..threads)
        .map(|t| order(args.pattern, pages, threads, t))
        .collect();
    let anon_at_start = anon_outside(0, 0);
    let ctx = Ctx {
        args,
        src,
        size,
        page,
        kind,
        orders,
        anon_at_start,
    };
    let base: Vec<String> = ctx
        .args
        .baselines
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    let placements: &[bool] = match ctx.args.placement {
        Placement::Free => &[false],
        Placement::Pinned => &[true],
        Placement::Both => &[false, true],
    };
    for &pinned in placements {
        eprintln!(
            "measuring faultline{} ...",
            if pinned { " (pinned)" } else { "" }
        );
        rows.push(ctx.ours(pinned)?);
    }
    if base.iter().any(|b| b == "naive") {
        eprintln!("measuring the naive handler ...");
        rows.push(ctx.naive()?);
    }
    if base.iter().any(|b| b == "crate") {
        eprintln!("measuring the userfaultfd crate ...");
        if let Some(r) = ctx.crate_baseline()? {
            rows.push(r);
        }
    }
    if base.iter().any(|b| b == "kernel") {
        eprintln!("measuring the kernel's file mapping ...");
        rows.push(ctx.kernel()?);
    }
    if base.iter().any(|b| b == "eager") {
        eprintln!("measuring eager copy ...");
        rows.push(ctx.eager()?);
    }
    let working_set = match ctx.args.working_set_pct {
        Some(p) => {
            eprintln!("measuring working-set record/replay ...");
            Some(ctx.working_set(p)?)
        }
        None => None,
    };
    let mut ratios = Vec::new();
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    for ours in rows.iter().filter(|r| r.name.starts_with("faultline")) {
        if let Some(e) = find("eager") {
            ratios.push((
                format!("{} throughput / eager ceiling", ours.name),
                ours.mib_s / e.mib_s,
            ));
        }
        if let Some(n) = find("naive") {
            ratios.push((
                format!("{} fault overhead / naive", ours.name),
                ours.overhead_ms / n.overhead_ms,
            ));
            ratios.push((
                format!("{} first-touch time / naive", ours.name),
                ours.min_ms() / n.min_ms(),
            ));
        }
        if let Some(c) = find("userfaultfd crate") {
            ratios.push((
                format!("{} fault overhead / userfaultfd crate", ours.name),
                ours.overhead_ms / c.overhead_ms,
            ));
        }
        if let Some(k) = find("kernel") {
            ratios.push((
                format!("{} first-touch time / kernel file mapping", ours.name),
                ours.min_ms() / k.min_ms(),
            ));
        }
        if let Some(b) = ours.handler_bytes {
            ratios.push((
                format!("{} handler memory / served memory", ours.name),
                b as f64 / size as f64,
            ));
        }
        if let Some(b) = ours.handler_rss_delta {
            ratios.push((
                format!("{} anon RSS growth / served memory", ours.name),
                b as f64 / size as f64,
            ));
        }
    }
    if let (Some(n), Some(c)) = (find("naive"), find("userfaultfd crate")) {
        ratios.push((
            "naive on faultline-uffd / naive on userfaultfd crate (overhead)".into(),
            n.overhead_ms / c.overhead_ms,
        ));
    }
    let report = Report {
        kernel: rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned(),
        size,
        page_size: page,
        pattern: ctx.args.pattern,
        threads,
        rows,
        ratios,
        working_set,
    };
    print_report(&report);
    if let Some(p) = &ctx.args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}
