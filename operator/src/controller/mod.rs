//! The operator: reconciles each Pipeline into its NATS stream, bucket and consumers, a ConfigMap and a
//! Deployment per unit (server-side apply, one field manager, owner references), prunes units that left
//! the spec, cleans NATS up on deletion, and reports status conditions and events.

pub mod autoscaler;
pub mod nats;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use switchyard_crds::layout::Names;
use switchyard_crds::{DeletionPolicy, Pipeline, PipelineStatus};

use crate::metrics::{Metrics, UnitLabels};
use crate::plan::{self, Plan, PlanSettings, LABEL_PIPELINE};
use nats::NatsPool;
use status::{Observation, Outcome, UnitObservation};

/// Keeps a Pipeline until its NATS data is dealt with (deleted, or kept with `deletionPolicy: Retain`).
pub const FINALIZER: &str = "switchyard.dev/cleanup";
/// The one field manager for everything the operator applies.
pub const FIELD_MANAGER: &str = "switchyard-operator";
/// A healthy Pipeline is looked at again this often, to refresh lag and readiness.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The same for a Pipeline with switchers, whose status also says why they scale or hold.
pub const REFRESH_SWITCHERS: Duration = Duration::from_secs(10);
/// Key in a credentials Secret.
pub const CREDENTIALS_KEY: &str = "nats.creds";

pub struct Context {
    pub client: Client,
    pub settings: PlanSettings,
    pub nats: NatsPool,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The autoscaler's latest decision per switcher, which the reconcile applies and reports.
    pub scaling: std::sync::Mutex<HashMap<String, autoscaler::ScaleRecord>>,
    /// Consecutive failures per Pipeline, for the retry back-off.
    failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: PlanSettings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            nats: NatsPool::default(),
            metrics,
            scaling: std::sync::Mutex::new(HashMap::new()),
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn scale_record(&self, key: &str) -> Option<autoscaler::ScaleRecord> {
        self.scaling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Nats(String),
    #[error("the Pipeline has no namespace")]
    NoNamespace,
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A short reason for metrics and logs.
    fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::NoNamespace => "kubernetes",
            Error::Nats(_) => "nats",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) => e.reason(),
                kube::runtime::finalizer::Error::CleanupFailed(_) => "cleanup",
                _ => "kubernetes",
            },
        }
    }
}

/// Wait before retrying a Pipeline that failed `failures` times in a row: 2 s, doubling, at most 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(8);
    (Duration::from_secs(2) * 2u32.pow(exponent)).min(Duration::from_secs(300))
}

fn key(pipeline: &Pipeline) -> String {
    format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    )
}

pub async fn reconcile(pipeline: Arc<Pipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = pipeline.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Pipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    let object_key = key(&pipeline);
    let result = finalizer(&api, FINALIZER, pipeline, |event| async {
        match event {
            FinalizerEvent::Apply(p) => apply(&p, &ctx).await,
            FinalizerEvent::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures().remove(&object_key);
    }
    result
}

pub fn error_policy(pipeline: Arc<Pipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut all = ctx.failures();
        let n = all.entry(key(&pipeline)).or_insert(0);
        *n += 1;
        *n
    };
    let delay = retry_delay(failures);
    ctx.metrics.count("error");
    ctx.metrics.error(error.reason());
    tracing::warn!(pipeline = %key(&pipeline), failures, ?delay, "reconcile failed: {error}");
    Action::requeue(delay)
}

pub(crate) async fn publish(
    ctx: &Context,
    pipeline: &Pipeline,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_about(ctx, pipeline, type_, reason, note, None).await;
}

/// An event on the Pipeline, about one of its objects when `related` is given: events with the same
/// reason about different objects stay apart instead of being counted as one.
async fn publish_about(
    ctx: &Context,
    pipeline: &Pipeline,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_string(),
        secondary: related,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        tracing::warn!(pipeline = %key(pipeline), "cannot publish an event: {e}");
    }
}

async fn set_status(
    ctx: &Context,
    pipeline: &Pipeline,
    status: PipelineStatus,
) -> Result<(), Error> {
    if pipeline.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<Pipeline> = Api::namespaced(
        ctx.client.clone(),
        &pipeline.namespace().unwrap_or_default(),
    );
    // Server-side apply of the status needs the object's type, or the API server cannot tell what it is.
    let patch = serde_json::json!({
        "apiVersion": Pipeline::api_version(&()),
        "kind": Pipeline::kind(&()),
        "status": status,
    });
    api.patch_status(
        &pipeline.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The NATS server and credentials a Pipeline uses.
async fn nats_for(
    ctx: &Context,
    pipeline: &Pipeline,
) -> Result<async_nats::jetstream::Context, String> {
    let nats = pipeline.spec.nats.as_ref();
    let url = nats
        .and_then(|n| n.url.clone())
        .unwrap_or_else(|| ctx.settings.nats_url.clone());
    let credentials = match nats.and_then(|n| n.credentials_secret.as_deref()) {
        None => None,
        Some(secret) => Some(read_credentials(ctx, pipeline, secret).await?),
    };
    ctx.nats.jetstream(&url, credentials).await
}

async fn read_credentials(
    ctx: &Context,
    pipeline: &Pipeline,
    secret: &str,
) -> Result<String, String> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let found = secrets.get(secret).await.map_err(|e| {
        format!("cannot read the NATS credentials Secret {namespace}/{secret}: {e}")
    })?;
    let bytes = found
        .data
        .as_ref()
        .and_then(|d| d.get(CREDENTIALS_KEY))
        .ok_or_else(|| format!("Secret {namespace}/{secret} has no `{CREDENTIALS_KEY}` key"))?;
    String::from_utf8(bytes.0.clone())
        .map_err(|_| format!("`{CREDENTIALS_KEY}` in Secret {namespace}/{secret} is not text"))
}

async fn apply(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    let plan = match plan::plan(pipeline, &ctx.settings) {
        Ok(plan) => plan,
        Err(problems) => {
            let problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            let observation = Observation {
                generation: pipeline.metadata.generation,
                outcome: Outcome::Invalid {
                    problems: problems.clone(),
                },
                units: Vec::new(),
                dead_letter_subject: String::new(),
            };
            let status = status::compute(pipeline.status.as_ref(), &observation, &now());
            let changed = pipeline.status.as_ref() != Some(&status);
            set_status(ctx, pipeline, status).await?;
            if changed {
                publish(
                    ctx,
                    pipeline,
                    EventType::Warning,
                    "InvalidSpec",
                    problems.join("; "),
                )
                .await;
            }
            ctx.metrics.count("invalid");
            // Nothing will change until the spec does.
            return Ok(Action::await_change());
        }
    };

    let js = match nats_for(ctx, pipeline).await {
        Ok(js) => match switchyard_stage::admin::apply(&js, &plan.nats).await {
            Ok(()) => js,
            Err(e) => return nats_failed(ctx, pipeline, format!("{e:#}")).await,
        },
        Err(message) => return nats_failed(ctx, pipeline, message).await,
    };

    let deployments = apply_objects(ctx, pipeline, &plan).await?;

    let dead_letter_subjects: BTreeMap<String, String> = plan
        .units
        .iter()
        .map(|u| (u.name.clone(), u.dead_letters.clone()))
        .collect();
    let seen = match nats::observe(&js, &plan.nats, &dead_letter_subjects).await {
        Ok(seen) => seen,
        Err(message) => {
            tracing::warn!(pipeline = %key(pipeline), "cannot read lag: {message}");
            nats::NatsObservation::default()
        }
    };
    let units: Vec<UnitObservation> = plan
        .units
        .iter()
        .map(|u| {
            let deployment = deployments.get(&u.name);
            let status = deployment.and_then(|d| d.status.as_ref());
            let desired = deployment
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            let rollout_failed = status
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .find(|c| {
                    c.type_ == "Progressing"
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                })
                .map(|c| {
                    c.message
                        .clone()
                        .unwrap_or_else(|| "the rollout timed out".to_string())
                });
            let scaled =
                ctx.scale_record(&autoscaler::key(&plan.namespace, &plan.pipeline, &u.name));
            UnitObservation {
                name: u.name.clone(),
                deployment: plan::object_name(&plan.pipeline, &u.name),
                desired,
                ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
                rollout_failed,
                lag: seen.lag.get(&u.name).copied(),
                dead_lettered: seen.dead_lettered.get(&u.name).copied().unwrap_or(0),
                last_scale_time: scaled.as_ref().and_then(|r| r.last_scale_time.clone()),
                last_scale_reason: scaled.map(|r| r.reason),
            }
        })
        .collect();
    record_unit_metrics(ctx, &plan, &units);
    let observation = Observation {
        generation: pipeline.metadata.generation,
        outcome: Outcome::Applied,
        units,
        dead_letter_subject: plan
            .units
            .first()
            .map(|u| u.dead_letters.clone())
            .unwrap_or_default(),
    };
    let status = status::compute(pipeline.status.as_ref(), &observation, &now());
    let became_ready = status::condition(&status, status::READY)
        .is_some_and(|c| c.status == "True")
        && pipeline
            .status
            .as_ref()
            .and_then(|s| status::condition(s, status::READY))
            .is_none_or(|c| c.status != "True");
    set_status(ctx, pipeline, status).await?;
    if became_ready {
        publish(
            ctx,
            pipeline,
            EventType::Normal,
            "Ready",
            format!("all {} units are ready", plan.units.len()),
        )
        .await;
    }
    ctx.metrics.count("ok");
    // Switchers change often: refresh their status (lag, why they hold) sooner.
    if plan.units.iter().any(|u| u.kind == "switcher") {
        Ok(Action::requeue(REFRESH_SWITCHERS))
    } else {
        Ok(Action::requeue(REFRESH))
    }
}

async fn nats_failed(ctx: &Context, pipeline: &Pipeline, message: String) -> Result<Action, Error> {
    let observation = Observation {
        generation: pipeline.metadata.generation,
        outcome: Outcome::NatsUnavailable {
            message: message.clone(),
        },
        units: Vec::new(),
        dead_letter_subject: String::new(),
    };
    let status = status::compute(pipeline.status.as_ref(), &observation, &now());
    let changed = pipeline.status.as_ref() != Some(&status);
    set_status(ctx, pipeline, status).await?;
    if changed {
        publish(
            ctx,
            pipeline,
            EventType::Warning,
            "NatsUnavailable",
            message.clone(),
        )
        .await;
    }
    Err(Error::Nats(message))
}

fn record_unit_metrics(ctx: &Context, plan: &Plan, units: &[UnitObservation]) {
    for u in units {
        let labels = UnitLabels {
            namespace: plan.namespace.clone(),
            pipeline: plan.pipeline.clone(),
            unit: u.name.clone(),
        };
        ctx.metrics
            .unit_lag
            .get_or_create(&labels)
            .set(u.lag.unwrap_or(0).min(i64::MAX as u64) as i64);
        ctx.metrics
            .unit_dead_lettered
            .get_or_create(&labels)
            .set(u.dead_lettered.min(i64::MAX as u64) as i64);
        ctx.metrics
            .unit_ready_replicas
            .get_or_create(&labels)
            .set(i64::from(u.ready));
    }
}

/// Applies every unit's ConfigMap and Deployment, deletes those of units no longer in the spec, and
/// returns the Deployments as the API server now has them, by unit.
async fn apply_objects(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
) -> Result<BTreeMap<String, Deployment>, Error> {
    let namespace = &plan.namespace;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = ListParams::default().labels(&format!("{LABEL_PIPELINE}={}", plan.pipeline));
    let old_deployments = owned_by(pipeline, deployments.list(&selector).await?.items);
    let old_config_maps = owned_by(pipeline, config_maps.list(&selector).await?.items);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut changes = Vec::new();
    let mut applied = BTreeMap::new();
    for unit in &plan.units {
        let name = plan::object_name(&plan.pipeline, &unit.name);
        let before = version_of(&old_config_maps, &name);
        let after = config_maps
            .patch(&name, &params, &Patch::Apply(&unit.config_map))
            .await?;
        changes.extend(
            change(
                "ConfigMap",
                &name,
                before,
                after.metadata.resource_version.as_deref(),
            )
            .map(|(reason, note)| (reason, note, after.object_ref(&()))),
        );
        let before = version_of(&old_deployments, &name);
        let mut deployment = unit.deployment.clone();
        if unit.kind == "switcher" {
            // The autoscaler owns a switcher's replicas: apply what it decided, or keep what runs.
            let running = old_deployments
                .iter()
                .find(|d| d.metadata.name.as_deref() == Some(name.as_str()))
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas);
            let decided = ctx
                .scale_record(&autoscaler::key(namespace, &plan.pipeline, &unit.name))
                .map(|r| r.desired as i32);
            let replicas = decided
                .or(running)
                .unwrap_or(unit.replicas.min as i32)
                .clamp(unit.replicas.min as i32, unit.replicas.max as i32);
            if let Some(spec) = deployment.spec.as_mut() {
                spec.replicas = Some(replicas);
            }
        }
        let after = deployments
            .patch(&name, &params, &Patch::Apply(&deployment))
            .await?;
        changes.extend(
            change(
                "Deployment",
                &name,
                before,
                after.metadata.resource_version.as_deref(),
            )
            .map(|(reason, note)| (reason, note, after.object_ref(&()))),
        );
        applied.insert(unit.name.clone(), after);
    }
    let wanted: Vec<String> = plan
        .units
        .iter()
        .map(|u| plan::object_name(&plan.pipeline, &u.name))
        .collect();
    for (kind, name, reference) in old_deployments
        .iter()
        .map(|d| ("Deployment", d.name_any(), d.object_ref(&())))
        .chain(
            old_config_maps
                .iter()
                .map(|c| ("ConfigMap", c.name_any(), c.object_ref(&()))),
        )
    {
        if wanted.contains(&name) {
            continue;
        }
        let deleted = if kind == "Deployment" {
            deployments
                .delete(&name, &DeleteParams::background())
                .await
                .map(|_| ())
        } else {
            config_maps
                .delete(&name, &DeleteParams::background())
                .await
                .map(|_| ())
        };
        match deleted {
            Ok(()) => changes.push((
                "Deleted",
                format!("{kind} {name}: its unit is no longer in the spec"),
                reference,
            )),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (reason, note, reference) in changes {
        publish_about(
            ctx,
            pipeline,
            EventType::Normal,
            reason,
            note,
            Some(reference),
        )
        .await;
    }
    Ok(applied)
}

/// Objects this Pipeline owns: the label alone could be anybody's.
fn owned_by<K: Resource>(pipeline: &Pipeline, objects: Vec<K>) -> Vec<K> {
    let uid = pipeline.metadata.uid.clone().unwrap_or_default();
    objects
        .into_iter()
        .filter(|o| {
            o.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.uid == uid)
        })
        .collect()
}

fn version_of<K: Resource>(objects: &[K], name: &str) -> Option<String> {
    objects
        .iter()
        .find(|o| o.meta().name.as_deref() == Some(name))
        .and_then(|o| o.meta().resource_version.clone())
}

/// The event for one applied object, if it changed.
fn change(
    kind: &str,
    name: &str,
    before: Option<String>,
    after: Option<&str>,
) -> Option<(&'static str, String)> {
    match (before.as_deref(), after) {
        (None, _) => Some(("Created", format!("{kind} {name}"))),
        (Some(b), Some(a)) if b != a => Some(("Updated", format!("{kind} {name}"))),
        _ => None,
    }
}

async fn cleanup(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    let names = Names::new(
        &pipeline.namespace().unwrap_or_default(),
        &pipeline.name_any(),
    );
    match pipeline.spec.deletion_policy.unwrap_or_default() {
        DeletionPolicy::Retain => {
            publish(
                ctx,
                pipeline,
                EventType::Normal,
                "Retained",
                format!(
                    "kept stream {} and bucket {} (deletionPolicy: Retain)",
                    names.stream(),
                    names.checkpoint_bucket()
                ),
            )
            .await;
        }
        DeletionPolicy::Delete => {
            let deleted = match nats_for(ctx, pipeline).await {
                Ok(js) => switchyard_stage::admin::delete_named(
                    &js,
                    &names.stream(),
                    &names.checkpoint_bucket(),
                )
                .await
                .map_err(|e| format!("{e:#}")),
                Err(message) => Err(message),
            };
            if let Err(message) = deleted {
                publish(
                    ctx,
                    pipeline,
                    EventType::Warning,
                    "CleanupFailed",
                    format!("{message}; the Pipeline is kept until its stream can be deleted, or set deletionPolicy: Retain to delete it without"),
                )
                .await;
                return Err(Error::Nats(message));
            }
            publish(
                ctx,
                pipeline,
                EventType::Normal,
                "Deleted",
                format!(
                    "stream {} and bucket {}",
                    names.stream(),
                    names.checkpoint_bucket()
                ),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

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
}

pub async fn run(options: OperatorOptions) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the Kubernetes API ({e}); in a pod the service account is used, elsewhere KUBECONFIG")
    })?;
    run_with(client, options, shutdown_signal()).await
}

/// The operator on a given client, until `shutdown` resolves (or leadership is lost).
pub async fn run_with(
    client: Client,
    options: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |rx: tokio::sync::watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };
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
    let mut leadership = None;
    if options.leader_election {
        let namespace = options
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".to_string());
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "switchyard-operator")
                .with_namespace(namespace)
                .with_identity(instance.clone())
                .with_field_manager(FIELD_MANAGER)
                .build()
                .await?;
        let (mut is_leader, task) = manager.watch().await;
        // A follower is ready: it serves its purpose by standing by.
        let _ = ready_tx.send(true);
        tracing::info!(%instance, "waiting to become the leader");
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = is_leader.wait_for(|l| *l) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        tracing::info!(%instance, "leading");
        leadership = Some((is_leader, task));
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        options.settings.clone(),
        metrics,
        Some(instance),
    ));
    let (pipelines, deployments, config_maps): (Api<Pipeline>, Api<Deployment>, Api<ConfigMap>) =
        match &options.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    wait_for_crd(&pipelines, stop_rx.clone()).await?;
    let _ = ready_tx.send(true);
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=switchyard-operator");
    let stop_or_lost = {
        let stop = stopped(stop_rx.clone());
        async move {
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
    };
    let controller = Controller::new(pipelines, watcher::Config::default())
        .owns(deployments, managed.clone())
        .owns(config_maps, managed);
    // A scale changes the Deployment, whose watch brings the Pipeline back to the reconcile, which
    // writes the decision into the status.
    let autoscaler = tokio::spawn(
        autoscaler::Autoscaler::new(ctx.clone()).run(controller.store(), stop_rx.clone()),
    );
    let controller = controller
        .graceful_shutdown_on(stop_or_lost)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(pipeline = %object.name, "reconciled"),
                Err(e) => tracing::debug!("controller: {e}"),
            }
        });
    controller.await;
    autoscaler.abort();
    let _ = server.await;
    Ok(())
}

/// The CRD must be installed before Pipelines can be watched: say so, and wait for it.
async fn wait_for_crd(
    api: &Api<Pipeline>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => tracing::error!(
                "the Pipeline CRD is not installed: `kubectl apply -f crds/switchyard.dev_pipelines.yaml` (the Helm chart installs it); waiting"
            ),
            Err(e) => tracing::warn!("cannot list Pipelines ({e}); retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|s| *s) => anyhow::bail!("stopped before the CRD appeared"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_cap() {
        let delays: Vec<u64> = (1..=10).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn changes_become_events_only_when_something_changed() {
        assert_eq!(
            change("Deployment", "p-a", None, Some("1")).unwrap().0,
            "Created"
        );
        assert_eq!(
            change("Deployment", "p-a", Some("1".into()), Some("2"))
                .unwrap()
                .0,
            "Updated"
        );
        assert!(change("Deployment", "p-a", Some("2".into()), Some("2")).is_none());
    }
}
