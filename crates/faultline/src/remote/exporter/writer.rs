//! The writing side of an exporter connection: demand before background, pages answered in
//! pieces (zero runs, data read or lent from the source, kept slots and their copies), one
//! vectored write per piece.

use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Select, TryRecvError};

use super::super::send::{self, Mapped, Part};
use super::super::wire::{self, Frame, Priority, MAX_DATA};
use super::{add, Job, Shared};
use crate::source::{bytes_are_zero, Retry};

/// What the writer does next.
pub(super) enum Next {
    Job(Job, Priority),
    Closed,
}

pub(super) fn next_job(demand: &Receiver<Job>, bg: &Receiver<Job>) -> Next {
    loop {
        match demand.try_recv() {
            Ok(j) => return Next::Job(j, Priority::Demand),
            Err(TryRecvError::Disconnected) => return Next::Closed,
            Err(TryRecvError::Empty) => {}
        }
        match bg.try_recv() {
            Ok(j) => return Next::Job(j, Priority::Background),
            Err(TryRecvError::Disconnected) => return Next::Closed,
            Err(TryRecvError::Empty) => {}
        }
        // Wait for either without taking anything, then look again, demand first.
        let mut sel = Select::new();
        sel.recv(demand);
        sel.recv(bg);
        let _ = sel.ready();
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    out: BufWriter<TcpStream>,
    buf: Vec<u8>,
    frame: Vec<u8>,
    /// The connection speaks version 2 (`KEEP`/`SAME`).
    dedup: bool,
    /// Slots this connection's client has been sent (`KEEP`).
    kept: Vec<bool>,
}

/// A part of a piece's vectored write.
pub(super) enum Seg<'a> {
    /// `heads[a..b]`: frame headers.
    Head(usize, usize),
    /// `buf[a..b]`: page bytes.
    Buf(usize, usize),
    /// A kept slot's bytes.
    Kept(&'a [u8]),
    /// Page bytes in the source's memory.
    Mapped(Mapped<'a>),
}

/// How a page of a piece is answered.
#[derive(Clone, Copy)]
pub(super) enum Kind<'a> {
    Zero,
    Data,
    /// Data the source lends a pointer to (sent from its memory, not read into the buffer):
    /// every page of the run holds the run's pointer, so the run is one kind.
    Lent(Mapped<'a>),
    /// A copy of this slot, whose bytes these are.
    Same(u32, &'a [u8]),
}

/// Pages of one kind go in one run; copies of one slot are one kind (their bytes are not
/// compared again).
impl PartialEq for Kind<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Kind::Same(a, _), Kind::Same(b, _)) => a == b,
            (Kind::Lent(a), Kind::Lent(b)) => a == b,
            (Kind::Zero, Kind::Zero) | (Kind::Data, Kind::Data) => true,
            _ => false,
        }
    }
}

pub(super) fn write_loop(
    shared: Arc<Shared>,
    stream: TcpStream,
    version: u16,
    demand: Receiver<Job>,
    bg: Receiver<Job>,
) {
    let sock = stream.try_clone();
    let mut w = Writer {
        shared,
        out: BufWriter::with_capacity(64 << 10, stream),
        buf: Vec::new(),
        frame: Vec::new(),
        dedup: version >= 2,
        kept: Vec::new(),
    };
    let r = (|| -> std::io::Result<()> {
        loop {
            if demand.is_empty() && bg.is_empty() {
                w.out.flush()?;
            }
            match next_job(&demand, &bg) {
                Next::Closed => return w.out.flush(),
                Next::Job(j, Priority::Demand) => {
                    if !bg.is_empty() {
                        add(&w.shared.counters.demand_overtook, 1);
                    }
                    w.answer(&j, None)?;
                    // A waiting thread: send now.
                    w.out.flush()?;
                }
                Next::Job(j, Priority::Background) => w.answer(&j, Some(&demand))?,
            }
        }
    })();
    if let Err(e) = r {
        tracing::debug!(error = %e, "remote page connection: write failed");
        if let Ok(s) = sock {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Writer {
    /// Answer every range of `j` in order. For a background job, `demand` is checked between
    /// pieces and served first.
    pub(super) fn answer(
        &mut self,
        j: &Job,
        demand: Option<&Receiver<Job>>,
    ) -> std::io::Result<()> {
        let src_len = self.shared.welcome.source_len;
        let ps = u64::from(self.shared.welcome.page_size);
        let piece = (1u64 << 20).max(ps).min(u64::from(MAX_DATA));
        for r in &j.ranges {
            let len = u64::from(r.len);
            let end = r.offset.checked_add(len);
            let bad = match end {
                _ if len == 0 || r.len > self.shared.welcome.max_range_len => {
                    Some(format!("range length {len} is out of bounds"))
                }
                None => Some("range overflows".to_string()),
                Some(end) if end > src_len => Some(format!(
                    "range {:#x}+{len:#x} lies outside the {src_len}-byte source",
                    r.offset
                )),
                Some(end) if r.offset % ps != 0 || (len % ps != 0 && end != src_len) => Some(
                    format!("range {:#x}+{len:#x} is not page-aligned", r.offset),
                ),
                Some(_) => None,
            };
            if let Some(message) = bad {
                self.error(j.id, r.offset, r.len, Retry::Permanent, &message)?;
                continue;
            }
            let mut off = r.offset;
            let end = r.offset + len;
            while off < end {
                if let Some(d) = demand {
                    while let Ok(dj) = d.try_recv() {
                        add(&self.shared.counters.demand_overtook, 1);
                        self.answer(&dj, None)?;
                        self.out.flush()?;
                    }
                }
                let n = (end - off).min(piece);
                self.piece(j.id, off, n)?;
                off += n;
            }
        }
        Ok(())
    }

    /// Answer `off..off+n` (whole pages, at most one piece): ZERO, DATA and (version 2) SAME
    /// runs, or an ERROR. Only the pages that go as DATA are read: indexed copies and pages the
    /// source knows to be zero are answered without reading them.
    pub(super) fn piece(&mut self, id: u64, off: u64, n: u64) -> std::io::Result<()> {
        let ps = usize::try_from(self.shared.welcome.page_size).expect("a page size fits in usize");
        // A piece is at most MAX_DATA bytes, a u32: its length fits both types.
        let n32 = u32::try_from(n).expect("a piece is at most MAX_DATA bytes");
        let size = usize::try_from(n).expect("a piece is at most MAX_DATA bytes");
        let src = &*self.shared.source;
        if src.is_zero(off, n) == Some(true) {
            return self.zero(id, off, n32);
        }
        let shared = Arc::clone(&self.shared);
        let index = shared.dedup.get().filter(|_| self.dedup);
        let first = off / ps as u64;
        let count = size.div_ceil(ps);
        let span = |i: usize| (i * ps, ((i + 1) * ps).min(size));
        // Pages the source knows hold data need no zero check: when the source lends them (a
        // memory file's mapping), they are sent from there, not read into `buf` first.
        let mut known = vec![false; count];
        let mut kinds: Vec<Kind<'_>> = (0..count)
            .map(|i| {
                if let Some((slot, bytes)) = index.and_then(|ix| ix.copy_of(first + i as u64)) {
                    return Kind::Same(slot, bytes);
                }
                let (a, b) = span(i);
                match src.is_zero(off + a as u64, (b - a) as u64) {
                    Some(true) => Kind::Zero,
                    Some(false) => {
                        known[i] = true;
                        Kind::Data
                    }
                    // Unknown pages are read, and checked for zeros below.
                    None => Kind::Data,
                }
            })
            .collect();
        // Read the runs of pages to send (into their place in the piece's buffer).
        let mut buf = std::mem::take(&mut self.buf);
        // Grown, never shrunk: zero-filling it again per piece would cost a memset.
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let mut i = 0;
        while i < count {
            if kinds[i] != Kind::Data {
                i += 1;
                continue;
            }
            let mut k = i + 1;
            while k < count && kinds[k] == Kind::Data {
                k += 1;
            }
            let (from, _) = span(i);
            let (_, to) = span(k - 1);
            if known[i..k].iter().all(|&f| f) {
                if let Some(m) = Mapped::of(src, off + from as u64, to - from) {
                    kinds[i..k].fill(Kind::Lent(m));
                    i = k;
                    continue;
                }
            }
            if let Err(e) = src.read_at(off + from as u64, &mut buf[from..to]) {
                self.buf = buf;
                tracing::warn!(offset = off, len = n, error = %e, "source read failed; answering with an error");
                let msg = match &e.cause {
                    Some(c) => format!("{e}: {c}"),
                    None => e.to_string(),
                };
                return self.error(id, off, n32, e.retry, &msg);
            }
            for (j, kind) in kinds.iter_mut().enumerate().take(k).skip(i) {
                let (a, b) = span(j);
                if bytes_are_zero(&buf[a..b]) {
                    *kind = Kind::Zero;
                }
            }
            i = k;
        }
        // The whole piece goes out in one vectored write: frame headers from `heads`, bytes
        // straight from `buf` and from the kept slots (no copy through the write buffer).
        let mut heads = std::mem::take(&mut self.frame);
        heads.clear();
        let mut segs: Vec<Seg<'_>> = Vec::new();
        let c = &shared.counters;
        let mut i = 0;
        while i < kinds.len() {
            let mut k = i + 1;
            while k < kinds.len() && kinds[k] == kinds[i] {
                k += 1;
            }
            let from = i * ps;
            let to = (k * ps).min(size);
            let (at, len) = (
                off + from as u64,
                u32::try_from(to - from).expect("a run of the piece"),
            );
            let h = heads.len();
            match kinds[i] {
                Kind::Zero => {
                    Frame::Zero {
                        id,
                        offset: at,
                        len,
                    }
                    .encode(&mut heads);
                    segs.push(Seg::Head(h, heads.len()));
                    add(&c.zero_frames, 1);
                    add(&c.zero_bytes, u64::from(len));
                }
                kind @ (Kind::Data | Kind::Lent(_)) => {
                    heads.extend_from_slice(&wire::data_head(id, at, len));
                    segs.push(Seg::Head(h, heads.len()));
                    segs.push(match kind {
                        Kind::Lent(m) => Seg::Mapped(m),
                        _ => Seg::Buf(from, to),
                    });
                    add(&c.data_frames, 1);
                    add(&c.bytes_sent, u64::from(len));
                }
                Kind::Same(slot, bytes) => {
                    let s = slot as usize;
                    if self.kept.len() <= s {
                        self.kept.resize(s + 1, false);
                    }
                    if !self.kept[s] {
                        heads.extend_from_slice(&wire::keep_head(
                            slot,
                            u32::try_from(bytes.len()).expect("a kept slot is one page"),
                        ));
                        segs.push(Seg::Head(h, heads.len()));
                        segs.push(Seg::Kept(bytes));
                        self.kept[s] = true;
                        add(&c.keep_frames, 1);
                        add(&c.bytes_sent, bytes.len() as u64);
                    }
                    let h = heads.len();
                    Frame::Same {
                        id,
                        offset: at,
                        len,
                        slot,
                    }
                    .encode(&mut heads);
                    segs.push(Seg::Head(h, heads.len()));
                    add(&c.same_frames, 1);
                    add(&c.same_bytes, u64::from(len));
                }
            }
            i = k;
        }
        let parts: Vec<Part<'_>> = segs
            .iter()
            .map(|s| match *s {
                Seg::Head(a, b) => Part::Bytes(&heads[a..b]),
                Seg::Buf(a, b) => Part::Bytes(&buf[a..b]),
                Seg::Mapped(m) => Part::Mapped(m),
                Seg::Kept(b) => Part::Bytes(b),
            })
            .collect();
        let r = self
            .out
            .flush()
            .and_then(|()| send::write_all(self.out.get_ref().as_fd(), &parts));
        drop(parts);
        self.frame = heads;
        self.buf = buf;
        r
    }

    pub(super) fn zero(&mut self, id: u64, offset: u64, len: u32) -> std::io::Result<()> {
        self.frame.clear();
        Frame::Zero { id, offset, len }.encode(&mut self.frame);
        self.out.write_all(&self.frame)?;
        add(&self.shared.counters.zero_frames, 1);
        add(&self.shared.counters.zero_bytes, u64::from(len));
        Ok(())
    }

    pub(super) fn error(
        &mut self,
        id: u64,
        offset: u64,
        len: u32,
        retry: Retry,
        message: &str,
    ) -> std::io::Result<()> {
        self.frame.clear();
        Frame::Error {
            id,
            offset,
            len,
            retry,
            message: message.to_string(),
        }
        .encode(&mut self.frame);
        self.out.write_all(&self.frame)?;
        add(&self.shared.counters.error_frames, 1);
        Ok(())
    }
}
