//! Fuzz `faultline::WorkingSet::decode`, the reader of working-set files (`--prefetch-ws`): a file
//! an operator hands the daemon, possibly truncated or corrupt.
//!
//! Invariants: no panic; a decoded set has a supported page size and page-aligned offsets, and
//! encodes back to exactly the input bytes.
#![no_main]

use faultline::WorkingSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ws) = WorkingSet::decode(data) {
        assert!(ws.page_size == 4096 || ws.page_size == 2 << 20);
        assert!(ws.offsets.iter().all(|o| o % ws.page_size == 0));
        assert_eq!(ws.encode(), data, "decode/encode must round-trip");
    }
});
