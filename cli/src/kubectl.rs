//! `kubectl switchyard`: the day-2 commands for a Pipeline in a cluster, by name. The same program as
//! `switchyard`, installed as `kubectl-switchyard` (kubectl runs it as a plugin).
//!
//! The Pipeline and its credentials Secret come from the API server (the kubeconfig, as kubectl uses
//! it). Its NATS is reached through a port-forward the command opens itself to a pod behind the
//! Service its URL names, unless `--nats-url` says where it can be reached directly, or the URL names
//! no Service of the cluster.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use switchyard_crds::layout::{layout, Names};
use switchyard_crds::Pipeline;
use switchyard_ops::{status, Target};
use switchyard_platform::credentials::NatsCredentials;

use crate::day2::{self, DlqDo, Select, TapWhat};
use crate::errors::{ClusterError, CommandError};

/// Day-2 operations on a Switchyard Pipeline in the cluster: dead letters, taps, traces, pause and
/// resume, status.
#[derive(Parser, Debug)]
#[command(name = "kubectl switchyard", version)]
pub struct Plugin {
    /// The Pipeline's namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Reach the Pipeline's NATS here instead of through a port-forward.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Every unit's replicas, lag, rate, dead letters and last scaling reason.
    Status { name: String },
    /// Set spec.paused: sources stop, units drain, then scale to zero.
    Pause { name: String },
    /// Clear spec.paused: every unit comes back at its replicas.
    Resume { name: String },
    /// The dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: PluginDlq,
    },
    /// The messages on a unit's input (or output), as JSON lines.
    Tap {
        name: String,
        #[command(flatten)]
        tap: TapWhat,
    },
    /// Follow one item through the Pipeline.
    Trace {
        name: String,
        #[arg(value_name = "ORIGIN:SEQ")]
        item: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PluginDlq {
    /// Count the dead letters by unit, stage and error.
    List {
        name: String,
        #[command(flatten)]
        select: Select,
    },
    /// Each dead letter with its data, error, stage, attempts, origin and time.
    Show {
        name: String,
        #[command(flatten)]
        select: Select,
    },
    /// Put dead letters back into the input of the unit where they failed.
    Replay {
        name: String,
        #[command(flatten)]
        select: Select,
    },
    /// Remove dead letters for good.
    Purge {
        name: String,
        #[command(flatten)]
        select: Select,
        #[arg(long)]
        yes: bool,
    },
}

/// The name this program has as a kubectl plugin.
pub const PLUGIN_NAME: &str = "kubectl-switchyard";

pub fn main() -> ExitCode {
    let plugin = Plugin::parse();
    day2::block_on(run(plugin))
}

struct Cluster {
    client: Client,
    namespace: String,
}

async fn cluster(plugin: &Plugin) -> Result<Cluster, ClusterError> {
    let options = kube::config::KubeConfigOptions {
        context: plugin.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .or_else(|e| kube::Config::incluster().map_err(|_| e))
        .map_err(ClusterError::Kubeconfig)?;
    let namespace = plugin
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(ClusterError::Client)?;
    Ok(Cluster { client, namespace })
}

async fn run(plugin: Plugin) -> Result<ExitCode, CommandError> {
    let cluster = cluster(&plugin).await?;
    let nats_url = plugin.nats_url.clone();
    match plugin.command {
        PluginCommand::Pause { name } => Ok(set_paused(&cluster, &name, true).await?),
        PluginCommand::Resume { name } => Ok(set_paused(&cluster, &name, false).await?),
        PluginCommand::Status { name } => {
            let pipeline = get(&cluster, &name).await?;
            let live = match reach(&cluster, &pipeline, nats_url.as_deref()).await {
                Ok(reached) => Some((
                    status::read(&reached.target, Duration::from_millis(2500)).await?,
                    reached.how,
                )),
                Err(why) => {
                    eprintln!("live figures from NATS unavailable: {why}; showing the Pipeline's status as the operator last wrote it");
                    None
                }
            };
            print!("{}", render_status(&pipeline, live.as_ref()));
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Dlq { action } => {
            let (name, select, what) = match action {
                PluginDlq::List { name, select } => (name, select, DlqDo::List),
                PluginDlq::Show { name, select } => (name, select, DlqDo::Show),
                PluginDlq::Replay { name, select } => (name, select, DlqDo::Replay),
                PluginDlq::Purge { name, select, yes } => (name, select, DlqDo::Purge { yes }),
            };
            let pipeline = get(&cluster, &name).await?;
            let reached = reach(&cluster, &pipeline, nats_url.as_deref()).await?;
            day2::dlq_on(&reached.target, &reached.how, what, &select, None).await
        }
        PluginCommand::Tap { name, tap } => {
            let pipeline = get(&cluster, &name).await?;
            let reached = reach(&cluster, &pipeline, nats_url.as_deref()).await?;
            day2::tap_on(&reached.target, &tap).await
        }
        PluginCommand::Trace { name, item, json } => {
            let pipeline = get(&cluster, &name).await?;
            let reached = reach(&cluster, &pipeline, nats_url.as_deref()).await?;
            let rate = reached
                .target
                .layout
                .units
                .first()
                .and_then(|u| u.trace.as_ref())
                .map_or(0.0, |t| t.sample_rate);
            day2::trace_on(&reached.target, &item, json, rate).await
        }
    }
}

async fn get(cluster: &Cluster, name: &str) -> Result<Pipeline, ClusterError> {
    let api: Api<Pipeline> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    api.get(name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => ClusterError::NoPipeline {
            namespace: cluster.namespace.clone(),
            name: name.to_string(),
        },
        other => ClusterError::api(format!("read Pipeline {}/{name}", cluster.namespace))(other),
    })
}

async fn set_paused(cluster: &Cluster, name: &str, paused: bool) -> Result<ExitCode, ClusterError> {
    get(cluster, name).await?;
    let api: Api<Pipeline> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let patch = serde_json::json!({"spec": {"paused": paused}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(ClusterError::api(format!(
            "set spec.paused on {}/{name}",
            cluster.namespace
        )))?;
    if paused {
        println!("pipeline {}/{name}: pausing — its sources stop, its units drain, then scale to zero; `kubectl switchyard status {name}` shows where it is", cluster.namespace);
    } else {
        println!(
            "pipeline {}/{name}: resuming — every unit comes back at its replicas",
            cluster.namespace
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The Pipeline's NATS, reached; the port-forward (if any) lives as long as this.
struct Reached {
    target: Target,
    how: String,
    _forward: Option<tokio::task::JoinHandle<()>>,
}

async fn reach(
    cluster: &Cluster,
    pipeline: &Pipeline,
    nats_url: Option<&str>,
) -> Result<Reached, ClusterError> {
    let namespace = cluster.namespace.as_str();
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    let mut pipeline = pipeline.clone();
    pipeline.metadata.namespace = Some(namespace.to_string());
    let topology = switchyard_crds::validate::analyze(&pipeline).map_err(|problems| {
        ClusterError::Invalid {
            namespace: namespace.to_string(),
            name: name.clone(),
            problems: problems.len(),
        }
    })?;
    let layout = layout(&topology, &pipeline.spec).map_err(|_| ClusterError::NoLayout {
        namespace: namespace.to_string(),
        name: name.clone(),
    })?;
    let credentials = match pipeline
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret.as_ref())
    {
        Some(secret) => {
            let api: Api<Secret> = Api::namespaced(cluster.client.clone(), namespace);
            let found = api.get(secret).await.map_err(ClusterError::api(format!(
                "read Secret {namespace}/{secret}, which spec.nats.credentialsSecret names"
            )))?;
            let data = found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            NatsCredentials::from_secret_data(&data)?
        }
        None => NatsCredentials::default(),
    };
    let (url, how, forward) = match nats_url {
        Some(url) => (url.to_string(), url.to_string(), None),
        None => {
            let configured = match pipeline.spec.nats.as_ref().and_then(|n| n.url.clone()) {
                Some(url) => url,
                None => operator_nats_url(&cluster.client).await?,
            };
            match forward(cluster, &configured).await? {
                Some((local, how, task)) => (local, how, Some(task)),
                None => (configured.clone(), configured, None),
            }
        }
    };
    let mut options =
        switchyard_platform::nats::connect_options("kubectl-switchyard", &credentials)?;
    if forward.is_some() {
        // Only the forwarded port is reachable from here: not the cluster's other servers.
        options = options.ignore_discovered_servers();
    }
    let client = options
        .connect(switchyard_platform::nats::server_addrs(&url)?)
        .await
        .map_err(|source| ClusterError::Connect {
            how: how.clone(),
            source,
        })?;
    let target = Target {
        names: Names::new(namespace, &name),
        topology,
        layout,
        js: switchyard_platform::nats::jetstream_context(client),
    };
    Ok(Reached {
        target,
        how,
        _forward: forward,
    })
}

/// The NATS the operator gives Pipelines that name none: its `--nats-url`, read off its Deployment.
async fn operator_nats_url(client: &Client) -> Result<String, ClusterError> {
    let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::all(client.clone());
    let found = api
        .list(&ListParams::default().labels("app.kubernetes.io/name=switchyard"))
        .await
        .map_err(ClusterError::OperatorUnreadable)?;
    found
        .items
        .iter()
        .flat_map(|d| d.spec.iter())
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.args.iter().flatten())
        .find_map(|arg| arg.strip_prefix("--nats-url=").map(str::to_string))
        .ok_or(ClusterError::OperatorNamesNoNats)
}

/// Pure: the Service a NATS URL names in the cluster (`nats://nats.messaging:4222` → `nats` in
/// `messaging`, `nats://nats:4222` → `nats` in the Pipeline's namespace), and its port. None for an IP
/// address or a name outside the cluster.
pub fn service_of(url: &str, namespace: &str) -> Option<(String, String, u16)> {
    let first = url.split(',').next()?.trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (host_port, 4222),
    };
    if host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return None;
    }
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [service] => Some((service.to_string(), namespace.to_string(), port)),
        [service, ns] => Some((service.to_string(), ns.to_string(), port)),
        [service, ns, "svc", ..] => Some((service.to_string(), ns.to_string(), port)),
        _ => None,
    }
}

type Forward = (String, String, tokio::task::JoinHandle<()>);

/// Opens a port-forward to a ready pod behind the Service `url` names; None when it names none.
async fn forward(cluster: &Cluster, url: &str) -> Result<Option<Forward>, ClusterError> {
    let Some((service, namespace, port)) = service_of(url, &cluster.namespace) else {
        return Ok(None);
    };
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &namespace);
    let Some(svc) = services
        .get_opt(&service)
        .await
        .map_err(ClusterError::api(format!(
            "read Service {namespace}/{service}"
        )))?
    else {
        return Ok(None);
    };
    let spec = svc.spec.unwrap_or_default();
    let selector = spec
        .selector
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    if selector.is_empty() {
        return Err(ClusterError::NoSelector { namespace, service });
    }
    let target = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == i32::from(port))
        .and_then(|p| p.target_port)
        .unwrap_or(IntOrString::Int(i32::from(port)));
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &namespace);
    let pod = ready_pod(&pods, namespace.clone(), service, selector).await?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let pod_port = pod_port(&pod, target, port);
    // One port-forward is tried before anything listens, so that a pod that cannot be reached is
    // said now, not as a NATS connection error.
    let first = pods
        .portforward(&pod_name, &[pod_port])
        .await
        .map_err(ClusterError::api(format!(
            "port-forward to pod {namespace}/{pod_name}:{pod_port}"
        )))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(ClusterError::Listen)?;
    let local = listener.local_addr().map_err(ClusterError::Listen)?.port();
    let how = format!("port-forward 127.0.0.1:{local} → pod {namespace}/{pod_name}:{pod_port}");
    let task = tokio::spawn(serve_forward(listener, pods, pod_name, pod_port, first));
    Ok(Some((format!("nats://127.0.0.1:{local}"), how, task)))
}

/// A ready pod among those `selector` selects, or which Service had none.
async fn ready_pod(
    pods: &Api<Pod>,
    namespace: String,
    service: String,
    selector: String,
) -> Result<Pod, ClusterError> {
    let listed = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(ClusterError::api(format!(
            "list the pods of Service {namespace}/{service}"
        )))?;
    let ready = listed.items.into_iter().find(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    ready.ok_or(ClusterError::NoReadyPod {
        namespace,
        service,
        selector,
    })
}

/// The pod's port a Service's `target` names (a number, or a container port's name); the
/// Service's own `port` when it names none the pod has.
fn pod_port(pod: &Pod, target: IntOrString, port: u16) -> u16 {
    match target {
        IntOrString::Int(p) => u16::try_from(p).unwrap_or(port),
        IntOrString::String(named) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(named.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(port),
    }
}

/// Serves the local end of a port-forward: each connection gets a forward of its own (the first
/// the one already opened).
async fn serve_forward(
    listener: tokio::net::TcpListener,
    pods: Api<Pod>,
    pod_name: String,
    pod_port: u16,
    mut first: kube::api::Portforwarder,
) {
    let mut first = first.take_stream(pod_port);
    while let Ok((mut socket, _)) = listener.accept().await {
        let stream = match first.take() {
            Some(stream) => Some(stream),
            None => match pods.portforward(&pod_name, &[pod_port]).await {
                Ok(mut forwarded) => forwarded.take_stream(pod_port),
                Err(e) => {
                    tracing::warn!("cannot port-forward again: {e}");
                    None
                }
            },
        };
        if let Some(mut stream) = stream {
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
            });
        }
    }
}

fn render_status(pipeline: &Pipeline, live: Option<&(Vec<status::UnitStatus>, String)>) -> String {
    let name = pipeline.metadata.name.as_deref().unwrap_or_default();
    let st = pipeline.status.clone().unwrap_or_default();
    let ready = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| format!("Ready={} ({}): {}", c.status, c.reason, c.message))
        .unwrap_or_else(|| "no Ready condition yet".to_string());
    let mut out = format!(
        "{}/{name}: phase {}; {ready}\n",
        pipeline.metadata.namespace.as_deref().unwrap_or_default(),
        st.phase.as_deref().unwrap_or("-"),
    );
    match live {
        Some((_, how)) => out.push_str(&format!(
            "lag, rate and dead letters live from NATS ({how})\n"
        )),
        None => out.push_str("lag, rate and dead letters as of the operator's last status write\n"),
    }
    let width = st
        .units
        .iter()
        .map(|u| u.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "\n  {:<width$}  {:>8}  {:>8}  {:>8}  {:>6}  last scaling\n",
        "unit", "replicas", "lag", "rate/s", "dead"
    ));
    for u in &st.units {
        let now = live.and_then(|(units, _)| units.iter().find(|l| l.unit == u.name));
        let lag = now.map_or(Some(u.lag), |l| l.lag);
        let rate = now.map(|l| l.rate).or(u.rate).unwrap_or(0.0);
        let dead = now.map_or(u.dead_lettered, |l| l.dead_letters);
        out.push_str(&format!(
            "  {:<width$}  {:>8}  {:>8}  {:>8.0}  {:>6}  {}\n",
            u.name,
            format!("{}/{}", u.ready_replicas, u.desired_replicas),
            lag.map_or("-".to_string(), |l| l.to_string()),
            rate,
            dead,
            u.last_scale_reason.as_deref().unwrap_or("-"),
        ));
    }
    out.push_str(&status::render_rows(st.units.iter().map(|u| {
        let now = live.and_then(|(units, _)| units.iter().find(|l| l.unit == u.name));
        (u.name.as_str(), now.and_then(|l| l.rows).or(u.rows))
    })));
    out.push_str(&status::render_joins(st.units.iter().map(|u| {
        let now = live.and_then(|(units, _)| units.iter().find(|l| l.unit == u.name));
        (u.name.as_str(), now.and_then(|l| l.join).or(u.join))
    })));
    out.push_str(&render_edges(&st.edges));
    out
}

/// The books per edge as the operator last wrote them (`status.edges`), as `switchyard status`
/// shows them.
fn render_edges(edges: &[switchyard_crds::EdgeStatus]) -> String {
    if edges.is_empty() {
        return String::new();
    }
    let rows: Vec<switchyard_ops::books::EdgeNow> = edges
        .iter()
        .map(|e| switchyard_ops::books::EdgeNow {
            edge: e.into(),
            settled: e.settled,
        })
        .collect();
    format!(
        "\n{}  (the books, as of the operator's last status write)\n",
        switchyard_ops::books::render_edges(&rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_books_per_edge_show_what_is_on_its_way() {
        let edge = |from: &str, epoch, stored, taken_in, settled| switchyard_crds::EdgeStatus {
            from: from.into(),
            epoch,
            to: "work".into(),
            stored,
            taken_in,
            settled,
        };
        let text = render_edges(&[
            edge("src", 0, 400, 300, false),
            edge("old", 2, 90, 90, true),
        ]);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines[2],
            "  src → work                     400          300          100"
        );
        assert_eq!(
            lines[3],
            "  old (epoch 2) → work            90           90            -"
        );
        assert_eq!(render_edges(&[]), "");
    }

    #[test]
    fn a_nats_url_names_a_service_of_the_cluster_or_none() {
        let ns = "shop";
        assert_eq!(
            service_of("nats://nats:4222", ns),
            Some(("nats".into(), "shop".into(), 4222))
        );
        assert_eq!(
            service_of("nats://nats.messaging:4223", ns),
            Some(("nats".into(), "messaging".into(), 4223))
        );
        assert_eq!(
            service_of(
                "tls://u:p@nats.messaging.svc.cluster.local:4222,nats://b:4222",
                ns
            ),
            Some(("nats".into(), "messaging".into(), 4222))
        );
        assert_eq!(service_of("nats://127.0.0.1:4222", ns), None);
        assert_eq!(service_of("nats://demo.nats.io:4222", ns), None);
        assert_eq!(service_of("nats://localhost", ns), None);
    }
}
