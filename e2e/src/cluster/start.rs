//! Bringing a cluster up: its network, the control plane, the nodes and the cluster's add-ons
//! (kube-proxy, storage, DNS), each process recorded as it starts.

use std::path::Path;

use std::time::{Duration, Instant};

use super::arguments;
use super::error::ClusterError;
use super::host::{spawn_daemon, wait_for};
use super::images::{self, coredns_image, pause_image};
use super::layout::{self, Layout, NodeLayout};
use super::network;
use super::pki;
use super::state::{Cluster, Process};

/// Local PersistentVolumes the cluster offers on its first node.
pub const STORAGE_VOLUMES: usize = 4;

impl Cluster {
    pub(super) fn start(&mut self) -> Result<(), ClusterError> {
        let began = Instant::now();
        let l = self.layout.clone();
        for dir in ["logs", "pki", "volumes"] {
            let path = l.path(dir);
            std::fs::create_dir_all(&path).map_err(|e| ClusterError::io(&path, e))?;
        }
        pki::create(&l)?;
        let started = Instant::now();
        network::create(&self.layout)?;
        self.save()?;
        self.phase("network", started);

        let started = Instant::now();
        self.control_plane()?;
        self.phase("control plane ready", started);

        let started = Instant::now();
        self.nodes()?;
        self.phase("nodes Ready", started);

        let started = Instant::now();
        self.add_ons()?;
        self.phase("cluster DNS ready", started);
        self.phase("up", began);
        self.save()
    }
    /// Every node (containerd, kubelet), then kube-proxy, until every node is Ready.
    fn nodes(&mut self) -> Result<(), ClusterError> {
        let l = self.layout.clone();
        for node in l.nodes.clone() {
            self.node(&node)?;
        }
        self.daemon(
            "kube-proxy",
            &self.programs.kube("kube-proxy"),
            vec![format!("--config={}", l.path("kube-proxy.yaml").display())],
            |d| {
                std::fs::write(l.path("kube-proxy.yaml"), layout::kube_proxy_config(&l))
                    .map_err(|e| ClusterError::io(d, e))
            },
        )?;
        self.save()?;
        wait_for(Duration::from_secs(90), "every node Ready", || {
            self.check_alive()?;
            let nodes = self.kubectl_json(&["get", "nodes"])?;
            let ready = nodes["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .count();
            Ok(ready == l.nodes.len())
        })?;
        Ok(())
    }

    /// What every cluster has besides its nodes: the default ServiceAccount, local volumes and
    /// their StorageClass, and the cluster DNS, ready.
    fn add_ons(&mut self) -> Result<(), ClusterError> {
        let l = self.layout.clone();
        wait_for(
            Duration::from_secs(60),
            "the default ServiceAccount",
            || {
                Ok(self
                    .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                    .map(|_| true)
                    .unwrap_or(false))
            },
        )?;
        for i in 0..STORAGE_VOLUMES {
            let dir = layout::volume_dir(&l, i);
            std::fs::create_dir_all(&dir).map_err(|e| ClusterError::io(&dir, e))?;
        }
        self.apply(&layout::storage_manifest(&l, STORAGE_VOLUMES, "5Gi"))?;
        self.apply(&layout::coredns_manifest(&l, &coredns_image()))?;
        wait_for(
            Duration::from_secs(90),
            "the cluster DNS (CoreDNS) ready",
            || {
                self.check_alive()?;
                let d =
                    self.kubectl_json(&["get", "deployment", "coredns", "-n", "kube-system"])?;
                Ok(d["status"]["readyReplicas"].as_i64() == Some(1))
            },
        )?;
        Ok(())
    }

    /// Starts `program` in the namespace, after `prepare`, and records it.
    pub(super) fn daemon(
        &mut self,
        name: &str,
        program: &Path,
        args: Vec<String>,
        prepare: impl FnOnce(&Path) -> Result<(), ClusterError>,
    ) -> Result<(), ClusterError> {
        prepare(&self.layout.dir)?;
        let log = self.layout.path(&format!("logs/{name}.log"));
        let pid = spawn_daemon(&self.layout.netns, program, &args, &log)?;
        self.processes.push(Process {
            name: name.to_string(),
            pid,
            program: program.display().to_string(),
            log,
        });
        Ok(())
    }
    pub(super) fn control_plane(&mut self) -> Result<(), ClusterError> {
        let l = self.layout.clone();
        self.daemon(
            "etcd",
            &self.programs.etcd.clone(),
            arguments::etcd(&l),
            |_| Ok(()),
        )?;
        std::fs::write(
            l.path("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )
        .map_err(|e| ClusterError::io(l.path("audit-policy.yaml"), e))?;
        self.daemon(
            "kube-apiserver",
            &self.programs.kube("kube-apiserver"),
            arguments::apiserver(&l),
            |_| Ok(()),
        )?;
        self.save()?;
        wait_for(Duration::from_secs(90), "the API server's /readyz", || {
            self.check_alive()?;
            Ok(self.kubectl(&["get", "--raw", "/readyz"]).is_ok())
        })?;
        self.daemon(
            "kube-controller-manager",
            &self.programs.kube("kube-controller-manager"),
            arguments::controller_manager(&l),
            |_| Ok(()),
        )?;
        self.daemon(
            "kube-scheduler",
            &self.programs.kube("kube-scheduler"),
            arguments::scheduler(&l),
            |_| Ok(()),
        )?;
        self.save()
    }

    /// One node: its container runtime (with the sandbox and DNS images imported) and its kubelet.
    pub(super) fn node(&mut self, node: &NodeLayout) -> Result<(), ClusterError> {
        let l = self.layout.clone();
        let dir = l.node_dir(node);
        write_node_files(&l, node)?;
        self.daemon(
            &format!("containerd-{}", node.index),
            &self.programs.containerd.clone(),
            vec![
                format!("--config={}", dir.join("containerd/config.toml").display()),
                format!("--address={}", l.containerd_socket(node).display()),
            ],
            |_| Ok(()),
        )?;
        self.save()?;
        wait_for(Duration::from_secs(30), "containerd's socket", || {
            self.check_alive()?;
            Ok(self.ctr(node, &["version"]).is_ok())
        })?;
        let started = Instant::now();
        for (image, archive) in [
            (pause_image(), images::pause(&self.programs)?),
            (coredns_image(), images::coredns(&self.programs)?),
        ] {
            self.import(node, &archive, &image)?;
        }
        self.phase(&format!("node {}: images imported", node.index), started);
        self.daemon(
            &format!("kubelet-{}", node.index),
            &self.programs.kube("kubelet"),
            arguments::kubelet(&l, node),
            |_| Ok(()),
        )?;
        self.save()
    }
}

/// A node's folders and the configuration of its runtime, CNI and kubelet.
fn write_node_files(l: &Layout, node: &NodeLayout) -> Result<(), ClusterError> {
    let dir = l.node_dir(node);
    for sub in [
        "containerd",
        "cni/net.d",
        "cni/ipam",
        "pod-logs",
        "kubelet",
        "runc",
    ] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| ClusterError::io(&path, e))?;
    }
    let write = |relative: &str, text: &str| {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| ClusterError::io(&path, e))
    };
    write(
        "containerd/config.toml",
        &layout::containerd_config(l, node, &pause_image()),
    )?;
    for registry in layout::REGISTRIES {
        write(
            &format!("containerd/certs.d/{registry}/hosts.toml"),
            &layout::registry_hosts(),
        )?;
    }
    write(
        "cni/net.d/10-switchyard.conflist",
        &layout::cni_config(l, node),
    )?;
    // Pods that use the node's DNS settings (CoreDNS itself) get none: there is no upstream.
    write("resolv.conf", "# the test cluster has no DNS but its own\n")?;
    write("kubelet.yaml", &layout::kubelet_config(l, node))?;
    Ok(())
}
