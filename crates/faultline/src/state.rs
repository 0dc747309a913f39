//! Per-region page state: a compact lock-free bitmap.
//!
//! Each page has two bits of state — [`PageState::Missing`], [`PageState::InFlight`] (a worker
//! claimed it and is resolving it), [`PageState::Present`] — plus one "zero" bit set when the
//! client dropped the page (`UFFD_EVENT_REMOVE`): in Firecracker's balloon semantics a removed page
//! reads as zero when touched again, never as the snapshot's old bytes.
//!
//! Why this is enough for "exactly one resolve per page, every waiter woken":
//! - A fault on a `Missing` page is claimed with one CAS: only the winner resolves.
//! - A fault on an `InFlight` page is dropped: the claimer's resolve (never DONTWAKE) wakes every
//!   thread blocked on the range, including faults whose messages are still unread — the kernel
//!   re-checks the page table after queueing a waiter, so no waiter can slip between.
//! - A fault on a `Present` page is resolved again (normally answered EEXIST): a page we believe
//!   present can have been zapped without us seeing it yet (a REMOVE read, the client's `madvise`
//!   done and a refault taken before the page states were updated), or with no event at all (a
//!   client without `EVENT_REMOVE`). Private memory reads zeros after a zap, so the re-resolve is
//!   a zero one (shared memory's page cache kept the bytes: it is only mapped) — always right,
//!   and one ioctl only for true duplicates.
//! - REMOVE sets the zero bits *before* turning `Present` pages back to `Missing`, so any resolver
//!   that sees `Missing` also sees the zero bit. The server reads messages and applies REMOVE /
//!   REMAP under a per-session lock, so a fault caused after such an event is never examined
//!   before the event is applied.
//! - A REMOVE that lands while a page is `InFlight` leaves it to its resolver; a refault read in
//!   that window is dropped as a duplicate although the resolver's wake already happened, so the
//!   resolver, after publishing the page, wakes the range when it finds the zero bit set (the
//!   thread then faults again and is served zeros). This is the only `UFFDIO_WAKE` the server
//!   issues, and only in that race.
//! - Its resolver must not install the *source's* bytes there, though: `madvise` zaps as soon as
//!   the REMOVE is read, and a copy issued after the zap would stay. A data resolve checks the zero
//!   bits again right before its ioctl, holding the session's install lock shared, and the reader
//!   of messages holds that lock exclusively until the REMOVEs it read set their zero bits; a page
//!   found removed sends the run back to be planned again, as zeros (`server/resolve.rs`).

#[cfg(faultline_loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(faultline_loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// The state of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not yet resolved (or dropped again).
    Missing,
    /// Claimed by a worker that is resolving it.
    InFlight,
    /// Resolved.
    Present,
}

const MISSING: u64 = 0;
const INFLIGHT: u64 = 1;
const PRESENT: u64 = 2;
const PAGES_PER_WORD: usize = 32;

/// Page states of one region.
#[derive(Debug)]
pub struct PageStates {
    pages: usize,
    state: Box<[AtomicU64]>,
    zero: Box<[AtomicU64]>,
}

fn decode(bits: u64) -> PageState {
    match bits {
        INFLIGHT => PageState::InFlight,
        PRESENT => PageState::Present,
        _ => PageState::Missing,
    }
}

impl PageStates {
    /// `pages` pages, all missing.
    pub fn new(pages: usize) -> PageStates {
        let words = pages.div_ceil(PAGES_PER_WORD);
        let zwords = pages.div_ceil(64);
        PageStates {
            pages,
            state: (0..words).map(|_| AtomicU64::new(0)).collect(),
            zero: (0..zwords).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    fn slot(&self, page: usize) -> (&AtomicU64, u32) {
        assert!(page < self.pages, "page {page} out of {}", self.pages);
        (
            &self.state[page / PAGES_PER_WORD],
            u32::try_from(page % PAGES_PER_WORD).expect("below PAGES_PER_WORD") * 2,
        )
    }

    /// The state of `page`.
    pub fn get(&self, page: usize) -> PageState {
        let (w, shift) = self.slot(page);
        decode((w.load(Ordering::Acquire) >> shift) & 3)
    }

    fn transition(&self, page: usize, from: u64, to: u64) -> bool {
        let (w, shift) = self.slot(page);
        let mut cur = w.load(Ordering::Acquire);
        loop {
            if (cur >> shift) & 3 != from {
                return false;
            }
            let new = (cur & !(3 << shift)) | (to << shift);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Claim a missing page for resolving: true for exactly one caller.
    pub fn try_claim(&self, page: usize) -> bool {
        self.transition(page, MISSING, INFLIGHT)
    }

    /// A claimed page was resolved (or found present: EEXIST).
    pub fn set_present(&self, page: usize) {
        let done = self.transition(page, INFLIGHT, PRESENT);
        debug_assert!(done, "set_present on a page that was not in flight");
    }

    /// Give a claim back without resolving (the range went away, or the client is gone).
    pub fn release(&self, page: usize) {
        self.transition(page, INFLIGHT, MISSING);
    }

    /// Mark a page present whatever its state (a resolve outside the claim protocol succeeded).
    pub fn force_present(&self, page: usize) {
        let (w, shift) = self.slot(page);
        let mut cur = w.load(Ordering::Acquire);
        loop {
            let new = (cur & !(3 << shift)) | (PRESENT << shift);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Whether the page must be served as zeros (it was removed by the client).
    pub fn is_zero(&self, page: usize) -> bool {
        assert!(page < self.pages);
        self.zero[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The client dropped `pages` (REMOVE): they are served as zeros from now on and present
    /// ones become missing. In-flight ones stay with their resolver.
    pub fn remove(&self, pages: std::ops::Range<usize>) {
        let pages = pages.start.min(self.pages)..pages.end.min(self.pages);
        for p in pages.clone() {
            self.zero[p / 64].fetch_or(1 << (p % 64), Ordering::AcqRel);
        }
        for p in pages {
            self.transition(p, PRESENT, MISSING);
        }
    }

    /// Count pages in `state`.
    pub fn count(&self, state: PageState) -> usize {
        (0..self.pages).filter(|&p| self.get(p) == state).count()
    }

    /// Whether every page is present.
    pub fn all_present(&self) -> bool {
        let full_words = self.pages / PAGES_PER_WORD;
        let all_present_word = 0xAAAA_AAAA_AAAA_AAAAu64;
        self.state[..full_words]
            .iter()
            .all(|w| w.load(Ordering::Acquire) == all_present_word)
            && (full_words * PAGES_PER_WORD..self.pages).all(|p| self.get(p) == PageState::Present)
    }

    /// The first page at or after `from` that is missing.
    pub fn next_missing(&self, from: usize) -> Option<usize> {
        let mut p = from;
        while p < self.pages {
            let w = self.state[p / PAGES_PER_WORD].load(Ordering::Acquire);
            if p % PAGES_PER_WORD == 0 && w == 0xAAAA_AAAA_AAAA_AAAA {
                p += PAGES_PER_WORD;
                continue;
            }
            if decode((w >> ((p % PAGES_PER_WORD) * 2)) & 3) == PageState::Missing {
                return Some(p);
            }
            p += 1;
        }
        None
    }

    /// A copy for a forked child: present pages stay present (the child has copies), in-flight
    /// ones become missing (they may or may not have reached the child), zero bits are kept.
    pub fn fork_copy(&self) -> PageStates {
        let out = PageStates::new(self.pages);
        for p in 0..self.pages {
            if self.get(p) == PageState::Present {
                out.force_present(p);
            }
        }
        for (d, s) in out.zero.iter().zip(self.zero.iter()) {
            d.store(s.load(Ordering::Acquire), Ordering::Release);
        }
        out
    }
}

#[cfg(all(test, not(faultline_loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn claim_once_then_present() {
        let s = PageStates::new(100);
        assert!(s.try_claim(40));
        assert!(!s.try_claim(40));
        assert_eq!(s.get(40), PageState::InFlight);
        s.set_present(40);
        assert_eq!(s.get(40), PageState::Present);
        assert!(!s.try_claim(40));
        assert_eq!(s.get(39), PageState::Missing);
        assert_eq!(s.next_missing(40), Some(41));
    }

    #[test]
    fn remove_turns_present_to_missing_zero() {
        let s = PageStates::new(70);
        for p in 0..70 {
            assert!(s.try_claim(p));
            s.set_present(p);
        }
        assert!(s.all_present());
        assert!(s.try_claim(5) || s.get(5) == PageState::Present);
        s.remove(3..66);
        assert_eq!(s.get(2), PageState::Present);
        assert_eq!(s.get(4), PageState::Missing);
        assert!(s.is_zero(65) && s.is_zero(3) && !s.is_zero(66));
        assert!(!s.all_present());
        let child = s.fork_copy();
        assert_eq!(child.get(2), PageState::Present);
        assert!(child.is_zero(10));
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let s = std::sync::Arc::new(PageStates::new(64));
        let wins: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| sc.spawn(|| (0..64).filter(|&p| s.try_claim(p)).count()))
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(wins, 64);
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_model(ops in proptest::collection::vec((0u8..5, 0usize..130), 1..400)) {
            let s = PageStates::new(130);
            let mut model = vec![(PageState::Missing, false); 130];
            for (op, p) in ops {
                match op {
                    0 => {
                        let won = s.try_claim(p);
                        prop_assert_eq!(won, model[p].0 == PageState::Missing);
                        if won { model[p].0 = PageState::InFlight; }
                    }
                    1 => if model[p].0 == PageState::InFlight {
                        s.set_present(p); model[p].0 = PageState::Present;
                    },
                    2 => { s.release(p); if model[p].0 == PageState::InFlight { model[p].0 = PageState::Missing; } }
                    3 => {
                        let end = (p + 7).min(130);
                        s.remove(p..end);
                        for m in &mut model[p..end] {
                            m.1 = true;
                            if m.0 == PageState::Present { m.0 = PageState::Missing; }
                        }
                    }
                    _ => { s.force_present(p); model[p].0 = PageState::Present; }
                }
            }
            for (p, m) in model.iter().enumerate() {
                prop_assert_eq!(s.get(p), m.0);
                prop_assert_eq!(s.is_zero(p), m.1);
            }
            prop_assert_eq!(s.next_missing(0), model.iter().position(|m| m.0 == PageState::Missing));
        }
    }
}

#[cfg(all(test, faultline_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Two workers race to claim the same page: exactly one resolves it.
    #[test]
    fn one_claim_wins() {
        loom::model(|| {
            let s = Arc::new(PageStates::new(2));
            let s2 = Arc::clone(&s);
            let t = loom::thread::spawn(move || {
                if s2.try_claim(1) {
                    s2.set_present(1);
                    1
                } else {
                    0
                }
            });
            let mine = if s.try_claim(1) {
                s.set_present(1);
                1
            } else {
                0
            };
            let theirs = t.join().expect("thread");
            assert_eq!(mine + theirs, 1);
            assert_eq!(s.get(1), PageState::Present);
        });
    }

    /// A REMOVE racing a resolve: whoever later sees the page missing also sees the zero bit.
    #[test]
    fn remove_sets_zero_before_missing() {
        loom::model(|| {
            let s = Arc::new(PageStates::new(1));
            assert!(s.try_claim(0));
            s.set_present(0);
            let s2 = Arc::clone(&s);
            let t = loom::thread::spawn(move || s2.remove(0..1));
            if s.try_claim(0) {
                assert!(
                    s.is_zero(0),
                    "a page claimed after REMOVE must be served as zero"
                );
                s.set_present(0);
            }
            t.join().expect("thread");
            assert!(s.is_zero(0));
        });
    }

    /// A claim racing a neighbour's claim in the same word: both succeed, nothing is lost.
    #[test]
    fn neighbours_share_a_word() {
        loom::model(|| {
            let s = Arc::new(PageStates::new(2));
            let s2 = Arc::clone(&s);
            let t = loom::thread::spawn(move || {
                assert!(s2.try_claim(0));
                s2.set_present(0);
            });
            assert!(s.try_claim(1));
            s.set_present(1);
            t.join().expect("thread");
            assert_eq!(s.get(0), PageState::Present);
            assert_eq!(s.get(1), PageState::Present);
        });
    }

    /// The install protocol (see the module docs and `server/resolve.rs`): a resolver that planned
    /// the source's bytes for a claimed page, a reader that reads a REMOVE of it under the install
    /// lock, and `madvise`, which zaps the page as soon as the event is read. Whatever the order,
    /// the source's bytes are never left in place after the zap: they land before it (and are
    /// zapped) or the resolver, re-checking under the lock, installs zeros.
    #[test]
    fn source_bytes_never_land_after_the_zap() {
        use loom::sync::atomic::{AtomicBool, AtomicU8};
        use loom::sync::RwLock;
        const MISSING: u8 = 0;
        const ZEROS: u8 = 1;
        const SOURCE: u8 = 2;
        loom::model(|| {
            let s = Arc::new(PageStates::new(1));
            assert!(s.try_claim(0), "the resolver's claim, before its plan");
            let install = Arc::new(RwLock::new(()));
            let page = Arc::new(AtomicU8::new(MISSING));
            let read = Arc::new(AtomicBool::new(false));
            // The reader: reads the REMOVE (which lets `madvise` go on) and applies it, holding
            // the install lock exclusively.
            let reader = {
                let (s, install, read) = (Arc::clone(&s), Arc::clone(&install), Arc::clone(&read));
                loom::thread::spawn(move || {
                    let _reading = install.write().expect("lock");
                    read.store(true, Ordering::Release);
                    s.remove(0..1);
                })
            };
            // `madvise`: zaps once the event was read, whenever that is.
            let zap = {
                let (page, read) = (Arc::clone(&page), Arc::clone(&read));
                loom::thread::spawn(move || {
                    while !read.load(Ordering::Acquire) {
                        loom::thread::yield_now();
                    }
                    page.store(MISSING, Ordering::Release);
                })
            };
            // The resolver planned the source's bytes (the page was not removed then); it
            // installs under the install lock, re-checking the zero bit there.
            {
                let _installing = install.read().expect("lock");
                let bytes = if s.is_zero(0) { ZEROS } else { SOURCE };
                page.store(bytes, Ordering::Release);
            }
            reader.join().expect("reader");
            zap.join().expect("madvise");
            assert_ne!(
                page.load(Ordering::Acquire),
                SOURCE,
                "the source's bytes landed after the zap"
            );
        });
    }
}
