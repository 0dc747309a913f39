//! Chunk compression: zstd (one frame per chunk) or LZ4 (one raw block per chunk, `lz4_flex`).
//!
//! A chunk whose compressed form would not be smaller than its pages is stored as it is (the
//! chunk table then gives equal stored and raw lengths), so incompressible memory costs no
//! decompression when it is served. Decompression always writes into a buffer of exactly the
//! chunk's raw length and fails unless it produced exactly that many bytes: a corrupt or hostile
//! chunk can neither make the reader allocate more nor leave part of a page unwritten.

use std::cell::RefCell;

use super::Codec;

/// Compresses chunks for the writer, reusing one zstd context.
pub(crate) struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl Compressor {
    /// A compressor for `codec` at `level` (zstd only).
    pub(crate) fn new(codec: Codec, level: i32) -> std::io::Result<Compressor> {
        let zstd = match codec {
            Codec::Zstd => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Compressor {
            codec,
            zstd,
            out: Vec::new(),
        })
    }

    /// The stored form of `raw`: compressed when that is smaller, else `raw` itself.
    pub(crate) fn compress<'a>(&'a mut self, raw: &'a [u8]) -> std::io::Result<&'a [u8]> {
        let produced = match (self.codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(z)) => {
                self.out.clear();
                self.out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
                z.compress_to_buffer(raw, &mut self.out)?;
                true
            }
            (Codec::Lz4, _) => {
                self.out.clear();
                self.out
                    .resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                let n = lz4_flex::block::compress_into(raw, &mut self.out)
                    .map_err(std::io::Error::other)?;
                self.out.truncate(n);
                true
            }
            _ => false,
        };
        if produced && self.out.len() < raw.len() {
            Ok(&self.out)
        } else {
            Ok(raw)
        }
    }
}

thread_local! {
    /// One zstd decompression context per thread (creating one per chunk costs an allocation of
    /// its window state).
    static ZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress `stored` (a chunk compressed with `codec`) into `out`, which must be filled
/// exactly. The error names what the codec reported.
pub(crate) fn decompress(codec: Codec, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    if stored.len() == out.len() {
        out.copy_from_slice(stored);
        return Ok(());
    }
    let n = match codec {
        Codec::None => {
            return Err(format!(
                "{} stored bytes for {} raw bytes in an uncompressed image",
                stored.len(),
                out.len()
            ))
        }
        Codec::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| format!("zstd: cannot create a decompressor: {e}"))?,
                );
            }
            match slot.as_mut() {
                Some(d) => d
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| format!("zstd: {e}")),
                None => Err("zstd: no decompressor".to_string()),
            }
        })?,
        Codec::Lz4 => {
            lz4_flex::block::decompress_into(stored, out).map_err(|e| format!("lz4: {e}"))?
        }
    };
    if n != out.len() {
        return Err(format!(
            "decompressed to {n} bytes, the chunk table says {}",
            out.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..64 * 1024i32)
            .map(|i| (i / 100).to_le_bytes()[0])
            .collect()
    }

    #[test]
    fn round_trips_with_every_codec() {
        let raw = compressible();
        for codec in [Codec::Zstd, Codec::Lz4] {
            let mut c = Compressor::new(codec, 3).unwrap();
            let stored = c.compress(&raw).unwrap().to_vec();
            assert!(stored.len() < raw.len() / 4, "{codec:?}: {}", stored.len());
            let mut out = vec![0u8; raw.len()];
            decompress(codec, &stored, &mut out).unwrap();
            assert_eq!(out, raw);
        }
    }

    #[test]
    fn incompressible_chunks_are_stored_raw() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let raw: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        for codec in [Codec::None, Codec::Zstd, Codec::Lz4] {
            let mut c = Compressor::new(codec, 3).unwrap();
            assert_eq!(c.compress(&raw).unwrap(), &raw[..], "{codec:?}");
        }
    }

    #[test]
    fn corrupt_or_wrong_length_chunks_are_errors() {
        let raw = compressible();
        for codec in [Codec::Zstd, Codec::Lz4] {
            let mut c = Compressor::new(codec, 3).unwrap();
            let stored = c.compress(&raw).unwrap().to_vec();
            // Too small an output, too large an output.
            let mut short = vec![0u8; raw.len() - 4096];
            assert!(decompress(codec, &stored, &mut short).is_err(), "{codec:?}");
            let mut long = vec![0u8; raw.len() + 4096];
            let e = decompress(codec, &stored, &mut long).unwrap_err();
            assert!(!e.is_empty());
            // Garbage never panics; it errors or (rarely) decodes to other bytes.
            let mut out = vec![0u8; raw.len()];
            let mut g = stored.clone();
            for b in g.iter_mut().take(32) {
                *b ^= 0x5a;
            }
            let _ = decompress(codec, &g, &mut out);
            assert!(decompress(codec, &stored[..stored.len() / 2], &mut out).is_err());
        }
        let mut out = [0u8; 8];
        assert!(decompress(Codec::None, &[1, 2], &mut out).is_err());
    }
}
