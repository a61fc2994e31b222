//! The latest report of every replica of every unit, as stage processes push them on their stats
//! subjects: what `switchyard run` shows, and what both autoscalers read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_crds::unit::StatsReport;

/// A replica that has not reported for this long is gone (it stopped or died).
pub const STALE: Duration = Duration::from_secs(3);

/// A unit's replicas, each with its latest report and when it arrived.
type Replicas = HashMap<String, (Instant, StatsReport)>;

/// The reports could not be subscribed to.
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to unit reports on {subject}: {source}")]
pub struct ListenError {
    subject: String,
    source: async_nats::SubscribeError,
}

/// Reports by key (a unit), then by replica.
#[derive(Clone, Default)]
pub struct Reports {
    inner: Arc<Mutex<HashMap<String, Replicas>>>,
}

impl Reports {
    /// Records every report published on `subject` (a wildcard) under the key `key_of` gives it.
    pub async fn listen(
        &self,
        client: &async_nats::Client,
        subject: String,
        key_of: fn(&str, &StatsReport) -> Option<String>,
    ) -> Result<(), ListenError> {
        let mut subscription =
            client
                .subscribe(subject.clone())
                .await
                .map_err(|source| ListenError {
                    subject: subject.clone(),
                    source,
                })?;
        let reports = self.clone();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Ok(report) = serde_json::from_slice::<StatsReport>(&message.payload) else {
                    continue;
                };
                if let Some(key) = key_of(message.subject.as_str(), &report) {
                    reports.record(key, report);
                }
            }
        });
        Ok(())
    }

    pub fn record(&self, key: String, report: StatsReport) {
        self.lock()
            .entry(key)
            .or_default()
            .insert(report.replica.clone(), (Instant::now(), report));
    }

    /// The latest report of every replica the key has had, gone ones too: their counts still count.
    pub fn latest(&self, key: &str) -> Vec<StatsReport> {
        self.lock()
            .get(key)
            .map(|replicas| replicas.values().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// The latest reports of the replicas still alive.
    pub fn fresh(&self, key: &str) -> Vec<StatsReport> {
        self.lock().get(key).map(alive).unwrap_or_default()
    }

    /// The reports of the replicas still alive, when every one of them (at least one) was received
    /// after `since`.
    pub fn sent_since(&self, key: &str, since: Instant) -> Option<Vec<StatsReport>> {
        let all = self.lock();
        let replicas: Vec<&(Instant, StatsReport)> = all
            .get(key)?
            .values()
            .filter(|(at, _)| at.elapsed() < STALE)
            .collect();
        (!replicas.is_empty() && replicas.iter().all(|(at, _)| *at > since))
            .then(|| replicas.into_iter().map(|(_, r)| r.clone()).collect())
    }

    /// `fresh` for every key.
    pub fn fresh_all(&self) -> HashMap<String, Vec<StatsReport>> {
        self.lock()
            .iter()
            .map(|(key, replicas)| (key.clone(), alive(replicas)))
            .collect()
    }

    /// True once every replica in `replicas` has sent its last report (under any key).
    pub fn have_last_reports(&self, replicas: &[String]) -> bool {
        let all = self.lock();
        replicas.iter().all(|name| {
            all.values()
                .any(|by_replica| by_replica.get(name).is_some_and(|(_, r)| r.last))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Replicas>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn alive(replicas: &Replicas) -> Vec<StatsReport> {
    replicas
        .values()
        .filter(|(at, _)| at.elapsed() < STALE)
        .map(|(_, r)| r.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(unit: &str, replica: &str, processed: u64) -> StatsReport {
        StatsReport {
            unit: unit.into(),
            replica: replica.into(),
            processed,
            ..StatsReport::default()
        }
    }

    #[test]
    fn the_latest_report_of_each_replica_counts() {
        let reports = Reports::default();
        reports.record("a".into(), report("a", "r1", 1));
        reports.record("a".into(), report("a", "r1", 5));
        reports.record("a".into(), report("a", "r2", 3));
        let mut latest: Vec<u64> = reports.latest("a").iter().map(|r| r.processed).collect();
        latest.sort();
        assert_eq!(latest, vec![3, 5]);
        assert_eq!(reports.fresh("a").len(), 2);
        assert!(reports.fresh("b").is_empty());
        assert_eq!(reports.fresh_all()["a"].len(), 2);
    }
}
