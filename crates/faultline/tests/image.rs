//! Snapshot images end to end: a demo-like snapshot (zero runs, duplicated pages, unique pages)
//! packed, opened and read back byte for byte with every codec; the size target; corruption and
//! truncation named precisely; a diff over a base serving the new memory exactly; and serving
//! through the fault server into a mapping, where a corrupt page is poisoned (SIGBUS there, and
//! only there) instead of served.
//!
//! A poisoned page kills whoever touches it, so that scenario runs in a forked child that makes
//! its own userfaultfd, mapping and server; the child reports a failed check by its exit code.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::image::{
    pack, pack_diff, Codec, HashAlg, Image, ImageError, ImageSource, PackOptions, PageLoc,
};
use faultline::source::Retry;
use faultline::{PageSource, Readahead, Region, Server, ServerConfig, SessionOptions};
use faultline_testing::{in_child, need_features, within, ChildExit};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd};

const PS: usize = 4096;
/// 16 MiB: 4096 pages.
const PAGES: usize = 4096;
/// Safety net against a lost fault (a hang fails the test instead).
const LIMIT: Duration = Duration::from_secs(30);

/// Fill `buf` with xorshift bytes from `seed` (incompressible, never all zero).
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// What kind each page of the snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    /// A copy of one of 16 "hot" pages.
    Dup(u64),
    Unique,
}

/// The demo's shape: in every 640 pages, 192 zero pages in runs of 64, 128 copies of 16 hot
/// pages, 320 unique pseudo-random pages.
fn kind(p: usize) -> Kind {
    match (p / 64) % 10 {
        0..=2 => Kind::Zero,
        3 | 4 => Kind::Dup(1 + p as u64 % 16),
        _ => Kind::Unique,
    }
}

fn snapshot() -> Vec<u8> {
    let mut v = vec![0u8; PAGES * PS];
    for (p, page) in v.chunks_exact_mut(PS).enumerate() {
        match kind(p) {
            Kind::Zero => {}
            Kind::Dup(seed) => fill(seed, page),
            Kind::Unique => fill(1000 + p as u64, page),
        }
    }
    v
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(bytes).expect("write");
}

/// Pack `raw` into `dir/name` with `opts`.
fn pack_to(dir: &Path, name: &str, raw: &[u8], opts: &PackOptions) -> std::path::PathBuf {
    let path = dir.join(name);
    let out = std::fs::File::create(&path).expect("create image");
    pack(raw, out, opts, |_| {}).expect("pack");
    path
}

fn page(bytes: &[u8], p: usize) -> &[u8] {
    &bytes[p * PS..(p + 1) * PS]
}

#[test]
fn every_page_reads_back_with_every_codec_and_the_size_is_within_target() {
    let raw = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let count = |k: fn(Kind) -> bool| (0..PAGES).filter(|&p| k(kind(p))).count();
    let zero_pages = count(|k| k == Kind::Zero);
    let dup_pages = count(|k| matches!(k, Kind::Dup(_)));
    // The first copy of each of the 16 hot pages is stored; the rest are duplicates.
    let unique_pages = count(|k| k == Kind::Unique) + 16;
    let unique_fraction = unique_pages as f64 / PAGES as f64;
    for codec in [Codec::Zstd, Codec::Lz4, Codec::None] {
        let opts = PackOptions {
            codec,
            ..PackOptions::default()
        };
        let mut progress = Vec::new();
        let path = dir.path().join(format!("snap-{codec}.img"));
        let stats = pack(
            &raw[..],
            std::fs::File::create(&path).expect("create"),
            &opts,
            |n| progress.push(n),
        )
        .expect("pack");
        assert_eq!(
            (stats.zero_pages, stats.duplicate_pages, stats.unique_pages),
            (
                zero_pages as u64,
                dup_pages as u64 - 16,
                unique_pages as u64
            ),
            "{codec}"
        );
        assert_eq!(progress.last(), Some(&(raw.len() as u64)));
        assert!(progress.windows(2).all(|w| w[0] < w[1]));
        let file_len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(stats.image_bytes, file_len);
        // The target: image size <= raw size x unique-page fraction x 1.1.
        let budget = raw.len() as f64 * unique_fraction * 1.1;
        assert!(
            (file_len as f64) <= budget,
            "{codec}: image {file_len} bytes > budget {budget:.0} (unique fraction {unique_fraction:.3})"
        );

        let src = ImageSource::open(&path).expect("open");
        assert_eq!(src.len(), raw.len() as u64);
        assert_eq!(src.image().id(), stats.image_id);
        for p in 0..PAGES {
            let mut buf = vec![0xAAu8; PS];
            src.read_at((p * PS) as u64, &mut buf).expect("read");
            assert_eq!(buf, page(&raw, p), "{codec}: page {p}");
            let zero = src.is_zero((p * PS) as u64, PS as u64);
            assert_eq!(zero, Some(kind(p) == Kind::Zero), "{codec}: page {p}");
        }
        // One big read across everything, as readahead does.
        let mut all = vec![0u8; raw.len()];
        src.read_at(0, &mut all).expect("read all");
        assert!(all == raw, "{codec}: the whole image differs");
        let st = src.stats();
        assert_eq!(st.hash_mismatches, 0);
        assert!(st.pages_verified >= unique_pages as u64, "{st:?}");
    }
}

/// The image offset of stored page `p`, and whether its chunk is stored uncompressed.
fn stored_at(image: &Image, p: u64) -> (u64, bool) {
    match image.page(p) {
        Some(PageLoc::Stored { chunk, offset }) => {
            let c = image.chunks()[chunk as usize];
            (c.offset + u64::from(offset), c.is_raw())
        }
        other => panic!("page {p} is not stored: {other:?}"),
    }
}

/// A unique page (stored once, used once) in the middle of the snapshot.
const BAD: usize = 1000;

#[test]
fn a_corrupt_byte_fails_that_page_permanently_and_nothing_else() {
    assert_eq!(kind(BAD), Kind::Unique);
    let raw = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = pack_to(dir.path(), "snap.img", &raw, &PackOptions::default());
    let (at, is_raw) = stored_at(&Image::open(&path).expect("open"), BAD as u64);
    assert!(
        is_raw,
        "unique random pages do not compress: stored as they are"
    );
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[usize::try_from(at).expect("fits usize") + 123] ^= 0x40;
    write_file(&path, &bytes);

    // The header and tables are intact: it opens.
    let src = ImageSource::open(&path).expect("open");
    let mut buf = vec![0u8; PS];
    let e = src
        .read_at((BAD * PS) as u64, &mut buf)
        .expect_err("corrupt page");
    assert_eq!(e.retry, Retry::Permanent);
    assert!(
        e.what
            .starts_with(&format!("page {BAD}: content hash mismatch in chunk ")),
        "{e}"
    );
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // A read spanning it fails too, naming it.
    let mut big = vec![0u8; 64 * PS];
    let e = src
        .read_at(((BAD - 10) * PS) as u64, &mut big)
        .expect_err("spans the corrupt page");
    assert!(e.what.starts_with(&format!("page {BAD}: ")), "{e}");
    // Every other page is served right, its chunk neighbours included.
    for p in (0..PAGES).filter(|&p| p != BAD) {
        src.read_at((p * PS) as u64, &mut buf).expect("other pages");
        assert_eq!(buf, page(&raw, p), "page {p}");
    }
    assert_eq!(src.stats().hash_mismatches, 2);
    // verify() finds exactly it.
    let report = src.image().verify(|_| {});
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    assert_eq!(report.bad[0].0, Some(BAD as u64));
}

#[test]
fn a_corrupt_compressed_chunk_fails_its_pages_and_nothing_else() {
    // Compressible content: every chunk is compressed.
    let raw: Vec<u8> = (0..256 * PS)
        .map(|i| ((i / 16) ^ ((i / PS) * 7)).to_le_bytes()[0])
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    for codec in [Codec::Zstd, Codec::Lz4] {
        let opts = PackOptions {
            codec,
            ..PackOptions::default()
        };
        let path = pack_to(dir.path(), "c.img", &raw, &opts);
        let image = Image::open(&path).expect("open");
        let c = image.chunks()[3];
        assert!(!c.is_raw());
        let mut bytes = std::fs::read(&path).expect("read");
        // Wreck the chunk's frame header: the codec refuses it.
        bytes[usize::try_from(c.offset).expect("fits usize")
            ..usize::try_from(c.offset).expect("fits usize") + 8]
            .fill(0xEE);
        write_file(&path, &bytes);
        let src = ImageSource::open(&path).expect("open");
        let mut buf = vec![0u8; PS];
        for p in 0..256 {
            let r = src.read_at((p * PS) as u64, &mut buf);
            if (96..128).contains(&p) {
                let e = r.expect_err("in the corrupt chunk");
                assert_eq!(e.retry, Retry::Permanent);
                assert!(
                    e.what
                        .starts_with(&format!("page {p}: chunk 3 is corrupt: {codec}")),
                    "{e}"
                );
            } else {
                r.expect("other chunks");
                assert_eq!(buf, page(&raw, p));
            }
        }
    }
}

#[test]
fn a_truncated_image_is_refused_naming_what_is_missing() {
    let raw = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = pack_to(dir.path(), "snap.img", &raw, &PackOptions::default());
    let bytes = std::fs::read(&path).expect("read");
    let header = Image::open(&path).expect("open").header().clone();
    let cases = [
        (
            0,
            "the header ends at byte 256 but the image is 0 bytes long",
        ),
        (
            200,
            "the header ends at byte 256 but the image is 200 bytes long",
        ),
        (4096, "the chunk data ends at byte"),
        (
            usize::try_from(header.index_offset).expect("fits usize") + 8,
            "the page index ends at byte",
        ),
        (
            usize::try_from(header.chunk_table_offset).expect("fits usize") + 1,
            "the chunk table ends at byte",
        ),
        (bytes.len() - 16, "the hash table ends at byte"),
    ];
    for (cut, needle) in cases {
        write_file(&path, &bytes[..cut]);
        let e = ImageSource::open(&path).expect_err("truncated");
        assert!(matches!(e, ImageError::Truncated { .. }), "{cut}: {e:?}");
        assert!(e.to_string().contains(needle), "{cut}: {e}");
    }
    // A corrupt table byte: the tables' hash catches it.
    let mut bad = bytes.clone();
    bad[usize::try_from(header.index_offset).expect("fits usize") + 4] ^= 1;
    write_file(&path, &bad);
    let e = ImageSource::open(&path).expect_err("corrupt index");
    assert!(e.to_string().contains("hash mismatch"), "{e}");
    // Not an image at all.
    write_file(&path, &raw[..PS]);
    assert!(matches!(
        ImageSource::open(&path),
        Err(ImageError::NotAnImage { .. })
    ));
}

/// NEW: the snapshot with some pages changed, some zeroed over non-zero base pages, some
/// non-zero over zero base pages, and one more page at the end.
fn changed(base: &[u8]) -> (Vec<u8>, usize) {
    let mut new = base.to_vec();
    let mut changed = 0;
    for p in (0..PAGES).step_by(97) {
        let page = &mut new[p * PS..(p + 1) * PS];
        match kind(p) {
            Kind::Zero => fill(5000 + p as u64, page),
            Kind::Dup(_) => page.fill(0),
            Kind::Unique => page[17] ^= 1,
        }
        changed += 1;
    }
    let mut extra = vec![0u8; PS];
    fill(77, &mut extra);
    new.extend_from_slice(&extra);
    (new, changed + 1)
}

#[test]
fn a_diff_over_its_base_serves_the_new_memory_exactly() {
    let base_raw = snapshot();
    let (new_raw, changed) = changed(&base_raw);
    let dir = tempfile::tempdir().expect("tempdir");
    let base_path = pack_to(dir.path(), "base.img", &base_raw, &PackOptions::default());
    let base = ImageSource::open(&base_path).expect("open base");
    let diff_path = dir.path().join("new.diff");
    let stats = pack_diff(
        &base,
        &new_raw[..],
        std::fs::File::create(&diff_path).expect("create"),
        &PackOptions::default(),
        Some("base.img".into()),
        |_| {},
    )
    .expect("diff");
    assert_eq!(stats.pages, PAGES as u64 + 1);
    assert_eq!(stats.base_pages, (PAGES + 1 - changed) as u64, "{stats:?}");
    assert_eq!(
        stats.zero_pages + stats.unique_pages + stats.duplicate_pages,
        changed as u64
    );
    // It costs only its changed pages (plus the index).
    let diff_len = std::fs::metadata(&diff_path).expect("stat").len();
    assert!(
        diff_len < (changed * PS + (PAGES + 1) * 8 + 4096) as u64,
        "diff of {changed} pages is {diff_len} bytes"
    );

    // Opened by path: the base is found by the name it records, and checked by id.
    let src = ImageSource::open(&diff_path).expect("open diff");
    assert_eq!(src.base().map(|b| b.image().id()), Some(base.image().id()));
    assert_eq!(src.len(), new_raw.len() as u64);
    let mut all = vec![0u8; new_raw.len()];
    src.read_at(0, &mut all).expect("read");
    assert!(all == new_raw, "the diff does not serve NEW");
    for p in 0..=PAGES {
        let want_zero = page(&new_raw, p).iter().all(|&b| b == 0);
        assert_eq!(
            src.is_zero((p * PS) as u64, PS as u64),
            Some(want_zero),
            "page {p}"
        );
    }
    // Unchanged pages were read from the base, changed ones from the diff.
    assert!(src.base().expect("base").stats().pages_verified > 0);

    // Another base with the same name but other contents is refused.
    let other = snapshot()
        .into_iter()
        .map(|b| b.wrapping_add(1))
        .collect::<Vec<_>>();
    pack_to(dir.path(), "base.img", &other, &PackOptions::default());
    let e = ImageSource::open(&diff_path).expect_err("wrong base");
    assert!(
        e.to_string().contains("is a diff over the image with id"),
        "{e}"
    );
    std::fs::remove_file(&base_path).expect("rm");
    let e = ImageSource::open(&diff_path).expect_err("no base");
    assert!(e.to_string().contains("opening the base"), "{e}");
}

/// A diff and its base opened as files (what a supervisor hands to its workers) keep serving
/// the memory they were opened on after other images are renamed over both paths; the layers
/// are checked by id when the source is built from them.
#[test]
fn a_diff_opened_as_files_serves_those_files_whatever_replaces_their_paths() {
    let base_raw = snapshot();
    let (new_raw, _) = changed(&base_raw);
    let dir = tempfile::tempdir().expect("tempdir");
    let base_path = pack_to(dir.path(), "base.img", &base_raw, &PackOptions::default());
    let base = ImageSource::open(&base_path).expect("open base");
    let diff_path = dir.path().join("new.diff");
    pack_diff(
        &base,
        &new_raw[..],
        std::fs::File::create(&diff_path).expect("create"),
        &PackOptions::default(),
        Some("base.img".into()),
        |_| {},
    )
    .expect("diff");
    let layers = ImageSource::open_layer_files(&diff_path).expect("open the layers");
    assert_eq!(layers.len(), 2);
    // Other images take both names.
    let other: Vec<u8> = base_raw.iter().map(|b| b.wrapping_add(1)).collect();
    let other_path = pack_to(dir.path(), "other.img", &other, &PackOptions::default());
    std::fs::rename(&other_path, &base_path).expect("rename over the base");
    let other_path = pack_to(dir.path(), "other.img", &other, &PackOptions::default());
    std::fs::rename(&other_path, &diff_path).expect("rename over the diff");
    // Handed over as files (dup'ed, as over SCM_RIGHTS) and rebuilt.
    let readers: Vec<Arc<dyn faultline::image::RangeRead>> = layers
        .iter()
        .map(|l| {
            let file = l.file().try_clone().expect("dup");
            let r = faultline::image::FileRange::from_file(file, "handed").expect("from_file");
            Arc::new(r) as Arc<dyn faultline::image::RangeRead>
        })
        .collect();
    let src = ImageSource::from_layers(readers).expect("from the files");
    let mut all = vec![0u8; new_raw.len()];
    src.read_at(0, &mut all).expect("read");
    assert!(
        all == new_raw,
        "the files do not serve the memory they were opened on"
    );
    // Layers out of order are refused by id.
    let swapped: Vec<Arc<dyn faultline::image::RangeRead>> = layers
        .iter()
        .rev()
        .map(|l| Arc::clone(l) as Arc<dyn faultline::image::RangeRead>)
        .collect();
    assert!(ImageSource::from_layers(swapped).is_err());
}

/// Serve `src` into a fresh anonymous mapping through the fault server; touch every page.
fn serve_and_check(src: Arc<ImageSource>, want: &[u8], readahead: Readahead) -> Result<(), String> {
    let uffd = Uffd::new(Features::empty()).map_err(|e| format!("userfaultfd: {e}"))?;
    let m = Mapping::anonymous(want.len()).map_err(|e| format!("mmap: {e}"))?;
    uffd.register(&m, RegisterMode::MISSING)
        .map_err(|e| format!("register: {e}"))?;
    let server = Server::start(ServerConfig {
        workers: 2,
        readahead,
        ..ServerConfig::default()
    })
    .map_err(|e| format!("server: {e}"))?;
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(&m, src)],
            SessionOptions::default(),
        )
        .map_err(|e| format!("session: {e}"))?;
    let mut got = vec![0u8; PS];
    for p in 0..want.len() / PS {
        m.read(p * PS, &mut got)
            .map_err(|e| format!("read {p}: {e}"))?;
        if got != page(want, p) {
            return Err(format!("page {p} has wrong bytes"));
        }
    }
    let st = session.stats();
    server.shutdown();
    if st.poisoned_pages != 0 || st.source_errors != 0 {
        return Err(format!("nothing may fail: {st:?}"));
    }
    if st.zero_pages == 0 {
        return Err(format!("zero pages are resolved with ZEROPAGE: {st:?}"));
    }
    Ok(())
}

#[test]
fn served_through_the_fault_server_every_byte_is_right() {
    let raw = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = pack_to(dir.path(), "snap.img", &raw, &PackOptions::default());
    let src = Arc::new(ImageSource::open(&path).expect("open"));
    within(LIMIT, move || {
        serve_and_check(
            src,
            &raw,
            Readahead::Adaptive {
                min_pages: 1,
                max_pages: 64,
            },
        )
    })
    .expect("served");

    // A diff, served the same way.
    let base_raw = snapshot();
    let (new_raw, _) = changed(&base_raw);
    let base = ImageSource::open(&path).expect("open");
    let diff_path = dir.path().join("new.diff");
    pack_diff(
        &base,
        &new_raw[..],
        std::fs::File::create(&diff_path).expect("create"),
        &PackOptions::default(),
        Some("snap.img".into()),
        |_| {},
    )
    .expect("diff");
    let src = Arc::new(ImageSource::open(&diff_path).expect("open diff"));
    within(LIMIT, move || {
        serve_and_check(src, &new_raw, Readahead::Off)
    })
    .expect("served diff");
}

#[test]
fn a_corrupt_page_is_poisoned_and_only_it_raises_sigbus() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    let raw = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = pack_to(dir.path(), "snap.img", &raw, &PackOptions::default());
    let (at, _) = stored_at(&Image::open(&path).expect("open"), BAD as u64);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[usize::try_from(at).expect("fits usize") + 7] ^= 0x01;
    write_file(&path, &bytes);

    let exit = within(LIMIT, move || {
        in_child(move || {
            let run = || -> Result<(), String> {
                let src = Arc::new(ImageSource::open(&path).map_err(|e| format!("open: {e}"))?);
                let uffd = Uffd::new(Features::POISON).map_err(|e| format!("userfaultfd: {e}"))?;
                let m = Mapping::anonymous(raw.len()).map_err(|e| format!("mmap: {e}"))?;
                uffd.register(&m, RegisterMode::MISSING)
                    .map_err(|e| format!("register: {e}"))?;
                // 16-page readahead windows: the window with the bad page fails as a whole, is
                // retried a page at a time, and only the bad page is poisoned.
                let server = Server::start(ServerConfig {
                    workers: 2,
                    readahead: Readahead::Fixed { pages: 16 },
                    retry_backoff: Duration::from_micros(200),
                    ..ServerConfig::default()
                })
                .map_err(|e| format!("server: {e}"))?;
                let session = server
                    .add_session(
                        uffd,
                        vec![Region::for_mapping(&m, src.clone())],
                        SessionOptions::default(),
                    )
                    .map_err(|e| format!("session: {e}"))?;
                let mut got = vec![0u8; PS];
                for p in (0..PAGES).filter(|&p| p != BAD) {
                    m.read(p * PS, &mut got)
                        .map_err(|e| format!("read {p}: {e}"))?;
                    if got != page(&raw, p) {
                        return Err(format!("page {p} has wrong bytes"));
                    }
                }
                // Every page but the bad one is present, and the bad one poisoned, once the
                // window holding it was resolved.
                let others: Vec<u64> = (0..PAGES)
                    .filter(|&p| p != BAD)
                    .map(|p| (p * PS) as u64)
                    .collect();
                let deadline = Instant::now() + LIMIT;
                while !session.offsets_present(&others) || session.stats().poisoned_pages == 0 {
                    if Instant::now() >= deadline {
                        return Err(format!("never settled: {:?}", session.stats()));
                    }
                    std::thread::yield_now();
                }
                let st = session.stats();
                if st.poisoned_pages != 1 || st.source_retries != 0 {
                    return Err(format!(
                        "one page poisoned, a permanent error not retried: {st:?}"
                    ));
                }
                if src.stats().hash_mismatches == 0 {
                    return Err("the mismatch was not counted".into());
                }
                // Dies here of SIGBUS.
                let _ = m.read_u8(BAD * PS + 5);
                Err(format!("page {BAD} was readable; stats {st:?}"))
            };
            match run() {
                Ok(()) => 0,
                Err(why) => {
                    let _ = std::io::stderr().write_all(format!("child: {why}\n").as_bytes());
                    1
                }
            }
        })
    });
    assert_eq!(
        exit,
        ChildExit::Signal(libc::SIGBUS),
        "the client must die of SIGBUS on page {BAD}"
    );
}

/// Writes the seed corpus of the `image` fuzz target (`fuzz/corpus/image/seed-*`) with the real
/// writer: small images of every codec, a short last page, a diff, and damaged ones. Run by hand:
/// `cargo test -p faultline --test image -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/corpus/image; run by hand to regenerate the seeds"]
fn write_fuzz_seeds() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/image");
    std::fs::create_dir_all(&out).expect("mkdir");
    // Eight compressible pages: zero, pattern, a copy, zero, two more patterns, a copy, zero.
    let mut raw = vec![0u8; 8 * PS];
    for (p, seed) in [(1usize, 1u8), (2, 1), (4, 2), (5, 3), (6, 2)] {
        for (i, b) in raw[p * PS..(p + 1) * PS].iter_mut().enumerate() {
            *b = (i / 64).to_le_bytes()[0] ^ seed;
        }
    }
    let hashed = |raw: &[u8], codec: Codec, chunk_pages: u32, hash: HashAlg| {
        let mut c = std::io::Cursor::new(Vec::new());
        let opts = PackOptions {
            codec,
            chunk_pages,
            hash,
            ..PackOptions::default()
        };
        pack(raw, &mut c, &opts, |_| {}).expect("pack");
        c.into_inner()
    };
    let image = |raw: &[u8], codec: Codec, chunk_pages: u32| {
        hashed(raw, codec, chunk_pages, HashAlg::Blake3)
    };
    let zstd = image(&raw, Codec::Zstd, 2);
    let mut seeds = vec![
        ("zstd", zstd.clone()),
        ("lz4", image(&raw, Codec::Lz4, 2)),
        ("none-one-page", image(&raw[..2 * PS], Codec::None, 1)),
        (
            "short-last-page",
            image(&raw[..3 * PS + 100], Codec::Zstd, 4),
        ),
        ("empty", image(&[], Codec::Zstd, 32)),
        ("all-zero", image(&vec![0u8; 16 * PS], Codec::Zstd, 32)),
        ("xxh3-lz4", hashed(&raw, Codec::Lz4, 2, HashAlg::Xxh3)),
        (
            "xxh3-none-one-page",
            hashed(&raw[..2 * PS], Codec::None, 1, HashAlg::Xxh3),
        ),
    ];
    // A diff over the zstd image.
    let base = ImageSource::new(Image::from_reader(Arc::new(zstd.clone())).expect("open"))
        .expect("source");
    let mut new = raw.clone();
    new[PS..2 * PS].fill(0);
    new[3 * PS] = 9;
    let mut c = std::io::Cursor::new(Vec::new());
    pack_diff(
        &base,
        &new[..],
        &mut c,
        &PackOptions::default(),
        Some("base.img".into()),
        |_| {},
    )
    .expect("diff");
    seeds.push(("diff", c.into_inner()));
    // Damaged: a chunk byte flipped (tables intact), and cut inside the tables.
    let im = Image::from_reader(Arc::new(zstd.clone())).expect("open");
    let c0 = im.chunks()[0];
    let mut flipped = zstd.clone();
    flipped[usize::try_from(c0.offset + u64::from(c0.stored_len) / 2).expect("fits usize")] ^= 0x20;
    seeds.push(("chunk-flipped", flipped));
    seeds.push(("truncated", zstd[..zstd.len() - 20].to_vec()));
    for (name, bytes) in seeds {
        std::fs::write(out.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}
