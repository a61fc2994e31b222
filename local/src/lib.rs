//! `switchyard run`: a Pipeline on this machine, with real NATS and real `switchyard-stage` processes.
//!
//! A run reads in order: `prepare` (read, check, lay out, preflight), NATS (a private server unless one
//! is given), `session` (start the units, watch, autoscale, stop), `finish` (summary and cleanup).

mod args;
mod connect;
mod error;
mod finish;
mod migrate;
mod plot;
mod prepare;
mod progress;
mod quiet;
mod reach;
mod run_folder;
mod run_nats;
mod scaling;
mod session;
pub mod state;
mod summary;
mod supervisor;
mod watchdog;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use switchyard_crds::unit::UnitRole;
use switchyard_crds::{FileSink, SinkKind};

pub use args::RunArgs;
pub use error::{RunError, BOOKS_DO_NOT_BALANCE};
use prepare::Prepared;
pub use progress::thousands;
use progress::Display;
pub use progress::ProgressMode;
pub use reach::{control, reach, Reached};
pub use run_nats::RunNats;
use session::Session;
pub use session::{PAUSE, RESUME, SCALING};

pub fn main(args: RunArgs) -> ExitCode {
    switchyard_platform::logging::init("warn", false);
    match switchyard_platform::logging::block_on(Some(2), run(args)) {
        Ok(Ok(code)) => code,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("switchyard run: {e}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode, RunError> {
    let mut prepared = match prepare::prepare(&args.file) {
        Ok(p) => p,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let stage_bin = locate_stage_binary(args.stage_bin.clone())?;
    let mut signals =
        watchdog::StopSignals::new().map_err(RunError::io("handle Ctrl-C and SIGTERM"))?;
    let mut display = Display::new(args.progress, prepared.layout.units.len());
    let mut nats = RunNats::start(&args, &mut prepared, &mut display).await?;
    let sink_files = start_sink_files(&prepared, args.append || nats.resumed)?;
    note_endless_sources(&prepared, &mut display);
    let mut session = Session::start(&prepared, &nats, stage_bin, &args).await?;
    let watched = session
        .watch(&mut prepared, &mut nats, &mut signals, &mut display)
        .await;
    let wall = session.started.elapsed();
    let ending = match watched {
        Ok(ending) => ending,
        Err(crash) => {
            display.finish(wall, &session.rows(&prepared));
            return Err(session.crashed(crash).await);
        }
    };
    session
        .stop(
            ending == session::Ending::Interrupted,
            &mut signals,
            &mut display,
        )
        .await;
    display.finish(wall, &session.rows(&prepared));
    finish::finish(&args, &prepared, &nats, session, ending, wall, sink_files).await
}

/// The files of file sinks, emptied (with their ledgers) unless the run appends.
fn start_sink_files(prepared: &Prepared, append: bool) -> Result<Vec<String>, RunError> {
    let mut files = Vec::new();
    for config in &prepared.layout.units {
        if let UnitRole::Sink {
            sink: SinkKind::File(FileSink { path }),
            ..
        } = &config.role
        {
            let file = prepared.base_dir.join(path);
            if !append {
                remove_if_present(&file)?;
                remove_if_present(&switchyard_crds::unit::ledger_path(&file))?;
            }
            files.push(file.display().to_string());
        }
    }
    Ok(files)
}

fn note_endless_sources(prepared: &Prepared, display: &mut Display) {
    for config in &prepared.layout.units {
        if let UnitRole::Source { source, .. } = &config.role {
            if !source.is_finite() {
                display.note(&format!(
                    "source `{}` has no end: press Ctrl-C to stop",
                    config.unit
                ));
            }
        }
    }
}

/// `switchyard-stage` next to this program (how cargo and the release archive lay them out), or on PATH.
pub fn locate_stage_binary(given: Option<PathBuf>) -> Result<PathBuf, RunError> {
    if let Some(path) = given {
        if !path.is_file() {
            return Err(RunError::StageBinary(format!(
                "{} does not exist",
                path.display()
            )));
        }
        return Ok(path);
    }
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let beside = dir.join("switchyard-stage");
            if beside.is_file() {
                return Ok(beside);
            }
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("switchyard-stage"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| RunError::StageBinary("cannot find switchyard-stage next to switchyard or on PATH: build it with `cargo build --bins`, or pass --stage-bin".to_string()))
}

fn remove_if_present(path: &Path) -> Result<(), RunError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RunError::io(format!("start {} afresh", path.display()))(e)),
    }
}
