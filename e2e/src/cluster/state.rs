//! A cluster as `state.json` keeps it (its processes, the process it belongs to), saved and found
//! again: below the rooms that start, use and take down a cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::ClusterError;
use super::layout::Layout;
use super::programs::{self, Programs};

/// One process of the cluster, as `state.json` keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Process {
    pub name: String,
    pub pid: u32,
    /// What its command line contains (its program's path), to tell it from a reused PID.
    pub program: String,
    pub log: PathBuf,
}

/// The name of the state file in a cluster's folder.
const STATE: &str = "state.json";
/// The process a cluster belongs to: its pid, and its program (so that a pid used again by another
/// program is not taken for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub program: String,
}

impl Owner {
    pub(super) fn this_process() -> Option<Owner> {
        let program = std::env::current_exe().ok()?.display().to_string();
        Some(Owner {
            pid: std::process::id(),
            program,
        })
    }
}

/// A cluster that is up. Dropping it does nothing: [`Cluster::down`] takes it down (the pod suite
/// wraps it in a guard that does).
#[derive(Debug)]
pub struct Cluster {
    pub layout: Layout,
    pub programs: Programs,
    pub processes: Vec<Process>,
    /// How long `up` took, by phase, for the suite to print.
    pub timings: Vec<(String, Duration)>,
    /// The process it belongs to, if any (`Options::owned_by_this_process`).
    pub owner: Option<Owner>,
}

impl Cluster {
    /// The cluster's folder for `name` under `root` (default `/var/lib/switchyard-cluster`).
    pub fn root() -> PathBuf {
        std::env::var_os("SWITCHYARD_CLUSTER_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/switchyard-cluster"))
    }
    pub(super) fn phase(&mut self, name: &str, started: Instant) {
        self.timings.push((name.to_string(), started.elapsed()));
    }
    pub(super) fn save(&self) -> Result<(), ClusterError> {
        let state = json!({
            "name": self.layout.name,
            "nodes": self.layout.nodes.len(),
            "kube_bin": self.programs.kube_bin,
            "processes": self.processes.iter().map(|p| json!({
                "name": p.name, "pid": p.pid, "program": p.program, "log": p.log,
            })).collect::<Vec<_>>(),
            "owner": self.owner.as_ref().map(|o| json!({"pid": o.pid, "program": o.program})),
        });
        let path = self.layout.path(STATE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(|e| ClusterError::io(&path, e))
    }
    /// The cluster recorded in `dir`'s state file.
    pub fn load(dir: &Path) -> Result<Cluster, ClusterError> {
        let path = dir.join(STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| ClusterError::io(&path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| ClusterError::Command {
            command: format!("read {}", path.display()),
            output: e.to_string(),
        })?;
        let name = state["name"].as_str().unwrap_or_default().to_string();
        let nodes = state["nodes"].as_u64().unwrap_or(1) as u8;
        let root = dir.parent().unwrap_or(dir);
        let layout = Layout::new(root, &name, nodes);
        let kube_bin = PathBuf::from(state["kube_bin"].as_str().unwrap_or_default());
        let processes = state["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| Process {
                name: p["name"].as_str().unwrap_or_default().to_string(),
                pid: p["pid"].as_u64().unwrap_or(0) as u32,
                program: p["program"].as_str().unwrap_or_default().to_string(),
                log: PathBuf::from(p["log"].as_str().unwrap_or_default()),
            })
            .collect();
        let programs = Programs {
            kube_bin,
            etcd: programs::on_path("etcd").unwrap_or_default(),
            containerd: programs::on_path("containerd").unwrap_or_default(),
            ctr: programs::on_path("ctr").unwrap_or_else(|| PathBuf::from("ctr")),
        };
        let owner = state["owner"].as_object().map(|o| Owner {
            pid: o.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32,
            program: o
                .get("program")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        });
        Ok(Cluster {
            layout,
            programs,
            processes,
            timings: Vec::new(),
            owner,
        })
    }
    /// Cluster `name` under the root, if it was brought up.
    pub fn find(name: &str) -> Result<Cluster, ClusterError> {
        let dir = Cluster::root().join(name);
        if !dir.join(STATE).is_file() {
            return Err(ClusterError::NotUp {
                name: name.to_string(),
            });
        }
        Cluster::load(&dir)
    }
    pub(super) fn process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.name == name)
    }
}
