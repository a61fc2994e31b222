//! A fault the exactly-once tests provoke where no signal from outside could land reliably: the
//! process killing itself once something is stored and before it is recorded as done — a unit
//! between storing an input's outputs and acknowledging the input, a source between storing a
//! message and checkpointing it. Off unless `SWITCHYARD_FAULT_KILL_AFTER_STORED` says which one
//! (1 for the first this process stores).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

/// The environment variable that arms the fault.
pub const KILL_AFTER_STORED: &str = "SWITCHYARD_FAULT_KILL_AFTER_STORED";

static KILL_AT: LazyLock<Option<u64>> =
    LazyLock::new(|| std::env::var(KILL_AFTER_STORED).ok()?.parse().ok());
static STORED: AtomicU64 = AtomicU64::new(0);

/// Counts one more thing stored; true when it is the one the fault waits for.
pub fn due() -> bool {
    KILL_AT.is_some_and(|at| STORED.fetch_add(1, Ordering::Relaxed) + 1 == at)
}

/// Dies at once, as a SIGKILL from outside would have it.
pub fn kill() {
    tracing::warn!("{KILL_AFTER_STORED}: killing this process");
    // SAFETY: kill(2) on this process with a signal that cannot be caught; nothing runs after.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
