//! Opening an image: [`Image`] reads the header and all the tables of an image over a
//! [`RangeRead`] in one read, checks both hashes and every entry, and keeps the tables in
//! memory; it looks pages up, reads and decompresses chunks, and verifies a whole image.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec;
use super::format::{ChunkEntry, Header, PageHash, PageLoc, Tables, HEADER_LEN};
use super::{hex, Codec, FileRange, ImageError, RangeRead};

/// An opened image: its validated header and tables, and the reader of its chunks.
#[derive(Debug)]
pub struct Image {
    pub(super) reader: Arc<dyn RangeRead>,
    pub(super) header: Header,
    pub(super) id: [u8; 32],
    pub(super) tables: Tables,
    pub(super) file_len: u64,
    pub(super) name: String,
    pub(super) path: Option<PathBuf>,
}

/// Why a chunk could not be had.
#[derive(Debug)]
pub(crate) enum ChunkError {
    Io(std::io::Error),
    Corrupt(String),
}

/// How the pages of an image's index are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Zero pages.
    pub zero: u64,
    /// Pages taken from the base.
    pub base: u64,
    /// Pages whose entry points into a chunk.
    pub stored: u64,
    /// Distinct pages in the chunks (the hash table's entries).
    pub distinct: u64,
}

/// What [`Image::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks read and decompressed.
    pub chunks: u64,
    /// Stored pages whose hash was checked.
    pub pages_checked: u64,
    /// Bad stored pages: (first page index that uses it, or `None` if no page does; why).
    pub bad: Vec<(Option<u64>, String)>,
}

impl Image {
    /// Open the image file at `path` and validate its header and tables.
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        let path = path.as_ref();
        let r = FileRange::open(path)
            .map_err(|e| ImageError::io(format!("opening the image {}", path.display()), e))?;
        let mut image = Image::from_reader(Arc::new(r))?;
        image.path = Some(path.to_path_buf());
        Ok(image)
    }

    /// Open an image read through `reader` and validate its header and tables.
    pub fn from_reader(reader: Arc<dyn RangeRead>) -> Result<Image, ImageError> {
        let name = reader.name();
        let file_len = reader.len();
        let head_len = usize::try_from(file_len).map_or(HEADER_LEN, |l| l.min(HEADER_LEN));
        let mut head = vec![0u8; head_len];
        reader
            .read_at(0, &mut head)
            .map_err(|e| ImageError::io(format!("reading the header of {name}"), e))?;
        let header = Header::decode(&head, file_len)?;
        let mut encoded = [0u8; HEADER_LEN];
        encoded.copy_from_slice(&head);
        let id = Header::id_of(&encoded);
        // Validated: index_offset <= file_len, and the tables run to the end of the file.
        let tables_len = usize::try_from(file_len - header.index_offset).map_err(|_| {
            ImageError::io(
                format!("reading the tables of {name}"),
                std::io::Error::new(std::io::ErrorKind::OutOfMemory, "they do not fit in memory"),
            )
        })?;
        let mut tables = vec![0u8; tables_len];
        reader
            .read_at(header.index_offset, &mut tables)
            .map_err(|e| ImageError::io(format!("reading the tables of {name}"), e))?;
        let tables = Tables::decode(&header, &tables)?;
        Ok(Image {
            reader,
            header,
            id,
            tables,
            file_len,
            name,
            path: None,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image id: the BLAKE3 hash of the header, which covers the tables' hash and so every
    /// page's hash. A diff names its base by this.
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// Page size.
    pub fn page_size(&self) -> u32 {
        self.header.page_size
    }

    /// Length of the raw memory.
    pub fn source_len(&self) -> u64 {
        self.header.source_len
    }

    /// Pages in the index.
    pub fn page_count(&self) -> u64 {
        self.header.page_count
    }

    /// The chunk codec.
    pub fn codec(&self) -> Codec {
        self.header.codec
    }

    /// The image file's length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The reader's name (the path for [`Image::open`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path it was opened from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The id of the base this image is a diff over.
    pub fn base_id(&self) -> Option<[u8; 32]> {
        self.header.has_base().then_some(self.header.base_id)
    }

    /// The name it gives its base (relative to its own directory, or absolute).
    pub fn base_name(&self) -> Option<&str> {
        self.tables.base_name.as_deref()
    }

    /// Where page `page` is (`None` past the end).
    pub fn page(&self, page: u64) -> Option<PageLoc> {
        usize::try_from(page)
            .ok()
            .and_then(|p| self.tables.index.get(p).copied())
    }

    /// The hash-table slot of a stored page's location.
    pub(super) fn slot(&self, chunk: u32, offset: u32) -> usize {
        // Validated at open: chunk exists, offset is a page inside it.
        let chunk = usize::try_from(chunk).expect("a chunk index validated at open");
        usize::try_from(self.tables.first_slot[chunk] + u64::from(offset / self.header.page_size))
            .expect("a slot of the hash table, which is in memory")
    }

    /// The content hash of page `page`, if it is stored in this image.
    pub fn page_hash(&self, page: u64) -> Option<PageHash> {
        match self.page(page)? {
            PageLoc::Stored { chunk, offset } => Some(self.tables.hashes[self.slot(chunk, offset)]),
            _ => None,
        }
    }

    /// The chunk table.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.tables.chunks
    }

    /// How the pages are stored.
    pub fn page_counts(&self) -> PageCounts {
        let mut c = PageCounts {
            distinct: self.header.stored_pages,
            ..PageCounts::default()
        };
        for loc in &self.tables.index {
            match loc {
                PageLoc::Zero => c.zero += 1,
                PageLoc::Base => c.base += 1,
                PageLoc::Stored { .. } => c.stored += 1,
            }
        }
        c
    }

    /// Read and decompress chunk `chunk`.
    pub(crate) fn read_chunk(&self, chunk: u32) -> Result<Vec<u8>, ChunkError> {
        let mut out = Vec::new();
        self.read_chunk_into(chunk, &mut out)?;
        Ok(out)
    }

    /// Read and decompress chunk `chunk` into `out` (resized to the chunk's length; a recycled
    /// buffer saves zeroing a new one).
    pub(super) fn read_chunk_into(&self, chunk: u32, out: &mut Vec<u8>) -> Result<(), ChunkError> {
        thread_local! {
            /// The compressed bytes of the chunk being decompressed on this thread.
            static STORED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let c = self
            .tables
            .chunks
            .get(chunk as usize)
            .ok_or_else(|| ChunkError::Corrupt(format!("no chunk {chunk}")))?;
        out.resize(c.raw_len as usize, 0);
        if c.is_raw() {
            return self.reader.read_at(c.offset, out).map_err(ChunkError::Io);
        }
        STORED.with(|cell| {
            let mut stored = cell.borrow_mut();
            stored.resize(c.stored_len as usize, 0);
            self.reader
                .read_at(c.offset, &mut stored)
                .map_err(ChunkError::Io)?;
            codec::decompress(self.header.codec, &stored, out).map_err(ChunkError::Corrupt)
        })
    }

    /// Read every chunk and check the hash of every stored page. `progress` gets the chunks
    /// done so far. Bad pages are named by the first page index that uses them.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> VerifyReport {
        let ps = self.header.page_size as usize;
        let mut report = VerifyReport::default();
        let mut bad_slots: Vec<(usize, String)> = Vec::new();
        for (i, c) in self.tables.chunks.iter().enumerate() {
            let first = usize::try_from(self.tables.first_slot[i])
                .expect("a slot of the hash table, which is in memory");
            let slots = (c.raw_len as usize) / ps;
            match self.read_chunk(u32::try_from(i).expect("chunk numbers are u32 in the format")) {
                Ok(data) => {
                    for (k, page) in data.chunks_exact(ps).enumerate() {
                        let want = self.tables.hashes[first + k];
                        let got = self.header.hash.page(page);
                        if got != want {
                            bad_slots.push((
                                first + k,
                                format!(
                                    "content hash mismatch in chunk {i} at offset {} (expected {}, got {})",
                                    k * ps,
                                    hex(&want),
                                    hex(&got)
                                ),
                            ));
                        }
                        report.pages_checked += 1;
                    }
                }
                Err(e) => {
                    let why = match e {
                        ChunkError::Io(e) => format!("chunk {i} cannot be read: {e}"),
                        ChunkError::Corrupt(w) => format!("chunk {i} is corrupt: {w}"),
                    };
                    bad_slots.extend((first..first + slots).map(|s| (s, why.clone())));
                }
            }
            report.chunks += 1;
            progress(report.chunks);
        }
        if !bad_slots.is_empty() {
            // Name each bad slot by the first page that uses it.
            let mut first_page = vec![None; self.tables.hashes.len()];
            for (p, loc) in self.tables.index.iter().enumerate() {
                if let PageLoc::Stored { chunk, offset } = *loc {
                    let s = self.slot(chunk, offset);
                    if first_page[s].is_none() {
                        first_page[s] = Some(p as u64);
                    }
                }
            }
            report.bad = bad_slots
                .into_iter()
                .map(|(s, why)| (first_page[s], why))
                .collect();
            report.bad.sort_by_key(|(p, _)| p.unwrap_or(u64::MAX));
        }
        report
    }
}
