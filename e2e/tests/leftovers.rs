//! A cluster suite killed mid-run leaves nothing that its next run does not take away (issue 39).
//!
//! `switchyard-cluster up --hold` stands for a suite: its cluster belongs to it, as the pod suite's
//! belongs to the test binary. It is SIGKILLed once the cluster is up, which leaves the cluster's
//! daemons running (they are started apart, to outlive a node's restart); the next run of the same
//! name must take all of it down, come up, and leave nothing once it ends: no process, mount,
//! network namespace, interface, forwarding rule, cgroup or folder. Needs what the pod suite needs
//! (root, the Kubernetes programs): otherwise it says why in one line and passes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchyard_e2e::cluster::{machine_allows, Cluster, Programs};

const NAME: &str = "leftovers";
const UP_WITHIN: Duration = Duration::from_secs(240);

/// A run of the "suite": `up --hold`, once the cluster is up.
fn suite_run() -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-cluster"))
        .args(["up", "--name", NAME, "--nodes", "1", "--hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start switchyard-cluster");
    let stdout = child.stdout.take().expect("its output");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(UP_WITHIN) {
        Ok(line) if line.starts_with("export KUBECONFIG=") => child,
        other => {
            let _ = child.kill();
            let status = child.wait();
            panic!("the cluster did not come up within {UP_WITHIN:?}: {other:?}, {status:?}");
        }
    }
}

/// Takes the cluster down however the test ends.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(cluster) = Cluster::find(NAME) {
            let _ = cluster.down();
        }
    }
}

#[test]
fn a_suite_killed_mid_run_leaves_nothing_its_next_run_does_not_take_away() {
    if let Err(why) = machine_allows().and_then(|()| Programs::find().map(|_| ())) {
        println!("leftovers skipped: {why}");
        return;
    }
    let _cleanup = Cleanup;
    let mut first = suite_run();
    let layout = Cluster::find(NAME).expect("the first run's cluster").layout;
    first.kill().expect("SIGKILL the first run");
    first.wait().expect("the first run ends");
    // What a killed suite leaves: without the next run's care, all of it would stay.
    let orphaned = Cluster::leftovers(&layout);
    println!("the killed run left {} things:", orphaned.len());
    for thing in &orphaned {
        println!("  {thing}");
    }
    assert!(
        orphaned.iter().any(|l| l.starts_with("process ")),
        "the killed run's daemons should still run: {orphaned:?}"
    );
    let mut second = suite_run();
    drop(second.stdin.take());
    let status = second.wait().expect("the second run ends");
    assert!(status.success(), "the second run: {status}");
    assert_eq!(Cluster::leftovers(&layout), Vec::<String>::new());
}
