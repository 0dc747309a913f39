//! Error types: [`Error`] for set-up operations, [`ResolveError`] for the resolve ioctls.

use rustix::io::Errno;

use crate::flags::{Features, RegisterMode};
use crate::mapping::MemoryKind;

/// How a userfaultfd was (or was to be) created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatePath {
    /// The `userfaultfd(2)` system call.
    Syscall,
    /// `ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW)` (Linux 6.1).
    DevUserfaultfd,
}

impl std::fmt::Display for CreatePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CreatePath::Syscall => "userfaultfd(2)",
            CreatePath::DevUserfaultfd => "/dev/userfaultfd",
        })
    }
}

/// An error from creating, negotiating, registering or reading a userfaultfd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Every creation path that was tried failed.
    #[error("cannot create a userfaultfd: {first} failed ({first_errno}){}",
        .second.map(|(p, e)| format!(", then {p} failed ({e})")).unwrap_or_default())]
    Create {
        /// The first path tried.
        first: CreatePath,
        /// Why it failed.
        first_errno: Errno,
        /// The fallback tried, and why it failed.
        second: Option<(CreatePath, Errno)>,
    },
    /// A received file descriptor is not a (handshaken) userfaultfd.
    #[error("the received file descriptor is not a usable userfaultfd: it is {what}")]
    NotUserfaultfd {
        /// What it is instead.
        what: String,
    },
    /// `UFFDIO_API` was issued on a userfaultfd that already completed its handshake.
    #[error(
        "UFFDIO_API was already done on this userfaultfd (the handshake can happen only once)"
    )]
    AlreadyInitialized,
    /// The kernel refused the handshake.
    #[error("UFFDIO_API rejected the requested features {requested}")]
    Api {
        /// Features that were asked for.
        requested: Features,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// Features the caller requires are not offered by this kernel.
    #[error("the kernel lacks required userfaultfd features: {missing} (it offers {available})")]
    MissingFeatures {
        /// Required but not offered.
        missing: Features,
        /// What the kernel offers.
        available: Features,
    },
    /// An operation needs a feature that was not negotiated on this userfaultfd.
    #[error(
        "{operation} needs the userfaultfd feature {feature}, which this fd did not negotiate"
    )]
    FeatureNotNegotiated {
        /// The missing feature.
        feature: Features,
        /// What needed it.
        operation: &'static str,
    },
    /// A range was empty, unaligned or overflowed the address space.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The registration mode is not possible on this kind of memory.
    #[error("register mode {mode:?} is not supported on {kind} memory")]
    ModeNotSupported {
        /// The mode asked for.
        mode: RegisterMode,
        /// The memory it was asked for.
        kind: MemoryKind,
    },
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of {len:#x} bytes at {start:#x} in mode {mode:?} failed")]
    Register {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Requested mode.
        mode: RegisterMode,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER of {len:#x} bytes at {start:#x} failed")]
    Unregister {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// A message from the kernel could not be decoded.
    #[error(transparent)]
    Decode(#[from] crate::event::DecodeError),
    /// Another system call failed.
    #[error("{operation} failed")]
    Os {
        /// What was being done.
        operation: &'static str,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
}

impl Error {
    pub(crate) fn os(operation: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Os { operation, errno }
    }

    /// The errno behind this error, if it came from the kernel.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Create {
                first_errno,
                second,
                ..
            } => Some(second.map(|(_, e)| e).unwrap_or(*first_errno)),
            Error::Api { errno, .. }
            | Error::Register { errno, .. }
            | Error::Unregister { errno, .. }
            | Error::Os { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// A range that cannot be handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Zero length.
    #[error("empty range at {start:#x}")]
    Empty {
        /// Range start.
        start: u64,
    },
    /// Start or length not a multiple of the page size.
    #[error("range {start:#x}+{len:#x} is not aligned to the {page_size:#x}-byte page size")]
    Unaligned {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Required alignment.
        page_size: u64,
    },
    /// `start + len` overflows.
    #[error("range {start:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
    },
    /// A range that does not lie inside the mapping it was given for.
    #[error("range at offset {offset:#x} of {len:#x} bytes lies outside the {mapping_len:#x}-byte mapping")]
    OutOfBounds {
        /// Offset in the mapping.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The mapping's length.
        mapping_len: u64,
    },
    /// A source buffer whose length does not match the destination range.
    #[error("source of {src_len:#x} bytes for a destination of {len:#x} bytes")]
    LengthMismatch {
        /// Destination length.
        len: u64,
        /// Source length.
        src_len: u64,
    },
}

/// Check that `start..start+len` is non-empty, `page_size`-aligned and does not overflow.
pub fn check_range(start: u64, len: u64, page_size: u64) -> Result<(), RangeError> {
    if len == 0 {
        return Err(RangeError::Empty { start });
    }
    if start.checked_add(len).is_none() {
        return Err(RangeError::Overflow { start, len });
    }
    if start % page_size != 0 || len % page_size != 0 {
        return Err(RangeError::Unaligned {
            start,
            len,
            page_size,
        });
    }
    Ok(())
}

/// Which resolve ioctl an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveOp {
    /// `UFFDIO_COPY`
    Copy,
    /// `UFFDIO_ZEROPAGE`
    Zeropage,
    /// `UFFDIO_CONTINUE`
    Continue,
    /// `UFFDIO_POISON`
    Poison,
    /// `UFFDIO_MOVE`
    Move,
    /// `UFFDIO_WRITEPROTECT`
    Writeprotect,
    /// `UFFDIO_WAKE`
    Wake,
}

impl std::fmt::Display for ResolveOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResolveOp::Copy => "UFFDIO_COPY",
            ResolveOp::Zeropage => "UFFDIO_ZEROPAGE",
            ResolveOp::Continue => "UFFDIO_CONTINUE",
            ResolveOp::Poison => "UFFDIO_POISON",
            ResolveOp::Move => "UFFDIO_MOVE",
            ResolveOp::Writeprotect => "UFFDIO_WRITEPROTECT",
            ResolveOp::Wake => "UFFDIO_WAKE",
        })
    }
}

/// What went wrong in a resolve ioctl, as a kind a caller can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolveErrorKind {
    /// `EEXIST`: the page is already present (another resolve won the race). Normal traffic.
    AlreadyPresent,
    /// `EAGAIN`: the address space is changing (an unread REMOVE/UNMAP/REMAP/FORK event): read
    /// events, then retry.
    Retry,
    /// `ESRCH`: the process owning the memory is gone.
    ProcessGone,
    /// `ENOENT`: the range is not registered with this userfaultfd (or, for MOVE, the source has a
    /// hole).
    NotRegistered,
    /// `EINVAL`: the range or mode is invalid for this memory.
    InvalidRange,
    /// `ENOMEM`: the kernel could not allocate the page.
    OutOfMemory,
    /// `EFAULT`: a source address is not readable.
    BadAddress,
    /// `EBUSY`: (MOVE) the page is pinned or shared and cannot be moved.
    Busy,
    /// `EPERM`: not allowed (for instance poisoning without the feature).
    NotPermitted,
    /// Any other errno.
    Other(Errno),
}

impl ResolveErrorKind {
    /// Classify an errno.
    pub fn from_errno(e: Errno) -> ResolveErrorKind {
        match e {
            Errno::EXIST => ResolveErrorKind::AlreadyPresent,
            Errno::AGAIN => ResolveErrorKind::Retry,
            Errno::SRCH => ResolveErrorKind::ProcessGone,
            Errno::NOENT => ResolveErrorKind::NotRegistered,
            Errno::INVAL => ResolveErrorKind::InvalidRange,
            Errno::NOMEM => ResolveErrorKind::OutOfMemory,
            Errno::FAULT => ResolveErrorKind::BadAddress,
            Errno::BUSY => ResolveErrorKind::Busy,
            Errno::PERM => ResolveErrorKind::NotPermitted,
            other => ResolveErrorKind::Other(other),
        }
    }
}

/// A resolve ioctl that did nothing (partial progress is a [`crate::Resolved::Partial`], not an
/// error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{op} of {len:#x} bytes at {start:#x}: {kind:?}")]
pub struct ResolveError {
    /// The ioctl.
    pub op: ResolveOp,
    /// What went wrong.
    pub kind: ResolveErrorKind,
    /// Destination start.
    pub start: u64,
    /// Destination length.
    pub len: u64,
    /// The raw errno.
    #[source]
    pub errno: Errno,
}

impl ResolveError {
    /// The error of `op` on `start..start + len` that the kernel answered with `errno` (its
    /// kind classified from it). Public so that layers above can stand in for the kernel, e.g.
    /// to inject failures in tests.
    pub fn from_errno(op: ResolveOp, start: u64, len: u64, errno: Errno) -> ResolveError {
        ResolveError {
            op,
            kind: ResolveErrorKind::from_errno(errno),
            start,
            len,
            errno,
        }
    }

    /// EEXIST: the page was already there.
    pub fn is_already_present(&self) -> bool {
        self.kind == ResolveErrorKind::AlreadyPresent
    }
    /// EAGAIN: read pending events, then try again.
    pub fn is_retry(&self) -> bool {
        self.kind == ResolveErrorKind::Retry
    }
    /// ESRCH: the process is gone; the session is over.
    pub fn is_process_gone(&self) -> bool {
        self.kind == ResolveErrorKind::ProcessGone
    }
    pub(crate) fn invalid(op: ResolveOp, start: u64, len: u64) -> ResolveError {
        ResolveError {
            op,
            kind: ResolveErrorKind::InvalidRange,
            start,
            len,
            errno: Errno::INVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_validated() {
        assert_eq!(
            check_range(0x1000, 0, 4096),
            Err(RangeError::Empty { start: 0x1000 })
        );
        assert!(matches!(
            check_range(0x1001, 4096, 4096),
            Err(RangeError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(0x1000, 4095, 4096),
            Err(RangeError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 4095, 8192, 4096),
            Err(RangeError::Overflow { .. })
        ));
        assert_eq!(check_range(0x20_0000, 0x20_0000, 0x20_0000), Ok(()));
    }

    #[test]
    fn errnos_map_to_kinds() {
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::EXIST),
            ResolveErrorKind::AlreadyPresent
        );
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::AGAIN),
            ResolveErrorKind::Retry
        );
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::SRCH),
            ResolveErrorKind::ProcessGone
        );
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::NOENT),
            ResolveErrorKind::NotRegistered
        );
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::INVAL),
            ResolveErrorKind::InvalidRange
        );
        assert_eq!(
            ResolveErrorKind::from_errno(Errno::IO),
            ResolveErrorKind::Other(Errno::IO)
        );
    }

    #[test]
    fn messages_name_the_problem() {
        let e = Error::MissingFeatures {
            missing: Features::MOVE | Features::POISON,
            available: Features::EVENT_FORK,
        };
        assert_eq!(
            e.to_string(),
            "the kernel lacks required userfaultfd features: POISON | MOVE (it offers EVENT_FORK)"
        );
        let e = Error::Create {
            first: CreatePath::Syscall,
            first_errno: Errno::PERM,
            second: Some((CreatePath::DevUserfaultfd, Errno::ACCESS)),
        };
        assert!(e.to_string().contains("userfaultfd(2) failed"));
        assert!(e.to_string().contains("/dev/userfaultfd failed"));
    }
}
