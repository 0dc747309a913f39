//! [`ScratchPages`]: private anonymous memory whose pages can be moved into a registered range.
//!
//! A handler that must produce a page's bytes itself (a `pread`, a decompression) writes them
//! somewhere and then `UFFDIO_COPY` copies them again into the faulting range. When the
//! userfaultfd serves this very process, `UFFDIO_MOVE` can instead move the freshly written pages
//! into place: one copy fewer. `ScratchPages` is the buffer for that: an anonymous mapping that is
//! never registered with any userfaultfd, so a `&mut [u8]` over it is sound while it is borrowed;
//! [`crate::Uffd::move_from_scratch`] takes it by `&mut`, so no slice can be alive while its pages
//! are moved out (they read as zero afterwards and are re-populated by the next write).
#![allow(unsafe_code)]

use crate::error::{Error, RangeError};
use crate::mapping::{Mapping, MemoryKind};

/// A page-aligned, unregistered anonymous buffer of this process.
#[derive(Debug)]
pub struct ScratchPages {
    map: Mapping,
}

impl ScratchPages {
    /// At least `len` bytes (rounded up to whole pages).
    pub fn new(len: usize) -> Result<ScratchPages, Error> {
        let map = Mapping::new(MemoryKind::PrivateAnonymous, len)?;
        // Small pages only: moving 4 KiB pieces out of a transparent huge page would need a split.
        // SAFETY: advice on our own fresh mapping; it changes no contents.
        let r = unsafe {
            rustix::mm::madvise(
                map.as_ptr().cast(),
                map.len(),
                rustix::mm::Advice::LinuxNoHugepage,
            )
        };
        r.map_err(Error::os("madvise(MADV_NOHUGEPAGE)"))?;
        Ok(ScratchPages { map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// The buffer as a slice, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is private anonymous memory of this process, live for `self`'s
        // lifetime, never registered with a userfaultfd (the type offers no way to) and reachable
        // only through `self`, which is exclusively borrowed for the slice's lifetime; pages moved
        // out earlier by UFFDIO_MOVE are plain holes that fault in zero pages on access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }

    /// Check `offset..offset+len` lies inside; returns the absolute address.
    pub(crate) fn check(&self, offset: usize, len: usize) -> Result<u64, RangeError> {
        self.map.check(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_as_a_slice() {
        let mut s = ScratchPages::new(5000).expect("scratch");
        assert_eq!(s.len(), 8192);
        s.as_mut_slice()[8191] = 9;
        assert_eq!(s.as_mut_slice()[8191], 9);
        assert!(s.check(4096, 4097).is_err());
    }
}
