//! The equivalent of the kernel's `uffd-stress`: memory bounces between two areas through
//! userfaultfd while threads hammer it.
//!
//! Each round, area `dst` is registered (MISSING) and emptied, then served from area `src`:
//! - toucher threads walk every page of `dst` (spread, racing or shuffled order), each touch
//!   taking a per-page lock, checking the page's counter (its first 8 bytes) against the expected
//!   value and incrementing it — a wrong, zero or torn page is caught at once;
//! - handler threads resolve the faults the touchers cause, by COPY from `src` (or MOVE);
//! - filler threads transfer every page in the background, racing the handlers (EEXIST is normal).
//!
//! At the end of a round every byte of `dst` is checked (counters and the page bodies), each page
//! must have been resolved exactly once, the ioctl counters must add up, then the areas swap.
//! Private anonymous memory bounces by COPY and by MOVE; shmem bounces by COPY.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline_testing::{need_features, serve_batches, within, Flow};
use faultline_uffd::{
    CopyMode, Event, Features, Mapping, MemoryKind, MoveMode, RegisterMode, ResolveErrorKind,
    Resolved, Uffd, PAGE_SIZE,
};

const AREA: usize = 64 << 20;
const PAGES: usize = AREA / PAGE_SIZE;
const WORDS: usize = PAGE_SIZE / 8;
const TOUCHERS: usize = 4;
const HANDLERS: usize = 2;
const FILLERS: usize = 2;
const LIMIT: Duration = Duration::from_secs(90);
const PAGE: u64 = PAGE_SIZE as u64;

/// Word `w` (1..512) of page `page`'s body; word 0 is the page's counter. Word 1 names the page
/// (a page landing at the wrong place is caught), the others are the same pseudo-random words on
/// every page (a zero, torn or partial page is caught), which keeps building the image cheap.
fn body_word(page: usize, w: usize) -> u64 {
    if w == 1 {
        return 0xFA17_0000_0000_0000 | page as u64;
    }
    let mut x = (w as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn read_word(m: &Mapping, page: usize, w: usize) -> u64 {
    let mut b = [0u8; 8];
    m.read(page * PAGE_SIZE + w * 8, &mut b).expect("in bounds");
    u64::from_ne_bytes(b)
}

fn write_word(m: &Mapping, page: usize, w: usize, v: u64) {
    m.write(page * PAGE_SIZE + w * 8, &v.to_ne_bytes())
        .expect("in bounds");
}

/// The expected content of an area: counters of 0 and the page bodies. Built once; the counters
/// are patched in before each check.
fn initial_image() -> Vec<u8> {
    let mut template = vec![0u8; PAGE_SIZE];
    for w in 2..WORDS {
        template[w * 8..w * 8 + 8].copy_from_slice(&body_word(0, w).to_ne_bytes());
    }
    let mut image = vec![0u8; AREA];
    for (page, bytes) in image.chunks_exact_mut(PAGE_SIZE).enumerate() {
        bytes.copy_from_slice(&template);
        bytes[8..16].copy_from_slice(&body_word(page, 1).to_ne_bytes());
    }
    image
}

/// Fill `m` with `image` (before it is ever registered).
fn fill(m: &Mapping, image: &[u8]) {
    assert_eq!(image.len(), m.len());
    // SAFETY: `m` is a live, writable, unregistered mapping of `image.len()` bytes that nothing
    // else accesses yet; the two ranges are distinct allocations. Raw pointers only, no reference
    // into the mapping is formed.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), m.as_ptr(), image.len()) };
}

/// Check every byte of `m` against `image` with the counters patched in. `m` must be unregistered
/// and no thread may touch it any more (the check copies it in bulk, which a debug build does
/// much faster than volatile loads).
fn verify_all(m: &Mapping, image: &mut [u8], counters: &[Mutex<u64>], round: usize) {
    for (page, c) in counters.iter().enumerate() {
        let at = page * PAGE_SIZE;
        image[at..at + 8].copy_from_slice(&c.lock().expect("lock").to_ne_bytes());
    }
    let mut got = vec![0u8; m.len()];
    // SAFETY: `m` is a live mapping of `got.len()` bytes, no longer registered and no longer
    // written by any thread (all joined); a missing page would read as zeros and be reported.
    // Raw pointers only, no reference into the mapping is formed.
    unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), got.as_mut_ptr(), got.len()) };
    if got != image {
        let at = got
            .iter()
            .zip(image.iter())
            .position(|(a, b)| a != b)
            .expect("a difference");
        panic!(
            "round {round}: page {} word {} corrupted",
            at / PAGE_SIZE,
            at % PAGE_SIZE / 8
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Copy,
    Move,
}

#[derive(Debug, Clone, Copy)]
enum Order {
    /// Toucher t starts at page t * PAGES / TOUCHERS.
    Spread,
    /// All touchers walk the same pages in the same order, faulting on the same page together.
    Racing,
    /// Each toucher walks its own random permutation of the pages.
    Shuffled,
}

/// What the resolves of one round did.
struct Outcomes {
    resolved: AtomicU64,
    already_present: AtomicU64,
    /// MOVE only: the source page was gone because a concurrent MOVE of the same page won
    /// between the kernel's check of the destination and of the source.
    source_gone: AtomicU64,
    per_page: Vec<AtomicU64>,
}

impl Outcomes {
    fn new() -> Outcomes {
        Outcomes {
            resolved: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
            source_gone: AtomicU64::new(0),
            per_page: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The addresses of one round, shared with the handler threads (which must be `'static`).
#[derive(Clone, Copy)]
struct Bounce {
    transfer: Transfer,
    src: u64,
    dst: u64,
}

impl Bounce {
    /// Transfer one page from `src` to `dst`, as a handler or a filler does.
    fn resolve(self, uffd: &Uffd, page: usize, out: &Outcomes) {
        let off = page as u64 * PAGE;
        loop {
            let r = match self.transfer {
                // The source is a live mapping of this process that no one writes during the round.
                Transfer::Copy => uffd.copy_from_ptr(
                    self.dst + off,
                    (self.src + off) as *const u8,
                    PAGE_SIZE,
                    CopyMode::empty(),
                ),
                // SAFETY: the source is a `Mapping` (never referenced by Rust code) that nobody
                // reads during a MOVE round; its pages leaving is the point of the round.
                Transfer::Move => unsafe {
                    uffd.move_pages(self.dst + off, self.src + off, PAGE, MoveMode::empty())
                },
            };
            match r {
                Ok(Resolved::Complete(n)) => {
                    assert_eq!(n, PAGE);
                    out.resolved.fetch_add(1, Ordering::Relaxed);
                    out.per_page[page].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind == ResolveErrorKind::AlreadyPresent => {
                    out.already_present.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind == ResolveErrorKind::Retry => continue,
                Err(e)
                    if e.kind == ResolveErrorKind::NotRegistered
                        && self.transfer == Transfer::Move =>
                {
                    out.source_gone.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("{:?} of page {page}: {other:?}", self.transfer),
            }
            return;
        }
    }
}

/// A cheap deterministic generator for the shuffled order.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn touch_all(dst: &Mapping, counters: &[Mutex<u64>], order: Order, t: usize) {
    let pages: Vec<usize> = match order {
        Order::Spread => (0..PAGES)
            .map(|i| (i + t * PAGES / TOUCHERS) % PAGES)
            .collect(),
        Order::Racing => (0..PAGES).collect(),
        Order::Shuffled => {
            let mut v: Vec<usize> = (0..PAGES).collect();
            let mut s = 0x2545_F491_4F6C_DD1D ^ (t as u64 + 1);
            for i in (1..v.len()).rev() {
                v.swap(
                    i,
                    usize::try_from(xorshift(&mut s) % (i as u64 + 1)).expect("fits usize"),
                );
            }
            v
        }
    };
    for (i, page) in pages.into_iter().enumerate() {
        let w = 1 + i % (WORDS - 1);
        if t % 2 == 1 {
            // Odd touchers fault with a write: store the word's own value into the body.
            write_word(dst, page, w, body_word(page, w));
        }
        {
            let mut expected = counters[page].lock().expect("lock");
            let got = read_word(dst, page, 0);
            assert_eq!(got, *expected, "page {page}: counter corrupted");
            write_word(dst, page, 0, got + 1);
            *expected = got + 1;
        }
        assert_eq!(
            read_word(dst, page, w),
            body_word(page, w),
            "page {page} word {w}"
        );
    }
}

/// Run the bounce rounds between two areas of `kind`.
fn bounce(kind: MemoryKind, uffd: Arc<Uffd>, rounds: &[(Transfer, Order)]) {
    let started = Instant::now();
    let mut src = Mapping::new(kind, AREA).expect("map area A");
    let mut dst = Mapping::new(kind, AREA).expect("map area B");
    let mut image = initial_image();
    fill(&src, &image);
    let counters: Arc<Vec<Mutex<u64>>> = Arc::new((0..PAGES).map(|_| Mutex::new(0)).collect());
    let release = |m: &Mapping| match kind {
        MemoryKind::PrivateAnonymous => m.discard(0, AREA).expect("MADV_DONTNEED"),
        _ => m.remove(0, AREA).expect("MADV_REMOVE"),
    };

    for (round, &(transfer, order)) in rounds.iter().enumerate() {
        let before = uffd.stats();
        uffd.register(&dst, RegisterMode::MISSING)
            .expect("register dst");
        // Empty the destination after registering it (the previous round left its pages there).
        release(&dst);
        let b = Bounce {
            transfer,
            src: src.addr(),
            dst: dst.addr(),
        };
        let out = Arc::new(Outcomes::new());
        let handlers: Vec<_> = (0..HANDLERS)
            .map(|_| {
                let out = Arc::clone(&out);
                serve_batches(Arc::clone(&uffd), 32, move |uffd, batch| {
                    for ev in batch.drain(..) {
                        let Event::Pagefault { address, .. } = ev else {
                            panic!("unexpected event {ev:?}");
                        };
                        b.resolve(uffd, ((address - b.dst) / PAGE) as usize, &out);
                    }
                    Flow::Continue
                })
            })
            .collect();
        std::thread::scope(|s| {
            for f in 0..FILLERS {
                let (uffd, out) = (&uffd, &out);
                s.spawn(move || {
                    for page in f * PAGES / FILLERS..(f + 1) * PAGES / FILLERS {
                        b.resolve(uffd, page, out);
                    }
                });
            }
            for t in 0..TOUCHERS {
                let (dst, counters) = (&dst, &counters);
                s.spawn(move || touch_all(dst, counters, order, t));
            }
        });
        // Every filler and toucher is done: no fault can be pending.
        for h in handlers {
            h.stop();
        }

        for (page, n) in out.per_page.iter().enumerate() {
            assert_eq!(
                n.load(Ordering::Relaxed),
                1,
                "round {round}: page {page} resolved != once"
            );
        }
        let (resolved, already, gone) = (
            out.resolved.load(Ordering::Relaxed),
            out.already_present.load(Ordering::Relaxed),
            out.source_gone.load(Ordering::Relaxed),
        );
        assert_eq!(resolved, PAGES as u64);
        let after = uffd.stats();
        let issued = match transfer {
            Transfer::Copy => after.copy - before.copy,
            Transfer::Move => after.move_ - before.move_,
        };
        let eexist = after.eexist - before.eexist;
        let eagain = after.eagain - before.eagain;
        assert_eq!(eexist, already);
        assert_eq!(
            issued,
            resolved + already + gone + eagain,
            "round {round}: ioctl count"
        );
        assert_eq!(issued - eexist - gone - eagain, PAGES as u64);
        uffd.unregister_mapping(&dst).expect("unregister dst");
        verify_all(&dst, &mut image, &counters, round);
        if transfer == Transfer::Move {
            // MOVE took every page out of the source: it reads as zero now.
            for page in (0..PAGES).step_by(97) {
                assert_eq!(
                    read_word(&src, page, 1),
                    0,
                    "page {page} still in the source"
                );
            }
        }
        release(&src);
        eprintln!(
            "{kind} round {round} ({transfer:?}, {order:?}): {} faults read, {issued} {transfer:?} \
             ({already} EEXIST, {gone} source gone, {eagain} EAGAIN), {:.2?} elapsed",
            after.events - before.events,
            started.elapsed()
        );
        std::mem::swap(&mut src, &mut dst);
    }
    // Every touch of every round landed: each counter counts TOUCHERS touches per round.
    for c in counters.iter() {
        assert_eq!(*c.lock().expect("lock"), (TOUCHERS * rounds.len()) as u64);
    }
}

#[test]
fn anonymous_memory_bounces_by_copy_and_move() {
    let uffd = Uffd::builder()
        .request(Features::MOVE)
        .create()
        .expect("uffd");
    let mut rounds = vec![
        (Transfer::Copy, Order::Spread),
        (Transfer::Copy, Order::Racing),
    ];
    if uffd.features().contains(Features::MOVE) {
        rounds.push((Transfer::Move, Order::Shuffled));
        rounds.push((Transfer::Move, Order::Racing));
        rounds.push((Transfer::Copy, Order::Shuffled));
    } else {
        eprintln!("skipped: MOVE rounds: the kernel lacks UFFD_FEATURE_MOVE");
    }
    let uffd = Arc::new(uffd);
    within(LIMIT, move || {
        bounce(MemoryKind::PrivateAnonymous, uffd, &rounds)
    });
}

#[test]
fn shmem_bounces_by_copy() {
    if !need_features("shmem stress", Features::MISSING_SHMEM) {
        return;
    }
    let uffd = Arc::new(Uffd::new(Features::MISSING_SHMEM).expect("uffd"));
    within(LIMIT, move || {
        bounce(
            MemoryKind::Shmem,
            uffd,
            &[
                (Transfer::Copy, Order::Shuffled),
                (Transfer::Copy, Order::Racing),
            ],
        )
    });
}
