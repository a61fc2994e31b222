//! What `switchyard-bench` is told, the scenarios it names, and the machine it says it ran on.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Messages per throughput run.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Message sizes, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub sizes: Vec<usize>,
    /// Throughput runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Messages per second of the latency runs.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// How long each latency run lasts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub latency_for: Duration,
    /// Run only these scenarios; raw always runs.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Kind>,
    /// The `switchyard-stage` program (default: next to this one).
    #[arg(long, env = "SWITCHYARD_STAGE_BIN")]
    pub stage_bin: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Each scenario with one item per stored message (`off`, as before frames), with frames (`on`:
    /// the backlog preloaded in frames, as a source stores it, and the units framing their outputs),
    /// or both in the same run.
    #[arg(long, value_enum, default_value = "both")]
    pub frames: Frames,
    /// Whether the units keep the Pipeline's books (a record per input message before its
    /// acknowledgement, as they always do): `off` measures what the books cost.
    #[arg(long, value_enum, default_value = "on")]
    pub books: Books,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Books {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Frames {
    Off,
    On,
    Both,
}

impl Frames {
    pub fn modes(self) -> &'static [bool] {
        match self {
            Frames::Off => &[false],
            Frames::On => &[true],
            Frames::Both => &[false, true],
        }
    }
}

/// Which scenario: named once here, for `--only`, the report and the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Raw,
    Passthrough,
    Chain,
    Group,
    Jq,
    Exec,
    ExecBadLines,
    Traced,
    Fork,
    Join,
}

impl Kind {
    /// As `--only` and the JSON spell it.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "an unknown CPU".to_string());
    format!("{cpus} CPUs ({model})")
}
