//! Fuzz `faultline::remote::wire::read_frame`, which reads the remote page protocol's frames
//! from a TCP peer (a client on the exporter's side, a server on `serve --remote`'s side).
//!
//! Input: a byte stream, read frame after frame until the first error. For every frame: no
//! panic, lengths within the protocol's limits, and a frame that was accepted encodes back to
//! exactly the bytes it was read from (decoding loses nothing and accepts nothing ambiguous).
#![no_main]

use faultline::remote::wire::{read_frame, Frame, MAX_DATA, MAX_FRAME, MAX_MESSAGE, MAX_NAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut scratch = Vec::new();
    loop {
        let before = r;
        let Ok(frame) = read_frame(&mut r, &mut scratch) else {
            return;
        };
        let used = &before[..before.len() - r.len()];
        assert!(used.len() <= MAX_FRAME as usize + 4);
        match &frame {
            Frame::Data { bytes, .. } | Frame::Keep { bytes, .. } => {
                assert!(!bytes.is_empty() && bytes.len() <= MAX_DATA as usize)
            }
            Frame::Welcome(w) => assert!(w.name.len() <= MAX_NAME),
            Frame::Refused { reason } => assert!(reason.len() <= MAX_MESSAGE),
            Frame::Error { message, .. } => assert!(message.len() <= MAX_MESSAGE),
            _ => {}
        }
        let mut again = Vec::new();
        frame.encode(&mut again);
        assert_eq!(again, used, "{frame:?} does not encode back to its bytes");
    }
});
