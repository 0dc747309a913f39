//! Source read failures: a page whose source cannot be read is poisoned (`UFFDIO_POISON`), so
//! the client gets SIGBUS on that page and only there — never a wrong page — while a failure
//! that heals within the server's attempts is retried with backoff and served correctly.
//!
//! A poisoned page kills whoever touches it, so those scenarios run in a forked child that
//! creates its own userfaultfd, mapping and server (the test process's threads do not exist in
//! the child); the child reports a failed check by its exit code and a line on stderr.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::source::{Failure, FailureInjecting, FailureStats, MemorySource};
use faultline::{Readahead, Region, Server, ServerConfig, SessionOptions, Stats};
use faultline_testing::{fill_pattern, in_child, need_features, within, ChildExit};
use faultline_uffd::{Features, Mapping, RegisterMode, Uffd, PAGE_SIZE};

const PAGES: usize = 64;
/// The page whose source fails.
const BAD: usize = 37;
/// Safety net against a lost fault (a child that hangs fails the test instead).
const LIMIT: Duration = Duration::from_secs(30);

fn content() -> Vec<u8> {
    let mut v = vec![0u8; PAGES * PAGE_SIZE];
    for (p, chunk) in v.chunks_mut(PAGE_SIZE).enumerate() {
        fill_pattern(5, p as u64, chunk);
    }
    v
}

/// What a scenario sees: the client's memory, the expected bytes and the server's counters.
struct Client {
    m: Mapping,
    want: Vec<u8>,
    source: Arc<FailureInjecting<MemorySource>>,
    session: faultline::SessionHandle,
}

impl Client {
    /// Read page `p` whole and compare it with the source.
    fn check(&self, p: usize) -> Result<(), String> {
        let mut got = vec![0u8; PAGE_SIZE];
        self.m
            .read(p * PAGE_SIZE, &mut got)
            .map_err(|e| format!("read page {p}: {e}"))?;
        if got[..] != self.want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] {
            return Err(format!("page {p} has wrong bytes"));
        }
        Ok(())
    }
    /// The counters, once every page but `except` is published present (the server adds to its
    /// counters before publishing a page; a client woken by the resolve can be faster).
    fn stats_settled(&self, except: Option<usize>) -> Result<Stats, String> {
        let offsets: Vec<u64> = (0..PAGES)
            .filter(|&p| Some(p) != except)
            .map(|p| (p * PAGE_SIZE) as u64)
            .collect();
        let deadline = Instant::now() + LIMIT;
        while !self.session.offsets_present(&offsets) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "pages never all present: {:?}",
                    self.session.stats()
                ));
            }
            std::thread::yield_now();
        }
        Ok(self.session.stats())
    }
    fn failures(&self) -> FailureStats {
        self.source.stats()
    }
}

/// Serve a fresh mapping from a source failing as `rule` says, under `readahead`, and run
/// `scenario` as the client. Runs in whatever process calls it.
fn serve(
    rule: Failure,
    readahead: Readahead,
    scenario: impl FnOnce(&Client) -> Result<(), String>,
) -> Result<(), String> {
    let want = content();
    let source = Arc::new(FailureInjecting::new(MemorySource::new(want.clone())).with_rule(rule));
    let uffd = Uffd::new(Features::POISON).map_err(|e| format!("userfaultfd: {e}"))?;
    let m = Mapping::anonymous(PAGES * PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
    uffd.register(&m, RegisterMode::MISSING)
        .map_err(|e| format!("register: {e}"))?;
    let config = ServerConfig {
        workers: 2,
        readahead,
        retry_backoff: Duration::from_micros(200),
        ..ServerConfig::default()
    };
    let server = Server::start(config).map_err(|e| format!("server: {e}"))?;
    let region = Region::for_mapping(&m, source.clone());
    let session = server
        .add_session(uffd, vec![region], SessionOptions::default())
        .map_err(|e| format!("session: {e}"))?;
    let client = Client {
        m,
        want,
        source,
        session,
    };
    let r = scenario(&client);
    server.shutdown();
    r
}

/// Run a scenario in a forked child: exit 0 when it returns Ok, 1 (after printing why) when not.
/// A child that dies of a signal reports it as such.
fn child(
    rule: Failure,
    readahead: Readahead,
    scenario: impl FnOnce(&Client) -> Result<(), String> + Send + 'static,
) -> ChildExit {
    within(LIMIT, move || {
        in_child(move || match serve(rule, readahead, scenario) {
            Ok(()) => 0,
            Err(why) => {
                // The test harness's output capture does not reach a forked child: write the
                // reason straight to the inherited stderr.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("child: {why}\n").as_bytes(),
                );
                1
            }
        })
    })
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn permanent() -> Failure {
    Failure::PermanentAt {
        offset: (BAD * PAGE_SIZE + 100) as u64,
    }
}

#[test]
fn touching_a_page_whose_source_fails_for_good_raises_sigbus() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    let exit = child(permanent(), Readahead::Off, |c| {
        c.check(BAD - 1)?;
        c.check(BAD + 1)?;
        // Dies here of SIGBUS.
        let _ = c.m.read_u8(BAD * PAGE_SIZE + 5);
        Err(format!(
            "page {BAD} was readable; stats {:?}",
            c.session.stats()
        ))
    });
    assert_eq!(
        exit,
        ChildExit::Signal(libc::SIGBUS),
        "the client must die of SIGBUS on page {BAD}"
    );
}

#[test]
fn every_other_page_is_served_when_one_source_page_fails() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    let exit = child(permanent(), Readahead::Off, |c| {
        for p in (0..PAGES).filter(|&p| p != BAD) {
            c.check(p)?;
        }
        let st = c.stats_settled(Some(BAD))?;
        // Without readahead nothing read the bad page: nothing failed, nothing was poisoned.
        expect(st.pages == PAGES as u64 - 1, || format!("pages: {st:?}"))?;
        expect(
            st.source_errors == 0 && st.poisoned_pages == 0 && st.poison == 0,
            || format!("nothing failed: {st:?}"),
        )?;
        expect(c.failures().permanent == 0, || {
            format!("{:?}", c.failures())
        })
    });
    assert_eq!(exit, ChildExit::Code(0));
}

#[test]
fn readahead_over_a_failing_page_poisons_only_that_page() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    // 16-page windows: the window holding the bad page fails as a whole, is retried a page at a
    // time, and only the bad page is poisoned; its neighbours are served.
    let exit = child(permanent(), Readahead::Fixed { pages: 16 }, |c| {
        for p in (0..PAGES).filter(|&p| p != BAD) {
            c.check(p)?;
        }
        let st = c.stats_settled(None)?;
        expect(st.poisoned_pages == 1 && st.poison == 1, || {
            format!("one page poisoned: {st:?}")
        })?;
        expect(st.source_errors >= 1 && st.source_retries == 0, || {
            format!("a permanent error is not retried: {st:?}")
        })?;
        expect(st.pages == PAGES as u64 - 1, || {
            format!("every other page served: {st:?}")
        })?;
        expect(c.session.uffd_stats().poison == 1, || {
            format!("{:?}", c.session.uffd_stats())
        })?;
        // The poisoned page raises SIGBUS: the child dies here.
        let _ = c.m.read_u8(BAD * PAGE_SIZE);
        Err(format!(
            "page {BAD} was readable after being poisoned; stats {st:?}"
        ))
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS));
}

#[test]
fn a_retryable_failure_that_never_heals_is_poisoned_after_the_attempts() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    let rule = Failure::RetryableAt {
        offset: (BAD * PAGE_SIZE) as u64,
        times: u64::MAX,
    };
    let exit = child(rule, Readahead::Off, |c| {
        c.check(BAD + 1)?;
        let _ = c.m.read_u8(BAD * PAGE_SIZE);
        Err(format!(
            "page {BAD} was readable; stats {:?}",
            c.session.stats()
        ))
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS));
}

/// The server's default attempts per page; `N` failures of fewer never exhaust them.
const ATTEMPTS: u32 = 4;

#[test]
fn the_first_reads_failing_are_retried_and_served() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    assert_eq!(ServerConfig::default().source_attempts, ATTEMPTS);
    let n = u64::from(ATTEMPTS - 1);
    // In a child too: a wrongly poisoned page would kill the process that touches it.
    let exit = child(Failure::FirstReads(n), Readahead::Off, move |c| {
        for p in 0..PAGES {
            c.check(p)?;
        }
        let st = c.stats_settled(None)?;
        let f = c.failures();
        expect(f.retryable == n && f.injected == n, || {
            format!("{n} injected: {f:?}")
        })?;
        expect(st.source_errors == n && st.source_retries == n, || {
            format!("each failure retried: {st:?}")
        })?;
        expect(st.deferred >= n, || {
            format!("retries go through the deferred queue: {st:?}")
        })?;
        expect(st.poisoned_pages == 0 && st.poison == 0, || {
            format!("nothing poisoned: {st:?}")
        })?;
        expect(st.pages == PAGES as u64, || format!("{st:?}"))
    });
    assert_eq!(exit, ChildExit::Code(0));
}

#[test]
fn one_page_failing_a_few_times_heals_after_retries() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    let times = u64::from(ATTEMPTS - 1);
    let rule = Failure::RetryableAt {
        offset: (BAD * PAGE_SIZE + 8) as u64,
        times,
    };
    let exit = child(
        rule,
        Readahead::Adaptive {
            min_pages: 1,
            max_pages: 16,
        },
        move |c| {
            for p in 0..PAGES {
                c.check(p)?;
            }
            let st = c.stats_settled(None)?;
            expect(st.source_retries == times && st.poisoned_pages == 0, || {
                format!("{st:?}")
            })?;
            expect(st.pages == PAGES as u64, || format!("{st:?}"))?;
            expect(c.failures().retryable == times, || {
                format!("{:?}", c.failures())
            })
        },
    );
    assert_eq!(exit, ChildExit::Code(0));
}

#[test]
fn slow_reads_are_waited_for_and_served_right() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    // Every read takes 2 ms: nothing times out, nothing is poisoned, every byte is right.
    let exit = child(
        Failure::Slow(Duration::from_millis(2)),
        Readahead::Off,
        move |c| {
            for p in 0..PAGES {
                c.check(p)?;
            }
            let st = c.stats_settled(None)?;
            let f = c.failures();
            expect(f.slowed > 0 && f.injected == 0, || {
                format!("reads were slowed, none failed: {f:?}")
            })?;
            expect(st.poisoned_pages == 0 && st.source_errors == 0, || {
                format!("{st:?}")
            })?;
            expect(st.pages == PAGES as u64, || format!("{st:?}"))
        },
    );
    assert_eq!(exit, ChildExit::Code(0));
}

#[test]
fn a_short_read_poisons_only_the_page_it_cuts() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    // The source ends early inside page BAD: that page cannot be served whole, so it is poisoned
    // (SIGBUS when touched); the pages before it are served from the bytes that were there.
    let rule = Failure::ShortReadAt {
        offset: (BAD * PAGE_SIZE + 1000) as u64,
    };
    let exit = child(rule, Readahead::Off, move |c| {
        for p in (0..PAGES).filter(|&p| p != BAD) {
            c.check(p)?;
        }
        // The bad page: a read of it must raise SIGBUS, never return bytes.
        let _ = c.m.read_u8(BAD * PAGE_SIZE);
        Err("the short-read page was readable".into())
    });
    assert_eq!(exit, ChildExit::Signal(libc::SIGBUS));
}

/// A source that lends (or says it read) something other than whole pages of what it was asked
/// for, at page [`BAD`]: a broken source.
#[derive(Debug)]
struct BadLender {
    inner: MemorySource,
    lend_too_much: bool,
}

impl faultline::PageSource for BadLender {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> String {
        "bad lender".into()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), faultline::SourceError> {
        self.inner.read_at(offset, buf)
    }
    fn read_or_lend(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<faultline::source::Lend, faultline::SourceError> {
        use faultline::source::{Lend, Lent};
        self.inner.read_at(offset, buf)?;
        let bad = offset / PAGE_SIZE as u64 == BAD as u64;
        Ok(match (bad, self.lend_too_much) {
            (false, _) => Lend::Read(buf.len()),
            // Less than a page.
            (true, false) => Lend::Read(100),
            // More than was asked for.
            (true, true) => {
                let bytes: Arc<dyn AsRef<[u8]> + Send + Sync> =
                    Arc::new(vec![7u8; buf.len() + PAGE_SIZE]);
                Lend::Lent(Lent::new(bytes, 0..buf.len() + PAGE_SIZE).expect("inside the buffer"))
            }
        })
    }
}

#[test]
fn a_source_that_lends_or_reads_other_than_whole_pages_gets_its_page_poisoned() {
    if !need_features("poison", Features::POISON) {
        return;
    }
    for lend_too_much in [false, true] {
        let exit = within(LIMIT, move || {
            in_child(move || {
                let run = || -> Result<(), String> {
                    let want = content();
                    let source = Arc::new(BadLender {
                        inner: MemorySource::new(want.clone()),
                        lend_too_much,
                    });
                    let uffd = Uffd::new(Features::POISON).map_err(|e| e.to_string())?;
                    let m = Mapping::anonymous(PAGES * PAGE_SIZE).map_err(|e| e.to_string())?;
                    uffd.register(&m, RegisterMode::MISSING)
                        .map_err(|e| e.to_string())?;
                    let config = ServerConfig {
                        workers: 1,
                        readahead: Readahead::Off,
                        ..ServerConfig::default()
                    };
                    let server = Server::start(config).map_err(|e| e.to_string())?;
                    let _session = server
                        .add_session(
                            uffd,
                            vec![Region::for_mapping(&m, source)],
                            SessionOptions::default(),
                        )
                        .map_err(|e| e.to_string())?;
                    let mut page = vec![0u8; PAGE_SIZE];
                    for p in [BAD - 1, BAD + 1] {
                        m.read(p * PAGE_SIZE, &mut page)
                            .map_err(|e| e.to_string())?;
                        if page[..] != want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] {
                            return Err(format!("page {p} has wrong bytes"));
                        }
                    }
                    // Dies here of SIGBUS.
                    let _ = m.read_u8(BAD * PAGE_SIZE);
                    Err(format!("page {BAD} was readable"))
                };
                match run() {
                    Ok(()) => 0,
                    Err(why) => {
                        let _ = std::io::Write::write_all(
                            &mut std::io::stderr(),
                            format!("child: {why}\n").as_bytes(),
                        );
                        1
                    }
                }
            })
        });
        assert_eq!(
            exit,
            ChildExit::Signal(libc::SIGBUS),
            "lend_too_much {lend_too_much}: the client must die of SIGBUS on page {BAD}"
        );
    }
}
