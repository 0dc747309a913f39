//! Which pages a session has made present, kept outside the serving process.
//!
//! A page of private memory that was made present and faults again was zapped since (a balloon's
//! REMOVE, a `MADV_DONTNEED`): it must read zeros, never the snapshot's older bytes. A server
//! knows this from its page states; a handler that takes a session over from one that died does
//! not — and the REMOVE that zapped the page may have been read by the dead one and never passed
//! on. A [`ServedLog`] is a file (a memfd the supervisor keeps) with one byte per page of the
//! session, written after each resolve: the successor reads it and serves every page marked there
//! as zeros should it fault again ([`SessionOptions::served_log`](crate::SessionOptions)).
//!
//! Bytes, not bits: a mark is one `pwrite` of ones over the resolved run, idempotent and free of
//! read-modify-write races between workers. A page's index is its place in the session's regions
//! in the order they were given, so a successor given the same regions finds the same pages.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Ones to write marks from.
const ONES: [u8; 4096] = [1; 4096];

/// One byte per page of a session: non-zero once the page was made present (see the module
/// docs).
#[derive(Debug)]
pub struct ServedLog {
    file: File,
}

impl ServedLog {
    /// A log kept in `file` (read and written at offset = page index).
    pub fn new(file: File) -> ServedLog {
        ServedLog { file }
    }

    /// A fresh, empty log in an anonymous memory file (`memfd_create`); it takes memory only for
    /// the stretches of pages marked (tmpfs allocates as it is written).
    pub fn memfd() -> io::Result<ServedLog> {
        let fd = rustix::fs::memfd_create("faultline-served", rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(ServedLog::new(File::from(fd)))
    }

    /// The file, e.g. to hand it to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file, given up.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Mark pages `first..first + n`.
    pub fn mark(&self, first: usize, n: usize) -> io::Result<()> {
        let mut at = first;
        let end = first + n;
        while at < end {
            let chunk = (end - at).min(ONES.len());
            self.file.write_all_at(&ONES[..chunk], at as u64)?;
            at += chunk;
        }
        Ok(())
    }

    /// The marked pages, as ranges of page indexes in order.
    pub fn marked(&self) -> io::Result<Vec<Range<usize>>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0usize;
        loop {
            let n = self.file.read_at(&mut buf, at as u64)?;
            if n == 0 {
                return Ok(runs);
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                if b == 0 {
                    continue;
                }
                let p = at + i;
                match runs.last_mut() {
                    Some(r) if r.end == p => r.end = p + 1,
                    _ => runs.push(p..p + 1),
                }
            }
            at += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_come_back_as_merged_ranges() {
        let log = ServedLog::memfd().expect("memfd");
        assert!(log.marked().expect("read").is_empty());
        log.mark(10, 5).expect("mark");
        log.mark(15, 1).expect("mark");
        log.mark(3, 1).expect("mark");
        // Across the read buffer and the ones buffer.
        log.mark(70_000, 9_000).expect("mark");
        log.mark(12, 2).expect("mark again");
        assert_eq!(
            log.marked().expect("read"),
            vec![3..4, 10..16, 70_000..79_000]
        );
    }

    #[test]
    fn a_second_handle_on_the_file_sees_the_marks() {
        let log = ServedLog::memfd().expect("memfd");
        log.mark(0, 2).expect("mark");
        let other = ServedLog::new(log.file().try_clone().expect("dup"));
        other.mark(5, 1).expect("mark");
        assert_eq!(log.marked().expect("read"), vec![0..2, 5..6]);
    }
}
