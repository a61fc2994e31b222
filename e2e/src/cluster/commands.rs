//! What a test does with a cluster that is up: kubectl, images imported into its nodes' containerd,
//! a program run in its network namespace, and whether all its processes still run.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::error::ClusterError;
use super::host::{self, in_netns, run};
use super::images;
use super::layout::NodeLayout;
use super::state::Cluster;

impl Cluster {
    /// Fails with the end of its log when a process of the cluster is gone.
    pub fn check_alive(&self) -> Result<(), ClusterError> {
        for p in &self.processes {
            if !host::is_running(p.pid, &p.program) {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                return Err(ClusterError::Exited {
                    program: p.name.clone(),
                    log: p.log.clone(),
                    tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                });
            }
        }
        Ok(())
    }
    /// A command run inside the cluster's network namespace (as a node sees the cluster).
    pub fn in_netns(&self, program: &str) -> Command {
        in_netns(&self.layout.netns, program)
    }
    /// `kubectl` as the administrator; its output, or what it said when it failed.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, ClusterError> {
        run(Command::new("kubectl")
            .arg(format!(
                "--kubeconfig={}",
                self.layout.admin_kubeconfig().display()
            ))
            .args(args))
    }
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value, ClusterError> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all)?;
        serde_json::from_str(&out).map_err(|e| ClusterError::Command {
            command: format!("kubectl {}", all.join(" ")),
            output: format!("not JSON: {e}"),
        })
    }
    pub fn apply(&self, yaml: &str) -> Result<(), ClusterError> {
        let path = self
            .layout
            .path(&format!("apply-{}.yaml", std::process::id()));
        std::fs::write(&path, yaml).map_err(|e| ClusterError::io(&path, e))?;
        let result = self.kubectl(&["apply", "--server-side", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        result.map(|_| ())
    }
    /// `ctr` against one node's runtime, in the k8s.io namespace the kubelet uses.
    pub fn ctr(&self, node: &NodeLayout, args: &[&str]) -> Result<String, ClusterError> {
        run(Command::new(&self.programs.ctr)
            .arg(format!(
                "--address={}",
                self.layout.containerd_socket(node).display()
            ))
            .args(["--namespace", "k8s.io"])
            .args(args))
    }
    /// Imports an OCI archive into one node's runtime (its name is in the archive), unless that image
    /// is there already.
    pub fn import(
        &self,
        node: &NodeLayout,
        archive: &Path,
        image: &str,
    ) -> Result<(), ClusterError> {
        let archive = archive.display().to_string();
        self.ctr(
            node,
            &["images", "import", "--snapshotter", "overlayfs", &archive],
        )?;
        let listed = self.ctr(node, &["images", "ls", "-q"])?;
        let full = images::full_name(image);
        if !listed.lines().any(|l| l.trim() == full) {
            return Err(ClusterError::Command {
                command: format!("ctr images import {archive}"),
                output: format!("{full} is not among the images afterwards:\n{listed}"),
            });
        }
        Ok(())
    }
    /// Builds (or finds in the cache) the images of the chart and the examples, and imports them into
    /// every node.
    pub fn import_project_images(
        &self,
        build: &images::Build,
    ) -> Result<Vec<images::Built>, ClusterError> {
        let built = images::project_images(build)?;
        for node in &self.layout.nodes {
            for image in &built {
                for name in &image.names {
                    self.import(node, &image.archive, name)?;
                }
            }
        }
        Ok(built)
    }
}
