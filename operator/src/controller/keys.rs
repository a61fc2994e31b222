//! How the operator's maps (failures, status writes, scale records, unit reports) name a Pipeline and
//! a unit: one spelling for every room that keeps or reads them, in a room that imports none of them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `namespace/name` of a Pipeline.
pub fn pipeline(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// `namespace/pipeline/unit` of one of a Pipeline's units.
pub fn unit(namespace: &str, pipeline: &str, unit: &str) -> String {
    format!("{namespace}/{pipeline}/{unit}")
}
