//! Taking a cluster down by PID, and what a cluster (or a killed suite) may have left behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::error::ClusterError;
use super::host::{self, ip, run};
use super::layout::{host_rule_comment, Layout};
use super::state::Cluster;

impl Cluster {
    /// Takes everything away; says what could not be.
    pub fn down(&self) -> Result<(), ClusterError> {
        let l = &self.layout;
        let mut left = Vec::new();
        // The kubelets first, so that nothing restarts the pods; then whatever runs in the nodes'
        // cgroups (every container and its children); then the runtimes' shims and the rest.
        for node in &l.nodes {
            if let Some(p) = self.process(&format!("kubelet-{}", node.index)) {
                host::stop(p.pid, &p.program, Duration::from_secs(5));
            }
        }
        for node in &l.nodes {
            host::kill_all(&host::cgroup_processes(&node.cgroup_root));
            let socket = l.containerd_socket(node).display().to_string();
            host::kill_all(&host::processes_with(&format!("-address {socket}")));
        }
        for p in self.processes.iter().rev() {
            host::stop(p.pid, &p.program, Duration::from_secs(10));
            if host::is_running(p.pid, &p.program) {
                left.push(format!("process {} ({})", p.pid, p.name));
            }
        }
        for point in host::unmount_all(&l.dir) {
            left.push(format!("mount {}", point.display()));
        }
        if Path::new(&format!("/run/netns/{}", l.netns)).exists() {
            if let Err(e) = ip(&["netns", "del", &l.netns]) {
                left.push(format!("network namespace {}: {e}", l.netns));
            }
        }
        // The link's end on this machine goes with its peer; in case it did not:
        if ip(&["link", "show", &l.host_link]).is_ok() {
            let _ = ip(&["link", "del", &l.host_link]);
        }
        let comment = host_rule_comment(l);
        while run(Command::new("iptables").args([
            "-D",
            "FORWARD",
            "-i",
            &l.host_link,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "DROP",
        ]))
        .is_ok()
        {}
        for node in &l.nodes {
            for dir in host::remove_cgroup(&node.cgroup_root) {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        if left.is_empty() && host::mounts_under(&l.dir).is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&l.dir) {
                if l.dir.exists() {
                    left.push(format!("{}: {e}", l.dir.display()));
                }
            }
        } else {
            left.push(format!(
                "{} (kept: something in it is still mounted or running)",
                l.dir.display()
            ));
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Leftovers(left))
        }
    }
    /// What of the cluster is still on this machine, looked at afresh rather than taken from what
    /// `down` says: processes (by the cluster's folder in their command line, or in its nodes'
    /// cgroups), mounts, the network namespace, the link, the forwarding rule, cgroups, the folder.
    pub fn leftovers(layout: &Layout) -> Vec<String> {
        let mut left = Vec::new();
        let mut pids = host::processes_with(&layout.dir.display().to_string());
        for node in &layout.nodes {
            pids.extend(host::cgroup_processes(&node.cgroup_root));
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let command = host::command_line(pid).unwrap_or_default();
            left.push(format!("process {pid}: {command}"));
        }
        for point in host::mounts_under(&layout.dir) {
            left.push(format!("mount {}", point.display()));
        }
        if Path::new(&format!("/run/netns/{}", layout.netns)).exists() {
            left.push(format!("network namespace {}", layout.netns));
        }
        if Path::new("/sys/class/net").join(&layout.host_link).exists() {
            left.push(format!("interface {}", layout.host_link));
        }
        let rule_is_there = run(Command::new("iptables").args([
            "-C",
            "FORWARD",
            "-i",
            &layout.host_link,
            "-m",
            "comment",
            "--comment",
            &host_rule_comment(layout),
            "-j",
            "DROP",
        ]))
        .is_ok();
        if rule_is_there {
            left.push(format!("the FORWARD rule for {}", layout.host_link));
        }
        for node in &layout.nodes {
            for hierarchy in host::cgroup_hierarchies() {
                let cgroup = hierarchy.join(node.cgroup_root.trim_start_matches('/'));
                if cgroup.is_dir() {
                    left.push(format!("cgroup {}", cgroup.display()));
                }
            }
        }
        if layout.dir.exists() {
            left.push(format!("folder {}", layout.dir.display()));
        }
        left
    }
    /// One line per process and node, and the guard's counter, for `scripts/cluster status`.
    pub fn status(&self) -> String {
        let mut lines = vec![format!(
            "cluster {} in {} (network namespace {})",
            self.layout.name,
            self.layout.dir.display(),
            self.layout.netns
        )];
        for p in &self.processes {
            let state = if host::is_running(p.pid, &p.program) {
                "running"
            } else {
                "GONE"
            };
            lines.push(format!("  {:<26} pid {:>7}  {state}", p.name, p.pid));
        }
        match self.kubectl(&["get", "nodes", "-o", "wide"]) {
            Ok(out) => lines.extend(out.lines().map(|l| format!("  {l}"))),
            Err(e) => lines.push(format!("  nodes: {e}")),
        }
        match self.forwarded_by_host() {
            Ok(n) => lines.push(format!(
                "  packets this machine dropped instead of forwarding from the cluster: {n}"
            )),
            Err(e) => lines.push(format!("  the guard rule: {e}")),
        }
        lines.push(format!(
            "export KUBECONFIG={}",
            self.layout.admin_kubeconfig().display()
        ));
        lines.join("\n")
    }
    /// Packets from the cluster's link that this machine would have forwarded (and dropped).
    pub fn forwarded_by_host(&self) -> Result<u64, ClusterError> {
        let out = run(Command::new("iptables").args(["-L", "FORWARD", "-v", "-n", "-x"]))?;
        let comment = host_rule_comment(&self.layout);
        out.lines()
            .find(|l| l.contains(&comment))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ClusterError::Command {
                command: "iptables -L FORWARD".into(),
                output: format!("no rule with the comment {comment:?}"),
            })
    }
}
