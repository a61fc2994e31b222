//! Helpers for the end-to-end tests: the workspace's binaries, copies of the examples, and the
//! processes a run starts.

pub mod binaries;
pub mod cluster;
pub mod control_plane;
pub mod processes;
pub mod run;
pub mod scenarios;
pub mod secure;
pub mod suite_folder;
pub mod wait;

use std::path::{Path, PathBuf};

pub use binaries::{binary, test_binary};
pub use processes::{children_with, command_line, signal};
pub use suite_folder::SuiteFolder;
pub use wait::{line_count, wait_polling, wait_until};

/// Held by a test that loads both cores, so that such tests in one binary run one at a time
/// instead of measuring each other.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A copy of the examples (Pipelines, handlers, data), so a run writes its files somewhere of its own.
pub fn examples_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    copy_dir(&examples(), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("read examples").flatten() {
        let target = to.join(entry.file_name());
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let is_output =
            entry.path().extension().is_some_and(|e| e == "jsonl") && !from.ends_with("data");
        if is_dir {
            copy_dir(&entry.path(), &target);
        } else if !is_output && !entry.file_name().to_string_lossy().starts_with('.') {
            std::fs::copy(entry.path(), target).expect("copy example");
        }
    }
}
