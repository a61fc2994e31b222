//! How a day-2 command reaches a Pipeline run on this machine: the run in progress (its NATS, as it
//! recorded it), or the state a run left beside the file (a server started on that store for the
//! command), or any NATS named with `--nats-url`.

use std::path::Path;
use std::time::{Duration, Instant};

use switchyard_crds::layout::Names;
use switchyard_ops::Target;
use switchyard_platform::credentials::NatsAuthArgs;
use switchyard_platform::embedded::{NatsCluster, NatsServer};

use crate::error::RunError;
use crate::prepare::{lay_out, Prepared};
use crate::state::{LocalState, StateError, StateLock};

/// A Pipeline reached, and what must live as long as the command: a server started on the local
/// state, and the lock on it.
pub struct Reached {
    pub target: Target,
    /// Where its NATS is, said for the person: "the run in progress", the folder, or the URL.
    pub how: String,
    pub prepared: Prepared,
    pub state: Option<LocalState>,
    _servers: Vec<NatsServer>,
    _lock: Option<StateLock>,
}

/// How long a cluster started on its kept store may take to elect its leaders again.
const CLUSTER_BACK_WITHIN: Duration = Duration::from_secs(30);

/// Reaches the Pipeline in `file`: on `nats_url` when given, else through its local state.
pub async fn reach(
    file: &Path,
    nats_url: Option<&str>,
    auth: &NatsAuthArgs,
) -> Result<Reached, RunError> {
    let mut prepared = lay_out(file).map_err(|e| RunError::Prepare(e.to_string()))?;
    let state = LocalState::of(file, &prepared.name);
    // Edits made with --watch moved publishers to subjects of later epochs.
    let epochs = state.kept().epochs;
    if nats_url.is_none() && !epochs.is_empty() {
        prepared.layout = switchyard_crds::migration::with_epochs(prepared.layout, &epochs);
    }
    let mut servers = Vec::new();
    let mut lock = None;
    let (url, how, credentials) = match nats_url {
        Some(url) => (url.to_string(), url.to_string(), auth.load()?),
        None => match state.running() {
            Some(run) => (
                run.url.clone(),
                format!(
                    "the run in progress (process {}, NATS at {})",
                    run.pid, run.url
                ),
                Default::default(),
            ),
            None if state.exists() => {
                lock = Some(state.lock()?);
                let size = state.kept().servers.max(1);
                servers = if size == 1 {
                    vec![NatsServer::start_in(&state.store())?]
                } else {
                    NatsCluster::start_in(size, &state.store())?.nodes
                };
                let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
                (
                    urls.join(","),
                    state.dir.display().to_string(),
                    Default::default(),
                )
            }
            None => {
                return Err(StateError::Missing {
                    dir: state.dir.clone(),
                    pipeline: prepared.name.clone(),
                    file: file.to_path_buf(),
                }
                .into())
            }
        },
    };
    let client = crate::connect::connect("switchyard", &url, &credentials).await?;
    let js = switchyard_platform::nats::jetstream_context(client);
    let stream = prepared.layout.nats.stream.name.clone();
    find_stream(&js, &stream, &how, servers.len() > 1).await?;
    let target = Target {
        names: Names::new(&prepared.topology.namespace, &prepared.name),
        topology: prepared.topology.clone(),
        layout: prepared.layout.clone(),
        js,
    };
    Ok(Reached {
        target,
        how,
        prepared,
        state: nats_url.is_none().then_some(state),
        _servers: servers,
        _lock: lock,
    })
}

/// Waits for the Pipeline's stream: a store's streams come back with their server, a `cluster`'s
/// once it has elected their leaders (within `CLUSTER_BACK_WITHIN`).
async fn find_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    how: &str,
    cluster: bool,
) -> Result<(), RunError> {
    let started = Instant::now();
    loop {
        match js.get_stream(stream).await {
            Ok(_) => return Ok(()),
            Err(e) if cluster && started.elapsed() < CLUSTER_BACK_WITHIN => {
                tracing::debug!("stream {stream} is not back yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(RunError::Nats {
                    action: format!("find stream {stream} at {how} (has the Pipeline run there?)"),
                    source: Box::new(e),
                })
            }
        }
    }
}

/// Sends `request` (pause, resume) to the run of `file` in progress; its answer.
pub async fn control(file: &Path, request: &str) -> Result<String, RunError> {
    let prepared = lay_out(file).map_err(|e| RunError::Prepare(e.to_string()))?;
    let state = LocalState::of(file, &prepared.name);
    let Some(run) = state.running() else {
        return Err(RunError::NotRunning {
            file: file.to_path_buf(),
        });
    };
    let client = crate::connect::connect("switchyard", &run.url, &Default::default()).await?;
    let subject = Names::new(&prepared.topology.namespace, &prepared.name).control_subject();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject, request.to_string().into()),
    )
    .await
    .map_err(|_| RunError::NotRunning {
        file: file.to_path_buf(),
    })?
    .map_err(RunError::nats(format!("send `{request}` to the run")))?;
    Ok(String::from_utf8_lossy(&answer.payload).into_owned())
}
