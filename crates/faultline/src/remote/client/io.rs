//! The I/O thread: owns the connection, sends demand and stream requests, reconnects and
//! re-sends what was not answered.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
// Keys are page numbers and request ids: a multiply-and-rotate hash serves them as well as
// SipHash at a fraction of its cost (a map operation per page received and per page read).

use super::super::wire::{Frame, Priority, WireRange};

use super::connect_once;
use super::reader::reader_main;
use super::state::{add, Cmd, Req, Shared, State, ABSENT, BG, DEMAND, MAX_FOLLOW, STATE};

/// The current connection, owned by the I/O thread.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) reader: JoinHandle<()>,
    pub(super) gen: u64,
}

/// The I/O thread: owns the connection, sends requests, reconnects.
pub(super) struct Io {
    pub(super) shared: Arc<Shared>,
    pub(super) rx: Receiver<Cmd>,
    pub(super) conn: Option<Conn>,
}

impl Io {
    pub(super) fn run(mut self) {
        let sh = Arc::clone(&self.shared);
        let mut pause = sh.opts.reconnect_min;
        let mut next_try = Instant::now();
        let tick =
            (sh.opts.io_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let timeout = if self.conn.is_some() {
                tick
            } else {
                next_try.saturating_duration_since(Instant::now())
            };
            let mut cmds = Vec::new();
            match self.rx.recv_timeout(timeout) {
                Ok(c) => cmds.push(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if !sh.opts.batch_delay.is_zero()
                && self.conn.is_some()
                && matches!(cmds.first(), Some(Cmd::Wake))
            {
                let until = Instant::now() + sh.opts.batch_delay;
                while let Ok(c) = self.rx.recv_deadline(until) {
                    cmds.push(c);
                }
            }
            cmds.extend(self.rx.try_iter());
            let mut shutdown = false;
            for c in cmds {
                match c {
                    Cmd::Wake => {}
                    Cmd::Lost(g) => {
                        if self.conn.as_ref().is_some_and(|c| c.gen == g) {
                            self.drop_conn("connection lost");
                            // Not at once: a server that accepts and drops would make a
                            // busy loop.
                            next_try = Instant::now() + pause;
                        }
                    }
                    Cmd::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                break;
            }
            if self.conn.is_none() && Instant::now() >= next_try {
                match connect_once(&sh.addr, sh.opts.connect_timeout) {
                    Ok((stream, w)) if w.same_source(&sh.welcome) => {
                        match self.install(stream, w.version, true) {
                            Ok(()) => {
                                pause = sh.opts.reconnect_min;
                                tracing::info!(addr = %sh.addr, "reconnected to the remote page server");
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start a reader thread");
                                next_try = Instant::now() + sh.opts.reconnect_max;
                            }
                        }
                    }
                    Ok((_, w)) => {
                        let why = format!(
                            "{} now serves a different source ({} bytes, page size {}, id {:#x}; was {} bytes, page size {}, id {:#x})",
                            sh.addr, w.source_len, w.page_size, w.source_id,
                            sh.welcome.source_len, sh.welcome.page_size, sh.welcome.source_id
                        );
                        tracing::error!(why, "remote page server changed; reads fail from now on");
                        sh.lock().fatal = Some(why);
                        sh.cv.notify_all();
                        next_try = Instant::now() + sh.opts.reconnect_max;
                    }
                    Err(e) => {
                        tracing::debug!(addr = %sh.addr, error = %e, "reconnect failed");
                        next_try = Instant::now() + pause;
                        pause = (pause * 2).min(sh.opts.reconnect_max);
                    }
                }
            }
            if self.conn.is_some() {
                if let Err(e) = self.pump() {
                    tracing::warn!(error = %e, "remote page connection failed while sending");
                    self.drop_conn("send failed");
                }
            }
            if self.conn.is_some() {
                let st = sh.lock();
                let stuck =
                    !st.requests.is_empty() && st.last_progress.elapsed() >= sh.opts.io_timeout;
                drop(st);
                if stuck {
                    tracing::warn!(
                        addr = %sh.addr,
                        "no answer from the remote page server within the I/O timeout; reconnecting"
                    );
                    self.drop_conn("I/O timeout");
                }
            }
        }
        if self.conn.is_some() {
            self.drop_conn("shut down");
        }
    }

    /// Adopt a connected, welcomed stream: start its reader and re-send what is outstanding.
    pub(super) fn install(
        &mut self,
        stream: TcpStream,
        version: u16,
        again: bool,
    ) -> std::io::Result<()> {
        let sh = &self.shared;
        let reader_stream = stream.try_clone()?;
        stream.set_write_timeout(Some(sh.opts.io_timeout))?;
        let gen = {
            let mut st = sh.lock();
            st.gen += 1;
            st.up = true;
            st.down_since = None;
            st.last_progress = Instant::now();
            st.gen
        };
        let s = Arc::clone(sh);
        let reader = std::thread::Builder::new()
            .name("faultline-remote-rx".into())
            .spawn(move || reader_main(s, reader_stream, gen, version));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let mut st = sh.lock();
                st.up = false;
                st.down_since.get_or_insert_with(Instant::now);
                return Err(e);
            }
        };
        sh.connected.store(true, Ordering::Release);
        sh.version.store(version, Ordering::Relaxed);
        if again {
            add(&sh.c.reconnects, 1);
        }
        self.conn = Some(Conn {
            stream,
            reader,
            gen,
        });
        // Re-send what the last connection left unanswered: demand first.
        let mut out = Vec::new();
        {
            let mut st = sh.lock();
            let mut ids: Vec<(bool, u64)> = st
                .requests
                .iter()
                .map(|(id, r)| (r.priority == Priority::Background, *id))
                .collect();
            ids.sort_unstable();
            for (_, id) in ids {
                let Some(r) = st.requests.get_mut(&id) else {
                    continue;
                };
                let mut ranges: Vec<(u64, u64)> = r.ranges[r.idx..].to_vec();
                ranges[0].0 += r.pos;
                ranges[0].1 -= r.pos;
                r.ranges = ranges;
                r.idx = 0;
                r.pos = 0;
                encode_read(&mut out, id, r);
                add(&sh.c.resent_requests, 1);
            }
        }
        // Waiters look again: a connection is up, counters changed.
        sh.cv.notify_all();
        if !out.is_empty() {
            if let Some(c) = &self.conn {
                if let Err(e) = (&c.stream).write_all(&out) {
                    tracing::warn!(error = %e, "re-sending requests failed");
                    self.drop_conn("send failed");
                }
            }
        }
        Ok(())
    }

    pub(super) fn drop_conn(&mut self, why: &str) {
        let Some(c) = self.conn.take() else {
            return;
        };
        let sh = &self.shared;
        {
            let mut st = sh.lock();
            st.up = false;
            st.gen += 1;
            st.down_since.get_or_insert_with(Instant::now);
        }
        sh.connected.store(false, Ordering::Release);
        add(&sh.c.disconnects, 1);
        let _ = c.stream.shutdown(Shutdown::Both);
        let _ = c.reader.join();
        sh.cv.notify_all();
        tracing::info!(addr = %sh.addr, why, "disconnected from the remote page server");
    }

    /// Send the queued demand reads, then background requests the stream may make.
    pub(super) fn pump(&mut self) -> std::io::Result<()> {
        let sh = Arc::clone(&self.shared);
        let mut out = Vec::new();
        {
            let mut st = sh.lock();
            let idle = st.requests.is_empty();
            self.demand_frames(&mut st, &mut out);
            self.stream_frames(&mut st, &mut out);
            if idle && !st.requests.is_empty() {
                st.last_progress = Instant::now();
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        match &self.conn {
            Some(c) => (&c.stream).write_all(&out),
            None => Ok(()),
        }
    }

    pub(super) fn max_ranges(&self) -> usize {
        usize::from(self.shared.welcome.max_ranges)
            .min(self.shared.opts.max_batch_ranges)
            .max(1)
    }

    /// Turn page runs into byte ranges within the server's range limit.
    pub(super) fn byte_ranges(&self, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let sh = &self.shared;
        let max = u64::from(sh.welcome.max_range_len);
        let mut v = Vec::new();
        for &(a, b) in runs {
            let mut off = a * sh.page;
            let end = (b * sh.page).min(sh.len);
            while off < end {
                let n = (end - off).min(max);
                v.push((off, n));
                off += n;
            }
        }
        v
    }

    pub(super) fn new_request(
        &self,
        st: &mut State,
        out: &mut Vec<u8>,
        priority: Priority,
        ranges: Vec<(u64, u64)>,
    ) {
        let sh = &self.shared;
        let id = st.next_id;
        st.next_id += 1;
        let r = Req {
            priority,
            ranges,
            idx: 0,
            pos: 0,
        };
        encode_read(out, id, &r);
        add(&sh.c.ranges_sent, r.ranges.len() as u64);
        match priority {
            Priority::Demand => add(&sh.c.demand_requests, 1),
            Priority::Background => {
                add(&sh.c.background_requests, 1);
                st.bg_outstanding += 1;
                st.bg_bytes += r.remaining();
            }
        }
        st.requests.insert(id, r);
    }

    pub(super) fn demand_frames(&self, st: &mut State, out: &mut Vec<u8>) {
        if st.queue.is_empty() {
            return;
        }
        let mut q = std::mem::take(&mut st.queue);
        q.sort_unstable();
        // Pages still waiting as demand, merged into runs.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut seen_to = 0u64;
        for (a, b) in q {
            for p in a.max(seen_to)..b {
                if st.pages[p] & STATE != DEMAND {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.1 == p => r.1 = p + 1,
                    _ => runs.push((p, p + 1)),
                }
            }
            seen_to = seen_to.max(b);
        }
        // The stream follows demand (as post-copy migration does): a fault away from where the
        // stream is makes it go on from there, where the next faults are likely; what it
        // skipped is picked up by a later pass.
        if let Some(&(a, b)) = runs.last() {
            let window =
                (self.stream_chunk() / self.shared.page) * self.shared.opts.stream_window as u64;
            let c = st.stream_cursor;
            let near = |f: u64| a < f + window && a + window >= f;
            let follower = st.stream_follow.iter().position(|&f| near(f));
            if !st.stream_on || st.stream_done {
                // Nothing to steer.
            } else if let Some(i) = follower {
                // Near where a follower streams: it goes on from here if it lags.
                st.stream_follow[i] = st.stream_follow[i].max(b);
                st.stream_pass_sent = true;
            } else if a >= c || a + window < c {
                // Away from the cursor: the cursor goes there, and where it was is followed.
                if c < self.shared.npages {
                    if st.stream_follow.len() == MAX_FOLLOW {
                        st.stream_follow.remove(0);
                    }
                    st.stream_follow.push(c);
                }
                st.stream_cursor = b;
                st.stream_pass_sent = true;
            }
        }
        let ranges = self.byte_ranges(&runs);
        for batch in ranges.chunks(self.max_ranges()) {
            self.new_request(st, out, Priority::Demand, batch.to_vec());
        }
    }

    /// Bytes per background request (whole pages, at most the cache).
    pub(super) fn stream_chunk(&self) -> u64 {
        let sh = &self.shared;
        sh.opts
            .stream_chunk
            .min(sh.opts.cache_bytes)
            .max(sh.page)
            .next_multiple_of(sh.page)
    }

    pub(super) fn stream_frames(&self, st: &mut State, out: &mut Vec<u8>) {
        let sh = &self.shared;
        if !st.stream_on {
            return;
        }
        let chunk = self.stream_chunk();
        let chunk_pages = chunk / sh.page;
        // Room for at least one request, whatever the options say.
        let cap = sh.opts.cache_bytes.max(chunk);
        let mut changed = false;
        while st.bg_outstanding < sh.opts.stream_window && !st.stream_done {
            if st.stream_cursor >= sh.npages {
                if !st.stream_pass_sent {
                    st.stream_done = true;
                    changed = true;
                    break;
                }
                st.stream_cursor = 0;
                st.stream_pass_sent = false;
                continue;
            }
            if sh.cached.load(Ordering::Acquire) + st.bg_bytes + chunk > cap {
                st.stream_starved = true;
                break;
            }
            let turn = st.stream_turn % (st.stream_follow.len() + 1);
            st.stream_turn = st.stream_turn.wrapping_add(1);
            let (from, to) = if turn == 0 {
                let from = st.stream_cursor;
                let to = (from + chunk_pages).min(sh.npages);
                st.stream_cursor = to;
                (from, to)
            } else {
                let from = st.stream_follow[turn - 1];
                (from, (from + chunk_pages).min(sh.npages))
            };
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for p in from..to {
                let s = st.pages[p];
                if s != ABSENT {
                    continue; // asked for, received, or read already
                }
                st.pages[p] = BG;
                match runs.last_mut() {
                    Some(r) if r.1 == p => r.1 = p + 1,
                    _ => runs.push((p, p + 1)),
                }
            }
            if turn > 0 {
                // A follower ends at the end of the source, or where it finds nothing left to
                // ask for (it has caught up with what was streamed before).
                if runs.is_empty() || to >= sh.npages {
                    st.stream_follow.remove(turn - 1);
                } else {
                    st.stream_follow[turn - 1] = to;
                }
            }
            changed = true;
            if runs.is_empty() {
                continue;
            }
            st.stream_pass_sent = true;
            let ranges = self.byte_ranges(&runs);
            for batch in ranges.chunks(self.max_ranges()) {
                self.new_request(st, out, Priority::Background, batch.to_vec());
            }
        }
        if changed {
            sh.cv.notify_all();
        }
    }
}

pub(super) fn encode_read(out: &mut Vec<u8>, id: u64, r: &Req) {
    Frame::Read {
        id,
        priority: r.priority,
        ranges: r
            .ranges
            .iter()
            .map(|&(offset, len)| WireRange {
                offset,
                len: u32::try_from(len).expect("a range is at most max_range_len, a u32"),
            })
            .collect(),
    }
    .encode(out);
}
