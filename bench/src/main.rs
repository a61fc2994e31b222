//! `switchyard-bench`: throughput, latency and cost of the stage runtime against the raw NATS limit,
//! on a private nats-server. Kept out of the `switchyard` command: users run pipelines, we measure.

mod args;
mod peer;
mod postgres;
mod procfs;
mod raw;
mod report;
mod run;
mod scenarios;
mod step_costs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Measures Switchyard's stage runtime against the raw NATS limit, on a private nats-server.
#[derive(Parser, Debug)]
#[command(
    name = "switchyard-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    inner: Option<Inner>,
    #[command(flatten)]
    args: args::BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Inner {
    /// The raw loop the benchmark compares against (the benchmark runs it).
    #[command(hide = true)]
    Raw(raw::RawArgs),
    /// File → Python function → file through `switchyard run`, against Bytewax on the same input.
    Peer(peer::PeerArgs),
    /// Rows per second through the postgres source and sink, against raw claim and insert loops on
    /// the same server.
    Postgres(postgres::PostgresArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.inner {
        Some(Inner::Raw(args)) => raw::main(args),
        Some(Inner::Peer(args)) => peer::main(args),
        Some(Inner::Postgres(args)) => postgres::main(args),
        None => run::main(cli.args),
    }
}
