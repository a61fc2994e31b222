//! A suite killed mid-run leaves nothing that its next run does not take away (issue 39).
//!
//! Each test runs a cluster suite's own binary (the pod suite, the real-API suite) on one scenario,
//! SIGKILLs it while that scenario runs, runs it again, and requires the second run to pass and to
//! leave nothing of either: no process of the killed run, nothing of the pod suite's cluster
//! (process, mount, network namespace, interface, forwarding rule, cgroup), no folder of the suite's
//! and nothing new in the temporary folder. A suite that cannot run here (not root, no Kubernetes
//! programs, no image binaries) says why in one line, and so does its test.
//!
//! The two tests run one at a time: each brings up a control plane.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard_e2e::cluster::Cluster;
use switchyard_e2e::{one_at_a_time, test_binary, SuiteFolder};
use switchyard_platform::os::arguments;

/// Up to the chosen scenario: the pod suite brings up its cluster, builds its images and installs
/// the chart first (about 40 s here).
const SCENARIO_STARTS_WITHIN: Duration = Duration::from_secs(600);
/// A whole run of one scenario, setup included.
const RUN_ENDS_WITHIN: Duration = Duration::from_secs(900);
/// How long into the scenario the first run is killed: its processes are all up by then.
const KILLED_AFTER: Duration = Duration::from_secs(4);
/// What the kernel's SIGTERM to each child of a killed parent takes to be obeyed.
const CHILDREN_GONE_WITHIN: Duration = Duration::from_secs(30);

/// The pod suite's cluster (`CLUSTER` in tests/pods/main.rs).
const POD_SUITE_CLUSTER: &str = "pods-suite";

/// One run of a suite binary on one scenario, its output read line by line.
struct SuiteRun {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl SuiteRun {
    fn start(binary: &Path, scenario: &str) -> SuiteRun {
        let mut child = Command::new(binary)
            .arg(scenario)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("its output");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("  | {line}");
                let _ = tx.send(line);
            }
        });
        SuiteRun {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that `wanted` accepts; the line that says the suite skips itself ends the
    /// wait too. Panics when the run ends or the time is up first.
    fn wait_for(&mut self, within: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) || line.contains("suite skipped:") {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let status = self.child.wait();
                    panic!(
                        "no such line ({e}); the run ended {status:?} after: {:#?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Waits for the run to end by itself, and for all it printed.
    fn finish(mut self, within: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("the run did not end within {within:?}: {:#?}", self.seen);
                }
            }
        }
        let status = self.child.wait().expect("the run ends");
        (status, self.seen)
    }
}

/// A process and what it ran, so that a pid taken later by another program is not mistaken for it.
#[derive(Clone, Debug, PartialEq)]
struct Process {
    pid: u32,
    arguments: Vec<String>,
}

impl Process {
    fn still_runs(&self) -> bool {
        arguments(self.pid).as_ref() == Some(&self.arguments)
    }
}

/// Every process below `root`, children first found by their parent in /proc.
fn descendants(root: u32) -> Vec<Process> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the name may hold anything, so read after the last ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse().ok());
        if let Some(parent) = parent {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if let Some(arguments) = arguments(child) {
                found.push(Process {
                    pid: child,
                    arguments,
                });
            }
            todo.push(child);
        }
    }
    found
}

fn temporary_entries() -> BTreeSet<String> {
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// What a killed run of a suite left, and what its next run must have taken away.
struct Killed {
    processes: Vec<Process>,
    temporary_before: BTreeSet<String>,
}

/// Runs `binary` on `scenario`, kills it a few seconds into the scenario (SIGKILL: nothing of its
/// own runs after), and says what ran below it then. None when the suite skips itself here.
fn kill_mid_scenario(binary: &Path, scenario: &str) -> Option<Killed> {
    let temporary_before = temporary_entries();
    let mut first = SuiteRun::start(binary, scenario);
    let started = format!("scenario {scenario} ...");
    let line = first.wait_for(SCENARIO_STARTS_WITHIN, |line| line == started);
    if line.contains("suite skipped:") {
        println!("leftovers skipped: {line}");
        let _ = first.finish(RUN_ENDS_WITHIN);
        return None;
    }
    std::thread::sleep(KILLED_AFTER);
    let processes = descendants(first.child.id());
    first.child.kill().expect("SIGKILL the first run");
    first.child.wait().expect("the first run ends");
    println!(
        "killed {} {KILLED_AFTER:?} into {scenario}, with {} processes below it",
        binary.display(),
        processes.len()
    );
    Some(Killed {
        processes,
        temporary_before,
    })
}

/// Runs the suite again on the same scenario: it must pass.
fn run_again(binary: &Path, scenario: &str, summary: &str) {
    let (status, lines) = SuiteRun::start(binary, scenario).finish(RUN_ENDS_WITHIN);
    assert!(
        status.success() && lines.iter().any(|l| l == summary),
        "the run after the killed one: {status}, expected '{summary}': {lines:#?}"
    );
}

fn still_running(processes: &[Process]) -> Vec<Process> {
    processes
        .iter()
        .filter(|p| p.still_runs())
        .cloned()
        .collect()
}

/// Nothing the two runs made is left: no process of the killed one, no folder of the suite's, and
/// nothing new in the temporary folder.
fn nothing_left(killed: &Killed, suite_folders: &[&str]) {
    assert_eq!(still_running(&killed.processes), Vec::new());
    for name in suite_folders {
        let folder = SuiteFolder::path_of(name);
        assert!(!folder.exists(), "{} is left", folder.display());
    }
    let new: Vec<String> = temporary_entries()
        .difference(&killed.temporary_before)
        .cloned()
        .collect();
    assert_eq!(new, Vec::<String>::new(), "left in the temporary folder");
}

/// The suite's binary, as `cargo test` built it beside this one.
fn suite_binary(name: &str) -> Option<PathBuf> {
    let binary = test_binary(name);
    if binary.is_none() {
        println!(
            "leftovers skipped: tests/{name} is not built \
             (cargo test -p switchyard-e2e --test leftovers --test {name} builds both)"
        );
    }
    binary
}

#[test]
fn a_real_api_suite_killed_mid_scenario_takes_its_control_plane_along() {
    let _alone = one_at_a_time();
    let Some(binary) = suite_binary("real_api") else {
        return;
    };
    let scenario = "every_example_reconciles_to_ready";
    let Some(killed) = kill_mid_scenario(&binary, scenario) else {
        return;
    };
    let names: BTreeSet<&str> = killed
        .processes
        .iter()
        .filter_map(|p| p.arguments.first())
        .filter_map(|program| Path::new(program).file_name()?.to_str())
        .collect();
    for program in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "switchyard",
        "nats-server",
    ] {
        assert!(
            names.contains(program),
            "{program} was not running when the suite was killed: {names:?}"
        );
    }
    // Without a next run: the killed suite's processes follow it by themselves.
    let deadline = Instant::now() + CHILDREN_GONE_WITHIN;
    while !still_running(&killed.processes).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        still_running(&killed.processes),
        Vec::new(),
        "processes of the killed suite still run {CHILDREN_GONE_WITHIN:?} after it"
    );
    run_again(&binary, scenario, "real_api: 1 passed, 0 failed");
    nothing_left(&killed, &["control-plane"]);
}

/// Takes the pod suite's cluster down however the test ends.
struct TakeDown;

impl Drop for TakeDown {
    fn drop(&mut self) {
        if let Ok(cluster) = Cluster::find(POD_SUITE_CLUSTER) {
            let _ = cluster.down();
        }
    }
}

#[test]
fn a_pod_suite_killed_mid_scenario_leaves_nothing_its_next_run_does_not_take_away() {
    let _alone = one_at_a_time();
    let Some(binary) = suite_binary("pods") else {
        return;
    };
    if Cluster::find(POD_SUITE_CLUSTER).is_ok() {
        println!(
            "leftovers skipped: the cluster {POD_SUITE_CLUSTER} is up (kept with SWITCHYARD_KEEP_CLUSTER?)"
        );
        return;
    }
    let _take_down = TakeDown;
    let scenario = "the_laundry_moves_every_item_once";
    let Some(killed) = kill_mid_scenario(&binary, scenario) else {
        return;
    };
    let layout = Cluster::find(POD_SUITE_CLUSTER)
        .expect("the killed run's cluster")
        .layout;
    // Its daemons run apart from the suite, to outlive a node's restart: only the next run's care
    // takes them away.
    let orphaned = Cluster::leftovers(&layout);
    println!("the killed run left {} things:", orphaned.len());
    for thing in &orphaned {
        println!("  {thing}");
    }
    assert!(
        orphaned.iter().any(|l| l.starts_with("process ")),
        "the killed run's cluster should still run: {orphaned:?}"
    );
    run_again(&binary, scenario, "pods: 1 passed, 0 failed");
    assert_eq!(Cluster::leftovers(&layout), Vec::<String>::new());
    nothing_left(&killed, &["pods"]);
}
