//! A real Kubernetes cluster on this machine, pods included: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, one kubelet and containerd per node, kube-proxy and
//! CoreDNS, all inside a network namespace of their own from which nothing can leave
//! ([`layout`] says how). `scripts/cluster` runs it for a person (`up`, `images`, `status`,
//! `down`); the pod suite (`e2e/tests/pods`) starts one of its own.
//!
//! The Kubernetes programs and CoreDNS come from `scripts/kube-binaries` (built from their Go
//! modules into a cache outside the repository); containerd, runc, the CNI plugins and etcd from
//! Debian. Images are built here ([`images`]) and imported; no registry is ever asked.
//!
//! `up` records every process it starts in `state.json`; `down` stops each by PID (checking that the
//! PID still runs that program), kills what the pods left in the nodes' cgroups, unmounts what the
//! kubelets and runtimes mounted, deletes the network namespace (its links, bridges and firewall go
//! with it) and the one rule it added on this machine, and removes the cgroups and the folder.

mod arguments;
mod commands;
mod down;
pub mod error;
pub mod host;
pub mod images;
pub mod layout;
mod network;
pub mod pki;
pub mod programs;
mod start;
mod state;

use std::path::Path;

pub use error::ClusterError;
pub use images::{coredns_image, pause_image};
pub use layout::{Layout, NodeLayout};
pub use programs::{machine_allows, Programs};
pub use start::STORAGE_VOLUMES;
pub use state::{Cluster, Owner, Process};

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u8,
    /// The cluster belongs to this process (a test suite): should the process die without taking
    /// it down, the next `up` of the same name takes it down and starts afresh instead of refusing.
    /// A cluster someone brought up by hand (`scripts/cluster up`) has no owner and is left alone.
    pub owned_by_this_process: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nodes: 1,
            owned_by_this_process: false,
        }
    }
}

/// Pure: what `up` does about a cluster of the same name whose state it found: `running` says
/// whether any of its processes still runs, `owner_alive` whether the process it belongs to does.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Nothing of it runs: what a crashed run left, taken away first.
    Leftover,
    /// It runs, and its owner is gone (a suite killed before it could take it down): taken away.
    Orphaned,
    /// It runs and is someone's: refused.
    InUse,
}

fn found(running: bool, owner: Option<&Owner>, owner_alive: impl Fn(&Owner) -> bool) -> Found {
    match (running, owner) {
        (false, _) => Found::Leftover,
        (true, Some(owner)) if !owner_alive(owner) => Found::Orphaned,
        (true, _) => Found::InUse,
    }
}

impl Cluster {
    /// Brings cluster `name` up, from nothing, and waits until every node is Ready, the default
    /// ServiceAccount exists and the cluster DNS answers.
    pub fn up(name: &str, options: &Options) -> Result<Cluster, ClusterError> {
        machine_allows()?;
        let programs = Programs::find()?;
        let layout = Layout::new(&Cluster::root(), name, options.nodes);
        if let Ok(cluster) = Cluster::load(&layout.dir) {
            let running = cluster
                .processes
                .iter()
                .any(|p| host::is_running(p.pid, &p.program));
            match found(running, cluster.owner.as_ref(), |o| {
                host::is_running(o.pid, &o.program)
            }) {
                Found::InUse => {
                    return Err(ClusterError::AlreadyUp {
                        name: name.to_string(),
                        kubeconfig: layout.admin_kubeconfig(),
                    })
                }
                Found::Orphaned => eprintln!(
                    "cluster {name}: the process it belonged to ({}) is gone; taking it down to start afresh",
                    cluster.owner.as_ref().map_or(String::new(), |o| format!("pid {}, {}", o.pid, o.program))
                ),
                Found::Leftover => {}
            }
            cluster.down()?;
        }
        let mut cluster = Cluster {
            layout,
            programs,
            processes: Vec::new(),
            timings: Vec::new(),
            owner: options
                .owned_by_this_process
                .then(Owner::this_process)
                .flatten(),
        };
        match cluster.start() {
            Ok(()) => Ok(cluster),
            Err(e) => {
                if std::env::var_os("SWITCHYARD_KEEP_CLUSTER").is_some() {
                    eprintln!(
                        "cluster {}: kept as it is (SWITCHYARD_KEEP_CLUSTER)",
                        cluster.layout.name
                    );
                    return Err(e);
                }
                let saved = std::env::temp_dir()
                    .join(format!("switchyard-cluster-{}-logs", cluster.layout.name));
                let _ = std::fs::remove_dir_all(&saved);
                let _ = copy_logs(&cluster.layout.dir.join("logs"), &saved);
                for node in &cluster.layout.nodes {
                    let _ = copy_logs(
                        &cluster.layout.node_dir(node).join("pod-logs"),
                        &saved.join(format!("pods-{}", node.index)),
                    );
                }
                if let Err(down) = cluster.down() {
                    eprintln!("cluster {}: after a failed up, {down}", cluster.layout.name);
                }
                eprintln!(
                    "cluster {}: its logs are kept in {}",
                    cluster.layout.name,
                    saved.display()
                );
                Err(e)
            }
        }
    }
}

/// Local PersistentVolumes the cluster offers on its first node.
/// Copies the logs in `from` (and its folders: the pods' logs are a tree) to `to`.
pub fn copy_logs(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)?.flatten() {
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_logs(&entry.path(), &to.join(entry.file_name()))?;
        } else if kind.is_file() || kind.is_symlink() {
            let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed pod suite left its cluster running and the next run stopped on `AlreadyUp` until
    /// someone ran `scripts/cluster down`; a cluster someone brought up by hand is still left alone.
    #[test]
    fn a_running_cluster_is_taken_down_only_when_the_process_it_belonged_to_is_gone() {
        let suite = Owner {
            pid: 4242,
            program: "/work/target/debug/deps/pods-0123".into(),
        };
        assert_eq!(found(false, Some(&suite), |_| true), Found::Leftover);
        assert_eq!(found(false, None, |_| false), Found::Leftover);
        assert_eq!(found(true, Some(&suite), |_| false), Found::Orphaned);
        assert_eq!(found(true, Some(&suite), |_| true), Found::InUse);
        assert_eq!(found(true, None, |_| false), Found::InUse);
    }
}
