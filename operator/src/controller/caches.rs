//! What the operator keeps of the cluster between reconciles: watch caches of Pipelines, of the
//! Deployments and ConfigMaps it manages, trimmed to what it reads, so that a reconcile or an autoscaler
//! pass asks the API server nothing when nothing changed, and memory stays small with many Pipelines.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplateSpec};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use switchyard_crds::Pipeline;

/// Pipelines as watched: one that cannot be decoded is kept as its metadata and the decode error.
pub type PipelineObject = DeserializeGuard<Pipeline>;

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
    use kube::Resource;
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
}
