//! [`ScratchPages`]: private anonymous memory whose pages can be moved into a registered range.
//!
//! A handler that must produce a page's bytes itself (a `pread`, a decompression) writes them
//! somewhere and then `UFFDIO_COPY` copies them again into the faulting range. When the
//! userfaultfd serves this very process, `UFFDIO_MOVE` can instead move the freshly written pages
//! into place: one copy fewer. `ScratchPages` is the buffer for that: an anonymous mapping that is
//! never registered with any userfaultfd, so a `&mut [u8]` over it is sound while it is borrowed;
//! [`crate::Uffd::move_from_scratch`] takes it by `&mut`, so no slice can be alive while its pages
//! are moved out (they read as zero afterwards and are re-populated by the next write).
//!
//! The type is defined in [`crate::mapping`], the crate's module for raw memory, since making a
//! slice over a mapping is `unsafe` code; this module keeps its name and documentation.

pub use crate::mapping::ScratchPages;

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
