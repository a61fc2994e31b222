//! `/metrics`, `/healthz` and `/readyz`: what every Switchyard process serves, the operator included.

use std::future::Future;
use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::get;

/// Serves `/metrics` (whatever `metrics` renders, in the OpenMetrics text format), `/healthz` (the
/// process is alive) and `/readyz` (`ready` says so) on `addr` until `shutdown` resolves.
pub async fn serve<M, R>(
    addr: SocketAddr,
    metrics: M,
    ready: R,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    M: Fn() -> String + Clone + Send + Sync + 'static,
    R: Fn() -> bool + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready();
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
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
