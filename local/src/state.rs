//! A run's local state, `.switchyard/<pipeline>/` beside the Pipeline file: the NATS store (so that a
//! run can be resumed and its dead letters and traces read after it ended), which run is in progress
//! and where its NATS is, and the last run's counts.
//!
//! One process at a time serves a store: the run, or a day-2 command that starts a server on it while
//! no run is going on. An advisory lock on `lock` says who.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The folder of a Pipeline's local state.
#[derive(Clone, Debug)]
pub struct LocalState {
    pub dir: PathBuf,
}

/// A run in progress, as the run itself writes it for the commands that reach it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub pid: u32,
    /// Where its NATS is (comma-separated nodes for a cluster).
    pub url: String,
}

/// What outlives a run besides the store: how many servers it had (a cluster's store is one folder per
/// node) and the counts of its units.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Kept {
    pub servers: usize,
    /// Per unit, what it took in and put out in the last run (for `switchyard graph`).
    #[serde(default)]
    pub counts: BTreeMap<String, UnitCounts>,
    /// The epoch each publisher was at when `--watch` last carried out an edit (absent: 0), so that a
    /// resumed run reads the subjects its messages are on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnitCounts {
    pub processed: u64,
    pub published: u64,
    pub dead_lettered: u64,
}

/// Why the local state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is in use by process {holder}: another `switchyard run` or day-2 command of this Pipeline is going on; wait for it, or pass --nats-url", dir.display())]
    Busy { dir: PathBuf, holder: String },
    #[error("{} has no local state of pipeline `{pipeline}`: run it first (`switchyard run {}`), or pass --nats-url", dir.display(), file.display())]
    Missing {
        dir: PathBuf,
        pipeline: String,
        file: PathBuf,
    },
}

/// Held while a process serves the store; released when dropped.
pub struct StateLock {
    _file: File,
}

impl LocalState {
    /// The state of `pipeline`, defined in `file`.
    pub fn of(file: &Path, pipeline: &str) -> LocalState {
        let folder = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        LocalState {
            dir: folder.join(".switchyard").join(pipeline),
        }
    }

    /// The NATS store (a cluster's nodes have a folder each in it).
    pub fn store(&self) -> PathBuf {
        self.dir.join("nats")
    }

    /// A run has left a store here.
    pub fn exists(&self) -> bool {
        self.store().is_dir()
    }

    fn io(&self, action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
        let path = path.to_path_buf();
        move |source| StateError::Io {
            action,
            path,
            source,
        }
    }

    /// Takes the store for this process, or says who has it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io("create", &self.dir))?;
        let path = self.dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(self.io("open", &path))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !taken {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "unknown".to_string());
            return Err(StateError::Busy {
                dir: self.dir.clone(),
                holder,
            });
        }
        std::fs::write(&path, std::process::id().to_string()).map_err(self.io("write", &path))?;
        Ok(StateLock { _file: file })
    }

    /// Starts afresh: the store and what was kept of the last run are removed.
    pub fn reset(&self) -> Result<(), StateError> {
        let store = self.store();
        match std::fs::remove_dir_all(&store) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("remove", &store)(e)),
        }
        self.remove(&self.dir.join("kept.json"))
    }

    fn remove(&self, path: &Path) -> Result<(), StateError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("remove", path)(e)),
        }
    }

    /// Says where the run in progress has its NATS.
    pub fn record_run(&self, record: &RunRecord) -> Result<(), StateError> {
        let path = self.dir.join("run.json");
        write_json(&path, record).map_err(self.io("write", &path))
    }

    pub fn clear_run(&self) -> Result<(), StateError> {
        self.remove(&self.dir.join("run.json"))
    }

    /// The run in progress, if its process is still there.
    pub fn running(&self) -> Option<RunRecord> {
        let text = std::fs::read(self.dir.join("run.json")).ok()?;
        let record: RunRecord = serde_json::from_slice(&text).ok()?;
        alive(record.pid).then_some(record)
    }

    pub fn kept(&self) -> Kept {
        std::fs::read(self.dir.join("kept.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default()
    }

    pub fn save_kept(&self, kept: &Kept) -> Result<(), StateError> {
        let path = self.dir.join("kept.json");
        write_json(&path, kept).map_err(self.io("write", &path))
    }
}

/// Written whole or not at all: a reader never sees half a file.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

pub(crate) fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only asks whether the process exists.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    unsafe { libc::kill(pid, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_sits_beside_the_file_and_one_process_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::of(&dir.path().join("laundry.yaml"), "laundry");
        assert_eq!(state.dir, dir.path().join(".switchyard/laundry"));
        assert!(!state.exists());
        let held = state.lock().unwrap();
        assert!(matches!(state.lock(), Err(StateError::Busy { .. })));
        drop(held);
        state.lock().unwrap();
        let bare = LocalState::of(Path::new("laundry.yaml"), "laundry");
        assert_eq!(bare.dir, Path::new("./.switchyard/laundry"));
    }

    #[test]
    fn a_run_is_in_progress_only_while_its_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::of(&dir.path().join("p.yaml"), "p");
        std::fs::create_dir_all(&state.dir).unwrap();
        let me = RunRecord {
            pid: std::process::id(),
            url: "nats://127.0.0.1:1".into(),
        };
        state.record_run(&me).unwrap();
        assert_eq!(state.running(), Some(me));
        state
            .record_run(&RunRecord {
                pid: i32::MAX as u32,
                url: "x".into(),
            })
            .unwrap();
        assert_eq!(state.running(), None);
        state.clear_run().unwrap();
        assert_eq!(state.running(), None);
    }

    #[test]
    fn what_is_kept_round_trips_and_a_reset_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::of(&dir.path().join("p.yaml"), "p");
        std::fs::create_dir_all(state.store()).unwrap();
        let mut kept = Kept {
            servers: 3,
            epochs: BTreeMap::from([("wash".to_string(), 2)]),
            ..Kept::default()
        };
        kept.counts.insert(
            "wash".into(),
            UnitCounts {
                processed: 5,
                published: 4,
                dead_lettered: 1,
            },
        );
        state.save_kept(&kept).unwrap();
        assert_eq!(state.kept(), kept);
        state.reset().unwrap();
        assert!(!state.exists());
        assert_eq!(state.kept(), Kept::default());
    }
}
