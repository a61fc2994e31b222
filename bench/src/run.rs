//! The benchmark: throughput, latency and cost of the stage runtime, each shown as a ratio to the
//! raw limit measured in the same run on the same nats-server — a minimal async-nats loop doing the
//! work one unit does (fetch a batch, publish each message downstream and wait for the stream's
//! acknowledgements, acknowledge the inputs).
//!
//! Every scenario gets its own stream. Throughput: the input is preloaded with N messages, the unit
//! processes start, and the rate is taken from the first output to the last. Latency: messages
//! carrying their send time go in at a fixed moderate rate and are timed as they come out of the
//! last unit. Cost: CPU seconds of the unit processes and of nats-server per 100,000 messages, and
//! the units' peak resident memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Serialize;
use switchyard_crds::layout::{layout, Layout};
use switchyard_crds::validate::{analyze, parse_pipeline};
use switchyard_platform::admin;
use switchyard_platform::embedded::NatsServer;
use switchyard_stage::lineage::Lineage;

use switchyard_local::thousands;

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
    fn modes(self) -> &'static [bool] {
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
}

impl Kind {
    /// As `--only` and the JSON spell it.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct Scenario {
    kind: Kind,
    title: &'static str,
    stages: &'static str,
    /// Units to run, in flow order; the last one's output is what comes out.
    units: &'static [&'static str],
    /// Run the raw loop instead of switchyard-stage.
    raw: bool,
    /// `spec.tracing.sampleRate`: off, except in the scenario that measures what tracing costs.
    sample_rate: f64,
    /// Every how many messages one never comes out (its handler answers it with a line that is no
    /// reply, and it is dead-lettered): what finding the culprit costs.
    lost_every: Option<u64>,
}

impl Scenario {
    /// Of `sent` messages numbered from 0, how many come out.
    fn coming_out(&self, sent: u64) -> u64 {
        sent - self.lost_every.map_or(0, |n| sent / n)
    }
}

const ECHO_HANDLER: &str = "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    sys.stdout.write(json.dumps({\"id\": m[\"id\"], \"outputs\": [m[\"data\"]]}) + \"\\n\")\n    sys.stdout.flush()\n";

/// The echo, except that it answers message 999, 1999, ... with a line that is no reply.
const BAD_LINE_HANDLER: &str = "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m[\"data\"][\"i\"] % 1000 == 999:\n        sys.stdout.write(\"this is not json\\n\")\n    else:\n        sys.stdout.write(json.dumps({\"id\": m[\"id\"], \"outputs\": [m[\"data\"]]}) + \"\\n\")\n    sys.stdout.flush()\n";

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            kind: Kind::Raw,
            title: "raw async-nats loop",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: true,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::Passthrough,
            title: "one passthrough unit",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::Chain,
            title: "chain of three units",
            stages: "    - {name: a, passthrough: {}}\n    - {name: b, passthrough: {}}\n    - {name: c, passthrough: {}}\n",
            units: &["a", "b", "c"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::Group,
            title: "one unit, three steps",
            stages: "    - name: g\n      stages: [{name: s1, passthrough: {}}, {name: s2, passthrough: {}}, {name: s3, passthrough: {}}]\n",
            units: &["g"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::Jq,
            title: "one jq step",
            stages: "    - {name: q, jq: '. + {ok: true}'}\n",
            units: &["q"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::Exec,
            title: "one exec step (Python echo)",
            stages: "    - {name: e, exec: {command: [python3, handler.py]}}\n",
            units: &["e"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
        },
        Scenario {
            kind: Kind::ExecBadLines,
            title: "exec, 1 bad line in 1,000",
            stages: "    - {name: e, exec: {command: [python3, bad-lines.py]}, retry: {maxAttempts: 1}}\n",
            units: &["e"],
            raw: false,
            sample_rate: 0.0,
            lost_every: Some(1000),
        },
        Scenario {
            kind: Kind::Traced,
            title: "one passthrough unit, every item traced",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: false,
            sample_rate: 1.0,
            lost_every: None,
        },
    ]
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioResult {
    pub scenario: Kind,
    pub title: String,
    /// Several items per stored message (the raw loop never: it is the per-message limit).
    pub frames: bool,
    pub size: usize,
    pub messages: u64,
    pub per_second: f64,
    pub ratio_to_raw: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Of the unit (or raw loop) processes, per 100,000 messages.
    pub cpu_seconds_per_100k: f64,
    /// Of the processes the units started (exec handlers), per 100,000 messages.
    pub handler_cpu_seconds_per_100k: f64,
    /// Of nats-server, per 100,000 messages.
    pub server_cpu_seconds_per_100k: f64,
    pub peak_rss_mib: f64,
    pub hops: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    machine: String,
    nats_server: String,
    results: Vec<ScenarioResult>,
    /// None when `--only` left out the passthrough scenario it is measured after.
    idle_rss_mib: Option<f64>,
    /// CPU microseconds per message an in-process step adds, from the unit runs (noisy); None without
    /// both the passthrough and the group scenario.
    step_cost_micros: Option<f64>,
    /// Measured directly: a chain of steps run in this process, per message.
    steps: StepCosts,
}

pub fn main(args: BenchArgs) -> ExitCode {
    match switchyard_platform::logging::block_on(Some(2), run(args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("switchyard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let stage_bin = switchyard_local::locate_stage_binary(args.stage_bin.clone())?;
    let me = std::env::current_exe().context("cannot find this program")?;
    let server = NatsServer::start()?;
    let client = async_nats::connect(server.url()).await?;
    let js = switchyard_platform::nats::jetstream_context(client.clone());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("handler.py"), ECHO_HANDLER)?;
    std::fs::write(dir.path().join("bad-lines.py"), BAD_LINE_HANDLER)?;
    let machine = machine();
    let nats_version = client.server_info().version.clone();
    eprintln!(
        "switchyard-bench: nats-server {nats_version} on {machine}; {} messages per throughput run, latency at {} msg/s for {:?}",
        thousands(args.messages),
        args.rate,
        args.latency_for
    );
    let wanted = |s: &Scenario| s.raw || args.only.is_empty() || args.only.contains(&s.kind);
    let mut results = Vec::new();
    let mut idle_rss = None;
    for &size in &args.sizes {
        let mut raw_rate = 0.0;
        let runs = scenarios().into_iter().filter(|s| wanted(s)).flat_map(|s| {
            let modes: &[bool] = if s.raw { &[false] } else { args.frames.modes() };
            modes.iter().map(move |&frames| (s.clone(), frames))
        });
        for (scenario, frames) in runs {
            let bench = Bench {
                js: &js,
                server: &server,
                stage_bin: &stage_bin,
                me: &me,
                dir: dir.path(),
                args: &args,
            };
            let mut result = bench
                .scenario(&scenario, size, frames)
                .await
                .with_context(|| {
                    format!("scenario {:?} with {size}-byte messages", scenario.kind)
                })?;
            if scenario.raw {
                raw_rate = result.per_second;
            }
            result.ratio_to_raw = if raw_rate > 0.0 {
                result.per_second / raw_rate
            } else {
                0.0
            };
            eprintln!("  {}", row(&result));
            if scenario.kind == Kind::Passthrough && idle_rss.is_none() && !frames {
                idle_rss = Some(bench.idle_rss().await?);
            }
            results.push(result);
        }
    }
    let step_cost = step_cost(&results);
    let steps = step_costs(&args.sizes).await?;
    let report = Report {
        machine,
        nats_server: nats_version,
        results,
        idle_rss_mib: idle_rss,
        step_cost_micros: step_cost,
        steps,
    };
    print!("{}", render(&report, &args));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// CPU microseconds per message an in-process step adds: a unit of three steps against a unit of one,
/// per extra step, averaged over the sizes.
fn step_cost(results: &[ScenarioResult]) -> Option<f64> {
    let cpu = |kind: Kind, size: usize| {
        results
            .iter()
            .find(|r| r.scenario == kind && r.size == size)
            .map(|r| r.cpu_seconds_per_100k)
    };
    let costs: Vec<f64> = results
        .iter()
        .filter(|r| r.scenario == Kind::Group)
        .filter_map(|r| {
            Some((cpu(Kind::Group, r.size)? - cpu(Kind::Passthrough, r.size)?) / 2.0 * 10.0)
        })
        .collect();
    (!costs.is_empty()).then(|| costs.iter().sum::<f64>() / costs.len() as f64)
}

fn row(r: &ScenarioResult) -> String {
    format!(
        "{:>5} B  {:<28} {:>9} msg/s  {:>5.2} × raw  p50 {:>6.2} ms  p99 {:>6.2} ms  CPU {:>5.2} s + nats {:>5.2} s /100k  RSS {:>5.1} MiB",
        r.size,
        r.title,
        thousands(r.per_second.round() as u64),
        r.ratio_to_raw,
        r.p50_ms,
        r.p99_ms,
        r.cpu_seconds_per_100k,
        r.server_cpu_seconds_per_100k,
        r.peak_rss_mib
    )
}

fn render(report: &Report, args: &BenchArgs) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nswitchyard-bench on {}, nats-server {}; throughput over {} messages, latency at {} msg/s\n",
        report.machine,
        report.nats_server,
        thousands(args.messages),
        args.rate
    );
    let _ = writeln!(
        out,
        "| size | scenario | msg/s | × raw | p50 ms | p99 ms | p99 ms per hop | unit CPU s /100k | handler CPU s /100k | nats CPU s /100k | peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &report.results {
        let _ = writeln!(
            out,
            "| {} B | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r.size,
            r.title,
            thousands(r.per_second.round() as u64),
            r.ratio_to_raw,
            r.p50_ms,
            r.p99_ms,
            r.p99_ms / f64::from(r.hops.max(1)),
            r.cpu_seconds_per_100k,
            r.handler_cpu_seconds_per_100k,
            r.server_cpu_seconds_per_100k,
            r.peak_rss_mib
        );
    }
    render_notes(&mut out, report);
    render_targets(&mut out, report, args);
    out
}

/// The in-process step costs and the idle process's memory.
fn render_notes(out: &mut String, report: &Report) {
    use std::fmt::Write as _;
    let _ = writeln!(out);
    for run in &report.steps.runs {
        let _ = writeln!(
            out,
            "In-process steps, {} B, µs per message: one passthrough {:.2}, three {:.2}, one jq `. + {{ok: true}}` {:.2}.",
            run.size, run.one_step_micros, run.three_steps_micros, run.jq_micros
        );
    }
    if let Some(cost) = report.step_cost_micros {
        let _ = writeln!(
            out,
            "From the unit runs (noisier): three steps against one cost {cost:.2} µs of CPU per message per step."
        );
    }
    for bad in report
        .results
        .iter()
        .filter(|r| r.scenario == Kind::ExecBadLines)
    {
        let echo = report
            .results
            .iter()
            .find(|r| r.scenario == Kind::Exec && r.size == bad.size && r.frames == bad.frames);
        if let Some(echo) = echo.filter(|e| e.per_second > 0.0) {
            let _ = writeln!(
                out,
                "Finding the item behind each bad line (1 in 1,000, tried alone, dead-lettered), {} B{}: {:.0}% of the echo's throughput ({} against {} msg/s).",
                bad.size,
                if bad.frames { ", frames" } else { "" },
                100.0 * bad.per_second / echo.per_second,
                thousands(bad.per_second.round() as u64),
                thousands(echo.per_second.round() as u64)
            );
        }
    }
    if let Some(rss) = report.idle_rss_mib {
        let _ = writeln!(out, "An idle stage process holds {rss:.1} MiB.");
    }
}

/// Each target the project set itself, met or not.
fn render_targets(out: &mut String, report: &Report, args: &BenchArgs) {
    use std::fmt::Write as _;
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    let worst = |kind: Kind, frames: bool, of: fn(&ScenarioResult) -> f64| {
        report
            .results
            .iter()
            .filter(|r| r.scenario == kind && r.frames == frames)
            .map(of)
            .fold(f64::INFINITY, f64::min)
    };
    let worst_unit = worst(Kind::Passthrough, false, |r| r.ratio_to_raw);
    // Frames are what a unit does by default; without them measured, the figure is the one there is.
    let exec = match worst(Kind::Exec, true, |r| r.per_second) {
        framed if framed.is_finite() => framed,
        _ => worst(Kind::Exec, false, |r| r.per_second),
    };
    let framed_unit = worst(Kind::Passthrough, true, |r| r.ratio_to_raw);
    let framed_exec = worst(Kind::Exec, true, |r| r.ratio_to_raw);
    let p99_hop = report
        .results
        .iter()
        .filter(|r| r.scenario != Kind::Raw)
        .map(|r| r.p99_ms / f64::from(r.hops.max(1)))
        .fold(0.0, f64::max);
    let _ = writeln!(out, "\nTargets:");
    if worst_unit.is_finite() {
        let _ = writeln!(
            out,
            "- one unit ≥ 0.70 of the raw limit: {worst_unit:.2} ({})",
            check(worst_unit >= 0.7)
        );
    }
    let _ = writeln!(
        out,
        "- an in-process step adds under 2 µs per message: {:.2} µs ({})",
        report.steps.per_step_micros,
        check(report.steps.per_step_micros < 2.0)
    );
    if exec.is_finite() {
        let _ = writeln!(
            out,
            "- an exec step ≥ 50,000 msg/s with one child: {} msg/s ({})",
            thousands(exec.round() as u64),
            check(exec >= 50_000.0)
        );
    }
    if framed_unit.is_finite() {
        let _ = writeln!(
            out,
            "- one passthrough unit with frames ≥ 3 × the raw loop: {framed_unit:.2} ({})",
            check(framed_unit >= 3.0)
        );
    }
    if framed_exec.is_finite() {
        let _ = writeln!(
            out,
            "- one exec step (Python echo) with frames ≥ 2 × the raw loop: {framed_exec:.2} ({})",
            check(framed_exec >= 2.0)
        );
    }
    let _ = writeln!(
        out,
        "- p99 per hop ≤ 2 ms at {} msg/s: {p99_hop:.2} ms ({})",
        args.rate,
        check(p99_hop <= 2.0)
    );
    if let Some(rss) = report.idle_rss_mib {
        let _ = writeln!(
            out,
            "- an idle stage process ≤ 20 MiB: {rss:.1} MiB ({})",
            check(rss <= 20.0)
        );
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

struct Bench<'a> {
    js: &'a jetstream::Context,
    server: &'a NatsServer,
    stage_bin: &'a Path,
    me: &'a Path,
    dir: &'a Path,
    args: &'a BenchArgs,
}

/// A padded JSON message of exactly `size` bytes (or the smallest that holds its fields).
fn payload(size: usize, t: u128, i: u64) -> Vec<u8> {
    let head = format!("{{\"t\":{t},\"i\":{i},\"pad\":\"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

impl Bench<'_> {
    fn pipeline(&self, scenario: &Scenario, size: usize) -> anyhow::Result<Layout> {
        let text = format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: bench-{}-{size}, namespace: bench}}\nspec:\n  sources: [{{name: feed, nats: {{subject: bench.unused}}}}]\n  stages:\n{}  sinks: [{{name: out, log: {{}}}}]\n  tracing: {{sampleRate: {}}}\n",
            scenario.kind.name(), scenario.stages, scenario.sample_rate
        );
        let pipeline = parse_pipeline(&text).map_err(|p| anyhow::anyhow!("{p}"))?;
        let topology = analyze(&pipeline).map_err(|p| anyhow::anyhow!("{p:?}"))?;
        layout(&topology, &pipeline.spec).map_err(|p| anyhow::anyhow!("{p:?}"))
    }

    fn spawn(&self, scenario: &Scenario, layout: &Layout) -> anyhow::Result<Vec<Child>> {
        let mut children = Vec::new();
        for unit in scenario.units {
            let config = layout
                .units
                .iter()
                .find(|u| u.unit == *unit)
                .with_context(|| format!("no unit {unit}"))?;
            let path = self
                .dir
                .join(format!("{}-{unit}.json", layout.nats.stream.name));
            std::fs::write(&path, serde_json::to_vec(config)?)?;
            let mut command = if scenario.raw {
                let mut c = Command::new(self.me);
                c.arg("raw");
                c
            } else {
                Command::new(self.stage_bin)
            };
            command
                .arg("--config")
                .arg(&path)
                .arg("--nats-url")
                .arg(self.server.url())
                .current_dir(self.dir)
                .env("SWITCHYARD_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            children.push(
                command
                    .spawn()
                    .with_context(|| format!("cannot start unit {unit}"))?,
            );
        }
        Ok(children)
    }

    /// Stores `count` items on `subject`, `per_frame` in each message as a source would; returns the
    /// number of messages.
    async fn preload(
        &self,
        subject: &str,
        size: usize,
        count: u64,
        per_frame: u64,
    ) -> anyhow::Result<u64> {
        let mut acks = std::collections::VecDeque::new();
        let mut messages = 0;
        let mut i = 0;
        while i < count {
            // As many as fit in half the largest frame: a unit's outputs, their headers a little
            // longer, then fit in one frame each, and the outputs count as the inputs do.
            let one = payload(size, 0, i).len() + 64;
            let fit = (switchyard_platform::frame::MOST_BYTES / 2 / one).max(1) as u64;
            let n = per_frame.min(fit).min(count - i);
            let publish = if n == 1 {
                let lineage = Lineage::at_source("feed", i.to_string(), format!("feed:{i}"));
                jetstream::message::PublishMessage::build()
                    .headers(lineage.source_headers())
                    .payload(payload(size, 0, i).into())
            } else {
                let mut writer = switchyard_platform::frame::FrameWriter::new();
                for k in i..i + n {
                    let lineage = Lineage::at_source("feed", k.to_string(), format!("feed:{k}"));
                    writer.push(&lineage.source_headers(), &payload(size, 0, k));
                }
                let (mut headers, body) = writer.finish();
                headers.insert("Nats-Msg-Id", format!("feed:{i}").as_str());
                jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(body)
            };
            i += n;
            messages += 1;
            acks.push_back(self.js.send_publish(subject.to_string(), publish).await?);
            if acks.len() >= 2000 {
                if let Some(ack) = acks.pop_front() {
                    ack.await?;
                }
            }
        }
        for ack in acks {
            ack.await?;
        }
        Ok(messages)
    }

    async fn pending(&self, layout: &Layout, consumer: &str) -> anyhow::Result<u64> {
        let stream = self.js.get_stream(&layout.nats.stream.name).await?;
        Ok(stream.consumer_info(consumer).await?.num_pending)
    }

    async fn scenario(
        &self,
        scenario: &Scenario,
        size: usize,
        frames: bool,
    ) -> anyhow::Result<ScenarioResult> {
        let repeats = self.args.repeat.max(1);
        let mut runs = Vec::new();
        for run in 0..repeats {
            let last = run + 1 == repeats;
            runs.push(self.run_once(scenario, size, last, frames).await?);
        }
        // The median run by throughput, with the latency of the last run (the only one that has it).
        let latency = runs
            .last()
            .and_then(|r| r.latency)
            .unwrap_or((f64::NAN, f64::NAN));
        runs.sort_by(|a, b| a.throughput.per_second.total_cmp(&b.throughput.per_second));
        let median = &runs[runs.len() / 2];
        let per_100k = |seconds: f64| seconds * 100_000.0 / median.throughput.counted as f64;
        Ok(ScenarioResult {
            scenario: scenario.kind,
            title: if frames {
                format!("{}, frames", scenario.title)
            } else {
                scenario.title.to_string()
            },
            frames,
            size,
            messages: self.args.messages,
            per_second: median.throughput.per_second,
            ratio_to_raw: 1.0,
            p50_ms: latency.0,
            p99_ms: latency.1,
            cpu_seconds_per_100k: per_100k(median.throughput.unit_cpu),
            handler_cpu_seconds_per_100k: per_100k(median.throughput.handler_cpu),
            server_cpu_seconds_per_100k: per_100k(median.throughput.server_cpu),
            peak_rss_mib: median.peak_rss,
            hops: scenario.units.len() as u32,
        })
    }

    /// One throughput run (and, if `with_latency`, a latency run after it) on a fresh stream.
    async fn run_once(
        &self,
        scenario: &Scenario,
        size: usize,
        with_latency: bool,
        frames: bool,
    ) -> anyhow::Result<Run> {
        let mut layout = self.pipeline(scenario, size)?;
        if self.args.books == Books::Off {
            for unit in &mut layout.units {
                unit.books = None;
            }
        }
        if !frames {
            // As before frames: one item a message, and pulls as large as the concurrency.
            for unit in &mut layout.units {
                unit.frame_items = 1;
                if let Some(input) = &mut unit.input {
                    input.pull_batch = switchyard_crds::layout::DEFAULT_CONCURRENCY as usize;
                }
            }
        }
        let per_frame = layout
            .units
            .iter()
            .find(|u| u.unit == "feed")
            .map_or(1, |u| u.frame_items.max(1) as u64);
        admin::delete(self.js, &layout.nats).await?;
        admin::apply(self.js, &layout.nats).await?;
        let feed = layout
            .units
            .iter()
            .find(|u| u.unit == "feed")
            .and_then(|u| u.output_subject.clone())
            .context("the feed has no subject")?;
        let last = scenario.units.last().copied().unwrap_or_default();
        let out_subject = layout
            .units
            .iter()
            .find(|u| u.unit == last)
            .and_then(|u| u.output_subject.clone())
            .context("the last unit has no subject")?;
        let count = self.args.messages;
        let stored = self.preload(&feed, size, count, per_frame).await?;
        let mut children = self.spawn(scenario, &layout)?;
        let pids: Vec<u32> = children.iter().map(Child::id).collect();
        // Every unit makes one output message of each input message: frames stay frames, one bad
        // item leaves its frame's other items in it.
        let (messages_out, items_out) = if per_frame > 1 {
            (stored, scenario.coming_out(count))
        } else {
            (scenario.coming_out(count), scenario.coming_out(count))
        };
        let throughput = match self
            .throughput(&layout, &pids, messages_out, items_out)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        };
        let latency = if with_latency {
            match self
                .latency(scenario, &layout, &feed, &out_subject, size)
                .await
            {
                Ok(l) => Some(l),
                Err(e) => {
                    stop(&mut children);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let peak_rss = pids
            .iter()
            .filter_map(|pid| crate::procfs::memory_mib(*pid, "VmHWM:"))
            .fold(0.0, f64::max);
        stop(&mut children);
        admin::delete(self.js, &layout.nats).await?;
        Ok(Run {
            throughput,
            latency,
            peak_rss,
        })
    }

    async fn throughput(
        &self,
        layout: &Layout,
        pids: &[u32],
        count: u64,
        items: u64,
    ) -> anyhow::Result<Throughput> {
        // The stream counts messages; with frames, each stands for `items / count` items.
        let items_per_message = items as f64 / count.max(1) as f64;
        let started = Instant::now();
        let limit = Duration::from_secs(60 + count / 1000);
        let cpu = |pids: &[u32]| {
            pids.iter()
                .filter_map(|p| crate::procfs::cpu_seconds(*p))
                .sum::<f64>()
        };
        let handlers = || {
            pids.iter()
                .flat_map(|p| crate::procfs::children(*p))
                .collect::<Vec<u32>>()
        };
        // Wait for the first output, then time the rest.
        let (first_at, first_count, unit_cpu0, handler_cpu0, server_cpu0) = loop {
            let n = self.pending(layout, "out").await?;
            if n > 0 {
                break (
                    Instant::now(),
                    n,
                    cpu(pids),
                    cpu(&handlers()),
                    crate::procfs::cpu_seconds(self.server.pid()).unwrap_or(0.0),
                );
            }
            anyhow::ensure!(started.elapsed() < limit, "no output after {limit:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        loop {
            let n = self.pending(layout, "out").await?;
            if n >= count {
                let elapsed = first_at.elapsed().as_secs_f64().max(1e-6);
                let counted = ((count - first_count) as f64 * items_per_message).round() as u64;
                return Ok(Throughput {
                    per_second: counted as f64 / elapsed,
                    counted: counted.max(1),
                    unit_cpu: cpu(pids) - unit_cpu0,
                    handler_cpu: cpu(&handlers()) - handler_cpu0,
                    server_cpu: crate::procfs::cpu_seconds(self.server.pid()).unwrap_or(0.0)
                        - server_cpu0,
                });
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "only {n} of {count} outputs after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// p50 and p99 in milliseconds, from send to arrival at the last unit's output.
    async fn latency(
        &self,
        scenario: &Scenario,
        layout: &Layout,
        feed: &str,
        out_subject: &str,
        size: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let stream = self.js.get_stream(&layout.nats.stream.name).await?;
        let watcher: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench_latency".into()),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::None,
                filter_subject: out_subject.to_string(),
                ..Default::default()
            })
            .await?;
        let mut arrivals = watcher
            .stream()
            .max_messages_per_batch(100)
            .heartbeat(Duration::from_secs(1))
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let total = (self.args.rate as f64 * self.args.latency_for.as_secs_f64()).max(1.0) as u64;
        let interval = Duration::from_secs_f64(1.0 / self.args.rate.max(1) as f64);
        let js = self.js.clone();
        let feed = feed.to_string();
        let producer = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            for i in 0..total {
                tokio::time::sleep_until(started + interval * i as u32).await;
                let lineage =
                    Lineage::at_source("feed", format!("lat-{i}"), format!("feed:lat-{i}"));
                let publish = jetstream::message::PublishMessage::build()
                    .headers(lineage.source_headers())
                    .payload(payload(size, now_nanos(), i).into());
                match js.send_publish(feed.clone(), publish).await {
                    // The acknowledgement is awaited elsewhere in no order; latency is measured at arrival.
                    Ok(ack) => drop(ack),
                    Err(e) => return Err(anyhow::anyhow!("cannot publish: {e}")),
                }
            }
            Ok(())
        });
        let mut latencies = Vec::with_capacity(total as usize);
        let deadline = Instant::now() + self.args.latency_for + Duration::from_secs(30);
        let coming_out = scenario.coming_out(total);
        while (latencies.len() as u64) < coming_out && Instant::now() < deadline {
            let next = tokio::time::timeout(Duration::from_secs(5), arrivals.next()).await;
            let Ok(Some(Ok(message))) = next else {
                continue;
            };
            let now = now_nanos();
            // A frame left over from the throughput run holds items without a send time: skipped.
            if switchyard_platform::frame::frame_count(message.headers.as_ref()).is_some() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_slice(&message.payload)?;
            if let Some(t) = value["t"].as_u64() {
                latencies.push((now.saturating_sub(u128::from(t))) as f64 / 1e6);
            }
        }
        producer.await??;
        anyhow::ensure!(
            !latencies.is_empty(),
            "no message came through in the latency run"
        );
        latencies.sort_by(f64::total_cmp);
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        Ok((at(0.50), at(0.99)))
    }

    /// Resident memory of a passthrough stage process that has started and has nothing to do.
    async fn idle_rss(&self) -> anyhow::Result<f64> {
        let scenario = &scenarios()[1];
        let layout = self.pipeline(scenario, 128)?;
        admin::apply(self.js, &layout.nats).await?;
        let mut children = self.spawn(scenario, &layout)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = children
            .first()
            .and_then(|c| crate::procfs::memory_mib(c.id(), "VmRSS:"))
            .unwrap_or(0.0);
        stop(&mut children);
        admin::delete(self.js, &layout.nats).await?;
        Ok(rss)
    }
}

struct Throughput {
    per_second: f64,
    counted: u64,
    unit_cpu: f64,
    handler_cpu: f64,
    server_cpu: f64,
}

struct Run {
    throughput: Throughput,
    latency: Option<(f64, f64)>,
    peak_rss: f64,
}

/// What in-process steps cost, measured by running chains of them in this process.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StepCosts {
    /// Per size: microseconds per message for one passthrough step, three, and one jq step.
    runs: Vec<StepRun>,
    /// Microseconds each step beyond the first adds, the largest over the sizes.
    per_step_micros: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StepRun {
    size: usize,
    one_step_micros: f64,
    three_steps_micros: f64,
    jq_micros: f64,
}

/// Microseconds per message for `steps`, run on one message after another as a unit runs them.
async fn time_chain(
    steps: &[switchyard_stage::steps::Step],
    body: &bytes::Bytes,
    lineage: &Lineage,
    rounds: u32,
) -> f64 {
    use switchyard_stage::payload::Payload;
    let started = Instant::now();
    for _ in 0..rounds {
        let chained =
            switchyard_stage::steps::run_chain(steps, Payload::Bytes(body.clone()), lineage).await;
        // Every output is serialized, as the unit does before publishing it.
        for output in chained.outputs {
            std::hint::black_box(output.into_bytes());
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// Times chains of in-process steps on one message after another, as a unit runs them.
async fn step_costs(sizes: &[usize]) -> anyhow::Result<StepCosts> {
    use switchyard_crds::unit::{RetryConfig, StepConfig};
    use switchyard_crds::StepKind;
    use switchyard_stage::steps::{LazyClient, Step};
    let http = LazyClient::default();
    let build = |kind: StepKind| {
        Step::build(
            &StepConfig {
                path: "bench".into(),
                kind,
                env: Vec::new(),
                timeout_ms: None,
                retry: RetryConfig::default(),
            },
            &http,
        )
    };
    let one = vec![build(StepKind::Passthrough(Default::default()))?];
    let three = vec![
        build(StepKind::Passthrough(Default::default()))?,
        build(StepKind::Passthrough(Default::default()))?,
        build(StepKind::Passthrough(Default::default()))?,
    ];
    let jq = vec![build(StepKind::Jq(". + {ok: true}".into()))?];
    let lineage = Lineage::at_source("feed", "1".into(), "feed:1".into());
    const ROUNDS: u32 = 200_000;
    let mut runs = Vec::new();
    for &size in sizes {
        let body = bytes::Bytes::from(payload(size, 0, 1));
        let one_step_micros = time_chain(&one, &body, &lineage, ROUNDS).await;
        let three_steps_micros = time_chain(&three, &body, &lineage, ROUNDS).await;
        let jq_micros = time_chain(&jq, &body, &lineage, ROUNDS).await;
        runs.push(StepRun {
            size,
            one_step_micros,
            three_steps_micros,
            jq_micros,
        });
    }
    let per_step_micros = runs
        .iter()
        .map(|r| ((r.three_steps_micros - r.one_step_micros) / 2.0).max(0.0))
        .fold(0.0, f64::max);
    Ok(StepCosts {
        runs,
        per_step_micros,
    })
}

fn stop(children: &mut [Child]) {
    for child in children.iter() {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    for child in children.iter_mut() {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_size_asked_for_and_stay_json() {
        for size in [128, 1024] {
            let p = payload(size, now_nanos(), 7);
            assert_eq!(p.len(), size);
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["i"], 7);
        }
    }
}
