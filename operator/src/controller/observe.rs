//! Observe: what each unit's Deployment and NATS say now, as the status computation takes it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;

use super::autoscaler;
use super::nats::{self, NatsObservation};
use super::status::UnitObservation;
use super::Context;
use crate::pause::{PauseState, UnitNow};
use crate::plan::{self, Plan};

/// The rollout facts of one Deployment (as `kubectl rollout status` reads them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    /// Seen by the Deployment controller, every replica updated and none of the old ones left: what
    /// ran before the latest spec runs nowhere any more.
    pub old_gone: bool,
    pub complete: bool,
    /// The Deployment controller gave up (its Progressing condition says ProgressDeadlineExceeded).
    pub failed: Option<String>,
}

/// Pure: the rollout of `deployment` as its own status tells it.
pub fn rollout(deployment: &Deployment) -> Rollout {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = deployment.status.as_ref() else {
        return Rollout {
            desired,
            ..Rollout::default()
        };
    };
    let seen = match (deployment.metadata.generation, status.observed_generation) {
        (Some(generation), Some(observed)) => observed >= generation,
        (None, _) => true,
        (Some(_), None) => false,
    };
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let old_gone = seen && updated >= desired && total <= updated;
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            c.message
                .clone()
                .unwrap_or_else(|| "the rollout timed out".to_string())
        });
    Rollout {
        desired,
        ready,
        updated,
        old_gone,
        complete: old_gone && available >= desired,
        failed,
    }
}

/// Every unit as observed, from the Deployments just applied or cached, and NATS.
pub fn units(
    ctx: &Context,
    plan: &Plan,
    deployments: &BTreeMap<String, std::sync::Arc<Deployment>>,
    seen: &NatsObservation,
) -> Vec<UnitObservation> {
    plan.units
        .iter()
        .map(|u| {
            let r = deployments
                .get(&u.name)
                .map(|d| rollout(d))
                .unwrap_or_default();
            let scaled = u
                .is_switcher()
                .then(|| {
                    ctx.scale_record(&autoscaler::key(&plan.namespace, &plan.pipeline, &u.name))
                })
                .flatten();
            UnitObservation {
                name: u.name.clone(),
                deployment: plan::object_name(&plan.pipeline, &u.name),
                desired: r.desired,
                ready: r.ready,
                updated: r.updated,
                rolled_out: r.complete,
                rollout_failed: r.failed,
                lag: seen.lag.get(&u.name).copied(),
                rate: ctx.rate(&plan.namespace, &plan.pipeline, &u.name),
                dead_lettered: seen.dead_lettered.get(&u.name).copied().unwrap_or(0),
                last_scale_time: scaled.as_ref().and_then(|r| r.last_scale_time.clone()),
                last_scale_reason: scaled.map(|r| r.reason),
            }
        })
        .collect()
}

/// Where the Pipeline stands with `spec.paused`, from its Deployments (cached) and the lags just read.
pub fn pause(
    ctx: &Context,
    pipeline: &switchyard_crds::Pipeline,
    plan: &Plan,
    seen: &NatsObservation,
) -> PauseState {
    let was_paused = pipeline.status.as_ref().and_then(|s| s.phase.as_deref())
        == Some(super::status::PHASE_PAUSED);
    let units: Vec<UnitNow> = plan
        .units
        .iter()
        .map(|u| {
            let name = plan::object_name(&plan.pipeline, &u.name);
            let pods = ctx
                .caches
                .deployment(&plan.namespace, &name)
                .and_then(|d| d.status.as_ref().and_then(|s| s.replicas))
                .unwrap_or(0);
            UnitNow {
                name: u.name.clone(),
                is_source: u.kind == plan::UnitType::Source,
                pods,
                lag: seen.lag.get(&u.name).copied(),
            }
        })
        .collect();
    crate::pause::decide(pipeline.spec.paused, was_paused, &units)
}

/// Lag and dead letters; a failure leaves them unknown (logged), since the units themselves are fine.
pub async fn nats_figures(
    js: &async_nats::jetstream::Context,
    plan: &Plan,
    key: &str,
) -> NatsObservation {
    let dead_letter_subjects: BTreeMap<String, String> = plan
        .units
        .iter()
        .map(|u| (u.name.clone(), u.dead_letters.clone()))
        .collect();
    match nats::observe(js, &plan.nats, &dead_letter_subjects).await {
        Ok(seen) => seen,
        Err(e) => {
            tracing::warn!(pipeline = %key, "cannot read lag: {e}");
            NatsObservation::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    fn deployment(generation: i64, replicas: i32, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..DeploymentSpec::default()
            }),
            status: Some(status),
            ..Deployment::default()
        };
        d.metadata.generation = Some(generation);
        d
    }

    fn status(
        observed: i64,
        total: i32,
        updated: i32,
        ready: i32,
        available: i32,
    ) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(total),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        }
    }

    #[test]
    fn a_finished_rollout_is_complete() {
        assert!(rollout(&deployment(3, 2, status(3, 2, 2, 2, 2))).complete);
    }

    #[test]
    fn an_old_ready_pod_beside_a_pending_new_one_is_not_complete() {
        // The finding: updated=1 ready=1 unavailable=1 after an env change.
        let r = rollout(&deployment(2, 1, status(2, 2, 1, 1, 1)));
        assert!(!r.complete);
        assert_eq!((r.desired, r.ready, r.updated), (1, 1, 1));
    }

    #[test]
    fn a_spec_the_deployment_controller_has_not_seen_is_not_complete() {
        assert!(!rollout(&deployment(4, 1, status(3, 1, 1, 1, 1))).complete);
    }

    #[test]
    fn unavailable_new_replicas_are_not_complete() {
        assert!(!rollout(&deployment(2, 2, status(2, 2, 2, 2, 1))).complete);
    }

    #[test]
    fn a_switcher_at_zero_is_complete() {
        assert!(rollout(&deployment(2, 0, status(2, 0, 0, 0, 0))).complete);
    }
}
