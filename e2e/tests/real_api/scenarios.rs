//! Each finding of the operator's first meeting with a real API server, as a scenario that failed then.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{
    condition_of, pipeline_yaml, succeeded, switcher_yaml, text, wait_for, Suite,
};

const MINUTE: Duration = Duration::from_secs(60);

fn ready(suite: &Suite, ns: &str, name: &str) -> Option<String> {
    suite
        .condition(ns, name, "Ready")
        .map(|(status, reason, _)| format!("{status}/{reason}"))
}

/// The CRD as shipped: helm installed it on a clean cluster (in `install`, with no warning); a user who
/// upgrades it with server-side apply, as the README says, gets no warning either.
pub fn the_crd_installs_without_warnings(suite: &Suite) {
    suite.install("crd");
    let crd = suite.repo.join("crds/switchyard.dev_pipelines.yaml");
    let out = succeeded(
        "kubectl apply --server-side",
        suite.kubectl(&["apply", "--server-side", "-f", &crd.display().to_string()]),
    );
    let stderr = text(&out.stderr);
    assert!(stderr.trim().is_empty(), "the API server warned: {stderr}");
    let established = suite.json(&["get", "crd", "pipelines.switchyard.dev"]);
    assert!(
        established["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True"),
        "{established}"
    );
}

pub fn every_example_reconciles_to_ready(suite: &Suite) {
    let install = suite.install("examples");
    let operator = suite.start_operator(&install, &[]);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(suite.repo.join("examples"))
        .expect("examples")
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let yaml = std::fs::read_to_string(&path).expect("read an example");
            let value: Value = serde_norway::from_str(&yaml).expect("an example parses");
            names.push(
                value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            succeeded(
                "kubectl apply of an example",
                suite.kubectl(&["apply", "-n", "examples", "-f", &path.display().to_string()]),
            );
        }
    }
    assert!(names.len() >= 4, "{names:?}");
    for name in &names {
        wait_for(MINUTE, &format!("{name}'s units"), || {
            ready(suite, "examples", name).as_deref() == Some("False/UnitsNotReady")
        });
    }
    // With OwnerReferencesPermissionEnforcement on, owner references with blockOwnerDeletion were
    // accepted: every object is there, owned by its Pipeline.
    let deployments = suite.json(&["get", "deployments", "-n", "examples"]);
    for d in deployments["items"].as_array().into_iter().flatten() {
        assert_eq!(
            d["metadata"]["ownerReferences"][0]["blockOwnerDeletion"],
            true
        );
    }
    wait_for(MINUTE, "every example Ready", || {
        suite.mark_pods_ready("examples");
        names
            .iter()
            .all(|n| ready(suite, "examples", n).as_deref() == Some("True/AllUnitsReady"))
    });
    for name in &names {
        succeeded(
            "kubectl wait",
            suite.kubectl(&[
                "wait",
                "-n",
                "examples",
                "--for=condition=Ready",
                &format!("pipeline/{name}"),
                "--timeout=5s",
            ]),
        );
    }
    drop(operator);
}

pub fn typos_and_wrong_types_are_rejected_at_every_level(suite: &Suite) {
    suite.install("typos");
    let nested = |leaf: &str| {
        pipeline_yaml(
            "typos",
            "typo",
            &format!("    - name: a\n      stages:\n        - name: b\n          stages:\n            - {{name: c, passthrough: {{}}, {leaf}}}"),
        )
    };
    let typo = suite.apply(&nested("tymeout: 3s"));
    assert!(!typo.status.success());
    assert!(
        text(&typo.stderr).contains("unknown field \"spec.stages[0].stages[0].stages[0].tymeout\""),
        "{}",
        text(&typo.stderr)
    );
    let wrong_type = suite.apply(&nested("concurrency: \"8\""));
    assert!(!wrong_type.status.success());
    assert!(
        text(&wrong_type.stderr).contains("concurrency in body must be of type integer"),
        "{}",
        text(&wrong_type.stderr)
    );
    let two_kinds = suite.apply(&nested("jq: ."));
    assert!(
        text(&two_kinds.stderr).contains("a stage needs exactly one of"),
        "{}",
        text(&two_kinds.stderr)
    );
    let too_deep = pipeline_yaml(
        "typos",
        "deep",
        "    - name: a\n      stages:\n        - name: b\n          stages:\n            - name: c\n              stages:\n                - name: d\n                  stages: [{name: e, passthrough: {}}]",
    );
    assert!(!suite.apply(&too_deep).status.success());
    succeeded(
        "a valid nested Pipeline",
        suite.apply(&nested("timeout: 3s")),
    );
}

/// Swaps in a CRD without the bound on `concurrency` of a top-level stage, as an older CRD had,
/// creates `yaml` through it, and puts the shipped CRD back: the object stays stored, and the
/// operator cannot decode it.
fn create_undecodable(suite: &Suite, yaml: &str) {
    let crd_path = suite.repo.join("crds/switchyard.dev_pipelines.yaml");
    let shipped: Value =
        serde_norway::from_str(&std::fs::read_to_string(&crd_path).expect("the CRD"))
            .expect("CRD YAML");
    let mut loose = shipped.clone();
    let stage = &mut loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        ["spec"]["properties"]["stages"]["items"];
    stage["properties"]["concurrency"]
        .as_object_mut()
        .expect("concurrency's schema")
        .remove("maximum");
    let apply_crd = |crd: &Value| {
        succeeded(
            "swap the CRD",
            suite.plane.kubectl_with_input(
                &["apply", "--server-side", "--force-conflicts", "-f", "-"],
                &crd.to_string(),
            ),
        );
    };
    apply_crd(&loose);
    wait_for(MINUTE, "the loose CRD to take", || {
        suite.apply(yaml).status.success()
    });
    apply_crd(&shipped);
    // The API server takes a moment to serve a new schema: until then it would still accept the object
    // (a dry-run create fails only as a duplicate).
    wait_for(MINUTE, "the shipped CRD to take", || {
        let probe = suite
            .plane
            .kubectl_with_input(&["create", "--dry-run=server", "-f", "-"], yaml);
        String::from_utf8_lossy(&probe.stderr).contains("concurrency")
    });
}

pub fn a_pipeline_that_cannot_be_decoded_is_isolated(suite: &Suite) {
    let install = suite.install("decode");
    let bad = pipeline_yaml(
        "decode",
        "bad",
        "    - {name: a, passthrough: {}, concurrency: 99999999999}",
    );
    create_undecodable(suite, &bad);
    suite.apply_ok(&switcher_yaml("decode", "good", ""));
    // A fresh start lists the bad one with the rest.
    let operator = suite.start_operator(&install, &[]);
    wait_for(MINUTE, "the good Pipeline reconciled", || {
        ready(suite, "decode", "good").as_deref() == Some("False/UnitsNotReady")
    });
    wait_for(MINUTE, "the bad Pipeline reported", || {
        ready(suite, "decode", "bad").as_deref() == Some("False/InvalidSpec")
    });
    let (_, _, message) = suite
        .condition("decode", "bad", "Ready")
        .unwrap_or_default();
    assert!(
        message.contains("cannot be read") && message.to_lowercase().contains("expected u32"),
        "{message}"
    );
    assert!(suite.has_event("decode", "InvalidSpec", "cannot be read"));
    assert_eq!(operator.get("/readyz").0, 200);
    // One that arrives while the operator runs is isolated the same way, and the good one goes on.
    let worse = pipeline_yaml(
        "decode",
        "worse",
        "    - {name: a, passthrough: {}, concurrency: 88888888888}",
    );
    create_undecodable(suite, &worse);
    wait_for(MINUTE, "the second bad Pipeline reported", || {
        ready(suite, "decode", "worse").as_deref() == Some("False/InvalidSpec")
    });
    suite.mark_pods_ready("decode");
    wait_for(MINUTE, "the good Pipeline Ready", || {
        suite.mark_pods_ready("decode");
        ready(suite, "decode", "good").as_deref() == Some("True/AllUnitsReady")
    });
    // Deleting an undecodable Pipeline still runs its cleanup and lets it go.
    suite.kubectl_ok(&["delete", "pipeline", "bad", "-n", "decode", "--wait=false"]);
    wait_for(MINUTE, "the bad Pipeline deleted", || {
        suite.pipeline("decode", "bad").is_null()
    });
}

pub fn readyz_fails_while_pipelines_cannot_be_listed(suite: &Suite) {
    let install = suite.install("readyz");
    let role = format!("sy-{}-switchyard-pipelines", install.namespace);
    let rules = suite.json(&["get", "clusterrole", &role])["rules"].clone();
    let without_pipelines: Vec<Value> = rules
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["resources"] != json!(["pipelines"]))
        .cloned()
        .collect();
    let patch = |rules: &Value| {
        suite.kubectl_ok(&[
            "patch",
            "clusterrole",
            &role,
            "--type=merge",
            "-p",
            &json!({"rules": rules}).to_string(),
        ]);
    };
    patch(&json!(without_pipelines));
    let operator = suite.start_operator(&install, &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        operator.get("/readyz").0,
        503,
        "ready while Pipelines cannot be listed"
    );
    assert_eq!(operator.get("/healthz").0, 200);
    patch(&rules);
    wait_for(MINUTE, "/readyz once Pipelines can be listed", || {
        operator.get("/readyz").0 == 200
    });
}

pub fn status_writes_do_not_drive_reconciles(suite: &Suite) {
    let install = suite.install("hotloop");
    let operator = suite.start_operator(&install, &[]);
    // Scaling would be a legitimate reason to reconcile: keep this switcher where it is.
    let yaml = pipeline_yaml(
        "hotloop",
        "busy",
        "    - name: work\n      switcher: {minReplicas: 1, maxReplicas: 1}\n      passthrough: {}",
    );
    suite.apply_ok(&yaml);
    wait_for(MINUTE, "the Pipeline reconciled", || {
        ready(suite, "hotloop", "busy").is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let window = Duration::from_secs(60);
    let (reconciles, writes, applies) = (
        operator.metric("switchyard_reconciles_total"),
        operator.metric("switchyard_status_writes_total"),
        operator.metric("switchyard_applies_total"),
    );
    let requests_before = suite.operator_requests(&install).len();
    // 20 messages a second into the switcher's input, which nothing consumes: its lag keeps changing.
    runtime.block_on(async {
        let js = suite.jetstream().await;
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < window {
            n += 1;
            let _ = js
                .publish(
                    "switchyard.hotloop.busy.data.src",
                    format!("{{\"n\": {n}}}").into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let reconciles = operator.metric("switchyard_reconciles_total") - reconciles;
    let writes = operator.metric("switchyard_status_writes_total") - writes;
    let applies = operator.metric("switchyard_applies_total") - applies;
    let requests = &suite.operator_requests(&install)[requests_before..];
    let object_writes = requests
        .iter()
        .filter(|e| {
            matches!(
                e["objectRef"]["resource"].as_str(),
                Some("configmaps" | "deployments")
            )
        })
        .filter(|e| e["verb"] != "get" && e["verb"] != "list" && e["verb"] != "watch")
        .count();
    println!("  in 60s at 20 msg/s: {reconciles} reconciles, {writes} status writes, {applies} applies, {object_writes} ConfigMap/Deployment writes, {} API requests", requests.len());
    let lag = suite.pipeline("hotloop", "busy")["status"]["lag"]
        .as_u64()
        .unwrap_or(0);
    assert!(lag > 0, "the lag reached the status");
    assert!(reconciles <= 10.0, "{reconciles} reconciles in a minute");
    assert!(writes <= 10.0, "{writes} status writes in a minute");
    assert_eq!(applies, 0.0);
    assert_eq!(object_writes, 0);
}

pub fn a_deleted_namespace_is_never_stranded(suite: &Suite) {
    let install = suite.install("doomed");
    suite.apply_ok(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: doomed}\nstringData: {nats.creds: not-used-here}\n",
    );
    let mut yaml = switcher_yaml("doomed", "p", "");
    yaml.push_str("  nats: {credentialsSecret: creds}\n");
    suite.apply_ok(&yaml);
    let operator = suite.start_operator(&install, &[]);
    wait_for(MINUTE, "the finalizer", || {
        suite.pipeline("doomed", "p")["metadata"]["finalizers"][0] == "switchyard.dev/cleanup"
    });
    operator.stop();
    // With the operator down, the Secret goes first and the namespace after it.
    suite.kubectl_ok(&["delete", "secret", "creds", "-n", "doomed"]);
    suite.kubectl_ok(&["delete", "namespace", "doomed", "--wait=false"]);
    let restarted = Instant::now();
    let since = suite.operator_requests(&install).len();
    let operator = suite.start_operator(&install, &[]);
    let took = wait_for(Duration::from_secs(90), "the namespace gone", || {
        suite.kubectl(&["get", "namespace", "doomed"]).status.code() == Some(1)
    });
    println!(
        "  namespace gone {:.1}s after the operator came back",
        took.as_secs_f64()
    );
    let requests = &suite.operator_requests(&install)[since..];
    let created: Vec<&Value> = requests
        .iter()
        .filter(|e| e["objectRef"]["namespace"] == "doomed")
        .filter(|e| {
            matches!(
                e["objectRef"]["resource"].as_str(),
                Some("configmaps" | "deployments")
            )
        })
        .filter(|e| matches!(e["verb"].as_str(), Some("create" | "patch" | "update")))
        .collect();
    assert!(
        created.is_empty(),
        "the operator tried to create in a terminating namespace: {created:?}"
    );
    let warned = requests.iter().any(|e| {
        e["objectRef"]["resource"] == "events"
            && e["objectRef"]["namespace"] == "doomed"
            && e["verb"] == "create"
    });
    assert!(
        warned || operator.log_text().contains("CleanupAbandoned"),
        "no Warning Event"
    );
    assert!(restarted.elapsed() < Duration::from_secs(90));
}

pub fn unreachable_nats_ends_cleanup_after_the_timeout(suite: &Suite) {
    let install = suite.install("unreachable");
    let closed = switchyard_e2e::control_plane::free_port();
    let mut yaml = switcher_yaml("unreachable", "p", "");
    yaml.push_str(&format!("  nats: {{url: \"nats://127.0.0.1:{closed}\"}}\n"));
    suite.apply_ok(&yaml);
    let _operator = suite.start_operator(&install, &["--cleanup-timeout=10s"]);
    wait_for(MINUTE, "NatsUnavailable", || {
        ready(suite, "unreachable", "p").as_deref() == Some("False/NatsUnavailable")
    });
    suite.kubectl_ok(&[
        "delete",
        "pipeline",
        "p",
        "-n",
        "unreachable",
        "--wait=false",
    ]);
    let took = wait_for(MINUTE, "the Pipeline deleted", || {
        suite.pipeline("unreachable", "p").is_null()
    });
    println!(
        "  deleted {:.1}s after the request, with NATS unreachable",
        took.as_secs_f64()
    );
    assert!(took >= Duration::from_secs(8), "let go before the timeout");
    assert!(suite.has_event(
        "unreachable",
        "CleanupAbandoned",
        "switchyard_unreachable_p"
    ));
}

pub fn names_never_collide_across_pipelines(suite: &Suite) {
    let install = suite.install("names");
    let _operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&pipeline_yaml(
        "names",
        "a",
        "    - {name: b-c, passthrough: {}}",
    ));
    wait_for(MINUTE, "a's objects", || {
        ready(suite, "names", "a").is_some()
    });
    suite.apply_ok(&pipeline_yaml(
        "names",
        "a-b",
        "    - {name: c, passthrough: {}}",
    ));
    wait_for(MINUTE, "a-b's NameConflict", || {
        ready(suite, "names", "a-b").as_deref() == Some("False/NameConflict")
    });
    let (_, _, message) = suite.condition("names", "a-b", "Ready").unwrap_or_default();
    assert!(
        message.contains("a-b-c") && message.contains("Pipeline a"),
        "{message}"
    );
    assert!(suite.has_event("names", "NameConflict", "a-b-c"));
    let owner = |kind: &str| suite.json(&["get", kind, "a-b-c", "-n", "names"])["metadata"].clone();
    let before = (owner("configmap"), owner("deployment"));
    std::thread::sleep(Duration::from_secs(20));
    let after = (owner("configmap"), owner("deployment"));
    for (b, a) in [(&before.0, &after.0), (&before.1, &after.1)] {
        assert_eq!(a["ownerReferences"][0]["name"], "a");
        assert_eq!(
            a["resourceVersion"], b["resourceVersion"],
            "the object changed hands"
        );
    }
    assert!(ready(suite, "names", "a").is_some_and(|r| !r.ends_with("NameConflict")));
}

pub fn ready_follows_the_rollout(suite: &Suite) {
    let install = suite.install("rollout");
    let _operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&switcher_yaml("rollout", "p", ""));
    wait_for(MINUTE, "Ready", || {
        suite.mark_pods_ready("rollout");
        ready(suite, "rollout", "p").as_deref() == Some("True/AllUnitsReady")
    });
    suite.kubectl_ok(&[
        "patch", "pipeline", "p", "-n", "rollout", "--type=json", "-p",
        r#"[{"op": "add", "path": "/spec/stages/0/env", "value": [{"name": "COLOUR", "value": "blue"}]}]"#,
    ]);
    let generation = suite.pipeline("rollout", "p")["metadata"]["generation"]
        .as_i64()
        .unwrap_or(0);
    wait_for(MINUTE, "the new generation observed", || {
        let p = suite.pipeline("rollout", "p");
        p["status"]["observedGeneration"].as_i64() == Some(generation)
            && condition_of(&p, "Ready").is_some_and(|(s, _, _)| s == "False")
    });
    let p = suite.pipeline("rollout", "p");
    let (progressing, reason, message) = condition_of(&p, "Progressing").unwrap_or_default();
    assert_eq!(
        (progressing.as_str(), reason.as_str()),
        ("True", "RollingOut"),
        "{message}"
    );
    let waited = suite.kubectl(&[
        "wait",
        "-n",
        "rollout",
        "--for=condition=Ready",
        "pipeline/p",
        "--timeout=3s",
    ]);
    assert!(
        !waited.status.success(),
        "kubectl wait passed a rollout in progress"
    );
    wait_for(MINUTE, "Ready again once the new pod is up", || {
        suite.mark_pods_ready("rollout");
        ready(suite, "rollout", "p").as_deref() == Some("True/AllUnitsReady")
    });
}

pub fn apply_failures_reach_the_status(suite: &Suite) {
    let install = suite.install("refused");
    let _operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&pipeline_yaml(
        "refused",
        "p",
        "    - {name: a, passthrough: {}, resources: {requests: {cpu: \"2\"}, limits: {cpu: \"1\"}}}",
    ));
    wait_for(MINUTE, "ApplyFailed", || {
        ready(suite, "refused", "p").as_deref() == Some("False/ApplyFailed")
    });
    let (_, _, message) = suite.condition("refused", "p", "Ready").unwrap_or_default();
    assert!(
        message.contains("Deployment p-a") && message.contains("less than or equal to cpu limit"),
        "{message}"
    );
    assert!(suite.has_event("refused", "ApplyFailed", "p-a"));
}

/// Publishes `count` messages into a unit's input.
fn backlog(suite: &Suite, subject: &str, count: usize) {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let js = suite.jetstream().await;
        let mut acks = Vec::new();
        for n in 0..count {
            acks.push(
                js.publish(subject.to_string(), format!("{{\"n\": {n}}}").into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    });
}

fn replicas(suite: &Suite, ns: &str, deployment: &str) -> i64 {
    suite.json(&["get", "deployment", deployment, "-n", ns])["spec"]["replicas"]
        .as_i64()
        .unwrap_or(-1)
}

pub fn scaling_has_its_own_field_manager_and_says_why(suite: &Suite) {
    let install = suite.install("scaling");
    let operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&switcher_yaml("scaling", "idle", ""));
    suite.apply_ok(&switcher_yaml("scaling", "busy", ""));
    wait_for(MINUTE, "the switchers", || {
        replicas(suite, "scaling", "busy-work") == 1
    });
    // Idle at minReplicas: it says so, not that it waits to scale down.
    wait_for(MINUTE, "the idle switcher's reason", || {
        suite.pipeline("scaling", "idle")["status"]["units"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|u| {
                u["name"] == "work"
                    && u["lastScaleReason"]
                        .as_str()
                        .is_some_and(|r| r.contains("at minReplicas"))
            })
    });
    backlog(suite, "switchyard.scaling.busy.data.src", 1000);
    let took = wait_for(MINUTE, "busy scaled up", || {
        replicas(suite, "scaling", "busy-work") == 4
    });
    println!(
        "  a backlog of 1,000 scaled the switcher in {:.1}s",
        took.as_secs_f64()
    );
    let managers = suite.json(&[
        "get",
        "deployment",
        "busy-work",
        "-n",
        "scaling",
        "--show-managed-fields",
    ])["metadata"]["managedFields"]
        .clone();
    assert!(
        managers
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["manager"] == "switchyard-autoscaler" && m["subresource"] == "scale"),
        "{managers}"
    );
    let series = "switchyard_unit_lag{namespace=\"scaling\",pipeline=\"busy\"";
    wait_for(MINUTE, "busy's metric series", || {
        operator.get("/metrics").1.contains(series)
    });
    suite.kubectl_ok(&["delete", "pipeline", "busy", "-n", "scaling"]);
    wait_for(MINUTE, "busy's series gone", || {
        !operator.get("/metrics").1.contains("pipeline=\"busy\"")
    });
}

pub fn a_silent_nats_server_slows_only_its_own_pipelines(suite: &Suite) {
    let install = suite.install("silent");
    // Accepts connections and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let silent = listener.local_addr().expect("its address");
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for socket in listener.incoming().take(200).flatten() {
            held.push(socket);
        }
    });
    let _operator = suite.start_operator(&install, &[]);
    for i in 0..3 {
        let mut yaml = switcher_yaml("silent", &format!("mute-{i}"), "");
        yaml.push_str(&format!("  nats: {{url: \"nats://{silent}\"}}\n"));
        suite.apply_ok(&yaml);
    }
    suite.apply_ok(&switcher_yaml("silent", "loud", ""));
    wait_for(MINUTE, "loud reconciled", || {
        ready(suite, "silent", "loud").is_some()
    });
    wait_for(MINUTE, "loud's switcher", || {
        replicas(suite, "silent", "loud-work") == 1
    });
    backlog(suite, "switchyard.silent.loud.data.src", 1000);
    let took = wait_for(MINUTE, "loud scaled up", || {
        replicas(suite, "silent", "loud-work") == 4
    });
    println!(
        "  with three Pipelines on a silent NATS server, a backlog scaled another in {:.1}s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(15),
        "scaling waited on the silent server: {took:?}"
    );
    wait_for(MINUTE, "the silent ones reported", || {
        (0..3).all(|i| {
            ready(suite, "silent", &format!("mute-{i}")).as_deref() == Some("False/NatsUnavailable")
        })
    });
    drop(holder);
}

/// The trigger of a reconcile for a change of an owned object (kube-runtime names the object after it).
const RELATED: &str = "related object updated";

/// Reconciles started in an operator's log, by what triggered them (kube-runtime's span says), owned
/// objects' changes counted together.
fn reconcile_triggers(log: &str) -> std::collections::BTreeMap<String, usize> {
    let mut triggers = std::collections::BTreeMap::new();
    for line in log.lines().filter(|l| l.ends_with("reconciling")) {
        if let Some((trigger, _)) = line
            .split_once("object.reason=")
            .and_then(|(_, rest)| rest.split_once('}'))
        {
            let kind = if trigger.starts_with(RELATED) {
                RELATED
            } else {
                trigger
            };
            *triggers.entry(kind.to_string()).or_default() += 1;
        }
    }
    triggers
}

pub fn many_pipelines(suite: &Suite) {
    let count: usize = std::env::var("SWITCHYARD_SCALE_PIPELINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let install = suite.install("many");
    let operator = suite.start_operator(&install, &[]);
    let yaml: Vec<String> = (0..count)
        .map(|i| switcher_yaml("many", &format!("p{i}"), ""))
        .collect();
    let file = suite.plane.dir.path().join("many.yaml");
    std::fs::write(&file, yaml.join("---\n")).expect("write many.yaml");
    let started = Instant::now();
    succeeded(
        "kubectl apply",
        suite.kubectl(&["apply", "-f", &file.display().to_string()]),
    );
    let with_status = || {
        suite.json(&["get", "pipelines", "-n", "many"])["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|p| p["status"]["observedGeneration"].is_i64())
                    .count()
            })
            .unwrap_or(0)
    };
    let settle = wait_for(
        Duration::from_secs(300),
        "every Pipeline with a status",
        || with_status() == count,
    );
    let rss_settled = operator.rss_mib();
    println!("  {count} Pipelines: all with a status {:.1}s after the apply ({:.1}s after the first); operator RSS {rss_settled:.0} MiB", settle.as_secs_f64(), started.elapsed().as_secs_f64());
    // Idle: the controller-manager writes each new Deployment's status once or twice, over a minute
    // or so for 300 of them on 2 cores, and each write triggers a reconcile: wait until 10 s pass
    // without one, then count a minute.
    let quiet = Instant::now();
    loop {
        let from = operator.log_text().len();
        std::thread::sleep(Duration::from_secs(10));
        let echoes = reconcile_triggers(&operator.log_text()[from..]);
        if !echoes.contains_key(RELATED) || quiet.elapsed() > Duration::from_secs(180) {
            break;
        }
    }
    println!(
        "  the Deployments' status writes ended {:.0}s after the last status",
        quiet.elapsed().as_secs_f64()
    );
    let (reconciles, applies, writes) = (
        operator.metric("switchyard_reconciles_total"),
        operator.metric("switchyard_applies_total"),
        operator.metric("switchyard_status_writes_total"),
    );
    let since = suite.operator_requests(&install).len();
    let log_since = operator.log_text().len();
    std::thread::sleep(MINUTE);
    let triggers = reconcile_triggers(&operator.log_text()[log_since..]);
    println!("  idle minute's reconciles by trigger: {triggers:?}");
    let requests = suite.operator_requests(&install)[since..].to_vec();
    let throttled = suite
        .operator_requests(&install)
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 429)
        .count();
    let reconciles = operator.metric("switchyard_reconciles_total") - reconciles;
    let applies = operator.metric("switchyard_applies_total") - applies;
    let writes = operator.metric("switchyard_status_writes_total") - writes;
    let rss = operator.rss_mib();
    println!("  idle minute: {} API requests, {reconciles} reconciles, {applies} applies, {writes} status writes; {throttled} requests throttled in all; RSS {rss:.0} MiB", requests.len());
    let subject = format!("switchyard.many.p{}.data.src", count / 2);
    let deployment = format!("p{}-work", count / 2);
    backlog(suite, &subject, 1000);
    let took = wait_for(MINUTE, "a switcher scaled up", || {
        replicas(suite, "many", &deployment) == 4
    });
    println!(
        "  a backlog of 1,000 scaled one of {count} switchers in {:.1}s",
        took.as_secs_f64()
    );
    assert!(
        requests.len() < 100,
        "{} requests in an idle minute",
        requests.len()
    );
    assert_eq!(applies, 0.0);
    // Idle, a Pipeline with a switcher is looked at every 15 s, and nothing else starts a reconcile.
    assert!(
        reconciles <= (count * 5) as f64,
        "{reconciles} reconciles in an idle minute for {count} Pipelines: {triggers:?}"
    );
    assert_eq!(throttled, 0);
    assert!(rss < 200.0, "RSS {rss:.0} MiB");
    suite.kubectl_ok(&["delete", "namespace", "many", "--wait=false"]);
}

/// A token-protected NATS server and the token in the Pipeline's credentials Secret: the operator
/// connects with it and sets the Pipeline up, and the token is in none of what a person or program can
/// read — the operator's log (at debug), Events, the Pipeline's status, the objects it applied,
/// `switchyard plan`. A Pipeline that asks for three replicas of a single server is told why it cannot
/// have them.
pub fn nats_credentials_stay_secret_and_replicas_are_checked(suite: &Suite) {
    let token = "tok-real-api-5e0c2b7d";
    let protected = switchyard_platform::embedded::NatsServer::start_with(&["--auth", token])
        .expect("a token-protected nats-server");
    let install = suite.install("guarded");
    suite.apply_ok(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: nats-auth, namespace: guarded}}\nstringData: {{token: {token}}}\n"
    ));
    let mut guarded = pipeline_yaml("guarded", "p", "    - {name: copy, passthrough: {}}");
    guarded.push_str(&format!(
        "  nats: {{url: \"{}\", credentialsSecret: nats-auth}}\n",
        protected.url()
    ));
    suite.apply_ok(&guarded);
    let mut three = pipeline_yaml("guarded", "three", "    - {name: copy, passthrough: {}}");
    three.push_str("  nats: {replicas: 3}\n");
    suite.apply_ok(&three);
    let operator = suite.start_operator(&install, &[]);
    wait_for(MINUTE, "the guarded Pipeline set up", || {
        ready(suite, "guarded", "p").as_deref() == Some("False/UnitsNotReady")
    });
    wait_for(MINUTE, "three replicas refused", || {
        ready(suite, "guarded", "three").as_deref() == Some("False/NatsReplicasUnavailable")
    });
    let (_, _, message) = suite.condition("guarded", "three", "Ready").expect("Ready");
    assert!(message.contains("spec.nats.replicas is 3"), "{message}");
    let streams = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let client = async_nats::ConnectOptions::with_token(token.to_string())
                .connect(protected.url())
                .await
                .expect("the protected server, with its token");
            async_nats::jetstream::new(client)
                .get_stream("switchyard_guarded_p")
                .await
                .is_ok()
        });
    assert!(streams, "the operator created the stream with the token");

    let file = suite.plane.dir.path().join("guarded.yaml");
    std::fs::write(&file, &guarded).expect("write the Pipeline");
    let plan = succeeded(
        "switchyard plan",
        std::process::Command::new(&suite.operator_binary)
            .arg("plan")
            .arg(&file)
            .output()
            .expect("switchyard plan"),
    );
    let mut shown = operator.log_text();
    shown += &serde_json::to_string(&suite.events("guarded")).unwrap_or_default();
    for kind in ["pipelines", "deployments", "configmaps"] {
        shown += &serde_json::to_string(&suite.json(&["get", kind, "-n", "guarded"]))
            .unwrap_or_default();
    }
    shown += &text(&plan.stdout);
    assert!(shown.contains("nats-auth"), "the Secret is named");
    assert!(
        text(&plan.stdout).contains("kind: Deployment"),
        "{}",
        text(&plan.stderr)
    );
    for secret in [
        token.to_string(),
        data_encoding::BASE64.encode(token.as_bytes()),
    ] {
        assert!(!shown.contains(&secret), "`{secret}` was shown");
    }
    println!(
        "  the token is in none of {} KB of log, Events, status, objects and plan",
        shown.len() / 1024
    );
}

/// Takes (and acknowledges) everything on a unit's consumer, as its pods would.
fn drain(suite: &Suite, stream: &str, durable: &str) -> usize {
    use futures::StreamExt;
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let js = suite.jetstream().await;
        let stream = js.get_stream(stream).await.expect("the stream");
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(durable).await.expect("the consumer");
        let mut taken = 0;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .expect("fetch");
            let mut got = 0;
            while let Some(Ok(message)) = batch.next().await {
                message.ack().await.expect("ack");
                got += 1;
            }
            taken += got;
            if got == 0 {
                break;
            }
        }
        js.client()
            .flush()
            .await
            .expect("flush the acknowledgements");
        taken
    })
}

fn phase(suite: &Suite, ns: &str, name: &str) -> String {
    suite.pipeline(ns, name)["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `spec.paused`: the source stops first, the other units keep going until their consumers are empty
/// (the test takes the backlog, as the pods would), then every unit is at zero; unpaused, each comes back
/// at the replicas it had, the switcher at the four the autoscaler gave it.
pub fn a_paused_pipeline_drains_stops_and_comes_back(suite: &Suite) {
    let ns = "pausing";
    let install = suite.install(ns);
    let _operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&switcher_yaml(ns, "p", ""));
    wait_for(MINUTE, "Ready", || {
        suite.mark_pods_ready(ns);
        ready(suite, ns, "p").as_deref() == Some("True/AllUnitsReady")
    });
    backlog(suite, "switchyard.pausing.p.data.src", 1000);
    wait_for(MINUTE, "the switcher scaled up", || {
        replicas(suite, ns, "p-work") == 4
    });
    suite.kubectl_ok(&[
        "patch",
        "pipeline",
        "p",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec": {"paused": true}}"#,
    ]);
    wait_for(MINUTE, "the source stopped, the rest draining", || {
        let p = suite.pipeline(ns, "p");
        replicas(suite, ns, "p-src") == 0
            && p["status"]["phase"] == "Pausing"
            && condition_of(&p, "Paused").is_some_and(|(s, r, m)| {
                s == "False" && r == "Draining" && m.contains("work to drain (1000 messages)")
            })
    });
    assert_eq!(
        replicas(suite, ns, "p-work"),
        4,
        "the switcher drains at full strength"
    );
    assert_eq!(replicas(suite, ns, "p-out"), 1);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        phase(suite, ns, "p"),
        "Pausing",
        "a backlog holds the pause back"
    );
    assert_eq!(drain(suite, "switchyard_pausing_p", "work"), 1000);
    let took = wait_for(MINUTE, "Paused", || phase(suite, ns, "p") == "Paused");
    println!(
        "  drained, every unit at zero {:.1}s later",
        took.as_secs_f64()
    );
    for deployment in ["p-src", "p-work", "p-out"] {
        assert_eq!(replicas(suite, ns, deployment), 0, "{deployment}");
    }
    let p = suite.pipeline(ns, "p");
    let (paused, reason, _) = condition_of(&p, "Paused").unwrap_or_default();
    assert_eq!((paused.as_str(), reason.as_str()), ("True", "Paused"));
    assert_eq!(
        ready(suite, ns, "p").as_deref(),
        Some("False/Paused"),
        "kubectl wait --for=condition=Ready does not pass a paused Pipeline"
    );
    let work = suite.json(&["get", "deployment", "p-work", "-n", ns]);
    assert_eq!(
        work["metadata"]["annotations"]["switchyard.dev/replicas-before-pause"],
        "4"
    );
    wait_for(MINUTE, "no pods left", || {
        suite.json(&["get", "pods", "-n", ns])["items"]
            .as_array()
            .is_some_and(|pods| pods.is_empty())
    });

    suite.kubectl_ok(&[
        "patch",
        "pipeline",
        "p",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec": {"paused": false}}"#,
    ]);
    wait_for(MINUTE, "every unit back at its replicas", || {
        replicas(suite, ns, "p-src") == 1
            && replicas(suite, ns, "p-work") == 4
            && replicas(suite, ns, "p-out") == 1
    });
    wait_for(MINUTE, "Ready again", || {
        suite.mark_pods_ready(ns);
        ready(suite, ns, "p").as_deref() == Some("True/AllUnitsReady")
    });
    let p = suite.pipeline(ns, "p");
    assert_eq!(p["status"]["phase"], "Running");
    let (paused, reason, _) = condition_of(&p, "Paused").unwrap_or_default();
    assert_eq!((paused.as_str(), reason.as_str()), ("False", "NotPaused"));
    let work = suite.json(&["get", "deployment", "p-work", "-n", ns]);
    assert!(work["metadata"]["annotations"]
        .get("switchyard.dev/paused")
        .is_none());
}

/// `kubectl switchyard …`, run by kubectl itself as a plugin (the `switchyard` binary on PATH under
/// the name `kubectl-switchyard`), as the administrator.
fn plugin(suite: &Suite, bin: &std::path::Path, args: &[&str]) -> std::process::Output {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    switchyard_e2e::control_plane::with_the_suite(&mut std::process::Command::new("kubectl"))
        .arg("switchyard")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &suite.plane.admin_kubeconfig)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run kubectl switchyard")
}

/// A dead letter as a unit stores it, on `unit`'s dead-letter subject.
fn dead_letter(suite: &Suite, subject: &str, unit: &str, n: u32) {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let js = suite.jetstream().await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("src:{n}/{unit}!0.0").as_str());
        headers.insert("Switchyard-Origin", "src");
        headers.insert("Switchyard-Origin-Seq", n.to_string().as_str());
        headers.insert("Switchyard-Path", format!("src,{unit}").as_str());
        headers.insert("Switchyard-Error", format!("refused item {n}").as_str());
        headers.insert("Switchyard-Failed-Stage", unit);
        headers.insert("Switchyard-Failed-Unit", unit);
        headers.insert("Switchyard-Attempts", "3");
        headers.insert("Switchyard-Replay-Step", "0");
        js.publish_with_headers(
            subject.to_string(),
            headers,
            format!("{{\"n\": {n}}}").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    });
}

pub fn kubectl_switchyard_reaches_a_pipeline_by_name(suite: &Suite) {
    let ns = "plugin";
    let install = suite.install(ns);
    let _operator = suite.start_operator(&install, &[]);
    suite.apply_ok(&switcher_yaml(ns, "p", ""));
    wait_for(MINUTE, "Ready", || {
        suite.mark_pods_ready(ns);
        ready(suite, ns, "p").as_deref() == Some("True/AllUnitsReady")
    });
    let bin_dir = tempfile::tempdir().expect("a folder");
    std::os::unix::fs::symlink(
        switchyard_e2e::binary("switchyard"),
        bin_dir.path().join("kubectl-switchyard"),
    )
    .expect("link kubectl-switchyard");

    // The chart's Deployment names the NATS Pipelines get by default (nats://nats:4222, which is no
    // Service here); the operator of this suite runs outside the cluster with its own. The plugin finds
    // the first and says it cannot reach it; --nats-url points it at the second.
    let unreachable = plugin(suite, bin_dir.path(), &["status", "p", "-n", ns]);
    assert!(unreachable.status.success());
    assert!(
        text(&unreachable.stderr).contains("cannot connect to NATS at nats://nats:4222"),
        "{}",
        text(&unreachable.stderr)
    );
    let url = suite.nats.url();
    let ok = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--nats-url", url.as_str()]);
        text(
            &succeeded(
                &format!("kubectl switchyard {}", all.join(" ")),
                plugin(suite, bin_dir.path(), &all),
            )
            .stdout,
        )
    };
    let status = ok(&["status", "p", "-n", ns]);
    assert!(status.contains("plugin/p: phase Running"), "{status}");
    assert!(status.contains("live from NATS"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with("work") && l.contains("1/1")),
        "{status}"
    );

    for n in 1..=3 {
        dead_letter(suite, "switchyard.plugin.p.dlq.work", "work", n);
    }
    let list = ok(&["dlq", "list", "p", "-n", ns]);
    assert!(list.contains("p: 3 dead letters"), "{list}");
    assert!(list.contains("refused item #"), "{list}");
    let shown = ok(&["dlq", "show", "p", "-n", ns, "--json", "--limit", "1"]);
    let first: Value = serde_json::from_str(shown.trim()).expect("a JSON line");
    assert_eq!(first["unit"], "work");
    assert_eq!(first["attempts"], 3);
    let replayed = ok(&["dlq", "replay", "p", "-n", ns]);
    assert!(
        replayed.contains("replayed 3 dead letters (3 into work)"),
        "{replayed}"
    );
    assert!(ok(&["dlq", "list", "p", "-n", ns]).contains("p: 0 dead letters"));
    let tapped = ok(&["tap", "p", "work", "-n", ns, "--from-start", "--count", "3"]);
    let records: Vec<Value> = tapped
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(records.len(), 3, "{tapped}");
    assert!(records
        .iter()
        .all(|r| r["headers"]["Switchyard-Replay-For"] == "work"
            && r["headers"]["Switchyard-Replays"] == "1"));

    let paused = ok(&["pause", "p", "-n", ns]);
    assert!(paused.contains("pausing"), "{paused}");
    // The three replays wait on work's consumer (no pod takes them here): the pause waits for them.
    wait_for(MINUTE, "Pausing on the replays", || {
        condition_of(&suite.pipeline(ns, "p"), "Paused")
            .is_some_and(|(_, _, m)| m.contains("work to drain (3 messages)"))
    });
    assert_eq!(drain(suite, "switchyard_plugin_p", "work"), 3);
    wait_for(MINUTE, "Paused", || phase(suite, ns, "p") == "Paused");
    let status = ok(&["status", "p", "-n", ns]);
    assert!(status.contains("phase Paused"), "{status}");
    assert!(status.contains("0/0"), "{status}");
    ok(&["resume", "p", "-n", ns]);
    wait_for(MINUTE, "Running again", || {
        suite.mark_pods_ready(ns);
        phase(suite, ns, "p") == "Running"
    });

    let missing = plugin(suite, bin_dir.path(), &["status", "nowhere", "-n", ns]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("there is no Pipeline nowhere in namespace plugin"),
        "{}",
        text(&missing.stderr)
    );

    // A Pipeline whose NATS is a Service of the cluster is reached through a port-forward to a ready
    // pod behind it. Here no kubelet serves one: the plugin says so, and still shows the status.
    suite.apply_ok(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: nats, namespace: {ns}}}\nspec:\n  selector: {{app: nats}}\n  ports: [{{port: 4222, targetPort: client}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: nats-0, namespace: {ns}, labels: {{app: nats}}}}\nspec:\n  containers: [{{name: nats, image: nats:2.10, ports: [{{name: client, containerPort: 4222}}]}}]\n"
    ));
    suite.mark_pods_ready(ns);
    suite.apply_ok(
        &pipeline_yaml(ns, "forwarded", "    - {name: a, passthrough: {}}")
            .replace("  sinks:", "  nats: {url: \"nats://nats:4222\"}\n  sinks:"),
    );
    let forwarded = plugin(suite, bin_dir.path(), &["status", "forwarded", "-n", ns]);
    let said = text(&forwarded.stderr);
    assert!(
        said.contains("cannot port-forward to pod plugin/nats-0:4222"),
        "the port-forward is tried and its failure said: {said}"
    );
    assert!(forwarded.status.success(), "{said}");
    assert!(text(&forwarded.stdout).contains("as of the operator's last status write"));
    println!(
        "  port-forward to pod plugin/nats-0 refused, as without a kubelet it must be: {}",
        said.lines().next().unwrap_or_default()
    );
}

/// What a consumer reads, from NATS.
fn consumer_reads(suite: &Suite, stream: &str, durable: &str) -> Vec<String> {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let js = suite.jetstream().await;
        let Ok(stream) = js.get_stream(stream).await else {
            return Vec::new();
        };
        match stream.consumer_info(durable).await {
            Ok(info) if info.config.filter_subjects.is_empty() => {
                vec![info.config.filter_subject.clone()]
            }
            Ok(info) => info.config.filter_subjects.clone(),
            Err(_) => Vec::new(),
        }
    })
}

/// Applies `yaml` and waits, acting as the kubelet, until its migration is done; returns the
/// Progressing messages it showed, in order.
fn migrate_to(suite: &Suite, ns: &str, yaml: &str) -> Vec<String> {
    suite.apply_ok(yaml);
    let generation = suite.pipeline(ns, "p")["metadata"]["generation"]
        .as_i64()
        .unwrap_or(0);
    let mut shown: Vec<String> = Vec::new();
    wait_for(MINUTE, "the migration done", || {
        suite.mark_pods_ready(ns);
        let p = suite.pipeline(ns, "p");
        if let Some((_, reason, message)) = condition_of(&p, "Progressing") {
            if reason == "Migrating" && shown.last() != Some(&message) {
                shown.push(message);
            }
        }
        p["status"]["observedGeneration"].as_i64() == Some(generation)
            && p["status"]["migration"].is_null()
            && ready(suite, ns, "p").as_deref() == Some("True/AllUnitsReady")
    });
    shown
}

fn exists(suite: &Suite, ns: &str, kind: &str, name: &str) -> bool {
    suite
        .kubectl(&["get", kind, name, "-n", ns])
        .status
        .success()
}

/// An edit of a running Pipeline, carried out in steps against a real API server: insert a stage
/// (its consumer and Deployment before its publisher moves to it; the old subject read to its end
/// first, with the operator restarted while it waits), remove one (drained, then deleted), rewire the
/// sink to a new stage; and a lossy edit refused until loss is allowed. The test acts as the kubelet
/// and, where a step waits for messages to be read, as the pods.
pub fn an_edit_is_carried_out_in_steps_across_an_operator_restart(suite: &Suite) {
    let ns = "migrating";
    let stream = "switchyard_migrating_p";
    let data = |unit: &str| format!("switchyard.migrating.p.data.{unit}");
    let install = suite.install(ns);
    let operator = suite.start_operator(&install, &[]);
    let stages = |list: &[&str]| {
        list.iter()
            .map(|s| format!("    - {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (a, ins, b, c) = (
        "{name: a, jq: '.a = 1'}",
        "{name: ins, jq: '.ins = 1'}",
        "{name: b, jq: '.b = 1'}",
        "{name: c, jq: '.c = 1'}",
    );
    suite.apply_ok(&pipeline_yaml(ns, "p", &stages(&[a, b])));
    wait_for(MINUTE, "Ready", || {
        suite.mark_pods_ready(ns);
        ready(suite, ns, "p").as_deref() == Some("True/AllUnitsReady")
    });
    // What a published and b has not read yet: the old subject must be read to its end.
    backlog(suite, &data("a"), 200);

    // 1. Insert `ins` between a and b.
    suite.apply_ok(&pipeline_yaml(ns, "p", &stages(&[a, ins, b])));
    let waiting = format!(
        "waiting for b to read the 200 messages left on {}",
        data("a")
    );
    wait_for(MINUTE, "the step that waits for the old subject", || {
        suite.mark_pods_ready(ns);
        condition_of(&suite.pipeline(ns, "p"), "Progressing")
            .is_some_and(|(_, reason, m)| reason == "Migrating" && m.contains(&waiting))
    });
    // Everything before that step is done, in the cluster and in NATS.
    let p = suite.pipeline(ns, "p");
    assert_eq!(p["status"]["phase"], "Migrating");
    assert_eq!(p["status"]["migration"]["done"], 5, "{}", p["status"]);
    assert_eq!(
        consumer_reads(suite, stream, "ins"),
        [format!("{}_1", data("a"))]
    );
    assert_eq!(consumer_reads(suite, stream, "b"), [data("ins"), data("a")]);
    assert!(exists(suite, ns, "deployment", "p-ins"));
    let config = suite.json(&["get", "configmap", "p-a", "-n", ns]);
    let unit: Value = serde_json::from_str(config["data"]["unit.json"].as_str().unwrap_or("{}"))
        .unwrap_or_default();
    assert_eq!(unit["outputSubject"], format!("{}_1", data("a")));
    // An operator that restarts goes on from the same step.
    operator.stop();
    let operator = suite.start_operator(&install, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let p = suite.pipeline(ns, "p");
    assert_eq!(p["status"]["migration"]["done"], 5);
    assert!(condition_of(&p, "Progressing").is_some_and(|(_, _, m)| m.contains(&waiting)));
    assert_eq!(drain(suite, stream, "b"), 200, "taken as b's pods would");
    wait_for(MINUTE, "edit 1 done", || {
        suite.mark_pods_ready(ns);
        suite.pipeline(ns, "p")["status"]["migration"].is_null()
    });
    let p = suite.pipeline(ns, "p");
    assert_eq!(p["status"]["epochs"], json!({"a": 1}));
    assert_eq!(consumer_reads(suite, stream, "b"), [data("ins")]);
    assert!(suite.has_event(ns, "Migrating", "consumer ins reads"));
    assert!(suite.has_event(ns, "Migrated", "generation 2 carried out in 7 steps"));

    // 2. Remove `a`: drained, then deleted with its consumer.
    let shown = migrate_to(suite, ns, &pipeline_yaml(ns, "p", &stages(&[ins, b])));
    println!("  edit 2 showed {} waiting steps", shown.len());
    assert!(!exists(suite, ns, "deployment", "p-a"));
    assert!(!exists(suite, ns, "configmap", "p-a"));
    assert!(consumer_reads(suite, stream, "a").is_empty());
    assert_eq!(
        consumer_reads(suite, stream, "ins"),
        [format!("{}_1", data("src"))]
    );
    assert_eq!(
        suite.pipeline(ns, "p")["status"]["epochs"],
        json!({"src": 1})
    );

    // 3. Rewire the sink to a new stage `c`.
    migrate_to(suite, ns, &pipeline_yaml(ns, "p", &stages(&[ins, b, c])));
    assert!(exists(suite, ns, "deployment", "p-c"));
    assert_eq!(consumer_reads(suite, stream, "out"), [data("c")]);
    assert_eq!(
        consumer_reads(suite, stream, "c"),
        [format!("{}_1", data("b"))]
    );
    assert_eq!(
        suite.pipeline(ns, "p")["status"]["epochs"],
        json!({"src": 1, "b": 1})
    );

    // 4. Removing `c` without draining while it holds messages is refused, until loss is allowed.
    backlog(suite, &format!("{}_1", data("b")), 50);
    let lossy = pipeline_yaml(ns, "p", &stages(&[ins, b]))
        .replace("spec:\n", "spec:\n  migration: {drain: false}\n");
    suite.apply_ok(&lossy);
    wait_for(MINUTE, "refused", || {
        condition_of(&suite.pipeline(ns, "p"), "Progressing").is_some_and(|(s, r, m)| {
            s == "False" && r == "MigrationRefused" && m.contains("50 messages in the queue of c")
        })
    });
    assert!(exists(suite, ns, "deployment", "p-c"), "nothing changed");
    assert!(suite.has_event(ns, "MigrationRefused", "allowLoss: true to drop them"));
    migrate_to(
        suite,
        ns,
        &lossy.replace("{drain: false}", "{drain: false, allowLoss: true}"),
    );
    assert!(!exists(suite, ns, "deployment", "p-c"));
    assert_eq!(
        consumer_reads(suite, stream, "out"),
        [format!("{}_2", data("b"))]
    );
    for event in suite.events(ns) {
        if event["reason"] == "Migrating" || event["reason"] == "Migrated" {
            println!(
                "  {}: {}",
                event["reason"].as_str().unwrap_or_default(),
                event["note"].as_str().unwrap_or_default()
            );
        }
    }
    operator.stop();
}
