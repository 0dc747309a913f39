//! Complete, safe bindings to Linux `userfaultfd` (Linux 5.x – 6.18).
//!
//! A userfaultfd lets a process handle page faults on memory it registered: a thread touching a
//! missing page sleeps, a handler reads the fault message, fills the page with a resolve ioctl
//! (COPY, ZEROPAGE, CONTINUE, MOVE, POISON, WRITEPROTECT) and the sleeper wakes. This crate covers
//! the whole kernel API — creation through `userfaultfd(2)` or `/dev/userfaultfd`, the feature
//! handshake, registration in MISSING / WP / MINOR modes on anonymous, shmem and hugetlbfs memory,
//! every resolve ioctl with typed outcomes, all event kinds, and dirty tracking with `WP_ASYNC` +
//! `PAGEMAP_SCAN` — with no raw ioctl left to the caller. It has no threads and no policy; the
//! `faultline` crate builds a fault server on it.
//!
//! # Example: serve a fault
//! ```
//! use faultline_uffd::{CopyMode, Event, EventBuffer, Features, Mapping, RegisterMode, Uffd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let uffd = Uffd::new(Features::empty())?;
//! let region = Mapping::anonymous(4096)?;
//! uffd.register(&region, RegisterMode::MISSING)?;
//!
//! std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
//!     // The toucher sleeps in the kernel until the page is resolved.
//!     let toucher = s.spawn(|| region.read_u8(100));
//!     let mut events = EventBuffer::new(16);
//!     loop {
//!         uffd.poll_readable(None)?;
//!         if uffd.read_events(&mut events)? == 0 {
//!             continue; // woken by another resolve, or a spurious wake-up: normal traffic
//!         }
//!         if let Some(Event::Pagefault { address, .. }) = events.events().first() {
//!             let page = [42u8; 4096];
//!             uffd.copy(*address & !4095, &page, CopyMode::empty())?;
//!             break;
//!         }
//!     }
//!     assert_eq!(toucher.join().expect("toucher")?, 42);
//!     Ok(())
//! })?;
//! assert_eq!(uffd.stats().copy, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Safety model
//! Memory registered with a userfaultfd changes underneath the program. Registering a
//! [`Mapping`] (which never hands out references into its memory) is safe; registering an
//! arbitrary range ([`Uffd::register_raw`]), adopting a received fd ([`Uffd::from_initialized_fd`])
//! and moving pages out of a source range ([`Uffd::move_pages`]) are `unsafe`, with the contract
//! stated on each.
//!
//! All `unsafe` code of the crate — and of the whole product: `faultline` and `faultline-cli`
//! forbid it — lives in two files: `src/sys.rs` (every raw system call and ioctl, the adoption of
//! fds the kernel installs, and the declarations of the public `unsafe fn`s above) and
//! `src/mapping.rs` (every mapping of this process: [`Mapping`], [`ScratchPages`],
//! [`FileMapping`], and every access to their memory). The test `tests/unsafe_confined.rs` checks
//! that no other product file holds `unsafe`. The raw ioctls are private to the crate: safe
//! code outside it cannot name them, so it cannot, say, `UFFDIO_MOVE` a page out of a live `Vec`:
//! ```compile_fail,E0603
//! // `sys` is private: this does not compile.
//! use faultline_uffd::sys;
//! ```
//!
//! # Kernel semantics the API encodes
//! - A resolve without DONTWAKE wakes every thread blocked on the range, including faults whose
//!   messages were not read yet: after poll says readable, [`Uffd::read_events`] may return 0, and
//!   several messages may arrive for a page already resolved ([`ResolveErrorKind::AlreadyPresent`]).
//! - While a non-cooperative event (REMOVE, UNMAP, REMAP, FORK) is unread, resolves fail with
//!   [`ResolveErrorKind::Retry`]: read events, then retry.
//! - Partial progress is data: [`Resolved::Partial`] says how many bytes were done.
#![deny(unsafe_code)]

pub mod error;
pub mod event;
pub mod flags;
pub mod mapping;
pub mod pagemap;
pub mod resolve;
pub mod sched;
pub mod scratch;
pub mod socket;
mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod uffd;

pub use error::{CreatePath, Error, RangeError, ResolveError, ResolveErrorKind, ResolveOp};
pub use event::{decode, DecodeError, Event, EventBuffer, Message};
pub use flags::{Features, Ioctls, PagefaultFlags, RegisterMode};
pub use mapping::{FileMapping, Mapping, MemoryKind, ScratchPages, HUGE_PAGE_SIZE, PAGE_SIZE};
pub use pagemap::{PageCategories, PageRun, Pagemap};
pub use resolve::{ContinueMode, CopyMode, MoveMode, Resolved, WriteprotectMode, ZeropageMode};
pub use sched::SchedClass;
pub use uffd::{ApiInfo, Creation, IoctlStats, Uffd, UffdBuilder, UninitUffd};
