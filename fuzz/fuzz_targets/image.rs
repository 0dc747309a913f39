//! Fuzz the snapshot image reader: `faultline::image::Image::from_reader` (header and tables)
//! over arbitrary bytes, then `ImageSource` reading every page of whatever opened.
//!
//! Invariants: no panic, no allocation beyond the input's size for the tables; an image that
//! opens has a consistent geometry (page count, an index entry for every page); every page read
//! either returns bytes (zero pages all zero) or fails with a permanent error whose message starts
//! with the page's index; and when `verify` finds no bad page, no read failed.
//!
//! Page reads are skipped for geometries whose chunks may exceed 4 MiB (1 GiB pages, huge
//! chunks): a chunk is decompressed into a buffer of its declared size, which the header and
//! tables bound (64 MiB, or one page) but which would exceed the fuzzer's memory limit.
#![no_main]

use std::sync::Arc;

use faultline::image::{Image, ImageSource};
use faultline::source::{PageSource, Retry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let image = match Image::from_reader(Arc::new(data.to_vec())) {
        Ok(image) => image,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let h = image.header().clone();
    let ps = u64::from(h.page_size);
    assert_eq!(h.page_count, h.source_len.div_ceil(ps));
    assert_eq!(image.file_len(), data.len() as u64);
    assert!(image.page(h.page_count).is_none());
    for p in 0..h.page_count {
        assert!(image.page(p).is_some());
    }
    let counts = image.page_counts();
    assert_eq!(counts.zero + counts.base + counts.stored, h.page_count);
    if ps * u64::from(h.chunk_pages) > 4 << 20 {
        return;
    }
    let has_base = image.base_id().is_some();
    let src = match ImageSource::new(image) {
        Ok(s) => s.with_cache_bytes(1 << 20),
        Err(e) => {
            assert!(has_base, "a full image opens as a source: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; ps as usize];
    let mut failed = 0u64;
    for p in 0..h.page_count {
        let off = p * ps;
        let len = ps.min(h.source_len - off);
        let b = &mut buf[..len as usize];
        match src.read_at(off, b) {
            Ok(()) => {
                if src.is_zero(off, len) == Some(true) {
                    assert!(b.iter().all(|&x| x == 0), "page {p} is zero by the index");
                }
            }
            Err(e) => {
                assert_eq!(e.retry, Retry::Permanent, "{e}");
                let named = format!("page {p}: ");
                assert!(e.what.starts_with(&named), "{e}");
                failed += 1;
            }
        }
    }
    let report = src.image().verify(|_| {});
    if report.bad.is_empty() {
        assert_eq!(
            failed, 0,
            "verify found nothing wrong but {failed} reads failed"
        );
    }
});
