//! Locking the plain data a unit shares between its tasks.

use std::sync::{Mutex, MutexGuard};

/// The guard of `m`. A panic while holding one of these locks leaves plain data behind (maps,
/// counts); carry on with it rather than fail every task after.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
