//! The kernel boundary: uapi structs, ioctl opcodes, the raw calls, and the public `unsafe`
//! entry points.
//!
//! This module and [`crate::mapping`] (raw memory) are the only two files of the crate, and of the
//! whole product, that hold `unsafe` code; `faultline` and `faultline-cli` forbid it. Here are:
//! - every raw system call and ioctl the crate issues that rustix does not wrap safely (the
//!   userfaultfd ioctls, `PAGEMAP_SCAN`, `USERFAULTFD_IOC_NEW`, `getsockopt(SO_PEERPIDFD)`,
//!   `writev` over raw iovecs, `sched_setscheduler`) and the adoption of fds the kernel installed
//!   for us;
//! - the four `unsafe fn`s of the public API, where the caller vouches for an fd or a range:
//!   [`UninitUffd::from_fd`], [`Uffd::from_initialized_fd`], [`Uffd::register_raw`] and
//!   [`Uffd::move_pages`]. Their safe siblings ([`Uffd::register_range`],
//!   [`Uffd::from_received_fd`], [`Uffd::move_from_scratch`]) establish the same contracts from
//!   the types they take and call the same crate-private code.
//!
//! The structs come from `linux-raw-sys` (generated from the kernel's uapi headers); the opcodes
//! that `linux-raw-sys` does not carry (`UFFDIO_MOVE`, `UFFDIO_POISON`, `USERFAULTFD_IOC_NEW`,
//! `PAGEMAP_SCAN`) are computed here with the kernel's `_IOWR`/`_IO` encoding. The unit tests at
//! the bottom pin every size and number to the values of the Linux 6.18 uapi, so neither the system
//! headers (which may be older than the running kernel) nor a dependency update can silently
//! change them.
//!
//! The functions here are thin: they issue one call and hand back the errno and the kernel's
//! progress field untouched. Interpretation (partial progress, typed error kinds) is in
//! [`crate::resolve`].
//!
//! The module is private and its raw calls are `pub(crate)` (STYLE rule 3a): they are safe
//! functions only because the crate's public API decides which ranges and fds reach them. A public
//! `move_pages` or `copy` taking any address would let safe code move pages out of, or write into,
//! memory it does not own (a live `Vec`); outside the crate the same ioctls are reachable only
//! through [`crate::Uffd`]'s methods, which are `unsafe` where the range is the caller's word
//! ([`crate::Uffd::register_raw`], [`crate::Uffd::move_pages`]). The two socket calls are public
//! through [`crate::socket`] because they are safe whatever their arguments: `writev` only lets
//! the kernel read memory (a bad address is `EFAULT`), and `SO_PEERPIDFD` returns a new fd.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode, Updater};

use crate::error::Error;
use crate::flags::{Features, Ioctls, RegisterMode};
use crate::resolve::{MoveMode, Resolved};
use crate::socket::IoPiece;
use crate::uffd::{Uffd, UninitUffd};
use crate::ResolveError;

pub(crate) use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffdio_api, uffdio_continue, uffdio_copy, uffdio_move, uffdio_poison,
    uffdio_range, uffdio_register, uffdio_writeprotect, uffdio_zeropage,
};

/// `UFFD_API`: the only API version the kernel knows.
pub(crate) const UFFD_API: u64 = linux_raw_sys::general::UFFD_API as u64;
/// `UFFD_USER_MODE_ONLY`: the flag for `userfaultfd(2)` / `USERFAULTFD_IOC_NEW`.
pub(crate) const UFFD_USER_MODE_ONLY: u32 = linux_raw_sys::general::UFFD_USER_MODE_ONLY;
/// `UFFDIO` ioctl group (`0xAA`).
const UFFDIO: u8 = 0xAA;

/// `_UFFDIO_*` ioctl numbers (bit positions in the `ioctls` masks the kernel returns).
pub(crate) mod nr {
    /// `_UFFDIO_REGISTER`
    pub(crate) const REGISTER: u8 = 0x00;
    /// `_UFFDIO_UNREGISTER`
    pub(crate) const UNREGISTER: u8 = 0x01;
    /// `_UFFDIO_WAKE`
    pub(crate) const WAKE: u8 = 0x02;
    /// `_UFFDIO_COPY`
    pub(crate) const COPY: u8 = 0x03;
    /// `_UFFDIO_ZEROPAGE`
    pub(crate) const ZEROPAGE: u8 = 0x04;
    /// `_UFFDIO_MOVE`
    pub(crate) const MOVE: u8 = 0x05;
    /// `_UFFDIO_WRITEPROTECT`
    pub(crate) const WRITEPROTECT: u8 = 0x06;
    /// `_UFFDIO_CONTINUE`
    pub(crate) const CONTINUE: u8 = 0x07;
    /// `_UFFDIO_POISON`
    pub(crate) const POISON: u8 = 0x08;
    /// `_UFFDIO_API`
    pub(crate) const API: u8 = 0x3F;
}

/// `UFFDIO_API`: `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`.
pub(crate) const UFFDIO_API: Opcode = ioctl::opcode::read_write::<uffdio_api>(UFFDIO, nr::API);
/// `UFFDIO_REGISTER`: `_IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`.
pub(crate) const UFFDIO_REGISTER: Opcode =
    ioctl::opcode::read_write::<uffdio_register>(UFFDIO, nr::REGISTER);
/// `UFFDIO_UNREGISTER`: `_IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)`.
pub(crate) const UFFDIO_UNREGISTER: Opcode =
    ioctl::opcode::read::<uffdio_range>(UFFDIO, nr::UNREGISTER);
/// `UFFDIO_WAKE`: `_IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)`.
pub(crate) const UFFDIO_WAKE: Opcode = ioctl::opcode::read::<uffdio_range>(UFFDIO, nr::WAKE);
/// `UFFDIO_COPY`: `_IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`.
pub(crate) const UFFDIO_COPY: Opcode = ioctl::opcode::read_write::<uffdio_copy>(UFFDIO, nr::COPY);
/// `UFFDIO_ZEROPAGE`: `_IOWR(UFFDIO, _UFFDIO_ZEROPAGE, struct uffdio_zeropage)`.
pub(crate) const UFFDIO_ZEROPAGE: Opcode =
    ioctl::opcode::read_write::<uffdio_zeropage>(UFFDIO, nr::ZEROPAGE);
/// `UFFDIO_MOVE`: `_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)` (Linux 6.8).
pub(crate) const UFFDIO_MOVE: Opcode = ioctl::opcode::read_write::<uffdio_move>(UFFDIO, nr::MOVE);
/// `UFFDIO_WRITEPROTECT`: `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
pub(crate) const UFFDIO_WRITEPROTECT: Opcode =
    ioctl::opcode::read_write::<uffdio_writeprotect>(UFFDIO, nr::WRITEPROTECT);
/// `UFFDIO_CONTINUE`: `_IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)`.
pub(crate) const UFFDIO_CONTINUE: Opcode =
    ioctl::opcode::read_write::<uffdio_continue>(UFFDIO, nr::CONTINUE);
/// `UFFDIO_POISON`: `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)` (Linux 6.6).
pub(crate) const UFFDIO_POISON: Opcode =
    ioctl::opcode::read_write::<uffdio_poison>(UFFDIO, nr::POISON);
/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd` (Linux 6.1).
pub(crate) const USERFAULTFD_IOC_NEW: Opcode = ioctl::opcode::none(UFFDIO, 0x00);
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` on `/proc/<pid>/pagemap` (Linux 6.7).
pub(crate) const PAGEMAP_SCAN: Opcode = ioctl::opcode::read_write::<pm_scan_arg>(b'f', 16);

/// `PM_SCAN_WP_MATCHING`: write-protect the pages that match while scanning.
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM unless the range is registered for async WP.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Size of one `struct uffd_msg` on the wire.
pub const UFFD_MSG_SIZE: usize = 32;

/// `userfaultfd(2)` with the given open flags (`O_CLOEXEC`, `O_NONBLOCK`, `UFFD_USER_MODE_ONLY`).
pub(crate) fn userfaultfd_syscall(flags: u32) -> Result<OwnedFd, Errno> {
    let flags = rustix::mm::UserfaultfdFlags::from_bits_retain(flags);
    // SAFETY: creating a userfaultfd has no memory-safety precondition by itself; the returned fd
    // is owned by the caller, and every operation that can change memory through it is guarded by
    // this crate's API (registration of caller memory is `unsafe` or goes through `Mapping`).
    unsafe { rustix::mm::userfaultfd(flags) }
}

/// An ioctl whose result is a new file descriptor returned as the ioctl's value.
struct NewFd<const OPCODE: Opcode> {
    arg: usize,
}

// SAFETY: `opcode` is the caller-chosen constant, the argument is passed as an integer (the
// kernel does not dereference it for USERFAULTFD_IOC_NEW) and `output_from_ptr` turns the returned
// non-negative value, a fresh fd the kernel installed for us, into an owned fd exactly once.
unsafe impl<const OPCODE: Opcode> Ioctl for NewFd<OPCODE> {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        OPCODE
    }
    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.arg as *mut core::ffi::c_void
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<OwnedFd> {
        // SAFETY: a successful USERFAULTFD_IOC_NEW returns a newly installed fd that nothing else
        // owns.
        Ok(unsafe { OwnedFd::from_raw_fd(out as RawFd) })
    }
}

/// `ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW, flags)`.
pub(crate) fn userfaultfd_dev_new(dev: BorrowedFd<'_>, flags: u32) -> Result<OwnedFd, Errno> {
    let req = NewFd::<USERFAULTFD_IOC_NEW> {
        arg: usize::try_from(flags).expect("a u32 fits usize on Linux targets"),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags as an integer argument and returns a new fd.
    unsafe { ioctl::ioctl(dev, req) }
}

macro_rules! updater_call {
    ($(#[$m:meta])* $name:ident, $opcode:ident, $ty:ty) => {
        $(#[$m])*
        pub(crate) fn $name(fd: BorrowedFd<'_>, arg: &mut $ty) -> Result<(), Errno> {
            // SAFETY: the opcode was built from this struct's size and the kernel reads and writes
            // exactly one `$ty` through the pointer, which is valid and exclusively borrowed for
            // the whole call. The ioctl touches memory of the uffd's address space only through the
            // ranges the caller registered (see the crate's safety model).
            let req = unsafe { Updater::<$opcode, $ty>::new(arg) };
            // SAFETY: see above; `req` is a correctly typed request for this opcode.
            unsafe { ioctl::ioctl(fd, req) }
        }
    };
}

updater_call!(
    /// `UFFDIO_API`.
    api, UFFDIO_API, uffdio_api
);
updater_call!(
    /// `UFFDIO_REGISTER`.
    register, UFFDIO_REGISTER, uffdio_register
);
updater_call!(
    /// `UFFDIO_COPY`.
    copy, UFFDIO_COPY, uffdio_copy
);
updater_call!(
    /// `UFFDIO_ZEROPAGE`.
    zeropage, UFFDIO_ZEROPAGE, uffdio_zeropage
);
updater_call!(
    /// `UFFDIO_MOVE`.
    move_pages, UFFDIO_MOVE, uffdio_move
);
updater_call!(
    /// `UFFDIO_WRITEPROTECT`.
    writeprotect, UFFDIO_WRITEPROTECT, uffdio_writeprotect
);
updater_call!(
    /// `UFFDIO_CONTINUE`.
    continue_, UFFDIO_CONTINUE, uffdio_continue
);
updater_call!(
    /// `UFFDIO_POISON`.
    poison, UFFDIO_POISON, uffdio_poison
);
// UNREGISTER and WAKE are declared `_IOR` but the kernel only reads the range; an updater is the
// right shape for the pointer-passing convention and the opcode carries the `_IOR` direction.
updater_call!(
    /// `UFFDIO_UNREGISTER`.
    unregister, UFFDIO_UNREGISTER, uffdio_range
);
updater_call!(
    /// `UFFDIO_WAKE`.
    wake, UFFDIO_WAKE, uffdio_range
);

/// `PAGEMAP_SCAN` ioctl returning the number of `page_region`s the kernel filled.
struct PagemapScan<'a> {
    arg: &'a mut pm_scan_arg,
}

// SAFETY: PAGEMAP_SCAN reads and writes one `pm_scan_arg` (its `size` field says which) and writes
// at most `vec_len` `page_region`s to `vec`; the caller of `pagemap_scan` guarantees `vec` points
// to that many writable regions. The return value is a count, converted without reinterpretation.
unsafe impl Ioctl for PagemapScan<'_> {
    type Output = usize;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        PAGEMAP_SCAN
    }
    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        (self.arg as *mut pm_scan_arg).cast()
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<usize> {
        usize::try_from(out).map_err(|_| Errno::INVAL)
    }
}

/// `ioctl(pagemap, PAGEMAP_SCAN, arg)` writing into `out` (the function sets `vec`/`vec_len`).
pub(crate) fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    arg: &mut pm_scan_arg,
    out: &mut [page_region],
) -> Result<usize, Errno> {
    arg.size = core::mem::size_of::<pm_scan_arg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    let req = PagemapScan { arg };
    // SAFETY: `vec`/`vec_len` describe `out`, which is exclusively borrowed for the call; the
    // kernel writes at most `vec_len` entries and they are plain integers.
    let n = unsafe { ioctl::ioctl(pagemap, req) }?;
    Ok(n.min(out.len()))
}

/// Adopt the fd of a FORK message this crate has just read from a userfaultfd.
///
/// Crate-private and only for that use: `raw` must be the `ufd` field of a `UFFD_EVENT_FORK`
/// message returned by `read(2)` on a userfaultfd (see [`crate::event::EventBuffer`]).
pub(crate) fn adopt_fork_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed this fd in our table for the FORK message it just gave us
    // (`read(2)` of a userfaultfd with EVENT_FORK); nothing else owns it, and each message is
    // decoded once, so it is adopted exactly once.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// `SO_PEERPIDFD` (the asm-generic value), where that is its number: the architectures with
/// their own socket option numbers (alpha, mips, parisc, sparc) are not listed, and answer
/// `ENOPROTOOPT`.
const SO_PEERPIDFD: Option<libc::c_int> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "powerpc64",
    target_arch = "s390x",
    target_arch = "loongarch64"
)) {
    Some(77)
} else {
    None
};

/// `getsockopt(socket, SOL_SOCKET, SO_PEERPIDFD)`: a pidfd (close-on-exec) of the process that
/// connected the Unix socket (Linux 6.5+). rustix 1.1 has no wrapper for it.
pub(crate) fn peer_pidfd(socket: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let Some(option) = SO_PEERPIDFD else {
        return Err(Errno::NOPROTOOPT);
    };
    let mut fd: libc::c_int = -1;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .expect("an int's size fits socklen_t");
    // SAFETY: `socket` is an open fd for the call's duration; `fd` and `len` are valid, writable
    // and `len` holds the size of `fd`, so the kernel writes at most that many bytes.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of_mut!(fd).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    if fd < 0 || usize::try_from(len).ok() != Some(std::mem::size_of::<libc::c_int>()) {
        return Err(Errno::INVAL);
    }
    // SAFETY: on success the kernel installed a new pidfd (close-on-exec) as `fd` in this
    // process's table; nothing else owns it, so it is adopted exactly once here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sched_setscheduler(tid, policy, {0})` through the raw system call (glibc's wrapper is a
/// thin one, musl's fails with ENOSYS): the scheduling policy of one thread (`tid` 0: the caller),
/// for the normal policies (`SCHED_OTHER`, `SCHED_BATCH`, `SCHED_IDLE`), whose priority is 0.
pub(crate) fn sched_setscheduler(tid: libc::pid_t, policy: libc::c_int) -> Result<(), Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the call reads one `sched_param` through the pointer, which is valid and borrowed
    // for the call; it writes no memory of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            libc::c_long::from(tid),
            libc::c_long::from(policy),
            std::ptr::addr_of!(param),
        )
    };
    if r != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    Ok(())
}

/// `sched_getscheduler(tid)` through the raw system call: the policy of one thread (`tid` 0: the
/// caller), `SCHED_RESET_ON_FORK` masked off.
pub(crate) fn sched_getscheduler(tid: libc::pid_t) -> Result<libc::c_int, Errno> {
    // SAFETY: the call takes a number and touches no memory of this process.
    let r = unsafe { libc::syscall(libc::SYS_sched_getscheduler, libc::c_long::from(tid)) };
    match libc::c_int::try_from(r) {
        Ok(p) if p >= 0 => Ok(p & !libc::SCHED_RESET_ON_FORK),
        _ => Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)),
    }
}

/// The most iovecs one `writev` takes (the kernel's `UIO_MAXIOV`).
pub(crate) const MAX_IOV: usize = 1024;

/// `writev(fd, pieces)` of at most [`MAX_IOV`] pieces (the rest is left for the next call, as a
/// short write). Returns the bytes written; `EINTR` is the caller's to retry.
pub(crate) fn writev(fd: BorrowedFd<'_>, pieces: &[IoPiece<'_>]) -> Result<usize, Errno> {
    let pieces = &pieces[..pieces.len().min(MAX_IOV)];
    let count = libc::c_int::try_from(pieces.len()).expect("at most UIO_MAXIOV iovecs");
    // SAFETY: `IoPiece` is `repr(transparent)` over `libc::iovec`, so `pieces` is an array of
    // `count` initialized iovecs, borrowed for the call. The kernel only reads the memory they
    // describe, validating every address itself (a bad one fails the call with EFAULT): nothing in
    // this process is written or read, so no Rust reference can be invalidated. `fd` is an open
    // descriptor borrowed for the call.
    let n = unsafe { libc::writev(fd.as_raw_fd(), pieces.as_ptr().cast::<libc::iovec>(), count) };
    match usize::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)),
    }
}

// The `unsafe fn`s of the public API. Each is a contract on its caller; the work is done by a
// crate-private safe function that the safe entry points call too.

impl UninitUffd {
    /// Adopt an fd that is a userfaultfd whose handshake has not been done.
    ///
    /// # Safety
    /// `fd` must be a userfaultfd. Its address space is the one of the process that created it:
    /// the caller must ensure that the memory it will register and resolve through it holds no
    /// Rust references (see [`Uffd::register_raw`]).
    pub unsafe fn from_fd(fd: OwnedFd) -> UninitUffd {
        UninitUffd::adopt(fd)
    }
}

impl Uffd {
    /// Adopt an fd that already completed its handshake (typically received over a Unix socket
    /// from the process whose memory it serves, as Firecracker sends it).
    ///
    /// `features` is what the creator negotiated, if known (the kernel cannot be asked again);
    /// it only gates this crate's own checks.
    ///
    /// # Safety
    /// `fd` must be a userfaultfd. Resolve ioctls write into the creator's address space; when that
    /// is this process, the caller must ensure its registered ranges hold no Rust references.
    pub unsafe fn from_initialized_fd(fd: OwnedFd, features: Features) -> Uffd {
        Uffd::adopt(fd, features)
    }

    /// Register an arbitrary address range of the fd's address space.
    ///
    /// # Safety
    /// Once registered, the range's pages are filled, zapped or moved by the kernel on behalf of
    /// whoever holds this fd. The caller must ensure that no Rust reference (`&T`, `&mut T`) points
    /// into the range while it is registered; access it only through raw pointers or volatile
    /// operations, or let another process own it.
    #[doc(alias = "UFFDIO_REGISTER")]
    pub unsafe fn register_raw(
        &self,
        start: u64,
        len: u64,
        mode: RegisterMode,
    ) -> Result<Ioctls, Error> {
        self.register_unchecked(start, len, mode)
    }

    /// `UFFDIO_MOVE`: move the pages at `src` (anonymous memory of the fd's address space) to the
    /// missing pages at `dst`, without copying. The source range is left unmapped.
    ///
    /// # Safety
    /// The source pages disappear from `src`: the caller must ensure that no Rust reference points
    /// into `src..src+len` and that nothing relies on its contents afterwards.
    #[doc(alias = "UFFDIO_MOVE")]
    pub unsafe fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        mode: MoveMode,
    ) -> Result<Resolved, ResolveError> {
        self.move_unchecked(dst, src, len, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;
    use linux_raw_sys::general::uffd_msg;

    /// Opcode values of the Linux 6.18 x86_64 uapi (`include/uapi/linux/userfaultfd.h`),
    /// written out so that a wrong size or direction in the computation is caught.
    #[test]
    fn opcodes_match_the_kernel() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0x0000_aa00);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn opcodes_agree_with_linux_raw_sys_where_it_has_them() {
        use linux_raw_sys::ioctl as l;
        assert_eq!(UFFDIO_API, l::UFFDIO_API as Opcode);
        assert_eq!(UFFDIO_REGISTER, l::UFFDIO_REGISTER as Opcode);
        assert_eq!(UFFDIO_UNREGISTER, l::UFFDIO_UNREGISTER as Opcode);
        assert_eq!(UFFDIO_WAKE, l::UFFDIO_WAKE as Opcode);
        assert_eq!(UFFDIO_COPY, l::UFFDIO_COPY as Opcode);
        assert_eq!(UFFDIO_ZEROPAGE, l::UFFDIO_ZEROPAGE as Opcode);
        assert_eq!(UFFDIO_WRITEPROTECT, l::UFFDIO_WRITEPROTECT as Opcode);
        assert_eq!(UFFDIO_CONTINUE, l::UFFDIO_CONTINUE as Opcode);
    }

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<uffd_msg>(), UFFD_MSG_SIZE);
        assert_eq!(size_of::<uffdio_api>(), 24);
        assert_eq!(size_of::<uffdio_range>(), 16);
        assert_eq!(size_of::<uffdio_register>(), 32);
        assert_eq!(size_of::<uffdio_copy>(), 40);
        assert_eq!(size_of::<uffdio_zeropage>(), 32);
        assert_eq!(size_of::<uffdio_writeprotect>(), 24);
        assert_eq!(size_of::<uffdio_continue>(), 32);
        assert_eq!(size_of::<uffdio_poison>(), 32);
        assert_eq!(size_of::<uffdio_move>(), 40);
        assert_eq!(size_of::<pm_scan_arg>(), 96);
        assert_eq!(size_of::<page_region>(), 24);
    }

    #[test]
    fn ioctl_numbers_and_constants() {
        use linux_raw_sys::general as g;
        assert_eq!(UFFD_API, 0xAA);
        assert_eq!(UFFD_USER_MODE_ONLY, 1);
        assert_eq!(nr::REGISTER as u32, g::_UFFDIO_REGISTER);
        assert_eq!(nr::UNREGISTER as u32, g::_UFFDIO_UNREGISTER);
        assert_eq!(nr::WAKE as u32, g::_UFFDIO_WAKE);
        assert_eq!(nr::COPY as u32, g::_UFFDIO_COPY);
        assert_eq!(nr::ZEROPAGE as u32, g::_UFFDIO_ZEROPAGE);
        assert_eq!(nr::MOVE as u32, g::_UFFDIO_MOVE);
        assert_eq!(nr::WRITEPROTECT as u32, g::_UFFDIO_WRITEPROTECT);
        assert_eq!(nr::CONTINUE as u32, g::_UFFDIO_CONTINUE);
        assert_eq!(nr::POISON as u32, g::_UFFDIO_POISON);
        assert_eq!(nr::API as u32, g::_UFFDIO_API);
        assert_eq!(g::UFFD_EVENT_PAGEFAULT, 0x12);
        assert_eq!(g::UFFD_EVENT_FORK, 0x13);
        assert_eq!(g::UFFD_EVENT_REMAP, 0x14);
        assert_eq!(g::UFFD_EVENT_REMOVE, 0x15);
        assert_eq!(g::UFFD_EVENT_UNMAP, 0x16);
        assert_eq!(g::PAGE_IS_WRITTEN, 1 << 1);
    }
}
