//! Regions: registered address ranges and what serves them.
//!
//! A [`Region`] maps an address range of the client (the process that owns the userfaultfd) to a
//! [`PageSource`] at an offset, with a page size (4 KiB or 2 MiB) and a way of resolving
//! ([`Backing`]). A [`RegionMap`] holds the regions of one userfaultfd, non-overlapping and sorted,
//! and finds the region of a fault address in O(log n). REMAP and UNMAP events move and cut
//! regions; their page states are shared between the pieces (a piece knows its first page's index
//! in the shared [`PageStates`]).

use std::sync::Arc;

use faultline_uffd::{Mapping, MemoryKind};

use crate::source::PageSource;
use crate::state::PageStates;

/// How a region's faults are resolved.
#[derive(Debug, Clone)]
pub enum Backing {
    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` into missing pages (private anonymous memory, shmem or
    /// hugetlbfs registered in MISSING mode).
    Copy,
    /// In-process private anonymous memory served from a source that cannot lend pointers (a
    /// file read with pread, a decompressed image): read the bytes into a scratch buffer of this
    /// process and `UFFDIO_MOVE` its pages into place — one copy instead of two. Needs the MOVE
    /// feature and a userfaultfd of this process; otherwise it behaves like `Copy`.
    Move,
    /// Shared memory (shmem / shared hugetlbfs): write the bytes into the page cache through
    /// `cache` (this process's own mapping of the same memfd, offset 0 = region start), then
    /// `UFFDIO_CONTINUE` maps them (MINOR mode, or MISSING mode on shmem).
    Minor {
        /// The handler's writable mapping of the region's memory.
        cache: Arc<Mapping>,
    },
}

/// A registered address range and what serves it.
#[derive(Debug, Clone)]
pub struct Region {
    /// Start address in the client's address space.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The memory kind (decides the page size and whether ZEROPAGE exists).
    pub kind: MemoryKind,
    /// The bytes.
    pub source: Arc<dyn PageSource>,
    /// Offset of the region's first byte in the source.
    pub source_offset: u64,
    /// How to resolve.
    pub backing: Backing,
}

/// Why a region cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// Empty.
    #[error("region at {start:#x} is empty")]
    Empty {
        /// Start.
        start: u64,
    },
    /// Not aligned to the page size.
    #[error("region {start:#x}+{len:#x} is not aligned to its {page_size}-byte pages")]
    Unaligned {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// Page size.
        page_size: u64,
    },
    /// Address arithmetic overflows.
    #[error("region {start:#x}+{len:#x} overflows")]
    Overflow {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
    /// Reads would leave the source.
    #[error("region {start:#x}+{len:#x} at source offset {offset:#x} runs past the {source_len}-byte source")]
    BeyondSource {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// Source offset.
        offset: u64,
        /// Source length.
        source_len: u64,
    },
    /// Two regions overlap.
    #[error("region {start:#x}+{len:#x} overlaps region {other_start:#x}+{other_len:#x}")]
    Overlap {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// The other's start.
        other_start: u64,
        /// The other's length.
        other_len: u64,
    },
    /// The cache mapping of a MINOR region is smaller than the region.
    #[error("the page-cache mapping of region {start:#x} is {cache_len} bytes, the region {len}")]
    CacheTooSmall {
        /// Start.
        start: u64,
        /// Region length.
        len: u64,
        /// Cache length.
        cache_len: u64,
    },
}

impl Region {
    /// A region served by COPY/ZEROPAGE from `source` at `source_offset`.
    pub fn new(
        start: u64,
        len: u64,
        kind: MemoryKind,
        source: Arc<dyn PageSource>,
        source_offset: u64,
    ) -> Region {
        Region {
            start,
            len,
            kind,
            source,
            source_offset,
            backing: Backing::Copy,
        }
    }

    /// The region covering all of `mapping`, served from `source` at offset 0.
    pub fn for_mapping(mapping: &Mapping, source: Arc<dyn PageSource>) -> Region {
        Region::new(
            mapping.addr(),
            mapping.len() as u64,
            mapping.kind(),
            source,
            0,
        )
    }

    /// Use another backing.
    pub fn with_backing(mut self, backing: Backing) -> Region {
        self.backing = backing;
        self
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.kind.page_size() as u64
    }

    /// Number of pages. Panics for a region whose page count does not fit `usize` (possible on
    /// a 32-bit target only), which [`Region::validate`] refuses.
    pub fn pages(&self) -> usize {
        usize::try_from(self.len / self.page_size())
            .expect("a region's page count fits usize (Region::validate checks it)")
    }

    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Check alignment, overflow and that every read stays inside the source.
    pub fn validate(&self) -> Result<(), RegionError> {
        let (start, len, page_size) = (self.start, self.len, self.page_size());
        if len == 0 {
            return Err(RegionError::Empty { start });
        }
        // The page states are a table in this process: their count must fit `usize`.
        if start.checked_add(len).is_none() || usize::try_from(len / page_size).is_err() {
            return Err(RegionError::Overflow { start, len });
        }
        if start % page_size != 0 || len % page_size != 0 {
            return Err(RegionError::Unaligned {
                start,
                len,
                page_size,
            });
        }
        let source_len = self.source.len();
        match self.source_offset.checked_add(len) {
            Some(end) if end <= source_len => {}
            _ => {
                return Err(RegionError::BeyondSource {
                    start,
                    len,
                    offset: self.source_offset,
                    source_len,
                })
            }
        }
        if let Backing::Minor { cache } = &self.backing {
            if (cache.len() as u64) < len {
                return Err(RegionError::CacheTooSmall {
                    start,
                    len,
                    cache_len: cache.len() as u64,
                });
            }
        }
        Ok(())
    }
}

/// A region with its page states.
#[derive(Debug, Clone)]
pub struct RegionEntry {
    /// The region (its start moves with REMAP).
    pub region: Region,
    /// Page states, possibly shared with other pieces of the same original region.
    pub states: Arc<PageStates>,
    /// Index in `states` of this piece's first page.
    pub state_base: usize,
    /// Offset of this piece inside its cache mapping (MINOR backing), in bytes.
    pub cache_offset: u64,
    /// Index in the session's [`ServedLog`](crate::ServedLog) of `states`' first page (the page
    /// `state_base + i` of this piece is `log_base + state_base + i` there).
    pub log_base: usize,
}

impl RegionEntry {
    /// A fresh entry, every page missing.
    pub fn new(region: Region) -> RegionEntry {
        let states = Arc::new(PageStates::new(region.pages()));
        RegionEntry {
            region,
            states,
            state_base: 0,
            cache_offset: 0,
            log_base: 0,
        }
    }

    /// The page index (in this piece) of `addr`.
    pub fn page_of(&self, addr: u64) -> usize {
        usize::try_from((addr - self.region.start) / self.region.page_size())
            .expect("an address of the region: its index is below `pages()`, a usize")
    }

    /// Address of page `page` of this piece.
    pub fn addr_of(&self, page: usize) -> u64 {
        self.region.start + page as u64 * self.region.page_size()
    }

    /// Whether any of these pages of this piece was removed by the client (its zero bit: it must
    /// read zeros, never the source's bytes).
    pub fn any_removed(&self, pages: std::ops::Range<usize>) -> bool {
        pages
            .into_iter()
            .any(|p| self.states.is_zero(self.state_base + p))
    }

    /// Source offset of page `page`.
    pub fn source_offset_of(&self, page: usize) -> u64 {
        self.region.source_offset + page as u64 * self.region.page_size()
    }

    /// Split off `[at, end)` (a page boundary inside the piece) as a new piece sharing states.
    fn split_at(&mut self, at: u64) -> RegionEntry {
        let first_pages = self.page_of(at);
        let mut tail = self.clone();
        let head_len = at - self.region.start;
        tail.region.start = at;
        tail.region.len = self.region.len - head_len;
        tail.region.source_offset += head_len;
        tail.state_base += first_pages;
        tail.cache_offset += head_len;
        self.region.len = head_len;
        tail
    }
}

/// The regions of one userfaultfd: sorted, non-overlapping.
#[derive(Debug, Clone, Default)]
pub struct RegionMap {
    entries: Vec<RegionEntry>,
}

impl RegionMap {
    /// An empty map.
    pub fn new() -> RegionMap {
        RegionMap::default()
    }

    /// Add a validated region; fails if it overlaps one already there.
    pub fn insert(&mut self, entry: RegionEntry) -> Result<(), RegionError> {
        entry.region.validate()?;
        let r = &entry.region;
        let idx = self.entries.partition_point(|e| e.region.start < r.start);
        for neighbour in [idx.checked_sub(1), Some(idx)].into_iter().flatten() {
            if let Some(o) = self.entries.get(neighbour) {
                if o.region.start < r.end() && r.start < o.region.end() {
                    return Err(RegionError::Overlap {
                        start: r.start,
                        len: r.len,
                        other_start: o.region.start,
                        other_len: o.region.len,
                    });
                }
            }
        }
        self.entries.insert(idx, entry);
        Ok(())
    }

    /// The entry containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&RegionEntry> {
        let idx = self.entries.partition_point(|e| e.region.start <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr < e.region.end()).then_some(e)
    }

    /// All entries, by address.
    pub fn entries(&self) -> &[RegionEntry] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Cut `[start, end)` out of the map (UNMAP), splitting entries at the boundaries.
    pub fn remove_range(&mut self, start: u64, end: u64) -> Vec<RegionEntry> {
        self.split_boundary(start);
        self.split_boundary(end);
        let mut removed = Vec::new();
        self.entries.retain(|e| {
            let inside = e.region.start >= start && e.region.end() <= end;
            if inside {
                removed.push(e.clone());
            }
            !inside
        });
        removed
    }

    /// Move `[from, from+len)` to `to` (REMAP). Pieces keep their page states.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let Some(end) = from.checked_add(len) else {
            return;
        };
        let moved = self.remove_range(from, end);
        for mut e in moved {
            e.region.start = e.region.start - from + to;
            // A piece that no longer validates (cannot happen for kernel-reported remaps) is
            // dropped rather than served wrongly.
            let _ = self.insert_unchecked(e);
        }
    }

    fn insert_unchecked(&mut self, entry: RegionEntry) -> Result<(), RegionError> {
        let idx = self
            .entries
            .partition_point(|e| e.region.start < entry.region.start);
        self.entries.insert(idx, entry);
        Ok(())
    }

    /// Split the entry containing `at` so that `at` becomes an entry boundary.
    fn split_boundary(&mut self, at: u64) {
        let Some(idx) = self
            .entries
            .iter()
            .position(|e| e.region.start < at && at < e.region.end())
        else {
            return;
        };
        let page = self.entries[idx].region.page_size();
        let at = at - (at - self.entries[idx].region.start) % page;
        if at == self.entries[idx].region.start {
            return;
        }
        let tail = self.entries[idx].split_at(at);
        self.entries.insert(idx + 1, tail);
    }

    /// Whether every page of every region is present.
    pub fn all_present(&self) -> bool {
        self.entries.iter().all(|e| {
            (0..e.region.pages())
                .all(|p| e.states.get(e.state_base + p) == crate::state::PageState::Present)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ZeroSource;
    use proptest::prelude::*;

    fn region(start: u64, len: u64) -> Region {
        Region::new(
            start,
            len,
            MemoryKind::PrivateAnonymous,
            Arc::new(ZeroSource::new(1 << 40)),
            start,
        )
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            region(0x1000, 0).validate(),
            Err(RegionError::Empty { start: 0x1000 })
        );
        assert!(matches!(
            region(0x1001, 0x1000).validate(),
            Err(RegionError::Unaligned { .. })
        ));
        assert!(matches!(
            region(u64::MAX - 0xfff, 0x2000).validate(),
            Err(RegionError::Overflow { .. })
        ));
        let r = Region::new(
            0,
            0x3000,
            MemoryKind::PrivateAnonymous,
            Arc::new(ZeroSource::new(0x2000)),
            0,
        );
        assert!(matches!(
            r.validate(),
            Err(RegionError::BeyondSource { .. })
        ));
        let r = Region::new(
            0,
            0x1000,
            MemoryKind::PrivateAnonymous,
            Arc::new(ZeroSource::new(0x2000)),
            u64::MAX,
        );
        assert!(matches!(
            r.validate(),
            Err(RegionError::BeyondSource { .. })
        ));
    }

    #[test]
    fn overlap_is_rejected() {
        let mut m = RegionMap::new();
        m.insert(RegionEntry::new(region(0x10000, 0x4000)))
            .expect("first");
        assert!(matches!(
            m.insert(RegionEntry::new(region(0x13000, 0x2000))),
            Err(RegionError::Overlap { .. })
        ));
        assert!(matches!(
            m.insert(RegionEntry::new(region(0xf000, 0x2000))),
            Err(RegionError::Overlap { .. })
        ));
        m.insert(RegionEntry::new(region(0x14000, 0x1000)))
            .expect("adjacent");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn remap_and_unmap_split_pieces_that_share_states() {
        let mut m = RegionMap::new();
        m.insert(RegionEntry::new(region(0x100000, 0x10000)))
            .expect("insert");
        let states = Arc::clone(&m.entries()[0].states);
        m.remap(0x104000, 0x900000, 0x2000);
        assert_eq!(m.len(), 3);
        let moved = m.find(0x901000).expect("moved piece");
        assert_eq!(moved.state_base, 4);
        assert_eq!(moved.page_of(0x901000), 1);
        assert_eq!(moved.source_offset_of(1), 0x105000);
        assert!(Arc::ptr_eq(&moved.states, &states));
        assert!(m.find(0x104000).is_none());
        let removed = m.remove_range(0x100000, 0x102000);
        assert_eq!(removed.len(), 1);
        assert!(m.find(0x101000).is_none());
        assert_eq!(m.find(0x102000).map(|e| e.state_base), Some(2));
    }

    proptest! {
        #[test]
        fn find_matches_a_linear_scan(
            regions in proptest::collection::vec((0u64..64, 1u64..8), 1..20),
            probes in proptest::collection::vec(0u64..80, 1..50),
        ) {
            let mut m = RegionMap::new();
            let mut accepted: Vec<(u64, u64)> = Vec::new();
            for (s, l) in regions {
                let (start, len) = (s * 4096, l * 4096);
                let overlaps = accepted.iter().any(|&(a, b)| start < a + b && a < start + len);
                let r = m.insert(RegionEntry::new(region(start, len)));
                prop_assert_eq!(r.is_ok(), !overlaps);
                if !overlaps { accepted.push((start, len)); }
            }
            for p in probes {
                let addr = p * 4096 + 17;
                let want = accepted.iter().find(|&&(a, b)| a <= addr && addr < a + b).map(|&(a, _)| a);
                prop_assert_eq!(m.find(addr).map(|e| e.region.start), want);
            }
        }
    }
}
