//! The CustomResourceDefinition: its checked-in copies are current, its schema is one the API server
//! accepts (structural), and its CEL rules accept every example and reject what they should.

use std::path::Path;

use serde_json::Value;
use switchyard_crds::validate::parse_pipeline;
use switchyard_crds::{crd_yaml, Pipeline};

const COPIES: [&str; 2] = [
    "switchyard.dev_pipelines.yaml",
    "../charts/switchyard/crds/switchyard.dev_pipelines.yaml",
];

#[test]
fn the_checked_in_copies_of_the_crd_are_current() {
    let generated = crd_yaml().unwrap();
    for copy in COPIES {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(copy);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} is stale: run `cargo run -q --bin switchyard -- crd > crds/switchyard.dev_pipelines.yaml && cp crds/switchyard.dev_pipelines.yaml charts/switchyard/crds/`",
            path.display()
        );
    }
}

fn schema() -> Value {
    let crd: Value = serde_norway::from_str(&crd_yaml().unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The rules of a structural schema that matter for what schemars and kube generate: every node has a
/// type (unless it preserves unknown fields or is int-or-string), `additionalProperties` is never false
/// and never beside `properties`, quantifiers carry no types or defaults, no `$ref`, list maps key on
/// required fields.
fn check_structural(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: not a schema object"));
        return;
    };
    let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !obj.contains_key("type") && !preserves && !int_or_string {
        problems.push(format!("{path}: no type"));
    }
    for forbidden in [
        "$ref",
        "definitions",
        "$defs",
        "patternProperties",
        "dependencies",
    ] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: `{forbidden}` is not allowed"));
        }
    }
    if obj.get("uniqueItems") == Some(&Value::Bool(true)) {
        problems.push(format!("{path}: uniqueItems: true is not allowed"));
    }
    match obj.get("additionalProperties") {
        Some(Value::Bool(false)) => problems.push(format!("{path}: additionalProperties: false")),
        Some(_) if obj.contains_key("properties") => {
            problems.push(format!("{path}: additionalProperties beside properties"))
        }
        Some(sub @ Value::Object(_)) => check_structural(sub, &format!("{path}.*"), problems),
        _ => {}
    }
    for quantifier in ["anyOf", "allOf", "oneOf"] {
        for (i, branch) in obj
            .get(quantifier)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for key in [
                "type",
                "description",
                "default",
                "nullable",
                "additionalProperties",
            ] {
                if branch.get(key).is_some() {
                    problems.push(format!(
                        "{path}.{quantifier}[{i}]: `{key}` inside a quantifier"
                    ));
                }
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            check_structural(sub, &format!("{path}.{name}"), problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), problems);
        if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
            let required: Vec<&str> = items
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for key in obj["x-kubernetes-list-map-keys"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let key = key.as_str().unwrap_or_default();
                if !required.contains(&key) {
                    problems.push(format!("{path}: list map key `{key}` is not required"));
                }
            }
        }
    }
}

#[test]
fn the_schema_is_structural() {
    let mut problems = Vec::new();
    check_structural(&schema(), "", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_structural_check_finds_what_the_api_server_rejects() {
    let mut problems = Vec::new();
    let bad = serde_json::json!({
        "type": "object",
        "properties": {
            "a": {"type": "object", "additionalProperties": false},
            "b": {"description": "no type"},
            "c": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": {"type": "string"}}
        }
    });
    check_structural(&bad, "", &mut problems);
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

fn pipeline(text: &str) -> Pipeline {
    parse_pipeline(text).unwrap()
}

#[test]
fn cel_rules_accept_every_example() {
    for text in [
        include_str!("../../examples/laundry.yaml"),
        include_str!("../../examples/quadratic.yaml"),
        include_str!("../../examples/exec-python.yaml"),
        include_str!("../../examples/exec-ruby.yaml"),
    ] {
        let p = pipeline(text);
        if let Err(e) = kube::core::cel::validate_cel(&p) {
            panic!("{}: {e:?}", p.metadata.name.unwrap_or_default());
        }
    }
}

#[test]
fn cel_rules_reject_what_validate_rejects() {
    let head = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n";
    let cases = [
        (
            "  sources: [{name: s, generator: {count: 1}, file: {path: x}}]\n  stages: [{name: a, passthrough: {}}]\n  sinks: [{name: o, log: {}}]\n",
            "exactly one of generator",
        ),
        (
            "  sources: [{name: s, generator: {count: 1}}]\n  stages: [{name: a}]\n  sinks: [{name: o, log: {}}]\n",
            "exactly one of stages",
        ),
        (
            "  sources: [{name: s, generator: {count: 1}}]\n  stages: [{name: a, passthrough: {}}]\n  sinks: [{name: o, log: {}, nats: {subject: x}}]\n",
            "exactly one of file",
        ),
        (
            "  sources: [{name: s, generator: {count: 1}}]\n  stages: [{name: a, passthrough: {}, switcher: {minReplicas: 3, maxReplicas: 2}}]\n  sinks: [{name: o, log: {}}]\n",
            "minReplicas must not be greater than maxReplicas",
        ),
    ];
    for (body, expected) in cases {
        let p = pipeline(&format!("{head}{body}"));
        let err = kube::core::cel::validate_cel(&p).expect_err(expected);
        assert!(format!("{err:?}").contains(expected), "{expected}: {err:?}");
    }
}
