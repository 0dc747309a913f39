//! Locks that never make work disappear.
//!
//! A `std` lock is poisoned when a thread panics while holding it. A page source that panics is
//! caught where it is called (its pages are poisoned, see [`crate::server`]), and the release
//! profile aborts on any other panic, so a poisoned lock means a bug already reported; skipping
//! the work guarded by the lock (`if let Ok(g) = m.lock()`) would turn that bug into a fault
//! nobody serves. These helpers take the guard whatever the poison flag says.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock `m`, poisoned or not.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-lock `l`, poisoned or not.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-lock `l`, poisoned or not.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
