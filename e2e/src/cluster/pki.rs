//! The cluster's keys, certificates, tokens and kubeconfigs, made with `openssl` for each cluster and
//! kept in its `pki/` folder (two days of validity: a test cluster is short-lived).

use std::path::Path;
use std::process::Command;

use super::error::ClusterError;
use super::host::run;
use super::layout::Layout;

/// Who talks to the API server, with the groups the static token file gives it. The identities
/// are the ones Kubernetes' bootstrap RBAC and the Node authorizer expect.
pub fn identities(layout: &Layout) -> Vec<(String, String)> {
    let mut all = vec![
        ("admin".to_string(), "system:masters".to_string()),
        ("system:kube-controller-manager".to_string(), String::new()),
        ("system:kube-scheduler".to_string(), String::new()),
        ("system:kube-proxy".to_string(), String::new()),
    ];
    all.extend(layout.nodes.iter().map(|n| {
        (
            format!("system:node:{}", n.name),
            "system:nodes".to_string(),
        )
    }));
    all
}

/// The file name of an identity's kubeconfig.
pub fn kubeconfig_name(user: &str) -> String {
    match user {
        "admin" => "admin.kubeconfig".to_string(),
        "system:kube-controller-manager" => "controller-manager.kubeconfig".to_string(),
        "system:kube-scheduler" => "scheduler.kubeconfig".to_string(),
        "system:kube-proxy" => "kube-proxy.kubeconfig".to_string(),
        other => format!(
            "{}.kubeconfig",
            other.trim_start_matches("system:node:").replace(':', "-")
        ),
    }
}

fn random_token() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 24];
    let mut file =
        std::fs::File::open("/dev/urandom").map_err(|e| ClusterError::io("/dev/urandom", e))?;
    std::io::Read::read_exact(&mut file, &mut bytes)
        .map_err(|e| ClusterError::io("/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    token: &str,
) -> Result<(), ClusterError> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: switchyard-test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: switchyard-test\n  context: {{cluster: switchyard-test, user: user}}\ncurrent-context: switchyard-test\n",
        ca.display()
    );
    std::fs::write(path, text).map_err(|e| ClusterError::io(path, e))?;
    set_private(path)
}

fn set_private(path: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ClusterError::io(path, e))
}

/// A CA; the API server's serving certificate for every name it is reached by; its client
/// certificate towards the kubelets; the service-account key pair; a token and a kubeconfig per
/// identity.
pub fn create(layout: &Layout) -> Result<(), ClusterError> {
    let pki = layout.path("pki");
    std::fs::create_dir_all(&pki).map_err(|e| ClusterError::io(&pki, e))?;
    let openssl =
        |args: &[&str]| run(Command::new("openssl").args(args).current_dir(&pki)).map(|_| ());
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=switchyard-test-cluster-ca",
        "-days",
        "2",
    ])?;
    let sign = |name: &str, subject: &str, extensions: &str| -> Result<(), ClusterError> {
        let ext = format!("{name}.cnf");
        std::fs::write(pki.join(&ext), extensions)
            .map_err(|e| ClusterError::io(pki.join(&ext), e))?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &ext,
        ])
    };
    sign(
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
            layout.apiserver_names().join(",")
        ),
    )?;
    sign(
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    tokens(layout, &pki)?;
    for key in [
        "ca.key",
        "apiserver.key",
        "apiserver-kubelet-client.key",
        "sa.key",
    ] {
        set_private(&pki.join(key))?;
    }
    Ok(())
}

/// A token for each identity of the cluster, in the API server's token file, and a kubeconfig
/// that uses it.
fn tokens(layout: &Layout, pki: &Path) -> Result<(), ClusterError> {
    let mut tokens = String::new();
    for (i, (user, groups)) in identities(layout).iter().enumerate() {
        let token = random_token()?;
        if groups.is_empty() {
            tokens.push_str(&format!("{token},{user},uid-{i}\n"));
        } else {
            tokens.push_str(&format!("{token},{user},uid-{i},\"{groups}\"\n"));
        }
        write_kubeconfig(
            &layout.path(&kubeconfig_name(user)),
            &layout.server(),
            &pki.join("ca.crt"),
            &token,
        )?;
    }
    let tokens_file = pki.join("tokens.csv");
    std::fs::write(&tokens_file, tokens).map_err(|e| ClusterError::io(&tokens_file, e))?;
    set_private(&tokens_file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_in_the_group_the_node_authorizer_expects() {
        let layout = Layout::new(Path::new("/x"), "c", 2);
        let ids = identities(&layout);
        assert!(ids.contains(&(
            "system:node:c-worker1".to_string(),
            "system:nodes".to_string()
        )));
        assert_eq!(
            kubeconfig_name("system:node:c-worker1"),
            "c-worker1.kubeconfig"
        );
        assert_eq!(kubeconfig_name("admin"), "admin.kubeconfig");
    }
}
