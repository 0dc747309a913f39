//! One restore of `faultline bench --sources`: the variants (each page source), what they share,
//! and how one is served, touched, timed and verified.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use faultline::image::{Codec, HashAlg, Image, ImageSource, RangeRead};
use faultline::remote::{Exporter, RemoteOptions, RemoteSource, RemoteStats};
use faultline::source::{MmapSource, ObjectSource, ObjectSourceOptions, PageSource, S3Config};
use faultline::{Region, Server, ServerConfig, SessionOptions};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd};

use crate::bench::args::BenchArgs;

/// The page size the sources are measured with.
pub(super) const PAGE: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Variant {
    Local,
    Image(Codec, HashAlg),
    Demand,
    Stream,
    LocalWs,
    ObjectCold,
    ObjectWarm,
    ObjectImageCold,
    ObjectImageWarm,
}

impl Variant {
    pub(super) fn name(self) -> String {
        match self {
            Variant::Local => "local raw file (mmap)".into(),
            Variant::Image(c, h) => format!("local image ({})", image_label(c, h)),
            Variant::Demand => "remote, on demand (loopback)".into(),
            Variant::Stream => "remote, background stream (loopback)".into(),
            Variant::LocalWs => "local raw file (mmap), working set".into(),
            Variant::ObjectCold => "S3, cold, working set prefetched from start".into(),
            Variant::ObjectWarm => "S3, working set prefetched ahead".into(),
            Variant::ObjectImageCold => "S3 image, cold, working set prefetched from start".into(),
            Variant::ObjectImageWarm => "S3 image, working set prefetched ahead".into(),
        }
    }
    pub(super) fn working_set(self) -> bool {
        matches!(
            self,
            Variant::LocalWs
                | Variant::ObjectCold
                | Variant::ObjectWarm
                | Variant::ObjectImageCold
                | Variant::ObjectImageWarm
        )
    }
}

/// What the variants share.
pub(super) struct Ctx<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) file: Arc<MmapSource>,
    pub(super) size: u64,
    /// Working-set pages, in first-touch order.
    pub(super) ws: Vec<usize>,
    pub(super) images: Vec<((Codec, HashAlg), std::path::PathBuf)>,
    /// The raw file's and the zstd image's URLs in the store, and how to reach it.
    pub(super) object: Option<(String, String, S3Config)>,
}

/// Touch `pages` (all pages in order when `None`) of `m`, split over `threads`: contiguous
/// slices for a full pass, every `threads`-th entry of the list for a working set.
pub(super) fn touch(m: &Mapping, threads: usize, pages: Option<&[usize]>) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut acc = 0u8;
                match pages {
                    None => {
                        let n = m.len() / PAGE;
                        let per = n.div_ceil(threads);
                        for p in t * per..((t + 1) * per).min(n) {
                            acc ^= m.read_u8(p * PAGE).unwrap_or(0);
                        }
                    }
                    Some(list) => {
                        for &p in list.iter().skip(t).step_by(threads) {
                            acc ^= m.read_u8(p * PAGE).unwrap_or(0);
                        }
                    }
                }
                std::hint::black_box(acc);
            });
        }
    });
}

/// Compare the touched pages of `m` with the file.
pub(super) fn verify(m: &Mapping, src: &MmapSource, pages: Option<&[usize]>) -> Result<()> {
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut check = |off: usize, n: usize| -> Result<()> {
        m.read(off, &mut got[..n])?;
        src.read_at(off as u64, &mut want[..n])?;
        if got[..n] != want[..n] {
            bail!("the restored memory differs from the file near byte {off}");
        }
        Ok(())
    };
    match pages {
        None => {
            let mut off = 0;
            while off < m.len() {
                let n = (m.len() - off).min(1 << 20);
                check(off, n)?;
                off += n;
            }
        }
        Some(list) => {
            for &p in list {
                check(p * PAGE, PAGE)?;
            }
        }
    }
    Ok(())
}

/// The working set: clusters of 16 pages, `pct`% of them, in a shuffled order (deterministic).
pub(super) fn working_set(pages: usize, pct: u32) -> Vec<usize> {
    const CLUSTER: usize = 16;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut clusters: Vec<usize> = (0..pages.div_ceil(CLUSTER))
        .filter(|_| next() % 100 < u64::from(pct))
        .collect();
    for i in (1..clusters.len()).rev() {
        let j = usize::try_from(next() % (i as u64 + 1)).expect("at most i, a usize");
        clusters.swap(i, j);
    }
    clusters
        .into_iter()
        .flat_map(|c| c * CLUSTER..((c + 1) * CLUSTER).min(pages))
        .collect()
}

/// One restore: the source is built by `open` (not timed unless it says so), served, touched.
/// Returns the restore time and the source's own report.
/// CPU time used so far by this process, all threads.
pub(super) fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// One restore's measures: wall time, CPU time, the source's report.
pub(super) type Measured = (Duration, Duration, Option<String>, Option<RemoteStats>);

pub(super) fn measure(v: Variant, ctx: &Ctx<'_>) -> Result<Measured> {
    let exporter;
    let mut remote: Option<Arc<RemoteSource>> = None;
    let mut object: Option<Arc<ObjectSource>> = None;
    let mut image: Option<Arc<ImageSource>> = None;
    let mut detail = None;
    let ws_offsets = || {
        ctx.ws
            .iter()
            .map(|&p| (p * PAGE) as u64)
            .collect::<Vec<_>>()
    };
    let (raw_url, image_url, s3) = match &ctx.object {
        Some((r, i, s)) => (r.as_str(), i.as_str(), Some(s)),
        None => ("", "", None),
    };
    let object_source = |url: &str| -> Result<Arc<ObjectSource>> {
        let opts = ObjectSourceOptions {
            block_size: ctx.args.object_block_kib.saturating_mul(1024),
            // Never evicts: cached blocks are lent to UFFDIO_COPY from the cache's mapping.
            cache_bytes: ctx.size,
            ..ObjectSourceOptions::default()
        };
        let s3 = s3.context("no object store")?;
        Ok(Arc::new(ObjectSource::open_url(url, s3, opts)?))
    };
    // The image in the store, and the store offsets its working set needs.
    let object_image = || -> Result<(Arc<ObjectSource>, Arc<ImageSource>, Vec<u64>)> {
        let o = object_source(image_url)?;
        let img = Image::from_reader(Arc::clone(&o) as Arc<dyn RangeRead>)?;
        let i = Arc::new(ImageSource::new(img)?);
        let offsets = o.offsets_of_ranges(&i.working_set_ranges(&ws_offsets()));
        Ok((o, i, offsets))
    };
    let mut prefetch_offsets = ws_offsets();
    let src: Arc<dyn PageSource> = match v {
        Variant::Local | Variant::LocalWs => ctx.file.clone(),
        Variant::Image(codec, hash) => {
            let path = &ctx
                .images
                .iter()
                .find(|(c, _)| *c == (codec, hash))
                .context("image not packed")?
                .1;
            let s = Arc::new(ImageSource::open(path)?);
            image = Some(s.clone());
            s
        }
        Variant::Demand | Variant::Stream => {
            exporter = Exporter::bind("127.0.0.1:0", ctx.file.clone())?;
            // The exporter indexes repeated pages before the restore (as one on a paused VM's
            // host would): not timed, reported.
            ensure!(
                exporter.wait_stats(Duration::from_secs(120), |s| s.dedup_done),
                "the exporter's duplicate-page scan did not finish"
            );
            let s = exporter.stats();
            detail = Some(format!(
                "exporter scan: {} repeated contents on {} pages in {} ms",
                s.dedup_slots, s.dedup_pages, s.dedup_scan_ms
            ));
            let opts = RemoteOptions {
                stream: v == Variant::Stream,
                // What `serve --remote` uses (its default --remote-cache-mib is 256).
                cache_bytes: 256 << 20,
                ..RemoteOptions::default()
            };
            let r = Arc::new(RemoteSource::connect(
                &exporter.local_addr().to_string(),
                opts,
            )?);
            remote = Some(r.clone());
            r
        }
        Variant::ObjectWarm => {
            let o = object_source(raw_url)?;
            let start = Instant::now();
            let r = o.prefetch(&ws_offsets());
            ensure!(r.failed == 0, "prefetch failed: {:?}", r.first_error);
            detail = Some(format!(
                "prefetch ahead: {} blocks in {:.1} ms; ",
                r.fetched,
                start.elapsed().as_secs_f64() * 1e3
            ));
            object = Some(o.clone());
            o
        }
        Variant::ObjectCold => {
            let o = object_source(raw_url)?;
            object = Some(o.clone());
            o
        }
        Variant::ObjectImageWarm => {
            let (o, i, offsets) = object_image()?;
            let start = Instant::now();
            let r = o.prefetch(&offsets);
            ensure!(r.failed == 0, "prefetch failed: {:?}", r.first_error);
            detail = Some(format!(
                "prefetch ahead: {} blocks in {:.1} ms; ",
                r.fetched,
                start.elapsed().as_secs_f64() * 1e3
            ));
            object = Some(o);
            image = Some(i.clone());
            i
        }
        Variant::ObjectImageCold => {
            let (o, i, offsets) = object_image()?;
            prefetch_offsets = offsets;
            object = Some(o);
            image = Some(i.clone());
            i
        }
    };
    let m = Mapping::anonymous(usize::try_from(ctx.size).context("the snapshot's size")?)?;
    let uffd = Uffd::new(Features::empty())?;
    uffd.register(&m, RegisterMode::MISSING)?;
    let mut config = ServerConfig {
        source_attempts: u32::MAX,
        ..ServerConfig::default()
    };
    if matches!(v, Variant::Demand | Variant::Stream) {
        // What `serve --remote` runs.
        config.workers = ServerConfig::network_workers();
    }
    if let Some(w) = ctx.args.workers {
        config.workers = w.max(1);
    }
    let server = Server::start(config)?;
    let pages = v.working_set().then_some(&ctx.ws[..]);
    let start = Instant::now();
    let cpu_start = cpu_time();
    let prefetch = match (v, &object) {
        (Variant::ObjectCold | Variant::ObjectImageCold, Some(o)) => {
            Some(o.prefetch_in_background(std::mem::take(&mut prefetch_offsets))?)
        }
        _ => None,
    };
    let _session = server.add_session(
        uffd,
        vec![Region::for_mapping(&m, src)],
        SessionOptions {
            // As `serve --remote-stream` does: streamed pages are filled in as they arrive.
            background_fill: v == Variant::Stream,
            ..SessionOptions::default()
        },
    )?;
    touch(&m, ctx.args.threads.max(1), pages);
    let took = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_start);
    verify(&m, &ctx.file, pages).context("verifying the restored memory")?;
    let st = server.stats();
    let resolves = format!(
        "{} UFFDIO_COPY ({} MiB), {} UFFDIO_ZEROPAGE ({} pages)",
        st.copy,
        (st.bytes - st.zero_pages * PAGE as u64) >> 20,
        st.zeropage,
        st.zero_pages
    );
    server.shutdown();
    if let Some(p) = prefetch {
        let r = p
            .join()
            .map_err(|_| anyhow::anyhow!("the prefetch thread panicked"))?;
        ensure!(r.failed == 0, "prefetch failed: {:?}", r.first_error);
    }
    if let Some(o) = &object {
        let s = o.stats();
        detail = Some(format!(
            "{}{} GETs, {} MiB fetched, {} cache hits, peak {} GETs in flight",
            detail.unwrap_or_default(),
            s.gets,
            s.bytes_fetched >> 20,
            s.cache_hits,
            s.peak_parallel
        ));
    }
    if let Some(i) = &image {
        let s = i.stats();
        let before = detail.take().map(|d| format!("{d}; ")).unwrap_or_default();
        detail = Some(format!(
            "{before}{} chunks decompressed ({} MiB read), {} pages read directly, {} pages verified ({} chunks whole)",
            s.chunk_reads,
            s.bytes_read >> 20,
            s.direct_pages,
            s.pages_verified,
            s.chunks_verified
        ));
    }
    let detail = Some(match detail {
        Some(d) => format!("{resolves}; {d}"),
        None => resolves,
    });
    Ok((took, cpu, detail, remote.as_ref().map(|r| r.stats())))
}

/// An image's name in the report: its codec, and its page hash unless it is the default.
pub(super) fn image_label(codec: Codec, hash: HashAlg) -> String {
    match hash {
        HashAlg::Xxh3 => codec.name().to_string(),
        h => format!("{}, {}", codec.name(), h.name()),
    }
}
