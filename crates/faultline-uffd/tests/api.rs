//! `api` of the kernel's uffd-unit-tests, through this crate's API: creating a userfaultfd through
//! `userfaultfd(2)` and through `/dev/userfaultfd`, the fallback between them (and how it is
//! reported), the `UFFDIO_API` handshake (probe, required and unknown features, a second
//! handshake on the same fd) and `UFFD_USER_MODE_ONLY`.
//!
//! Failures of a creation path are produced for real in forked children: dropping
//! `CAP_SYS_PTRACE` makes `userfaultfd(2)` fail with EPERM (when `vm.unprivileged_userfaultfd` is
//! 0), and becoming `nobody` makes opening the root-only `/dev/userfaultfd` fail with EACCES.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use faultline_testing::{in_child, pattern_page, skip, ChildExit};
use faultline_uffd::{
    CopyMode, CreatePath, Error, Event, EventBuffer, Features, Ioctls, Mapping, RegisterMode,
    Resolved, Uffd, UninitUffd, PAGE_SIZE,
};
use rustix::io::Errno;

fn assert_flags(uffd: &Uffd, non_blocking: bool) {
    let fl = rustix::fs::fcntl_getfl(uffd).expect("F_GETFL");
    assert_eq!(fl.contains(rustix::fs::OFlags::NONBLOCK), non_blocking);
    assert_eq!(uffd.is_non_blocking(), non_blocking);
    let fd = rustix::io::fcntl_getfd(uffd).expect("F_GETFD");
    assert!(fd.contains(rustix::io::FdFlags::CLOEXEC));
}

/// A fault served end to end: proves the fd is a working, handshaken userfaultfd.
fn serve_one_fault(uffd: &Uffd) {
    let m = Mapping::anonymous(PAGE_SIZE).expect("mapping");
    uffd.register(&m, RegisterMode::MISSING).expect("register");
    let page = pattern_page(9, 0, PAGE_SIZE);
    std::thread::scope(|s| {
        let toucher = s.spawn(|| m.read_u8(123));
        let mut buf = EventBuffer::new(4);
        loop {
            assert!(uffd
                .poll_readable(Some(Duration::from_secs(10)))
                .expect("poll"));
            if uffd.read_events(&mut buf).expect("read") > 0 {
                break;
            }
        }
        let addr = buf.events()[0].fault_address().expect("page fault");
        assert_eq!(addr, m.addr());
        let done = uffd.copy(addr, &page, CopyMode::empty()).expect("copy");
        assert_eq!(done, Resolved::Complete(PAGE_SIZE as u64));
        assert_eq!(toucher.join().expect("toucher"), Ok(page[123]));
    });
}

#[test]
fn create_with_the_syscall() {
    let uffd = match Uffd::builder()
        .prefer(CreatePath::Syscall)
        .fallback(false)
        .create()
    {
        Ok(u) => u,
        Err(e) if e.errno() == Some(Errno::PERM) => {
            skip(
                "create_with_the_syscall",
                &format!("not permitted here: {e}"),
            );
            return;
        }
        Err(e) => panic!("userfaultfd(2): {e}"),
    };
    let c = uffd.creation();
    assert_eq!(c.path, CreatePath::Syscall);
    assert_eq!(c.fallback_from, None);
    assert_flags(&uffd, true);
    serve_one_fault(&uffd);
}

#[test]
fn create_with_dev_userfaultfd() {
    if !std::path::Path::new("/dev/userfaultfd").exists() {
        skip(
            "create_with_dev_userfaultfd",
            "no /dev/userfaultfd (Linux < 6.1)",
        );
        return;
    }
    let uffd = match Uffd::builder()
        .prefer(CreatePath::DevUserfaultfd)
        .fallback(false)
        .create()
    {
        Ok(u) => u,
        Err(e) if e.errno() == Some(Errno::ACCESS) => {
            skip(
                "create_with_dev_userfaultfd",
                &format!("not permitted here: {e}"),
            );
            return;
        }
        Err(e) => panic!("/dev/userfaultfd: {e}"),
    };
    let c = uffd.creation();
    assert_eq!(c.path, CreatePath::DevUserfaultfd);
    assert_eq!(c.fallback_from, None);
    assert_flags(&uffd, true);
    serve_one_fault(&uffd);

    // The open flags are passed through USERFAULTFD_IOC_NEW too.
    let blocking = Uffd::builder()
        .prefer(CreatePath::DevUserfaultfd)
        .fallback(false)
        .non_blocking(false)
        .create()
        .expect("/dev/userfaultfd, blocking");
    assert_flags(&blocking, false);
    // A blocking userfaultfd reports POLLERR to poll(2), which the crate turns into an error.
    assert!(matches!(
        blocking.poll_readable(Some(Duration::ZERO)),
        Err(Error::Os { .. })
    ));
}

/// Drop `CAP_SYS_PTRACE` from the calling thread's effective set.
fn drop_sys_ptrace() {
    use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
    let mut caps = capabilities(None).expect("capget");
    caps.effective -= CapabilitySet::SYS_PTRACE;
    set_capabilities(None, caps).expect("capset");
}

fn unprivileged_userfaultfd_allowed() -> bool {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() != "0")
        .unwrap_or(true)
}

fn run_in_child(test: &str, f: impl FnOnce() -> i32) {
    assert_eq!(
        in_child(f),
        ChildExit::Code(0),
        "{test}: the child failed (see its output)"
    );
}

/// `userfaultfd(2)` refused with EPERM (no CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd = 0`):
/// the default builder falls back to `/dev/userfaultfd` and says why.
#[test]
fn fallback_from_a_refused_syscall_is_reported() {
    let test = "fallback_from_a_refused_syscall_is_reported";
    if unprivileged_userfaultfd_allowed() {
        skip(
            test,
            "vm.unprivileged_userfaultfd = 1: userfaultfd(2) cannot be made to fail",
        );
        return;
    }
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/userfaultfd").exists() {
        skip(test, "needs root and /dev/userfaultfd");
        return;
    }
    run_in_child(test, || {
        drop_sys_ptrace();
        let uffd = Uffd::builder()
            .create()
            .expect("fallback to /dev/userfaultfd");
        let c = uffd.creation();
        assert_eq!(c.path, CreatePath::DevUserfaultfd);
        assert_eq!(c.fallback_from, Some((CreatePath::Syscall, Errno::PERM)));
        serve_one_fault(&uffd);

        // The two-step handshake (probe, then the real fd) falls back the same way.
        let uffd = Uffd::new(Features::EVENT_REMOVE).expect("with features");
        assert_eq!(uffd.creation().path, CreatePath::DevUserfaultfd);
        assert_eq!(uffd.features(), Features::EVENT_REMOVE);

        // Without fallback the refusal is the error.
        match Uffd::builder().fallback(false).create() {
            Err(e @ Error::Create { .. }) => {
                assert!(matches!(
                    e,
                    Error::Create {
                        first: CreatePath::Syscall,
                        first_errno: Errno::PERM,
                        second: None
                    }
                ));
                assert_eq!(e.errno(), Some(Errno::PERM));
                assert!(e.to_string().contains("userfaultfd(2) failed"), "{e}");
            }
            other => panic!("expected Error::Create, got {other:?}"),
        }

        // User-mode-only faults are allowed without the capability.
        let uffd = Uffd::builder()
            .fallback(false)
            .user_mode_only(true)
            .create()
            .expect("user-mode-only userfaultfd(2)");
        assert_eq!(uffd.creation().path, CreatePath::Syscall);

        // EVENT_FORK needs CAP_SYS_PTRACE: the handshake is refused with EPERM, naming it.
        match Uffd::new(Features::EVENT_FORK) {
            Err(Error::Api { requested, errno }) => {
                assert_eq!(requested, Features::EVENT_FORK);
                assert_eq!(errno, Errno::PERM);
            }
            other => panic!("expected Error::Api, got {other:?}"),
        }
        0
    });
}

/// `/dev/userfaultfd` refused with EACCES (not root): preferring it falls back to the syscall,
/// which (without the capability) allows only user-mode-only faults.
#[test]
fn fallback_from_a_refused_device_is_reported() {
    let test = "fallback_from_a_refused_device_is_reported";
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/userfaultfd").exists() {
        skip(test, "needs root (to become nobody) and /dev/userfaultfd");
        return;
    }
    let strict = !unprivileged_userfaultfd_allowed();
    run_in_child(test, move || {
        // SAFETY: plain system calls changing this (single-threaded, forked) process's ids.
        let r = unsafe { libc::setgroups(0, std::ptr::null()) };
        assert_eq!(r, 0, "setgroups");
        // SAFETY: as above.
        let r = unsafe { libc::setresgid(65534, 65534, 65534) };
        assert_eq!(r, 0, "setresgid");
        // SAFETY: as above.
        let r = unsafe { libc::setresuid(65534, 65534, 65534) };
        assert_eq!(r, 0, "setresuid");

        let uffd = Uffd::builder()
            .prefer(CreatePath::DevUserfaultfd)
            .user_mode_only(true)
            .create()
            .expect("fallback to userfaultfd(2)");
        let c = uffd.creation();
        assert_eq!(c.path, CreatePath::Syscall);
        assert_eq!(
            c.fallback_from,
            Some((CreatePath::DevUserfaultfd, Errno::ACCESS))
        );
        serve_one_fault(&uffd);

        match Uffd::builder()
            .prefer(CreatePath::DevUserfaultfd)
            .fallback(false)
            .create()
        {
            Err(Error::Create {
                first,
                first_errno,
                second,
            }) => {
                assert_eq!(
                    (first, first_errno, second),
                    (CreatePath::DevUserfaultfd, Errno::ACCESS, None)
                );
            }
            other => panic!("expected Error::Create, got {other:?}"),
        }
        if strict {
            // Both paths refused: the error names both.
            match Uffd::builder().prefer(CreatePath::DevUserfaultfd).create() {
                Err(e @ Error::Create { .. }) => {
                    assert!(matches!(
                        e,
                        Error::Create {
                            first: CreatePath::DevUserfaultfd,
                            first_errno: Errno::ACCESS,
                            second: Some((CreatePath::Syscall, Errno::PERM)),
                        }
                    ));
                    assert_eq!(e.errno(), Some(Errno::PERM));
                    let msg = e.to_string();
                    assert!(msg.contains("/dev/userfaultfd failed"), "{msg}");
                    assert!(msg.contains("then userfaultfd(2) failed"), "{msg}");
                }
                other => panic!("expected Error::Create, got {other:?}"),
            }
        }
        0
    });
}

#[test]
fn probe_lists_all_known_features() {
    let info = Uffd::builder().probe().expect("probe");
    assert!(
        info.features.contains(Features::KNOWN),
        "missing: {}",
        Features::KNOWN - info.features
    );
    assert_eq!(Features::KNOWN.iter().count(), 17);
    // The fd-level ioctls (UFFD_API_IOCTLS).
    assert_eq!(
        info.ioctls,
        Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API
    );
}

#[test]
fn required_and_requested_features_are_granted() {
    let uffd = Uffd::new(Features::MOVE | Features::POISON).expect("required");
    assert_eq!(uffd.features(), Features::MOVE | Features::POISON);
    assert!(uffd.offered_features().contains(Features::KNOWN));
    assert_eq!(
        uffd.ioctls(),
        Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API
    );

    // Everything the kernel has, requested at once.
    let all = Uffd::builder()
        .request(Features::KNOWN)
        .create()
        .expect("all");
    assert_eq!(all.features(), Features::KNOWN);

    // WP_ASYNC brings WP_UNPOPULATED along.
    let wp = Uffd::new(Features::PAGEFAULT_FLAG_WP | Features::WP_ASYNC).expect("wp async");
    assert!(wp.features().contains(Features::WP_UNPOPULATED));

    // A requested feature the kernel lacks is left out instead of failing.
    let unknown = Features::from_bits_retain(1 << 62);
    let some = Uffd::builder()
        .require(Features::EVENT_REMOVE)
        .request(unknown)
        .create()
        .expect("optional unknown");
    assert_eq!(some.features(), Features::EVENT_REMOVE);
}

#[test]
fn an_unknown_required_feature_is_named() {
    let unknown = Features::from_bits_retain(1 << 62);
    match Uffd::new(unknown | Features::EVENT_REMOVE) {
        Err(e @ Error::MissingFeatures { .. }) => {
            let Error::MissingFeatures { missing, available } = &e else {
                unreachable!()
            };
            assert_eq!(*missing, unknown);
            assert!(available.contains(Features::KNOWN));
            assert!(e.to_string().contains("0x4000000000000000"), "{e}");
        }
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
    // Straight to UFFDIO_API on a fresh fd, the kernel refuses it with EINVAL.
    let fresh = Uffd::builder().create_uninit().expect("uninit");
    match fresh.api(unknown) {
        Err(Error::Api { requested, errno }) => {
            assert_eq!(requested, unknown);
            assert_eq!(errno, Errno::INVAL);
        }
        other => panic!("expected Error::Api, got {other:?}"),
    }
}

/// The handshake happens once per fd: a second UFFDIO_API (through a dup of a handshaken fd)
/// is `AlreadyInitialized`, and the original keeps working.
#[test]
fn a_second_handshake_is_already_initialized() {
    let uffd = Uffd::new(Features::EVENT_REMOVE).expect("uffd");
    for features in [
        Features::empty(),
        Features::PAGEFAULT_FLAG_WP,
        Features::EVENT_REMOVE,
    ] {
        let dup = uffd.try_clone_fd().expect("dup");
        // SAFETY: `dup` is a duplicate of a userfaultfd of this process; the handshake fails
        // before anything could be registered through it.
        let again = unsafe { UninitUffd::from_fd(dup) };
        match again.api(features) {
            Err(Error::AlreadyInitialized) => {}
            other => panic!("{features}: expected AlreadyInitialized, got {other:?}"),
        }
    }
    serve_one_fault(&uffd);
}

/// With UFFD_USER_MODE_ONLY, a kernel access to a missing page (here `read(2)` from a pipe into
/// it) fails with EFAULT instead of waiting for a handler, and queues no message; user-space
/// faults are reported as usual. Without the flag the same kernel access is reported and waits.
#[test]
fn user_mode_only_reports_user_faults_only() {
    for user_mode_only in [true, false] {
        let uffd = Arc::new(
            Uffd::builder()
                .user_mode_only(user_mode_only)
                .create()
                .expect("uffd"),
        );
        let m = Arc::new(Mapping::anonymous(2 * PAGE_SIZE).expect("mapping"));
        uffd.register(&m, RegisterMode::MISSING).expect("register");
        let (rx, tx) = rustix::pipe::pipe().expect("pipe");
        rustix::io::write(&tx, b"kernel write").expect("fill pipe");

        let m2 = Arc::clone(&m);
        let kernel_access = std::thread::spawn(move || {
            // SAFETY: the destination is 12 bytes inside the live mapping, which holds no Rust
            // references; the kernel writes it with copy_to_user.
            let n = unsafe { libc::read(rx.as_raw_fd(), m2.as_ptr().cast(), 12) };
            if n < 0 {
                Err(std::io::Error::last_os_error().raw_os_error())
            } else {
                Ok(n)
            }
        });
        let mut buf = EventBuffer::new(4);
        if user_mode_only {
            let r = kernel_access.join().expect("reader");
            assert_eq!(r, Err(Some(libc::EFAULT)));
            assert!(!uffd.poll_readable(Some(Duration::ZERO)).expect("poll"));
            assert_eq!(uffd.read_events(&mut buf).expect("read"), 0);
        } else {
            loop {
                assert!(uffd
                    .poll_readable(Some(Duration::from_secs(10)))
                    .expect("poll"));
                if uffd.read_events(&mut buf).expect("read") > 0 {
                    break;
                }
            }
            match buf.events()[0] {
                Event::Pagefault { address, flags, .. } => {
                    assert_eq!(address, m.addr());
                    assert!(flags.contains(faultline_uffd::PagefaultFlags::WRITE));
                }
                ref other => panic!("{other:?}"),
            }
            let done = uffd
                .zeropage(m.addr(), PAGE_SIZE as u64, Default::default())
                .expect("zeropage");
            assert_eq!(done, Resolved::Complete(PAGE_SIZE as u64));
            assert_eq!(kernel_access.join().expect("reader"), Ok(12));
            let mut got = [0u8; 12];
            m.read(0, &mut got).expect("read back");
            assert_eq!(&got, b"kernel write");
        }
        // User-space faults are reported in both modes.
        let m3 = Arc::clone(&m);
        let toucher = std::thread::spawn(move || m3.read_u8(PAGE_SIZE + 1));
        loop {
            assert!(uffd
                .poll_readable(Some(Duration::from_secs(10)))
                .expect("poll"));
            if uffd.read_events(&mut buf).expect("read") > 0 {
                break;
            }
        }
        assert_eq!(
            buf.events()[0].fault_address(),
            Some(m.addr() + PAGE_SIZE as u64)
        );
        let page = pattern_page(4, 1, PAGE_SIZE);
        let done = uffd
            .copy(m.addr() + PAGE_SIZE as u64, &page, CopyMode::empty())
            .expect("copy");
        assert_eq!(done, Resolved::Complete(PAGE_SIZE as u64));
        assert_eq!(toucher.join().expect("toucher"), Ok(page[1]));
    }
}
