//! Non-cooperative events, after the kernel's uffd-unit-tests `events` and `events-wp`, and the
//! faulting thread's id (`THREAD_ID`) — on every memory kind.
//!
//! - FORK: the FORK event hands the parent a userfaultfd for the child's copy of the registered
//!   range; a child reading a missing page is served through it (and, on shared memory, fills the
//!   page cache the parent sees too).
//! - REMAP: `mremap` of a registered range reports where it went; present pages (and their write
//!   protection) move along, and faults at the new address are served.
//! - REMOVE: `MADV_DONTNEED` / `MADV_REMOVE` report the dropped range; a dropped private page
//!   faults again, as does a hole punched in shared memory — but a shared page merely zapped by
//!   `MADV_DONTNEED` stays in the page cache and comes back without a fault.
//! - UNMAP: dropping a registered [`Mapping`] reports the unmapped range.
//!
//! In the `-wp` variants the range is also registered for WP, missing pages are filled
//! write-protected (`COPY_MODE_WP`), and each test writes to them: every first write is a
//! `WP | WRITE` fault, resolved by clearing the protection.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use faultline_testing::{
    in_child, missing_features, need_features, need_kind, pattern_page, serve_fork_safe, within,
    wp_features, ChildExit, FaultServer, Flow,
};
use faultline_uffd::{
    CopyMode, Event, Features, Mapping, MemoryKind, PagefaultFlags, RegisterMode, ResolveErrorKind,
    Resolved, Uffd, WriteprotectMode,
};

/// Safety net for operations that block on a fault or on an event being read.
const LIMIT: Duration = Duration::from_secs(20);

/// A fork() copies every other test's registered ranges and waits for the FORK events of every
/// `EVENT_FORK` userfaultfd of the process: the tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

macro_rules! for_kinds {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn private_anonymous() {
                ($f)(MemoryKind::PrivateAnonymous)
            }
            #[test]
            fn shmem() {
                ($f)(MemoryKind::Shmem)
            }
            #[test]
            fn hugetlb_private() {
                ($f)(MemoryKind::HugetlbPrivate)
            }
            #[test]
            fn hugetlb_shared() {
                ($f)(MemoryKind::HugetlbShared)
            }
        }
    };
}

/// What the handlers saw, in the order each handler thread saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Fault {
        /// Read from a FORK event's userfaultfd.
        child: bool,
        address: u64,
        flags: PagefaultFlags,
        thread_id: Option<u32>,
    },
    Fork,
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
}

fn fault(child: bool, address: u64, flags: PagefaultFlags) -> Seen {
    Seen::Fault {
        child,
        address,
        flags,
        thread_id: None,
    }
}

const READ: PagefaultFlags = PagefaultFlags::empty();
const WP_WRITE: PagefaultFlags = PagefaultFlags::WP.union(PagefaultFlags::WRITE);

/// The handler's state: missing faults are filled with `pattern_page(generation, page)`, where
/// the generation counts the fills of that page (in that process), so a refilled page differs.
struct Ctx {
    page_size: usize,
    /// Fill write-protected, and clear the protection on WP faults.
    wp: bool,
    /// The registered range's current start (moved by REMAP).
    base: AtomicU64,
    log: Sender<Seen>,
    fills: Mutex<HashMap<(bool, u64), u64>>,
    children: Mutex<Vec<(Arc<Uffd>, FaultServer)>>,
}

impl Ctx {
    fn handle(self: &Arc<Ctx>, child: bool, uffd: &Uffd, ev: Event) -> Flow {
        let ps = self.page_size as u64;
        match ev {
            Event::Pagefault {
                address,
                flags,
                thread_id,
            } => {
                let _ = self.log.send(Seen::Fault {
                    child,
                    address,
                    flags,
                    thread_id,
                });
                let page = address & !(ps - 1);
                if flags.contains(PagefaultFlags::WP) {
                    uffd.writeprotect(page, ps, WriteprotectMode::empty())
                        .expect("clear WP");
                    return Flow::Continue;
                }
                let index = (page - self.base.load(Ordering::Acquire)) / ps;
                let generation = {
                    let mut fills = self.fills.lock().expect("fills");
                    let g = fills.entry((child, index)).or_insert(0);
                    *g += 1;
                    *g
                };
                let data = pattern_page(generation, index, self.page_size);
                let mode = if self.wp {
                    CopyMode::WP
                } else {
                    CopyMode::empty()
                };
                match uffd.copy(page, &data, mode) {
                    Ok(Resolved::Complete(n)) => assert_eq!(n, ps),
                    Err(e) if e.kind == ResolveErrorKind::AlreadyPresent => {
                        uffd.wake(page, ps).expect("wake")
                    }
                    other => panic!("copy at {page:#x}: {other:?}"),
                }
            }
            Event::Fork(child_uffd) => {
                let child_uffd = Arc::new(child_uffd);
                let ctx = Arc::clone(self);
                let server = FaultServer::spawn(Arc::clone(&child_uffd), move |u, ev| {
                    ctx.handle(true, u, ev)
                });
                self.children
                    .lock()
                    .expect("children")
                    .push((child_uffd, server));
                // Last: no test forks again before this arrives (see `serve_fork_safe`).
                let _ = self.log.send(Seen::Fork);
            }
            Event::Remap { from, to, len } => {
                self.base.store(to, Ordering::Release);
                let _ = self.log.send(Seen::Remap { from, to, len });
            }
            Event::Remove { start, end } => {
                let _ = self.log.send(Seen::Remove { start, end });
            }
            Event::Unmap { start, end } => {
                let _ = self.log.send(Seen::Unmap { start, end });
            }
            other => panic!("unexpected event {other:?}"),
        }
        Flow::Continue
    }
}

/// A userfaultfd with a running handler (and the mapping it registered, returned separately
/// because some tests move or unmap it).
struct Setup {
    uffd: Arc<Uffd>,
    ctx: Arc<Ctx>,
    log: Receiver<Seen>,
    server: FaultServer,
}

impl Setup {
    /// `None` (after printing why) when the kind or the features are not available.
    fn new(
        test: &str,
        kind: MemoryKind,
        pages: usize,
        extra: Features,
        wp: bool,
    ) -> Option<(Setup, Arc<Mapping>)> {
        // Room for the mapping, a remap target and the child's copies.
        if !need_kind(test, kind, 2 * pages as u64 + 2) {
            return None;
        }
        let mut features = missing_features(kind) | extra;
        let mut mode = RegisterMode::MISSING;
        if wp {
            features |= wp_features(kind);
            mode |= RegisterMode::WP;
        }
        if !need_features(test, features) {
            return None;
        }
        let uffd = Arc::new(Uffd::new(features).expect("userfaultfd"));
        let m = Arc::new(Mapping::new(kind, pages * kind.page_size()).expect("mapping"));
        uffd.register(&m, mode).expect("register");
        let (tx, log) = mpsc::channel();
        let ctx = Arc::new(Ctx {
            page_size: m.page_size(),
            wp,
            base: AtomicU64::new(m.addr()),
            log: tx,
            fills: Mutex::new(HashMap::new()),
            children: Mutex::new(Vec::new()),
        });
        let c = Arc::clone(&ctx);
        let server = serve_fork_safe(Arc::clone(&uffd), move |u, ev| c.handle(false, u, ev));
        Some((
            Setup {
                uffd,
                ctx,
                log,
                server,
            },
            m,
        ))
    }

    fn next(&self) -> Seen {
        self.log.recv_timeout(LIMIT).expect("an event was handled")
    }

    /// Stop all servers; returns the FORK events' userfaultfds and what was logged after the
    /// expected events (which must be nothing).
    fn finish(self) -> (Vec<Arc<Uffd>>, Vec<Seen>) {
        self.server.stop();
        let kids = std::mem::take(&mut *self.ctx.children.lock().expect("children"));
        let kids = kids
            .into_iter()
            .map(|(u, s)| {
                s.stop();
                u
            })
            .collect();
        (kids, self.log.try_iter().collect())
    }
}

/// Read page `page` of `m` (faulting if needed, bounded by [`LIMIT`]).
fn read_page(m: &Arc<Mapping>, page: usize) -> Vec<u8> {
    let m = Arc::clone(m);
    within(LIMIT, move || {
        let ps = m.page_size();
        let mut buf = vec![0; ps];
        m.read(page * ps, &mut buf).expect("read");
        buf
    })
}

/// Write one byte (faulting if needed, bounded by [`LIMIT`]).
fn write_byte(m: &Arc<Mapping>, offset: usize, value: u8) {
    let m = Arc::clone(m);
    within(LIMIT, move || m.write_u8(offset, value)).expect("write");
}

fn events_fork(kind: MemoryKind, wp: bool) {
    let test = if wp {
        "events-wp (fork)"
    } else {
        "events (fork)"
    };
    let _serial = serial();
    let Some((s, m)) = Setup::new(test, kind, 2, Features::EVENT_FORK, wp) else {
        return;
    };
    let (addr, ps) = (m.addr(), m.page_size());
    let child = Arc::clone(&m);
    let exit = within(LIMIT, move || {
        in_child(move || {
            // Missing in the child too: served through the FORK event's userfaultfd.
            let mut buf = vec![0; ps];
            if child.read(0, &mut buf).is_err() || buf != pattern_page(1, 0, ps) {
                return 10;
            }
            if wp && (child.write_u8(1, 0x5a).is_err() || child.read_u8(1) != Ok(0x5a)) {
                return 11;
            }
            0
        })
    });
    assert_eq!(exit, ChildExit::Code(0), "child on {kind}");
    let mut seen: Vec<Seen> = (0..if wp { 3 } else { 2 }).map(|_| s.next()).collect();
    // The child's faults and the FORK notice come from different threads: FORK may be last.
    let fork_at = seen
        .iter()
        .position(|e| *e == Seen::Fork)
        .expect("a FORK event");
    seen.remove(fork_at);
    let mut want = vec![fault(true, addr, READ)];
    if wp {
        want.push(fault(true, addr, WP_WRITE));
    }
    assert_eq!(seen, want);

    // The parent's own page: still missing for private memory (the child filled its copy);
    // shared memory got the child's page in the page cache, which maps without a fault.
    let mut expected = pattern_page(1, 0, ps);
    if kind.is_shared() && wp {
        expected[1] = 0x5a;
    }
    assert!(read_page(&m, 0) == expected, "parent's page 0 on {kind}");
    if !kind.is_shared() {
        assert_eq!(s.next(), fault(false, addr, READ));
    }
    let parent = Arc::clone(&s.uffd);
    let (children, rest) = s.finish();
    assert_eq!(rest, vec![]);
    assert_eq!(children.len(), 1);
    let c = children[0].stats();
    assert_eq!((c.copy, c.writeprotect), (1, u64::from(wp)));
    assert_eq!(parent.stats().copy, u64::from(!kind.is_shared()));
}

for_kinds!(events_fork, |k| events_fork(k, false));
for_kinds!(events_wp_fork, |k| events_fork(k, true));

fn events_remap(kind: MemoryKind, wp: bool) {
    let test = if wp {
        "events-wp (remap)"
    } else {
        "events (remap)"
    };
    let _serial = serial();
    const PAGES: usize = 4;
    let Some((s, m)) = Setup::new(test, kind, PAGES, Features::EVENT_REMAP, wp) else {
        return;
    };
    let (old, ps) = (m.addr(), m.page_size());
    assert!(read_page(&m, 0) == pattern_page(1, 0, ps));
    assert_eq!(s.next(), fault(false, old, READ));

    // mremap waits until the handler has read the REMAP event.
    let m = Arc::try_unwrap(m).expect("no other user of the mapping");
    let m = within(LIMIT, move || m.remap(PAGES * ps).map_err(|(_, e)| e)).expect("mremap");
    let m = Arc::new(m);
    let new = m.addr();
    assert_ne!(new, old);
    let len = (PAGES * ps) as u64;
    assert_eq!(
        s.next(),
        Seen::Remap {
            from: old,
            to: new,
            len
        }
    );

    // The present page moved along: no fault.
    assert!(read_page(&m, 0) == pattern_page(1, 0, ps));
    // A missing page faults at its new address.
    assert!(read_page(&m, 2) == pattern_page(1, 2, ps));
    assert_eq!(s.next(), fault(false, new + 2 * ps as u64, READ));
    if wp {
        // Page 0 was filled protected before the move, and is still protected after it.
        write_byte(&m, 0, 0x11);
        assert_eq!(s.next(), fault(false, new, WP_WRITE));
        write_byte(&m, 2 * ps, 0x22);
        assert_eq!(s.next(), fault(false, new + 2 * ps as u64, WP_WRITE));
        assert_eq!((m.read_u8(0), m.read_u8(2 * ps)), (Ok(0x11), Ok(0x22)));
    }
    let uffd = Arc::clone(&s.uffd);
    let (_, rest) = s.finish();
    assert_eq!(rest, vec![]);
    let st = uffd.stats();
    assert_eq!((st.copy, st.writeprotect), (2, if wp { 2 } else { 0 }));
}

for_kinds!(events_remap, |k| events_remap(k, false));
for_kinds!(events_wp_remap, |k| events_remap(k, true));

fn events_remove(kind: MemoryKind, wp: bool) {
    let test = if wp {
        "events-wp (remove)"
    } else {
        "events (remove)"
    };
    let _serial = serial();
    let Some((s, m)) = Setup::new(test, kind, 2, Features::EVENT_REMOVE, wp) else {
        return;
    };
    let (addr, ps) = (m.addr(), m.page_size());
    let psz = ps as u64;
    assert!(read_page(&m, 0) == pattern_page(1, 0, ps));
    assert_eq!(s.next(), fault(false, addr, READ));
    if wp {
        write_byte(&m, 0, 0x33);
        assert_eq!(s.next(), fault(false, addr, WP_WRITE));
    }

    // Drop page 0 (private memory: MADV_DONTNEED; shared memory: MADV_REMOVE punches a hole).
    // madvise waits until the handler has read the REMOVE event.
    let m2 = Arc::clone(&m);
    let shared = kind.is_shared();
    within(LIMIT, move || {
        if shared {
            m2.remove(0, ps)
        } else {
            m2.discard(0, ps)
        }
    })
    .expect("madvise");
    assert_eq!(
        s.next(),
        Seen::Remove {
            start: addr,
            end: addr + psz
        }
    );
    // It faults again, and is filled afresh (generation 2).
    assert!(read_page(&m, 0) == pattern_page(2, 0, ps));
    assert_eq!(s.next(), fault(false, addr, READ));
    if wp {
        write_byte(&m, 0, 0x44);
        assert_eq!(s.next(), fault(false, addr, WP_WRITE));
        assert_eq!(m.read_u8(0), Ok(0x44));
    }
    let mut copies = 2;
    if shared {
        // MADV_DONTNEED on shared memory reports REMOVE too, but only zaps the mapping: the page
        // stays in the page cache and comes back without a fault.
        assert!(read_page(&m, 1) == pattern_page(1, 1, ps));
        assert_eq!(s.next(), fault(false, addr + psz, READ));
        let m2 = Arc::clone(&m);
        within(LIMIT, move || m2.discard(ps, ps)).expect("MADV_DONTNEED");
        assert_eq!(
            s.next(),
            Seen::Remove {
                start: addr + psz,
                end: addr + 2 * psz
            }
        );
        assert!(read_page(&m, 1) == pattern_page(1, 1, ps));
        copies += 1;
    }
    let uffd = Arc::clone(&s.uffd);
    let (_, rest) = s.finish();
    assert_eq!(rest, vec![]);
    assert_eq!(uffd.stats().copy, copies);
}

for_kinds!(events_remove, |k| events_remove(k, false));
for_kinds!(events_wp_remove, |k| events_remove(k, true));

fn events_unmap(kind: MemoryKind, wp: bool) {
    let test = if wp {
        "events-wp (unmap)"
    } else {
        "events (unmap)"
    };
    let _serial = serial();
    let Some((s, m)) = Setup::new(test, kind, 2, Features::EVENT_UNMAP, wp) else {
        return;
    };
    let (addr, len, ps) = (m.addr(), m.len() as u64, m.page_size());
    assert!(read_page(&m, 1) == pattern_page(1, 1, ps));
    let page1 = addr + ps as u64;
    assert_eq!(s.next(), fault(false, page1, READ));
    if wp {
        write_byte(&m, ps, 0x55);
        assert_eq!(s.next(), fault(false, page1, WP_WRITE));
    }
    // munmap waits until the handler has read the UNMAP event.
    let m = Arc::try_unwrap(m).expect("no other user of the mapping");
    within(LIMIT, move || drop(m));
    assert_eq!(
        s.next(),
        Seen::Unmap {
            start: addr,
            end: addr + len
        }
    );
    let (_, rest) = s.finish();
    assert_eq!(rest, vec![]);
}

for_kinds!(events_unmap, |k| events_unmap(k, false));
for_kinds!(events_wp_unmap, |k| events_unmap(k, true));

fn thread_id(kind: MemoryKind) {
    let test = "thread id";
    let _serial = serial();
    let Some((s, m)) = Setup::new(test, kind, 1, Features::THREAD_ID, false) else {
        return;
    };
    let (addr, ps) = (m.addr(), m.page_size());
    let toucher = Arc::clone(&m);
    let (tid, byte) = within(LIMIT, move || {
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        (tid, toucher.read_u8(0))
    });
    assert_eq!(byte, Ok(pattern_page(1, 0, ps)[0]));
    let me = rustix::thread::gettid().as_raw_nonzero().get();
    assert_ne!(tid, me, "the toucher is another thread");
    let tid = u32::try_from(tid).expect("positive tid");
    assert_eq!(
        s.next(),
        Seen::Fault {
            child: false,
            address: addr,
            flags: READ,
            thread_id: Some(tid)
        }
    );
    let (_, rest) = s.finish();
    assert_eq!(rest, vec![]);

    // Without the feature the message carries no thread id.
    drop(m);
    let Some((s, m)) = Setup::new(test, kind, 1, Features::empty(), false) else {
        return;
    };
    assert!(read_page(&m, 0) == pattern_page(1, 0, ps));
    assert_eq!(s.next(), fault(false, m.addr(), READ));
    let _ = s.finish();
}

for_kinds!(thread_id, thread_id);
