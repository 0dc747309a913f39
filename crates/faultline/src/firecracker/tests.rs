//! The protocol's unit tests: parsing, framing, validation, and handshakes over real sockets.

use super::handshake::{receive_with, RECV_CHUNK, UFFD_LINK};
use super::*;
use faultline_uffd::{Features, Uffd};
use proptest::prelude::*;
use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::io::Errno;
use rustix::io::{fcntl_getfd, FdFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

const BASE: u64 = 0x7f00_0000_0000;
const MIB: u64 = 1 << 20;

/// A Firecracker-like layout: regions back to back in the file, a hole in the address space.
fn layout(page_size: u64) -> Vec<GuestRegionUffdMapping> {
    vec![
        GuestRegionUffdMapping::new(BASE, 4 * page_size, 0, page_size),
        GuestRegionUffdMapping::new(BASE + 64 * MIB, 8 * page_size, 4 * page_size, page_size),
    ]
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(5),
        ..Limits::default()
    }
}

fn err(result: Result<Vec<ValidatedRegion>, HandshakeError>) -> HandshakeError {
    result.expect_err("validation must fail")
}

fn check(mappings: &[GuestRegionUffdMapping]) -> Result<Vec<ValidatedRegion>, HandshakeError> {
    validate(mappings, 1 << 40, &limits())
}

fn parse_err(json: &str) -> HandshakeError {
    parse_mappings(json.as_bytes()).expect_err("parsing must fail")
}

// ---- parsing ----

#[test]
fn every_json_shape_is_accepted() {
    let no_page_size = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728,
        "offset": 0}]"#;
    let kib = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
        "page_size_kib": 2097152}]"#;
    let both = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
        "page_size": 2097152, "page_size_kib": 2097152}]"#;
    let only = r#"[{"base_host_virt_addr": 139637976727552, "size": 134217728, "offset": 0,
        "page_size": 2097152}]"#;
    for (json, shape, page_size) in [
        (no_page_size, JsonShape::NoPageSize, PAGE_SIZE_4K),
        (kib, JsonShape::PageSizeKib, PAGE_SIZE_2M),
        (both, JsonShape::Both, PAGE_SIZE_2M),
        (only, JsonShape::PageSizeOnly, PAGE_SIZE_2M),
    ] {
        let mappings = parse_mappings(json.as_bytes()).unwrap();
        assert_eq!(mappings.len(), 1);
        assert_eq!(mappings[0].shape(), shape);
        // serde's derive agrees with the hand-written parser.
        let derived: Vec<GuestRegionUffdMapping> = serde_json::from_str(json).unwrap();
        assert_eq!(derived, mappings);
        let regions = check(&mappings).unwrap();
        assert_eq!(
            regions,
            vec![ValidatedRegion {
                start: 139637976727552,
                len: 134217728,
                page_size,
                offset: 0
            }]
        );
    }
}

#[test]
fn unknown_fields_and_null_optionals_are_ignored() {
    let json = r#" [{"base_host_virt_addr": 4096, "size": 8192, "offset": 4096,
        "gpa_start": 0, "future": {"nested": [1, "]"]}, "page_size": null,
        "page_size_kib": 4096}] "#;
    let mappings = parse_mappings(json.as_bytes()).unwrap();
    assert_eq!(
        mappings,
        vec![GuestRegionUffdMapping {
            base_host_virt_addr: 4096,
            size: 8192,
            offset: 4096,
            page_size: None,
            page_size_kib: Some(4096),
        }]
    );
}

#[test]
fn wrong_types_name_the_region_and_field() {
    let e = parse_err(
        r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0},
            {"base_host_virt_addr": 8192, "size": "big", "offset": 4096}]"#,
    );
    assert!(
        matches!(&e, HandshakeError::BadField { index: 1, field: "size", found } if found == "\"big\""),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "region 1: field `size` must be an unsigned 64-bit integer, found \"big\""
    );
    for (json, field) in [
        (
            r#"[{"base_host_virt_addr": -4096, "size": 4096, "offset": 0}]"#,
            "base_host_virt_addr",
        ),
        (
            r#"[{"base_host_virt_addr": 0, "size": 4096.0, "offset": 0}]"#,
            "size",
        ),
        (
            r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 18446744073709551616}]"#,
            "offset",
        ),
        (
            r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": "4k"}]"#,
            "page_size",
        ),
        (
            r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size_kib": [4]}]"#,
            "page_size_kib",
        ),
        (
            r#"[{"base_host_virt_addr": null, "size": 4096, "offset": 0}]"#,
            "base_host_virt_addr",
        ),
    ] {
        match parse_err(json) {
            HandshakeError::BadField {
                index: 0, field: f, ..
            } => assert_eq!(f, field, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
    assert!(matches!(
        parse_err(r#"[{"base_host_virt_addr": 0, "offset": 0}]"#),
        HandshakeError::MissingField {
            index: 0,
            field: "size"
        }
    ));
    assert!(matches!(
        parse_err(r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0}, 7]"#),
        HandshakeError::NotAnObject {
            index: 1,
            found: "a number"
        }
    ));
}

#[test]
fn long_bad_values_are_shortened() {
    let long = "x".repeat(10_000);
    let json = format!(r#"[{{"base_host_virt_addr": "{long}", "size": 1, "offset": 0}}]"#);
    let HandshakeError::BadField { found, .. } = parse_err(&json) else {
        panic!("expected BadField")
    };
    assert!(found.len() < 80, "{found}");
    assert!(found.ends_with("..."));
}

#[test]
fn not_json_not_an_array_and_empty() {
    let e = parse_err(r#"[{"size": 4096,]"#);
    assert!(
        matches!(e, HandshakeError::BadJson { line: 1, .. }),
        "{e:?}"
    );
    assert!(matches!(parse_err(""), HandshakeError::BadJson { .. }));
    assert!(
        matches!(parse_err("[] x"), HandshakeError::BadJson { .. }),
        "trailing bytes"
    );
    assert!(matches!(
        parse_err(r#"{"regions": []}"#),
        HandshakeError::NotAnArray { found: "an object" }
    ));
    assert!(matches!(
        parse_err("\"[]\""),
        HandshakeError::NotAnArray { found: "a string" }
    ));
    assert!(matches!(
        check(&parse_mappings(b" [ ] \n").unwrap()),
        Err(HandshakeError::Empty)
    ));
}

// ---- validation ----

#[test]
fn valid_layouts_pass_in_client_order() {
    for page_size in [PAGE_SIZE_4K, PAGE_SIZE_2M] {
        let mut mappings = layout(page_size);
        mappings.reverse();
        let regions = check(&mappings).unwrap();
        assert_eq!(regions[0].start, BASE + 64 * MIB);
        assert_eq!(regions[0].offset, 4 * page_size);
        assert_eq!(regions[1].len, 4 * page_size);
        assert!(regions.iter().all(|r| r.page_size == page_size));
        // Exactly filling the file is fine.
        validate(&mappings, 12 * page_size, &limits()).unwrap();
    }
}

#[test]
fn zero_size_is_refused() {
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[1].size = 0;
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::ZeroSize { index: 1 }
    ));
}

#[test]
fn unaligned_base_size_and_offset_are_refused() {
    for field in ["base_host_virt_addr", "size", "offset"] {
        let mut mappings = layout(PAGE_SIZE_4K);
        match field {
            "base_host_virt_addr" => mappings[1].base_host_virt_addr += 512,
            "size" => mappings[1].size += 512,
            _ => mappings[1].offset += 512,
        }
        match err(check(&mappings)) {
            HandshakeError::Unaligned {
                index: 1,
                field: f,
                page_size: 4096,
                ..
            } => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // 4 KiB-aligned is not enough for a 2 MiB region.
    let mut mappings = layout(PAGE_SIZE_2M);
    mappings[0].base_host_virt_addr += PAGE_SIZE_4K;
    let e = err(check(&mappings));
    assert!(
        matches!(
            e,
            HandshakeError::Unaligned {
                index: 0,
                field: "base_host_virt_addr",
                page_size: PAGE_SIZE_2M,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("0x7f0000001000"), "{e}");
}

#[test]
fn odd_and_disagreeing_page_sizes_are_refused() {
    for odd in [0, 1, 1024, 8192, 1 << 30] {
        let mut mappings = layout(PAGE_SIZE_4K);
        mappings[0].page_size = Some(odd);
        mappings[0].page_size_kib = None;
        assert!(
            matches!(err(check(&mappings)), HandshakeError::UnsupportedPageSize { index: 0, page_size } if page_size == odd),
            "{odd}"
        );
    }
    // v1.7-era clients that meant KiB (4) would be refused, not silently mis-sized.
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[1].page_size = None;
    mappings[1].page_size_kib = Some(4);
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::UnsupportedPageSize {
            index: 1,
            page_size: 4
        }
    ));
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[1].page_size_kib = Some(PAGE_SIZE_2M);
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::PageSizeMismatch {
            index: 1,
            page_size: 4096,
            page_size_kib: PAGE_SIZE_2M
        }
    ));
}

#[test]
fn mixed_page_sizes_are_refused() {
    let mut mappings = layout(PAGE_SIZE_2M);
    mappings[1] = GuestRegionUffdMapping::new(BASE + 64 * MIB, 4096, 8 * PAGE_SIZE_2M, 4096);
    let e = err(check(&mappings));
    assert!(
        matches!(
            e,
            HandshakeError::MixedPageSizes {
                index: 1,
                page_size: 4096,
                first: PAGE_SIZE_2M
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("one page size"));
}

#[test]
fn overflows_are_refused() {
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[1].offset = !4095u64;
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::Overflow {
            index: 1,
            field: "offset",
            ..
        }
    ));
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[0].base_host_virt_addr = !4095u64;
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::Overflow {
            index: 0,
            field: "base_host_virt_addr",
            ..
        }
    ));
    // Not aligned comes first for u64::MAX itself.
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings[0].offset = u64::MAX;
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::Unaligned {
            index: 0,
            field: "offset",
            ..
        }
    ));
}

#[test]
fn regions_beyond_the_file_are_refused() {
    let mappings = layout(PAGE_SIZE_4K);
    let e = err(validate(&mappings, 12 * 4096 - 4096, &limits()));
    assert!(
        matches!(
            e,
            HandshakeError::BeyondFile {
                index: 1,
                offset: 16384,
                size: 32768,
                mem_len: 45056
            }
        ),
        "{e:?}"
    );
}

#[test]
fn overlapping_regions_are_refused() {
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings.push(GuestRegionUffdMapping::new(BASE + 3 * 4096, 4096, 0, 4096));
    let e = err(check(&mappings));
    assert!(
        matches!(
            e,
            HandshakeError::Overlap { first: 0, first_start: BASE, second: 2, second_start, .. }
                if second_start == BASE + 3 * 4096
        ),
        "{e:?}"
    );
    // Touching is not overlapping; an identical duplicate is.
    let mut mappings = layout(PAGE_SIZE_4K);
    mappings.push(GuestRegionUffdMapping::new(BASE + 4 * 4096, 4096, 0, 4096));
    check(&mappings).unwrap();
    mappings.push(mappings[1]);
    assert!(matches!(
        err(check(&mappings)),
        HandshakeError::Overlap { .. }
    ));
}

#[test]
fn too_many_regions_are_refused() {
    let mappings: Vec<_> = (0..5)
        .map(|i| GuestRegionUffdMapping::new(BASE + i * 4096, 4096, i * 4096, 4096))
        .collect();
    let tight = Limits {
        max_regions: 4,
        ..limits()
    };
    assert!(matches!(
        validate(&mappings, u64::MAX, &tight),
        Err(HandshakeError::TooManyRegions { count: 5, limit: 4 })
    ));
    validate(&mappings[..4], u64::MAX, &tight).unwrap();
    assert!(matches!(
        validate(&[], u64::MAX, &tight),
        Err(HandshakeError::Empty)
    ));
}

#[test]
fn client_errors_are_classified() {
    assert!(HandshakeError::NoFd.is_client_error());
    assert!(HandshakeError::Timeout {
        timeout: Duration::ZERO,
        received: 0
    }
    .is_client_error());
    assert!(!HandshakeError::io("recvmsg", Errno::BADF).is_client_error());
}

// ---- framing ----

#[test]
fn framer_finds_the_end_across_splits_and_strings() {
    let json = br#" [{"a": "]}\"[", "b": [1, {"c": []}]}] "#;
    let end = json.len() - 1;
    for split in 0..json.len() {
        let mut framer = JsonFramer::new();
        let first = framer.feed(&json[..split]);
        let second = framer.feed(&json[split..]);
        if split >= end {
            assert_eq!(first, Framing::Complete { len: end }, "split {split}");
        } else {
            assert_eq!(first, Framing::NeedMore, "split {split}");
        }
        assert_eq!(second, Framing::Complete { len: end }, "split {split}");
    }
    assert_eq!(JsonFramer::new().feed(b"  {\"a\": 1}"), Framing::NotAnArray);
    assert_eq!(JsonFramer::new().feed(b"\n\t"), Framing::NeedMore);
}

// ---- the socket ----

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().unwrap()
}

fn uffd() -> Uffd {
    Uffd::new(Features::empty()).unwrap()
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (a, b) = (rustix::fs::fstat(a).unwrap(), rustix::fs::fstat(b).unwrap());
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

fn assert_is_our_uffd(handshake: &Handshake, uffd: &Uffd) {
    assert!(same_file(handshake.uffd.as_fd(), uffd.as_fd()));
    // A new descriptor (not our own number), close-on-exec.
    assert_ne!(handshake.uffd.as_raw_fd(), uffd.as_raw_fd());
    assert!(fcntl_getfd(&handshake.uffd)
        .unwrap()
        .contains(FdFlags::CLOEXEC));
    let link = std::fs::read_link(format!("/proc/self/fd/{}", handshake.uffd.as_raw_fd())).unwrap();
    assert_eq!(link.to_str(), Some(UFFD_LINK));
}

fn me() -> PeerCred {
    use rustix::process::{getegid, geteuid, getpid};
    PeerCred {
        pid: getpid().as_raw_nonzero().get(),
        uid: geteuid().as_raw(),
        gid: getegid().as_raw(),
    }
}

#[test]
fn round_trip_with_the_uffd_in_every_shape() {
    let uffd = uffd();
    for shape in JsonShape::ALL {
        let (client, server) = pair();
        send_handshake(&client, &layout(PAGE_SIZE_4K), uffd.as_fd(), None, shape).unwrap();
        let handshake = receive_handshake(&server, &limits()).unwrap();
        assert_eq!(
            handshake.mappings,
            check(&layout(PAGE_SIZE_4K)).unwrap(),
            "{shape:?}"
        );
        assert_is_our_uffd(&handshake, &uffd);
        assert!(handshake.mem_fd.is_none());
        assert_eq!(handshake.peer, me());
    }
}

fn memfd(len: u64) -> OwnedFd {
    let fd = memfd_create("guest-memory", MemfdFlags::CLOEXEC).unwrap();
    ftruncate(&fd, len).unwrap();
    fd
}

#[test]
fn round_trip_with_a_memory_fd_in_either_order() {
    let uffd = uffd();
    let mem = memfd(12 * PAGE_SIZE_2M);
    let (client, server) = pair();
    let mappings = layout(PAGE_SIZE_2M);
    send_handshake(
        &client,
        &mappings,
        uffd.as_fd(),
        Some(mem.as_fd()),
        JsonShape::PageSizeKib,
    )
    .unwrap();
    let handshake = receive_handshake(&server, &limits()).unwrap();
    assert_is_our_uffd(&handshake, &uffd);
    let got = handshake.mem_fd.as_ref().unwrap();
    assert!(same_file(got.as_fd(), mem.as_fd()));
    assert!(fcntl_getfd(got).unwrap().contains(FdFlags::CLOEXEC));
    assert!(handshake
        .mappings
        .iter()
        .all(|r| r.page_size == PAGE_SIZE_2M));

    // A fork that sends [memfd, uffd]: the userfaultfd is recognised.
    let json = encode_mappings(&mappings, JsonShape::Both);
    send_with_fds(&client, &json, &[mem.as_fd(), uffd.as_fd()], usize::MAX).unwrap();
    let handshake = receive_handshake(&server, &limits()).unwrap();
    assert_is_our_uffd(&handshake, &uffd);
    assert!(same_file(
        handshake.mem_fd.as_ref().unwrap().as_fd(),
        mem.as_fd()
    ));
}

#[test]
fn regions_must_fit_the_attached_memory_fd() {
    let uffd = uffd();
    let mem = memfd(11 * PAGE_SIZE_4K); // the layout needs 12 pages
    let (client, server) = pair();
    send_handshake(
        &client,
        &layout(PAGE_SIZE_4K),
        uffd.as_fd(),
        Some(mem.as_fd()),
        JsonShape::Both,
    )
    .unwrap();
    let e = receive_handshake(&server, &limits()).unwrap_err();
    assert!(
        matches!(e, HandshakeError::BeyondFile { index: 1, mem_len, .. } if mem_len == 11 * 4096),
        "{e:?}"
    );
    // And the configured file length bounds it too.
    send_handshake(
        &client,
        &layout(PAGE_SIZE_4K),
        uffd.as_fd(),
        None,
        JsonShape::Both,
    )
    .unwrap();
    let small = Limits {
        mem_len: Some(4 * 4096),
        ..limits()
    };
    assert!(matches!(
        receive_handshake(&server, &small),
        Err(HandshakeError::BeyondFile {
            index: 1,
            mem_len: 16384,
            ..
        })
    ));
}

#[test]
fn chunked_message_is_reassembled() {
    let uffd = uffd();
    let mem = memfd(MIB);
    let (client, server) = pair();
    let mappings = layout(PAGE_SIZE_4K);
    let json_len = encode_mappings(&mappings, JsonShape::Both).len();
    let sender = thread::spawn(move || {
        send_handshake_chunked(
            &client,
            &mappings,
            uffd.as_fd(),
            Some(mem.as_fd()),
            JsonShape::Both,
            7,
        )
        .unwrap();
        (client, uffd)
    });
    // Read 7 bytes at a time, so reassembly runs however the kernel coalesces the writes.
    let (handshake, recvs) = receive_with(&server, &limits(), 7).unwrap();
    let (_client, uffd) = sender.join().unwrap();
    assert_eq!(recvs, json_len.div_ceil(7));
    assert_eq!(handshake.mappings, check(&layout(PAGE_SIZE_4K)).unwrap());
    assert_is_our_uffd(&handshake, &uffd);
    assert!(handshake.mem_fd.is_some());
}

fn many(count: u64) -> Vec<GuestRegionUffdMapping> {
    (0..count)
        .map(|i| GuestRegionUffdMapping::new(BASE + i * 2 * 4096, 4096, i * 4096, 4096))
        .collect()
}

#[test]
fn message_larger_than_one_recv_is_reassembled() {
    let uffd = uffd();
    let mappings = many(3000);
    let json_len = encode_mappings(&mappings, JsonShape::Both).len();
    assert!(json_len > RECV_CHUNK, "{json_len}");
    let (client, server) = pair();
    let sender = {
        let mappings = mappings.clone();
        thread::spawn(move || {
            send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
            (client, uffd)
        })
    };
    let roomy = Limits {
        max_regions: 3000,
        ..limits()
    };
    let (handshake, recvs) = receive_with(&server, &roomy, RECV_CHUNK).unwrap();
    let (_client, uffd) = sender.join().unwrap();
    assert!(recvs >= json_len.div_ceil(RECV_CHUNK), "{recvs} recvs");
    assert_eq!(handshake.mappings.len(), 3000);
    assert_eq!(handshake.mappings[2999].start, BASE + 2999 * 2 * 4096);
    assert_eq!(handshake.mappings[2999].offset, 2999 * 4096);
    assert_is_our_uffd(&handshake, &uffd);
    // The default limit refuses that many regions.
    let (client, server) = pair();
    let sender = thread::spawn(move || {
        send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
        client
    });
    assert!(matches!(
        receive_handshake(&server, &limits()),
        Err(HandshakeError::TooManyRegions {
            count: 3000,
            limit: 1024
        })
    ));
    drop(sender.join().unwrap());
}

#[test]
fn message_without_fd_is_refused() {
    let (client, server) = pair();
    let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    send_with_fds(&client, &json, &[], usize::MAX).unwrap();
    assert!(matches!(
        receive_handshake(&server, &limits()),
        Err(HandshakeError::NoFd)
    ));
}

#[test]
fn three_fds_are_refused_and_closed() {
    let uffd = uffd();
    let (a, b) = (memfd(4096), memfd(4096));
    let (client, server) = pair();
    let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    send_with_fds(
        &client,
        &json,
        &[uffd.as_fd(), a.as_fd(), b.as_fd()],
        usize::MAX,
    )
    .unwrap();
    let e = receive_handshake(&server, &limits()).unwrap_err();
    assert!(
        matches!(
            e,
            HandshakeError::TooManyFds {
                count: 3,
                truncated: false
            }
        ),
        "{e:?}"
    );
    assert!(e.is_client_error());
    assert!(e.to_string().contains("3 file descriptors"), "{e}");
    // The received copies were closed: only our own descriptor of `b` is left. (Other tests
    // open fds concurrently, so look for this memfd rather than counting all fds.)
    let b_stat = rustix::fs::fstat(&b).unwrap();
    let open = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::metadata(entry.ok()?.path()).ok())
        .filter(|meta| (meta.dev(), meta.ino()) == (b_stat.st_dev, b_stat.st_ino))
        .count();
    assert_eq!(open, 1, "a received copy of the memfd is still open");
}

#[test]
fn a_single_fd_must_be_a_userfaultfd() {
    let mem = memfd(MIB);
    let (client, server) = pair();
    send_handshake(
        &client,
        &layout(PAGE_SIZE_4K),
        mem.as_fd(),
        None,
        JsonShape::Both,
    )
    .unwrap();
    let e = receive_handshake(&server, &limits()).unwrap_err();
    assert!(
        matches!(&e, HandshakeError::NotAUserfaultfd { found } if found.starts_with("/memfd:guest-memory")),
        "{e:?}"
    );
}

#[test]
fn silent_client_times_out() {
    let (_client, server) = pair();
    let quick = Limits {
        timeout: Duration::from_millis(100),
        ..limits()
    };
    let start = Instant::now();
    let e = receive_handshake(&server, &quick).unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(e, HandshakeError::Timeout { received: 0, .. }),
        "{e:?}"
    );
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

#[test]
fn slow_client_hits_the_total_deadline() {
    // Half a message, then silence: the deadline covers the whole handshake, not each read.
    let uffd = uffd();
    let (client, server) = pair();
    let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    send_with_fds(&client, &json[..20], &[uffd.as_fd()], usize::MAX).unwrap();
    let quick = Limits {
        timeout: Duration::from_millis(100),
        ..limits()
    };
    assert!(matches!(
        receive_handshake(&server, &quick),
        Err(HandshakeError::Timeout { received: 20, .. })
    ));
}

#[test]
fn client_closing_mid_json_is_closed() {
    let uffd = uffd();
    let (client, server) = pair();
    let json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    send_with_fds(&client, &json[..json.len() - 3], &[uffd.as_fd()], 5).unwrap();
    drop(client);
    let e = receive_handshake(&server, &limits()).unwrap_err();
    assert!(
        matches!(e, HandshakeError::Closed { received } if received == json.len() - 3),
        "{e:?}"
    );
}

#[test]
fn oversized_message_is_refused() {
    let uffd = uffd();
    let (client, server) = pair();
    let mappings = many(100);
    let json_len = encode_mappings(&mappings, JsonShape::Both).len();
    let small = Limits {
        max_message: 1000,
        ..limits()
    };
    assert!(json_len > 1000);
    send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
    assert!(matches!(
        receive_handshake(&server, &small),
        Err(HandshakeError::MessageTooLarge { limit: 1000 })
    ));
    // A message of exactly the limit passes.
    let (client, server) = pair();
    send_handshake(&client, &mappings, uffd.as_fd(), None, JsonShape::Both).unwrap();
    let exact = Limits {
        max_message: json_len,
        ..limits()
    };
    assert_eq!(
        receive_handshake(&server, &exact).unwrap().mappings.len(),
        100
    );
}

#[test]
fn garbage_and_trailing_bytes_are_refused() {
    let uffd = uffd();
    let (client, server) = pair();
    send_with_fds(&client, b"hello", &[uffd.as_fd()], usize::MAX).unwrap();
    assert!(matches!(
        receive_handshake(&server, &limits()),
        Err(HandshakeError::BadJson { .. })
    ));
    let (client, server) = pair();
    send_with_fds(
        &client,
        br#"{"not": "an array"}"#,
        &[uffd.as_fd()],
        usize::MAX,
    )
    .unwrap();
    // One write arrives in one read: the whole object is there to be named.
    assert!(matches!(
        receive_handshake(&server, &limits()),
        Err(HandshakeError::NotAnArray { found: "an object" })
    ));
    let (client, server) = pair();
    let mut json = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    json.extend_from_slice(b"\n");
    send_with_fds(&client, &json, &[uffd.as_fd()], usize::MAX).unwrap();
    receive_handshake(&server, &limits()).unwrap();
    let (client, server) = pair();
    json.extend_from_slice(b"[]");
    send_with_fds(&client, &json, &[uffd.as_fd()], usize::MAX).unwrap();
    assert!(matches!(
        receive_handshake(&server, &limits()),
        Err(HandshakeError::BadJson { .. })
    ));
}

// ---- properties ----

fn arb_layout() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
    // (page size, [(gap before in pages, size in pages)])
    (
        prop_oneof![Just(PAGE_SIZE_4K), Just(PAGE_SIZE_2M)],
        prop::collection::vec((0u64..1000, 1u64..100), 1..40),
    )
}

fn build(page_size: u64, parts: &[(u64, u64)]) -> Vec<GuestRegionUffdMapping> {
    let (mut addr, mut offset) = (BASE, 0);
    parts
        .iter()
        .map(|&(gap, pages)| {
            addr += gap * page_size;
            let mapping = GuestRegionUffdMapping::new(addr, pages * page_size, offset, page_size);
            addr += pages * page_size;
            offset += pages * page_size;
            mapping
        })
        .collect()
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(mappings) = parse_mappings(&bytes) {
            let _ = validate(&mappings, u64::MAX, &Limits::default());
        }
        let mut framer = JsonFramer::new();
        for piece in bytes.chunks(3) {
            framer.feed(piece);
        }
    }

    #[test]
    fn random_near_json_never_panics(
        parts in prop::collection::vec(prop_oneof![
            Just("[".to_string()), Just("]".to_string()), Just("{".to_string()),
            Just("}".to_string()), Just(",".to_string()), Just(":".to_string()),
            Just("\"size\"".to_string()), Just("\"offset\"".to_string()),
            Just("\"base_host_virt_addr\"".to_string()), Just("\"page_size\"".to_string()),
            Just("\"page_size_kib\"".to_string()), Just("null".to_string()),
            any::<u64>().prop_map(|n| n.to_string()), Just("-1".to_string()),
        ], 0..40)
    ) {
        let json = parts.concat();
        if let Ok(mappings) = parse_mappings(json.as_bytes()) {
            let _ = validate(&mappings, u64::MAX, &Limits::default());
            // When serde's derive accepts it, it reads the same mappings.
            if let Ok(derived) = serde_json::from_str::<Vec<GuestRegionUffdMapping>>(&json) {
                prop_assert_eq!(derived, mappings);
            }
        }
    }

    #[test]
    fn valid_layouts_round_trip(
        (page_size, parts) in arb_layout(),
        shape_index in 0usize..4,
        split in any::<prop::sample::Index>(),
    ) {
        let shape = JsonShape::ALL[shape_index];
        let mappings = build(page_size, &parts);
        let json = encode_mappings(&mappings, shape);
        let parsed = parse_mappings(&json).unwrap();
        prop_assert!(parsed.iter().all(|m| m.shape() == shape));
        let file_len: u64 = parts.iter().map(|&(_, pages)| pages * page_size).sum();
        let regions = validate(&parsed, file_len, &Limits::default()).unwrap();
        prop_assert_eq!(regions.len(), mappings.len());
        for (region, mapping) in regions.iter().zip(&mappings) {
            prop_assert_eq!(region.start, mapping.base_host_virt_addr);
            prop_assert_eq!(region.len, mapping.size);
            prop_assert_eq!(region.offset, mapping.offset);
            // Before v1.7 there is no page size on the wire: 4096 is assumed.
            let expected = if shape == JsonShape::NoPageSize { PAGE_SIZE_4K } else { page_size };
            prop_assert_eq!(region.page_size, expected);
        }
        // The framer finds the end wherever the message is split.
        let at = split.index(json.len());
        let mut framer = JsonFramer::new();
        let first = framer.feed(&json[..at]);
        prop_assert_eq!(first, Framing::NeedMore);
        prop_assert_eq!(framer.feed(&json[at..]), Framing::Complete { len: json.len() });
    }
}

#[test]
fn a_whole_handshake_waiting_is_seen_without_consuming_it() {
    let grace = std::time::Duration::from_millis(10);
    let uffd = uffd();
    // Nothing sent yet: not waiting (after the grace).
    let (client, server) = pair();
    assert!(!handshake_waiting(&server, 1 << 20, grace));
    // Half a message: not waiting.
    let whole = encode_mappings(&layout(PAGE_SIZE_4K), JsonShape::Both);
    send_with_fds(
        &client,
        &whole[..whole.len() / 2],
        &[uffd.as_fd()],
        usize::MAX,
    )
    .unwrap();
    assert!(!handshake_waiting(&server, 1 << 20, grace));
    // A whole one: waiting, and looking consumed nothing — the handshake and its fd are received.
    let (client, server) = pair();
    send_handshake(
        &client,
        &layout(PAGE_SIZE_4K),
        uffd.as_fd(),
        None,
        JsonShape::Both,
    )
    .unwrap();
    assert!(handshake_waiting(&server, 1 << 20, grace));
    assert!(handshake_waiting(&server, 1 << 20, grace));
    let handshake = receive_handshake(&server, &limits()).unwrap();
    assert_is_our_uffd(&handshake, &uffd);
}

#[test]
fn a_refused_handshake_says_whether_a_userfaultfd_came_with_it() {
    let uffd = uffd();
    let (client, server) = pair();
    send_with_fds(&client, b"[not json]", &[uffd.as_fd()], usize::MAX).unwrap();
    let r = receive_handshake_or_rejected(&server, &limits()).unwrap_err();
    assert!(r.handed_uffd, "{:?}", r.error);
    let (client, server) = pair();
    send_with_fds(&client, b"[not json]", &[], usize::MAX).unwrap();
    let r = receive_handshake_or_rejected(&server, &limits()).unwrap_err();
    assert!(!r.handed_uffd, "{:?}", r.error);
}
