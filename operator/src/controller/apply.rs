//! Apply: the Pipeline's stream and consumers in NATS, then each unit's ConfigMap and Deployment
//! (server-side apply, one field manager, owner references), and the pruning of units that left the spec.
//!
//! An object is sent only when it would change: each carries the hash of what was last applied, and an
//! object whose cached hash matches is left alone (a periodic resync re-sends everything, to repair
//! edits made behind the operator's back). An object that exists and belongs to anything but this
//! Pipeline is never touched: that is a `NameConflict`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use switchyard_crds::Pipeline;
use switchyard_platform::admin::AdminError;

use super::context::{Context, FIELD_MANAGER};
use super::keys;
use super::nats::{self, NatsError};
use super::resolve::namespace_terminating;
use crate::pause::PauseState;
use crate::plan::{self, Plan, UnitPlan, LABEL_PIPELINE};

/// Annotation on every applied object: the hash of what the operator last applied.
pub const ANNOTATION_APPLIED: &str = "switchyard.dev/applied-hash";
/// On a unit's Deployment while `spec.paused` holds it (at zero, or a source at zero while the others
/// drain).
pub const ANNOTATION_PAUSED: &str = "switchyard.dev/paused";
/// On a switcher's Deployment while paused: the replicas it had, which it gets back on resume.
pub const ANNOTATION_BEFORE_PAUSE: &str = "switchyard.dev/replicas-before-pause";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot set up the Pipeline's stream and consumers: {0}")]
    Nats(#[source] NatsError),
    /// The NATS it talks to cannot keep as many copies as `spec.nats.replicas` asks for.
    #[error(transparent)]
    Replicas(AdminError),
    #[error("{kind} {namespace}/{name} already exists and belongs to {owner}; the operator never takes over another's object: rename this Pipeline or the stage")]
    NameConflict {
        kind: &'static str,
        namespace: String,
        name: String,
        owner: String,
    },
    #[error("the API server refused {kind} {name}: {source}")]
    Refused {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("namespace {namespace} is being deleted: nothing more is created in it")]
    NamespaceTerminating { namespace: String },
}

/// Who an existing object belongs to, as far as this Pipeline is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    Absent,
    Ours,
    /// Someone else's, described for a person.
    Other(String),
}

/// Pure: who owns an object with `meta` (None: it does not exist), seen from the Pipeline `uid`.
pub fn ownership(meta: Option<&ObjectMeta>, uid: &str) -> Ownership {
    let Some(meta) = meta else {
        return Ownership::Absent;
    };
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    match controller {
        Some(r) if r.uid == uid => Ownership::Ours,
        Some(r) => Ownership::Other(format!("{} {}", r.kind, r.name)),
        None => Ownership::Other("no Pipeline (it was created by someone else)".to_string()),
    }
}

/// Pure: whether an existing object already holds what `hash` describes.
pub fn up_to_date(meta: &ObjectMeta, hash: &str) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_APPLIED))
        .is_some_and(|h| h == hash)
}

/// A stable hash of what is applied: the plan's checksum over its JSON.
fn hash_of(object: &impl Serialize) -> String {
    plan::checksum(&serde_json::to_string(object).unwrap_or_default())
}

fn annotate(meta: &mut ObjectMeta, hash: &str) {
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_APPLIED.to_string(), hash.to_string());
}

pub async fn nats_objects(
    js: &async_nats::jetstream::Context,
    plan: &Plan,
) -> Result<(), ApplyError> {
    // Replicas NATS cannot keep are this Pipeline's own problem, not NATS being unavailable: they
    // pass the time bound as a value and become their own error (and condition reason).
    let declared = nats::bounded("declaring the stream, bucket and consumers", async {
        match switchyard_platform::admin::apply(js, &plan.nats).await {
            Err(e @ AdminError::Replicas { .. }) => Ok(Err(e)),
            other => other.map(Ok),
        }
    })
    .await
    .map_err(ApplyError::Nats)?;
    declared.map_err(ApplyError::Replicas)
}

/// What applying changed, for Events, and every unit's Deployment as it now stands.
#[derive(Default)]
pub struct Applied {
    pub deployments: BTreeMap<String, Arc<Deployment>>,
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

/// The facts one reconcile's applies share.
struct Target<'a> {
    ctx: &'a Context,
    namespace: &'a str,
    pipeline: &'a str,
    uid: &'a str,
    resync: bool,
    checked_namespace: std::sync::atomic::AtomicBool,
}

pub async fn kubernetes_objects(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    pause: &PauseState,
) -> Result<Applied, ApplyError> {
    let uid = pipeline.metadata.uid.clone().unwrap_or_default();
    let target = Target::new(ctx, plan, &uid);
    let mut applied = Applied::default();
    for unit in &plan.units {
        let held = crate::pause::held_replicas(
            pause,
            unit.kind == switchyard_crds::topology::UnitType::Source,
        );
        let deployment = target.unit(unit, held, &mut applied).await?;
        applied.deployments.insert(unit.name.clone(), deployment);
    }
    let wanted: Vec<String> = plan
        .units
        .iter()
        .map(|u| plan::object_name(&plan.pipeline, &u.name))
        .collect();
    ctx.claims.release(&uid, &wanted);
    prune(ctx, pipeline, plan, &wanted, &mut applied).await?;
    Ok(applied)
}

/// Applies one unit's ConfigMap and Deployment, as a step of a migration does; nothing else is
/// touched.
pub async fn unit_objects(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    unit: &UnitPlan,
    applied: &mut Applied,
) -> Result<Arc<Deployment>, ApplyError> {
    let uid = pipeline.metadata.uid.clone().unwrap_or_default();
    Target::new(ctx, plan, &uid).unit(unit, None, applied).await
}

/// Whether a unit's ConfigMap, as the cache has it, holds what `desired` holds.
pub fn config_map_current(existing: &ObjectMeta, desired: &ConfigMap) -> bool {
    up_to_date(existing, &hash_of(&without_replicas(desired)))
}

impl<'a> Target<'a> {
    fn new(ctx: &'a Context, plan: &'a Plan, uid: &'a str) -> Target<'a> {
        Target {
            ctx,
            namespace: &plan.namespace,
            pipeline: &plan.pipeline,
            uid,
            resync: ctx.resyncs.due(uid),
            checked_namespace: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A unit's ConfigMap, then its Deployment.
    async fn unit(
        &self,
        unit: &UnitPlan,
        held: Option<i32>,
        applied: &mut Applied,
    ) -> Result<Arc<Deployment>, ApplyError> {
        let name = plan::object_name(self.pipeline, &unit.name);
        let config_map = match self.ctx.caches.config_map(self.namespace, &name) {
            Some(cached) => Some(cached.metadata.clone()),
            None => self.get::<ConfigMap>(&name).await?.map(|c| c.metadata),
        };
        self.apply(&name, unit.config_map.clone(), config_map, applied)
            .await?;
        self.deployment(unit, &name, held, applied).await
    }

    /// `held`: the replicas a pause holds the unit at.
    async fn deployment(
        &self,
        unit: &UnitPlan,
        name: &str,
        held: Option<i32>,
        applied: &mut Applied,
    ) -> Result<Arc<Deployment>, ApplyError> {
        // Not cached: one read serves the ownership check and, if nothing is sent, the status.
        let cached = match self.ctx.caches.deployment(self.namespace, name) {
            Some(cached) => Some(cached),
            None => self.get::<Deployment>(name).await?.map(Arc::new),
        };
        let mut desired = unit.deployment.clone();
        let running = cached
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas);
        let before_pause = cached
            .as_ref()
            .and_then(|d| d.metadata.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_BEFORE_PAUSE))
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(held) = held {
            // Marked, so that the hold changes what is applied (replicas alone do not); a switcher
            // also notes what it ran, to come back at.
            let annotations = desired
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            annotations.insert(ANNOTATION_PAUSED.to_string(), "true".to_string());
            if unit.is_switcher() {
                let had = before_pause
                    .or(running.filter(|r| *r > 0))
                    .unwrap_or(unit.replicas.min as i32);
                annotations.insert(ANNOTATION_BEFORE_PAUSE.to_string(), had.to_string());
            }
            if let Some(spec) = desired.spec.as_mut() {
                spec.replicas = Some(held);
            }
        } else if unit.is_switcher() {
            // The autoscaler owns a switcher's replicas: apply what it decided, or what it had before a
            // pause, or keep what runs.
            let decided = self
                .ctx
                .scale_record(&keys::unit(self.namespace, self.pipeline, &unit.name))
                .map(|r| r.desired as i32);
            let replicas = decided
                .or(before_pause)
                .or(running)
                .unwrap_or(unit.replicas.min as i32)
                .clamp(unit.replicas.min as i32, unit.replicas.max as i32);
            if let Some(spec) = desired.spec.as_mut() {
                spec.replicas = Some(replicas);
            }
        }
        let meta = cached.as_ref().map(|d| d.metadata.clone());
        match (self.apply(name, desired, meta, applied).await?, cached) {
            (Some(fresh), _) => Ok(Arc::new(fresh)),
            (None, Some(cached)) => Ok(cached),
            // Nothing is skipped that does not exist.
            (None, None) => Ok(Arc::default()),
        }
    }

    /// Applies `desired` unless the object is already current; returns the object if it was sent.
    /// `existing`: the object's metadata as the cache or a read found it (None: it does not exist).
    async fn apply<K>(
        &self,
        name: &str,
        mut desired: K,
        existing: Option<ObjectMeta>,
        applied: &mut Applied,
    ) -> Result<Option<K>, ApplyError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = kind_name::<K>();
        let hash = hash_of(&without_replicas(&desired));
        match ownership(existing.as_ref(), self.uid) {
            Ownership::Other(owner) if owner == format!("Pipeline {}", self.pipeline) => {
                // A Pipeline deleted and created again: the old one's objects are still being
                // garbage-collected, and the reconcile looks again once they are gone.
                let owner = format!(
                    "an earlier Pipeline named {}, whose objects Kubernetes is still deleting",
                    self.pipeline
                );
                return Err(self.conflict(kind, name, owner));
            }
            Ownership::Other(owner) => return Err(self.conflict(kind, name, owner)),
            Ownership::Absent => self.refuse_if_terminating().await?,
            Ownership::Ours => {}
        }
        self.ctx
            .claims
            .claim(kind, self.namespace, name, self.uid, self.pipeline)
            .map_err(|owner| self.conflict(kind, name, owner.to_string()))?;
        if existing.as_ref().is_some_and(|m| up_to_date(m, &hash)) && !self.resync {
            return Ok(None);
        }
        annotate(desired.meta_mut(), &hash);
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let after = api
            .patch(name, &params, &Patch::Apply(&desired))
            .await
            .map_err(|source| self.refused(kind, name, source))?;
        self.ctx.metrics.applied(kind);
        let note = format!("{kind} {name}");
        match existing {
            None => applied.created.push(note),
            Some(before) if before.resource_version != after.meta().resource_version => {
                applied.updated.push(note)
            }
            Some(_) => {}
        }
        Ok(Some(after))
    }

    async fn get<K>(&self, name: &str) -> Result<Option<K>, ApplyError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        api.get_opt(name)
            .await
            .map_err(|source| self.refused(kind_name::<K>(), name, source))
    }

    /// Before the first creation of a reconcile: a namespace being deleted gets nothing new.
    async fn refuse_if_terminating(&self) -> Result<(), ApplyError> {
        if self
            .checked_namespace
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        if namespace_terminating(self.ctx, self.namespace).await {
            return Err(ApplyError::NamespaceTerminating {
                namespace: self.namespace.to_string(),
            });
        }
        Ok(())
    }

    fn conflict(&self, kind: &'static str, name: &str, owner: String) -> ApplyError {
        ApplyError::NameConflict {
            kind,
            namespace: self.namespace.to_string(),
            name: name.to_string(),
            owner,
        }
    }

    fn refused(&self, kind: &'static str, name: &str, source: kube::Error) -> ApplyError {
        if is_namespace_terminating(&source) {
            return ApplyError::NamespaceTerminating {
                namespace: self.namespace.to_string(),
            };
        }
        refused(kind, name, source)
    }
}

/// A switcher's replicas are the autoscaler's: they do not make the Deployment differ from its plan.
fn without_replicas<K: Serialize>(object: &K) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(spec) = value.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.remove("replicas");
    }
    value
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "ConfigMap" => "ConfigMap",
        _ => "object",
    }
}

/// The API server's answer to a create in a namespace being deleted.
pub fn is_namespace_terminating(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == 403
                && (status.message.contains("because it is being terminated")
                    || status.details.as_ref().is_some_and(|d| {
                        d.causes.iter().any(|c| c.reason == "NamespaceTerminating")
                    }))
        }
        _ => false,
    }
}

/// Deletes the Deployments and ConfigMaps of this Pipeline whose units left the spec.
async fn prune(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    wanted: &[String],
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    let uid = pipeline.metadata.uid.clone().unwrap_or_default();
    let (deployments, config_maps) = owned_names(ctx, plan, &uid).await?;
    delete_unwanted::<Deployment>(ctx, &plan.namespace, &deployments, wanted, applied).await?;
    delete_unwanted::<ConfigMap>(ctx, &plan.namespace, &config_maps, wanted, applied).await
}

async fn delete_unwanted<K>(
    ctx: &Context,
    namespace: &str,
    names: &[String],
    wanted: &[String],
    applied: &mut Applied,
) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let kind = kind_name::<K>();
    for name in names.iter().filter(|n| !wanted.contains(n)) {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(refused(kind, name, source)),
        }
        applied.deleted.push(format!("{kind} {name}"));
    }
    Ok(())
}

fn refused(kind: &'static str, name: &str, source: kube::Error) -> ApplyError {
    ApplyError::Refused {
        kind,
        name: name.to_string(),
        source,
    }
}

fn names_of<'a, K: Resource + 'a>(
    objects: impl Iterator<Item = &'a K>,
    ours: &dyn Fn(&ObjectMeta) -> bool,
) -> Vec<String> {
    objects
        .filter(|o| ours(o.meta()))
        .filter_map(|o| o.meta().name.clone())
        .collect()
}

/// Names of the Deployments and ConfigMaps this Pipeline owns: from the caches when they run, else
/// listed by label (the label alone could be anybody's, so ownership is checked too).
pub(super) async fn owned_names(
    ctx: &Context,
    plan: &Plan,
    uid: &str,
) -> Result<(Vec<String>, Vec<String>), ApplyError> {
    let ours = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(plan.namespace.as_str())
            && ownership(Some(meta), uid) == Ownership::Ours
    };
    if ctx.caches.live {
        let deployments = ctx.caches.deployments.state();
        let config_maps = ctx.caches.config_maps.state();
        return Ok((
            names_of(deployments.iter().map(|d| d.as_ref()), &ours),
            names_of(config_maps.iter().map(|c| c.as_ref()), &ours),
        ));
    }
    let selector = ListParams::default().labels(&format!("{LABEL_PIPELINE}={}", plan.pipeline));
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let listed_deployments = deployments
        .list(&selector)
        .await
        .map_err(|source| refused("Deployment", "(list)", source))?;
    let listed_config_maps = config_maps
        .list(&selector)
        .await
        .map_err(|source| refused("ConfigMap", "(list)", source))?;
    Ok((
        names_of(listed_deployments.items.iter(), &ours),
        names_of(listed_config_maps.items.iter(), &ours),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn owned_by(uid: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "switchyard.dev/v1alpha1".into(),
                kind: "Pipeline".into(),
                name: name.into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn another_pipelines_object_is_a_conflict_that_names_it() {
        assert_eq!(ownership(None, "u1"), Ownership::Absent);
        assert_eq!(ownership(Some(&owned_by("u1", "a")), "u1"), Ownership::Ours);
        assert_eq!(
            ownership(Some(&owned_by("u2", "a-b")), "u1"),
            Ownership::Other("Pipeline a-b".into())
        );
        assert!(matches!(
            ownership(Some(&ObjectMeta::default()), "u1"),
            Ownership::Other(_)
        ));
    }

    #[test]
    fn an_object_is_current_when_its_hash_matches() {
        let mut meta = owned_by("u1", "a");
        assert!(!up_to_date(&meta, "abc"));
        annotate(&mut meta, "abc");
        assert!(up_to_date(&meta, "abc"));
        assert!(!up_to_date(&meta, "abd"));
    }

    #[test]
    fn replicas_do_not_change_a_deployments_hash() {
        let a = serde_json::json!({"spec": {"replicas": 1, "template": {"x": 1}}});
        let b = serde_json::json!({"spec": {"replicas": 7, "template": {"x": 1}}});
        let c = serde_json::json!({"spec": {"replicas": 7, "template": {"x": 2}}});
        assert_eq!(
            hash_of(&without_replicas(&a)),
            hash_of(&without_replicas(&b))
        );
        assert_ne!(
            hash_of(&without_replicas(&b)),
            hash_of(&without_replicas(&c))
        );
    }
}
