//! On a real cluster (opt-in): install the chart, apply the laundry example, wait for Ready, delete it.
//!
//! Needs a cluster in KUBECONFIG (kind or k3d), `kubectl` and `helm` on PATH, and the Switchyard image
//! available to the cluster, named in SWITCHYARD_IMAGE. With kind:
//!
//! ```sh
//! kind create cluster
//! docker build -t switchyard:dev .
//! kind load docker-image switchyard:dev
//! SWITCHYARD_IMAGE=switchyard:dev cargo test -p switchyard-e2e --test cluster -- --ignored
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "switchyard-e2e";

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn repo_file(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

#[test]
#[ignore = "needs a Kubernetes cluster: KUBECONFIG, kubectl, helm, and SWITCHYARD_IMAGE loaded into the cluster"]
fn the_chart_installs_and_the_laundry_becomes_ready() {
    let image = std::env::var("SWITCHYARD_IMAGE").expect(
        "SWITCHYARD_IMAGE names the Switchyard image the cluster can pull, such as switchyard:dev",
    );
    let (repository, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let chart = repo_file("charts/switchyard");
    run(
        "helm",
        &[
            "upgrade",
            "--install",
            "switchyard-e2e",
            &chart,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            &format!("image.repository={repository}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--set",
            "nats.install=true",
            "--set",
            "nats.persistence=false",
            "--wait",
            "--timeout",
            "5m",
        ],
    );
    let laundry = repo_file("examples/laundry.yaml");
    run(
        "kubectl",
        &["apply", "--namespace", NAMESPACE, "-f", &laundry],
    );
    run(
        "kubectl",
        &[
            "wait",
            "--namespace",
            NAMESPACE,
            "--for=condition=Ready",
            "pipeline/laundry",
            "--timeout=10m",
        ],
    );
    let units = run(
        "kubectl",
        &[
            "get",
            "pipeline",
            "laundry",
            "--namespace",
            NAMESPACE,
            "-o",
            "jsonpath={.status.unitsSummary}",
        ],
    );
    assert_eq!(units, "5/5");
    // The 10,000 items drain: the lag the operator reports falls to zero.
    let started = Instant::now();
    loop {
        let lag = run(
            "kubectl",
            &[
                "get",
                "pipeline",
                "laundry",
                "--namespace",
                NAMESPACE,
                "-o",
                "jsonpath={.status.lag}",
            ],
        );
        if lag.trim() == "0" && started.elapsed() > Duration::from_secs(10) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "lag still {lag} after 10 minutes"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    // Deleting runs the finalizer (the stream goes) and the owned Deployments follow.
    run(
        "kubectl",
        &[
            "delete",
            "pipeline",
            "laundry",
            "--namespace",
            NAMESPACE,
            "--timeout=2m",
        ],
    );
    let started = Instant::now();
    loop {
        let left = run(
            "kubectl",
            &[
                "get",
                "deployments",
                "--namespace",
                NAMESPACE,
                "-l",
                "switchyard.dev/pipeline=laundry",
                "-o",
                "name",
            ],
        );
        if left.trim().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "still there after 2 minutes: {left}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    run(
        "helm",
        &["uninstall", "switchyard-e2e", "--namespace", NAMESPACE],
    );
}
