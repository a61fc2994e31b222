//! `switchyard-stage`: runs one unit of a Pipeline from its unit configuration.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use switchyard_crds::unit::UnitConfig;
use switchyard_stage::{run_unit, RunOptions};
use tokio::signal::unix::{signal, SignalKind};

/// Runs one unit of a Switchyard Pipeline: a source, a group of steps, or a sink.
#[derive(Parser, Debug)]
#[command(name = "switchyard-stage", version)]
struct Args {
    /// The unit's configuration (JSON), as `switchyard plan` and the operator write it.
    #[arg(
        long,
        env = "SWITCHYARD_CONFIG",
        required_unless_present = "install_to"
    )]
    config: Option<PathBuf>,
    /// Copy this program into DIR and exit: how a pod's init container hands the runtime to an image
    /// that does not have it.
    #[arg(long, value_name = "DIR")]
    install_to: Option<PathBuf>,
    /// NATS server to use (several, separated by commas, for the nodes of a cluster).
    #[arg(
        long,
        env = "SWITCHYARD_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats_auth: switchyard_platform::credentials::NatsAuthArgs,
    /// Name of this replica in reports (default: the host name, or the process id).
    #[arg(long, env = "SWITCHYARD_REPLICA")]
    replica: Option<String>,
    /// Exit once a finite source has published everything (local mode).
    #[arg(long)]
    exit_when_done: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz here, such as 0.0.0.0:9090 (port 0: any).
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// After SIGTERM, the process finishes what it holds for at most this long, then exits anyway
    /// (what it still held is delivered again). A second signal exits at once.
    #[arg(long, env = "SWITCHYARD_STOP_GRACE", default_value = "28s", value_parser = humantime::parse_duration)]
    stop_grace: std::time::Duration,
    /// Log format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    switchyard_platform::logging::init("info,async_nats=warn", args.log_format == "json");
    if let Some(dir) = &args.install_to {
        return match install(dir) {
            Ok(path) => {
                tracing::info!("installed {}", path.display());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // One thread: the unit's loop and its NATS connection wake each other constantly, and across
    // threads every wake-up is a futex call and a context switch.
    match switchyard_platform::logging::block_on(None, run(args)) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn install(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("cannot find this program's own file")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let target = dir.join("switchyard-stage");
    std::fs::copy(&me, &target)
        .with_context(|| format!("cannot copy {} to {}", me.display(), target.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    Ok(target)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let path = args
        .config
        .context("--config (or SWITCHYARD_CONFIG) names the unit's configuration")?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the unit configuration {}", path.display()))?;
    let config: UnitConfig = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a unit configuration; it is written by `switchyard plan` or the operator",
            path.display()
        )
    })?;
    let replica = args
        .replica
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| std::process::id().to_string());
    let span = tracing::info_span!("unit", unit = %config.unit);
    let _entered = span.enter();
    tracing::info!(pipeline = %config.pipeline, replica = %replica, "starting");

    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let grace = args.stop_grace;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stopping: finishing the messages in flight");
        let _ = shutdown_tx.send(true);
        // Stopping can hang on what it cannot reach (a NATS server that is gone): a stop is a stop.
        tokio::select! {
            _ = tokio::time::sleep(grace) => tracing::warn!(
                "not done within {grace:?}; exiting: what this process held is delivered again"
            ),
            _ = terminate.recv() => tracing::warn!("asked again; exiting now"),
            _ = interrupt.recv() => tracing::warn!("asked again; exiting now"),
        }
        std::process::exit(1);
    });
    let credentials = args.nats_auth.load()?;
    tracing::debug!(credentials = %credentials.describe(), "NATS credentials");
    let options = RunOptions {
        nats_url: args.nats_url,
        credentials,
        replica,
        exit_when_done: args.exit_when_done,
        metrics_addr: args.metrics_addr,
    };
    run_unit(config, options, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
