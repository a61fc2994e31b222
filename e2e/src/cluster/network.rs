//! A cluster's network: a namespace of its own, its link to this machine, a bridge per node, and
//! the guards that keep anything from leaving.

use std::process::Command;

use super::error::ClusterError;
use super::host::{self, in_netns, ip, run};
use super::layout::{host_rule_comment, Layout};

/// The namespace, its link to this machine, one bridge per node, the route of the Service range,
/// and a firewall inside that forwards only between the cluster's own bridges.
pub(super) fn create(l: &Layout) -> Result<(), ClusterError> {
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
    bridges(l)?;
    forwarding_inside(l)?;
    guard(l)?;
    for node in &l.nodes {
        host::create_cgroup(&node.cgroup_root)?;
    }
    Ok(())
}

/// One bridge per node, and the route of the Service range. Service addresses that no rule of
/// kube-proxy rewrote stay on the first bridge, where nothing answers, even before kube-proxy has
/// written its rules.
fn bridges(l: &Layout) -> Result<(), ClusterError> {
    let ns = |args: &[&str]| run(in_netns(&l.netns, "ip").args(args)).map(|_| ());
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
    ns(&["route", "add", l.service_cidr, "dev", &l.nodes[0].bridge])?;
    Ok(())
}

/// Forwarding between the bridges, inside the namespace only: the machine's own settings stay as
/// they are.
fn forwarding_inside(l: &Layout) -> Result<(), ClusterError> {
    let sysctl = |key: &str, value: &str| {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(in_netns(&l.netns, "sh").args(["-c", &format!("echo {value} > {path}")])).map(|_| ())
    };
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
    sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    Ok(())
}

/// A firewall inside that forwards only between the cluster's own bridges, and one rule on this
/// machine that drops (and counts) whatever the link would have forwarded.
fn guard(l: &Layout) -> Result<(), ClusterError> {
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
    Ok(())
}
