//! A source of bytes held in this process's memory.
//!
//! [`MemorySource`] owns its bytes in an `Arc<[u8]>`: immutable for its whole life, so it lends a
//! pointer into the buffer ([`PageSource::ptr_at`]) and the kernel copies straight from it into
//! the faulting process (one copy). Cloning is cheap and shares the buffer, so one snapshot in
//! memory can back many regions (clones of a VM) at once.
//!
//! At construction the buffer is scanned once and every 4 KiB page that is all zeros is recorded
//! in a bitmap ([`ZeroPages`], also used by the mmap source). `is_zero` then answers from the
//! bitmap for whole pages and by looking at the bytes for the partial pages at the edges of an
//! unaligned range, so the answer is always exact.

use std::ops::Range;
use std::sync::Arc;

use super::{check_bounds, PageSource, SourceError};

/// The granule of [`ZeroPages`]: one bit per 4 KiB, the smallest page size. A 2 MiB huge page is
/// zero iff its 512 granules are.
pub(crate) const ZERO_GRANULE: u64 = 4096;
/// [`ZERO_GRANULE`] as a buffer length.
pub(crate) const ZERO_GRANULE_BYTES: usize = 4096;
const _: () = assert!(ZERO_GRANULE_BYTES as u64 == ZERO_GRANULE);

/// Whether `bytes` are all zero. Folds with OR instead of stopping at the first non-zero byte, so
/// the loop has no branch and vectorises; callers pass at most a page.
pub(crate) fn bytes_are_zero(bytes: &[u8]) -> bool {
    // Most pages of a snapshot are not zero and show it in their first bytes: look there first,
    // then OR the rest in blocks (vectorised), stopping at the first non-zero block.
    let (head, rest) = bytes.split_at(bytes.len().min(64));
    head.iter().all(|&b| b == 0)
        && rest
            .chunks(512)
            .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The index of granule `g`'s word in the bitmap. Callers pass granules of the source, whose
/// word count was checked to fit a `usize` when the bitmap was built, so the cast is lossless.
fn word(g: u64) -> usize {
    (g / 64) as usize
}

/// A bitmap with one bit per [`ZERO_GRANULE`] of a source: set iff the granule is all zeros. The
/// last granule may be shorter than 4 KiB (a source whose length is not a multiple of it); its
/// bit covers the bytes up to the end of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ZeroPages {
    bits: Vec<u64>,
    source_len: u64,
}

impl ZeroPages {
    /// Build the bitmap of a `source_len`-byte source, asking `granule_is_zero(offset, len)` for
    /// each granule in order. Stops at the first `Err` and returns it.
    pub(crate) fn build<E>(
        source_len: u64,
        mut granule_is_zero: impl FnMut(u64, u64) -> Result<bool, E>,
    ) -> Result<ZeroPages, E> {
        let granules = source_len.div_ceil(ZERO_GRANULE);
        let words = usize::try_from(granules.div_ceil(64))
            .expect("one bit per 4 KiB of a source that fits in the address space fits in a Vec");
        let mut bits = vec![0u64; words];
        for g in 0..granules {
            let start = g * ZERO_GRANULE;
            let len = ZERO_GRANULE.min(source_len - start);
            if granule_is_zero(start, len)? {
                bits[word(g)] |= 1 << (g % 64);
            }
        }
        Ok(ZeroPages { bits, source_len })
    }

    /// Whether granule `g` is all zeros.
    fn granule(&self, g: u64) -> bool {
        self.bits[word(g)] & (1 << (g % 64)) != 0
    }

    /// Whether every granule in `lo..hi` is zero, a word at a time.
    fn all_zero(&self, lo: u64, hi: u64) -> bool {
        let mut g = lo;
        while g < hi {
            let bit = g % 64;
            let n = (64 - bit).min(hi - g);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if self.bits[word(g)] & mask != mask {
                return false;
            }
            g += n;
        }
        true
    }

    /// How many granules are zero.
    pub(crate) fn zero_granules(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether `offset..offset + len` is all zeros. Whole granules are answered from the bitmap;
    /// for a granule the range covers only in part and that is not zero as a whole, the answer
    /// comes from `partial(offset, len)` on the covered part (`None`: unknown). `None` when the
    /// range lies outside the source.
    pub(crate) fn query(
        &self,
        offset: u64,
        len: u64,
        mut partial: impl FnMut(u64, u64) -> Option<bool>,
    ) -> Option<bool> {
        let end = offset.checked_add(len).filter(|&e| e <= self.source_len)?;
        if len == 0 {
            return Some(true);
        }
        let first = offset / ZERO_GRANULE;
        let last = (end - 1) / ZERO_GRANULE;
        let covered = |g: u64| {
            let start = g * ZERO_GRANULE;
            let stop = (start + ZERO_GRANULE).min(self.source_len);
            offset <= start && stop <= end
        };
        let (mut lo, mut hi) = (first, last + 1);
        let mut edges = [None, None];
        if !covered(first) {
            edges[0] = Some(first);
            lo = first + 1;
        }
        if last != first && !covered(last) {
            edges[1] = Some(last);
            hi = last;
        }
        if lo < hi && !self.all_zero(lo, hi) {
            return Some(false);
        }
        let mut unknown = false;
        for g in edges.into_iter().flatten() {
            if self.granule(g) {
                continue;
            }
            let start = (g * ZERO_GRANULE).max(offset);
            let stop = ((g + 1) * ZERO_GRANULE).min(end);
            match partial(start, stop - start) {
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

/// Bytes in memory, shared and immutable.
#[derive(Debug, Clone)]
pub struct MemorySource {
    data: Arc<[u8]>,
    zero: ZeroPages,
    name: String,
}

impl MemorySource {
    /// A source holding `data` (moved into a shared buffer).
    pub fn new(data: Vec<u8>) -> MemorySource {
        MemorySource::from_arc(Arc::from(data))
    }

    /// A source sharing `data` with its other owners. Scans it once for zero pages.
    pub fn from_arc(data: Arc<[u8]>) -> MemorySource {
        let zero = ZeroPages::build(data.len() as u64, |offset, len| {
            // The ranges come from `build`, inside the buffer.
            Ok::<_, std::convert::Infallible>(bytes_are_zero(&data[range(offset, len)]))
        });
        let zero = match zero {
            Ok(z) => z,
            Err(never) => match never {},
        };
        MemorySource {
            data,
            zero,
            name: "memory".to_string(),
        }
    }

    /// Use `name` in logs and errors instead of "memory".
    pub fn with_name(mut self, name: impl Into<String>) -> MemorySource {
        self.name = name.into();
        self
    }

    /// The shared buffer.
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.data
    }

    /// How many 4 KiB pages (counting a shorter last page) are all zeros.
    pub fn zero_pages(&self) -> u64 {
        self.zero.zero_granules()
    }
}

/// `offset..offset + len` as a `usize` range; only called on ranges already checked against the
/// length of a buffer, which is a `usize`.
fn range(offset: u64, len: u64) -> Range<usize> {
    let start = usize::try_from(offset).expect("offset checked against a buffer length");
    let len = usize::try_from(len).expect("length checked against a buffer length");
    start..start + len
}

impl PageSource for MemorySource {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        check_bounds(&self.name, offset, len, self.len())?;
        buf.copy_from_slice(&self.data[range(offset, len)]);
        Ok(())
    }

    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        check_bounds(&self.name, offset, len, self.len()).ok()?;
        // The buffer is never written after construction and lives as long as `self`.
        Some(self.data[range(offset, len)].as_ptr())
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        self.zero.query(offset, len, |o, l| {
            Some(bytes_are_zero(&self.data[range(o, l)]))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::Retry;
    use proptest::prelude::*;

    const P: usize = 4096;

    /// Pages 0 and 2 zero, page 1 with one byte at 100, page 3 full of 0x5a, then 100 bytes of
    /// zeros (a short last page).
    fn sample() -> Vec<u8> {
        let mut v = vec![0u8; 4 * P + 100];
        v[P + 100] = 7;
        v[3 * P..4 * P].fill(0x5a);
        v
    }

    #[test]
    fn reads_back_the_bytes() {
        let data = sample();
        let s = MemorySource::new(data.clone());
        assert_eq!(s.len(), data.len() as u64);
        let mut buf = vec![0u8; 2 * P];
        s.read_at(P as u64, &mut buf).unwrap();
        assert_eq!(buf, data[P..3 * P]);
        let mut tail = vec![1u8; 150];
        s.read_at(4 * P as u64 - 50, &mut tail).unwrap();
        assert_eq!(tail, data[4 * P - 50..]);
    }

    #[test]
    fn out_of_range_is_permanent() {
        let s = MemorySource::new(sample()).with_name("snap");
        let mut buf = vec![0u8; P];
        let e = s.read_at(4 * P as u64, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, 4 * P as u64);
        assert_eq!(e.source_name, "snap");
        assert!(e.to_string().contains("0x4000"), "{e}");
        assert_eq!(s.ptr_at(4 * P as u64, P as u64), None);
        assert_eq!(s.is_zero(4 * P as u64, P as u64), None);
    }

    #[test]
    fn ptr_at_bytes_equal_read_at_bytes() {
        let s = MemorySource::new(sample());
        let ptr = s.ptr_at(P as u64, 3 * P as u64).unwrap();
        let mut buf = vec![0u8; 3 * P];
        s.read_at(P as u64, &mut buf).unwrap();
        // The pointer is into the immutable buffer of `s`, which outlives this check.
        assert_eq!(ptr, s.bytes()[P..].as_ptr());
        assert_eq!(&s.bytes()[P..4 * P], &buf[..]);
    }

    #[test]
    fn is_zero_per_page_and_partial() {
        let s = MemorySource::new(sample());
        assert_eq!(s.zero_pages(), 3);
        assert_eq!(s.is_zero(0, P as u64), Some(true));
        assert_eq!(s.is_zero(P as u64, P as u64), Some(false));
        assert_eq!(s.is_zero(2 * P as u64, P as u64), Some(true));
        assert_eq!(s.is_zero(0, 3 * P as u64), Some(false));
        assert_eq!(s.is_zero(3 * P as u64, P as u64 + 100), Some(false));
        assert_eq!(s.is_zero(4 * P as u64, 100), Some(true));
        // Unaligned ranges look at the bytes: page 1 is zero except byte 100.
        assert_eq!(s.is_zero(P as u64, 100), Some(true));
        assert_eq!(s.is_zero(P as u64 + 101, P as u64 - 101), Some(true));
        assert_eq!(s.is_zero(P as u64 + 50, 100), Some(false));
        assert_eq!(s.is_zero(P as u64 + 101, 2 * P as u64 - 101), Some(true));
        assert_eq!(s.is_zero(P as u64 + 101, 2 * P as u64), Some(false));
        assert_eq!(s.is_zero(5, 0), Some(true));
    }

    proptest! {
        #[test]
        fn is_zero_matches_bytes(
            pages in proptest::collection::vec(
                prop_oneof![Just(None), (0usize..P, 1u8..=255).prop_map(Some)], 0..12),
            tail in 0usize..P,
            a in 0usize..13 * P,
            b in 0usize..13 * P,
        ) {
            let mut data = vec![0u8; pages.len() * P + tail];
            for (i, p) in pages.iter().enumerate() {
                if let Some((at, v)) = p {
                    data[i * P + at] = *v;
                }
            }
            let s = MemorySource::new(data.clone());
            let (lo, hi) = (a.min(b), a.max(b));
            let expect = (hi <= data.len()).then(|| data[lo..hi].iter().all(|&x| x == 0));
            prop_assert_eq!(s.is_zero(lo as u64, (hi - lo) as u64), expect);
        }
    }
}
