//! Snapshot images: a raw memory file packed into an indexed, deduplicated, compressed,
//! hash-verified file that the fault server serves from directly.
//!
//! The format is specified in `docs/image-format.md` (version 2; version 1 is still read). In
//! short: a 256-byte header
//! (magic, version, page size, source length, counts, the offset of every table, the hash of the
//! tables and the hash of the header itself, which is the image's **id**), then the pages that are
//! stored, in independently decompressible chunks (zstd by default, LZ4 as an option, or stored
//! as they are when compression does not help), then a page index with one 8-byte entry per page
//! — zero, "the base image's page", or (chunk, offset in the decompressed chunk) — a chunk table
//! (with the BLAKE3 hash of each chunk's decompressed bytes, which checks a whole chunk at once),
//! and a hash table with the 16-byte BLAKE3 hash of every stored page. Zero pages are not stored
//! and identical pages are stored once. A **diff** image names its base by id (and, as a hint
//! for finding the file, by name) and stores only the pages that differ from it; a diff entry can
//! also say "zero" over a non-zero base page.
//!
//! - [`pack`] / [`pack_diff`] / [`ImageWriter`] write an image from any reader of raw bytes, in one
//!   streaming pass with bounded memory (one chunk of pages plus the index).
//! - [`Image`] opens one over any [`RangeRead`] (a file here; an object store elsewhere),
//!   validating the header and tables before anything is served.
//! - [`ImageSource`] is a [`PageSource`](crate::PageSource): zero pages come from the index (and
//!   so are served with `UFFDIO_ZEROPAGE`), stored pages from a small LRU cache of decompressed
//!   chunks, **verified against their hash before their bytes are returned**. A hash mismatch or a
//!   corrupt chunk is a permanent [`SourceError`](crate::SourceError) naming the page, so the
//!   server poisons that page rather than serve it.
//!
//! # Example: pack, open, serve
//! ```
//! use faultline::image::{pack, ImageSource, PackOptions};
//! use faultline::PageSource;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mut raw = vec![0u8; 16 * 4096];
//! raw[5 * 4096..6 * 4096].fill(7); // one non-zero page...
//! raw[9 * 4096..10 * 4096].fill(7); // ...and a copy of it
//! let path = dir.path().join("snap.img");
//! let stats = pack(&raw[..], std::fs::File::create(&path)?, &PackOptions::default(), |_| {})?;
//! assert_eq!((stats.zero_pages, stats.duplicate_pages, stats.unique_pages), (14, 1, 1));
//!
//! let source = ImageSource::open(&path)?;
//! let mut page = vec![0u8; 4096];
//! source.read_at(9 * 4096, &mut page)?;
//! assert!(page.iter().all(|&b| b == 7));
//! assert_eq!(source.is_zero(0, 4096), Some(true));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

mod chunk_cache;
mod codec;
pub mod format;
mod open;
mod reader;
mod writer;

pub use format::{HashAlg, PageHash, PageLoc};
pub use open::{Image, VerifyReport};
pub use reader::{ImageSource, ImageStats};
pub use writer::{pack, pack_diff, ImageWriter, PackOptions, PackStats};

/// How chunks are compressed (the header's codec byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Stored as they are.
    None = 0,
    /// zstd, one frame per chunk: the best ratio (the default).
    Zstd = 1,
    /// LZ4 block format (`lz4_flex`), one block per chunk: the fastest to decompress.
    Lz4 = 2,
}

impl Codec {
    /// The codec with header byte `b`.
    pub fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// Its name: "none", "zstd", "lz4".
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an image could not be written, opened or layered.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation failed; `what` names it.
    #[error("{what}")]
    Io {
        /// The operation ("reading the header of snap.img", ...).
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the image magic.
    #[error("not a faultline image (it starts with {found:02x?}, not \"FAULTIMG\")")]
    NotAnImage {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build cannot read.
    #[error("image format version {0} is not supported (this build reads versions 1 and 2)")]
    UnsupportedVersion(u32),
    /// The file ends before a section the header describes.
    #[error("image truncated: the {what} ends at byte {end} but the image is {len} bytes long")]
    Truncated {
        /// The missing section ("header", "page index", "chunk table", ...).
        what: String,
        /// Where it should end.
        end: u64,
        /// The image's length.
        len: u64,
    },
    /// A header field is invalid.
    #[error("corrupt image header: {0}")]
    Header(String),
    /// A table entry is invalid.
    #[error("corrupt image {table}: {problem}")]
    Table {
        /// Which table.
        table: &'static str,
        /// What is wrong, naming the entry.
        problem: String,
    },
    /// A diff and its base do not fit together (wrong id, page size, missing base).
    #[error("{0}")]
    Layer(String),
    /// Bad writer options or input.
    #[error("{0}")]
    Invalid(String),
    /// The image is not the one its expected id names ([`ImageSource::check_id`]), or its page
    /// hash cannot make its id vouch for its pages.
    #[error("{0}")]
    Id(String),
    /// A page could not be read (a corrupt chunk, a hash mismatch, an I/O error).
    #[error("page read failed")]
    Page(#[source] crate::SourceError),
}

impl ImageError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> ImageError {
        ImageError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Positioned reads of a byte range: what an image is read through. Implemented for files here;
/// an object store implements it with ranged GETs.
pub trait RangeRead: Send + Sync + fmt::Debug {
    /// Length in bytes (taken when the reader was made).
    fn len(&self) -> u64;

    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short name for errors (a path, a URL).
    fn name(&self) -> String {
        "image".to_string()
    }

    /// Fill all of `buf` with the bytes at `offset..`. A range that runs past the end is an
    /// `UnexpectedEof` error; transient failures should use the retryable kinds that
    /// [`SourceError::from_io`](crate::SourceError::from_io) recognises (`TimedOut`,
    /// `Interrupted`, `ConnectionReset`, ...), so the server retries them.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Make durable what the reader keeps for a later process (see
    /// [`PageSource::flush`](crate::PageSource::flush)). Nothing to do by default.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl RangeRead for std::fs::File {
    /// The file's current length (0 if it cannot be stat'ed; reads then fail with the cause).
    fn len(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn name(&self) -> String {
        "file".to_string()
    }

    #[doc(alias = "pread")]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Retries EINTR; a short file is UnexpectedEof.
        self.read_exact_at(buf, offset)
    }
}

/// A file with its length and path taken when opened: what [`Image::open`] reads through.
#[derive(Debug)]
pub struct FileRange {
    file: std::fs::File,
    len: u64,
    name: String,
}

impl FileRange {
    /// Open `path` read-only.
    pub fn open(path: impl AsRef<std::path::Path>) -> io::Result<FileRange> {
        let path = path.as_ref();
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileRange {
            file,
            len,
            name: path.display().to_string(),
        })
    }
}

impl FileRange {
    /// Read through an already open file (e.g. one received from another process), named
    /// `name` in errors; its length is taken now.
    pub fn from_file(file: std::fs::File, name: impl Into<String>) -> io::Result<FileRange> {
        let len = file.metadata()?.len();
        Ok(FileRange {
            file,
            len,
            name: name.into(),
        })
    }

    /// The open file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

impl RangeRead for FileRange {
    fn len(&self) -> u64 {
        self.len
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// An image held in memory (tests, fuzzing, small images).
impl RangeRead for Vec<u8> {
    fn len(&self) -> u64 {
        self.len() as u64
    }
    fn name(&self) -> String {
        "memory".to_string()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?));
        match range {
            Some(range) if range.end <= self.len() => {
                buf.copy_from_slice(&self[range]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {offset}+{} past the end of {} bytes",
                    buf.len(),
                    self.len()
                ),
            )),
        }
    }
}

impl<T: RangeRead + ?Sized> RangeRead for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
}

impl<T: RangeRead + ?Sized> RangeRead for Box<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
}

/// Lowercase hex of `bytes` (image ids, hashes in messages).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;

    #[test]
    fn range_reads_fill_exactly_or_fail_with_eof() {
        let v: Vec<u8> = (0..100u8).collect();
        let mut b = [0u8; 10];
        RangeRead::read_at(&v, 90, &mut b).unwrap();
        assert_eq!(b[0], 90);
        let e = RangeRead::read_at(&v, 91, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(RangeRead::read_at(&v, u64::MAX, &mut b).is_err());

        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &v).unwrap();
        let r = FileRange::open(f.path()).unwrap();
        assert_eq!(RangeRead::len(&r), 100);
        r.read_at(5, &mut b).unwrap();
        assert_eq!(b[0], 5);
        let e = r.read_at(95, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let file = f.reopen().unwrap();
        assert_eq!(RangeRead::len(&file), 100);
        RangeRead::read_at(&file, 0, &mut b).unwrap();
        assert_eq!(b[9], 9);
    }

    #[test]
    fn codec_bytes_round_trip() {
        for c in [Codec::None, Codec::Zstd, Codec::Lz4] {
            assert_eq!(Codec::from_byte(c as u8), Some(c));
        }
        assert_eq!(Codec::from_byte(3), None);
        assert_eq!(hex(&[0, 0xab]), "00ab");
    }
}
