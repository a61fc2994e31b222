//! The operator's Prometheus metrics, and its HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `switchyard_reconciles_total` | counter | `result` (ok, invalid, error) | reconciles finished |
//! | `switchyard_reconcile_errors_total` | counter | `reason` (kubernetes, nats, cleanup) | reconciles that failed |
//! | `switchyard_reconcile_duration_seconds` | histogram | | time per reconcile |
//! | `switchyard_unit_lag` | gauge | `namespace`, `pipeline`, `unit` | pending plus unacknowledged messages |
//! | `switchyard_unit_dead_lettered` | gauge | `namespace`, `pipeline`, `unit` | messages in the unit's dead-letter subject |
//! | `switchyard_unit_ready_replicas` | gauge | `namespace`, `pipeline`, `unit` | ready pods of the unit |

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
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
) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
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
}
