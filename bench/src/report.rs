//! The benchmark's report: each scenario's figures as a row, the notes, and the targets met or not.

use serde::Serialize;

use switchyard_local::thousands;

use crate::args::{BenchArgs, Kind};
use crate::step_costs::StepCosts;

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
pub struct Report {
    pub machine: String,
    pub nats_server: String,
    pub results: Vec<ScenarioResult>,
    /// None when `--only` left out the passthrough scenario it is measured after.
    pub idle_rss_mib: Option<f64>,
    /// CPU microseconds per message an in-process step adds, from the unit runs (noisy); None without
    /// both the passthrough and the group scenario.
    pub step_cost_micros: Option<f64>,
    /// Measured directly: a chain of steps run in this process, per message.
    pub steps: StepCosts,
}

/// CPU microseconds per message an in-process step adds: a unit of three steps against a unit of one,
/// per extra step, averaged over the sizes.
pub fn step_cost(results: &[ScenarioResult]) -> Option<f64> {
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

pub fn row(r: &ScenarioResult) -> String {
    format!(
        "{:>5} B  {:<28} {:>9} msg/s  {:>5.2} × raw  p50 {:>6} ms  p99 {:>6} ms  CPU {:>5.2} s + nats {:>5.2} s /100k  RSS {:>5.1} MiB",
        r.size,
        r.title,
        thousands(r.per_second.round() as u64),
        r.ratio_to_raw,
        ms(r.p50_ms),
        ms(r.p99_ms),
        r.cpu_seconds_per_100k,
        r.server_cpu_seconds_per_100k,
        r.peak_rss_mib
    )
}

pub fn render(report: &Report, args: &BenchArgs) -> String {
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
            "| {} B | {} | {} | {:.2} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r.size,
            r.title,
            thousands(r.per_second.round() as u64),
            r.ratio_to_raw,
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.p99_ms / f64::from(r.hops.max(1))),
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

/// Milliseconds to two places, or `-` when not measured.
fn ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "-".to_string()
    }
}

/// Joined items a second against the items a second through the same branches fanned in.
fn render_join(out: &mut String, report: &Report) {
    use std::fmt::Write as _;
    for join in report.results.iter().filter(|r| r.scenario == Kind::Join) {
        let fork = report
            .results
            .iter()
            .find(|r| r.scenario == Kind::Fork && r.size == join.size);
        if let Some(fork) = fork.filter(|f| f.per_second > 0.0) {
            let items = fork.per_second / 3.0;
            let _ = writeln!(
                out,
                "Fork and join, {} B: {} joined items/s against {} items/s through the same three branches fanned in without the join ({:.2} ×).",
                join.size,
                thousands(join.per_second.round() as u64),
                thousands(items.round() as u64),
                join.per_second / items
            );
        }
    }
}

/// The in-process step costs and the idle process's memory.
fn render_notes(out: &mut String, report: &Report) {
    use std::fmt::Write as _;
    let _ = writeln!(out);
    render_join(out, report);
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
