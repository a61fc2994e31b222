//! What the pod scenarios share: the cluster (two nodes, the second labelled and tainted), the chart
//! installed with its NATS as a user installs it, and readers of what pods and files say.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_e2e::cluster::Cluster;

pub const RELEASE: &str = "switchyard";
pub const SYSTEM: &str = "switchyard-system";

pub struct Suite {
    pub cluster: Cluster,
    pub repo: PathBuf,
    /// A folder with `kubectl-switchyard` in it, for `kubectl switchyard`.
    pub plugin_dir: tempfile::TempDir,
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn succeeded(what: &str, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// How long one kubectl, helm or plugin command may take before the scenario gives up on it.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);

fn read_all_of(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Waits for a child for at most `limit`; past it, kills it and fails, naming `what`.
fn finish_within(mut child: Child, what: &str, limit: Duration) -> Output {
    let stdout = read_all_of(child.stdout.take());
    let stderr = read_all_of(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {}s", limit.as_secs());
            }
            Err(e) => panic!("{what}: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A command left running while the scenario goes on (`kubectl switchyard tap`): its error lines as
/// they come, its output once it ends.
pub struct Background {
    what: String,
    child: Option<Child>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr_lines: mpsc::Receiver<String>,
    said: String,
}

impl Background {
    /// Waits until the command writes a line containing `needle` to its error output.
    pub fn wait_for_stderr(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.said.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.said.push_str(&line);
                    self.said.push('\n');
                }
                Err(_) => panic!(
                    "{} did not say {needle:?} within {}s; it said: {}",
                    self.what,
                    limit.as_secs(),
                    self.said
                ),
            }
        }
    }

    /// Its output, once it has ended by itself within `limit`.
    pub fn finish(mut self, limit: Duration) -> String {
        let mut child = self.child.take().expect("a child");
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} did not finish within {}s; it said: {}",
                        self.what,
                        limit.as_secs(),
                        self.said
                    );
                }
            }
        };
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        assert!(
            status.success(),
            "{} failed: {}{}",
            self.what,
            text(&stdout),
            self.said
        );
        text(&stdout)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `done`, looking every half second, failing after `limit` with what it waited for.
pub fn wait_for(limit: Duration, what: &str, done: impl FnMut() -> bool) -> Duration {
    switchyard_e2e::wait_polling(limit, Duration::from_millis(500), what, done)
}

impl Suite {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("KUBECONFIG", self.cluster.layout.admin_kubeconfig())
            .env("PATH", self.path())
            .stdin(Stdio::null());
        command
    }

    /// PATH with the plugin first, then the cluster's own kubectl.
    fn path(&self) -> String {
        format!(
            "{}:{}:{}",
            self.plugin_dir.path().display(),
            self.cluster.programs.kube_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// Runs a command with its output collected, for at most [`COMMAND_LIMIT`].
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let what = format!("{program} {}", args.join(" "));
        let child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        finish_within(child, &what, COMMAND_LIMIT)
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.run("kubectl", args)
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        text(&succeeded(&format!("kubectl {}", args.join(" ")), self.kubectl(args)).stdout)
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        self.run("helm", args)
    }

    /// `kubectl switchyard ARGS`, as a user runs the plugin.
    pub fn plugin(&self, args: &[&str]) -> Output {
        let mut all = vec!["switchyard"];
        all.extend(args);
        self.run("kubectl", &all)
    }

    /// `kubectl switchyard ARGS` left running.
    pub fn plugin_in_background(&self, args: &[&str]) -> Background {
        let what = format!("kubectl switchyard {}", args.join(" "));
        let mut child = self
            .command("kubectl")
            .arg("switchyard")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let stdout = read_all_of(child.stdout.take());
        let (lines, stderr_lines) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if lines.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Background {
            what,
            child: Some(child),
            stdout: Some(stdout),
            stderr_lines,
            said: String::new(),
        }
    }

    pub fn plugin_ok(&self, args: &[&str]) -> String {
        text(
            &succeeded(
                &format!("kubectl switchyard {}", args.join(" ")),
                self.plugin(args),
            )
            .stdout,
        )
    }

    /// `kubectl apply -f -` of YAML text.
    pub fn apply(&self, yaml: &str) -> Output {
        let mut child = self
            .command("kubectl")
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(mut input) = child.stdin.take() {
            std::io::Write::write_all(&mut input, yaml.as_bytes()).expect("write to kubectl");
        }
        finish_within(child, "kubectl apply", COMMAND_LIMIT)
    }

    pub fn apply_ok(&self, yaml: &str) {
        succeeded("kubectl apply", self.apply(yaml));
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn pipeline(&self, ns: &str, name: &str) -> Value {
        self.json(&["get", "pipeline", name, "-n", ns])
    }

    /// (status, reason, message) of a Pipeline's condition.
    pub fn condition(&self, ns: &str, name: &str, type_: &str) -> Option<(String, String, String)> {
        self.pipeline(ns, name)["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("status"), s("reason"), s("message"))
            })
    }

    /// A fresh namespace for a scenario (one a failed run left is deleted first).
    pub fn namespace(&self, ns: &str) {
        if self.kubectl(&["get", "namespace", ns]).status.success() {
            self.delete_namespace(ns);
        }
        self.kubectl_ok(&["create", "namespace", ns]);
        wait_for(
            Duration::from_secs(30),
            "the namespace's default ServiceAccount",
            || {
                self.kubectl(&["get", "serviceaccount", "default", "-n", ns])
                    .status
                    .success()
            },
        );
    }

    /// Pods of a unit (or of every unit with `unit` None), as JSON.
    pub fn pods(&self, ns: &str, pipeline: &str, unit: Option<&str>) -> Vec<Value> {
        let mut selector = format!("switchyard.dev/pipeline={pipeline}");
        if let Some(unit) = unit {
            selector.push_str(&format!(",switchyard.dev/unit={unit}"));
        }
        self.json(&["get", "pods", "-n", ns, "-l", &selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Where the kubelet keeps a pod's emptyDir `volume` on its node: the test is the node, so it
    /// reads what a unit wrote there as the unit wrote it (a user reads the same items with
    /// `kubectl switchyard tap`). None while the pod is not yet scheduled: it has no node, and
    /// nothing written, yet.
    pub fn empty_dir(&self, pod: &Value, volume: &str) -> Option<PathBuf> {
        let node_name = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty())?;
        let node = self
            .cluster
            .layout
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .unwrap_or_else(|| panic!("pod on an unknown node {node_name:?}"));
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        Some(self.cluster.layout.node_dir(node).join(format!(
            "kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/{volume}"
        )))
    }

    /// The lines a file sink wrote in its working folder (`/work` of its pod).
    pub fn sink_lines(&self, ns: &str, pipeline: &str, unit: &str, file: &str) -> Vec<String> {
        let pods: Vec<Value> = self
            .pods(ns, pipeline, Some(unit))
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        let Some(work) = pods.first().and_then(|pod| self.empty_dir(pod, "work")) else {
            return Vec::new();
        };
        std::fs::read_to_string(work.join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The host PIDs of the main process of each container of `pods` (from the nodes' runtimes).
    pub fn container_pids(&self, pods: &[Value]) -> Vec<u32> {
        let mut ids = Vec::new();
        for pod in pods {
            for status in pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(id) = status["containerID"]
                    .as_str()
                    .and_then(|i| i.strip_prefix("containerd://"))
                {
                    ids.push(id.to_string());
                }
            }
        }
        let mut pids = Vec::new();
        for node in &self.cluster.layout.nodes {
            let Ok(tasks) = self.cluster.ctr(node, &["tasks", "ls"]) else {
                continue;
            };
            for line in tasks.lines().skip(1) {
                let mut fields = line.split_whitespace();
                if let (Some(id), Some(pid)) = (fields.next(), fields.next()) {
                    if ids.iter().any(|i| i == id) {
                        if let Ok(pid) = pid.parse() {
                            pids.push(pid);
                        }
                    }
                }
            }
        }
        pids
    }

    /// SIGKILLs the containers of `pods` on their nodes, as the kernel's OOM killer or a crash would.
    pub fn kill_containers(&self, pods: &[Value]) -> usize {
        let pids = self.container_pids(pods);
        for pid in &pids {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        pids.len()
    }

    /// Resident memory of a container's main process, in MiB.
    pub fn rss_mib(pid: u32) -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// Deletes a namespace and waits until it is gone (its Pipelines' finalizers ran).
    /// Its Pipelines first, while what they run on (a NATS in the same namespace) is still there to
    /// clean up; then the namespace.
    pub fn delete_namespace(&self, ns: &str) {
        let _ = self.kubectl(&["delete", "pipelines", "--all", "-n", ns, "--wait=false"]);
        wait_for(
            Duration::from_secs(120),
            &format!("the Pipelines of {ns} deleted (their finalizers done)"),
            || {
                self.json(&["get", "pipelines", "-n", ns])["items"]
                    .as_array()
                    .is_some_and(|items| items.is_empty())
            },
        );
        let _ = self.kubectl(&["delete", "namespace", ns, "--wait=false"]);
        wait_for(
            Duration::from_secs(120),
            &format!("namespace {ns} deleted"),
            || !self.kubectl(&["get", "namespace", ns]).status.success(),
        );
    }
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Each line's `field` (a number), and how often each value came.
pub fn counts(lines: &[String], field: &str) -> std::collections::BTreeMap<u64, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for line in lines {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(n) = value[field].as_u64() {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

/// Asserts that every value 1..=n came exactly once.
pub fn exactly_once(lines: &[String], field: &str, n: u64) {
    let counts = counts(lines, field);
    let twice: Vec<u64> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(v, _)| *v)
        .take(10)
        .collect();
    let missing: Vec<u64> = (1..=n)
        .filter(|v| !counts.contains_key(v))
        .take(10)
        .collect();
    assert!(
        twice.is_empty() && missing.is_empty() && lines.len() as u64 == n,
        "{} lines for {n} items: twice {twice:?}, missing {missing:?}",
        lines.len()
    );
}

/// The first ELF program named `name` on PATH (past wrapper scripts such as pyenv's shims).
pub fn program_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| {
            let mut magic = [0u8; 4];
            std::fs::File::open(p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && magic == *b"\x7fELF"
        })
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Seconds since `started`, to a tenth.
pub fn secs(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 10.0).round() / 10.0
}
