//! What each program of the control plane is told on its command line: pure, from the layout.

use super::layout::{self, Layout, NodeLayout};
use super::pki;

/// A file of the cluster's PKI.
fn pki_file(l: &Layout, file: &str) -> String {
    l.path(&format!("pki/{file}")).display().to_string()
}

/// etcd, on loopback: the API server is its only client.
pub(super) fn etcd(l: &Layout) -> Vec<String> {
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
    ]
}

/// kube-apiserver: its certificates, service accounts, admission and audit log.
pub(super) fn apiserver(l: &Layout) -> Vec<String> {
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", l.etcd_client_port),
        "--bind-address=0.0.0.0".into(),
        format!("--advertise-address={}", l.advertise_address()),
        format!("--secure-port={}", l.apiserver_port),
        format!("--cert-dir={}", l.path("pki/apiserver-generated").display()),
        format!("--tls-cert-file={}", pki_file(l, "apiserver.crt")),
        format!("--tls-private-key-file={}", pki_file(l, "apiserver.key")),
        format!("--client-ca-file={}", pki_file(l, "ca.crt")),
        format!(
            "--kubelet-client-certificate={}",
            pki_file(l, "apiserver-kubelet-client.crt")
        ),
        format!(
            "--kubelet-client-key={}",
            pki_file(l, "apiserver-kubelet-client.key")
        ),
        // The nodes' addresses, never their names: a name would be looked up in this
        // machine's DNS.
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-key-file={}", pki_file(l, "sa.pub")),
        format!(
            "--service-account-signing-key-file={}",
            pki_file(l, "sa.key")
        ),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--token-auth-file={}", pki_file(l, "tokens.csv")),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement".into(),
        format!("--service-cluster-ip-range={}", l.service_cidr),
        format!(
            "--audit-policy-file={}",
            l.path("audit-policy.yaml").display()
        ),
        format!("--audit-log-path={}", l.path("logs/audit.log").display()),
        format!("--audit-log-maxsize={}", crate::control_plane::AUDIT_LOG_MB),
        "--audit-log-maxbackup=1".into(),
        "--profiling=false".into(),
    ]
}

/// kube-controller-manager, on loopback.
pub(super) fn controller_manager(l: &Layout) -> Vec<String> {
    let mut args = kubeconfigs(l, "controller-manager.kubeconfig");
    args.extend([
        "--controllers=*".into(),
        "--use-service-account-credentials=true".into(),
        format!(
            "--service-account-private-key-file={}",
            pki_file(l, "sa.key")
        ),
        format!("--root-ca-file={}", pki_file(l, "ca.crt")),
        format!("--service-cluster-ip-range={}", l.service_cidr),
        format!("--cluster-cidr={}", l.cluster_cidr),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", layout::CONTROLLER_MANAGER_PORT),
        "--profiling=false".into(),
    ]);
    args
}

/// kube-scheduler, on loopback.
pub(super) fn scheduler(l: &Layout) -> Vec<String> {
    let mut args = kubeconfigs(l, "scheduler.kubeconfig");
    args.extend([
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", layout::SCHEDULER_PORT),
        "--profiling=false".into(),
    ]);
    args
}

/// A controller's credentials, for the API and for its own endpoints' callers alike.
fn kubeconfigs(l: &Layout, file: &str) -> Vec<String> {
    let path = l.path(file).display().to_string();
    [
        "--kubeconfig",
        "--authentication-kubeconfig",
        "--authorization-kubeconfig",
    ]
    .iter()
    .map(|flag| format!("{flag}={path}"))
    .collect()
}

/// A node's kubelet: its configuration and credentials, its folders, address and labels.
pub(super) fn kubelet(l: &Layout, node: &NodeLayout) -> Vec<String> {
    let dir = l.node_dir(node);
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
    args
}
