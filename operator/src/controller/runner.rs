//! The operator process: watches and their caches, leader election, `/readyz`, the controller and the
//! autoscaler, until a signal or the loss of leadership.
//!
//! What triggers a reconcile: a change of a Pipeline's spec or its deletion (its generation; the
//! operator's own status writes do not), a change of a Deployment or ConfigMap it owns, a unit's pod
//! that starts or stops failing, and a periodic refresh.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::{predicates, reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

use super::autoscaler;
use super::caches::{self, Caches, PipelineObject};
use super::context::{Context, FIELD_MANAGER};
use crate::metrics::Metrics;
use crate::plan::PlanSettings;

/// Reconciles running at once: bounds the operator's load on the API server.
pub const CONCURRENCY: u16 = 16;
/// Triggers for one Pipeline within this window are merged into one reconcile.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// How the operator process runs.
pub struct OperatorOptions {
    pub settings: PlanSettings,
    /// Watch one namespace only (default: all).
    pub watch_namespace: Option<String>,
    pub metrics_addr: std::net::SocketAddr,
    /// Run only while holding a Lease, so that several replicas can stand by.
    pub leader_election: bool,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    pub lease_namespace: Option<String>,
    /// This replica's name, for events and the Lease (default: POD_NAME, or the host name).
    pub instance: Option<String>,
    /// How long a deleted Pipeline waits for its NATS data before it is let go.
    pub cleanup_timeout: Duration,
}

/// Why the operator stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API ({0}); in a pod the service account is used, elsewhere KUBECONFIG")]
    Kubernetes(kube::Error),
    #[error("cannot take part in leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("stopped before the Pipeline CRD appeared")]
    StoppedWaitingForCrd,
}

pub async fn run(options: OperatorOptions) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Kubernetes)?;
    run_with(client, options, shutdown_signal()).await
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The operator on a given client, until `shutdown` resolves (or leadership is lost).
pub async fn run_with(
    client: Client,
    options: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("stopping: finishing the reconciles in progress");
        let _ = stop_tx.send(true);
    });
    let server = tokio::spawn(crate::metrics::serve(
        options.metrics_addr,
        metrics.clone(),
        ready_rx,
        stopped(stop_rx.clone()),
    ));
    let instance = options
        .instance
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "switchyard-operator".to_string());
    let leadership = match lead(&client, &options, &instance, &ready_tx, &stop_rx).await? {
        Some(leadership) => leadership,
        None => return Ok(()),
    };
    wait_for_crd(
        &api::<PipelineObject>(&client, &options.watch_namespace),
        stop_rx.clone(),
    )
    .await?;
    let mut context = Context::new(
        client.clone(),
        options.settings.clone(),
        metrics,
        Some(instance),
    );
    context.cleanup_timeout = options.cleanup_timeout;
    let (controller, caches) = controller(&client, &options.watch_namespace, ready_tx);
    context.caches = caches;
    let ctx = Arc::new(context);
    // A scale changes the Deployment, whose watch brings the Pipeline back to the reconcile, which
    // writes the decision into the status.
    let autoscaler =
        tokio::spawn(Arc::new(autoscaler::Autoscaler::new(ctx.clone())).run(stop_rx.clone()));
    controller
        .graceful_shutdown_on(stop_or_lost(stop_rx, leadership))
        .run(super::reconcile, super::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(pipeline = %object.name, "reconciled"),
                Err(e) => tracing::debug!("controller: {e}"),
            }
        })
        .await;
    autoscaler.abort();
    let _ = server.await;
    Ok(())
}

/// The controller with its watches, and the caches they fill. `/readyz` follows the Pipeline watch:
/// ready once Pipelines are listed, not ready while they cannot be.
fn controller(
    client: &Client,
    namespace: &Option<String>,
    ready: watch::Sender<bool>,
) -> (Controller<PipelineObject>, Caches) {
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=switchyard-operator");
    let (pipelines, pipelines_writer) = reflector::store();
    let pipeline_events = watcher(
        api::<PipelineObject>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(caches::trim_pipeline)
    .inspect(move |event| follow_readiness(&ready, event))
    .reflect(pipelines_writer)
    .applied_objects()
    // The operator's own status writes do not change the generation: they trigger nothing.
    .predicate_filter(predicates::generation, Default::default());
    let (deployments, deployments_writer) = reflector::store();
    let deployment_events = watcher(api::<Deployment>(client, namespace), managed.clone())
        .default_backoff()
        .modify(caches::trim_deployment)
        .reflect(deployments_writer)
        .touched_objects();
    let (config_maps, config_maps_writer) = reflector::store();
    let config_map_events = watcher(
        api::<PartialObjectMeta<ConfigMap>>(client, namespace),
        managed,
    )
    .default_backoff()
    .modify(caches::trim_metadata)
    .reflect(config_maps_writer)
    .touched_objects();
    // The units' pods: a pod that starts or stops failing brings its Pipeline back (its status says
    // Degraded within seconds), and no other change of a pod does.
    let (pods, pods_writer) = reflector::store();
    let pod_events = watcher(
        api::<Pod>(client, namespace),
        watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by=switchyard-operator,{}",
            crate::plan::LABEL_PIPELINE
        )),
    )
    .default_backoff()
    .modify(caches::trim_pod)
    .reflect(pods_writer)
    .touched_objects()
    .predicate_filter(super::observe::pod_failure_hash, Default::default());
    let controller = Controller::for_stream(pipeline_events, pipelines.clone())
        .owns_stream(deployment_events)
        .owns_stream(config_map_events)
        .watches_stream(pod_events, pipeline_of)
        .with_config(
            ControllerConfig::default()
                .concurrency(CONCURRENCY)
                .debounce(DEBOUNCE),
        );
    let caches = Caches {
        pipelines,
        deployments,
        config_maps,
        pods,
        live: true,
    };
    (controller, caches)
}

/// Ready once the Pipelines are listed (or one changes), not ready while they cannot be watched.
fn follow_readiness<K>(
    ready: &watch::Sender<bool>,
    event: &Result<watcher::Event<K>, watcher::Error>,
) {
    match event {
        Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
            ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("cannot watch Pipelines: {e}");
            ready.send_if_modified(|r| std::mem::replace(r, false));
        }
    }
}

/// The Pipeline a unit's pod belongs to, by its label.
fn pipeline_of(pod: Pod) -> Option<reflector::ObjectRef<PipelineObject>> {
    let pipeline = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::plan::LABEL_PIPELINE))
        .cloned();
    match (pipeline, pod.metadata.namespace.clone()) {
        (Some(name), Some(ns)) => Some(reflector::ObjectRef::new(&name).within(&ns)),
        _ => None,
    }
}

type Leadership = Option<(
    watch::Receiver<bool>,
    tokio::task::JoinHandle<
        Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>,
    >,
)>;

/// With leader election, waits to lead; None: stopped before leading.
async fn lead(
    client: &Client,
    options: &OperatorOptions,
    instance: &str,
    ready: &watch::Sender<bool>,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Leadership>, RunError> {
    if !options.leader_election {
        return Ok(Some(None));
    }
    let namespace = options
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_string());
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "switchyard-operator")
            .with_namespace(namespace)
            .with_identity(instance.to_string())
            .with_field_manager(FIELD_MANAGER)
            .build()
            .await?;
    let (mut is_leader, task) = manager.watch().await;
    // A follower is ready: it serves its purpose by standing by.
    let _ = ready.send(true);
    tracing::info!(%instance, "waiting to become the leader");
    let mut stop = stop.clone();
    tokio::select! {
        _ = is_leader.wait_for(|l| *l) => {}
        _ = stop.wait_for(|s| *s) => return Ok(None),
    }
    tracing::info!(%instance, "leading");
    // The leader is ready once it can list Pipelines (the watch says so).
    let _ = ready.send(false);
    Ok(Some(Some((is_leader, task))))
}

fn stopped(rx: watch::Receiver<bool>) -> impl std::future::Future<Output = ()> {
    let mut rx = rx;
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

async fn stop_or_lost(stop: watch::Receiver<bool>, leadership: Leadership) {
    let stop = stopped(stop);
    match leadership {
        Some((mut is_leader, _task)) => {
            tokio::select! {
                _ = stop => {}
                _ = is_leader.wait_for(|l| !*l) => {
                    tracing::error!("lost the leadership: stopping so that a restart stands by");
                }
            }
        }
        None => stop.await,
    }
}

/// The CRD must be installed before Pipelines can be watched: say so, and wait for it.
async fn wait_for_crd(
    api: &Api<PipelineObject>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RunError> {
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => tracing::error!(
                "the Pipeline CRD is not installed: `kubectl apply --server-side -f crds/switchyard.dev_pipelines.yaml` (the Helm chart installs it); waiting"
            ),
            Err(e) => tracing::warn!("cannot list Pipelines ({e}); retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|s| *s) => return Err(RunError::StoppedWaitingForCrd),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
