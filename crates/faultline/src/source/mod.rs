//! Page sources: the bytes behind a region.
//!
//! A [`PageSource`] is a read-only byte array of fixed length. The server asks it for page-aligned
//! ranges and resolves faults with what it returns. Sources that live in this process's memory
//! (an mmap of a file, an in-memory buffer) can lend a raw pointer ([`PageSource::ptr_at`]) so that
//! `UFFDIO_COPY` copies straight from it into the faulting process: one copy in total. A source can
//! also say that a range is all zeros ([`PageSource::is_zero`]), which the server resolves with
//! `UFFDIO_ZEROPAGE` (no allocation of a copy buffer, no read).
//!
//! Sources whose bytes arrive from elsewhere (the remote source) are asked first to
//! [`PageSource::wait_ready`] a range, so that `is_zero` can answer for pages still on their way
//! and zero runs are mapped, not copied; such a source can then lend the bytes it received
//! ([`PageSource::read_or_lend`], a [`Lent`] that keeps them alive) instead of copying them out.
//!
//! Errors say whether retrying may help ([`SourceError::is_retryable`]); the server retries those
//! with backoff and poisons the page when a read still fails, so a client never reads a wrong page.

use std::ops::Range;
use std::sync::Arc;

pub mod failure;
mod file;
mod layered;
mod memory;
mod mmap;
#[cfg(feature = "object-store")]
pub mod object;
mod zero;

pub use failure::{Failure, FailureInjecting, FailureStats};
pub use file::FileSource;
pub use layered::{LayerError, LayeredSource};
// For the optional parts (images, the object cache, the remote exporter and its dedup).
#[cfg(any(feature = "image", feature = "object-store", feature = "remote"))]
pub(crate) use memory::bytes_are_zero;
pub use memory::MemorySource;
pub use mmap::{MmapSource, MmapSourceOptions};
#[cfg(feature = "object-store")]
pub use object::{ObjectError, ObjectSource, ObjectSourceOptions, ObjectStats, S3Config};
pub use zero::ZeroSource;

/// Whether a failed read may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A transient failure (EINTR, EAGAIN, a timeout, a dropped connection).
    Retryable,
    /// A failure that will not go away (out of range, corrupt data, EIO).
    Permanent,
}

/// A failed read from a page source.
#[derive(Debug, thiserror::Error)]
#[error("reading {len} bytes at offset {offset:#x} from {source_name}: {what}")]
pub struct SourceError {
    /// Offset in the source.
    pub offset: u64,
    /// Length asked for.
    pub len: u64,
    /// Which source.
    pub source_name: String,
    /// What went wrong.
    pub what: String,
    /// Retryable or permanent.
    pub retry: Retry,
    /// The underlying error, if any.
    #[source]
    pub cause: Option<std::io::Error>,
}

impl SourceError {
    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        self.retry == Retry::Retryable
    }

    /// Classify an I/O error: interrupted / would-block / timed-out are retryable, the rest not.
    pub fn from_io(source_name: &str, offset: u64, len: u64, e: std::io::Error) -> SourceError {
        use std::io::ErrorKind as K;
        let retry = match e.kind() {
            K::Interrupted
            | K::WouldBlock
            | K::TimedOut
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe => Retry::Retryable,
            _ => Retry::Permanent,
        };
        SourceError {
            offset,
            len,
            source_name: source_name.to_string(),
            // The io::Error itself is the `#[source]`; the message names the failed operation
            // and does not repeat the cause (an error chain printed with `{:#}` would show it
            // twice otherwise).
            what: "I/O error".to_string(),
            retry,
            cause: Some(e),
        }
    }

    /// A read that ended early: the source had only `got` of the `len` bytes asked for at
    /// `offset` (a file shorter than it was when opened, a truncated object). Permanent.
    pub fn short_read(source_name: &str, offset: u64, len: u64, got: u64) -> SourceError {
        let end = offset.saturating_add(got);
        SourceError {
            offset,
            len,
            source_name: source_name.to_string(),
            what: format!("short read: end of data at offset {end:#x} ({got} of {len} bytes read)"),
            retry: Retry::Permanent,
            cause: None,
        }
    }

    /// A read past the end of the source.
    pub fn out_of_range(source_name: &str, offset: u64, len: u64, source_len: u64) -> SourceError {
        SourceError {
            offset,
            len,
            source_name: source_name.to_string(),
            what: format!("range lies outside the {source_len}-byte source"),
            retry: Retry::Permanent,
            cause: None,
        }
    }
}

/// The bytes behind a region.
pub trait PageSource: Send + Sync + std::fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short name for logs and errors (a path, "zero", "memory", ...).
    fn name(&self) -> String;

    /// Fill `buf` with the bytes at `offset..offset + buf.len()`. The range must lie inside the
    /// source (checked: out of range is a permanent error).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// A pointer to `len` bytes at `offset` in this process's memory, valid while `self` lives,
    /// for sources that are memory (mmap, buffers). The server hands it to `UFFDIO_COPY`, so the
    /// bytes are copied once, by the kernel, straight into the faulting process. `None` (the
    /// default) makes the server `read_at` into a buffer first.
    fn ptr_at(&self, _offset: u64, _len: u64) -> Option<*const u8> {
        None
    }

    /// `Some(true)` when `offset..offset + len` is known to be all zeros (resolved with
    /// `UFFDIO_ZEROPAGE`), `Some(false)` when known not to be, `None` when unknown (default).
    fn is_zero(&self, _offset: u64, _len: u64) -> Option<bool> {
        None
    }

    /// Wait until `offset..offset + len` can be read without waiting, so that
    /// [`PageSource::is_zero`] answers for it. For sources whose pages arrive from elsewhere (a
    /// remote page server); the default does nothing. The server calls it before planning each
    /// run; an error is handled as a failed read of the range.
    fn wait_ready(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }

    /// Read `offset..offset + buf.len()` as [`PageSource::read_at`] does, or lend a prefix of it:
    /// [`Lend::Read`]`(n)` says the first `n` bytes (at least one page, or all of `buf`) were
    /// read into `buf`; [`Lend::Lent`] hands over bytes the source holds (whole pages from
    /// `offset`), which the server copies into place straight from there. Either way the caller
    /// goes on from where the answer ends. The default reads the whole range.
    fn read_or_lend(&self, offset: u64, buf: &mut [u8]) -> Result<Lend, SourceError> {
        self.read_at(offset, buf)?;
        Ok(Lend::Read(buf.len()))
    }

    /// Make durable what this source keeps for a later process (an object source's on-disk
    /// cache: the blocks fetched since its last group commit). A daemon calls it when it stops
    /// cleanly; it returns once that is on disk. Nothing to do by default.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_at(offset, buf)
    }
    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        (**self).ptr_at(offset, len)
    }
    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        (**self).is_zero(offset, len)
    }
    fn wait_ready(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        (**self).wait_ready(offset, len)
    }
    fn read_or_lend(&self, offset: u64, buf: &mut [u8]) -> Result<Lend, SourceError> {
        (**self).read_or_lend(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        (**self).flush()
    }
}

impl<T: PageSource + ?Sized> PageSource for Box<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_at(offset, buf)
    }
    fn ptr_at(&self, offset: u64, len: u64) -> Option<*const u8> {
        (**self).ptr_at(offset, len)
    }
    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        (**self).is_zero(offset, len)
    }
    fn wait_ready(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        (**self).wait_ready(offset, len)
    }
    fn read_or_lend(&self, offset: u64, buf: &mut [u8]) -> Result<Lend, SourceError> {
        (**self).read_or_lend(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        (**self).flush()
    }
}

/// What [`PageSource::read_or_lend`] did with the front of the range it was asked for.
#[derive(Debug)]
pub enum Lend {
    /// This many bytes from the start were read into the caller's buffer.
    Read(usize),
    /// These bytes are the front of the range, lent by the source.
    Lent(Lent),
}

/// Bytes a source lends instead of copying them out: they stay alive, and unchanged, while the
/// `Lent` lives (it holds a reference to the buffer they are in).
pub struct Lent {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Lent {
    /// `range` of `owner`'s bytes; `None` if it is empty or does not lie inside them.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Lent> {
        let inside = range.start < range.end && range.end <= (*owner).as_ref().len();
        inside.then_some(Lent { owner, range })
    }

    /// The lent bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").field("range", &self.range).finish()
    }
}

/// Check that `offset..offset + len` lies inside a source of `source_len` bytes.
pub fn check_bounds(name: &str, offset: u64, len: u64, source_len: u64) -> Result<(), SourceError> {
    match offset.checked_add(len) {
        Some(end) if end <= source_len => Ok(()),
        _ => Err(SourceError::out_of_range(name, offset, len, source_len)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn io_errors_are_classified() {
        for kind in [
            ErrorKind::Interrupted,
            ErrorKind::WouldBlock,
            ErrorKind::TimedOut,
        ] {
            let e = SourceError::from_io("f", 4096, 8, Error::from(kind));
            assert!(e.is_retryable(), "{kind:?}");
        }
        let e = SourceError::from_io("f", 4096, 8, Error::from_raw_os_error(5));
        assert_eq!(e.retry, Retry::Permanent);
        // The cause is kept as the source and not repeated in the message.
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&cause), "{e}");
        assert_eq!(
            e.to_string(),
            "reading 8 bytes at offset 0x1000 from f: I/O error"
        );
    }

    #[test]
    fn bounds_are_checked_without_overflow() {
        assert!(check_bounds("s", 0, 10, 10).is_ok());
        assert!(check_bounds("s", 10, 0, 10).is_ok());
        let e = check_bounds("s", 5, 6, 10).unwrap_err();
        assert_eq!((e.offset, e.len, e.retry), (5, 6, Retry::Permanent));
        assert!(check_bounds("s", u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn short_read_names_where_data_ended() {
        let e = SourceError::short_read("f", 0x1000, 0x2000, 0x10);
        assert_eq!(e.retry, Retry::Permanent);
        assert!(e.to_string().contains("offset 0x1010"), "{e}");
    }

    #[test]
    fn boxed_and_shared_sources_delegate() {
        let b: Box<dyn PageSource> = Box::new(MemorySource::new(vec![3; 4096]));
        let a: Arc<dyn PageSource> = Arc::new(ZeroSource::new(4096));
        let mut buf = [0u8; 4];
        b.read_at(1, &mut buf).unwrap();
        assert_eq!(buf, [3; 4]);
        assert_eq!(
            (b.len(), b.is_zero(0, 4096), b.ptr_at(0, 1).is_some()),
            (4096, Some(false), true)
        );
        assert_eq!(
            (a.len(), a.is_zero(0, 4096), a.name()),
            (4096, Some(true), "zero".to_string())
        );
    }
}
