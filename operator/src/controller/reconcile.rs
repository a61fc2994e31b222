//! One reconcile of one Pipeline, as named steps: finalizer → validate → resolve references → apply
//! (NATS, then Kubernetes objects) → observe → status. Each step has its own error type; `report` is the
//! one place where a failure becomes conditions, an Event and a metric label.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use serde_json::json;
use switchyard_crds::{Pipeline, PipelineSpec, PipelineStatus};

use super::apply::{self, Applied};
use super::caches::PipelineObject;
use super::context::{Context, FIELD_MANAGER, FINALIZER, REFRESH, REFRESH_SWITCHERS};
use super::errors::{Error, FinalizerError, Next, StatusError, ValidateError};
use super::migrate::{self, Migrating, Taken};
use super::status::{self, MigrationState, Observation, Outcome, UnitObservation};
use super::{cleanup, keys, observe, resolve};
use crate::pause::PauseState;
use crate::plan::{self, Plan};

/// How soon a pausing Pipeline is looked at again, to stop its units once they are drained.
const PAUSE_CHECK: Duration = Duration::from_secs(3);

/// The controller's entry point.
pub async fn reconcile(object: Arc<PipelineObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // Inside kube-runtime's span, which says what triggered it.
    tracing::debug!("reconciling");
    let meta = object.meta();
    let result = if meta.deletion_timestamp.is_some() {
        finalize(&ctx, meta, object.0.as_ref().ok().map(|p| &p.spec)).await
    } else {
        match ensure_finalizer(&ctx, meta).await {
            Err(e) => Err(e.into()),
            Ok(()) => match &object.0 {
                Ok(pipeline) => reconcile_pipeline(pipeline, &ctx).await,
                Err(invalid) => Err(ValidateError::Decode(invalid.error.clone()).into()),
            },
        }
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let previous = object.0.as_ref().ok().and_then(|p| p.status.as_ref());
    match result {
        Ok(action) => {
            ctx.failures().remove(&keys::pipeline(meta));
            ctx.metrics.count("ok");
            Ok(action)
        }
        Err(error) => {
            report(&ctx, meta, previous, &error).await;
            match error.next() {
                Next::Retry => Err(error),
                Next::Recheck(after) => Ok(Action::requeue(after)),
                Next::AwaitChange => Ok(Action::await_change()),
            }
        }
    }
}

/// Wait before retrying a Pipeline that failed `failures` times in a row: 2 s, doubling, at most 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(8);
    (Duration::from_secs(2) * 2u32.pow(exponent)).min(Duration::from_secs(300))
}

pub fn error_policy(object: Arc<PipelineObject>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut all = ctx.failures();
        let n = all.entry(keys::pipeline(object.meta())).or_insert(0);
        *n += 1;
        *n
    };
    let delay = retry_delay(failures);
    tracing::warn!(pipeline = %keys::pipeline(object.meta()), failures, ?delay, "reconcile failed: {}", super::errors::error_chain(error));
    Action::requeue(delay)
}

/// The steps for a Pipeline that decodes.
async fn reconcile_pipeline(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    let plan = plan::plan(pipeline, &ctx.settings).map_err(ValidateError::Invalid)?;
    let js = resolve::nats(ctx, &plan.namespace, &pipeline.spec).await?;
    if let Migrating::Yes(taken) = migrate::reconcile(ctx, pipeline, &plan, &js).await? {
        let Taken {
            state,
            epochs,
            plan: target,
            applied,
            again,
        } = *taken;
        announce(ctx, &pipeline.metadata, &applied).await;
        let figures =
            observe::nats_figures(&js, &target, &keys::pipeline(&pipeline.metadata)).await;
        let mut deployments = applied.deployments.clone();
        for unit in &target.units {
            let name = plan::object_name(&target.pipeline, &unit.name);
            if let Some(d) = ctx.caches.deployment(&target.namespace, &name) {
                deployments.entry(unit.name.clone()).or_insert(d);
            }
        }
        let units = observe::units(ctx, &target, &deployments, &figures);
        let found = Found {
            units,
            edges: observe::edges(&target, &figures),
            pause: PauseState::Running,
            epochs,
            migration: state,
        };
        update_status(ctx, pipeline, &target, found).await?;
        // A migration just finished: the next reconcile applies the spec as usual.
        return Ok(Action::requeue(again.max(Duration::from_millis(200))));
    }
    apply::nats_objects(&js, &plan).await?;
    let figures = observe::nats_figures(&js, &plan, &keys::pipeline(&pipeline.metadata)).await;
    let pause = observe::pause(ctx, pipeline, &plan, &figures);
    let applied = apply::kubernetes_objects(ctx, pipeline, &plan, &pause).await?;
    announce(ctx, &pipeline.metadata, &applied).await;
    if let Err(e) = ctx.listen_to_reports(&pipeline.spec, &js).await {
        tracing::warn!(pipeline = %keys::pipeline(&pipeline.metadata), "cannot read unit rates: {e}");
    }
    let units = observe::units(ctx, &plan, &applied.deployments, &figures);
    ctx.metrics
        .record_units(&plan.namespace, &plan.pipeline, &units);
    let draining = matches!(pause, PauseState::Draining { .. });
    let found = Found {
        units,
        edges: observe::edges(&plan, &figures),
        pause,
        epochs: pipeline
            .status
            .as_ref()
            .map(|s| s.epochs.clone())
            .unwrap_or_default(),
        migration: MigrationState::None,
    };
    let lag: u64 = found.units.iter().filter_map(|u| u.lag).sum();
    update_status(ctx, pipeline, &plan, found).await?;
    Ok(Action::requeue(next_look(
        draining,
        plan.units.iter().any(|u| u.is_switcher()),
        lag,
    )))
}

/// A Pipeline with a backlog is looked at this often, so that its status sees it caught up soon.
pub const BACKLOG_REFRESH: Duration = Duration::from_secs(5);

/// Pure: when to look at a Pipeline again. A pause in progress soon, to stop the units once they are
/// drained; one with a backlog soon, to see it through; switchers, whose status also says why they
/// scale or hold, more often than the rest.
pub fn next_look(draining: bool, has_switchers: bool, lag: u64) -> Duration {
    if draining {
        PAUSE_CHECK
    } else if lag > 0 {
        BACKLOG_REFRESH
    } else if has_switchers {
        REFRESH_SWITCHERS
    } else {
        REFRESH
    }
}

/// What a reconcile found, for the status.
struct Found {
    units: Vec<UnitObservation>,
    edges: Vec<switchyard_crds::EdgeStatus>,
    pause: PauseState,
    epochs: std::collections::BTreeMap<String, u32>,
    migration: MigrationState,
}

async fn update_status(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    found: Found,
) -> Result<(), StatusError> {
    let Found {
        units,
        edges,
        pause,
        epochs,
        migration,
    } = found;
    let observation = Observation {
        generation: pipeline.metadata.generation,
        outcome: Outcome::Applied,
        units,
        edges,
        pause,
        epochs,
        migration,
        dead_letter_subject: plan
            .units
            .first()
            .map(|u| u.dead_letters.clone())
            .unwrap_or_default(),
    };
    let previous = pipeline.status.as_ref();
    let next = status::compute(previous, &observation, &super::context::now());
    let became_ready = is_ready(Some(&next)) && !is_ready(previous);
    write_status(ctx, &pipeline.metadata, previous, next).await?;
    if became_ready {
        let note = format!("all {} units are ready", plan.units.len());
        super::context::publish(ctx, &pipeline.metadata, EventType::Normal, "Ready", note).await;
    }
    Ok(())
}

fn is_ready(status: Option<&PipelineStatus>) -> bool {
    status
        .and_then(|s| status::condition(s, status::READY))
        .is_some_and(|c| c.status == "True")
}

/// Writes the status if it must be written now (see `status::needs_write`); returns whether it did.
async fn write_status(
    ctx: &Context,
    meta: &ObjectMeta,
    previous: Option<&PipelineStatus>,
    next: PipelineStatus,
) -> Result<bool, StatusError> {
    let object_key = keys::pipeline(meta);
    let since = ctx.status_written(&object_key);
    if !status::needs_write(previous, &next, since) {
        return Ok(false);
    }
    let api: Api<PipelineObject> = Api::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    // Server-side apply of the status needs the object's type, or the API server cannot tell what it is.
    let patch = json!({
        "apiVersion": Pipeline::api_version(&()),
        "kind": Pipeline::kind(&()),
        "status": next,
    });
    api.patch_status(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(StatusError::Write)?;
    ctx.mark_status_written(&object_key);
    ctx.metrics.status_written();
    Ok(true)
}

/// The one place where a failure reaches the Pipeline: its conditions, a Warning Event when they
/// change, and the error metric.
async fn report(
    ctx: &Context,
    meta: &ObjectMeta,
    previous: Option<&PipelineStatus>,
    error: &Error,
) {
    ctx.metrics.count("error");
    ctx.metrics.error(error.metric_label());
    let Some(reason) = error.condition_reason() else {
        tracing::info!(pipeline = %keys::pipeline(meta), "{}", super::errors::error_chain(error));
        return;
    };
    let problems = error.problems();
    let outcome = match error {
        Error::Validate(_) => Outcome::Invalid {
            problems: problems.clone(),
        },
        other => Outcome::Failed {
            reason,
            message: problems.join("; "),
            retrying: other.next() == Next::Retry,
        },
    };
    let observation = Observation {
        generation: meta.generation,
        outcome,
        units: Vec::new(),
        edges: Vec::new(),
        pause: PauseState::Running,
        dead_letter_subject: String::new(),
        // Not written: a failed reconcile keeps what the status had of them.
        epochs: Default::default(),
        migration: Default::default(),
    };
    let next = status::compute(previous, &observation, &super::context::now());
    let changed = status::condition(&next, status::READY).map(|c| (&c.reason, &c.message))
        != previous
            .and_then(|p| status::condition(p, status::READY))
            .map(|c| (&c.reason, &c.message));
    if let Err(e) = write_status(ctx, meta, previous, next).await {
        tracing::warn!(pipeline = %keys::pipeline(meta), "{e}");
    }
    if changed {
        super::context::publish(ctx, meta, EventType::Warning, reason, problems.join("; ")).await;
    }
}

/// One Event per kind of change, naming the objects, rather than one per object.
async fn announce(ctx: &Context, meta: &ObjectMeta, applied: &Applied) {
    for (reason, objects) in [
        ("Created", &applied.created),
        ("Updated", &applied.updated),
        ("Deleted", &applied.deleted),
    ] {
        if !objects.is_empty() {
            let note = if reason == "Deleted" {
                format!(
                    "{}: their units are no longer in the spec",
                    objects.join(", ")
                )
            } else {
                objects.join(", ")
            };
            super::context::publish(ctx, meta, EventType::Normal, reason, note).await;
        }
    }
}

/// Adds the finalizer, guarded by the object's resourceVersion so that a concurrent change is not lost.
async fn ensure_finalizer(ctx: &Context, meta: &ObjectMeta) -> Result<(), FinalizerError> {
    let mut finalizers = meta.finalizers.clone().unwrap_or_default();
    if finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    finalizers.push(FINALIZER.to_string());
    set_finalizers(ctx, meta, finalizers)
        .await
        .map_err(FinalizerError::Add)
}

/// A merge patch of the finalizers that carries the resourceVersion they were read at: the API server
/// refuses it (409) if the object changed meanwhile, and the reconcile runs again.
async fn set_finalizers(
    ctx: &Context,
    meta: &ObjectMeta,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    let patch =
        json!({"metadata": {"resourceVersion": meta.resource_version, "finalizers": finalizers}});
    let api: Api<PipelineObject> = Api::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    api.patch(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// A deleted Pipeline: clean its data up, then let it go.
async fn finalize(
    ctx: &Context,
    meta: &ObjectMeta,
    spec: Option<&PipelineSpec>,
) -> Result<Action, Error> {
    let finalizers = meta.finalizers.clone().unwrap_or_default();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    cleanup::cleanup(ctx, meta, spec).await?;
    let rest = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
    match set_finalizers(ctx, meta, rest).await {
        Ok(()) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(FinalizerError::Remove(e).into()),
    }
    ctx.forget(meta);
    Ok(Action::await_change())
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
    fn a_backlog_is_looked_at_soon_and_an_idle_pipeline_seldom() {
        assert_eq!(next_look(false, false, 509), BACKLOG_REFRESH);
        assert_eq!(next_look(false, true, 1), BACKLOG_REFRESH);
        assert_eq!(next_look(false, true, 0), REFRESH_SWITCHERS);
        assert_eq!(next_look(false, false, 0), REFRESH);
        assert_eq!(next_look(true, false, 509), PAUSE_CHECK);
        assert!(BACKLOG_REFRESH < REFRESH_SWITCHERS);
    }
}
