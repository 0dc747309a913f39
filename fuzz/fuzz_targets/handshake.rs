//! Fuzz the Firecracker handshake parser: `faultline::firecracker::parse_mappings` (JSON bytes →
//! region mappings), `validate` (the mappings' values) and `JsonFramer` (finding the end of the
//! message as it arrives) — everything of the handshake but the socket.
//!
//! Input: the bytes of one handshake message. Checked: no panic; framing does not depend on how
//! the bytes are split, and frames a valid JSON array exactly at its closing bracket; when serde's
//! derive also accepts the bytes it reads the same mappings; every validated region is non-empty,
//! 4 KiB- or 2 MiB-paged, aligned, inside the memory file and disjoint from the others; every
//! error is a client error and renders.
#![no_main]

use faultline::firecracker::{
    parse_mappings, validate, Framing, GuestRegionUffdMapping, HandshakeError, JsonFramer, Limits,
    ValidatedRegion, PAGE_SIZE_2M, PAGE_SIZE_4K,
};
use libfuzzer_sys::fuzz_target;

fn check_error(e: &HandshakeError) {
    assert!(e.is_client_error(), "{e:?} from pure parsing");
    assert!(!e.to_string().is_empty());
}

fn check_framing(data: &[u8]) {
    let whole = JsonFramer::new().feed(data);
    for split in [1, data.len() / 3, data.len() / 2] {
        let split = split.min(data.len());
        let mut framer = JsonFramer::new();
        let first = framer.feed(&data[..split]);
        let second = framer.feed(&data[split..]);
        assert_eq!(second, whole, "split at {split}");
        if first != Framing::NeedMore {
            assert_eq!(first, whole, "split at {split}");
        }
    }
    // A valid JSON array is framed exactly: only whitespace follows the frame.
    let starts_with_bracket = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if starts_with_bracket && serde_json::from_slice::<serde_json::Value>(data).is_ok() {
        match whole {
            Framing::Complete { len } => {
                assert_eq!(data[len - 1], b']');
                assert!(data[len..].iter().all(|b| b" \t\r\n".contains(b)));
            }
            other => panic!("a valid array framed as {other:?}"),
        }
    }
}

fn check_regions(mappings: &[GuestRegionUffdMapping], regions: &[ValidatedRegion], mem_len: u64) {
    assert_eq!(regions.len(), mappings.len());
    assert!(regions.len() <= Limits::default().max_regions);
    let page_size = regions[0].page_size;
    assert!(page_size == PAGE_SIZE_4K || page_size == PAGE_SIZE_2M);
    for (region, mapping) in regions.iter().zip(mappings) {
        assert_eq!(region.start, mapping.base_host_virt_addr);
        assert_eq!(region.len, mapping.size);
        assert_eq!(region.offset, mapping.offset);
        assert_eq!(region.page_size, page_size);
        assert!(region.len > 0);
        assert_eq!(region.start % page_size, 0);
        assert_eq!(region.len % page_size, 0);
        assert_eq!(region.offset % page_size, 0);
        assert!(region.start.checked_add(region.len).is_some());
        let file_end = region
            .offset
            .checked_add(region.len)
            .expect("validated: no overflow");
        assert!(file_end <= mem_len);
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.start);
    for pair in sorted.windows(2) {
        assert!(pair[0].end() <= pair[1].start, "{pair:?} overlap");
    }
}

fuzz_target!(|data: &[u8]| {
    check_framing(data);
    let mappings = match parse_mappings(data) {
        Ok(mappings) => mappings,
        Err(e) => return check_error(&e),
    };
    if let Ok(derived) = serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(data) {
        assert_eq!(
            derived, mappings,
            "serde's derive reads the message differently"
        );
    }
    // The tightest file that could hold every region, and one byte less.
    let needed = mappings.iter().try_fold(0u64, |end, m| {
        m.offset.checked_add(m.size).map(|e| e.max(end))
    });
    let mut lengths = vec![u64::MAX];
    if let Some(needed) = needed {
        lengths.push(needed);
        lengths.extend(needed.checked_sub(1));
    }
    for mem_len in lengths {
        match validate(&mappings, mem_len, &Limits::default()) {
            Ok(regions) => check_regions(&mappings, &regions, mem_len),
            Err(e) => check_error(&e),
        }
    }
});
