//! A run's own folder in the temporary folder: the units' configs and, unless `--logs` says
//! otherwise, their logs. Removed after the run unless a unit kept failing; those that runs killed
//! outright left are removed by the next run.

use std::path::{Path, PathBuf};

use switchyard_crds::topology::{replicas_of, Unit, UnitKind};
use switchyard_crds::unit::{UnitConfig, UnitRole};

use crate::error::RunError;
use crate::prepare::Prepared;
use crate::supervisor::Supervisor;

/// A run's folder in the temporary folder: `switchyard-run-<pid>-<pipeline>-<random>`.
const RUN_FOLDER_PREFIX: &str = "switchyard-run-";
/// In a run's folder kept on purpose (a unit kept failing: its logs are there).
const KEPT_MARK: &str = "kept";

/// Removes the folders that runs killed outright left (a SIGKILL or a power cut gives no chance to
/// remove one): each names its run's process, which is gone. Folders kept on purpose stay.
pub(crate) fn remove_folders_of_ended_runs(temporary: &Path) {
    let Ok(entries) = std::fs::read_dir(temporary) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_FOLDER_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if crate::state::alive(pid) || path.join(KEPT_MARK).exists() {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::debug!(
                "cannot remove {}, left by an ended run: {e}",
                path.display()
            );
        }
    }
}

/// A new folder for a run of `pipeline` (after removing those of ended runs), and its logs folder:
/// `logs` if given, else `logs/` inside it.
pub(crate) fn create(
    pipeline: &str,
    logs: Option<&Path>,
) -> Result<(tempfile::TempDir, PathBuf), RunError> {
    let temporary = std::env::temp_dir();
    remove_folders_of_ended_runs(&temporary);
    let run_dir = tempfile::Builder::new()
        .prefix(&format!(
            "{RUN_FOLDER_PREFIX}{}-{pipeline}-",
            std::process::id(),
        ))
        .tempdir_in(&temporary)
        .map_err(RunError::io("create the run's folder"))?;
    let logs_dir = logs.map_or_else(|| run_dir.path().join("logs"), Path::to_path_buf);
    std::fs::create_dir_all(&logs_dir).map_err(RunError::io(format!(
        "create the logs folder {}",
        logs_dir.display()
    )))?;
    Ok((run_dir, logs_dir))
}

/// Keeps the run's folder after the run, marked so that later runs leave it alone.
pub(crate) fn keep(run_dir: tempfile::TempDir) {
    let _ = std::fs::write(run_dir.path().join(KEPT_MARK), "");
    let _ = run_dir.keep();
}

/// Writes every unit's config into the run's folder and hands the units to the supervisor, readers
/// first, so that every consumer is being pulled from before anything is produced.
pub(crate) fn add_units(
    supervisor: &mut Supervisor,
    prepared: &Prepared,
    run_dir: &Path,
) -> Result<(), RunError> {
    let mut order: Vec<(&Unit, &UnitConfig)> = prepared
        .topology
        .units
        .iter()
        .zip(&prepared.layout.units)
        .collect();
    order.sort_by_key(|(u, _)| matches!(u.kind, UnitKind::Source(_)));
    for (unit, config) in order {
        let path = run_dir.join(format!("{}.json", unit.name));
        let text = serde_json::to_vec_pretty(config)?;
        std::fs::write(&path, text).map_err(RunError::io("write a unit's config"))?;
        let finite = matches!(&config.role, UnitRole::Source { source, .. } if source.is_finite());
        let is_source = matches!(config.role, UnitRole::Source { .. });
        // Switchers start at their minimum (perhaps zero); the autoscaler takes it from there.
        let wanted = replicas_of(unit).min as usize;
        supervisor.add(&unit.name, path, wanted, is_source, finite);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run SIGKILLed (the peer comparison does it every time) left its folder in the temporary
    /// folder for good: 192 of them here after a day's runs.
    #[test]
    fn folders_of_runs_whose_process_is_gone_are_removed_and_no_other() {
        let temporary = tempfile::tempdir().expect("a folder");
        let mut ended = std::process::Command::new("true").spawn().expect("true");
        let gone = ended.id();
        ended.wait().expect("it ends");
        let folder = |name: String, kept: bool| {
            let path = temporary.path().join(name);
            std::fs::create_dir_all(path.join("logs")).expect("a run's folder");
            if kept {
                std::fs::write(path.join(KEPT_MARK), "").expect("the mark");
            }
            path
        };
        let killed = folder(format!("{RUN_FOLDER_PREFIX}{gone}-wash-a1b2c3"), false);
        let failed = folder(format!("{RUN_FOLDER_PREFIX}{gone}-wash-d4e5f6"), true);
        let running = folder(
            format!("{RUN_FOLDER_PREFIX}{}-wash-g7h8i9", std::process::id()),
            false,
        );
        let unknown = folder(format!("{RUN_FOLDER_PREFIX}wash-j0k1l2"), false);
        let other = folder("something-else".into(), false);
        remove_folders_of_ended_runs(temporary.path());
        assert!(!killed.exists());
        for stays in [failed, running, unknown, other] {
            assert!(stays.exists(), "{} was removed", stays.display());
        }
    }
}
