//! The operator's autoscaler: once a reporting interval, every switcher of every Pipeline is sampled
//! (its consumer's lag from NATS, its replicas' utilization and rate from their reports, its readers'
//! lag for downstream pressure), the pure `autoscale::decide` says how many replicas it needs, and a
//! change is applied through the Deployment's scale subresource, recorded for the status and told in
//! an Event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use switchyard_crds::layout::layout;
use switchyard_crds::validate::analyze;
use switchyard_crds::Pipeline;

use super::Context;
use crate::autoscale::{self, Policy, Window};
use crate::plan;

/// The latest decision for one switcher.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleRecord {
    pub desired: u32,
    /// When the replicas last changed (None: not since the operator started).
    pub last_scale_time: Option<Time>,
    /// Why they changed, or why they hold.
    pub reason: String,
}

pub fn key(namespace: &str, pipeline: &str, unit: &str) -> String {
    format!("{namespace}/{pipeline}/{unit}")
}

pub struct Autoscaler {
    ctx: Arc<Context>,
    started: Instant,
    reports: crate::reports::Reports,
    /// NATS servers whose stats subjects are subscribed to.
    listening: HashSet<String>,
    windows: HashMap<String, Window>,
}

impl Autoscaler {
    pub fn new(ctx: Arc<Context>) -> Autoscaler {
        Autoscaler {
            ctx,
            started: Instant::now(),
            reports: crate::reports::Reports::default(),
            listening: HashSet::new(),
            windows: HashMap::new(),
        }
    }

    /// Scales every switcher once a reporting interval until `stop` is set.
    pub async fn run(
        mut self,
        pipelines: Store<Pipeline>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(switchyard_stage::stats::REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            for pipeline in pipelines.state() {
                self.step(&pipeline).await;
            }
        }
    }

    /// One interval for one Pipeline.
    pub async fn step(&mut self, pipeline: &Pipeline) {
        if pipeline.metadata.deletion_timestamp.is_some() {
            return;
        }
        if let Err(e) = self.scale(pipeline).await {
            tracing::debug!(pipeline = %pipeline.name_any(), "not scaling this interval: {e}");
        }
    }

    async fn scale(&mut self, pipeline: &Pipeline) -> Result<(), String> {
        // An invalid spec is the reconcile's to report; there is nothing to scale.
        let Ok(topology) = analyze(pipeline) else {
            return Ok(());
        };
        if topology.units.iter().all(|u| u.switcher.is_none()) {
            return Ok(());
        }
        let layout = layout(&topology, &pipeline.spec).map_err(|p| format!("{p:?}"))?;
        let js = super::nats_for(&self.ctx, pipeline).await?;
        self.listen(pipeline, &js).await?;
        let mut lags = HashMap::new();
        for consumer in &layout.nats.consumers {
            if let Some(lag) =
                switchyard_stage::stats::read_lag(&js, &layout.nats.stream.name, &consumer.durable)
                    .await
            {
                lags.insert(consumer.durable.clone(), lag);
            }
        }
        let namespace = topology.namespace.clone();
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let at = self.started.elapsed();
        for unit in topology.units.iter().filter(|u| u.switcher.is_some()) {
            let Some(switcher) = &unit.switcher else {
                continue;
            };
            let Some(&lag) = lags.get(&unit.name) else {
                continue;
            };
            let name = plan::object_name(&topology.pipeline, &unit.name);
            // Not applied yet: the reconcile creates it at minReplicas.
            let Some(deployment) = deployments
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let current = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1)
                .max(0) as u32;
            let policy = Policy::of(switcher);
            let k = key(&namespace, &topology.pipeline, &unit.name);
            let fresh = self.reports.fresh(&k);
            let window = self.windows.entry(k.clone()).or_default();
            window.push(autoscale::sample(at, lag, &fresh), policy.stabilization);
            let pressure = autoscale::downstream_pressure(
                &topology,
                &layout.nats.consumers,
                &unit.name,
                &lags,
            );
            let decision =
                autoscale::decide(&policy, current, &window.samples(), pressure.as_ref());
            let previous = self.ctx.scale_record(&k);
            let record = if decision.desired != current {
                deployments
                    .patch_scale(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"spec": {"replicas": decision.desired}})),
                    )
                    .await
                    .map_err(|e| format!("cannot scale {name}: {e}"))?;
                super::publish(
                    &self.ctx,
                    pipeline,
                    EventType::Normal,
                    "Scaled",
                    format!("{}: {}", unit.name, decision.reason),
                )
                .await;
                tracing::info!(pipeline = %topology.pipeline, unit = %unit.name, "{}", decision.reason);
                ScaleRecord {
                    desired: decision.desired,
                    last_scale_time: Some(super::now()),
                    reason: decision.reason,
                }
            } else {
                ScaleRecord {
                    desired: current,
                    last_scale_time: previous.as_ref().and_then(|p| p.last_scale_time.clone()),
                    // A hold says why; a scale's reason stays until the next change or hold.
                    reason: decision.reason,
                }
            };
            if previous.as_ref() != Some(&record) {
                // The reconcile writes it into the status: at once after a scale (the Deployment's
                // watch brings the Pipeline back), within REFRESH_SWITCHERS for a hold.
                self.ctx
                    .scaling
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(k, record);
            }
        }
        Ok(())
    }

    /// Subscribes once per NATS server to every unit's reports.
    async fn listen(
        &mut self,
        pipeline: &Pipeline,
        js: &async_nats::jetstream::Context,
    ) -> Result<(), String> {
        let url = pipeline
            .spec
            .nats
            .as_ref()
            .and_then(|n| n.url.clone())
            .unwrap_or_else(|| self.ctx.settings.nats_url.clone());
        if self.listening.contains(&url) {
            return Ok(());
        }
        self.reports
            .listen(
                &js.client(),
                "switchyard.*.*.stats.*".to_string(),
                |subject, _| {
                    // switchyard.<namespace>.<pipeline>.stats.<unit>
                    match subject.split('.').collect::<Vec<_>>().as_slice() {
                        [_, namespace, pipeline, _, unit] => Some(key(namespace, pipeline, unit)),
                        _ => None,
                    }
                },
            )
            .await
            .map_err(|e| format!("{e:#} at {url}"))?;
        self.listening.insert(url);
        Ok(())
    }
}
