//! Waiting on a condition with a limit, never on a fixed sleep.

use std::path::Path;
use std::time::{Duration, Instant};

/// Counts the lines of a file that is being written.
pub fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

/// Waits for `done`, failing the test after `limit`; returns how long it took.
pub fn wait_until(limit: Duration, what: &str, done: impl FnMut() -> bool) -> Duration {
    wait_polling(limit, Duration::from_millis(50), what, done)
}

/// `wait_until`, looking every `every` (for checks that are costly, such as a `kubectl` run).
pub fn wait_polling(
    limit: Duration,
    every: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(every);
    }
    started.elapsed()
}
