//! Counters a stage process keeps; the report it pushes on its stats subject every second (what the
//! autoscaler and `switchyard run` read); and the same figures as Prometheus metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use switchyard_crds::unit::StatsReport;

#[derive(Default, Debug)]
pub struct Stats {
    /// Items finished (a frame's each count; sources: items stored).
    pub processed: AtomicU64,
    /// Stored messages finished, frames or single items: with `processed`, the items a message
    /// holds on average, which turns the consumer's pending messages into items.
    pub messages: AtomicU64,
    pub published: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub in_flight: AtomicU64,
    pub finished: AtomicBool,
    /// Set once the unit is working: connected, its consumer open or its source running.
    pub ready: AtomicBool,
    /// A postgres source's table, as it last counted it.
    pub rows: Mutex<Option<switchyard_crds::RowCounts>>,
    /// A join replica's items waiting (`crate::join`), counted as they change.
    pub join: Mutex<Option<switchyard_crds::unit::JoinReport>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters; the interval figures (lag, rate, utilization) are the reporter's to fill in.
    pub fn report(&self, unit: &str, replica: &str) -> StatsReport {
        StatsReport {
            unit: unit.to_string(),
            replica: replica.to_string(),
            processed: self.processed.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
            rows: self.rows.lock().ok().and_then(|rows| *rows),
            join: self.join.lock().ok().and_then(|join| *join),
            ..StatsReport::default()
        }
    }
}

/// In-flight counts are sampled this often to average the utilization over an interval.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What the reporter needs to know about its unit.
#[derive(Clone)]
pub struct ReportContext {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subject: String,
    pub unit: String,
    pub replica: String,
    pub stream: String,
    /// The unit's consumer, for its lag (absent for sources).
    pub consumer: Option<String>,
    /// Inputs in flight at once, for the utilization (0 for sources).
    pub concurrency: u32,
}

/// The latest report, as the metrics endpoint shows it.
pub type Latest = Arc<Mutex<StatsReport>>;

/// Publishes a report every second until the task is dropped; keeps the latest in `latest`.
pub fn spawn_reporter(
    ctx: ReportContext,
    stats: Arc<Stats>,
    latest: Latest,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sample = tokio::time::interval(SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since = Instant::now();
        let mut processed_before = stats.processed.load(Ordering::Relaxed);
        let (mut busy_sum, mut samples) = (0u64, 0u64);
        loop {
            sample.tick().await;
            busy_sum += stats.in_flight.load(Ordering::Relaxed);
            samples += 1;
            if since.elapsed() < switchyard_crds::unit::REPORT_EVERY {
                continue;
            }
            let elapsed = since.elapsed().as_secs_f64();
            since = Instant::now();
            let mut report = stats.report(&ctx.unit, &ctx.replica);
            report.rate = report.processed.saturating_sub(processed_before) as f64 / elapsed;
            processed_before = report.processed;
            report.concurrency = ctx.concurrency;
            if ctx.concurrency > 0 && samples > 0 {
                report.utilization =
                    (busy_sum as f64 / samples as f64 / f64::from(ctx.concurrency)).min(1.0);
            }
            (busy_sum, samples) = (0, 0);
            report.lag = match &ctx.consumer {
                Some(consumer) => {
                    switchyard_platform::nats::read_lag(&ctx.js, &ctx.stream, consumer)
                        .await
                        .map(|pending| switchyard_crds::unit::items_pending(pending, [&report]))
                }
                None => None,
            };
            if let Ok(mut l) = latest.lock() {
                *l = report.clone();
            }
            publish(&ctx.client, &ctx.subject, &report).await;
        }
    })
}

/// One report, now (also the last one, before the process exits).
pub async fn publish(client: &async_nats::Client, subject: &str, report: &StatsReport) {
    match serde_json::to_vec(report) {
        Ok(body) => {
            if let Err(e) = client.publish(subject.to_string(), body.into()).await {
                tracing::debug!("cannot publish stats: {e}");
            }
        }
        Err(e) => tracing::debug!("cannot encode stats: {e}"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitLabels {
    pipeline: String,
    unit: String,
}

/// The stage's Prometheus metrics, rendered from the latest report:
///
/// | metric | type | meaning |
/// |---|---|---|
/// | `switchyard_stage_processed_total` | counter | inputs finished (sources: messages stored) |
/// | `switchyard_stage_published_total` | counter | outputs stored (sinks: messages written) |
/// | `switchyard_stage_dead_lettered_total` | counter | messages sent to the dead-letter subject |
/// | `switchyard_stage_in_flight` | gauge | inputs being worked on |
/// | `switchyard_stage_lag` | gauge | items in the pending and unacknowledged messages of the unit's consumer |
/// | `switchyard_stage_rate` | gauge | inputs finished per second, last interval |
/// | `switchyard_stage_utilization` | gauge | mean busy share of the concurrency, last interval |
pub fn render_metrics(pipeline: &str, latest: &StatsReport) -> String {
    let mut registry = Registry::with_prefix("switchyard_stage");
    let labels = UnitLabels {
        pipeline: pipeline.to_string(),
        unit: latest.unit.clone(),
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let family = Family::<UnitLabels, Counter>::default();
        family.get_or_create(&labels).inc_by(value);
        registry.register(name, help, family);
    };
    counter(
        &mut registry,
        "processed",
        "Inputs finished (sources: messages stored)",
        latest.processed,
    );
    counter(
        &mut registry,
        "published",
        "Outputs stored (sinks: messages written)",
        latest.published,
    );
    counter(
        &mut registry,
        "dead_lettered",
        "Messages sent to the dead-letter subject",
        latest.dead_lettered,
    );
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let family = Family::<UnitLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        family.get_or_create(&labels).set(value);
        registry.register(name, help, family);
    };
    gauge(
        &mut registry,
        "in_flight",
        "Inputs being worked on",
        latest.in_flight as f64,
    );
    if let Some(lag) = latest.lag {
        gauge(
            &mut registry,
            "lag",
            "Pending plus unacknowledged messages of the unit's consumer",
            lag as f64,
        );
    }
    gauge(
        &mut registry,
        "rate",
        "Inputs finished per second over the last interval",
        latest.rate,
    );
    gauge(
        &mut registry,
        "utilization",
        "Mean busy share of the concurrency over the last interval",
        latest.utilization,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (working) until the task is dropped.
pub async fn serve(
    addr: std::net::SocketAddr,
    pipeline: String,
    latest: Latest,
    stats: Arc<Stats>,
) -> std::io::Result<()> {
    let metrics = move || {
        latest
            .lock()
            .map(|l| render_metrics(&pipeline, &l))
            .unwrap_or_default()
    };
    let ready = move || stats.ready.load(Ordering::Relaxed);
    switchyard_platform::probes::serve(addr, metrics, ready, std::future::pending()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_report() {
        let report = StatsReport {
            unit: "machines".into(),
            processed: 12,
            lag: Some(7),
            rate: 2.5,
            utilization: 0.25,
            ..StatsReport::default()
        };
        let text = render_metrics("laundry", &report);
        for needle in [
            "switchyard_stage_processed_total{pipeline=\"laundry\",unit=\"machines\"} 12",
            "switchyard_stage_lag{pipeline=\"laundry\",unit=\"machines\"} 7",
            "switchyard_stage_rate{pipeline=\"laundry\",unit=\"machines\"} 2.5",
            "switchyard_stage_utilization{pipeline=\"laundry\",unit=\"machines\"} 0.25",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
