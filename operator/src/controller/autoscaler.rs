//! The operator's autoscaler: once a reporting interval, every switcher of every Pipeline is sampled
//! (its consumer's lag from NATS, its replicas' utilization and rate from their reports, its readers'
//! lag for downstream pressure), the pure `autoscale::decide` says how many replicas it needs, and a
//! change is applied through the Deployment's scale subresource (with its own field manager), recorded
//! for the status and told in an Event.
//!
//! Pipelines are scaled independently of each other: each pass starts every Pipeline that is not still
//! busy with the previous one, so one whose NATS server does not answer holds up only itself. Replicas
//! come from the Deployment cache, not from a request per switcher.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use switchyard_crds::layout::{layout, Layout};
use switchyard_crds::topology::Topology;
use switchyard_crds::validate::analyze;
use switchyard_crds::Pipeline;

use super::caches::PipelineObject;
use super::context::{Context, SCALE_FIELD_MANAGER};
use super::keys;
use super::memory::{lock, ScaleRecord};
use super::status::{PHASE_PAUSED, PHASE_PAUSING};
use crate::plan;
use switchyard_crds::autoscale::{self, Policy, Window};

/// Longest one Pipeline's scaling step may take before it is abandoned for this pass.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error(transparent)]
    Resolve(#[from] super::resolve::ResolveError),
    #[error(transparent)]
    Reports(#[from] switchyard_platform::reports::ListenError),
    #[error("cannot scale {deployment}: {source}")]
    Scale {
        deployment: String,
        #[source]
        source: kube::Error,
    },
}

/// Whether the autoscaler leaves a Pipeline alone this interval. The reconcile holds a paused
/// Pipeline's units, and gives switchers back what they had when it resumes it: until its status says
/// so, a switcher still at zero after `spec.paused` is cleared is not the autoscaler's to raise to its
/// minimum, which the reconcile would then take for the autoscaler's decision.
pub fn waits_for_the_reconcile(pipeline: &Pipeline) -> bool {
    let phase = pipeline.status.as_ref().and_then(|s| s.phase.as_deref());
    pipeline.spec.paused || matches!(phase, Some(PHASE_PAUSED | PHASE_PAUSING))
}

/// A Pipeline's analysis, kept while its generation stays the same.
type Analysis = Arc<(Topology, Layout)>;

pub struct Autoscaler {
    ctx: Arc<Context>,
    started: Instant,
    windows: Mutex<HashMap<String, Window>>,
    analyses: Mutex<HashMap<String, (Option<i64>, Analysis)>>,
    /// Pipelines whose step of an earlier pass is still running.
    busy: Mutex<HashSet<String>>,
}

impl Autoscaler {
    pub fn new(ctx: Arc<Context>) -> Autoscaler {
        Autoscaler {
            ctx,
            started: Instant::now(),
            windows: Mutex::new(HashMap::new()),
            analyses: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
        }
    }

    /// Scales every switcher once a reporting interval until `stop` is set.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(switchyard_crds::unit::REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let pipelines = self.ctx.caches.pipelines.state();
            for object in &pipelines {
                let Ok(pipeline) = object.0.as_ref() else {
                    continue;
                };
                let uid = pipeline.metadata.uid.clone().unwrap_or_default();
                if pipeline.metadata.deletion_timestamp.is_some()
                    || !lock(&self.busy).insert(uid.clone())
                {
                    continue;
                }
                let this = self.clone();
                let pipeline = pipeline.clone();
                tokio::spawn(async move {
                    this.step(&pipeline).await;
                    lock(&this.busy).remove(&uid);
                });
            }
            self.forget_gone(&pipelines);
        }
    }

    /// One interval for one Pipeline.
    pub async fn step(&self, pipeline: &Pipeline) {
        if waits_for_the_reconcile(pipeline) {
            return;
        }
        match tokio::time::timeout(STEP_TIMEOUT, self.scale(pipeline)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(pipeline = %pipeline.metadata.name.as_deref().unwrap_or_default(), "not scaling this interval: {e}")
            }
            Err(_) => {
                tracing::debug!(pipeline = %pipeline.metadata.name.as_deref().unwrap_or_default(), "not scaling this interval: no answer within {STEP_TIMEOUT:?}")
            }
        }
    }

    /// The topology and layout of a Pipeline, analysed once per generation; None: nothing to scale.
    fn analysis(&self, pipeline: &Pipeline) -> Option<Analysis> {
        let uid = pipeline.metadata.uid.clone().unwrap_or_default();
        let generation = pipeline.metadata.generation;
        if let Some((seen, analysis)) = lock(&self.analyses).get(&uid) {
            if *seen == generation {
                return Some(analysis.clone());
            }
        }
        // An invalid spec is the reconcile's to report; there is nothing to scale.
        let topology = analyze(pipeline).ok()?;
        let layout = layout(&topology, &pipeline.spec).ok()?;
        let analysis = Arc::new((topology, layout));
        lock(&self.analyses).insert(uid, (generation, analysis.clone()));
        Some(analysis)
    }

    async fn scale(&self, pipeline: &Pipeline) -> Result<(), ScaleError> {
        let Some(analysis) = self.analysis(pipeline) else {
            return Ok(());
        };
        let (topology, layout) = analysis.as_ref();
        if topology.units.iter().all(|u| u.switcher.is_none()) {
            return Ok(());
        }
        let js = super::resolve::nats(&self.ctx, &topology.namespace, &pipeline.spec).await?;
        self.ctx.listen_to_reports(&pipeline.spec, &js).await?;
        let mut lags = HashMap::new();
        for consumer in &layout.nats.consumers {
            if let Some(lag) = switchyard_platform::nats::read_lag(
                &js,
                &layout.nats.stream.name,
                &consumer.durable,
            )
            .await
            {
                // The consumer counts messages; a frame holds several items.
                let reports = self.ctx.reports.fresh(&keys::unit(
                    &topology.namespace,
                    &topology.pipeline,
                    &consumer.durable,
                ));
                let lag = switchyard_crds::unit::items_pending(lag, &reports);
                lags.insert(consumer.durable.clone(), lag);
            }
        }
        for unit in topology.units.iter().filter(|u| u.switcher.is_some()) {
            if let Some(&lag) = lags.get(&unit.name) {
                self.scale_unit(pipeline, topology, layout, &unit.name, lag, &lags)
                    .await?;
            }
        }
        Ok(())
    }

    async fn scale_unit(
        &self,
        pipeline: &Pipeline,
        topology: &Topology,
        layout: &Layout,
        unit: &str,
        lag: u64,
        lags: &HashMap<String, u64>,
    ) -> Result<(), ScaleError> {
        let Some(switcher) = topology
            .units
            .iter()
            .find(|u| u.name == unit)
            .and_then(|u| u.switcher.as_ref())
        else {
            return Ok(());
        };
        let namespace = &topology.namespace;
        let name = plan::object_name(&topology.pipeline, unit);
        // Not applied yet: the reconcile creates it at minReplicas.
        let Some(deployment) = self.ctx.caches.deployment(namespace, &name) else {
            return Ok(());
        };
        let current = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as u32;
        let policy = Policy::of(switcher);
        let k = keys::unit(namespace, &topology.pipeline, unit);
        let fresh = self.ctx.reports.fresh(&k);
        let samples = {
            let mut windows = lock(&self.windows);
            let window = windows.entry(k.clone()).or_default();
            window.push(
                autoscale::sample(self.started.elapsed(), lag, &fresh),
                policy.stabilization,
            );
            window.samples()
        };
        let pressure = autoscale::downstream_pressure(topology, &layout.nats.consumers, unit, lags);
        let decision = autoscale::decide(&policy, current, &samples, pressure.as_ref());
        let previous = self.ctx.scale_record(&k);
        let record = if decision.desired != current {
            self.resize(pipeline, namespace, &name, unit, decision)
                .await?
        } else {
            ScaleRecord {
                desired: current,
                last_scale_time: previous.as_ref().and_then(|p| p.last_scale_time.clone()),
                // A hold says why; a scale's reason stays until the next change or hold.
                reason: decision.reason,
            }
        };
        if previous.as_ref() != Some(&record) {
            // The reconcile writes it into the status: at once after a scale (the Deployment's watch
            // brings the Pipeline back), at its next refresh for a hold.
            lock(&self.ctx.scaling).insert(k, record);
        }
        Ok(())
    }

    /// Sets a switcher's replicas through its Deployment's scale subresource, and tells it in an Event.
    async fn resize(
        &self,
        pipeline: &Pipeline,
        namespace: &str,
        deployment: &str,
        unit: &str,
        decision: autoscale::Decision,
    ) -> Result<ScaleRecord, ScaleError> {
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.ctx.client.clone(), namespace);
        let params = PatchParams {
            field_manager: Some(SCALE_FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": decision.desired}}));
        deployments
            .patch_scale(deployment, &params, &patch)
            .await
            .map_err(|source| ScaleError::Scale {
                deployment: deployment.to_string(),
                source,
            })?;
        let note = format!("{unit}: {}", decision.reason);
        super::context::publish(
            &self.ctx,
            &pipeline.metadata,
            EventType::Normal,
            "Scaled",
            note,
        )
        .await;
        tracing::info!(pipeline = %pipeline.metadata.name.as_deref().unwrap_or_default(), %unit, "{}", decision.reason);
        Ok(ScaleRecord {
            desired: decision.desired,
            last_scale_time: Some(super::context::now()),
            reason: decision.reason,
        })
    }

    /// Drops the windows and analyses of Pipelines that are gone.
    fn forget_gone(&self, pipelines: &[Arc<PipelineObject>]) {
        let live: HashSet<String> = pipelines.iter().map(|p| keys::pipeline(p.meta())).collect();
        let uids: HashSet<&str> = pipelines
            .iter()
            .filter_map(|p| p.meta().uid.as_deref())
            .collect();
        // Window keys are `namespace/pipeline/unit`.
        lock(&self.windows).retain(|k, _| {
            k.rsplit_once('/')
                .is_some_and(|(pipeline, _)| live.contains(pipeline))
        });
        lock(&self.analyses).retain(|uid, _| uids.contains(uid.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(paused: bool, phase: Option<&str>) -> Pipeline {
        let mut p: Pipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "paused": paused,
                "sources": [{"name": "gen", "generator": {"count": 1}}],
                "stages": [{"name": "work", "passthrough": {}, "switcher": {"minReplicas": 1, "maxReplicas": 4}}],
                "sinks": [{"name": "out", "log": {}}]
            }
        }))
        .unwrap();
        if let Some(phase) = phase {
            p.status = Some(switchyard_crds::PipelineStatus {
                phase: Some(phase.to_string()),
                ..Default::default()
            });
        }
        p
    }

    #[test]
    fn a_resumed_pipeline_is_not_scaled_before_its_reconcile_has_resumed_it() {
        // Pausing, then paused: the reconcile holds the units.
        assert!(waits_for_the_reconcile(&pipeline(true, None)));
        assert!(waits_for_the_reconcile(&pipeline(
            true,
            Some(PHASE_PAUSING)
        )));
        assert!(waits_for_the_reconcile(&pipeline(true, Some(PHASE_PAUSED))));
        // spec.paused cleared, but the status still says Paused (or Pausing): the switcher is still at
        // zero and the reconcile brings it back to what it had.
        assert!(waits_for_the_reconcile(&pipeline(
            false,
            Some(PHASE_PAUSED)
        )));
        assert!(waits_for_the_reconcile(&pipeline(
            false,
            Some(PHASE_PAUSING)
        )));
        // Resumed by the reconcile, or never paused.
        assert!(!waits_for_the_reconcile(&pipeline(false, Some("Running"))));
        assert!(!waits_for_the_reconcile(&pipeline(false, None)));
    }
}
