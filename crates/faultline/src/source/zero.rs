//! A source of zeros.
//!
//! Every range is known to be zero, so a server resolves every fault of a region backed by a
//! [`ZeroSource`] with `UFFDIO_ZEROPAGE` and never reads. `read_at` still works (it zero-fills),
//! for callers that want the bytes.

use super::{check_bounds, PageSource, SourceError};

/// `len` bytes of zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroSource {
    len: u64,
}

impl ZeroSource {
    /// A source of `len` zero bytes.
    pub fn new(len: u64) -> ZeroSource {
        ZeroSource { len }
    }
}

impl PageSource for ZeroSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        "zero".to_string()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_bounds(&self.name(), offset, buf.len() as u64, self.len)?;
        buf.fill(0);
        Ok(())
    }

    fn is_zero(&self, offset: u64, len: u64) -> Option<bool> {
        check_bounds("zero", offset, len, self.len).ok()?;
        Some(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::Retry;

    #[test]
    fn read_zero_fills() {
        let s = ZeroSource::new(3 * 4096);
        let mut buf = vec![0xaa_u8; 4096];
        s.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(s.len(), 3 * 4096);
        assert!(!s.is_empty());
        assert_eq!(s.is_zero(0, 3 * 4096), Some(true));
        assert_eq!(s.ptr_at(0, 4096), None);
    }

    #[test]
    fn out_of_range_is_permanent_and_names_offset() {
        let s = ZeroSource::new(8192);
        let mut buf = vec![0xaa_u8; 4096];
        let e = s.read_at(8192, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert!(!e.is_retryable());
        assert_eq!(e.offset, 8192);
        assert!(e.to_string().contains("0x2000"), "{e}");
        // The buffer is untouched on error.
        assert!(buf.iter().all(|&b| b == 0xaa));
        // Overflowing offset + len is out of range too, not a wrap-around.
        assert!(s.read_at(u64::MAX, &mut buf).is_err());
        assert_eq!(s.is_zero(4096, 8192), None);
        assert_eq!(s.is_zero(u64::MAX, 2), None);
        // A zero-length read at the end is in range.
        s.read_at(8192, &mut []).unwrap();
    }
}
