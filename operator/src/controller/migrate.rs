//! An edit of a running Pipeline carried out step by step, when applying it at once could lose or
//! double a message (`switchyard_crds::migration` plans the steps; `switchyard run --watch` takes the
//! same ones). The migration lives in the status: its target spec, the epochs it leads to and the
//! steps, with how many are done, so an operator that restarts goes on where the last one was. Each
//! step can be done again safely. A later edit waits for the migration in progress.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};
use switchyard_crds::migration::{self, Migration, Step, UnitState};
use switchyard_crds::unit::UnitConfig;
use switchyard_crds::{MigrationStatus, Pipeline, PipelineSpec};
use switchyard_platform::admin::{self, AdminError};

use super::apply::{self, Applied};
use super::context::Context;
use super::status::{MigrationState, MIGRATION_REFUSED};
use crate::plan::{self, Plan};

/// How soon a migration that waits is looked at again.
pub const MIGRATION_CHECK: Duration = Duration::from_secs(2);
/// How soon a refused edit is looked at again: the messages it would drop may be gone by then.
pub const REFUSED_RECHECK: Duration = Duration::from_secs(30);
/// Steps one reconcile carries out at most before it writes the status.
const STEPS_PER_RECONCILE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read ConfigMap {name} of a running unit: {source}")]
    Read {
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("ConfigMap {name} holds no unit configuration this operator can read ({reason}); delete it to have it made again")]
    Config { name: String, reason: String },
    #[error("the migration in the status cannot be read ({0}); remove status.migration to plan the edit again")]
    Plan(String),
    #[error("the spec the migration leads to no longer plans: {0}")]
    Target(String),
    #[error("{step}: {source}")]
    Nats {
        step: String,
        #[source]
        source: AdminError,
    },
    #[error("{step}: cannot delete {kind} {name}: {source}")]
    Delete {
        step: String,
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
}

/// What the status keeps of a migration for the operator: the target and the steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    spec: PipelineSpec,
    epochs: BTreeMap<String, u32>,
    steps: Vec<Step>,
}

/// What a reconcile did about migrations.
pub enum Migrating {
    /// None needed: the reconcile applies the spec as usual.
    No,
    /// The reconcile is the migration's: the status to write, and when to look again.
    Yes(Box<Taken>),
}

/// What a reconcile that is the migration's did.
pub struct Taken {
    pub state: MigrationState,
    pub epochs: BTreeMap<String, u32>,
    pub plan: Plan,
    pub applied: Applied,
    pub again: Duration,
}

/// Begins an edit that needs steps, or carries on the one in progress.
pub async fn reconcile(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    js: &async_nats::jetstream::Context,
) -> Result<Migrating, MigrateError> {
    let running_epochs = pipeline
        .status
        .as_ref()
        .map(|s| s.epochs.clone())
        .unwrap_or_default();
    if let Some(status) = pipeline.status.as_ref().and_then(|s| s.migration.clone()) {
        return carry_on(ctx, pipeline, js, status).await;
    }
    let Some(running) = running_units(ctx, pipeline, plan).await? else {
        return Ok(Migrating::No);
    };
    // The plan is laid out at the running epochs; the planner starts from plain subjects.
    let fresh = plan::plan(&without_epochs(pipeline), &ctx.settings)
        .map_err(|p| MigrateError::Target(describe(&p)))?;
    let desired_plain: Vec<UnitState> = fresh
        .units
        .iter()
        .map(|u| UnitState {
            config: u.config.clone(),
            pod: BTreeMap::new(),
        })
        .collect();
    let policy = switchyard_crds::migration::Policy::of(&pipeline.spec);
    let migration = migration::plan(&running, &desired_plain, policy);
    if !migration.refused.is_empty() {
        let reason = format!(
            "the edit is not applied and the Pipeline runs as it was: {}",
            migration.refused.join("; ")
        );
        return Ok(refused(ctx, pipeline, plan, reason, running_epochs).await);
    }
    if !migration.is_stepwise() {
        return Ok(Migrating::No);
    }
    if let Some(reason) = refusal(js, plan, &migration, policy).await? {
        return Ok(refused(ctx, pipeline, plan, reason, running_epochs).await);
    }
    let status = begin(ctx, pipeline, &migration).await?;
    carry_on(ctx, pipeline, js, status).await
}

/// An edit refused (it would lose messages, or the server cannot do it): the units keep running
/// as they are, and the reason is said once as an Event.
async fn refused(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    reason: String,
    running_epochs: BTreeMap<String, u32>,
) -> Migrating {
    // Said once: the edit is looked at again every REFUSED_RECHECK, and each look would repeat it.
    let said = pipeline
        .status
        .as_ref()
        .and_then(|s| super::status::condition(s, super::status::PROGRESSING))
        .is_some_and(|c| c.reason == MIGRATION_REFUSED && c.message == reason);
    if !said {
        super::context::publish(
            ctx,
            &pipeline.metadata,
            EventType::Warning,
            MIGRATION_REFUSED,
            reason.clone(),
        )
        .await;
    }
    Migrating::Yes(Box::new(Taken {
        state: MigrationState::Refused { reason },
        epochs: running_epochs,
        plan: plan.clone(),
        applied: Applied::default(),
        again: REFUSED_RECHECK,
    }))
}

/// The status that starts a migration: its steps, and the plan they lead to (kept in the status,
/// so that an operator restarted halfway carries on the same steps); announced as an Event.
async fn begin(
    ctx: &Context,
    pipeline: &Pipeline,
    migration: &migration::Migration,
) -> Result<MigrationStatus, MigrateError> {
    let configs: Vec<UnitConfig> = migration.target.iter().map(|u| u.config.clone()).collect();
    let stored = Stored {
        spec: pipeline.spec.clone(),
        epochs: migration::epochs(&configs),
        steps: migration.steps.clone(),
    };
    let status = MigrationStatus {
        generation: pipeline.metadata.generation.unwrap_or_default(),
        done: 0,
        steps: migration.steps.iter().map(|s| s.to_string()).collect(),
        started_at: Some(super::context::now()),
        plan: serde_json::to_value(&stored).map_err(|e| MigrateError::Plan(e.to_string()))?,
    };
    super::context::publish(
        ctx,
        &pipeline.metadata,
        EventType::Normal,
        "Migrating",
        format!(
            "generation {} is carried out in {} steps: {}",
            status.generation,
            status.steps.len(),
            status.steps.join("; ")
        ),
    )
    .await;
    Ok(status)
}

/// Carries the migration on as far as it goes without waiting.
async fn carry_on(
    ctx: &Context,
    pipeline: &Pipeline,
    js: &async_nats::jetstream::Context,
    mut status: MigrationStatus,
) -> Result<Migrating, MigrateError> {
    let stored: Stored = serde_json::from_value(status.plan.clone())
        .map_err(|e| MigrateError::Plan(e.to_string()))?;
    let target = target_plan(ctx, pipeline, &stored)?;
    let mut applied = Applied::default();
    let mut waiting = None;
    for _ in 0..STEPS_PER_RECONCILE {
        let Some(step) = stored.steps.get(status.done as usize) else {
            break;
        };
        match take(ctx, pipeline, &target, js, step, &mut applied).await? {
            None => status.done += 1,
            Some(what) => {
                waiting = Some(what);
                break;
            }
        }
    }
    if status.done as usize >= stored.steps.len() {
        let took = status
            .started_at
            .as_ref()
            .map(|t| {
                let now = super::context::now();
                (now.0.as_second() - t.0.as_second()).max(0)
            })
            .unwrap_or(0);
        super::context::publish(
            ctx,
            &pipeline.metadata,
            EventType::Normal,
            "Migrated",
            format!(
                "generation {} carried out in {} steps ({took}s)",
                status.generation,
                stored.steps.len()
            ),
        )
        .await;
        return Ok(Migrating::Yes(Box::new(Taken {
            state: MigrationState::None,
            epochs: stored.epochs.clone(),
            plan: target,
            applied,
            again: Duration::ZERO,
        })));
    }
    Ok(Migrating::Yes(Box::new(Taken {
        state: MigrationState::Migrating { status, waiting },
        epochs: pipeline
            .status
            .as_ref()
            .map(|s| s.epochs.clone())
            .unwrap_or_default(),
        plan: target,
        applied,
        again: MIGRATION_CHECK,
    })))
}

/// Takes one step, or says what it waits for (every step can be taken again).
async fn take(
    ctx: &Context,
    pipeline: &Pipeline,
    target: &Plan,
    js: &async_nats::jetstream::Context,
    step: &Step,
    applied: &mut Applied,
) -> Result<Option<String>, MigrateError> {
    let stream = &target.nats.stream.name;
    let nats = |source| MigrateError::Nats {
        step: step.to_string(),
        source,
    };
    let unit_of = |name: &str| target.units.iter().find(|u| u.name == name);
    Ok(match step {
        Step::Read { consumer, .. } => {
            admin::put_consumer(js, stream, consumer)
                .await
                .map_err(nats)?;
            None
        }
        Step::Start { unit } | Step::Rescale { unit, .. } => {
            if let Some(unit) = unit_of(unit) {
                apply::unit_objects(ctx, pipeline, target, unit, applied).await?;
            }
            None
        }
        Step::Roll { unit, .. } => {
            let Some(planned) = unit_of(unit) else {
                return Ok(None);
            };
            let deployment = apply::unit_objects(ctx, pipeline, target, planned, applied).await?;
            (!super::observe::rollout(&deployment).old_gone)
                .then(|| format!("the pods of {unit} from before the edit to finish and go"))
        }
        Step::Drain { unit } => match admin::queue_of(js, stream, unit).await.map_err(nats)? {
            // Gone: a try of the steps that followed removed it before the status said so. A
            // join finishes the items it waits on (their parts are acknowledged) before it goes.
            None | Some(0) => match admin::join_waiting(js, stream, unit).await.map_err(nats)? {
                None | Some(0) => None,
                Some(n) => Some(format!("the {n} items join {unit} waits on")),
            },
            Some(n) => Some(format!("the {n} messages in the queue of {unit}")),
        },
        Step::Remove { unit } => {
            let name = plan::object_name(&target.pipeline, unit);
            let gone = delete(ctx, &target.namespace, &name, step, applied).await?;
            if gone {
                admin::delete_consumer(js, stream, unit)
                    .await
                    .map_err(nats)?;
                None
            } else {
                Some(format!("the pods of {unit} to finish and go"))
            }
        }
        Step::AwaitEmpty { subject, readers } => {
            match admin::messages_on(js, stream, subject)
                .await
                .map_err(nats)?
            {
                0 => None,
                n => Some(format!(
                    "{} to read the {n} messages left on {subject}",
                    readers.join(", ")
                )),
            }
        }
    })
}

/// Deletes a unit's Deployment (its pods first: foreground) and ConfigMap; true once they are gone.
async fn delete(
    ctx: &Context,
    namespace: &str,
    name: &str,
    step: &Step,
    applied: &mut Applied,
) -> Result<bool, MigrateError> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let failed = |kind, source| MigrateError::Delete {
        step: step.to_string(),
        kind,
        name: name.to_string(),
        source: Box::new(source),
    };
    let still_there = match deployments.get_opt(name).await {
        Ok(found) => found,
        Err(source) => return Err(failed("Deployment", source)),
    };
    if let Some(deployment) = still_there {
        if deployment.metadata.deletion_timestamp.is_none() {
            match deployments.delete(name, &DeleteParams::foreground()).await {
                Ok(_) => applied.deleted.push(format!("Deployment {name}")),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(source) => return Err(failed("Deployment", source)),
            }
        }
        return Ok(false);
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    match config_maps.delete(name, &DeleteParams::background()).await {
        Ok(_) => applied.deleted.push(format!("ConfigMap {name}")),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(source) => return Err(failed("ConfigMap", source)),
    }
    Ok(true)
}

/// Without drain: what is there to be dropped, unless loss is allowed.
async fn refusal(
    js: &async_nats::jetstream::Context,
    plan: &Plan,
    migration: &Migration,
    policy: migration::Policy,
) -> Result<Option<String>, MigrateError> {
    if migration.discards.is_empty() || policy.allow_loss {
        return Ok(None);
    }
    let held = admin::held_in(js, &plan.nats.stream.name, &migration.discards)
        .await
        .map_err(|source| MigrateError::Nats {
            step: "count what the edit would drop".to_string(),
            source,
        })?;
    Ok((!held.is_empty()).then(|| {
        format!(
            "the edit is not applied and the Pipeline runs as it was: {}",
            migration::refusal(&held)
        )
    }))
}

/// The units that run, read back from their ConfigMaps, in flow order; None when there is nothing
/// to migrate from (a new Pipeline) or what runs is what the plan says.
async fn running_units(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
) -> Result<Option<Vec<UnitState>>, MigrateError> {
    let uid = pipeline.metadata.uid.clone().unwrap_or_default();
    let (_, config_maps) = apply::owned_names(ctx, plan, &uid).await?;
    if config_maps.is_empty() {
        return Ok(None);
    }
    let wanted: Vec<String> = plan
        .units
        .iter()
        .map(|u| plan::object_name(&plan.pipeline, &u.name))
        .collect();
    let mut same_names = config_maps.clone();
    same_names.sort();
    let mut wanted_sorted = wanted.clone();
    wanted_sorted.sort();
    let all_current = same_names == wanted_sorted
        && plan.units.iter().all(|u| {
            let name = plan::object_name(&plan.pipeline, &u.name);
            ctx.caches
                .config_map(&plan.namespace, &name)
                .is_some_and(|c| apply::config_map_current(&c.metadata, &u.config_map))
        });
    if all_current && ctx.caches.live {
        return Ok(None);
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let mut units = Vec::new();
    for name in &config_maps {
        let found = api
            .get_opt(name)
            .await
            .map_err(|source| MigrateError::Read {
                name: name.clone(),
                source: Box::new(source),
            })?;
        let Some(config_map) = found else { continue };
        let text = config_map
            .data
            .as_ref()
            .and_then(|d| d.get(plan::CONFIG_KEY))
            .ok_or_else(|| MigrateError::Config {
                name: name.clone(),
                reason: format!("no {}", plan::CONFIG_KEY),
            })?;
        let config: UnitConfig = serde_json::from_str(text).map_err(|e| MigrateError::Config {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        units.push(UnitState {
            config,
            pod: BTreeMap::new(),
        });
    }
    Ok(Some(migration::in_flow_order(units)))
}

/// The plan the migration leads to: its stored spec, at the epochs it leads to.
fn target_plan(ctx: &Context, pipeline: &Pipeline, stored: &Stored) -> Result<Plan, MigrateError> {
    let mut target = pipeline.clone();
    target.spec = stored.spec.clone();
    let status = target.status.get_or_insert_with(Default::default);
    status.epochs = stored.epochs.clone();
    plan::plan(&target, &ctx.settings).map_err(|p| MigrateError::Target(describe(&p)))
}

fn without_epochs(pipeline: &Pipeline) -> Pipeline {
    let mut plain = pipeline.clone();
    if let Some(status) = plain.status.as_mut() {
        status.epochs.clear();
    }
    plain
}

fn describe(problems: &[switchyard_crds::problem::Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
