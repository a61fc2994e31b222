//! The operator's Prometheus metrics, and its HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `switchyard_reconciles_total` | counter | `result` (ok, invalid, error) | reconciles finished |
//! | `switchyard_reconcile_errors_total` | counter | `reason` (see `controller::errors::Error::metric_label`) | reconciles that failed |
//! | `switchyard_reconcile_duration_seconds` | histogram | | time per reconcile |
//! | `switchyard_unit_lag` | gauge | `namespace`, `pipeline`, `unit` | pending plus unacknowledged messages |
//! | `switchyard_unit_dead_lettered` | gauge | `namespace`, `pipeline`, `unit` | messages in the unit's dead-letter subject |
//! | `switchyard_unit_ready_replicas` | gauge | `namespace`, `pipeline`, `unit` | ready pods of the unit |
//! | `switchyard_applies_total` | counter | `kind` (ConfigMap, Deployment) | objects sent to the API server (unchanged ones are not) |
//! | `switchyard_status_writes_total` | counter | | Pipeline status writes |
//!
//! A Pipeline's unit series go when the Pipeline does, and a unit's when it leaves the spec.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::controller::status::UnitObservation;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnitLabels {
    pub namespace: String,
    pub pipeline: String,
    pub unit: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub errors: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub unit_lag: Family<UnitLabels, Gauge>,
    pub unit_dead_lettered: Family<UnitLabels, Gauge>,
    pub unit_ready_replicas: Family<UnitLabels, Gauge>,
    pub applies: Family<KindLabel, Counter>,
    pub status_writes: Counter,
    /// The units each Pipeline has series for, so that they can be removed with it.
    units: std::sync::Mutex<HashMap<(String, String), BTreeSet<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let errors = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let unit_lag = Family::<UnitLabels, Gauge>::default();
        let unit_dead_lettered = Family::<UnitLabels, Gauge>::default();
        let unit_ready_replicas = Family::<UnitLabels, Gauge>::default();
        let applies = Family::<KindLabel, Counter>::default();
        let status_writes = Counter::default();
        registry.register(
            "applies",
            "Objects sent to the API server, by kind",
            applies.clone(),
        );
        registry.register(
            "status_writes",
            "Pipeline status writes",
            status_writes.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles finished, by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            duration.clone(),
        );
        registry.register(
            "unit_lag",
            "Pending plus unacknowledged messages of a unit",
            unit_lag.clone(),
        );
        registry.register(
            "unit_dead_lettered",
            "Messages in a unit's dead-letter subject",
            unit_dead_lettered.clone(),
        );
        registry.register(
            "unit_ready_replicas",
            "Ready pods of a unit",
            unit_ready_replicas.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            unit_lag,
            unit_dead_lettered,
            unit_ready_replicas,
            applies,
            status_writes,
            units: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    pub fn count(&self, result: &str) {
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn applied(&self, kind: &str) {
        self.applies
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    /// Sets the unit gauges of a Pipeline, and removes those of units it no longer has.
    pub fn record_units(&self, namespace: &str, pipeline: &str, units: &[UnitObservation]) {
        let labels = |unit: &str| UnitLabels {
            namespace: namespace.to_string(),
            pipeline: pipeline.to_string(),
            unit: unit.to_string(),
        };
        for u in units {
            let l = labels(&u.name);
            if let Some(lag) = u.lag {
                self.unit_lag
                    .get_or_create(&l)
                    .set(lag.min(i64::MAX as u64) as i64);
            }
            self.unit_dead_lettered
                .get_or_create(&l)
                .set(u.dead_lettered.min(i64::MAX as u64) as i64);
            self.unit_ready_replicas
                .get_or_create(&l)
                .set(i64::from(u.ready));
        }
        let now: BTreeSet<String> = units.iter().map(|u| u.name.clone()).collect();
        let before = self
            .units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.to_string(), pipeline.to_string()), now.clone())
            .unwrap_or_default();
        for gone in before.difference(&now) {
            self.remove_unit(&labels(gone));
        }
    }

    /// Removes every series of a Pipeline that is gone.
    pub fn forget_pipeline(&self, namespace: &str, pipeline: &str) {
        let units = self
            .units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_string(), pipeline.to_string()))
            .unwrap_or_default();
        for unit in units {
            self.remove_unit(&UnitLabels {
                namespace: namespace.to_string(),
                pipeline: pipeline.to_string(),
                unit,
            });
        }
    }

    fn remove_unit(&self, labels: &UnitLabels) {
        self.unit_lag.remove(labels);
        self.unit_dead_lettered.remove(labels);
        self.unit_ready_replicas.remove(labels);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process is alive) and `/readyz` (it is reconciling, or standing by
/// as a follower) until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let render = move || metrics.render();
    let ready = move || *ready.borrow();
    switchyard_platform::probes::serve(addr, render, ready, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_their_documented_names() {
        let m = Metrics::default();
        m.count("ok");
        m.error("nats");
        m.duration.observe(0.02);
        m.unit_lag
            .get_or_create(&UnitLabels {
                namespace: "default".into(),
                pipeline: "laundry".into(),
                unit: "machines".into(),
            })
            .set(42);
        let text = m.render();
        for name in [
            "switchyard_reconciles_total{result=\"ok\"} 1",
            "switchyard_reconcile_errors_total{reason=\"nats\"} 1",
            "switchyard_reconcile_duration_seconds_count 1",
            "switchyard_unit_lag{namespace=\"default\",pipeline=\"laundry\",unit=\"machines\"} 42",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn a_pipelines_series_go_with_it() {
        let m = Metrics::default();
        let unit = |name: &str| UnitObservation {
            name: name.into(),
            lag: Some(5),
            ..UnitObservation::default()
        };
        m.record_units("default", "laundry", &[unit("a"), unit("b")]);
        assert!(m.render().contains("unit=\"b\""));
        m.record_units("default", "laundry", &[unit("a")]);
        assert!(!m.render().contains("unit=\"b\""));
        assert!(m.render().contains("unit=\"a\""));
        m.forget_pipeline("default", "laundry");
        assert!(!m.render().contains("laundry"), "{}", m.render());
    }
}
