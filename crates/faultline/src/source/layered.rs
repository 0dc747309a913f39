//! A diff over a base: some pages come from other sources.
//!
//! [`LayeredSource`] is a base source plus any number of diff layers, at page granularity. Each
//! diff layer is a source and a set of pages it overrides, each page stored at some offset in the
//! diff (at the page's own offset for a sparse full-size diff, [`LayeredSource::with_diff`]; one
//! after another for a packed diff, [`LayeredSource::with_packed_diff`]; anywhere,
//! [`LayeredSource::with_diff_at`]). A later layer overrides earlier ones. This is how a snapshot
//! taken after a base snapshot is served: the base once, the pages written since from the diff.
//!
//! The map from page to (layer, offset) is a `BTreeMap`, so a read finds its runs in
//! `O(log n)` per run. A read spanning several layers is split into runs, each a maximal stretch of
//! consecutive pages from one layer at consecutive offsets, and each run is one read of that
//! layer. [`PageSource::ptr_at`] lends a pointer only when the whole range is one run of a layer
//! that lends pointers; [`PageSource::is_zero`] is zero iff every run is, and unknown if any run is
//! unknown (and none is known non-zero).
//!
//! The length is the base's length; diff pages must lie inside it. The last page may be short
//! when the base length is not a multiple of the page size; a diff then holds only the bytes up
//! to the end.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{check_bounds, PageSource, SourceError};

/// Why a layer could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// The page size is zero or not a power of two.
    #[error("page size {0} is not a power of two")]
    PageSize(u64),
    /// A diff page lies past the end of the base.
    #[error("page {page} lies outside the {base_len}-byte base")]
    PageOutside {
        /// Page index.
        page: u64,
        /// Length of the base.
        base_len: u64,
    },
    /// A diff page's bytes are not all inside the diff source.
    #[error("page {page} at offset {offset:#x} of diff {diff} lies outside its {diff_len} bytes")]
    DiffTooShort {
        /// Page index.
        page: u64,
        /// Where the page would start in the diff.
        offset: u64,
        /// The diff's name.
        diff: String,
        /// The diff's length.
        diff_len: u64,
    },
}

/// Where an overridden page is: which diff layer, at which offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    layer: usize,
    offset: u64,
}

/// A maximal stretch of a read served by one source at consecutive offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// `None`: the base; `Some(i)`: diff layer `i`.
    layer: Option<usize>,
    /// Offset in that source.
    src_offset: u64,
    /// Offset in the layered source.
    start: u64,
    /// Length in bytes.
    len: u64,
}

/// A base source with page-granular diff layers over it.
#[derive(Debug, Clone)]
pub struct LayeredSource {
    base: Arc<dyn PageSource>,
    page_size: u64,
    diffs: Vec<Arc<dyn PageSource>>,
    pages: BTreeMap<u64, Slot>,
    name: String,
}

impl LayeredSource {
    /// A source that reads everything from `base` until diffs are added. `page_size` is the unit
    /// of overriding, a power of two (usually the region's page size).
    pub fn new(base: Arc<dyn PageSource>, page_size: u64) -> Result<LayeredSource, LayerError> {
        if !page_size.is_power_of_two() {
            return Err(LayerError::PageSize(page_size));
        }
        let name = format!("layered({})", base.name());
        Ok(LayeredSource {
            base,
            page_size,
            diffs: Vec::new(),
            pages: BTreeMap::new(),
            name,
        })
    }

    /// Add a sparse diff: the same size as the base, valid at `pages` (page indexes), which now
    /// come from `diff` at their own offsets.
    pub fn with_diff(
        self,
        diff: Arc<dyn PageSource>,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<LayeredSource, LayerError> {
        let page_size = self.page_size;
        let at = pages.into_iter().map(|p| (p, p.saturating_mul(page_size)));
        self.with_diff_at(diff, at)
    }

    /// Add a packed diff: the `k`-th of `pages` is stored at `k * page_size` in `diff`.
    pub fn with_packed_diff(
        self,
        diff: Arc<dyn PageSource>,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<LayeredSource, LayerError> {
        let page_size = self.page_size;
        let at = pages
            .into_iter()
            .zip(0u64..)
            .map(|(p, k)| (p, k.saturating_mul(page_size)));
        self.with_diff_at(diff, at)
    }

    /// Add a diff layer: each `(page, offset)` says page index `page` now comes from `diff` at
    /// `offset`. Overrides the base and every earlier layer for those pages. Checks that every
    /// page lies in the base and its bytes in the diff; nothing is added on error.
    pub fn with_diff_at(
        mut self,
        diff: Arc<dyn PageSource>,
        pages: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<LayeredSource, LayerError> {
        let layer = self.diffs.len();
        let base_len = self.base.len();
        let diff_len = diff.len();
        let mut added = Vec::new();
        for (page, offset) in pages {
            let start = page
                .checked_mul(self.page_size)
                .filter(|&s| s < base_len)
                .ok_or(LayerError::PageOutside { page, base_len })?;
            let bytes = self.page_size.min(base_len - start);
            if check_bounds("", offset, bytes, diff_len).is_err() {
                return Err(LayerError::DiffTooShort {
                    page,
                    offset,
                    diff: diff.name(),
                    diff_len,
                });
            }
            added.push((page, Slot { layer, offset }));
        }
        self.pages.extend(added);
        self.diffs.push(diff);
        Ok(self)
    }

    /// The unit of overriding.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// How many pages come from a diff layer.
    pub fn diff_pages(&self) -> usize {
        self.pages.len()
    }

    /// Which diff layer page `page` comes from (0 for the first added), `None` for the base.
    pub fn layer_of(&self, page: u64) -> Option<usize> {
        self.pages.get(&page).map(|s| s.layer)
    }

    /// The runs of `offset..offset + len`, which must be inside the source.
    fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        Runs {
            source: self,
            pos: offset,
            end: offset + len,
        }
    }

    fn layer(&self, layer: Option<usize>) -> &dyn PageSource {
        match layer {
            None => &*self.base,
            Some(i) => &*self.diffs[i],
        }
    }
}

/// Iterator over the [`Run`]s of a range.
struct Runs<'a> {
    source: &'a LayeredSource,
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.pos >= self.end {
            return None;
        }
        let ps = self.source.page_size;
        let start = self.pos;
        let page = start / ps;
        let page_end = |p: u64| p.saturating_add(1).saturating_mul(ps).min(self.end);
        let run = match self.source.pages.get(&page) {
            Some(&slot) => {
                let mut stop = page_end(page);
                let mut next = page + 1;
                for (&p, &s) in self.source.pages.range(page + 1..) {
                    let contiguous = (p - page)
                        .checked_mul(ps)
                        .and_then(|d| slot.offset.checked_add(d))
                        .is_some_and(|o| o == s.offset);
                    if stop >= self.end || p != next || s.layer != slot.layer || !contiguous {
                        break;
                    }
                    stop = page_end(p);
                    next = p + 1;
                }
                Run {
                    layer: Some(slot.layer),
                    src_offset: slot.offset + (start - page * ps),
                    start,
                    len: stop - start,
                }
            }
            None => {
                let stop = match self.source.pages.range(page + 1..).next() {
                    Some((&p, _)) => p.saturating_mul(ps).min(self.end),
                    None => self.end,
                };
                Run {
                    layer: None,
                    src_offset: start,
                    start,
                    len: stop - start,
                }
            }
        };
        self.pos = run.start + run.len;
        Some(run)
    }
}

impl PageSource for LayeredSource {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        check_bounds(&self.name, offset, len, self.len())?;
        for run in self.runs(offset, len) {
            // A run lies inside `offset..offset + buf.len()`: both fit usize.
            let at = usize::try_from(run.start - offset).expect("a run inside the read");
            let n = usize::try_from(run.len).expect("a run inside the read");
            let part = &mut buf[at..at + n];
            let layer = self.layer(run.layer);
            layer
                .read_at(run.src_offset, part)
                .map_err(|e| match run.layer {
                    // The base has our offsets: its error says all there is to say.
                    None => e,
                    Some(i) => SourceError {
                        what: format!(
                            "diff layer {i} ({}) at offset {:#x}: {}",
                            e.source_name, run.src_offset, e.what
                        ),
                        offset,
                        len,
                        source_name: self.name.clone(),
                        retry: e.retry,
                        cause: e.cause,
                    },
                })?;
        }
        Ok(())
    }

    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        check_bounds(&self.name, offset, len, self.len()).ok()?;
        let mut runs = self.runs(offset, len);
        let run = runs.next()?;
        if runs.next().is_some() {
            return None;
        }
        self.layer(run.layer).ptr_at(run.src_offset, run.len)
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        check_bounds(&self.name, offset, len, self.len()).ok()?;
        let mut unknown = false;
        for run in self.runs(offset, len) {
            match self.layer(run.layer).is_zero(run.src_offset, run.len) {
                Some(true) => {}
                Some(false) => return Some(false),
                None => unknown = true,
            }
        }
        if unknown {
            None
        } else {
            Some(true)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::{Failure, FailureInjecting, MemorySource, Retry, ZeroSource};
    use proptest::prelude::*;

    const P: u64 = 4096;
    /// [`P`] as a buffer length.
    const PB: usize = 4096;

    /// A test size or offset as an index.
    fn ix(x: u64) -> usize {
        usize::try_from(x).expect("a test size fits usize")
    }

    fn mem(v: Vec<u8>) -> Arc<dyn PageSource> {
        Arc::new(MemorySource::new(v))
    }

    #[test]
    fn diff_pages_override_the_base() {
        let base = vec![1u8; 4 * PB];
        let diff = vec![2u8; 2 * PB];
        let s = LayeredSource::new(mem(base), P)
            .unwrap()
            .with_packed_diff(mem(diff), [1, 3])
            .unwrap();
        assert_eq!(s.len(), 4 * P);
        assert_eq!(s.diff_pages(), 2);
        assert_eq!(s.layer_of(1), Some(0));
        assert_eq!(s.layer_of(2), None);
        let mut buf = vec![0u8; 4 * PB];
        s.read_at(0, &mut buf).unwrap();
        for (i, chunk) in buf.chunks(PB).enumerate() {
            let expect = if i % 2 == 1 { 2 } else { 1 };
            assert!(chunk.iter().all(|&b| b == expect), "page {i}");
        }
        // A read across the page 0 / page 1 boundary splits into two runs.
        assert_eq!(s.runs(P - 10, 20).count(), 2);
        let mut buf = [0u8; 20];
        s.read_at(P - 10, &mut buf).unwrap();
        assert_eq!(&buf[..10], &[1; 10]);
        assert_eq!(&buf[10..], &[2; 10]);
    }

    #[test]
    fn later_layers_win_and_contiguous_pages_form_one_run() {
        let base = ZeroSource::new(8 * P);
        let first = vec![0xaa; 8 * PB];
        let second = vec![0xbb; 8 * PB];
        let s = LayeredSource::new(Arc::new(base), P)
            .unwrap()
            .with_diff(mem(first), 2..6)
            .unwrap()
            .with_diff(mem(second), [4])
            .unwrap();
        assert_eq!(s.layer_of(3), Some(0));
        assert_eq!(s.layer_of(4), Some(1));
        let runs: Vec<_> = s
            .runs(0, 8 * P)
            .map(|r| (r.layer, r.start, r.len))
            .collect();
        assert_eq!(
            runs,
            vec![
                (None, 0, 2 * P),
                (Some(0), 2 * P, 2 * P),
                (Some(1), 4 * P, P),
                (Some(0), 5 * P, P),
                (None, 6 * P, 2 * P)
            ]
        );
        let mut page = vec![0u8; PB];
        s.read_at(4 * P, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xbb));
        s.read_at(5 * P, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xaa));
        // is_zero combines: the zero base says yes, the diffs say no.
        assert_eq!(s.is_zero(0, 2 * P), Some(true));
        assert_eq!(s.is_zero(6 * P, 2 * P), Some(true));
        assert_eq!(s.is_zero(P, 2 * P), Some(false));
        // ptr_at: only from one run of a lending layer. The zero base lends nothing.
        assert!(s.ptr_at(2 * P, 2 * P).is_some());
        assert_eq!(s.ptr_at(3 * P, 2 * P), None);
        assert_eq!(s.ptr_at(0, P), None);
    }

    #[test]
    fn bad_layers_are_refused() {
        let base = mem(vec![0; 2 * PB + 100]);
        assert_eq!(
            LayeredSource::new(base.clone(), 3000).unwrap_err(),
            LayerError::PageSize(3000)
        );
        assert_eq!(
            LayeredSource::new(base.clone(), 0).unwrap_err(),
            LayerError::PageSize(0)
        );
        let s = LayeredSource::new(base.clone(), P).unwrap();
        assert_eq!(
            s.clone()
                .with_packed_diff(mem(vec![0; PB]), [3])
                .unwrap_err(),
            LayerError::PageOutside {
                page: 3,
                base_len: 2 * P + 100
            }
        );
        assert!(matches!(
            s.clone()
                .with_packed_diff(mem(vec![0; PB]), [0, 1])
                .unwrap_err(),
            LayerError::DiffTooShort {
                page: 1,
                offset: P,
                ..
            }
        ));
        // The short last page needs only its 100 bytes in the diff.
        let s = s.with_packed_diff(mem(vec![7; 100]), [2]).unwrap();
        let mut tail = [0u8; 100];
        s.read_at(2 * P, &mut tail).unwrap();
        assert_eq!(tail, [7; 100]);
        assert!(s.read_at(2 * P, &mut [0u8; 101]).is_err());
        assert!(LayeredSource::new(base, P)
            .unwrap()
            .with_diff(mem(vec![]), [u64::MAX])
            .is_err());
    }

    #[test]
    fn diff_errors_name_the_layered_offset_and_keep_retry() {
        let diff = FailureInjecting::new(MemorySource::new(vec![5; PB]))
            .with_rule(Failure::PermanentAt { offset: 0 });
        let s = LayeredSource::new(mem(vec![0; 4 * PB]), P)
            .unwrap()
            .with_packed_diff(Arc::new(diff), [2])
            .unwrap();
        let mut buf = vec![0u8; 2 * PB];
        let e = s.read_at(P, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, P);
        assert_eq!(e.source_name, s.name());
        assert!(e.what.contains("diff layer 0"), "{e}");
        // The base part still reads.
        s.read_at(P, &mut buf[..PB]).unwrap();
    }

    /// A diff layer of a test case: `(page, fill byte)` pairs.
    type Layer = Vec<(u64, u8)>;

    /// A random layered source: page size, base bytes, and diff layers each given as
    /// `(page, fill byte)` lists, stored packed in memory. The base is built from one seed per
    /// page (0: a zero page) rather than byte by byte, which keeps generation fast.
    fn layered_case() -> impl Strategy<Value = (u64, Vec<u8>, Vec<Layer>)> {
        (
            prop_oneof![Just(16u64), Just(512), Just(4096)],
            0u64..10,
            0u64..4096,
        )
            .prop_flat_map(|(ps, pages, tail)| {
                let len = pages * ps + tail % ps;
                let npages = len.div_ceil(ps).max(1);
                let seeds =
                    proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], ix(npages));
                let base = seeds.prop_map(move |seeds| {
                    (0..len)
                        .map(|i| {
                            let seed = seeds[ix(i / ps)];
                            if seed == 0 {
                                0
                            } else {
                                seed ^ (i % 7) as u8
                            }
                        })
                        .collect::<Vec<u8>>()
                });
                let layer = proptest::collection::vec(
                    (0..npages, prop_oneof![Just(0u8), any::<u8>()]),
                    0..6,
                );
                (Just(ps), base, proptest::collection::vec(layer, 0..3))
            })
    }

    /// Where each byte of the model comes from: (diff layer or base, offset in that source).
    type Origin = (Option<usize>, u64);

    proptest! {
        #[test]
        fn reads_equal_a_reference_model(
            (ps, base, layers) in layered_case(),
            reads in proptest::collection::vec((0u64..45_000, 0u64..20_000), 1..12),
        ) {
            let len = base.len() as u64;
            let mut model = base.clone();
            let mut origin: Vec<Origin> = (0..len).map(|i| (None, i)).collect();
            let base_src = MemorySource::new(base);
            let mut buffers = vec![base_src.bytes().clone()];
            let mut s = LayeredSource::new(Arc::new(base_src), ps).unwrap();
            for (li, layer) in layers.iter().enumerate() {
                let mut packed = Vec::new();
                let mut pages = Vec::new();
                for &(page, fill) in layer {
                    let start = page * ps;
                    if start >= len {
                        continue;
                    }
                    let end = (start + ps).min(len);
                    let at = packed.len() as u64;
                    for (k, i) in (start..end).enumerate() {
                        // Vary the bytes within a page a little, keeping zero pages zero.
                        let b = if fill == 0 { 0 } else { fill.wrapping_add(k.to_le_bytes()[0] % 3) };
                        model[ix(i)] = b;
                        origin[ix(i)] = (Some(li), at + k as u64);
                        packed.push(b);
                    }
                    packed.resize(packed.len() + ix(ps - (end - start)), 0);
                    pages.push(page);
                }
                let diff = MemorySource::new(packed);
                buffers.push(diff.bytes().clone());
                s = s.with_packed_diff(Arc::new(diff), pages).unwrap();
            }
            prop_assert_eq!(s.len(), len);
            for (off, n) in reads {
                let off = off % (len + 2);
                let mut buf = vec![0u8; ix(n % (len + 2))];
                let n = buf.len() as u64;
                let r = s.read_at(off, &mut buf);
                if off + n > len {
                    let e = r.unwrap_err();
                    prop_assert_eq!(e.retry, Retry::Permanent);
                    prop_assert_eq!(s.ptr_at(off, n), None);
                    prop_assert_eq!(s.is_zero(off, n), None);
                    continue;
                }
                r.unwrap();
                let want = &model[ix(off)..ix(off + n)];
                prop_assert_eq!(&buf[..], want);
                prop_assert_eq!(s.is_zero(off, n), Some(want.iter().all(|&b| b == 0)));
                // ptr_at lends iff the range is non-empty and comes from one layer at
                // consecutive offsets; the lent bytes are the model's.
                let o = &origin[ix(off)..ix(off + n)];
                let one_run = n > 0 && o.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 + 1 == w[1].1);
                let lent = s.ptr_at(off, n);
                prop_assert_eq!(lent.is_some(), one_run);
                if let Some(p) = lent {
                    let layer = o[0].0.map_or(0, |l| l + 1);
                    let b = &buffers[layer];
                    let at = p as usize - b.as_ptr() as usize;
                    prop_assert_eq!(at as u64, o[0].1);
                    prop_assert_eq!(&b[at..at + ix(n)], want);
                }
            }
        }
    }
}
