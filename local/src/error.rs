//! Why a run could not start or go on, and the exit status of one whose books do not balance.

use std::path::PathBuf;

use switchyard_platform::admin::AdminError;
use switchyard_platform::credentials::CredentialsError;
use switchyard_platform::embedded::ServerError;
use switchyard_platform::nats::ConnectSetupError;

use crate::state;

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
    pub(crate) fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        let action = action.into();
        move |source| RunError::Io { action, source }
    }

    pub(crate) fn nats<E: std::error::Error + Send + Sync + 'static>(
        action: impl Into<String>,
    ) -> impl FnOnce(E) -> RunError {
        let action = action.into();
        move |e| RunError::Nats {
            action,
            source: Box::new(e),
        }
    }
}
