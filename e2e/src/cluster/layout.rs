//! The test cluster's layout and the configuration files of its programs. Pure: a name and a node
//! count give every address, port, path and file, so `up`, `down` and `status` agree on them and the
//! tests can read what the programs are told.
//!
//! The whole cluster lives in a network namespace of its own (`sy-<id>`): the control plane, both
//! container runtimes, the kubelets, kube-proxy and every pod. That namespace has no default route
//! and no interface towards the outside, only a point-to-point link to this machine (so that a
//! person's `kubectl` reaches the API server) and one bridge per node for its pods. A packet for any
//! address outside the cluster has nowhere to go; nothing is masqueraded; DNS answers cluster names
//! only. The machine's own `ip_forward` and firewall are never touched but for one counting rule
//! that drops what the link would forward.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// A cluster's name: what `scripts/cluster` calls `switchyard` and the tests `test-<pid>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub name: String,
    /// Where everything of the cluster is kept (state, logs, sockets, volumes).
    pub dir: PathBuf,
    /// Four hex digits of the name: interface names have at most 15 characters.
    pub id: String,
    pub netns: String,
    /// The link's end on this machine, and its end in the cluster's namespace.
    pub host_link: String,
    pub node_link: String,
    pub host_address: Ipv4Addr,
    pub node_address: Ipv4Addr,
    pub service_cidr: &'static str,
    pub kubernetes_service: Ipv4Addr,
    pub dns_service: Ipv4Addr,
    pub cluster_cidr: &'static str,
    pub apiserver_port: u16,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub nodes: Vec<NodeLayout>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLayout {
    pub name: String,
    pub index: u8,
    pub bridge: String,
    /// The node's pods are in `10.244.<index>.0/24`; the bridge is the gateway, and the node's address.
    pub subnet: String,
    pub address: Ipv4Addr,
    pub kubelet_port: u16,
    pub kubelet_healthz_port: u16,
    pub labels: Vec<(String, String)>,
    /// `key=value:Effect`
    pub taints: Vec<String>,
    /// The kubelet's cgroup root in every cgroup v1 hierarchy (and the unified one).
    pub cgroup_root: String,
}

/// The label and taint of every node after the first: a test's placement scenario asks for them.
pub const POOL_LABEL: &str = "switchyard.test/pool";
pub const POOL_TAINT: &str = "switchyard.test/dedicated";

pub const KUBE_PROXY_METRICS_PORT: u16 = 10249;
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;
pub const SCHEDULER_PORT: u16 = 10259;
pub const CONTROLLER_MANAGER_PORT: u16 = 10257;
/// Where every registry of both container runtimes points: nothing listens there.
pub const DEAD_REGISTRY: &str = "http://127.0.0.1:1";

/// FNV-1a of the name, as four hex digits.
fn short_id(name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{:04x}", (hash ^ (hash >> 16)) & 0xffff)
}

impl Layout {
    /// The layout of cluster `name` with `nodes` nodes (1 or more), kept under `root/name`.
    pub fn new(root: &Path, name: &str, nodes: u8) -> Layout {
        let id = short_id(name);
        let hash = u16::from_str_radix(&id, 16).unwrap_or(0);
        // A /30 of 172.30.0.0/16 per cluster, from its id: two clusters of different names rarely share one,
        // and `up` refuses a link whose addresses this machine already has.
        let block = u32::from(hash % 16_384) * 4;
        let base = u32::from(Ipv4Addr::new(172, 30, 0, 0)) + block;
        let nodes = (0..nodes.max(1))
            .map(|index| NodeLayout {
                name: if index == 0 {
                    format!("{name}-control-plane")
                } else {
                    format!("{name}-worker{index}")
                },
                index,
                bridge: format!("sy{id}b{index}"),
                subnet: format!("10.244.{index}.0/24"),
                address: Ipv4Addr::new(10, 244, index, 1),
                kubelet_port: 10250,
                kubelet_healthz_port: 10248 + u16::from(index) * 10,
                labels: if index == 0 {
                    Vec::new()
                } else {
                    vec![(POOL_LABEL.to_string(), "batch".to_string())]
                },
                taints: if index == 0 {
                    Vec::new()
                } else {
                    vec![format!("{POOL_TAINT}=batch:NoSchedule")]
                },
                cgroup_root: format!("/switchyard/{name}/node{index}"),
            })
            .collect();
        Layout {
            name: name.to_string(),
            dir: root.join(name),
            netns: format!("sy-{id}"),
            host_link: format!("sy{id}h"),
            node_link: format!("sy{id}n"),
            host_address: Ipv4Addr::from(base + 1),
            node_address: Ipv4Addr::from(base + 2),
            id,
            service_cidr: "10.96.0.0/16",
            kubernetes_service: Ipv4Addr::new(10, 96, 0, 1),
            dns_service: Ipv4Addr::new(10, 96, 0, 10),
            cluster_cidr: "10.244.0.0/16",
            apiserver_port: 6443,
            etcd_client_port: 2379,
            etcd_peer_port: 2380,
            nodes,
        }
    }

    /// The API server as this machine reaches it.
    pub fn server(&self) -> String {
        format!("https://{}:{}", self.node_address, self.apiserver_port)
    }

    /// The address the API server advertises (the `kubernetes` Service's endpoint): the first node's.
    pub fn advertise_address(&self) -> Ipv4Addr {
        self.nodes[0].address
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    pub fn node_dir(&self, node: &NodeLayout) -> PathBuf {
        self.dir.join(format!("node{}", node.index))
    }

    pub fn containerd_socket(&self, node: &NodeLayout) -> PathBuf {
        self.node_dir(node).join("containerd.sock")
    }

    /// A person's kubeconfig (cluster administrator).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.path("admin.kubeconfig")
    }

    /// Names of the certificate's subject alternative names of the API server.
    pub fn apiserver_names(&self) -> Vec<String> {
        let mut names = vec![
            format!("IP:{}", self.node_address),
            format!("IP:{}", self.kubernetes_service),
            "IP:127.0.0.1".to_string(),
            "DNS:localhost".to_string(),
            "DNS:kubernetes".to_string(),
            "DNS:kubernetes.default".to_string(),
            "DNS:kubernetes.default.svc".to_string(),
            "DNS:kubernetes.default.svc.cluster.local".to_string(),
        ];
        names.extend(self.nodes.iter().map(|n| format!("IP:{}", n.address)));
        names
    }
}

/// containerd's configuration for one node: its own root, state, sockets and runc root; the CNI
/// configuration of its bridge; the sandbox image built here; every registry at a dead address; and
/// `restrict_oom_score_adj`, without which runc fails on a machine without CAP_SYS_RESOURCE.
pub fn containerd_config(layout: &Layout, node: &NodeLayout, sandbox_image: &str) -> String {
    let dir = layout.node_dir(node);
    let d = |p: &str| dir.join(p).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state folder, not /var/run/netns: `down` finds them all.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  max_container_log_line_size = 16384

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{runc}"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni_conf}"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{certs}"
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        socket = layout.containerd_socket(node).display(),
        opt = d("containerd/opt"),
        runc = d("runc"),
        cni_conf = d("cni/net.d"),
        certs = d("containerd/certs.d"),
    )
}

/// `hosts.toml` of containerd's registry configuration: every registry (`_default`, and the ones
/// images name, in case a version ignores `_default`) is a server that nothing answers on.
pub fn registry_hosts() -> String {
    format!(
        "# Every pull goes here and fails: the test cluster pulls from nowhere.\nserver = \"{DEAD_REGISTRY}\"\n\n[host.\"{DEAD_REGISTRY}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Registries an image name of the chart, the examples or Kubernetes could point at.
pub const REGISTRIES: &[&str] = &[
    "_default",
    "docker.io",
    "registry-1.docker.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "gcr.io",
    "ghcr.io",
    "quay.io",
];

/// The node's pod network: a bridge with the node's address as gateway, no default route (only the
/// cluster's pod and Service ranges go to the gateway) and no masquerading.
pub fn cni_config(layout: &Layout, node: &NodeLayout) -> String {
    let ipam_dir = layout.node_dir(node).join("cni/ipam");
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("switchyard-{}", node.index),
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": true,
                "isDefaultGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": node.subnet, "gateway": node.address.to_string()}]],
                    "routes": [
                        {"dst": layout.cluster_cidr},
                        {"dst": layout.service_cidr}
                    ]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

/// The kubelet's configuration: cgroupfs on cgroup v1, swap tolerated, eviction and image GC relaxed
/// so that a small disk does not evict, the cluster DNS, authentication by client certificate or
/// token review, and authorization by the API server.
pub fn kubelet_config(layout: &Layout, node: &NodeLayout) -> String {
    let dir = layout.node_dir(node);
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.address.to_string(),
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.kubelet_healthz_port,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", layout.containerd_socket(node).display()),
        "clusterDNS": [layout.dns_service.to_string()],
        "clusterDomain": "cluster.local",
        "resolvConf": dir.join("resolv.conf"),
        "podLogsDir": dir.join("pod-logs"),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": layout.path("pki/ca.crt")}
        },
        "authorization": {"mode": "Webhook"},
        "registerWithTaints": node.taints.iter().map(|t| taint_json(t)).collect::<Vec<_>>(),
        "serializeImagePulls": false,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%"
        },
        "evictionMinimumReclaim": {},
        "maxPods": 110,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "localStorageCapacityIsolation": true,
        "shutdownGracePeriod": "0s",
        "logging": {"format": "text"}
    })
    .to_string()
}

fn taint_json(taint: &str) -> serde_json::Value {
    let (key_value, effect) = taint.split_once(':').unwrap_or((taint, "NoSchedule"));
    let (key, value) = key_value.split_once('=').unwrap_or((key_value, ""));
    serde_json::json!({"key": key, "value": value, "effect": effect})
}

/// kube-proxy in iptables mode, for every node at once (they share one network namespace), with its
/// conntrack settings left as they are: a network namespace may not change the machine's table size.
pub fn kube_proxy_config(layout: &Layout) -> String {
    serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clusterCIDR": layout.cluster_cidr,
        "hostnameOverride": layout.nodes[0].name,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": format!("127.0.0.1:{KUBE_PROXY_HEALTHZ_PORT}"),
        "metricsBindAddress": format!("127.0.0.1:{KUBE_PROXY_METRICS_PORT}"),
        "clientConnection": {"kubeconfig": layout.path("kube-proxy.kubeconfig")},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s"
        },
        "iptables": {"masqueradeAll": false, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        "nodePortAddresses": [format!("{}/32", layout.advertise_address())]
    })
    .to_string()
}

/// CoreDNS's configuration: the cluster's own zones, and nothing forwarded anywhere. It listens on
/// 1053 (a non-root process cannot bind 53; the Service maps 53 to it).
pub fn corefile() -> &'static str {
    ".:1053 {\n    errors\n    health :8080\n    ready :8181\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n        pods insecure\n        ttl 5\n    }\n}\n"
}

/// CoreDNS's account and what it may read.
const COREDNS_RBAC: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
"#;

/// The cluster DNS, as objects to apply: RBAC to read Services and EndpointSlices, a ConfigMap of the
/// Corefile, a Deployment of the CoreDNS built here (restricted pod security), and the `kube-dns`
/// Service at the address the kubelets give pods.
pub fn coredns_manifest(layout: &Layout, image: &str) -> String {
    let corefile = corefile()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let deployment = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
{corefile}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      priorityClassName: system-cluster-critical
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: coredns
          image: {image}
          imagePullPolicy: IfNotPresent
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {{name: dns, containerPort: 1053, protocol: UDP}}
            - {{name: dns-tcp, containerPort: 1053, protocol: TCP}}
          readinessProbe:
            httpGet: {{path: /ready, port: 8181}}
            periodSeconds: 2
          livenessProbe:
            httpGet: {{path: /health, port: 8080}}
            periodSeconds: 10
          resources:
            requests: {{cpu: 50m, memory: 32Mi}}
            limits: {{memory: 128Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
          volumeMounts:
            - {{name: config, mountPath: /etc/coredns, readOnly: true}}
      volumes:
        - name: config
          configMap: {{name: coredns}}
---
"#,
    );
    format!("{COREDNS_RBAC}{deployment}{}", coredns_service(layout))
}

/// The cluster DNS's Service, at the address the kubelets give pods.
fn coredns_service(layout: &Layout) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  clusterIP: {dns}
  selector: {{k8s-app: kube-dns}}
  ports:
    - {{name: dns, port: 53, protocol: UDP, targetPort: 1053}}
    - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 1053}}
"#,
        dns = layout.dns_service,
    )
}

/// The cluster's storage: a default StorageClass of local volumes and `count` PersistentVolumes
/// of `size` on the first node, in folders under the cluster's own, so that a chart's
/// PersistentVolumeClaim (the NATS store) is bound as on any cluster with a default class.
pub fn storage_manifest(layout: &Layout, count: usize, size: &str) -> String {
    let mut docs = vec![r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
"#
    .to_string()];
    let node = &layout.nodes[0];
    for i in 0..count {
        docs.push(format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: local-{i}}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  local: {{path: {path}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{node}]}}]
"#,
            path = volume_dir(layout, i).display(),
            node = node.name,
        ));
    }
    docs.join("---\n")
}

pub fn volume_dir(layout: &Layout, i: usize) -> PathBuf {
    layout.path(&format!("volumes/local-{i}"))
}

/// The comment on the one rule `up` adds to this machine's firewall.
pub fn host_rule_comment(layout: &Layout) -> String {
    format!(
        "switchyard test cluster {}: nothing from it is forwarded",
        layout.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(nodes: u8) -> Layout {
        Layout::new(
            Path::new("/var/lib/switchyard-cluster"),
            "switchyard",
            nodes,
        )
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        let l = layout(3);
        let mut names = vec![l.host_link.clone(), l.node_link.clone(), l.netns.clone()];
        names.extend(l.nodes.iter().map(|n| n.bridge.clone()));
        for name in names {
            assert!(name.len() <= 15, "{name} is longer than IFNAMSIZ - 1");
        }
    }

    #[test]
    fn the_link_is_a_slash_30_and_differs_between_names() {
        let a = layout(1);
        let b = Layout::new(Path::new("/x"), "test-4242", 1);
        assert_eq!(
            u32::from(a.node_address) - u32::from(a.host_address),
            1,
            "the two ends of one /30"
        );
        assert_eq!(u32::from(a.host_address) % 4, 1);
        assert_ne!(a.host_address, b.host_address);
        assert_ne!(a.netns, b.netns);
    }

    #[test]
    fn only_later_nodes_are_labelled_and_tainted() {
        let l = layout(2);
        assert!(l.nodes[0].taints.is_empty() && l.nodes[0].labels.is_empty());
        assert_eq!(
            l.nodes[1].taints,
            vec!["switchyard.test/dedicated=batch:NoSchedule"]
        );
        let config: serde_json::Value =
            serde_json::from_str(&kubelet_config(&l, &l.nodes[1])).unwrap();
        assert_eq!(
            config["registerWithTaints"][0],
            serde_json::json!({"key": "switchyard.test/dedicated", "value": "batch", "effect": "NoSchedule"})
        );
    }

    #[test]
    fn pods_get_no_default_route_and_nothing_is_masqueraded() {
        let l = layout(2);
        let cni: serde_json::Value = serde_json::from_str(&cni_config(&l, &l.nodes[1])).unwrap();
        let bridge = &cni["plugins"][0];
        assert_eq!(bridge["isDefaultGateway"], false);
        assert_eq!(bridge["ipMasq"], false);
        let routes: Vec<&str> = bridge["ipam"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(routes, vec!["10.244.0.0/16", "10.96.0.0/16"]);
        assert!(!routes.contains(&"0.0.0.0/0"));
    }

    #[test]
    fn the_cluster_dns_forwards_nothing() {
        assert!(!corefile().contains("forward"));
        assert!(!corefile().contains("proxy"));
        assert!(corefile().contains("kubernetes cluster.local"));
    }

    #[test]
    fn containerd_pulls_from_a_dead_address_and_restricts_oom_score_adj() {
        let l = layout(1);
        let config = containerd_config(&l, &l.nodes[0], "switchyard.test/pause:1");
        assert!(config.contains("restrict_oom_score_adj = true"));
        assert!(config.contains(
            "config_path = \"/var/lib/switchyard-cluster/switchyard/node0/containerd/certs.d\""
        ));
        assert!(registry_hosts().contains("server = \"http://127.0.0.1:1\""));
        assert!(REGISTRIES.contains(&"_default"));
    }

    #[test]
    fn every_node_has_its_own_runtime_and_kubelet_ports() {
        let l = layout(2);
        assert_ne!(
            l.containerd_socket(&l.nodes[0]),
            l.containerd_socket(&l.nodes[1])
        );
        assert_ne!(
            l.nodes[0].kubelet_healthz_port,
            l.nodes[1].kubelet_healthz_port
        );
        assert_ne!(l.nodes[0].address, l.nodes[1].address);
        assert_ne!(l.nodes[0].cgroup_root, l.nodes[1].cgroup_root);
    }

    #[test]
    fn storage_is_a_default_class_of_local_volumes_on_the_first_node() {
        let l = layout(2);
        let text = storage_manifest(&l, 2, "2Gi");
        assert!(text.contains("storageclass.kubernetes.io/is-default-class: \"true\""));
        assert!(text.contains("values: [switchyard-control-plane]"));
        assert_eq!(text.matches("kind: PersistentVolume\n").count(), 2);
    }
}
