//! The CustomResourceDefinition as the API server receives it.
//!
//! kube's derive gives the starting point; three things are then fixed that only a real API server
//! objects to (see shared notes of 2026-11-25):
//! - nested stages are typed level by level down to [`MAX_STAGE_DEPTH`], because a structural schema
//!   cannot refer to itself, and an open (`x-kubernetes-preserve-unknown-fields`) level would let any
//!   typo or wrong type into etcd, where it breaks decoding later;
//! - schemars' unsigned formats (`uint32`, …), which the API server warns about, are dropped (the
//!   `minimum: 0` beside them already says what they meant);
//! - a `default` that its own schema forbids (`default: []` beside `minItems: 1`) is dropped: the API
//!   server validates defaults and rejects the whole CRD over it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::CustomResourceExt;
use serde_json::{json, Map, Value};

use crate::Pipeline;

/// How deep stages nest: a top-level stage is level 1, a stage in its group level 2, and so on.
pub const MAX_STAGE_DEPTH: usize = 4;
/// Most stages in one nested group. Kubernetes estimates the cost of the CEL rules on every level from
/// these bounds, so they keep the CRD within the API server's budget.
pub const MAX_STAGES_PER_GROUP: usize = 16;
/// Most top-level stages.
pub const MAX_TOP_LEVEL_STAGES: usize = 64;

/// Formats the API server recognises for integers and numbers; schemars' others are dropped.
const KNOWN_NUMBER_FORMATS: [&str; 4] = ["int32", "int64", "float", "double"];

/// The Pipeline CRD, ready to install.
pub fn crd() -> Result<CustomResourceDefinition, serde_json::Error> {
    let mut crd = Pipeline::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let mut value = serde_json::to_value(&*schema)?;
        fix_schema(&mut value);
        *schema = serde_json::from_value::<JSONSchemaProps>(value)?;
    }
    Ok(crd)
}

fn fix_schema(root: &mut Value) {
    drop_unknown_formats_and_impossible_defaults(root);
    let Some(stages) = root.pointer_mut("/properties/spec/properties/stages") else {
        return;
    };
    stages["maxItems"] = json!(MAX_TOP_LEVEL_STAGES);
    if let Some(stage) = stages.get("items").cloned() {
        stages["items"] = unrolled_stage(&stage, 1);
    }
}

/// The schema of a stage at `depth`, with its nested `stages` typed down to the deepest level, where a
/// group may hold no stages.
fn unrolled_stage(stage: &Value, depth: usize) -> Value {
    let mut stage = stage.clone();
    let nested = if depth < MAX_STAGE_DEPTH {
        json!({
            "type": "array",
            "description": format!(
                "Nested stages, run in order in one process (same fields as a stage; at most {MAX_STAGES_PER_GROUP} in a group, {MAX_STAGE_DEPTH} levels deep)."
            ),
            "maxItems": MAX_STAGES_PER_GROUP,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "items": unrolled_stage(&stage, depth + 1),
        })
    } else {
        json!({
            "type": "array",
            "description": format!("Stages nest at most {MAX_STAGE_DEPTH} levels deep: a group at this level cannot hold stages."),
            "maxItems": 0,
            "items": {"type": "object"},
        })
    };
    if let Some(properties) = stage.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert("stages".to_string(), nested);
    }
    stage
}

fn drop_unknown_formats_and_impossible_defaults(node: &mut Value) {
    match node {
        Value::Object(map) => {
            drop_unknown_format(map);
            drop_impossible_default(map);
            for child in map.values_mut() {
                drop_unknown_formats_and_impossible_defaults(child);
            }
        }
        Value::Array(items) => {
            for child in items {
                drop_unknown_formats_and_impossible_defaults(child);
            }
        }
        _ => {}
    }
}

/// Drops a format the API server does not know; an unsigned one leaves its bound behind, so that the
/// API server refuses what the operator could not decode.
fn drop_unknown_format(map: &mut Map<String, Value>) {
    let numeric = matches!(
        map.get("type").and_then(Value::as_str),
        Some("integer" | "number")
    );
    let format = map
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !numeric || format.is_empty() || KNOWN_NUMBER_FORMATS.contains(&format.as_str()) {
        return;
    }
    map.remove("format");
    let maximum = match format.as_str() {
        "uint8" => Some(u64::from(u8::MAX)),
        "uint16" => Some(u64::from(u16::MAX)),
        "uint32" => Some(u64::from(u32::MAX)),
        _ => None,
    };
    if let Some(maximum) = maximum {
        let tighter = map
            .get("maximum")
            .and_then(Value::as_f64)
            .is_some_and(|m| m <= maximum as f64);
        if !tighter {
            map.insert("maximum".to_string(), json!(maximum));
        }
    }
}

fn drop_impossible_default(map: &mut Map<String, Value>) {
    let min_items = map.get("minItems").and_then(Value::as_u64).unwrap_or(0);
    let default_len = map.get("default").and_then(Value::as_array).map(Vec::len);
    if default_len.is_some_and(|len| (len as u64) < min_items) {
        map.remove("default");
    }
}

/// The CustomResourceDefinition as YAML, exactly as checked in under `crds/` and in the Helm chart.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    let crd = crd().map_err(<serde_norway::Error as serde::ser::Error>::custom)?;
    let body = serde_norway::to_string(&crd)?;
    Ok(format!(
        "# Generated from crds/src/pipeline.rs by `switchyard crd`; do not edit by hand.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        let crd = crd().unwrap();
        serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone()
    }

    fn walk<'a>(node: &'a Value, found: &mut Vec<&'a Map<String, Value>>) {
        match node {
            Value::Object(map) => {
                found.push(map);
                map.values().for_each(|v| walk(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }

    #[test]
    fn no_node_has_a_format_the_api_server_does_not_know() {
        let schema = schema();
        let mut nodes = Vec::new();
        walk(&schema, &mut nodes);
        for node in nodes {
            if let Some(format) = node.get("format").and_then(Value::as_str) {
                assert!(
                    ["int32", "int64", "float", "double", "date-time", "byte"].contains(&format),
                    "format {format} left in {node:?}"
                );
            }
        }
    }

    #[test]
    fn no_default_breaks_its_own_schema() {
        let schema = schema();
        let mut nodes = Vec::new();
        walk(&schema, &mut nodes);
        for node in nodes {
            let min = node.get("minItems").and_then(Value::as_u64).unwrap_or(0);
            if let Some(default) = node.get("default").and_then(Value::as_array) {
                assert!(default.len() as u64 >= min, "{node:?}");
            }
        }
    }

    #[test]
    fn nested_stages_are_typed_down_to_the_deepest_level() {
        let schema = schema();
        let mut stage = &schema["properties"]["spec"]["properties"]["stages"]["items"];
        for depth in 1..MAX_STAGE_DEPTH {
            assert_eq!(
                stage["properties"]["timeout"]["type"], "string",
                "level {depth}"
            );
            assert!(stage.get("x-kubernetes-preserve-unknown-fields").is_none());
            assert!(
                stage["x-kubernetes-validations"].is_array(),
                "level {depth} keeps its rules"
            );
            stage = &stage["properties"]["stages"]["items"];
        }
        assert_eq!(stage["properties"]["concurrency"]["type"], "integer");
        assert_eq!(
            stage["properties"]["concurrency"]["maximum"].as_f64(),
            Some(f64::from(u32::MAX))
        );
        assert_eq!(stage["properties"]["stages"]["maxItems"], 0);
    }
}
