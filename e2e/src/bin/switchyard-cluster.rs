//! `switchyard-cluster`: a real one-node (or more) Kubernetes cluster on this machine, as `kind`
//! gives one, for trying the chart and the examples with pods. `scripts/cluster` runs it as root.
//!
//!   switchyard-cluster up [--name NAME] [--nodes N] [--hold]
//!   switchyard-cluster images [--name NAME] --binaries DIR --nats-server PATH
//!   switchyard-cluster status [--name NAME]
//!   switchyard-cluster down [--name NAME]

use std::path::PathBuf;
use std::process::ExitCode;

use switchyard_e2e::cluster::{images, Cluster, ClusterError, Options};

const USAGE: &str = "usage: switchyard-cluster up|images|status|down [--name NAME] [--nodes N] [--hold] [--binaries DIR] [--nats-server PATH]";

struct Args {
    command: String,
    name: String,
    nodes: u8,
    binaries: Option<PathBuf>,
    nats_server: Option<PathBuf>,
    /// `up --hold`: the cluster belongs to this command, which takes it down once its input closes;
    /// killed, it leaves the cluster to the next `up` of the name, which takes it down first.
    hold: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or(USAGE)?;
    let mut parsed = Args {
        command,
        name: std::env::var("SWITCHYARD_CLUSTER").unwrap_or_else(|_| "switchyard".into()),
        nodes: 1,
        binaries: None,
        nats_server: None,
        hold: false,
    };
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--name" => parsed.name = value()?,
            "--nodes" => {
                let text = value()?;
                parsed.nodes = text
                    .parse()
                    .ok()
                    .filter(|n| (1..=4).contains(n))
                    .ok_or(format!("--nodes takes 1 to 4, not {text}"))?;
            }
            "--binaries" => parsed.binaries = Some(value()?.into()),
            "--nats-server" => parsed.nats_server = Some(value()?.into()),
            "--hold" => parsed.hold = true,
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if parsed.name.is_empty()
        || !parsed
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "the cluster's name must be lowercase letters, digits and '-', not {:?}",
            parsed.name
        ));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "up" => up(&args),
        "images" => images(&args),
        "status" => Cluster::find(&args.name).map(|c| println!("{}", c.status())),
        "down" => down(&args),
        other => {
            eprintln!("unknown command {other}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard-cluster {}: {e}", args.command);
            ExitCode::FAILURE
        }
    }
}

/// `up`: the cluster, and with `--hold` held until this command's input closes.
fn up(args: &Args) -> Result<(), ClusterError> {
    let cluster = Cluster::up(
        &args.name,
        &Options {
            nodes: args.nodes,
            owned_by_this_process: args.hold,
        },
    )?;
    for (phase, took) in &cluster.timings {
        eprintln!("  {phase}: {:.1}s", took.as_secs_f64());
    }
    eprintln!(
        "cluster {} is up: {} node(s), the cluster DNS, a default StorageClass",
        args.name,
        cluster.layout.nodes.len()
    );
    println!(
        "export KUBECONFIG={}",
        cluster.layout.admin_kubeconfig().display()
    );
    if !args.hold {
        return Ok(());
    }
    eprintln!(
        "holding cluster {} until this command's input closes",
        args.name
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    cluster
        .down()
        .map(|()| eprintln!("cluster {} is down", args.name))
}

/// `images`: the project's images built and imported into every node.
fn images(args: &Args) -> Result<(), ClusterError> {
    let cluster = Cluster::find(&args.name)?;
    let (Some(binaries), Some(nats_server)) = (args.binaries.clone(), args.nats_server.clone())
    else {
        return Err(ClusterError::Unavailable(
            "images needs --binaries DIR (switchyard and switchyard-stage) and --nats-server PATH; scripts/cluster images gives both".into(),
        ));
    };
    let built = cluster.import_project_images(&images::Build {
        binaries,
        nats_server,
    })?;
    for image in built {
        println!(
            "{:<48} {:>6.1} MiB  {}",
            image.names.join(", "),
            image.layer_bytes as f64 / 1_048_576.0,
            image.archive.display()
        );
    }
    Ok(())
}

/// `down`: a cluster that is not up is nothing to do.
fn down(args: &Args) -> Result<(), ClusterError> {
    match Cluster::find(&args.name) {
        Ok(c) => c
            .down()
            .map(|()| eprintln!("cluster {} is down", args.name)),
        Err(ClusterError::NotUp { .. }) => {
            eprintln!("cluster {} is not up: nothing to do", args.name);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
