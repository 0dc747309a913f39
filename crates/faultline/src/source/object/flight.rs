//! One GET per block: a fetch in flight that concurrent readers of the block wait for, and
//! the completion that settles it (and the cache) whatever happens to the fetching task.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use bytes::Bytes;

use super::error::FetchFailure;
use super::{lock, Shared};
use crate::source::Retry;

/// One block fetch in progress; readers wait on it.
#[derive(Debug, Default)]
pub(super) struct Flight {
    pub(super) result: Mutex<Option<Result<Bytes, Arc<FetchFailure>>>>,
    pub(super) done: Condvar,
}

impl Flight {
    pub(super) fn wait(&self) -> Result<Bytes, Arc<FetchFailure>> {
        let mut r = lock(&self.result);
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            r = self.done.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Finishes a flight: caches the block, wakes its waiters with the result, removes the flight
/// from the table (so a read that returns has put its block in the cache, and a reader that
/// misses the cache finds the flight until then), and finally, off everyone's path, commits a
/// batch of cached blocks to disk when one is due. If the fetch task is dropped before it
/// finishes (the runtime shut down), the waiters get an error and the flight is removed all the
/// same.
pub(super) struct Completion {
    pub(super) shared: Arc<Shared>,
    pub(super) block: u64,
    pub(super) flight: Arc<Flight>,
    pub(super) woke: bool,
    pub(super) removed: bool,
}

impl Completion {
    pub(super) fn new(shared: &Arc<Shared>, block: u64, flight: &Arc<Flight>) -> Completion {
        Completion {
            shared: Arc::clone(shared),
            block,
            flight: Arc::clone(flight),
            woke: false,
            removed: false,
        }
    }

    pub(super) fn wake(&mut self, result: Result<Bytes, Arc<FetchFailure>>) {
        self.woke = true;
        *lock(&self.flight.result) = Some(result);
        self.flight.done.notify_all();
    }

    /// Blocking file I/O: run it where blocking is allowed.
    pub(super) fn settle(mut self, result: Result<Bytes, Arc<FetchFailure>>) {
        let sh = Arc::clone(&self.shared);
        let mut commit_due = false;
        if let Ok(bytes) = &result {
            match sh.cache.insert(self.block, bytes) {
                Ok(due) => commit_due = due,
                Err(e) => {
                    tracing::warn!(object = %sh.name, block = self.block, error = %e, "cannot write a block to the cache");
                }
            }
        }
        self.wake(result);
        self.remove();
        drop(self);
        if commit_due {
            if let Err(e) = sh.cache.commit() {
                tracing::warn!(object = %sh.name, error = %e, "cannot commit cached blocks; a restart fetches them again");
            }
        }
    }

    pub(super) fn remove(&mut self) {
        self.removed = true;
        lock(&self.shared.flights).remove(&self.block);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.woke {
            let (start, end) = self.shared.block_range(self.block);
            self.wake(Err(Arc::new(FetchFailure {
                start,
                end,
                retry: Retry::Retryable,
                what: "the fetch was cancelled (the source is shutting down)".into(),
                cause: None,
            })));
        }
        if !self.removed {
            self.remove();
        }
    }
}
