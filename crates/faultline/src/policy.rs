//! Policies: readahead (fixed or adaptive), working-set recording and replay, background fill.
//!
//! Adaptive readahead keeps a few "streams" (the end of the last window served for each recent
//! sequential run). A fault at or just past a stream's end is sequential: that stream's window
//! doubles, up to the maximum, and the next window is queued ahead in the background so the
//! handler stays in front of the toucher. A fault anywhere else starts a new stream with the
//! minimum window, aligned: the block of `min_pages` that holds the faulting page (like the
//! kernel's fault-around for file mappings). Aligned, because what a resumed guest touches
//! outside its long runs clusters in both directions (a stack grows down): in a recorded
//! Firecracker restore the 213 pages touched outside long runs fell into 55 aligned 16-page
//! blocks, where forward windows from each fault found almost nothing to share.

use std::io::{Read, Write};
use std::path::Path;

/// Readahead policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readahead {
    /// Resolve only the faulting page.
    Off,
    /// Resolve a fixed window of pages starting at the faulting page.
    Fixed {
        /// Window in pages.
        pages: usize,
    },
    /// Grow the window on sequential faults, shrink on random ones.
    Adaptive {
        /// Smallest window in pages (random access).
        min_pages: usize,
        /// Largest window in pages.
        max_pages: usize,
    },
}

impl Default for Readahead {
    fn default() -> Self {
        Readahead::Adaptive {
            min_pages: 16,
            max_pages: 512,
        }
    }
}

impl Readahead {
    /// The policy for pages of `page_size` bytes: adaptive readahead's smallest window is a
    /// span of 4 KiB pages (16: 64 KiB), so with huge pages it shrinks to whole pages of that
    /// span, at least one; the largest stays a count of pages.
    pub fn for_page_size(self, page_size: u64) -> Readahead {
        match self {
            Readahead::Adaptive {
                min_pages,
                max_pages,
            } if page_size > 4096 => {
                let per = usize::try_from(page_size / 4096).unwrap_or(usize::MAX);
                Readahead::Adaptive {
                    min_pages: (min_pages / per).max(1),
                    max_pages,
                }
            }
            other => other,
        }
    }
}

/// Detector of sequential streams for adaptive readahead.
#[derive(Debug, Clone)]
pub struct Streams {
    /// (region start, next page expected, current window)
    slots: [(u64, usize, usize); 8],
    next: usize,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            slots: [(u64::MAX, usize::MAX, 0); 8],
            next: 0,
        }
    }
}

/// What readahead decided for a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Pages before the faulting page that belong to the window (an aligned block's head),
    /// to be queued in the background.
    pub before: usize,
    /// Pages to resolve now, starting at the faulting page.
    pub now: usize,
    /// Pages to queue ahead in the background after `now`.
    pub ahead: usize,
}

impl Streams {
    /// Decide the window for a fault at `page` of the region starting at `region`.
    pub fn on_fault(&mut self, policy: Readahead, region: u64, page: usize) -> Window {
        match policy {
            Readahead::Off => Window {
                before: 0,
                now: 1,
                ahead: 0,
            },
            Readahead::Fixed { pages } => Window {
                before: 0,
                now: pages.max(1),
                ahead: 0,
            },
            Readahead::Adaptive {
                min_pages,
                max_pages,
            } => {
                let min = min_pages.max(1);
                let max = max_pages.max(min);
                // Sequential: the fault is at, or within one window past, where a stream ended.
                let hit = self.slots.iter().position(|&(r, expect, win)| {
                    r == region
                        && page >= expect.saturating_sub(win)
                        && page <= expect.saturating_add(win)
                });
                match hit {
                    Some(i) => {
                        let win = (self.slots[i].2 * 2).clamp(min, max);
                        self.slots[i] = (region, page + 2 * win, win);
                        Window {
                            before: 0,
                            now: win,
                            ahead: win,
                        }
                    }
                    None => {
                        let i = self.next;
                        self.next = (self.next + 1) % self.slots.len();
                        // The aligned block of `min` pages that holds the fault.
                        let before = page % min;
                        let end = page - before + min;
                        self.slots[i] = (region, end, min);
                        Window {
                            before,
                            now: end - page,
                            ahead: 0,
                        }
                    }
                }
            }
        }
    }
}

/// A recorded working set: source offsets of pages in the order they were first touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page size of the recording.
    pub page_size: u64,
    /// Source offsets, first touch first.
    pub offsets: Vec<u64>,
}

/// Errors reading a working-set file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// I/O.
    #[error("working-set file I/O")]
    Io(#[from] std::io::Error),
    /// Not a working-set file.
    #[error("not a faultline working-set file (bad magic)")]
    BadMagic,
    /// Unknown version.
    #[error("working-set file version {0} is not supported (this build reads version 1)")]
    Version(u32),
    /// Page size not 4 KiB or 2 MiB.
    #[error("working-set page size {0} is not 4096 or 2097152")]
    PageSize(u64),
    /// The count does not match the file length.
    #[error("working-set file says {count} pages but holds {have}")]
    Truncated {
        /// Count in the header.
        count: u64,
        /// Entries present.
        have: u64,
    },
    /// An offset not aligned to the page size.
    #[error("working-set entry {index} ({offset:#x}) is not page aligned")]
    Unaligned {
        /// Entry index.
        index: usize,
        /// Offset.
        offset: u64,
    },
}

const WS_MAGIC: &[u8; 8] = b"FLWSET\0\x01";

impl WorkingSet {
    /// Encode: magic, version u32 LE, page size u64 LE, count u64 LE, offsets u64 LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + 8 * self.offsets.len());
        out.extend_from_slice(WS_MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out
    }

    /// Decode and validate.
    pub fn decode(bytes: &[u8]) -> Result<WorkingSet, WorkingSetError> {
        if bytes.len() < 28 || &bytes[..8] != WS_MAGIC {
            return Err(WorkingSetError::BadMagic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != 1 {
            return Err(WorkingSetError::Version(version));
        }
        let page_size = u64_at(12);
        if page_size != 4096 && page_size != 2 << 20 {
            return Err(WorkingSetError::PageSize(page_size));
        }
        let count = u64_at(20);
        let have = ((bytes.len() - 28) / 8) as u64;
        if count != have || (bytes.len() - 28) % 8 != 0 {
            return Err(WorkingSetError::Truncated { count, have });
        }
        let mut offsets = Vec::with_capacity(have as usize);
        for index in 0..have as usize {
            let offset = u64_at(28 + index * 8);
            if offset % page_size != 0 {
                return Err(WorkingSetError::Unaligned { index, offset });
            }
            offsets.push(offset);
        }
        Ok(WorkingSet { page_size, offsets })
    }

    /// Write to a file atomically: a new temporary file in `path`'s directory (a random name,
    /// created `O_EXCL` so nothing planted there — a symlink to another file included — is ever
    /// opened or followed), synced, then renamed over `path` (which replaces a symlink at `path`
    /// itself, never the file it points to). Concurrent writers and crashes never leave a torn
    /// file; a failed write leaves no temporary file behind.
    pub fn save(&self, path: &Path) -> Result<(), WorkingSetError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".faultline-ws.")
            .tempfile_in(dir)?;
        tmp.as_file_mut().write_all(&self.encode())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Read from a file.
    pub fn load(path: &Path) -> Result<WorkingSet, WorkingSetError> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        WorkingSet::decode(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_fault_outside_every_stream_gets_its_aligned_block() {
        let mut s = Streams::default();
        let p = Readahead::Adaptive {
            min_pages: 16,
            max_pages: 512,
        };
        // Page 37 lies in the block 32..48: 5 pages before it, 11 from it on.
        assert_eq!(
            s.on_fault(p, 0, 37),
            Window {
                before: 5,
                now: 11,
                ahead: 0
            }
        );
        // The next fault at the block's end continues a stream: twice the window, from there.
        assert_eq!(
            s.on_fault(p, 0, 48),
            Window {
                before: 0,
                now: 32,
                ahead: 32
            }
        );
        // A fault at a block's first page has nothing before it.
        assert_eq!(
            s.on_fault(p, 0, 4096),
            Window {
                before: 0,
                now: 16,
                ahead: 0
            }
        );
        // With 2 MiB pages the smallest window of 16 small pages is one huge page.
        assert_eq!(
            p.for_page_size(2 << 20),
            Readahead::Adaptive {
                min_pages: 1,
                max_pages: 512
            }
        );
        assert_eq!(p.for_page_size(4096), p);
    }

    #[test]
    fn adaptive_grows_on_sequential_and_resets_on_random() {
        let mut s = Streams::default();
        let p = Readahead::Adaptive {
            min_pages: 1,
            max_pages: 16,
        };
        assert_eq!(
            s.on_fault(p, 0, 0),
            Window {
                before: 0,
                now: 1,
                ahead: 0
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 1),
            Window {
                before: 0,
                now: 2,
                ahead: 2
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 5),
            Window {
                before: 0,
                now: 4,
                ahead: 4
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 13),
            Window {
                before: 0,
                now: 8,
                ahead: 8
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 29),
            Window {
                before: 0,
                now: 16,
                ahead: 16
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 61),
            Window {
                before: 0,
                now: 16,
                ahead: 16
            }
        );
        assert_eq!(
            s.on_fault(p, 0, 5000),
            Window {
                before: 0,
                now: 1,
                ahead: 0
            }
        );
        assert_eq!(
            s.on_fault(Readahead::Off, 0, 1),
            Window {
                before: 0,
                now: 1,
                ahead: 0
            }
        );
        assert_eq!(
            s.on_fault(Readahead::Fixed { pages: 8 }, 0, 1),
            Window {
                before: 0,
                now: 8,
                ahead: 0
            }
        );
    }

    #[test]
    fn working_set_rejects_bad_files_with_reasons() {
        let ws = WorkingSet {
            page_size: 4096,
            offsets: vec![0, 8192, 4096],
        };
        let mut b = ws.encode();
        assert_eq!(WorkingSet::decode(&b).expect("decode"), ws);
        assert!(matches!(
            WorkingSet::decode(&b[..b.len() - 3]),
            Err(WorkingSetError::Truncated { .. })
        ));
        assert!(matches!(
            WorkingSet::decode(b"short"),
            Err(WorkingSetError::BadMagic)
        ));
        b[28] = 1;
        assert!(matches!(
            WorkingSet::decode(&b),
            Err(WorkingSetError::Unaligned { index: 0, .. })
        ));
        b[8] = 9;
        assert!(matches!(
            WorkingSet::decode(&b),
            Err(WorkingSetError::Version(9))
        ));
    }

    proptest! {
        #[test]
        fn working_set_round_trips(pages in proptest::collection::vec(0u64..1 << 20, 0..100)) {
            let ws = WorkingSet { page_size: 4096, offsets: pages.iter().map(|p| p * 4096).collect() };
            prop_assert_eq!(WorkingSet::decode(&ws.encode()).expect("decode"), ws);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = WorkingSet::decode(&bytes);
        }
    }
}
