//! The connection's reader thread: receives answer frames and applies them to the page states
//! and the cache, waking the reads waiting for them.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

// Keys are page numbers and request ids: a multiply-and-rotate hash serves them as well as
// SipHash at a fraction of its cost (a map operation per page received and per page read).
use rustc_hash::FxHashMap as HashMap;

use super::super::wire::{self, read_frame, Frame, Priority, MAX_KEPT_BYTES};
use super::state::{
    add, Chunk, Cmd, Shared, State, ABSENT, BG, CACHED, DEMAND, READ_ONCE, STATE, ZERO,
};
use crate::source::Retry;

/// An answer frame, for [`apply`].
pub(super) enum Answer {
    Data(Arc<Chunk>),
    /// Every page holds these (one page of) bytes.
    Same(Arc<Chunk>),
    Zero,
    Error(Retry, String),
}

/// Most answer frames applied under one lock.
pub(super) const BATCH: usize = 256;

/// The reader's receive buffer (see [`reader_main`]).
pub(super) const RECV_BUFFER: usize = 16 << 10;

/// The connection's reader: receives answer frames and applies them to the cache. Frames that
/// arrived together (all that the read buffer holds, up to [`BATCH`]) are applied under one
/// lock with one wake-up of the waiting reads: with repeated pages a 1 MiB answer is hundreds
/// of small frames.
pub(super) fn reader_main(sh: Arc<Shared>, stream: TcpStream, gen: u64, version: u16) {
    // Small: it holds the headers and small frames of one receive. A DATA payload larger than
    // what is left buffered is read from the socket straight into its own buffer (BufReader
    // passes reads of at least its capacity through), so page bytes are copied once here.
    let mut r = BufReader::with_capacity(RECV_BUFFER, stream);
    let mut scratch = Vec::new();
    // The pages this connection's server asked us to keep (version 2): slot -> bytes.
    let mut kept: HashMap<u32, Arc<Chunk>> = HashMap::default();
    let slots = MAX_KEPT_BYTES / sh.welcome.page_size;
    let mut batch: Vec<(u64, u64, u64, Answer)> = Vec::with_capacity(BATCH);
    let why = 'conn: loop {
        let mut failed = None;
        loop {
            let frame = match read_frame(&mut r, &mut scratch) {
                Ok(f) => f,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            };
            add(&sh.c.frames_received, 1);
            match answer_of(&sh, frame, version, slots, &mut kept) {
                Ok(Some(a)) => batch.push(a),
                Ok(None) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            // Go on only while the next frame can be read without blocking.
            if batch.len() >= BATCH || !wire::holds_whole_frame(r.buffer()) {
                break;
            }
        }
        // What arrived before a failure is applied: it is good, and saves asking again.
        let mut st = sh.lock();
        if st.gen != gen {
            break "connection replaced".to_string();
        }
        st.last_progress = Instant::now();
        let mut bg_done = false;
        let mut bad = None;
        for (id, offset, len, answer) in batch.drain(..) {
            match apply(&sh, &mut st, id, offset, len, answer) {
                Ok(done) => bg_done |= done,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        drop(st);
        sh.cv.notify_all();
        if bg_done {
            let _ = sh.tx.send(Cmd::Wake);
        }
        if let Some(e) = bad.or(failed) {
            break 'conn e;
        }
    };
    tracing::debug!(why, "remote page reader ends");
    let _ = sh.tx.send(Cmd::Lost(gen));
}

/// What an answer frame says, as `(request id, offset, len, answer)`; `Ok(None)` for a `KEEP`
/// (stored in `kept`), `Err` for a frame that breaks the protocol.
pub(super) fn answer_of(
    sh: &Shared,
    frame: Frame,
    version: u16,
    slots: u32,
    kept: &mut HashMap<u32, Arc<Chunk>>,
) -> Result<Option<(u64, u64, u64, Answer)>, String> {
    Ok(Some(match frame {
        Frame::Data { id, offset, bytes } => {
            let n = bytes.len() as u64;
            add(&sh.c.bytes_received, n);
            let (chunk, now) = Chunk::accounted(bytes, &sh.cached);
            sh.c.peak.fetch_max(now, Ordering::Relaxed);
            (id, offset, n, Answer::Data(chunk))
        }
        Frame::Zero { id, offset, len } => {
            add(&sh.c.zero_bytes_received, u64::from(len));
            (id, offset, u64::from(len), Answer::Zero)
        }
        Frame::Error {
            id,
            offset,
            len,
            retry,
            message,
        } => (id, offset, u64::from(len), Answer::Error(retry, message)),
        Frame::Keep { slot, bytes } if version >= 2 => {
            if slot >= slots || bytes.len() as u64 != sh.page {
                return Err(format!(
                    "KEEP of {} bytes into slot {slot} (pages are {} bytes, {slots} slots)",
                    bytes.len(),
                    sh.page
                ));
            }
            add(&sh.c.kept_pages, 1);
            add(&sh.c.bytes_received, sh.page);
            kept.insert(slot, Chunk::accounted(bytes, &sh.kept).0);
            return Ok(None);
        }
        Frame::Same {
            id,
            offset,
            len,
            slot,
        } if version >= 2 => {
            let Some(c) = kept.get(&slot) else {
                return Err(format!("SAME refers to slot {slot}, which was never kept"));
            };
            add(&sh.c.same_bytes_received, u64::from(len));
            (id, offset, u64::from(len), Answer::Same(Arc::clone(c)))
        }
        other => return Err(format!("unexpected frame from the server: {other:?}")),
    }))
}

/// Apply one answer frame to its request and to the pages it covers. `Ok(true)` when a
/// background request completed (the stream may go on).
pub(super) fn apply(
    sh: &Shared,
    st: &mut State,
    id: u64,
    offset: u64,
    len: u64,
    answer: Answer,
) -> Result<bool, String> {
    let Some(req) = st.requests.get_mut(&id) else {
        return Err(format!("answer to unknown request {id}"));
    };
    let (roff, rlen) = req.ranges[req.idx];
    let expect = roff + req.pos;
    if offset != expect || len == 0 || req.pos + len > rlen {
        return Err(format!(
            "answer {offset:#x}+{len:#x} to request {id} does not continue it at {expect:#x} (range {roff:#x}+{rlen:#x})"
        ));
    }
    if offset % sh.page != 0 || (len % sh.page != 0 && offset + len != sh.len) {
        return Err(format!(
            "answer {offset:#x}+{len:#x} does not cover whole pages"
        ));
    }
    if let Answer::Data(c) = &answer {
        if c.bytes.len() as u64 != len {
            return Err("data length mismatch".into());
        }
    }
    req.pos += len;
    if req.pos == rlen {
        req.idx += 1;
        req.pos = 0;
    }
    let done = req.idx == req.ranges.len();
    let bg = req.priority == Priority::Background;
    if bg {
        st.bg_bytes = st.bg_bytes.saturating_sub(len);
    }
    if done {
        st.requests.remove(&id);
        if bg {
            st.bg_outstanding = st.bg_outstanding.saturating_sub(1);
        }
    }
    let first = offset / sh.page;
    let n = len.div_ceil(sh.page);
    let mut dup = 0;
    for i in 0..n {
        let p = first + i;
        if matches!(answer, Answer::Zero) {
            sh.mark_zero(p);
        }
        let s = st.pages[p];
        if !matches!(s & STATE, BG | DEMAND) {
            dup += 1;
            continue;
        }
        let keep = s & READ_ONCE;
        match &answer {
            Answer::Data(c) => {
                let at = usize::try_from(i * sh.page).expect("inside the received bytes");
                st.cache.insert(p, (Arc::clone(c), at));
                st.pages[p] = CACHED | keep;
            }
            Answer::Same(c) => {
                st.cache.insert(p, (Arc::clone(c), 0));
                st.pages[p] = CACHED | keep;
            }
            Answer::Zero => st.pages[p] = ZERO | keep,
            Answer::Error(retry, msg) => {
                st.pages[p] = ABSENT | keep;
                st.failed.insert(p, (*retry, msg.clone()));
            }
        }
    }
    add(&sh.c.duplicate_pages, dup);
    Ok(done && bg)
}
