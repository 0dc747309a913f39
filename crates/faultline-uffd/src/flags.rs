//! Feature, ioctl and mode bit sets.
//!
//! Every set keeps bits it does not know (`from_bits_retain`): a newer kernel that grants a feature
//! or ioctl this crate has never heard of is reported faithfully rather than dropped or rejected.

use bitflags::bitflags;
use linux_raw_sys::general as g;

use crate::sys::nr;

bitflags! {
    /// `UFFD_FEATURE_*`: what a userfaultfd can do, negotiated with `UFFDIO_API`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// `fork()` of a registered process produces a [`crate::Event::Fork`].
        const EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK as u64;
        /// `mremap()` of a registered range produces a [`crate::Event::Remap`].
        const EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP as u64;
        /// `madvise(MADV_DONTNEED/REMOVE)` produces a [`crate::Event::Remove`].
        const EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// MISSING mode on hugetlbfs.
        const MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// MISSING mode on shmem / memfd.
        const MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// `munmap()` of a registered range produces a [`crate::Event::Unmap`].
        const EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// Missing faults raise SIGBUS in the faulting thread instead of queueing a message.
        const SIGBUS = g::UFFD_FEATURE_SIGBUS as u64;
        /// Fault messages carry the faulting thread's id.
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        /// MINOR mode on hugetlbfs.
        const MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// MINOR mode on shmem / memfd.
        const MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// Fault addresses are exact (not rounded down to the page).
        const EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// WP mode on hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// Write protection also applies to pages that were never populated.
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFDIO_POISON`.
        const POISON = g::UFFD_FEATURE_POISON as u64;
        /// WP faults are resolved by the kernel (dirty tracking with `PAGEMAP_SCAN`).
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFDIO_MOVE`.
        const MOVE = g::UFFD_FEATURE_MOVE as u64;
        /// Bits this crate does not know.
        const _ = !0;
    }
}

impl Features {
    /// The 17 features defined by Linux 6.18, without unknown bits.
    pub const KNOWN: Features = Features::from_bits_truncate(
        Features::PAGEFAULT_FLAG_WP.bits()
            | Features::EVENT_FORK.bits()
            | Features::EVENT_REMAP.bits()
            | Features::EVENT_REMOVE.bits()
            | Features::MISSING_HUGETLBFS.bits()
            | Features::MISSING_SHMEM.bits()
            | Features::EVENT_UNMAP.bits()
            | Features::SIGBUS.bits()
            | Features::THREAD_ID.bits()
            | Features::MINOR_HUGETLBFS.bits()
            | Features::MINOR_SHMEM.bits()
            | Features::EXACT_ADDRESS.bits()
            | Features::WP_HUGETLBFS_SHMEM.bits()
            | Features::WP_UNPOPULATED.bits()
            | Features::POISON.bits()
            | Features::WP_ASYNC.bits()
            | Features::MOVE.bits(),
    );

    /// The names of the set bits, e.g. `"MINOR_SHMEM | MOVE"`; unknown bits are shown in hex.
    pub fn names(self) -> String {
        let mut out = String::new();
        for (name, _) in self.iter_names() {
            if !out.is_empty() {
                out.push_str(" | ");
            }
            out.push_str(name);
        }
        let unknown = self.bits() & !Features::KNOWN.bits();
        if unknown != 0 {
            if !out.is_empty() {
                out.push_str(" | ");
            }
            out.push_str(&format!("{unknown:#x}"));
        }
        if out.is_empty() {
            out.push_str("(none)");
        }
        out
    }
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names())
    }
}

bitflags! {
    /// The ioctls the kernel supports on a userfaultfd (from `UFFDIO_API`) or on a registered
    /// range (from `UFFDIO_REGISTER`), as `1 << _UFFDIO_*` bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`
        const REGISTER = 1 << nr::REGISTER;
        /// `UFFDIO_UNREGISTER`
        const UNREGISTER = 1 << nr::UNREGISTER;
        /// `UFFDIO_WAKE`
        const WAKE = 1 << nr::WAKE;
        /// `UFFDIO_COPY`
        const COPY = 1 << nr::COPY;
        /// `UFFDIO_ZEROPAGE`
        const ZEROPAGE = 1 << nr::ZEROPAGE;
        /// `UFFDIO_MOVE`
        const MOVE = 1 << nr::MOVE;
        /// `UFFDIO_WRITEPROTECT`
        const WRITEPROTECT = 1 << nr::WRITEPROTECT;
        /// `UFFDIO_CONTINUE`
        const CONTINUE = 1 << nr::CONTINUE;
        /// `UFFDIO_POISON`
        const POISON = 1 << nr::POISON;
        /// `UFFDIO_API`
        const API = 1 << nr::API;
        /// Bits this crate does not know.
        const _ = !0;
    }
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults a registered range reports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on pages that are not present (`UFFDIO_REGISTER_MODE_MISSING`).
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Writes to write-protected pages (`UFFDIO_REGISTER_MODE_WP`).
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
        /// Faults on pages present in the page cache but not mapped (`UFFDIO_REGISTER_MODE_MINOR`).
        const MINOR = g::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*`: what kind of access faulted.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PagefaultFlags: u64 {
        /// The access was a write.
        const WRITE = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
        /// The page was write-protected (a WP-mode fault).
        const WP = g::UFFD_PAGEFAULT_FLAG_WP as u64;
        /// A MINOR-mode fault: the page is in the page cache but not mapped.
        const MINOR = g::UFFD_PAGEFAULT_FLAG_MINOR as u64;
        /// Bits this crate does not know.
        const _ = !0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seventeen_known_features() {
        assert_eq!(Features::KNOWN.bits().count_ones(), 17);
        assert_eq!(Features::KNOWN.bits(), (1 << 17) - 1);
    }

    #[test]
    fn unknown_bits_are_kept_and_named() {
        let f = Features::from_bits_retain(Features::MOVE.bits() | (1 << 40));
        assert!(f.contains(Features::MOVE));
        assert_eq!(f.bits() & (1 << 40), 1 << 40);
        assert_eq!(f.names(), "MOVE | 0x10000000000");
        assert_eq!(Features::empty().names(), "(none)");
        assert_eq!(
            (Features::MINOR_SHMEM | Features::POISON).to_string(),
            "MINOR_SHMEM | POISON"
        );
    }

    #[test]
    fn ioctl_bits_are_the_ioctl_numbers() {
        assert_eq!(Ioctls::API.bits(), 1 << 0x3F);
        assert_eq!(Ioctls::COPY.bits(), 1 << 3);
        assert_eq!(Ioctls::POISON.bits(), 1 << 8);
    }
}
