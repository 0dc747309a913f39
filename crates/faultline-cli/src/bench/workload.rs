//! What the in-process variants touch and check: the snapshot-like file, the touch orders of each
//! pattern, the touch and verify passes, latency percentiles, the process's anonymous memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use faultline::source::{MmapSource, PageSource};
use faultline_uffd::{Mapping, MemoryKind};

use super::args::Pattern;

pub(super) fn kind_for(page_size: u64) -> Result<MemoryKind> {
    match page_size {
        4096 => Ok(MemoryKind::PrivateAnonymous),
        0x20_0000 => Ok(MemoryKind::HugetlbPrivate),
        other => bail!("--page-size {other} is not supported (4096 or 2097152)"),
    }
}

/// Deterministic snapshot-like content: a quarter of the pages zero in runs of 32 pages (free
/// memory), a few isolated zero pages (one in 97), the rest pseudo-random.
pub(super) fn generate_file(path: &Path, size: u64, page: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; usize::try_from(page).expect("4 KiB or 2 MiB (kind_for)")];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for p in 0..size / page {
        if (p / 32) % 4 == 3 || p % 97 == 0 {
            buf.fill(0);
        } else {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

/// Page order for one thread.
pub(super) fn order(pattern: Pattern, pages: usize, threads: usize, t: usize) -> Vec<usize> {
    match pattern {
        Pattern::Seq => {
            let per = pages.div_ceil(threads);
            (t * per..((t + 1) * per).min(pages)).collect()
        }
        Pattern::Rand => {
            let per = pages.div_ceil(threads);
            let mut v: Vec<usize> = (t * per..((t + 1) * per).min(pages)).collect();
            shuffle(&mut v, 0x2545_F491_4F6C_DD1Du64 ^ (t as u64 + 1));
            v
        }
        Pattern::Storm => {
            let mut v: Vec<usize> = (0..pages).collect();
            shuffle(&mut v, 0x1234_5678_9ABC_DEF1u64);
            v
        }
    }
}

/// Shuffle `v` in place (Fisher-Yates on a xorshift64 sequence from `seed`): the same order for
/// the same seed in every run, so that runs compare.
pub(crate) fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(
            i,
            usize::try_from(x % (i as u64 + 1)).expect("at most i, a usize"),
        );
    }
}

/// Touch every page of `orders` (one read per page) from one thread each; returns the time.
pub(super) fn touch(m: &Mapping, page: usize, orders: &[Vec<usize>]) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for o in orders {
            s.spawn(move || {
                let mut acc = 0u8;
                for &p in o {
                    acc ^= m.read_u8(p * page).unwrap_or(0);
                }
                std::hint::black_box(acc);
            });
        }
    });
    start.elapsed()
}

/// Compare every byte of `m` with `src`, in parallel.
pub(super) fn verify(m: &Mapping, src: &MmapSource, threads: usize) -> Result<()> {
    let len = m.len();
    let chunk = (len / threads.max(1)).next_multiple_of(1 << 20);
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..len.div_ceil(chunk))
            .map(|i| {
                s.spawn(move || -> Result<()> {
                    let mut got = vec![0u8; 1 << 20];
                    let mut want = vec![0u8; 1 << 20];
                    let end = ((i + 1) * chunk).min(len);
                    let mut off = i * chunk;
                    while off < end {
                        let n = (end - off).min(got.len());
                        m.read(off, &mut got[..n])?;
                        src.read_at(off as u64, &mut want[..n])?;
                        if got[..n] != want[..n] {
                            let at = got[..n]
                                .iter()
                                .zip(&want[..n])
                                .position(|(a, b)| a != b)
                                .unwrap_or(0);
                            bail!("byte {} differs from the file", off + at);
                        }
                        off += n;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("verifier panicked"))??;
        }
        Ok(())
    })
}

/// The `pct`-th percentile (the nearest rank, rounding half up) of `v`, in µs from ns.
pub(super) fn percentile(v: &mut [u64], pct: usize) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) * pct.min(100) + 50) / 100;
    v[i] as f64 / 1000.0
}

/// Anonymous memory of this process outside `[skip_start, skip_end)`, from /proc/self/smaps.
pub(super) fn anon_outside(skip_start: u64, skip_end: u64) -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut total = 0;
    let mut skip = false;
    for line in s.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    skip = a < skip_end && skip_start < b;
                    continue;
                }
            }
        }
        if let Some(rest) = line.strip_prefix("Anonymous:") {
            if !skip {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
        }
    }
    total
}
