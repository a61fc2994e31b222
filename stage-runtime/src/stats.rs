//! Counters a stage process keeps, and the report it publishes about once a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_crds::unit::StatsReport;

#[derive(Default, Debug)]
pub struct Stats {
    pub processed: AtomicU64,
    pub published: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    pub in_flight: AtomicU64,
    pub finished: AtomicBool,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn report(&self, unit: &str, replica: &str) -> StatsReport {
        StatsReport {
            unit: unit.to_string(),
            replica: replica.to_string(),
            processed: self.processed.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }
}

pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Publishes the counters on `subject` until the task is dropped.
pub fn spawn_reporter(
    client: async_nats::Client,
    subject: String,
    unit: String,
    replica: String,
    stats: Arc<Stats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            publish(&client, &subject, &stats.report(&unit, &replica)).await;
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
