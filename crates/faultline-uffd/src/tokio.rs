//! Async event reading for tokio (the `tokio` cargo feature).
//!
//! [`AsyncUffd`] registers a non-blocking [`Uffd`] with tokio's reactor through
//! [`tokio::io::unix::AsyncFd`], so a task can wait for fault messages without a thread parked in
//! `poll(2)`. [`EventStream`] turns it into a [`futures_core::Stream`] of event batches, one batch
//! per `read(2)`.
//!
//! Readiness is edge-triggered: tokio reports the fd readable once per new message, and keeps
//! reporting it until a read finds the queue empty. A read that returns nothing is normal traffic
//! (another reader took the messages, or a resolve without DONTWAKE woke the faulting thread, which
//! withdraws its message before it was read): only then is the readiness cleared and the task goes
//! back to waiting. Resolving is not async — the resolve ioctls do not block — so a handler keeps
//! an `Arc<Uffd>` and calls [`Uffd::copy`] and friends directly.
//!
//! The fd must be non-blocking: a blocking userfaultfd reports `POLLERR` to `epoll`, and a read on
//! it would block the runtime's thread.
//!
//! # Example: serve faults from a task
//! ```
//! use std::sync::Arc;
//!
//! use faultline_uffd::tokio::AsyncUffd;
//! use faultline_uffd::{CopyMode, Event, Features, Mapping, RegisterMode, Uffd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
//! let uffd = Arc::new(Uffd::new(Features::empty())?);
//! let region = Arc::new(Mapping::anonymous(4096)?);
//! uffd.register(&region, RegisterMode::MISSING)?;
//!
//! // A plain thread touches the page and sleeps in the kernel until it is served.
//! let toucher = {
//!     let region = Arc::clone(&region);
//!     std::thread::spawn(move || region.read_u8(7))
//! };
//! rt.block_on(async {
//!     let mut stream = AsyncUffd::new(Arc::clone(&uffd))?.into_stream(16);
//!     loop {
//!         let batch = std::future::poll_fn(|cx| {
//!             futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
//!         })
//!         .await
//!         .expect("the stream never ends")?;
//!         for event in batch {
//!             if let Event::Pagefault { address, .. } = event {
//!                 uffd.copy(address & !4095, &[9u8; 4096], CopyMode::empty())?;
//!                 return Ok::<_, Box<dyn std::error::Error>>(());
//!             }
//!         }
//!     }
//! })?;
//! assert_eq!(toucher.join().expect("toucher")?, 9);
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::Interest;
use rustix::io::Errno;

use crate::error::Error;
use crate::event::{Event, EventBuffer};
use crate::uffd::Uffd;

fn reactor_error(operation: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Os {
        operation,
        errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
    }
}

/// A non-blocking [`Uffd`] registered with the current tokio runtime's reactor.
///
/// Reads may be awaited from several tasks at once; each message is delivered to one of them.
#[derive(Debug)]
pub struct AsyncUffd {
    fd: AsyncFd<Arc<Uffd>>,
}

impl AsyncUffd {
    /// Register `uffd` with the reactor of the current tokio runtime (for read readiness).
    ///
    /// Fails with `EINVAL` if the fd is blocking (see the [module docs](self)) and with `ENXIO` when
    /// called outside a runtime (rather than panicking as tokio would). The runtime needs its I/O
    /// driver enabled.
    pub fn new(uffd: Arc<Uffd>) -> Result<AsyncUffd, Error> {
        if !uffd.is_non_blocking() {
            return Err(Error::Os {
                operation: "AsyncUffd::new on a blocking userfaultfd (create it non-blocking)",
                errno: Errno::INVAL,
            });
        }
        if ::tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Os {
                operation: "AsyncUffd::new outside a tokio runtime",
                errno: Errno::NXIO,
            });
        }
        // Tokio 1.54 deprecated the safe constructors because an arbitrary `AsRawFd` may close or
        // swap its fd while registered (the replacement, `register_with_interest`, is `unsafe`).
        // `Arc<Uffd>` cannot: `Uffd` owns its fd for its whole life and never replaces it, and
        // the `AsyncFd` holds the `Arc`. The safe constructor also works on every tokio 1.x.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(uffd, Interest::READABLE).map_err(reactor_error(
            "registering the userfaultfd with the tokio reactor",
        ))?;
        Ok(AsyncUffd { fd })
    }

    /// The userfaultfd, to resolve faults and read its statistics.
    pub fn uffd(&self) -> &Arc<Uffd> {
        self.fd.get_ref()
    }

    /// Deregister from the reactor and give the userfaultfd back.
    pub fn into_inner(self) -> Arc<Uffd> {
        self.fd.into_inner()
    }

    /// Wait until messages are queued, then read as many as `buf` holds with one `read(2)`.
    /// Returns the number of events (never 0: an empty read clears the readiness and waits
    /// again). The events are in `buf`, as after [`Uffd::read_events`].
    pub async fn read_events(&self, buf: &mut EventBuffer) -> Result<usize, Error> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(reactor_error("waiting for userfaultfd readiness"))?;
            match self.fd.get_ref().read_events(buf)? {
                0 => guard.clear_ready(),
                n => return Ok(n),
            }
        }
    }

    /// A stream of event batches read into a buffer of `capacity` messages.
    pub fn into_stream(self, capacity: usize) -> EventStream {
        EventStream {
            fd: self,
            buf: EventBuffer::new(capacity),
        }
    }

    fn poll_read_events(
        &self,
        buf: &mut EventBuffer,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Error>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))
                .map_err(reactor_error("waiting for userfaultfd readiness"))?;
            match self.fd.get_ref().read_events(buf) {
                Ok(0) => guard.clear_ready(),
                other => return Poll::Ready(other),
            }
        }
    }
}

/// A [`futures_core::Stream`] of event batches: each item holds the events of one `read(2)`
/// (at least one). The stream never ends; an item is an error when a read or the reactor fails,
/// and polling again after an error tries again.
///
/// Made by [`AsyncUffd::into_stream`] or [`EventStream::new`]. Only one task should poll a given
/// stream (it is `Unpin` and owned, so this is the natural use).
#[derive(Debug)]
pub struct EventStream {
    fd: AsyncUffd,
    buf: EventBuffer,
}

impl EventStream {
    /// Register `uffd` with the current runtime (see [`AsyncUffd::new`]) and stream its events,
    /// up to `capacity` per batch.
    pub fn new(uffd: Arc<Uffd>, capacity: usize) -> Result<EventStream, Error> {
        Ok(AsyncUffd::new(uffd)?.into_stream(capacity))
    }

    /// The userfaultfd, to resolve faults and read its statistics.
    pub fn uffd(&self) -> &Arc<Uffd> {
        self.fd.uffd()
    }

    /// Give back the registered fd.
    pub fn into_inner(self) -> AsyncUffd {
        self.fd
    }
}

impl futures_core::Stream for EventStream {
    type Item = Result<Vec<Event>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let result = ready!(this.fd.poll_read_events(&mut this.buf, cx));
        Poll::Ready(Some(result.map(|_| this.buf.drain().collect())))
    }
}
