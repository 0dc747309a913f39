//! Bounded parallelism, demand first: a counting semaphore of GET slots on which demand readers
//! go before prefetch.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Priority {
    Demand,
    Prefetch,
}

/// A counting semaphore on which demand readers go before prefetch.
#[derive(Debug)]
pub(super) struct Permits {
    pub(super) state: Mutex<PermitState>,
    pub(super) freed: Condvar,
}

#[derive(Debug)]
pub(super) struct PermitState {
    pub(super) free: usize,
    pub(super) demand_waiting: usize,
    /// Everyone waiting, demand and prefetch.
    pub(super) waiting: usize,
}

impl Permits {
    pub(super) fn new(n: usize) -> Permits {
        Permits {
            state: Mutex::new(PermitState {
                free: n,
                demand_waiting: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    pub(super) fn acquire(self: &Arc<Self>, p: Priority) -> Permit {
        let mut st = lock(&self.state);
        if p == Priority::Demand {
            st.demand_waiting += 1;
        }
        st.waiting += 1;
        loop {
            let ready = st.free > 0 && (p == Priority::Demand || st.demand_waiting == 0);
            if ready {
                break;
            }
            st = self.freed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.free -= 1;
        st.waiting -= 1;
        if p == Priority::Demand {
            st.demand_waiting -= 1;
        }
        Permit(Arc::clone(self))
    }
}

/// One GET slot, given back when dropped.
#[derive(Debug)]
pub(super) struct Permit(Arc<Permits>);

impl Drop for Permit {
    fn drop(&mut self) {
        lock(&self.0.state).free += 1;
        self.0.freed.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::lock;
    use super::*;

    #[test]
    fn demand_goes_before_prefetch() {
        let p = Arc::new(Permits::new(1));
        let held = p.acquire(Priority::Demand);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let (p1, tx1) = (Arc::clone(&p), tx.clone());
            s.spawn(move || {
                let _g = p1.acquire(Priority::Prefetch);
                tx1.send("prefetch").unwrap();
            });
            // Wait until the prefetcher is queued (it cannot get the held slot)...
            while lock(&p.state).waiting == 0 {
                std::thread::yield_now();
            }
            let (p2, tx2) = (Arc::clone(&p), tx);
            s.spawn(move || {
                let _g = p2.acquire(Priority::Demand);
                tx2.send("demand").unwrap();
            });
            // ...and the demand reader too.
            while lock(&p.state).demand_waiting == 0 {
                std::thread::yield_now();
            }
            drop(held);
        });
        let order: Vec<_> = rx.iter().collect();
        assert_eq!(order, ["demand", "prefetch"]);
    }
}
