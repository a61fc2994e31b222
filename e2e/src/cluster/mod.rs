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

pub mod error;
pub mod host;
pub mod images;
pub mod layout;
pub mod pki;
pub mod programs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use error::ClusterError;
use host::{in_netns, ip, run, spawn_daemon, wait_for};
pub use images::{coredns_image, pause_image};
pub use layout::{Layout, NodeLayout};
pub use programs::{machine_allows, Programs};

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
/// The comment on the one rule `up` adds to this machine's firewall.
fn host_rule_comment(layout: &Layout) -> String {
    format!(
        "switchyard test cluster {}: nothing from it is forwarded",
        layout.name
    )
}

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

/// The process a cluster belongs to: its pid, and its program (so that a pid used again by another
/// program is not taken for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub program: String,
}

impl Owner {
    fn this_process() -> Option<Owner> {
        let program = std::env::current_exe().ok()?.display().to_string();
        Some(Owner {
            pid: std::process::id(),
            program,
        })
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

    fn phase(&mut self, name: &str, started: Instant) {
        self.timings.push((name.to_string(), started.elapsed()));
    }

    fn start(&mut self) -> Result<(), ClusterError> {
        let began = Instant::now();
        let l = self.layout.clone();
        for dir in ["logs", "pki", "volumes"] {
            let path = l.path(dir);
            std::fs::create_dir_all(&path).map_err(|e| ClusterError::io(&path, e))?;
        }
        pki::create(&l)?;
        let started = Instant::now();
        self.network()?;
        self.save()?;
        self.phase("network", started);

        let started = Instant::now();
        self.control_plane()?;
        self.phase("control plane ready", started);

        let started = Instant::now();
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
        self.phase("nodes Ready", started);

        let started = Instant::now();
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
        self.phase("cluster DNS ready", started);
        self.phase("up", began);
        self.save()
    }

    /// The namespace, its link to this machine, one bridge per node, the route of the Service range,
    /// and a firewall inside that forwards only between the cluster's own bridges.
    fn network(&mut self) -> Result<(), ClusterError> {
        let l = &self.layout;
        let links = ip(&["-o", "-4", "addr", "show"])?;
        for address in [l.host_address, l.node_address] {
            if links.contains(&format!("inet {address}/")) {
                return Err(ClusterError::Unavailable(format!(
                    "this machine already has {address}, which cluster {} would use for its link; choose another name",
                    l.name
                )));
            }
        }
        ip(&["netns", "add", &l.netns])?;
        let ns = |args: &[&str]| run(in_netns(&l.netns, "ip").args(args)).map(|_| ());
        ns(&["link", "set", "lo", "up"])?;
        ip(&[
            "link",
            "add",
            &l.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &l.node_link,
        ])?;
        ip(&["link", "set", &l.node_link, "netns", &l.netns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", l.host_address),
            "dev",
            &l.host_link,
        ])?;
        ip(&["link", "set", &l.host_link, "up"])?;
        ns(&[
            "addr",
            "add",
            &format!("{}/30", l.node_address),
            "dev",
            &l.node_link,
        ])?;
        ns(&["link", "set", &l.node_link, "up"])?;
        for node in &l.nodes {
            ns(&["link", "add", &node.bridge, "type", "bridge"])?;
            ns(&[
                "addr",
                "add",
                &format!("{}/24", node.address),
                "dev",
                &node.bridge,
            ])?;
            ns(&["link", "set", &node.bridge, "up"])?;
        }
        // Service addresses that no rule of kube-proxy rewrote stay on the first bridge, where
        // nothing answers, even before kube-proxy has written its rules.
        ns(&["route", "add", l.service_cidr, "dev", &l.nodes[0].bridge])?;
        let sysctl = |key: &str, value: &str| {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            run(in_netns(&l.netns, "sh").args(["-c", &format!("echo {value} > {path}")]))
                .map(|_| ())
        };
        // Inside the namespace only: the machine's own settings stay as they are.
        sysctl("net.ipv4.ip_forward", "1")?;
        sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
        sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        let iptables = |args: &[&str]| run(in_netns(&l.netns, "iptables").args(args)).map(|_| ());
        iptables(&["-N", "SWITCHYARD-GUARD"])?;
        iptables(&[
            "-A",
            "SWITCHYARD-GUARD",
            "-i",
            &format!("sy{}b+", l.id),
            "-o",
            &format!("sy{}b+", l.id),
            "-j",
            "RETURN",
        ])?;
        iptables(&[
            "-A",
            "SWITCHYARD-GUARD",
            "-m",
            "comment",
            "--comment",
            "only between the cluster's bridges",
            "-j",
            "DROP",
        ])?;
        iptables(&["-I", "FORWARD", "1", "-j", "SWITCHYARD-GUARD"])?;
        // On this machine: whatever the link would have forwarded is dropped, and counted.
        run(Command::new("iptables").args([
            "-I",
            "FORWARD",
            "1",
            "-i",
            &l.host_link,
            "-m",
            "comment",
            "--comment",
            &host_rule_comment(l),
            "-j",
            "DROP",
        ]))?;
        for node in &l.nodes {
            host::create_cgroup(&node.cgroup_root)?;
        }
        Ok(())
    }

    /// Starts `program` in the namespace, after `prepare`, and records it.
    fn daemon(
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

    fn control_plane(&mut self) -> Result<(), ClusterError> {
        let l = self.layout.clone();
        let pki = |f: &str| l.path(&format!("pki/{f}")).display().to_string();
        self.daemon(
            "etcd",
            &self.programs.etcd.clone(),
            vec![
                format!("--data-dir={}", l.path("etcd").display()),
                format!(
                    "--listen-client-urls=http://127.0.0.1:{}",
                    l.etcd_client_port
                ),
                format!(
                    "--advertise-client-urls=http://127.0.0.1:{}",
                    l.etcd_client_port
                ),
                format!("--listen-peer-urls=http://127.0.0.1:{}", l.etcd_peer_port),
                format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    l.etcd_peer_port
                ),
                format!(
                    "--initial-cluster=default=http://127.0.0.1:{}",
                    l.etcd_peer_port
                ),
                "--unsafe-no-fsync".into(),
                "--quota-backend-bytes=4294967296".into(),
            ],
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
            vec![
                format!("--etcd-servers=http://127.0.0.1:{}", l.etcd_client_port),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={}", l.advertise_address()),
                format!("--secure-port={}", l.apiserver_port),
                format!("--cert-dir={}", l.path("pki/apiserver-generated").display()),
                format!("--tls-cert-file={}", pki("apiserver.crt")),
                format!("--tls-private-key-file={}", pki("apiserver.key")),
                format!("--client-ca-file={}", pki("ca.crt")),
                format!(
                    "--kubelet-client-certificate={}",
                    pki("apiserver-kubelet-client.crt")
                ),
                format!(
                    "--kubelet-client-key={}",
                    pki("apiserver-kubelet-client.key")
                ),
                // The nodes' addresses, never their names: a name would be looked up in this
                // machine's DNS.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--service-account-key-file={}", pki("sa.pub")),
                format!("--service-account-signing-key-file={}", pki("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--token-auth-file={}", pki("tokens.csv")),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement"
                    .into(),
                format!("--service-cluster-ip-range={}", l.service_cidr),
                format!(
                    "--audit-policy-file={}",
                    l.path("audit-policy.yaml").display()
                ),
                format!("--audit-log-path={}", l.path("logs/audit.log").display()),
                format!("--audit-log-maxsize={}", crate::control_plane::AUDIT_LOG_MB),
                "--audit-log-maxbackup=1".into(),
                "--profiling=false".into(),
            ],
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
            vec![
                format!(
                    "--kubeconfig={}",
                    l.path("controller-manager.kubeconfig").display()
                ),
                format!(
                    "--authentication-kubeconfig={}",
                    l.path("controller-manager.kubeconfig").display()
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    l.path("controller-manager.kubeconfig").display()
                ),
                "--controllers=*".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", pki("sa.key")),
                format!("--root-ca-file={}", pki("ca.crt")),
                format!("--service-cluster-ip-range={}", l.service_cidr),
                format!("--cluster-cidr={}", l.cluster_cidr),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", layout::CONTROLLER_MANAGER_PORT),
                "--profiling=false".into(),
            ],
            |_| Ok(()),
        )?;
        self.daemon(
            "kube-scheduler",
            &self.programs.kube("kube-scheduler"),
            vec![
                format!("--kubeconfig={}", l.path("scheduler.kubeconfig").display()),
                format!(
                    "--authentication-kubeconfig={}",
                    l.path("scheduler.kubeconfig").display()
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    l.path("scheduler.kubeconfig").display()
                ),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", layout::SCHEDULER_PORT),
                "--profiling=false".into(),
            ],
            |_| Ok(()),
        )?;
        self.save()
    }

    /// One node: its container runtime (with the sandbox and DNS images imported) and its kubelet.
    fn node(&mut self, node: &NodeLayout) -> Result<(), ClusterError> {
        let l = self.layout.clone();
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
            &layout::containerd_config(&l, node, &pause_image()),
        )?;
        for registry in layout::REGISTRIES {
            write(
                &format!("containerd/certs.d/{registry}/hosts.toml"),
                &layout::registry_hosts(),
            )?;
        }
        write(
            "cni/net.d/10-switchyard.conflist",
            &layout::cni_config(&l, node),
        )?;
        // Pods that use the node's DNS settings (CoreDNS itself) get none: there is no upstream.
        write("resolv.conf", "# the test cluster has no DNS but its own\n")?;
        write("kubelet.yaml", &layout::kubelet_config(&l, node))?;
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
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut args = vec![
            format!("--config={}", dir.join("kubelet.yaml").display()),
            format!(
                "--kubeconfig={}",
                l.path(&pki::kubeconfig_name(&format!("system:node:{}", node.name)))
                    .display()
            ),
            format!("--root-dir={}", dir.join("kubelet").display()),
            format!("--cert-dir={}", dir.join("kubelet/pki").display()),
            format!("--hostname-override={}", node.name),
            format!("--node-ip={}", node.address),
        ];
        if !labels.is_empty() {
            args.push(format!("--node-labels={}", labels.join(",")));
        }
        self.daemon(
            &format!("kubelet-{}", node.index),
            &self.programs.kube("kubelet"),
            args,
            |_| Ok(()),
        )?;
        self.save()
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

    fn save(&self) -> Result<(), ClusterError> {
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

    fn process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.name == name)
    }

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

    /// A command run inside the cluster's network namespace (as a node sees the cluster).
    pub fn in_netns(&self, program: &str) -> Command {
        in_netns(&self.layout.netns, program)
    }
}

/// Local PersistentVolumes the cluster offers on its first node.
pub const STORAGE_VOLUMES: usize = 4;

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
