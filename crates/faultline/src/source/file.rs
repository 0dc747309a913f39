//! A file read with `pread(2)`.
//!
//! [`FileSource`] reads each range with positioned reads, so any number of server threads share
//! one open file without a seek position. The length is the file's length when the source was
//! made; if the file shrinks later, a read that meets its new end fails with a permanent
//! "short read" error naming where the data ended, rather than serving a page that is part
//! garbage. `EINTR` is retried inside `read_at`; other errors go through
//! [`SourceError::from_io`], which decides whether the server may retry.
//!
//! Every byte read this way is copied twice (page cache → buffer → faulting process); the mmap
//! source ([`super::MmapSource`]) saves one copy. This one works on anything `pread` does and
//! needs no address space.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{check_bounds, PageSource, SourceError};

/// A file, read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
    name: String,
}

impl FileSource {
    /// Open `path` read-only. Its length is taken now.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileSource> {
        let path = path.as_ref();
        let file = File::open(path)?;
        let mut source = FileSource::from_file(file)?;
        source.name = path.display().to_string();
        Ok(source)
    }

    /// Read from an open file (it must be open for reading). Its length is taken now.
    pub fn from_file(file: File) -> io::Result<FileSource> {
        let len = file.metadata()?.len();
        Ok(FileSource {
            file,
            len,
            name: "file".to_string(),
        })
    }

    /// Use `name` in logs and errors (the path for [`FileSource::open`], "file" otherwise).
    pub fn with_name(mut self, name: impl Into<String>) -> FileSource {
        self.name = name.into();
        self
    }
}

impl PageSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    #[doc(alias = "pread")]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        check_bounds(&self.name, offset, len, self.len)?;
        let mut done = 0usize;
        while done < buf.len() {
            // In range: offset + len was checked not to overflow.
            let at = offset + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(SourceError::short_read(
                        &self.name,
                        offset,
                        len,
                        done as u64,
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SourceError::from_io(&self.name, offset, len, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;
    use crate::source::Retry;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251).to_le_bytes()[0] ^ (i / 4096).to_le_bytes()[0])
            .collect()
    }

    fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn reads_back_what_was_written() {
        let data = pattern(5 * 4096 + 123);
        let f = temp_with(&data);
        let s = FileSource::open(f.path()).unwrap();
        assert_eq!(s.len(), data.len() as u64);
        assert_eq!(s.name(), f.path().display().to_string());
        let mut buf = vec![0u8; 2 * 4096];
        s.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, data[4096..3 * 4096]);
        let mut tail = vec![0u8; 4096 + 123];
        s.read_at(4 * 4096, &mut tail).unwrap();
        assert_eq!(tail, data[4 * 4096..]);
        assert_eq!(s.ptr_at(0, 4096), None);
        assert_eq!(s.is_zero(0, 4096), None);
    }

    #[test]
    fn from_file_reads_the_same_bytes() {
        let data = pattern(3 * 4096);
        let f = temp_with(&data);
        let s = FileSource::from_file(f.reopen().unwrap())
            .unwrap()
            .with_name("snapshot");
        assert_eq!(s.name(), "snapshot");
        let mut all = vec![0u8; data.len()];
        s.read_at(0, &mut all).unwrap();
        assert_eq!(all, data);
    }

    #[test]
    fn out_of_range_is_permanent_and_names_offset() {
        let f = temp_with(&pattern(2 * 4096));
        let s = FileSource::open(f.path()).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = s.read_at(4096 + 1, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, 4097);
        assert!(e.to_string().contains("0x1001"), "{e}");
        assert!(e.cause.is_none());
    }

    #[test]
    fn file_shrunk_after_open_is_a_permanent_short_read() {
        let data = pattern(4 * 4096);
        let f = temp_with(&data);
        let s = FileSource::open(f.path()).unwrap();
        f.as_file().set_len(2 * 4096 + 10).unwrap();
        let mut buf = vec![0u8; 2 * 4096];
        let e = s.read_at(4096, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        assert_eq!(e.offset, 4096);
        assert_eq!(e.len, 2 * 4096);
        // Names where the data ended and how much was read.
        assert!(e.to_string().contains("0x200a"), "{e}");
        assert!(e.to_string().contains("4106 of 8192"), "{e}");
        // The bytes before the new end are still served.
        let mut ok = vec![0u8; 4096];
        s.read_at(4096, &mut ok).unwrap();
        assert_eq!(ok, data[4096..2 * 4096]);
    }

    #[test]
    fn io_error_is_classified_and_kept_as_cause() {
        // pread on a directory fails with EISDIR: permanent, with the io::Error as the cause.
        let dir = tempfile::tempdir().unwrap();
        let s = FileSource::from_file(File::open(dir.path()).unwrap()).unwrap();
        let mut buf = vec![0u8; 1];
        if s.is_empty() {
            eprintln!("skipped: this filesystem reports directories as 0 bytes long");
            return;
        }
        let e = s.read_at(0, &mut buf).unwrap_err();
        assert_eq!(e.retry, Retry::Permanent);
        let cause = e.cause.as_ref().unwrap();
        assert_eq!(cause.raw_os_error(), Some(libc::EISDIR));
        assert!(std::error::Error::source(&e).is_some());
    }
}
