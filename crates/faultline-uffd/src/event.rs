//! Events read from a userfaultfd: decoding of `struct uffd_msg`.
//!
//! One `read(2)` returns as many 32-byte messages as fit the buffer. [`decode`] is a pure function
//! from 32 bytes to a [`Message`] (plain data, also used by the fuzz target); [`EventBuffer`] owns
//! the read buffer and the decoded [`Event`]s, reused across reads so the hot path allocates
//! nothing. A FORK message carries a new fd that the kernel installed in our table: it becomes an
//! owned [`Uffd`] in [`Event::Fork`] (closed if nobody takes it). Unknown event codes are reported as
//! [`Event::Unknown`], never dropped.
//!
//! Non-cooperative events (FORK, REMAP, REMOVE, UNMAP) make the process that caused them wait until
//! the message has been read; while one is unread, resolve ioctls fail with EAGAIN
//! ([`crate::ResolveErrorKind::Retry`]). Fault and REMOVE messages can arrive in any order relative to
//! the faults they concern.

use std::os::fd::RawFd;

use linux_raw_sys::general as g;

use crate::flags::{Features, PagefaultFlags};
use crate::uffd::Uffd;

/// Size of one `struct uffd_msg`: the unit of [`decode`] and of a read from a userfaultfd.
pub use crate::sys::UFFD_MSG_SIZE;

/// A decoded message, as plain data (a FORK's fd is a number, not yet owned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A thread faulted on a registered page and sleeps until it is resolved.
    Pagefault {
        /// The faulting address (page-aligned unless EXACT_ADDRESS was negotiated).
        address: u64,
        /// Access kind.
        flags: PagefaultFlags,
        /// The faulting thread's id, when THREAD_ID was negotiated.
        thread_id: Option<u32>,
    },
    /// The process forked; `fd` is a new userfaultfd for the child.
    Fork {
        /// The new fd number in this process.
        fd: RawFd,
    },
    /// A registered range was moved by `mremap`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Pages were dropped (`MADV_DONTNEED` / `MADV_REMOVE`): they are missing again.
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// A registered range was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// An event code this crate does not know.
    Unknown {
        /// The `event` byte.
        code: u8,
        /// The whole message.
        raw: [u8; UFFD_MSG_SIZE],
    },
}

/// A message that cannot be what the kernel sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// `read(2)` returned a length that is not a whole number of messages.
    #[error("read returned {0} bytes, not a multiple of the {UFFD_MSG_SIZE}-byte uffd_msg")]
    TruncatedRead(usize),
    /// A range event whose end precedes its start.
    #[error("{event} event with end {end:#x} before start {start:#x}")]
    InvertedRange {
        /// Which event.
        event: &'static str,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// A REMAP whose ranges overflow.
    #[error("REMAP event of {len:#x} bytes from {from:#x} to {to:#x} overflows")]
    RemapOverflow {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// A FORK whose fd number is not a valid descriptor.
    #[error("FORK event with invalid fd {0}")]
    BadForkFd(u32),
}

fn u64_at(b: &[u8; UFFD_MSG_SIZE], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn u32_at(b: &[u8; UFFD_MSG_SIZE], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// Decode one `struct uffd_msg` (layout: `event:u8, reserved[7]`, then a 24-byte union at offset 8).
/// `features` are the ones negotiated on the fd (THREAD_ID decides whether `ptid` is meaningful).
pub fn decode(raw: &[u8; UFFD_MSG_SIZE], features: Features) -> Result<Message, DecodeError> {
    let code = raw[0];
    let range = |event: &'static str| {
        let (start, end) = (u64_at(raw, 8), u64_at(raw, 16));
        if end < start {
            Err(DecodeError::InvertedRange { event, start, end })
        } else {
            Ok((start, end))
        }
    };
    Ok(match u32::from(code) {
        g::UFFD_EVENT_PAGEFAULT => Message::Pagefault {
            flags: PagefaultFlags::from_bits_retain(u64_at(raw, 8)),
            address: u64_at(raw, 16),
            thread_id: features
                .contains(Features::THREAD_ID)
                .then(|| u32_at(raw, 24)),
        },
        g::UFFD_EVENT_FORK => {
            let ufd = u32_at(raw, 8);
            let fd = RawFd::try_from(ufd).map_err(|_| DecodeError::BadForkFd(ufd))?;
            Message::Fork { fd }
        }
        g::UFFD_EVENT_REMAP => {
            let (from, to, len) = (u64_at(raw, 8), u64_at(raw, 16), u64_at(raw, 24));
            if from.checked_add(len).is_none() || to.checked_add(len).is_none() {
                return Err(DecodeError::RemapOverflow { from, to, len });
            }
            Message::Remap { from, to, len }
        }
        g::UFFD_EVENT_REMOVE => {
            let (start, end) = range("REMOVE")?;
            Message::Remove { start, end }
        }
        g::UFFD_EVENT_UNMAP => {
            let (start, end) = range("UNMAP")?;
            Message::Unmap { start, end }
        }
        _ => Message::Unknown { code, raw: *raw },
    })
}

/// An event with owned resources.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted on a registered page.
    Pagefault {
        /// The faulting address.
        address: u64,
        /// Access kind.
        flags: PagefaultFlags,
        /// The faulting thread's id, when THREAD_ID was negotiated.
        thread_id: Option<u32>,
    },
    /// The process forked: this userfaultfd serves the child's copy of the registered ranges.
    Fork(Uffd),
    /// A registered range moved.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Pages were dropped and are missing again.
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// A registered range was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// An event code this crate does not know.
    Unknown {
        /// The event byte.
        code: u8,
        /// The whole message.
        raw: [u8; UFFD_MSG_SIZE],
    },
}

impl Event {
    /// The faulting address, for a page fault.
    pub fn fault_address(&self) -> Option<u64> {
        match self {
            Event::Pagefault { address, .. } => Some(*address),
            _ => None,
        }
    }
}

/// A reusable buffer for [`Uffd::read_events`]: room for `capacity` messages per read.
#[derive(Debug)]
pub struct EventBuffer {
    raw: Vec<u8>,
    events: Vec<Event>,
}

impl EventBuffer {
    /// Room for `capacity` messages (at least one).
    pub fn new(capacity: usize) -> EventBuffer {
        let capacity = capacity.max(1);
        EventBuffer {
            raw: vec![0; capacity * UFFD_MSG_SIZE],
            events: Vec::with_capacity(capacity),
        }
    }
    /// How many messages one read can return.
    pub fn capacity(&self) -> usize {
        self.raw.len() / UFFD_MSG_SIZE
    }
    /// The events of the last read.
    pub fn events(&self) -> &[Event] {
        &self.events
    }
    /// Take the events of the last read (e.g. to keep a FORK's fd).
    pub fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }
    /// Number of events from the last read.
    pub fn len(&self) -> usize {
        self.events.len()
    }
    /// Whether the last read returned nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    pub(crate) fn clear(&mut self) {
        self.events.clear();
    }
    pub(crate) fn raw_mut(&mut self) -> &mut [u8] {
        self.events.clear();
        &mut self.raw
    }

    /// Decode the first `n` bytes of the raw buffer. Every message is decoded even when one of
    /// them is malformed, so that no fork fd is leaked; the first error is returned after.
    pub(crate) fn decode_read(
        &mut self,
        n: usize,
        features: Features,
        mut adopt_fork: impl FnMut(RawFd) -> Uffd,
    ) -> Result<usize, DecodeError> {
        self.events.clear();
        let mut first_err = None;
        if n % UFFD_MSG_SIZE != 0 {
            first_err = Some(DecodeError::TruncatedRead(n));
        }
        for chunk in self.raw[..n - n % UFFD_MSG_SIZE].chunks_exact(UFFD_MSG_SIZE) {
            let raw: &[u8; UFFD_MSG_SIZE] = chunk.try_into().expect("chunks_exact yields 32 bytes");
            let ev = match decode(raw, features) {
                Ok(Message::Pagefault {
                    address,
                    flags,
                    thread_id,
                }) => Event::Pagefault {
                    address,
                    flags,
                    thread_id,
                },
                Ok(Message::Fork { fd }) => Event::Fork(adopt_fork(fd)),
                Ok(Message::Remap { from, to, len }) => Event::Remap { from, to, len },
                Ok(Message::Remove { start, end }) => Event::Remove { start, end },
                Ok(Message::Unmap { start, end }) => Event::Unmap { start, end },
                Ok(Message::Unknown { code, raw }) => Event::Unknown { code, raw },
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            self.events.push(ev);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(self.events.len()),
        }
    }
}

impl Default for EventBuffer {
    /// Room for 64 messages.
    fn default() -> Self {
        EventBuffer::new(64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(code: u8, words: [u64; 3]) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0] = code;
        for (i, w) in words.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    #[test]
    fn pagefault_with_and_without_thread_id() {
        let mut m = msg(0x12, [1 | 4, 0x7000_1000, 0]);
        m[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(
            decode(&m, Features::THREAD_ID),
            Ok(Message::Pagefault {
                address: 0x7000_1000,
                flags: PagefaultFlags::WRITE | PagefaultFlags::MINOR,
                thread_id: Some(4242)
            })
        );
        assert!(matches!(
            decode(&m, Features::empty()),
            Ok(Message::Pagefault {
                thread_id: None,
                ..
            })
        ));
    }

    #[test]
    fn range_events() {
        assert_eq!(
            decode(&msg(0x15, [0x1000, 0x3000, 0]), Features::empty()),
            Ok(Message::Remove {
                start: 0x1000,
                end: 0x3000
            })
        );
        assert_eq!(
            decode(&msg(0x16, [0x1000, 0x3000, 0]), Features::empty()),
            Ok(Message::Unmap {
                start: 0x1000,
                end: 0x3000
            })
        );
        assert_eq!(
            decode(&msg(0x14, [0x1000, 0x9000, 0x2000]), Features::empty()),
            Ok(Message::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            })
        );
        assert!(matches!(
            decode(&msg(0x15, [0x3000, 0x1000, 0]), Features::empty()),
            Err(DecodeError::InvertedRange {
                event: "REMOVE",
                ..
            })
        ));
        assert!(matches!(
            decode(&msg(0x14, [u64::MAX, 0, 2]), Features::empty()),
            Err(DecodeError::RemapOverflow { .. })
        ));
    }

    #[test]
    fn fork_and_unknown() {
        assert_eq!(
            decode(&msg(0x13, [7, 0, 0]), Features::empty()),
            Ok(Message::Fork { fd: 7 })
        );
        assert_eq!(
            decode(&msg(0x13, [u32::MAX as u64, 0, 0]), Features::empty()),
            Err(DecodeError::BadForkFd(u32::MAX))
        );
        let m = msg(0x99, [1, 2, 3]);
        assert_eq!(
            decode(&m, Features::empty()),
            Ok(Message::Unknown { code: 0x99, raw: m })
        );
    }

    #[test]
    fn a_truncated_read_is_reported_after_decoding_the_whole_messages() {
        let mut b = EventBuffer::new(2);
        b.raw[..32].copy_from_slice(&msg(0x15, [0, 0x1000, 0]));
        let r = b.decode_read(40, Features::empty(), |_| unreachable!());
        assert_eq!(r, Err(DecodeError::TruncatedRead(40)));
        assert_eq!(b.len(), 1);
    }
}
