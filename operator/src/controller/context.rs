//! What every step of the reconcile and the autoscaler share: the `Context` (the client, the plan
//! settings, NATS connections, caches, what the operator remembers), the operator's names and
//! intervals, and Events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use switchyard_crds::Pipeline;

use super::memory::{lock, Claims, CredentialsCache, Resyncs, ScaleRecord};
use super::{caches, keys, nats};
use crate::metrics::Metrics;
use crate::plan::PlanSettings;

/// How long a deleted Pipeline waits for its NATS data to be reachable before it is let go.
pub const DEFAULT_CLEANUP_TIMEOUT: Duration = Duration::from_secs(300);
/// Keeps a Pipeline until its NATS data is dealt with (deleted, or kept with `deletionPolicy: Retain`).
pub const FINALIZER: &str = "switchyard.dev/cleanup";
/// The one field manager for everything the reconcile applies.
pub const FIELD_MANAGER: &str = "switchyard-operator";
/// The autoscaler's own field manager, for the replicas it sets through the scale subresource.
pub const SCALE_FIELD_MANAGER: &str = "switchyard-autoscaler";
/// A healthy Pipeline is looked at again this often, to refresh lag and readiness.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The same for a Pipeline with switchers, whose status also says why they scale or hold.
pub const REFRESH_SWITCHERS: Duration = Duration::from_secs(15);

pub struct Context {
    pub client: Client,
    pub settings: PlanSettings,
    pub nats: nats::NatsPool,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub caches: caches::Caches,
    /// How long a deleted Pipeline waits for its NATS data before it is let go.
    pub cleanup_timeout: Duration,
    /// The autoscaler's latest decision per switcher, which the reconcile applies and reports.
    pub scaling: Mutex<HashMap<String, ScaleRecord>>,
    pub(super) claims: Claims,
    pub(super) resyncs: Resyncs,
    pub(super) credentials: CredentialsCache,
    /// Every unit's latest reports (rate, utilization), by `keys::unit`.
    pub reports: switchyard_platform::reports::Reports,
    /// NATS servers whose stats subjects are subscribed to.
    pub(super) listening: tokio::sync::Mutex<std::collections::HashSet<String>>,
    /// Consecutive failures per Pipeline, for the retry back-off.
    pub(super) failures: Mutex<HashMap<String, u32>>,
    /// When each Pipeline's status was last written.
    pub(super) status_writes: Mutex<HashMap<String, Instant>>,
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
            nats: nats::NatsPool::default(),
            metrics,
            caches: caches::Caches::empty(),
            cleanup_timeout: DEFAULT_CLEANUP_TIMEOUT,
            scaling: Mutex::new(HashMap::new()),
            claims: Claims::default(),
            resyncs: Resyncs::default(),
            credentials: CredentialsCache::default(),
            reports: switchyard_platform::reports::Reports::default(),
            listening: tokio::sync::Mutex::new(std::collections::HashSet::new()),
            failures: Mutex::new(HashMap::new()),
            status_writes: Mutex::new(HashMap::new()),
        }
    }

    /// Subscribes, once per NATS server, to the reports of every unit it carries.
    pub async fn listen_to_reports(
        &self,
        spec: &switchyard_crds::PipelineSpec,
        js: &async_nats::jetstream::Context,
    ) -> Result<(), switchyard_platform::reports::ListenError> {
        let url = spec
            .nats
            .as_ref()
            .and_then(|n| n.url.clone())
            .unwrap_or_else(|| self.settings.nats_url.clone());
        let mut listening = self.listening.lock().await;
        if listening.contains(&url) {
            return Ok(());
        }
        self.reports
            .listen(
                &js.client(),
                "switchyard.*.*.stats.*".to_string(),
                |subject, _| {
                    // switchyard.<namespace>.<pipeline>.stats.<unit>
                    match subject.split('.').collect::<Vec<_>>().as_slice() {
                        [_, namespace, pipeline, _, unit] => {
                            Some(keys::unit(namespace, pipeline, unit))
                        }
                        _ => None,
                    }
                },
            )
            .await?;
        listening.insert(url);
        Ok(())
    }

    /// Inputs finished per second by a unit's live replicas, to a tenth; None without a report.
    pub fn rate(&self, namespace: &str, pipeline: &str, unit: &str) -> Option<f64> {
        let fresh = self.reports.fresh(&keys::unit(namespace, pipeline, unit));
        (!fresh.is_empty())
            .then(|| (fresh.iter().map(|r| r.rate).sum::<f64>() * 10.0).round() / 10.0)
    }

    /// Where a postgres source's table stands, as a live replica last counted it.
    pub fn rows(
        &self,
        namespace: &str,
        pipeline: &str,
        unit: &str,
    ) -> Option<switchyard_crds::RowCounts> {
        self.reports
            .fresh(&keys::unit(namespace, pipeline, unit))
            .iter()
            .find_map(|r| r.rows)
    }

    /// What a join's live replicas wait on.
    pub fn join_waiting(
        &self,
        namespace: &str,
        pipeline: &str,
        unit: &str,
    ) -> Option<switchyard_crds::status::JoinWaiting> {
        let fresh = self.reports.fresh(&keys::unit(namespace, pipeline, unit));
        switchyard_crds::unit::join_waiting(&fresh)
    }

    pub fn scale_record(&self, key: &str) -> Option<ScaleRecord> {
        lock(&self.scaling).get(key).cloned()
    }

    pub(super) fn failures(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        lock(&self.failures)
    }

    pub(super) fn status_written(&self, key: &str) -> Option<Duration> {
        lock(&self.status_writes).get(key).map(Instant::elapsed)
    }

    pub(super) fn mark_status_written(&self, key: &str) {
        lock(&self.status_writes).insert(key.to_string(), Instant::now());
    }

    /// Drops everything kept about a Pipeline that is gone.
    pub(super) fn forget(&self, meta: &ObjectMeta) {
        let key = keys::pipeline(meta);
        let uid = meta.uid.clone().unwrap_or_default();
        self.claims.release(&uid, &[]);
        self.resyncs.forget(&uid);
        lock(&self.status_writes).remove(&key);
        lock(&self.failures).remove(&key);
        let prefix = format!("{key}/");
        lock(&self.scaling).retain(|k, _| !k.starts_with(&prefix));
        self.metrics.forget_pipeline(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
    }
}

/// A reference to the Pipeline with `meta`, for Events (it may not decode as a Pipeline).
fn reference(meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(Pipeline::api_version(&()).to_string()),
        kind: Some(Pipeline::kind(&()).to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// An Event on the Pipeline.
pub(crate) async fn publish(
    ctx: &Context,
    meta: &ObjectMeta,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference(meta)).await {
        tracing::warn!(pipeline = %keys::pipeline(meta), "cannot publish an event: {e}");
    }
}

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
