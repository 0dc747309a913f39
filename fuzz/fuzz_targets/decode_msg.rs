//! Fuzz `faultline_uffd::decode`, the decoder of `struct uffd_msg` (32 bytes the kernel — or, for
//! an fd received from another process, anyone — writes into our read buffer).
//!
//! Input: the first 8 bytes (little-endian) are the negotiated features, the rest is cut into
//! 32-byte messages (a trailing partial message is ignored, as a truncated read is reported before
//! decoding). For every message: no panic, and the decoded value agrees with the raw bytes.
#![no_main]

use faultline_uffd::{decode, DecodeError, Features, Message, PagefaultFlags};
use libfuzzer_sys::fuzz_target;

const MSG: usize = 32;

fn u64_at(raw: &[u8; MSG], at: usize) -> u64 {
    u64::from_ne_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(raw: &[u8; MSG], at: usize) -> u32 {
    u32::from_ne_bytes(raw[at..at + 4].try_into().expect("4 bytes"))
}

fn check(raw: &[u8; MSG], features: Features) {
    let decoded = decode(raw, features);
    // Pure: the same bytes decode the same way.
    assert_eq!(decoded, decode(raw, features));
    match decoded {
        Ok(Message::Pagefault {
            address,
            flags,
            thread_id,
        }) => {
            assert_eq!(raw[0], 0x12);
            assert_eq!(address, u64_at(raw, 16));
            // Unknown flag bits are kept, never dropped.
            assert_eq!(flags, PagefaultFlags::from_bits_retain(u64_at(raw, 8)));
            assert_eq!(thread_id.is_some(), features.contains(Features::THREAD_ID));
            if let Some(tid) = thread_id {
                assert_eq!(tid, u32_at(raw, 24));
            }
        }
        Ok(Message::Fork { fd }) => {
            assert_eq!(raw[0], 0x13);
            assert!(fd >= 0);
            assert_eq!(fd as u32, u32_at(raw, 8));
        }
        Ok(Message::Remap { from, to, len }) => {
            assert_eq!(raw[0], 0x14);
            assert!(from.checked_add(len).is_some() && to.checked_add(len).is_some());
        }
        Ok(Message::Remove { start, end }) | Ok(Message::Unmap { start, end }) => {
            assert!(raw[0] == 0x15 || raw[0] == 0x16);
            assert!(
                start <= end,
                "range event with start {start:#x} > end {end:#x}"
            );
        }
        Ok(Message::Unknown { code, raw: kept }) => {
            assert!(
                !(0x12..=0x16).contains(&code),
                "known code {code:#x} reported unknown"
            );
            assert_eq!(code, raw[0]);
            assert_eq!(&kept, raw, "an unknown message is kept whole");
        }
        Err(DecodeError::InvertedRange { start, end, .. }) => {
            assert!(raw[0] == 0x15 || raw[0] == 0x16);
            assert!(end < start);
        }
        Err(DecodeError::RemapOverflow { from, to, len }) => {
            assert_eq!(raw[0], 0x14);
            assert!(from.checked_add(len).is_none() || to.checked_add(len).is_none());
        }
        Err(DecodeError::BadForkFd(fd)) => {
            assert_eq!(raw[0], 0x13);
            assert!(i32::try_from(fd).is_err());
        }
        // A read length that is not a multiple of 32 cannot come out of decoding one message.
        Err(e) => panic!("decode of one message failed with {e:?}"),
    }
    // Errors render without panicking.
    if let Err(e) = decode(raw, features) {
        let _ = e.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let (features, messages) = match data.split_first_chunk::<8>() {
        Some((f, rest)) => (Features::from_bits_retain(u64::from_le_bytes(*f)), rest),
        None => (Features::empty(), data),
    };
    for chunk in messages.chunks_exact(MSG) {
        let raw: &[u8; MSG] = chunk.try_into().expect("chunks_exact yields 32 bytes");
        check(raw, features);
        // The same message with and without THREAD_ID.
        check(raw, features ^ Features::THREAD_ID);
    }
});
