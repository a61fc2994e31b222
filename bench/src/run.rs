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

use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use switchyard_crds::layout::{layout, Layout};
use switchyard_crds::validate::{analyze, parse_pipeline};
use switchyard_platform::admin;
use switchyard_platform::embedded::NatsServer;
use switchyard_stage::lineage::Lineage;

use switchyard_local::thousands;

use crate::args::{machine, BenchArgs, Books, Kind};
use crate::report::{render, row, step_cost, Report, ScenarioResult};
use crate::scenarios::{payload, scenarios, Scenario, BAD_LINE_HANDLER, ECHO_HANDLER};
use crate::step_costs::step_costs;

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
            let modes: &[bool] = if s.raw || !s.frames {
                &[false]
            } else {
                args.frames.modes()
            };
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

struct Bench<'a> {
    js: &'a jetstream::Context,
    server: &'a NatsServer,
    stage_bin: &'a Path,
    me: &'a Path,
    dir: &'a Path,
    args: &'a BenchArgs,
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
    /// The scenario's layout, with the books and frames this run measures.
    fn layout_for(&self, scenario: &Scenario, size: usize, frames: bool) -> anyhow::Result<Layout> {
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
        Ok(layout)
    }

    async fn run_once(
        &self,
        scenario: &Scenario,
        size: usize,
        with_latency: bool,
        frames: bool,
    ) -> anyhow::Result<Run> {
        let layout = self.layout_for(scenario, size, frames)?;
        let per_frame = layout
            .units
            .iter()
            .find(|u| u.unit == "feed")
            .map_or(1, |u| u.frame_items.max(1) as u64);
        admin::delete(self.js, &layout.nats).await?;
        admin::apply(self.js, &layout.nats).await?;
        let feed = output_subject(&layout, "feed")?;
        let last = scenario.units.last().copied().unwrap_or_default();
        let out_subject = output_subject(&layout, last)?;
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
        let latency = if with_latency && scenario.latency {
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

/// The subject the unit `unit` publishes to.
fn output_subject(layout: &Layout, unit: &str) -> anyhow::Result<String> {
    layout
        .units
        .iter()
        .find(|u| u.unit == unit)
        .and_then(|u| u.output_subject.clone())
        .with_context(|| format!("the unit {unit} has no output subject"))
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
