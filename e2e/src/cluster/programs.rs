//! The programs a cluster runs, found on this machine, and whether the machine lets it run at all.

use std::path::{Path, PathBuf};

use super::error::ClusterError;
use super::host::{self, ip};

/// Where the programs are.
#[derive(Clone, Debug)]
pub struct Programs {
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, coredns, pause.
    pub kube_bin: PathBuf,
    pub etcd: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
}

pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Programs {
    /// Finds every program, or says in one line what is missing and how to get it.
    pub fn find() -> Result<Programs, ClusterError> {
        let kube_bin = crate::control_plane::kube_bin_dir().ok_or_else(|| {
            ClusterError::Unavailable(
                "no Kubernetes programs (run scripts/kube-binaries, or set KUBE_BIN_DIR)".into(),
            )
        })?;
        for program in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
            "coredns",
            "pause",
        ] {
            if !kube_bin.join(program).is_file() {
                return Err(ClusterError::Unavailable(format!(
                    "no {program} in {} (run scripts/kube-binaries)",
                    kube_bin.display()
                )));
            }
        }
        let need = |name: &str, package: &str| {
            on_path(name).ok_or_else(|| {
                ClusterError::Unavailable(format!("no {name} (Debian package {package})"))
            })
        };
        let programs = Programs {
            kube_bin,
            etcd: need("etcd", "etcd-server")?,
            containerd: need("containerd", "containerd")?,
            ctr: need("ctr", "containerd")?,
        };
        need("runc", "runc")?;
        need("containerd-shim-runc-v2", "containerd")?;
        need("nsenter", "util-linux")?;
        need("ip", "iproute2")?;
        need("iptables", "iptables")?;
        need("openssl", "openssl")?;
        need("kubectl", "kubectl")?;
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            return Err(ClusterError::Unavailable(
                "no CNI plugins in /usr/lib/cni (Debian package containernetworking-plugins)"
                    .into(),
            ));
        }
        Ok(programs)
    }

    pub fn kube(&self, name: &str) -> PathBuf {
        self.kube_bin.join(name)
    }
}

/// Whether this machine lets a cluster run at all: root (network namespaces, mounts, cgroups) and
/// cgroups mounted. The reason is one line.
pub fn machine_allows() -> Result<(), ClusterError> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ClusterError::Unavailable(
            "not root: a cluster needs network namespaces, mounts and cgroups".into(),
        ));
    }
    if host::cgroup_hierarchies().is_empty() {
        return Err(ClusterError::Unavailable(
            "no cgroup hierarchy is mounted under /sys/fs/cgroup".into(),
        ));
    }
    if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        return Err(ClusterError::Unavailable(
            "the kernel has no bridge netfilter (br_netfilter): Services would not work".into(),
        ));
    }
    let probe = format!("sy-probe-{}", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|e| {
        ClusterError::Unavailable(format!("cannot create a network namespace: {e}"))
    })?;
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}
