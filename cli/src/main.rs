//! `switchyard`: validate, plan and run Pipelines.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod day2;
mod errors;
mod kubectl;

use switchyard_crds::load::{self, load, LoadError};
use switchyard_local as local;
use switchyard_operator::controller;
use switchyard_operator::plan::{self, plan, render, Only, PlanSettings};

/// Switchyard runs declarative data pipelines: on Kubernetes through its operator, or on this machine.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check Pipeline files and explain every problem; exits 1 if there is any.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print what the operator would create for a Pipeline: units, subjects, the JetStream stream and
    /// consumers, and a ConfigMap and a Deployment per unit.
    Plan {
        file: PathBuf,
        /// Print only part of the plan.
        #[arg(long, value_enum, default_value = "all")]
        only: Only,
        /// Namespace, when the file names none.
        #[arg(long)]
        namespace: Option<String>,
        /// Image holding `switchyard-stage` (also runs units that name no image).
        #[arg(long, default_value_t = plan::default_image())]
        image: String,
        /// NATS server the units use, when the Pipeline names none.
        #[arg(long, default_value = "nats://nats:4222")]
        nats_url: String,
        /// OTLP endpoint every unit exports spans to (OTEL_EXPORTER_OTLP_ENDPOINT in its pods).
        #[arg(long)]
        otlp_endpoint: Option<String>,
        /// Print instead the steps that carry a running Pipeline, as this file has it, over to FILE
        /// (what an edit costs), as the operator and `run --watch` would take them.
        #[arg(long, value_name = "RUNNING_FILE")]
        from: Option<PathBuf>,
    },
    /// Run the operator: reconcile Pipelines in the cluster (in a pod, or with KUBECONFIG).
    Operator(OperatorArgs),
    /// Print the Pipeline CustomResourceDefinition (as checked in under crds/ and in the Helm chart).
    Crd,
    /// The chart's pre-delete hook: with Pipelines left, refuse the uninstall (naming them) or delete
    /// them and wait until they are gone, while the operator still runs.
    #[command(hide = true)]
    UninstallHook(UninstallHookArgs),
    /// Run a Pipeline on this machine: a private NATS server, one process per unit replica, live
    /// progress, and a summary when a finite source is drained.
    Run(local::RunArgs),
    /// Look into the dead-letter queue, replay dead letters into the unit that failed them, or purge
    /// them.
    Dlq {
        #[command(subcommand)]
        action: day2::DlqAction,
    },
    /// Show the messages on a unit's input (or output) as JSON lines with their headers, without
    /// acknowledging or delaying anything.
    Tap(day2::TapArgs),
    /// Follow one item: every unit it passed, when, how long it took there, and where it ended.
    Trace(day2::TraceArgs),
    /// Every unit's replicas, lag, rate and dead letters, now.
    Status(day2::Reach),
    /// Pause a run in progress: its sources stop, its units finish what is queued, then stop.
    Pause { file: PathBuf },
    /// Resume a paused run: every unit back at the replicas it had, sources from their checkpoints.
    Resume { file: PathBuf },
    /// Print the Pipeline's topology as Mermaid, DOT or SVG (with the last local run's counts on the
    /// edges, when it left any).
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "mermaid")]
        format: day2::GraphFormat,
    },
}

// `switchyard operator`'s settings (the variant's doc comment is the command's help).
#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// NATS server for Pipelines that name none.
    #[arg(long, env = "SWITCHYARD_NATS_URL", default_value = "nats://nats:4222")]
    nats_url: String,
    /// Image holding `switchyard-stage`; also runs units that name no image.
    #[arg(long, env = "SWITCHYARD_STAGE_IMAGE", default_value_t = plan::default_image())]
    stage_image: String,
    /// Watch Pipelines in this namespace only (default: all namespaces).
    #[arg(long, env = "SWITCHYARD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Reconcile only while holding a Lease, so that several replicas can run.
    #[arg(long, env = "SWITCHYARD_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE).
    #[arg(long, env = "SWITCHYARD_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a deleted Pipeline waits for its NATS stream to be reachable before it is deleted
    /// without it (a Warning Event names what was left behind).
    #[arg(long, env = "SWITCHYARD_CLEANUP_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    cleanup_timeout: std::time::Duration,
    /// Log format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// OTLP endpoint every unit exports spans to (OTEL_EXPORTER_OTLP_ENDPOINT in its pods), unless
    /// its stage's env sets one.
    #[arg(long, env = "SWITCHYARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

// The chart's pre-delete hook's settings.
#[derive(clap::Args, Debug)]
struct UninstallHookArgs {
    #[arg(long, value_enum, default_value = "refuse")]
    pipelines: switchyard_operator::uninstall::Mode,
    /// Look at this namespace only (the chart's watchNamespace).
    #[arg(long)]
    watch_namespace: Option<String>,
    /// How long deleted Pipelines may take to go.
    #[arg(long, default_value = "4m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// The Helm release being uninstalled, its namespace and revision (for the refusal's commands).
    #[arg(long, default_value = "switchyard")]
    release: String,
    #[arg(long, default_value = "switchyard-system")]
    release_namespace: String,
    #[arg(long, default_value_t = 1)]
    revision: u32,
}

fn main() -> ExitCode {
    let invoked_as = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if invoked_as.as_deref() == Some(kubectl::PLUGIN_NAME) {
        return kubectl::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Plan {
            file,
            from: Some(running),
            ..
        } => print_migration(&running, &file),
        Command::Plan {
            file,
            only,
            namespace,
            image,
            nats_url,
            otlp_endpoint,
            from: None,
        } => print_plan(
            &file,
            only,
            namespace,
            PlanSettings {
                stage_image: image,
                nats_url,
                otlp_endpoint,
            },
        ),
        Command::Run(args) => local::main(args),
        Command::Dlq { action } => day2::block_on(day2::dlq_command(action)),
        Command::Tap(args) => day2::block_on(day2::tap_command(args)),
        Command::Trace(args) => day2::block_on(day2::trace_command(args)),
        Command::Status(reach) => day2::block_on(day2::status_command(reach)),
        Command::Pause { file } => day2::block_on(day2::control_command(file, local::PAUSE)),
        Command::Resume { file } => day2::block_on(day2::control_command(file, local::RESUME)),
        Command::Graph { file, format } => day2::graph_command(file, format),
        Command::Operator(args) => operator(args),
        Command::UninstallHook(args) => uninstall_hook(args),
        Command::Crd => match switchyard_crds::crd_yaml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot print the CRD: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match load(file)
            .and_then(|p| plan(&p, &PlanSettings::default()).map_err(LoadError::Invalid))
        {
            Ok(plan) => {
                let parts: Vec<String> = switchyard_crds::topology::UnitType::ALL
                    .iter()
                    .map(|kind| (kind, plan.units.iter().filter(|u| u.kind == *kind).count()))
                    .filter(|(_, n)| *n > 0)
                    .map(|(kind, n)| format!("{n} {kind}{}", if n == 1 { "" } else { "s" }))
                    .collect();
                println!(
                    "{}: valid; {} units: {}",
                    file.display(),
                    plan.units.len(),
                    parts.join(", ")
                );
            }
            Err(e) => {
                failed = true;
                print!("{}", e.describe(file));
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The steps from the Pipeline in `running` to the one in `file`.
fn print_migration(running: &Path, file: &Path) -> ExitCode {
    use switchyard_crds::migration;
    let states = |path: &Path| -> Result<(Vec<migration::UnitState>, migration::Policy), String> {
        let pipeline = load(path).map_err(|e| e.describe(path))?;
        let topology =
            switchyard_crds::validate::analyze(&pipeline).map_err(|p| load::describe(path, &p))?;
        let layout = switchyard_crds::layout::layout(&topology, &pipeline.spec)
            .map_err(|p| load::describe(path, &p))?;
        Ok((
            migration::unit_states(&topology, &layout),
            switchyard_crds::migration::Policy::of(&pipeline.spec),
        ))
    };
    let (before, after) = match (states(running), states(file)) {
        (Ok(before), Ok(after)) => (before, after),
        (Err(e), _) | (_, Err(e)) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (policy, migration) = (after.1, migration::plan(&before.0, &after.0, after.1));
    if migration.is_empty() {
        println!("nothing to change");
        return ExitCode::SUCCESS;
    }
    println!(
        "{} step{}, {}:",
        migration.steps.len(),
        if migration.steps.len() == 1 { "" } else { "s" },
        if migration.is_stepwise() {
            "taken one after the other"
        } else {
            "applied at once, as any spec"
        }
    );
    for (n, step) in migration.steps.iter().enumerate() {
        println!("{:>3}. {step}", n + 1);
    }
    if !migration.discards.is_empty() {
        let what: Vec<String> = migration.discards.iter().map(|d| d.to_string()).collect();
        println!(
            "without drain, drops whatever is then in {}{}",
            what.join(" and "),
            if policy.allow_loss {
                " (allowLoss is set)"
            } else {
                ": refused if any of it holds messages, unless allowLoss is set"
            }
        );
    }
    ExitCode::SUCCESS
}

fn print_plan(
    file: &Path,
    only: Only,
    namespace: Option<String>,
    settings: PlanSettings,
) -> ExitCode {
    let mut pipeline = match load(file) {
        Ok(p) => p,
        Err(e) => {
            eprint!("{}", e.describe(file));
            return ExitCode::FAILURE;
        }
    };
    if namespace.is_some() {
        pipeline.metadata.namespace = namespace;
    }
    match plan(&pipeline, &settings) {
        Ok(plan) => match render(&plan, only) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot print the plan: {e}");
                ExitCode::FAILURE
            }
        },
        Err(problems) => {
            eprint!("{}", load::describe(file, &problems));
            ExitCode::FAILURE
        }
    }
}

fn uninstall_hook(args: UninstallHookArgs) -> ExitCode {
    switchyard_platform::logging::init("info,kube=warn", false);
    let mode = args.pipelines;
    let namespace = args.watch_namespace.filter(|n| !n.is_empty());
    let timeout = args.timeout;
    let release = switchyard_operator::uninstall::Release {
        name: args.release,
        namespace: args.release_namespace,
        revision: args.revision,
    };
    let work = async {
        let client = kube::Client::try_default().await?;
        switchyard_operator::uninstall::run(client, namespace.as_deref(), mode, &release, timeout)
            .await
    };
    match switchyard_platform::logging::block_on(Some(1), work) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            // The Job keeps its pod's message, which `kubectl describe job` shows.
            let _ = std::fs::write("/dev/termination-log", e.to_string());
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn operator(args: OperatorArgs) -> ExitCode {
    switchyard_platform::logging::init("info,kube=warn,async_nats=warn", args.log_format == "json");
    let options = controller::OperatorOptions {
        settings: PlanSettings {
            stage_image: args.stage_image,
            nats_url: args.nats_url,
            otlp_endpoint: args.otlp_endpoint.filter(|e| !e.trim().is_empty()),
        },
        watch_namespace: args.watch_namespace,
        metrics_addr: args.metrics_addr,
        leader_election: args.leader_election,
        lease_namespace: args.lease_namespace,
        instance: None,
        cleanup_timeout: args.cleanup_timeout,
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    match switchyard_platform::logging::block_on(Some(workers), controller::run(options)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
