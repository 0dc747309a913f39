//! Helpers shared by faultline's tests: capability checks that skip with a printed reason,
//! deterministic page patterns, a fault-serving thread fixture, and running a closure in a forked
//! child to observe signals (SIGBUS) without killing the test process.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use faultline_uffd::{Event, EventBuffer, Features, Uffd};

/// Print why a test is skipped (visible with `--nocapture` and in CI logs).
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipped: {test}: {reason}");
}

/// Reserve `pages` 2 MiB huge pages; print a skip line and return false when impossible.
pub fn need_huge_pages(test: &str, pages: u64) -> bool {
    if faultline_uffd::reserve_huge_pages(pages) {
        true
    } else {
        skip(test, &format!("cannot reserve {pages} 2 MiB huge pages"));
        false
    }
}

/// Whether the kernel offers `features`; prints a skip line when not.
pub fn need_features(test: &str, features: Features) -> bool {
    match Uffd::builder().probe() {
        Ok(info) if info.features.contains(features) => true,
        Ok(info) => {
            skip(test, &format!("kernel lacks {}", features - info.features));
            false
        }
        Err(e) => {
            skip(test, &format!("no userfaultfd: {e}"));
            false
        }
    }
}

/// The deterministic content of byte `i` of page `page` under `seed`: never all-zero pages, and
/// different for every page, so a wrong or zero page is always caught.
pub fn pattern_byte(seed: u64, page: u64, i: usize) -> u8 {
    let x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(page.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(i as u64 / 8);
    let x = (x ^ (x >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let b = (x >> ((i % 8) * 8)) as u8;
    if i == 0 {
        b | 1
    } else {
        b
    }
}

/// Fill `buf` with page `page`'s pattern.
pub fn fill_pattern(seed: u64, page: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, page, i);
    }
}

/// A page of the pattern.
pub fn pattern_page(seed: u64, page: u64, page_size: usize) -> Vec<u8> {
    let mut v = vec![0; page_size];
    fill_pattern(seed, page, &mut v);
    v
}

/// How a forked child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Run `f` in a forked child and wait for it. The child exits with `f`'s return value, or dies of
/// whatever signal `f` provokes. The child must not rely on other threads of the test process
/// (they do not exist after fork).
pub fn in_child(f: impl FnOnce() -> i32) -> ChildExit {
    // SAFETY: fork has no memory-safety preconditions; the child only runs `f` and `_exit`s,
    // never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: terminate the child immediately without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINTR), "waitpid");
    }
    if libc::WIFSIGNALED(status) {
        ChildExit::Signal(libc::WTERMSIG(status))
    } else {
        ChildExit::Code(libc::WEXITSTATUS(status))
    }
}

/// What a [`FaultServer`] handler tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep serving.
    Continue,
    /// Stop the loop.
    Stop,
}

/// A thread that reads events from a uffd and hands each to a handler until stopped.
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    wake_tx: OwnedFd,
    handle: Option<JoinHandle<()>>,
}

impl FaultServer {
    /// Serve `uffd` on a new thread, calling `handler` for every event.
    pub fn spawn<H>(uffd: Arc<Uffd>, mut handler: H) -> FaultServer
    where
        H: FnMut(&Uffd, Event) -> Flow + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            use rustix::event::{poll, PollFd, PollFlags};
            let mut buf = EventBuffer::new(64);
            while !stop2.load(Ordering::Acquire) {
                let mut fds =
                    [PollFd::new(&*uffd, PollFlags::IN), PollFd::new(&rx, PollFlags::IN)];
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => panic!("poll: {e}"),
                }
                if !fds[1].revents().is_empty() {
                    break;
                }
                if uffd.read_events(&mut buf).expect("read events") == 0 {
                    continue;
                }
                let events: Vec<Event> = buf.drain().collect();
                for ev in events {
                    if handler(&uffd, ev) == Flow::Stop {
                        return;
                    }
                }
            }
        });
        FaultServer { stop, wake_tx: tx, handle: Some(handle) }
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(self.wake_tx.as_fd(), &[1]);
        if let Some(h) = self.handle.take() {
            if let Err(p) = h.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Run `f` on a thread and fail the test if it has not finished within `limit` (a safety net
/// against a lost wake-up hanging the suite, not a synchronisation device).
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("operation did not finish in time (lost wake-up?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_per_page_and_are_never_zero_pages() {
        let a = pattern_page(1, 0, 4096);
        let b = pattern_page(1, 1, 4096);
        assert_ne!(a, b);
        assert_ne!(a, pattern_page(2, 0, 4096));
        assert_ne!(a[0], 0);
        assert_eq!(a, pattern_page(1, 0, 4096));
    }

    #[test]
    fn child_exit_codes_and_signals() {
        assert_eq!(in_child(|| 7), ChildExit::Code(7));
        assert_eq!(
            in_child(|| {
                // Rust's runtime handles SIGBUS (stack-guard detection) by restoring the default
                // action and returning; a second raise then kills with the default action.
                for _ in 0..2 {
                    // SAFETY: raising a signal in the forked child only.
                    unsafe { libc::raise(libc::SIGBUS) };
                }
                0
            }),
            ChildExit::Signal(libc::SIGBUS)
        );
    }
}
