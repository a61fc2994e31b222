//! What `switchyard run` is told on its command line.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use switchyard_platform::credentials::NatsAuthArgs;

use crate::progress::ProgressMode;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The Pipeline file. Relative paths in it (handlers, files) start in the file's folder.
    pub file: PathBuf,
    /// Use this NATS server instead of starting one (several, separated by commas, for the nodes of
    /// a cluster); the Pipeline's stream there is reset first.
    #[arg(long, conflicts_with = "nats_cluster")]
    pub nats_url: Option<String>,
    /// Start a JetStream cluster of this many servers on loopback (1, 3 or 5) instead of one server,
    /// and keep every node running. The Pipeline's stream keeps `spec.nats.replicas` copies, or one
    /// per server. Default: `spec.nats.replicas`.
    #[arg(long, value_name = "SERVERS", value_parser = PossibleValuesParser::new(["1", "3", "5"]).map(|s| s.parse::<usize>().unwrap_or(1)))]
    pub nats_cluster: Option<usize>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// Continue where the last run of this file stopped: its NATS store (kept in `.switchyard/` beside
    /// the file) is taken up again, sources go on from their checkpoints, messages not yet
    /// acknowledged (replayed dead letters among them) are delivered again, and file sinks append.
    /// Without it, a run starts afresh.
    #[arg(long)]
    pub resume: bool,
    /// Apply edits of FILE while the run goes on: each edit is planned against what runs and carried
    /// out in steps that lose and double nothing (printed as they go). An edit that is invalid, or
    /// that would drop messages without `spec.migration.allowLoss`, is refused and the run goes on.
    #[arg(long)]
    pub watch: bool,
    /// Append to the files of file sinks instead of starting them afresh.
    #[arg(long)]
    pub append: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// The `switchyard-stage` program (default: next to this one, or on PATH).
    #[arg(long, env = "SWITCHYARD_STAGE_BIN")]
    pub stage_bin: Option<PathBuf>,
    /// Let stage processes log at debug level (their logs are kept in the run's folder).
    #[arg(long)]
    pub verbose: bool,
    /// Keep the stage processes' logs in this folder, one file per process (by default they are in a
    /// temporary folder, removed after the run unless a unit kept failing).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Write the run's summary as JSON here, with every unit's replicas and lag over time and the
    /// scaling decisions.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// Draw lag and replicas per unit over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}
