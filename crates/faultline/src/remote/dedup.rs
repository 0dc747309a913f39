//! The exporter's duplicate-page index (protocol version 2): which pages of the source hold the
//! same bytes as other pages, so that such a page travels once per connection (`KEEP`) and its
//! copies as 29-byte `SAME` frames.
//!
//! Built by one scan over the source when the server starts (in the background: until it is
//! ready, pages go as `DATA`). A page's hash only nominates it: the scan compares every
//! nominated page with its slot's bytes, and only pages equal to them are indexed, so a hash
//! collision costs a `DATA` frame, never a wrong page. Like the rest of the protocol, the index
//! relies on the source not changing while it is served (an exported memory file belongs to a
//! paused VM); the writer then answers an indexed page without reading it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::wire::MAX_KEPT_BYTES;
use crate::source::{bytes_are_zero, PageSource};

/// Bytes read from the source per scan step.
const SCAN_PIECE: usize = 1 << 20;

/// The duplicate pages of a source and the bytes each group shares.
#[derive(Debug, Default)]
pub struct DedupIndex {
    /// Per page: 1 + the slot of its content, 0 when the page is not a known duplicate.
    slot_of: Vec<u32>,
    /// The slots' bytes, slot `i` at `i * page`.
    kept: Vec<u8>,
    page: usize,
    /// Pages that are copies of a slot (every page of a group, the first one too).
    pub pages: u64,
}

impl DedupIndex {
    /// Scan `source` in pages of `page` bytes. Contents found on two or more whole, non-zero
    /// pages become slots, the most repeated first, as many as `MAX_KEPT_BYTES` holds.
    /// `None` when `stop` was set or the source could not be read (then nothing is deduplicated).
    pub fn scan(source: &dyn PageSource, page: usize, stop: &AtomicBool) -> Option<DedupIndex> {
        scan_with(source, page, stop, xxh3_64)
    }

    /// Slots in use.
    pub fn slots(&self) -> usize {
        self.kept.len().checked_div(self.page).unwrap_or(0)
    }

    /// The slot whose bytes page number `p` holds, and those bytes, if it is an indexed copy.
    pub fn copy_of(&self, p: u64) -> Option<(u32, &[u8])> {
        let s = *self.slot_of.get(usize::try_from(p).ok()?)?;
        let slot = s.checked_sub(1)?;
        Some((slot, self.bytes(slot)?))
    }

    /// A slot's bytes.
    pub fn bytes(&self, slot: u32) -> Option<&[u8]> {
        let at = slot as usize * self.page;
        self.kept.get(at..at + self.page)
    }
}

/// [`DedupIndex::scan`] with the page hash given (the tests use a colliding one).
fn scan_with(
    source: &dyn PageSource,
    page: usize,
    stop: &AtomicBool,
    hash: impl Fn(&[u8]) -> u64,
) -> Option<DedupIndex> {
    let len = source.len();
    let whole = usize::try_from(len / page as u64).ok()?;
    // Per page: its hash (0: zero page, or not hashed).
    let mut hashes = vec![0u64; whole];
    let mut groups: HashMap<u64, (usize, u32)> = HashMap::new();
    let mut buf = vec![0u8; SCAN_PIECE.max(page)];
    let per = buf.len() / page;
    let mut p = 0;
    while p < whole {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        let n = per.min(whole - p);
        let b = &mut buf[..n * page];
        if let Err(e) = source.read_at((p * page) as u64, b) {
            tracing::warn!(error = %e, "duplicate-page scan failed; pages are sent as they are");
            return None;
        }
        for (i, pg) in b.chunks_exact(page).enumerate() {
            if bytes_are_zero(pg) {
                continue;
            }
            let h = hash(pg).max(1);
            hashes[p + i] = h;
            groups.entry(h).or_insert((p + i, 0)).1 += 1;
        }
        p += n;
    }
    let mut dups: Vec<(u32, usize, u64)> = groups
        .into_iter()
        .filter(|(_, (_, count))| *count >= 2)
        .map(|(h, (first, count))| (count, first, h))
        .collect();
    // Most repeated first; ties by position, so the index does not depend on hash order.
    dups.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    dups.truncate(MAX_KEPT_BYTES as usize / page);
    let mut kept = vec![0u8; dups.len() * page];
    let mut slot_by_hash = HashMap::with_capacity(dups.len());
    for (slot, &(_, first, h)) in dups.iter().enumerate() {
        let dst = &mut kept[slot * page..(slot + 1) * page];
        if source.read_at((first * page) as u64, dst).is_err() {
            return None;
        }
        let slot = u32::try_from(slot).expect("at most MAX_KEPT_BYTES / page slots");
        slot_by_hash.insert(h, slot);
    }
    let mut pages = 0;
    let mut slot_of = vec![0u32; whole];
    let mut pg = vec![0u8; page];
    for (p, h) in hashes.iter().enumerate() {
        let Some(&slot) = slot_by_hash.get(h).filter(|_| *h != 0) else {
            continue;
        };
        if stop.load(Ordering::Acquire) {
            return None;
        }
        source.read_at((p * page) as u64, &mut pg).ok()?;
        if pg[..] == kept[slot as usize * page..(slot as usize + 1) * page] {
            slot_of[p] = slot + 1;
            pages += 1;
        }
    }
    Some(DedupIndex {
        slot_of,
        kept,
        page,
        pages,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::MemorySource;

    const P: usize = 4096;

    fn page(fill: u8) -> Vec<u8> {
        let mut v = vec![fill; P];
        v[7] = fill.wrapping_add(1);
        v
    }

    #[test]
    fn repeated_pages_become_slots_most_repeated_first() {
        // Pages: A B A 0 C B A C' (C' differs from C in one byte) + a short last page equal to a
        // prefix of A.
        let (a, b, c) = (page(1), page(2), page(3));
        let mut c2 = c.clone();
        c2[100] ^= 1;
        let mut mem = Vec::new();
        for pg in [&a, &b, &a, &vec![0; P], &c, &b, &a, &c2] {
            mem.extend_from_slice(pg);
        }
        mem.extend_from_slice(&a[..100]);
        let src = MemorySource::new(mem);
        let ix = DedupIndex::scan(&src, P, &AtomicBool::new(false)).unwrap();
        assert_eq!(ix.slots(), 2);
        assert_eq!(ix.bytes(0).unwrap(), &a[..], "A (3 copies) is slot 0");
        assert_eq!(ix.bytes(1).unwrap(), &b[..]);
        assert_eq!(ix.pages, 5);
        for (p, want) in [(0, 0), (1, 1), (2, 0), (5, 1), (6, 0)] {
            let (slot, bytes) = ix.copy_of(p).unwrap();
            assert_eq!(slot, want, "page {p}");
            assert_eq!(bytes, &src.bytes()[usize::try_from(p).unwrap() * P..][..P]);
        }
        for p in [3, 4, 7, 8, 99] {
            assert!(ix.copy_of(p).is_none(), "page {p}");
        }
    }

    /// With a hash under which all pages collide the scan nominates them all, and the byte
    /// comparison keeps only true copies.
    #[test]
    fn only_pages_equal_to_their_slot_are_indexed() {
        let (a, b) = (page(1), page(2));
        let mut mem = Vec::new();
        for pg in [&a, &b, &a, &b, &b] {
            mem.extend_from_slice(pg);
        }
        let src = MemorySource::new(mem);
        let ix = scan_with(&src, P, &AtomicBool::new(false), |_| 7).unwrap();
        assert_eq!(ix.slots(), 1);
        assert_eq!(ix.bytes(0).unwrap(), &a[..]);
        assert_eq!(
            (0..5)
                .map(|p| ix.copy_of(p).map(|c| c.0))
                .collect::<Vec<_>>(),
            [Some(0), None, Some(0), None, None]
        );
        assert_eq!(ix.pages, 2);
    }

    #[test]
    fn slots_are_bounded_by_the_kept_bytes_limit() {
        // 2 MiB pages: 8 slots at most; 10 contents each on 2 pages.
        let big = 2 << 20;
        let mut mem = Vec::new();
        for k in 0..20u8 {
            mem.extend(std::iter::repeat_n(k / 2 + 1, big));
        }
        let src = MemorySource::new(mem);
        let ix = DedupIndex::scan(&src, big, &AtomicBool::new(false)).unwrap();
        assert_eq!(ix.slots(), MAX_KEPT_BYTES as usize / big);
        assert_eq!(ix.pages, 16);
        assert!(DedupIndex::scan(&src, big, &AtomicBool::new(true)).is_none());
    }
}
