//! Non-cooperative events that change the client's address space.
//!
//! - `UFFD_EVENT_FORK`: a served process forks; the kernel hands the server a new userfaultfd for
//!   the child (fork() waits until the event was read). The server adopts it as a session of
//!   its own, with the parent's regions and a copy of its page states, and serves the child's
//!   faults; the pages the parent had at fork time the child already has.
//! - `UFFD_EVENT_REMAP`: `mremap()` moves a served region (mremap waits until the event was
//!   read); the server moves the region, and faults at the new address get the same bytes,
//!   while the pages served before the move went along without a fault.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use faultline::source::MemorySource;
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions};
use faultline_testing::{fill_pattern, in_child, need_features, within, ChildExit};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};

const PAGES: usize = 64;
const HALF: usize = PAGES / 2;
const LIMIT: Duration = Duration::from_secs(30);

/// A fork() in one test copies the other tests' registered ranges into the child: the tests of
/// this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn content() -> Arc<Vec<u8>> {
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        // Every fourth page zero: the parent's zero pages go to the child too.
        if p % 4 != 3 {
            fill_pattern(41, p as u64, chunk);
        }
    }
    Arc::new(v)
}

/// Whether pages `pages` of `m` hold `want`'s bytes.
fn holds(m: &Mapping, want: &[u8], pages: std::ops::Range<usize>) -> bool {
    let mut got = vec![0u8; PAGE_SIZE];
    pages.into_iter().all(|p| {
        m.read(p * PAGE_SIZE, &mut got).is_ok()
            && got[..] == want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    })
}

#[test]
fn a_forked_child_is_adopted_and_served() {
    let _serial = serial();
    if !need_features("fork", Features::EVENT_FORK) {
        return;
    }
    let want = content();
    let uffd = Uffd::new(Features::EVENT_FORK).expect("userfaultfd with EVENT_FORK");
    let m = Arc::new(Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap"));
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let config = ServerConfig {
        workers: 2,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let server = Server::start(config).expect("server");
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let options = SessionOptions {
        label: "parent".into(),
        ..SessionOptions::default()
    };
    let parent = server
        .add_session(uffd, vec![Region::for_mapping(&m, source)], options)
        .expect("session");

    // The parent has the first half when it forks.
    let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
    within(LIMIT, move || {
        assert!(holds(&m2, &want2, 0..HALF), "parent's first half")
    });
    let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
    // The child touches everything: the first half is its copy of the parent's, the second
    // half faults on the child's own userfaultfd, which only the server reads.
    let exit = within(LIMIT, move || {
        in_child(move || if holds(&m2, &want2, 0..PAGES) { 0 } else { 1 })
    });
    assert_eq!(
        exit,
        ChildExit::Code(0),
        "the child read the right bytes everywhere"
    );

    assert_eq!(parent.stats().events_fork, 1, "{:?}", parent.stats());
    let sessions = server.sessions();
    assert_eq!(
        sessions.len(),
        2,
        "the child's userfaultfd became a session"
    );
    let child = sessions
        .iter()
        .find(|s| s.id() != parent.id())
        .expect("child session");
    assert_eq!(child.label(), "parent-child");
    // Counters are complete once the last page is published present (they are added first).
    assert!(
        child.wait_all_present(LIMIT),
        "the child session has every page"
    );
    let cst = child.stats();
    assert_eq!(
        cst.faults, HALF as u64,
        "the child faults only where the parent had nothing: {cst:?}"
    );
    assert_eq!(cst.pages, HALF as u64, "{cst:?}");
    assert_eq!(child.uffd_stats().wake, 0);
    assert_eq!(child.total_pages(), PAGES as u64);

    // The parent goes on being served after the fork.
    let (m2, want2) = (Arc::clone(&m), Arc::clone(&want));
    within(LIMIT, move || {
        assert!(holds(&m2, &want2, 0..PAGES), "parent after the fork")
    });
    assert!(parent.wait_all_present(LIMIT));
    let st = parent.stats();
    assert_eq!(
        st.pages, PAGES as u64,
        "the child's faults were not the parent's: {st:?}"
    );
    assert_eq!(st.faults, PAGES as u64, "{st:?}");
    server.shutdown();
}

/// Serve a region, touch its first half, move it with `mremap`, then touch all of it at the
/// new address, with `workers` workers.
fn remap(workers: usize) {
    let want = content();
    let uffd = Uffd::new(Features::EVENT_REMAP).expect("userfaultfd with EVENT_REMAP");
    let m = Mapping::anonymous(PAGES * PAGE_SIZE).expect("mmap");
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let config = ServerConfig {
        workers,
        readahead: Readahead::Off,
        ..ServerConfig::default()
    };
    let server = Server::start(config).expect("server");
    let source = Arc::new(MemorySource::new(want.as_ref().clone()));
    let session = server
        .add_session(
            uffd,
            vec![Region::for_mapping(&m, source)],
            SessionOptions::default(),
        )
        .expect("session");
    let old = m.addr();
    let want2 = Arc::clone(&want);
    let (moved, new) = within(LIMIT, move || {
        assert!(holds(&m, &want2, 0..HALF), "first half before the move");
        let moved = m
            .remap(PAGES * PAGE_SIZE)
            .map_err(|(_, e)| e)
            .expect("mremap");
        let new = moved.addr();
        // Right after mremap returned: the faults go to the new address.
        assert!(
            holds(&moved, &want2, 0..PAGES),
            "every page at the new address"
        );
        (moved, new)
    });
    assert_ne!(old, new, "the region moved");
    assert!(session.wait_all_present(LIMIT));
    let st = session.stats();
    assert_eq!(st.events_remap, 1, "{st:?}");
    assert_eq!(
        st.faults, PAGES as u64,
        "the moved half did not fault again: {st:?}"
    );
    assert_eq!(st.pages, PAGES as u64, "{st:?}");
    drop(moved);
    server.shutdown();
}

#[test]
fn a_moved_region_is_served_at_its_new_address() {
    let _serial = serial();
    if !need_features("remap", Features::EVENT_REMAP) {
        return;
    }
    // One worker applies a REMAP before it reads the next message.
    for _ in 0..20 {
        remap(1);
    }
}

#[test]
fn a_moved_region_is_served_at_its_new_address_two_workers() {
    let _serial = serial();
    if !need_features("remap", Features::EVENT_REMAP) {
        return;
    }
    for _ in 0..300 {
        remap(2);
    }
}
