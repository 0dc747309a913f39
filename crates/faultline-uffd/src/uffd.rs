//! [`Uffd`]: creating a userfaultfd, the `UFFDIO_API` handshake, registration and reading events.
//!
//! Creation has two kernel paths. `userfaultfd(2)` is refused with EPERM when
//! `vm.unprivileged_userfaultfd = 0` and the caller lacks `CAP_SYS_PTRACE` (unless it asks for
//! user-mode-only faults); `/dev/userfaultfd` (Linux 6.1) is governed by the device node's file
//! permissions instead. [`UffdBuilder`] tries one and falls back to the other, and records which
//! path produced the fd and why the other failed ([`Uffd::creation`]).
//!
//! The handshake can be done once per fd, and asking for a feature the kernel lacks fails the
//! whole call. To request "these if available", the builder first probes with a throw-away fd
//! (`features = 0` returns everything the kernel offers), then opens the real fd with exactly the
//! wanted subset.
//!
//! The `unsafe fn`s of [`Uffd`] and [`UninitUffd`] (adopting an fd, registering a raw range) are
//! declared in `sys` with the crate's other unsafe code; they call the crate-private
//! functions here.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::io::Errno;

use crate::error::{check_range, CreatePath, Error};
use crate::flags::{Features, Ioctls, RegisterMode};
use crate::mapping::{Mapping, MemoryKind, PAGE_SIZE};
use crate::sys;

/// How the fd was created, and why the other path was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creation {
    /// The path that produced the fd.
    pub path: CreatePath,
    /// The first path tried, when it failed and this one is the fallback.
    pub fallback_from: Option<(CreatePath, Errno)>,
}

/// Options for creating a [`Uffd`].
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    close_on_exec: bool,
    non_blocking: bool,
    user_mode_only: bool,
    prefer: CreatePath,
    fallback: bool,
    required: Features,
    optional: Features,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        UffdBuilder {
            close_on_exec: true,
            non_blocking: true,
            user_mode_only: false,
            prefer: CreatePath::Syscall,
            fallback: true,
            required: Features::empty(),
            optional: Features::empty(),
        }
    }
}

impl UffdBuilder {
    /// Defaults: close-on-exec, non-blocking, kernel faults reported too, `userfaultfd(2)` first
    /// with `/dev/userfaultfd` as fallback, no features.
    pub fn new() -> Self {
        Self::default()
    }
    /// `O_CLOEXEC` (default on).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }
    /// `O_NONBLOCK` (default on). A blocking fd reports POLLERR to poll(2): use non-blocking with
    /// poll/epoll.
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }
    /// `UFFD_USER_MODE_ONLY`: only faults from user space are reported; kernel accesses (e.g.
    /// `read(2)` into the range, GUP) fail with EFAULT instead.
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }
    /// Which creation path to try first.
    pub fn prefer(mut self, path: CreatePath) -> Self {
        self.prefer = path;
        self
    }
    /// Whether to try the other path when the preferred one fails (default on).
    pub fn fallback(mut self, on: bool) -> Self {
        self.fallback = on;
        self
    }
    /// Features that must be granted; creation fails naming any the kernel lacks.
    pub fn require(mut self, features: Features) -> Self {
        self.required |= features;
        self
    }
    /// Features that are wanted if the kernel has them.
    pub fn request(mut self, features: Features) -> Self {
        self.optional |= features;
        self
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.close_on_exec {
            f |= linux_raw_sys::general::O_CLOEXEC;
        }
        if self.non_blocking {
            f |= linux_raw_sys::general::O_NONBLOCK;
        }
        if self.user_mode_only {
            f |= sys::UFFD_USER_MODE_ONLY;
        }
        f
    }

    /// Create an fd without the handshake.
    pub fn create_uninit(&self) -> Result<UninitUffd, Error> {
        let flags = self.flags();
        let other = match self.prefer {
            CreatePath::Syscall => CreatePath::DevUserfaultfd,
            CreatePath::DevUserfaultfd => CreatePath::Syscall,
        };
        match create_via(self.prefer, flags) {
            Ok(fd) => Ok(UninitUffd {
                fd,
                creation: Creation {
                    path: self.prefer,
                    fallback_from: None,
                },
                non_blocking: self.non_blocking,
                own_process: true,
            }),
            Err(first_errno) if self.fallback => match create_via(other, flags) {
                Ok(fd) => Ok(UninitUffd {
                    fd,
                    creation: Creation {
                        path: other,
                        fallback_from: Some((self.prefer, first_errno)),
                    },
                    non_blocking: self.non_blocking,
                    own_process: true,
                }),
                Err(e) => Err(Error::Create {
                    first: self.prefer,
                    first_errno,
                    second: Some((other, e)),
                }),
            },
            Err(first_errno) => Err(Error::Create {
                first: self.prefer,
                first_errno,
                second: None,
            }),
        }
    }

    /// Learn what the kernel offers: a throw-away fd handshaken with `features = 0`.
    pub fn probe(&self) -> Result<ApiInfo, Error> {
        let u = self.create_uninit()?.api(Features::empty())?;
        Ok(ApiInfo {
            features: u.offered,
            ioctls: u.ioctls,
        })
    }

    /// Create the fd and complete the handshake with the required features plus whichever
    /// requested ones the kernel offers.
    pub fn create(&self) -> Result<Uffd, Error> {
        let mut want = self.required;
        if !self.optional.is_empty() || !self.required.is_empty() {
            let offered = self.probe()?.features;
            let missing = self.required - offered;
            if !missing.is_empty() {
                return Err(Error::MissingFeatures {
                    missing,
                    available: offered,
                });
            }
            want |= self.optional & offered;
        }
        self.create_uninit()?.api(want)
    }
}

fn create_via(path: CreatePath, flags: u32) -> Result<OwnedFd, Errno> {
    match path {
        CreatePath::Syscall => sys::userfaultfd_syscall(flags),
        CreatePath::DevUserfaultfd => {
            let dev = rustix::fs::open(
                "/dev/userfaultfd",
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            sys::userfaultfd_dev_new(dev.as_fd(), flags)
        }
    }
}

/// What `UFFDIO_API` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Features granted (or, for a probe, offered).
    pub features: Features,
    /// Ioctls supported on the fd.
    pub ioctls: Ioctls,
}

/// A userfaultfd before its `UFFDIO_API` handshake.
#[derive(Debug)]
pub struct UninitUffd {
    fd: OwnedFd,
    creation: Creation,
    non_blocking: bool,
    own_process: bool,
}

impl UninitUffd {
    /// The body of [`UninitUffd::from_fd`] (whose safety contract the caller keeps).
    pub(crate) fn adopt(fd: OwnedFd) -> UninitUffd {
        let non_blocking = is_non_blocking(fd.as_fd());
        UninitUffd {
            fd,
            creation: Creation {
                path: CreatePath::Syscall,
                fallback_from: None,
            },
            non_blocking,
            own_process: false,
        }
    }

    /// How the fd was created.
    pub fn creation(&self) -> Creation {
        self.creation
    }

    /// `UFFDIO_API`: negotiate exactly `features`.
    #[doc(alias = "UFFDIO_API")]
    pub fn api(self, features: Features) -> Result<Uffd, Error> {
        let mut arg = sys::uffdio_api {
            api: sys::UFFD_API,
            features: features.bits(),
            ioctls: 0,
        };
        match sys::api(self.fd.as_fd(), &mut arg) {
            Ok(()) => {
                // The kernel answers with everything it offers; what this fd has is what was
                // asked for (WP_ASYNC implies WP_UNPOPULATED).
                let mut granted = features;
                if granted.contains(Features::WP_ASYNC) {
                    granted |= Features::WP_UNPOPULATED;
                }
                Ok(Uffd {
                    fd: self.fd,
                    features: granted,
                    offered: Features::from_bits_retain(arg.features),
                    ioctls: Ioctls::from_bits_retain(arg.ioctls),
                    creation: self.creation,
                    non_blocking: self.non_blocking,
                    own_process: self.own_process,
                    stats: IoctlCounters::default(),
                })
            }
            // The kernel answers EINVAL both to a second handshake and to a feature it lacks; a
            // probe on a fresh fd tells which (`features = 0` never fails on a fresh fd).
            Err(Errno::INVAL) if features.is_empty() || offered_now().contains(features) => {
                Err(Error::AlreadyInitialized)
            }
            Err(errno) => Err(Error::Api {
                requested: features,
                errno,
            }),
        }
    }
}

fn offered_now() -> Features {
    UffdBuilder::new()
        .probe()
        .map(|i| i.features)
        .unwrap_or(Features::empty())
}

impl AsFd for UninitUffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The kernel-internal "handshake done" bit shown in fdinfo's features (`UFFD_FEATURE_INITIALIZED`).
const UFFD_FEATURE_INITIALIZED: u64 = 1 << 31;

/// Parse `API:\taa:<features hex>:<ioctls hex>` from a userfaultfd's fdinfo.
fn parse_fdinfo_api(info: &str) -> Option<(u64, u64)> {
    let line = info.lines().find_map(|l| l.strip_prefix("API:"))?;
    let mut parts = line.trim().split(':');
    let api = u64::from_str_radix(parts.next()?, 16).ok()?;
    let features = u64::from_str_radix(parts.next()?, 16).ok()?;
    let ioctls = u64::from_str_radix(parts.next()?, 16).ok()?;
    (api == sys::UFFD_API).then_some((features, ioctls))
}

fn is_non_blocking(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fcntl_getfl(fd)
        .map(|f| f.contains(rustix::fs::OFlags::NONBLOCK))
        .unwrap_or(false)
}

/// Counters of the ioctls issued through one [`Uffd`], successful or not.
#[derive(Debug, Default)]
pub(crate) struct IoctlCounters {
    pub(crate) copy: AtomicU64,
    pub(crate) zeropage: AtomicU64,
    pub(crate) continue_: AtomicU64,
    pub(crate) poison: AtomicU64,
    pub(crate) move_: AtomicU64,
    pub(crate) writeprotect: AtomicU64,
    pub(crate) wake: AtomicU64,
    pub(crate) register: AtomicU64,
    pub(crate) unregister: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) eexist: AtomicU64,
    pub(crate) eagain: AtomicU64,
}

/// A snapshot of the ioctls issued through one [`Uffd`] (attempts, whatever their result), and of
/// the EEXIST / EAGAIN answers among them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlStats {
    /// `UFFDIO_COPY` calls.
    pub copy: u64,
    /// `UFFDIO_ZEROPAGE` calls.
    pub zeropage: u64,
    /// `UFFDIO_CONTINUE` calls.
    pub continue_: u64,
    /// `UFFDIO_POISON` calls.
    pub poison: u64,
    /// `UFFDIO_MOVE` calls.
    pub move_: u64,
    /// `UFFDIO_WRITEPROTECT` calls.
    pub writeprotect: u64,
    /// `UFFDIO_WAKE` calls.
    pub wake: u64,
    /// `UFFDIO_REGISTER` calls.
    pub register: u64,
    /// `UFFDIO_UNREGISTER` calls.
    pub unregister: u64,
    /// `read(2)` calls that returned at least one message.
    pub reads: u64,
    /// Messages read.
    pub events: u64,
    /// Resolves answered EEXIST.
    pub eexist: u64,
    /// Resolves answered EAGAIN (including partial progress).
    pub eagain: u64,
}

impl IoctlStats {
    /// All resolve ioctls (COPY, ZEROPAGE, CONTINUE, POISON, MOVE).
    pub fn resolves(&self) -> u64 {
        self.copy + self.zeropage + self.continue_ + self.poison + self.move_
    }
}

/// A userfaultfd that completed its handshake.
///
/// `Uffd` is `Send + Sync`: resolve ioctls and reads may be issued from many threads at once.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    offered: Features,
    ioctls: Ioctls,
    creation: Creation,
    non_blocking: bool,
    /// Whether the fd serves this process's own address space (created here, not adopted).
    own_process: bool,
    pub(crate) stats: IoctlCounters,
}

impl Uffd {
    /// A builder with the defaults of [`UffdBuilder::new`].
    pub fn builder() -> UffdBuilder {
        UffdBuilder::new()
    }

    /// Create a non-blocking, close-on-exec userfaultfd that requires `features`.
    pub fn new(features: Features) -> Result<Uffd, Error> {
        UffdBuilder::new().require(features).create()
    }

    /// The body of [`Uffd::from_initialized_fd`] (whose safety contract the caller keeps).
    pub(crate) fn adopt(fd: OwnedFd, features: Features) -> Uffd {
        let non_blocking = is_non_blocking(fd.as_fd());
        Uffd {
            fd,
            features,
            offered: features,
            ioctls: Ioctls::empty(),
            creation: Creation {
                path: CreatePath::Syscall,
                fallback_from: None,
            },
            non_blocking,
            own_process: false,
            stats: IoctlCounters::default(),
        }
    }

    /// Adopt a userfaultfd received from another process (over a Unix socket with SCM_RIGHTS, as
    /// Firecracker sends it), checking that it is one.
    ///
    /// The kernel is asked, not trusted blindly: `/proc/self/fd/N` must read
    /// `anon_inode:[userfaultfd]`, and the features its creator negotiated are read from
    /// `/proc/self/fdinfo/N` (`API: aa:<features>:<ioctls>`) — the handshake cannot be repeated, but
    /// this tells what it granted. A userfaultfd always serves its creator's address space, and
    /// this process never sends its own away, so resolves through the adopted fd cannot touch
    /// memory of this process: that is why this constructor is safe while
    /// [`Uffd::from_initialized_fd`] is not. Fails with [`Error::NotUserfaultfd`] otherwise.
    pub fn from_received_fd(fd: OwnedFd) -> Result<Uffd, Error> {
        let n = fd.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{n}")).map_err(|e| Error::Os {
            operation: "readlink /proc/self/fd",
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        let link = link.to_string_lossy().into_owned();
        if link != "anon_inode:[userfaultfd]" {
            return Err(Error::NotUserfaultfd { what: link });
        }
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{n}")).map_err(|e| Error::Os {
                operation: "read /proc/self/fdinfo",
                errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
            })?;
        let (features, ioctls) = parse_fdinfo_api(&info).ok_or(Error::NotUserfaultfd {
            what: "userfaultfd whose fdinfo has no API line".into(),
        })?;
        if features & UFFD_FEATURE_INITIALIZED == 0 {
            return Err(Error::NotUserfaultfd {
                what: "userfaultfd before its UFFDIO_API handshake".into(),
            });
        }
        let features = Features::from_bits_retain(features & !UFFD_FEATURE_INITIALIZED);
        // The contract of `from_initialized_fd` holds: the kernel says this is a userfaultfd that
        // completed its handshake; it was received from another process, so its address space
        // is not this process's (see above).
        let mut u = Uffd::adopt(fd, features);
        u.ioctls = Ioctls::from_bits_retain(ioctls);
        Ok(u)
    }

    /// Whether this fd serves this process's own address space (it was created here rather than
    /// adopted from another process or a FORK event).
    pub fn is_own_process(&self) -> bool {
        self.own_process
    }

    /// Give up the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Features enabled on this fd by the handshake: those requested (WP_ASYNC brings
    /// WP_UNPOPULATED along).
    pub fn features(&self) -> Features {
        self.features
    }
    /// Features the kernel offered in the handshake's answer (unknown bits kept).
    pub fn offered_features(&self) -> Features {
        self.offered
    }
    /// Ioctls the fd supports (from the handshake; empty for an adopted fd).
    pub fn ioctls(&self) -> Ioctls {
        self.ioctls
    }
    /// How the fd was created.
    pub fn creation(&self) -> Creation {
        self.creation
    }
    /// Whether the fd is in non-blocking mode.
    pub fn is_non_blocking(&self) -> bool {
        self.non_blocking
    }

    /// The ioctls issued so far through this handle.
    pub fn stats(&self) -> IoctlStats {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoctlStats {
            copy: l(&s.copy),
            zeropage: l(&s.zeropage),
            continue_: l(&s.continue_),
            poison: l(&s.poison),
            move_: l(&s.move_),
            writeprotect: l(&s.writeprotect),
            wake: l(&s.wake),
            register: l(&s.register),
            unregister: l(&s.unregister),
            reads: l(&s.reads),
            events: l(&s.events),
            eexist: l(&s.eexist),
            eagain: l(&s.eagain),
        }
    }

    pub(crate) fn require(&self, feature: Features, operation: &'static str) -> Result<(), Error> {
        if self.features.contains(feature) {
            Ok(())
        } else {
            Err(Error::FeatureNotNegotiated { feature, operation })
        }
    }

    /// Register all of `mapping`. Returns the ioctls the kernel supports on the range.
    #[doc(alias = "UFFDIO_REGISTER")]
    pub fn register(&self, mapping: &Mapping, mode: RegisterMode) -> Result<Ioctls, Error> {
        self.register_range(mapping, 0, mapping.len(), mode)
    }

    /// Register `len` bytes at `offset` of `mapping`, after checking that the mode is possible on
    /// this kind of memory and that the features it needs were negotiated.
    #[doc(alias = "UFFDIO_REGISTER")]
    pub fn register_range(
        &self,
        mapping: &Mapping,
        offset: usize,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, Error> {
        let start = mapping.check(offset, len)?;
        check_range(start, len as u64, mapping.page_size() as u64)?;
        self.check_mode(mapping.kind(), mode)?;
        // The contract of `register_raw` holds: `Mapping` never hands out references into its
        // memory (all access is volatile or by the kernel), so the kernel filling or zapping its
        // pages cannot invalidate Rust references; the range lies inside the live mapping.
        self.register_unchecked(start, len as u64, mode)
    }

    /// Check that `mode` is possible on `kind` memory with this fd's features.
    pub fn check_mode(&self, kind: MemoryKind, mode: RegisterMode) -> Result<(), Error> {
        if mode.is_empty() {
            return Err(Error::ModeNotSupported { mode, kind });
        }
        if mode.contains(RegisterMode::MINOR) {
            match kind {
                MemoryKind::PrivateAnonymous | MemoryKind::HugetlbPrivate => {
                    return Err(Error::ModeNotSupported { mode, kind })
                }
                MemoryKind::Shmem => self.require(Features::MINOR_SHMEM, "MINOR mode on shmem")?,
                MemoryKind::HugetlbShared => {
                    self.require(Features::MINOR_HUGETLBFS, "MINOR mode on hugetlbfs")?
                }
            }
        }
        if mode.contains(RegisterMode::MISSING) {
            match kind {
                MemoryKind::PrivateAnonymous => {}
                MemoryKind::Shmem => {
                    self.require(Features::MISSING_SHMEM, "MISSING mode on shmem")?
                }
                MemoryKind::HugetlbPrivate | MemoryKind::HugetlbShared => {
                    self.require(Features::MISSING_HUGETLBFS, "MISSING mode on hugetlbfs")?
                }
            }
        }
        if mode.contains(RegisterMode::WP) {
            self.require(Features::PAGEFAULT_FLAG_WP, "WP mode")?;
            if kind != MemoryKind::PrivateAnonymous {
                self.require(Features::WP_HUGETLBFS_SHMEM, "WP mode on shmem/hugetlbfs")?;
            }
        }
        Ok(())
    }

    /// The body of [`Uffd::register_raw`], whose safety contract the caller keeps: only for a
    /// range that holds no Rust references (a [`Mapping`]'s, or the caller's word).
    pub(crate) fn register_unchecked(
        &self,
        start: u64,
        len: u64,
        mode: RegisterMode,
    ) -> Result<Ioctls, Error> {
        check_range(start, len, PAGE_SIZE as u64)?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.stats.register.fetch_add(1, Ordering::Relaxed);
        sys::register(self.fd.as_fd(), &mut arg).map_err(|errno| Error::Register {
            start,
            len,
            mode,
            errno,
        })?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregister a range. Threads blocked on it are woken (they then fault normally).
    #[doc(alias = "UFFDIO_UNREGISTER")]
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Error> {
        check_range(start, len, PAGE_SIZE as u64)?;
        let mut arg = sys::uffdio_range { start, len };
        self.stats.unregister.fetch_add(1, Ordering::Relaxed);
        sys::unregister(self.fd.as_fd(), &mut arg).map_err(|errno| Error::Unregister {
            start,
            len,
            errno,
        })
    }

    /// Unregister all of `mapping`.
    #[doc(alias = "UFFDIO_UNREGISTER")]
    pub fn unregister_mapping(&self, mapping: &Mapping) -> Result<(), Error> {
        self.unregister(mapping.addr(), mapping.len() as u64)
    }

    /// Read the queued messages into `buf` (up to its capacity) with one `read(2)` and decode them.
    /// Returns the number of events; 0 when nothing is queued on a non-blocking fd (that is not an
    /// error: another reader or a resolve's wake may have consumed the fault). On a blocking fd,
    /// waits for at least one.
    pub fn read_events(&self, buf: &mut crate::event::EventBuffer) -> Result<usize, Error> {
        let n = loop {
            match rustix::io::read(&self.fd, buf.raw_mut()) {
                Ok(n) => break n,
                Err(Errno::AGAIN) => {
                    buf.clear();
                    return Ok(0);
                }
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(Error::Os {
                        operation: "read(userfaultfd)",
                        errno,
                    })
                }
            }
        };
        let count = buf.decode_read(n, self.features, |fd| {
            // A userfaultfd for the child with the parent's features, installed for this read.
            let fd = sys::adopt_fork_fd(fd);
            Uffd {
                fd,
                features: self.features,
                offered: self.offered,
                ioctls: self.ioctls,
                creation: self.creation,
                non_blocking: self.non_blocking,
                own_process: false,
                stats: IoctlCounters::default(),
            }
        })?;
        if count > 0 {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.events.fetch_add(count as u64, Ordering::Relaxed);
        }
        Ok(count)
    }

    /// Wait until the fd is readable or `timeout` passes; returns whether it is readable.
    /// (POLLERR, which a blocking fd reports, is an error.)
    pub fn poll_readable(&self, timeout: Option<std::time::Duration>) -> Result<bool, Error> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = timeout.map(|d| Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: d.subsec_nanos().into(),
        });
        loop {
            match poll(&mut fds, ts.as_ref()) {
                Ok(0) => return Ok(false),
                Ok(_) => break,
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    return Err(Error::Os {
                        operation: "poll(userfaultfd)",
                        errno,
                    })
                }
            }
        }
        let r = fds[0].revents();
        if r.contains(PollFlags::ERR) {
            return Err(Error::Os {
                operation: "poll(userfaultfd) reported POLLERR",
                errno: Errno::INVAL,
            });
        }
        Ok(r.contains(PollFlags::IN))
    }

    /// A duplicate of the fd (e.g. to send it to another process or keep it across a restart).
    pub fn try_clone_fd(&self) -> Result<OwnedFd, Error> {
        rustix::io::fcntl_dupfd_cloexec(&self.fd, 0).map_err(Error::os("dup(userfaultfd)"))
    }

    pub(crate) fn borrow(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_api_line_is_parsed() {
        let info = "pos:\t0\nflags:\t02004000\npending:\t0\ntotal:\t0\nAPI:\taa:80000008:80000000000001ff\n";
        assert_eq!(
            parse_fdinfo_api(info),
            Some((0x8000_0008, 0x8000_0000_0000_01ff))
        );
        assert_eq!(parse_fdinfo_api("API:\tab:1:2\n"), None);
        assert_eq!(parse_fdinfo_api("nothing"), None);
    }

    #[test]
    fn a_received_userfaultfd_is_recognised_with_its_features() {
        let u = Uffd::new(Features::EVENT_REMOVE | Features::THREAD_ID).expect("uffd");
        let dup = u.try_clone_fd().expect("dup");
        let adopted = Uffd::from_received_fd(dup).expect("adopt");
        assert_eq!(
            adopted.features(),
            Features::EVENT_REMOVE | Features::THREAD_ID
        );
        assert!(!adopted.is_own_process());
        assert!(adopted.ioctls().contains(Ioctls::API));
        let pipe = rustix::pipe::pipe().expect("pipe").0;
        assert!(matches!(
            Uffd::from_received_fd(pipe),
            Err(Error::NotUserfaultfd { .. })
        ));
        let uninit = UffdBuilder::new().create_uninit().expect("uninit");
        assert!(matches!(
            Uffd::from_received_fd(uninit.fd),
            Err(Error::NotUserfaultfd { .. })
        ));
    }
}
