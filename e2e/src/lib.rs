//! Helpers for the end-to-end tests: the workspace's binaries, copies of the examples, and the
//! processes a run starts.

pub mod cluster;
pub mod control_plane;
pub mod run;
pub mod scenarios;
pub mod secure;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `target/<profile>`: the test runs from its `deps` folder.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// The newest build of another test binary of this package (`tests/<name>.rs` or `tests/<name>/`),
/// for a test that runs a suite as a program of its own (to kill it): cargo builds every test
/// binary of a `cargo test` before it runs any. None when it is not built.
pub fn test_binary(name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(profile_dir().join("deps"))
        .ok()?
        .flatten()
        .filter(|entry| {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            // `pods-<16 hex digits>`, without the `.d` beside it.
            file.strip_prefix(&prefix)
                .is_some_and(|hash| hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|entry| {
            use std::os::unix::fs::PermissionsExt;
            let meta = entry.metadata().ok()?;
            let runnable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
            runnable.then(|| (meta.modified().ok(), entry.path()))
        })
        .max()
        .map(|(_, path)| path)
}

/// A binary of the workspace, built beside the test (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

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

/// Sends `signal` to `pid`: a process of the test's own run (a stage, a nats-server), found by its
/// parent. A process already gone is no error.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, which is fine here.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

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

/// Pids of the direct children of `parent` whose command line contains `needle`.
pub fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && command_line(pid).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// A process's command line, its arguments separated by spaces (and ending with one).
pub fn command_line(pid: u32) -> String {
    switchyard_platform::os::arguments(pid)
        .unwrap_or_default()
        .iter()
        .map(|arg| format!("{arg} "))
        .collect()
}

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
