//! What the operator keeps of the cluster between reconciles: watch caches of Pipelines, of the
//! Deployments and ConfigMaps it manages, trimmed to what it reads, so that a reconcile or an autoscaler
//! pass asks the API server nothing when nothing changed, and memory stays small with many Pipelines.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplateSpec};
use kube::core::error_boundary::InvalidObject;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::Resource;
use switchyard_crds::Pipeline;

/// Pipelines as watched: one that cannot be decoded is kept as its metadata and the decode error,
/// which names the field (`spec.stages[0].concurrency: invalid value: …`). kube's own
/// `DeserializeGuard` does the same without the field, which leaves a person searching the spec.
#[derive(Clone, Debug)]
pub struct PipelineObject(pub Result<Pipeline, InvalidObject>);

impl<'de> serde::Deserialize<'de> for PipelineObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match serde_path_to_error::deserialize::<_, Pipeline>(&value) {
            Ok(pipeline) => Ok(PipelineObject(Ok(pipeline))),
            Err(error) => {
                // Its metadata must decode, or the object cannot be told apart from another.
                let metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
                    match value.get("metadata") {
                        Some(meta) => serde_json::from_value(meta.clone())
                            .map_err(<D::Error as serde::de::Error>::custom)?,
                        None => Default::default(),
                    };
                Ok(PipelineObject(Err(InvalidObject {
                    error: format!("{}: {}", error.path(), error.inner()),
                    metadata,
                })))
            }
        }
    }
}

impl Resource for PipelineObject {
    type DynamicType = ();
    type Scope = <Pipeline as Resource>::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Pipeline::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Pipeline::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Pipeline::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Pipeline::plural(dt)
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match &self.0 {
            Ok(pipeline) => pipeline.meta(),
            Err(invalid) => &invalid.metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match &mut self.0 {
            Ok(pipeline) => pipeline.meta_mut(),
            Err(invalid) => &mut invalid.metadata,
        }
    }
}

#[derive(Clone)]
pub struct Caches {
    pub pipelines: Store<PipelineObject>,
    pub deployments: Store<Deployment>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    /// The units' pods, trimmed to their labels and status: why they fail.
    pub pods: Store<Pod>,
    /// Watches fill these stores; when false, lookups fall back to asking the API server.
    pub live: bool,
}

impl Caches {
    /// Caches nothing fills: every lookup misses, so the reconcile asks the API server (tests that call
    /// the reconcile directly use these).
    pub fn empty() -> Caches {
        Caches {
            pipelines: reflector::store().0,
            deployments: reflector::store().0,
            config_maps: reflector::store().0,
            pods: reflector::store().0,
            live: false,
        }
    }

    pub fn deployment(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<Deployment>> {
        self.deployments
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The pods of one unit (none when the caches are not live: a reconcile without watches does
    /// not read pods).
    pub fn unit_pods(
        &self,
        namespace: &str,
        pipeline: &str,
        unit: &str,
    ) -> Vec<std::sync::Arc<Pod>> {
        use crate::plan::{LABEL_PIPELINE, LABEL_UNIT};
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                let labels = p.metadata.labels.as_ref();
                let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
                p.metadata.namespace.as_deref() == Some(namespace)
                    && label(LABEL_PIPELINE) == Some(pipeline)
                    && label(LABEL_UNIT) == Some(unit)
            })
            .collect()
    }

    pub fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<std::sync::Arc<PartialObjectMeta<ConfigMap>>> {
        self.config_maps
            .get(&ObjectRef::new(name).within(namespace))
    }
}

/// Drops what the operator never reads from a cached Deployment: the pod template (the desired one is
/// planned anew each time) and the field managers, which are most of an object's size.
pub fn trim_deployment(deployment: &mut Deployment) {
    deployment.metadata.managed_fields = None;
    if let Some(spec) = deployment.spec.as_mut() {
        spec.template = PodTemplateSpec::default();
    }
}

/// Keeps of a pod what [`super::observe::pod_failure`] reads: its name, labels and status.
pub fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    pod.spec = None;
}

pub fn trim_pipeline(pipeline: &mut PipelineObject) {
    let meta = pipeline.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

pub fn trim_metadata<K>(object: &mut PartialObjectMeta<K>) {
    object.metadata.managed_fields = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn a_trimmed_deployment_keeps_what_readiness_and_scaling_read() {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(3),
                template: PodTemplateSpec {
                    metadata: Some(Default::default()),
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        d.metadata.generation = Some(4);
        d.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        trim_deployment(&mut d);
        assert_eq!(d.metadata.generation, Some(4));
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
        assert!(d.metadata.managed_fields.is_none());
        assert!(d.spec.unwrap().template.metadata.is_none());
    }

    /// A Pipeline that does not decode said `invalid value: integer 99999999999, expected u32` and
    /// left the person to find which of its numbers that was.
    #[test]
    fn a_pipeline_that_cannot_be_decoded_names_the_field() {
        let object: PipelineObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "big", "namespace": "team", "generation": 3},
            "spec": {
                "sources": [{"name": "src", "generator": {}}],
                "stages": [{"name": "s", "passthrough": {}, "concurrency": 99_999_999_999u64}],
                "sinks": [{"name": "out", "log": {}}]
            }
        }))
        .unwrap();
        let Err(invalid) = &object.0 else {
            panic!("decoded a concurrency over u32");
        };
        assert_eq!(
            invalid.error,
            "spec.stages[0].concurrency: invalid value: integer `99999999999`, expected u32"
        );
        assert_eq!(object.meta().name.as_deref(), Some("big"));
        assert_eq!(object.meta().generation, Some(3));
    }
}
