//! `switchyard run`: a Pipeline on this machine, with real NATS and real `switchyard-stage` processes.
//!
//! A run reads in order: `prepare` (read, check, lay out, preflight), NATS (a private server unless one
//! is given), `session` (start the units, watch, autoscale, stop), `finish` (summary and cleanup).

mod finish;
mod migrate;
mod plot;
mod prepare;
mod progress;
mod reach;
mod run_nats;
mod scaling;
mod session;
pub mod state;
mod summary;
mod supervisor;
mod watchdog;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};

use switchyard_crds::unit::UnitRole;
use switchyard_crds::{FileSink, SinkKind};
use switchyard_platform::admin::AdminError;
use switchyard_platform::credentials::{CredentialsError, NatsAuthArgs};
use switchyard_platform::embedded::ServerError;
use switchyard_platform::nats::ConnectSetupError;

use prepare::Prepared;
pub use progress::thousands;
use progress::Display;
pub use progress::ProgressMode;
pub use reach::{control, reach, Reached};
pub use run_nats::RunNats;
use session::Session;
pub use session::{PAUSE, RESUME, SCALING};

/// The exit status of a run (and of `switchyard status`) whose books do not balance: an item was
/// lost, or taken in twice, on the way from one unit to the next.
pub const BOOKS_DO_NOT_BALANCE: u8 = 3;

/// Why a run could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    ConnectSetup(#[from] ConnectSetupError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("spec.nats.replicas is {replicas}, but --nats-cluster {servers} starts {servers} server{}: each copy needs a server of its own; give --nats-cluster {replicas}", if *.servers == 1 { "" } else { "s" })]
    ClusterTooSmall { replicas: u32, servers: usize },
    #[error("{server} exited right after it started, {exits} times in a row (the last: {status}), so the run stopped; its store is kept, and `switchyard run FILE --resume` carries on where it stopped once the server can start. Its last log lines: {log}")]
    NatsCrashLoop {
        server: String,
        status: String,
        exits: u32,
        log: String,
    },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{0}")]
    Prepare(String),
    #[error("no run of {} is in progress here: start one with `switchyard run {}`", file.display(), file.display())]
    NotRunning { file: PathBuf },
    #[error("the run to resume had {kept} NATS server{}, and --nats-cluster asks for {asked}: resume with --nats-cluster {kept}, or start afresh without --resume", if *.kept == 1 { "" } else { "s" })]
    ResumeCluster { kept: usize, asked: usize },
    #[error(transparent)]
    Reports(#[from] switchyard_platform::reports::ListenError),
    #[error("cannot {action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error("cannot {action}: {source}")]
    Nats {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot encode: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    StageBinary(String),
    #[error("unit `{unit}` keeps failing ({status}); its last words:\n{log}\nall logs are in {}", logs.display())]
    CrashLoop {
        unit: String,
        status: String,
        log: String,
        logs: PathBuf,
    },
}

impl RunError {
    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        let action = action.into();
        move |source| RunError::Io { action, source }
    }

    fn nats<E: std::error::Error + Send + Sync + 'static>(
        action: impl Into<String>,
    ) -> impl FnOnce(E) -> RunError {
        let action = action.into();
        move |e| RunError::Nats {
            action,
            source: Box::new(e),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The Pipeline file. Relative paths in it (handlers, files) start in the file's folder.
    pub file: PathBuf,
    /// Use this NATS server instead of starting one (several, separated by commas, for the nodes of
    /// a cluster); the Pipeline's stream there is reset first.
    #[arg(long, conflicts_with = "nats_cluster")]
    pub nats_url: Option<String>,
    /// Start a JetStream cluster of this many servers on loopback (1, 3 or 5) instead of one server,
    /// and keep every node running. The Pipeline's stream keeps `spec.nats.replicas` copies, or one
    /// per server. Default: `spec.nats.replicas`.
    #[arg(long, value_name = "SERVERS", value_parser = PossibleValuesParser::new(["1", "3", "5"]).map(|s| s.parse::<usize>().unwrap_or(1)))]
    pub nats_cluster: Option<usize>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// Continue where the last run of this file stopped: its NATS store (kept in `.switchyard/` beside
    /// the file) is taken up again, sources go on from their checkpoints, messages not yet
    /// acknowledged (replayed dead letters among them) are delivered again, and file sinks append.
    /// Without it, a run starts afresh.
    #[arg(long)]
    pub resume: bool,
    /// Apply edits of FILE while the run goes on: each edit is planned against what runs and carried
    /// out in steps that lose and double nothing (printed as they go). An edit that is invalid, or
    /// that would drop messages without `spec.migration.allowLoss`, is refused and the run goes on.
    #[arg(long)]
    pub watch: bool,
    /// Append to the files of file sinks instead of starting them afresh.
    #[arg(long)]
    pub append: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// The `switchyard-stage` program (default: next to this one, or on PATH).
    #[arg(long, env = "SWITCHYARD_STAGE_BIN")]
    pub stage_bin: Option<PathBuf>,
    /// Let stage processes log at debug level (their logs are kept in the run's folder).
    #[arg(long)]
    pub verbose: bool,
    /// Keep the stage processes' logs in this folder, one file per process (by default they are in a
    /// temporary folder, removed after the run unless a unit kept failing).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Write the run's summary as JSON here, with every unit's replicas and lag over time and the
    /// scaling decisions.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// Draw lag and replicas per unit over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

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

/// Connects to the server (or the nodes, separated by commas) at `url`, as `name`.
async fn connect(
    name: &str,
    url: &str,
    credentials: &switchyard_platform::credentials::NatsCredentials,
) -> Result<async_nats::Client, RunError> {
    use switchyard_platform::nats::{connect_options, server_addrs};
    connect_options(name, credentials)?
        .connect(server_addrs(url)?)
        .await
        .map_err(|source| RunError::Connect {
            url: url.to_string(),
            source,
        })
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
