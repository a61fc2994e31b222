//! A suite's own folder under `target/<profile>/suites/`.

use std::path::{Path, PathBuf};

use crate::binaries::profile_dir;

/// A suite's own folder, `target/<profile>/suites/<name>`: what the run before left there (the logs
/// of a failure) is replaced, and it is removed when dropped unless the suite failed
/// (`std::thread::panicking`) or `keep` was called, so a failure's logs are always in one known place
/// and nothing piles up in the temporary folder.
pub struct SuiteFolder {
    path: PathBuf,
    keep: bool,
}

impl SuiteFolder {
    pub fn fresh(name: &str) -> SuiteFolder {
        let path = SuiteFolder::path_of(name);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!(
                "cannot remove what an earlier run left in {}: {e}",
                path.display()
            ),
        }
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        SuiteFolder { path, keep: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the suite `name` keeps its folder, whether it is there or not.
    pub fn path_of(name: &str) -> PathBuf {
        profile_dir().join("suites").join(name)
    }

    /// Keeps the folder when dropped, and says where it is.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Makes `<folder>/tmp` the temporary folder of this process and of every program it starts
    /// (`TMPDIR`), so that what a killed run's temporary folders held (a nats-server's store, a
    /// scenario's files) is replaced by the next run with the rest of the folder instead of staying
    /// in /tmp for good. Call it first thing in `main`, before any thread reads the environment.
    pub fn holds_temporary_files(&self) {
        let tmp = self.path.join("tmp");
        std::fs::create_dir_all(&tmp)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp.display()));
        std::env::set_var("TMPDIR", &tmp);
    }
}

impl Drop for SuiteFolder {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("logs and state kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
