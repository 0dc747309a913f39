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

/// Huge pages reserved for one test, held while it runs. The tests of one binary run in
/// parallel: two that each found enough free huge pages at once would then share them and one
/// would fail. Holding this serializes them.
#[must_use = "the huge pages are only yours while you hold this"]
pub struct HugePages {
    _held: std::sync::MutexGuard<'static, ()>,
}

/// Reserve `pages` 2 MiB huge pages for the calling test (waiting for other tests of this
/// process that hold some); print a skip line and return `None` when impossible.
pub fn need_huge_pages(test: &str, pages: u64) -> Option<HugePages> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let held = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    reserve_or_skip(test, pages).then_some(HugePages { _held: held })
}

/// Reserve `pages` 2 MiB huge pages; print a skip line naming `test` when impossible.
fn reserve_or_skip(test: &str, pages: u64) -> bool {
    let ok = reserve_huge_pages(pages);
    if !ok {
        skip(test, &format!("cannot reserve {pages} 2 MiB huge pages"));
    }
    ok
}

/// Reserve at least `pages` 2 MiB huge pages in `/proc/sys/vm/nr_hugepages`; returns whether they
/// are available (free). Tests that need hugetlb pages call this (through [`need_huge_pages`])
/// and skip with a message when false.
pub fn reserve_huge_pages(pages: u64) -> bool {
    let free = || -> Option<u64> {
        let s = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()?;
        s.trim().parse().ok()
    };
    if free().unwrap_or(0) >= pages {
        return true;
    }
    let Ok(cur) = std::fs::read_to_string("/proc/sys/vm/nr_hugepages") else {
        return false;
    };
    let cur: u64 = cur.trim().parse().unwrap_or(0);
    let want = cur + pages - free().unwrap_or(0).min(pages);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string());
    free().unwrap_or(0) >= pages
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
    let b = (x >> ((i % 8) * 8)).to_le_bytes()[0]; // the low byte
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
    wait_pid(pid)
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
                let mut fds = [
                    PollFd::new(&*uffd, PollFlags::IN),
                    PollFd::new(&rx, PollFlags::IN),
                ];
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
        FaultServer {
            stop,
            wake_tx: tx,
            handle: Some(handle),
        }
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
    rx.recv_timeout(limit)
        .expect("operation did not finish in time (lost wake-up?)")
}

// stress/storm helpers

/// Serve `uffd` on a new thread, handing the handler every non-empty batch of events one
/// `read(2)` returned (the handler may drain it). Use this where the handler's work is per batch,
/// e.g. DONTWAKE resolves followed by one `UFFDIO_WAKE`. Stopped like [`FaultServer::spawn`]'s.
pub fn serve_batches<H>(uffd: Arc<Uffd>, capacity: usize, mut handler: H) -> FaultServer
where
    H: FnMut(&Uffd, &mut Vec<Event>) -> Flow + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    let stop2 = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut buf = EventBuffer::new(capacity);
        let mut batch = Vec::with_capacity(capacity);
        while !stop2.load(Ordering::Acquire) {
            let mut fds = [
                PollFd::new(&*uffd, PollFlags::IN),
                PollFd::new(&rx, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
            if !fds[1].revents().is_empty() {
                break;
            }
            // Zero messages is normal: another reader or a resolve's wake took them.
            if uffd.read_events(&mut buf).expect("read events") == 0 {
                continue;
            }
            batch.clear();
            batch.extend(buf.drain());
            if handler(&uffd, &mut batch) == Flow::Stop {
                return;
            }
        }
    });
    FaultServer {
        stop,
        wake_tx: tx,
        handle: Some(handle),
    }
}

// uffd-unit-tests helpers (api, register, resolve, sigbus, mmap_changing)

/// The features a userfaultfd must negotiate for MISSING mode on `kind` memory.
pub fn missing_features(kind: faultline_uffd::MemoryKind) -> Features {
    use faultline_uffd::MemoryKind;
    match kind {
        MemoryKind::PrivateAnonymous => Features::empty(),
        MemoryKind::Shmem => Features::MISSING_SHMEM,
        MemoryKind::HugetlbPrivate | MemoryKind::HugetlbShared => Features::MISSING_HUGETLBFS,
    }
}

/// Headroom [`need_kind`] reserves on top of what a test asks for: the tests of one binary run in
/// parallel, and a private hugetlbfs page that cannot be allocated at fault time is a SIGBUS.
pub const HUGE_PAGE_HEADROOM: u64 = 16;

/// Whether a test can run on `kind` memory: hugetlbfs kinds reserve `huge_pages` 2 MiB pages plus
/// [`HUGE_PAGE_HEADROOM`] (printing a skip line naming the kind when impossible); the others
/// always can.
pub fn need_kind(test: &str, kind: faultline_uffd::MemoryKind, huge_pages: u64) -> bool {
    !kind.is_hugetlb()
        || reserve_or_skip(
            &format!("{test} on {kind}"),
            huge_pages + HUGE_PAGE_HEADROOM,
        )
}

/// A SIGBUS handler: `(signal, info, ucontext)`.
pub type SigbusHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Install `handler` as this process's SIGBUS action (`SA_SIGINFO`). Meant for a child of
/// [`in_child`]: the handler replaces the Rust runtime's own SIGBUS handler for the whole process.
/// A handler may only use async-signal-safe operations (atomics, raw system calls, `_exit`).
pub fn on_sigbus(handler: SigbusHandler) {
    // SAFETY: an all-zero `sigaction` is a valid value (empty mask, no flags) that we fill in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is a valid action for SIGBUS and the old action is not requested.
    let r = unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
    assert_eq!(r, 0, "sigaction(SIGBUS)");
}

// wp/minor/events helpers

/// The `PM_UFFD_WP` bit of a `/proc/<pid>/pagemap` entry: the pte (or the pte marker left where a
/// page was zapped) carries userfaultfd write protection.
pub const PM_UFFD_WP: u64 = 1 << 57;

/// The 64-bit `/proc/self/pagemap` entry of the base page holding `addr`. Read in the calling
/// process, so a forked child sees its own page tables.
pub fn pagemap_entry(addr: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, addr / faultline_uffd::PAGE_SIZE as u64 * 8)?;
    Ok(u64::from_ne_bytes(b))
}

/// Whether the page holding `addr` is userfaultfd-write-protected in this process's page tables
/// (`PM_UFFD_WP`). Panics when the pagemap cannot be read.
pub fn uffd_wp_bit(addr: u64) -> bool {
    pagemap_entry(addr).expect("read /proc/self/pagemap") & PM_UFFD_WP != 0
}

/// The features a userfaultfd must negotiate for WP mode on `kind` memory.
pub fn wp_features(kind: faultline_uffd::MemoryKind) -> Features {
    if kind == faultline_uffd::MemoryKind::PrivateAnonymous {
        Features::PAGEFAULT_FLAG_WP
    } else {
        Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM
    }
}

/// The features a userfaultfd must negotiate for MINOR mode on `kind` memory (shmem or shared
/// hugetlbfs; MINOR mode does not exist on private memory, which gets `None`).
pub fn minor_features(kind: faultline_uffd::MemoryKind) -> Option<Features> {
    use faultline_uffd::MemoryKind;
    match kind {
        MemoryKind::Shmem => Some(Features::MINOR_SHMEM),
        MemoryKind::HugetlbShared => Some(Features::MINOR_HUGETLBFS),
        MemoryKind::PrivateAnonymous | MemoryKind::HugetlbPrivate => None,
    }
}

/// A long-term, writable pin (`FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE`) of a range of this
/// process's memory, held until dropped: the range is registered as an io_uring fixed buffer,
/// which is how an unprivileged program pins pages for DMA-like use. (The kernel selftests pin
/// read-only through `/sys/kernel/debug/gup_test`, which exists only with `CONFIG_GUP_TEST`.)
/// Pinning faults the pages in for writing, so a write-protected range blocks: pin first.
pub struct LongtermPin {
    ring: OwnedFd,
}

impl LongtermPin {
    /// Pin `len` bytes at `addr` (page-aligned, mapped, writable).
    pub fn new(addr: *mut u8, len: usize) -> std::io::Result<LongtermPin> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // `struct io_uring_params` is 120 bytes; all-zero asks for a default ring.
        let mut params = [0u32; 30];
        // SAFETY: io_uring_setup reads and writes the 120-byte params struct we pass.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let raw = i32::try_from(fd).map_err(|_| std::io::Error::other("io_uring fd"))?;
        // SAFETY: io_uring_setup returned a new fd that nothing else owns.
        let ring = unsafe { OwnedFd::from_raw_fd(raw) };
        let iov = libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        };
        const IORING_REGISTER_BUFFERS: u32 = 0;
        // SAFETY: registers one iovec describing memory the caller owns; the kernel pins it and
        // keeps no pointer to `iov` after the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring.as_raw_fd(),
                IORING_REGISTER_BUFFERS,
                &iov as *const libc::iovec,
                1u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(LongtermPin { ring })
    }
}

impl Drop for LongtermPin {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // Unpin synchronously (closing the ring alone frees it from a workqueue, later).
        const IORING_UNREGISTER_BUFFERS: u32 = 1;
        // SAFETY: unregisters the ring's buffers; no pointers are passed.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_UNREGISTER_BUFFERS,
                std::ptr::null::<libc::c_void>(),
                0u32,
            )
        };
    }
}

/// Write `len` bytes from `addr` to a fresh temporary file opened `O_DIRECT`: the kernel takes a
/// short-lived read-only `FOLL_PIN` on the source pages, which unshares (copies) an anonymous page
/// a forked child shares with its parent — the "R/O pin" path of the selftests' `wp-fork-pin`.
/// `addr` and `len` must be 4096-aligned. Fails with `EINVAL` where the file system of the
/// temporary directory has no direct I/O.
pub fn direct_io_write_from(addr: *const u8, len: usize) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "faultline-odirect-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("temporary path has a NUL byte"))?;
    // SAFETY: `cpath` is a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_DIRECT | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `cpath` is a valid path; the open fd keeps the file alive until closed.
    unsafe { libc::unlink(cpath.as_ptr()) };
    // SAFETY: the kernel reads `len` bytes at `addr`, which the caller guarantees are mapped;
    // no Rust reference is formed over them.
    let n = unsafe { libc::pwrite(fd, addr.cast(), len, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    match usize::try_from(n) {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(std::io::Error::other(format!(
            "short direct write: {n} of {len}"
        ))),
        Err(_) => Err(err),
    }
}

/// Like [`FaultServer::spawn`], for a userfaultfd negotiated with `EVENT_FORK`. glibc's `fork()`
/// holds the malloc locks across the system call, and the system call waits until the FORK event
/// has been read: a server thread that allocates before reading it deadlocks the fork. This
/// server finishes its allocations before returning (it is ready when `spawn` returns) and does
/// not allocate between reading events and handing them to `handler`. The handler itself may
/// allocate (the event was read, so the fork completes), but a test must not start the next
/// fork before the handler of the previous FORK event has finished (let it signal a channel as
/// its last step, and wait for that).
pub fn serve_fork_safe<H>(uffd: Arc<Uffd>, mut handler: H) -> FaultServer
where
    H: FnMut(&Uffd, Event) -> Flow + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop2 = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut buf = EventBuffer::new(64);
        // Kept alive to the end: its drop could free the channel here.
        let ready = ready_tx;
        let _ = ready.send(());
        while !stop2.load(Ordering::Acquire) {
            let mut fds = [
                PollFd::new(&*uffd, PollFlags::IN),
                PollFd::new(&rx, PollFlags::IN),
            ];
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
            for ev in buf.drain() {
                if handler(&uffd, ev) == Flow::Stop {
                    return;
                }
            }
        }
    });
    ready_rx.recv().expect("fork-safe server started");
    FaultServer {
        stop,
        wake_tx: tx,
        handle: Some(handle),
    }
}

// client-process helpers

/// A forked child process that runs concurrently with the caller (the non-blocking form of
/// [`in_child`]): a client that owns its own userfaultfd and memory while the caller serves it.
/// The child must not rely on other threads of the test process (they do not exist after fork).
/// Dropping it without [`ChildProcess::wait`] kills and reaps the child.
#[derive(Debug)]
pub struct ChildProcess {
    pid: libc::pid_t,
    reaped: bool,
}

impl ChildProcess {
    /// Fork; the child runs `f` and exits with its return value (101 if it panics), or dies of
    /// whatever signal `f` provokes.
    pub fn spawn(f: impl FnOnce() -> i32) -> ChildProcess {
        // SAFETY: fork has no memory-safety preconditions; the child only runs `f` and `_exit`s,
        // never returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: terminate the child immediately without running the parent's atexit
            // handlers or unwinding into the harness.
            unsafe { libc::_exit(code) };
        }
        ChildProcess { pid, reaped: false }
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A pidfd of the child (`pidfd_open`): it becomes readable when the child exits, which is
    /// how a server learns that a client is gone.
    pub fn pidfd(&self) -> std::io::Result<OwnedFd> {
        let pid = rustix::process::Pid::from_raw(self.pid)
            .ok_or_else(|| std::io::Error::other("pid 0"))?;
        Ok(rustix::process::pidfd_open(
            pid,
            rustix::process::PidfdFlags::empty(),
        )?)
    }

    /// Wait for the child to end and say how.
    pub fn wait(mut self) -> ChildExit {
        self.reaped = true;
        wait_pid(self.pid)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: signalling our own, not yet reaped child (its pid cannot have been reused).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_pid(self.pid);
        }
    }
}

fn wait_pid(pid: libc::pid_t) -> ChildExit {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINTR),
            "waitpid"
        );
    }
    if libc::WIFSIGNALED(status) {
        ChildExit::Signal(libc::WTERMSIG(status))
    } else {
        ChildExit::Code(libc::WEXITSTATUS(status))
    }
}

/// Most `u64` words one [`send_uffd`] message carries.
pub const MAX_CLIENT_WORDS: usize = 64;

/// A connected pair of close-on-exec `AF_UNIX` `SOCK_SEQPACKET` sockets: one end for a client
/// process, one for its server. Each send is one message, received whole.
pub fn client_socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Send `uffd` (attached as `SCM_RIGHTS`) and `words` (mapping addresses, lengths, a pid ...)
/// in one message, as a client hands its userfaultfd to a server.
pub fn send_uffd(sock: impl AsFd, uffd: impl AsFd, words: &[u64]) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::IoSlice;
    use std::mem::MaybeUninit;
    if words.is_empty() || words.len() > MAX_CLIENT_WORDS {
        return Err(std::io::Error::other(format!(
            "{} words: 1 to {MAX_CLIENT_WORDS} fit in a message",
            words.len()
        )));
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let fds = [uffd.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "no room for the fd in the control buffer",
        ));
    }
    let sent = sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// Receive one message of [`send_uffd`]: the attached fd (close-on-exec) and the words.
/// A closed peer is `UnexpectedEof`; a message without exactly one fd is an error.
pub fn recv_uffd(sock: impl AsFd) -> std::io::Result<(OwnedFd, Vec<u64>)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    use std::io::IoSliceMut;
    use std::mem::MaybeUninit;
    let mut bytes = [0u8; MAX_CLIENT_WORDS * 8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(std::io::Error::other("client message truncated"));
    }
    if msg.bytes % 8 != 0 {
        return Err(std::io::Error::other(format!(
            "{}-byte message is not whole words",
            msg.bytes
        )));
    }
    let words = bytes[..msg.bytes]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact yields 8 bytes")))
        .collect();
    match fds.len() {
        1 => Ok((fds.remove(0), words)),
        n => Err(std::io::Error::other(format!(
            "expected one fd, received {n}"
        ))),
    }
}

/// The number of open file descriptors of this process (entries of `/proc/self/fd`, counting
/// the one the listing itself uses), to check that serving leaks none.
pub fn fd_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

#[cfg(test)]
mod client_process_tests {
    use super::*;

    #[test]
    fn a_uffd_and_words_cross_a_socket_between_processes() {
        let (ours, theirs) = client_socketpair().expect("socketpair");
        let child = ChildProcess::spawn(move || {
            let Ok(uffd) = Uffd::new(Features::empty()) else {
                return 2;
            };
            match send_uffd(&theirs, &uffd, &[7, u64::MAX, 0x7f00_0000_1000]) {
                Ok(()) => 0,
                Err(_) => 3,
            }
        });
        let pidfd = child.pidfd().expect("pidfd");
        let (fd, words) = recv_uffd(&ours).expect("receive");
        assert_eq!(words, [7, u64::MAX, 0x7f00_0000_1000]);
        // SAFETY: the fd was created by `Uffd::new` in the child; nothing is registered on it.
        let uffd = unsafe { Uffd::from_initialized_fd(fd, Features::empty()) };
        assert!(
            !uffd.poll_readable(Some(Duration::ZERO)).expect("poll"),
            "no event queued"
        );
        assert_eq!(child.wait(), ChildExit::Code(0));
        // The exited child's pidfd is readable; the socket is at its end.
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        assert_eq!(rustix::event::poll(&mut fds, None).expect("poll pidfd"), 1);
        assert_eq!(
            recv_uffd(&ours).map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        let (a, b) = client_socketpair().expect("socketpair");
        let too_many = [0u64; MAX_CLIENT_WORDS + 1];
        assert!(send_uffd(&a, &a, &too_many).is_err());
        assert!(send_uffd(&a, &a, &[]).is_err());
        // A message without an fd.
        rustix::net::send(&a, &[0u8; 8], rustix::net::SendFlags::empty()).expect("send");
        assert!(recv_uffd(&b).is_err());
        assert!(
            fd_count().expect("fd count") >= 5,
            "stdio and the two sockets at least"
        );
    }

    #[test]
    fn a_dropped_child_is_killed_and_reaped() {
        let (ours, theirs) = client_socketpair().expect("socketpair");
        let child = ChildProcess::spawn(move || {
            // Wait for a message that never comes.
            let mut b = [0u8; 1];
            let _ = rustix::io::read(&theirs, &mut b);
            0
        });
        let pid = child.pid();
        drop(child);
        // SAFETY: probing a pid with signal 0 sends nothing.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "the child is gone");
        drop(ours);
    }
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
