//! The http source: the body of every POST to `path` on `port` becomes a message, stored before the
//! request is answered. Bodies are bounded (413 above `maxBodyBytes`), and with `bearerToken` a
//! request without the token is answered 401 and stores nothing.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::Subject;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use switchyard_crds::unit::headers;
use switchyard_crds::{HttpSource as Settings, DEFAULT_MAX_BODY_BYTES};

use super::error::SourceError;
use super::publish::{publish, record_emitted};
use super::unit::{lineage, Source, SourceUnit};
use crate::stats::Stats;

pub struct HttpSource<'a>(pub &'a Settings);

struct Ingest {
    books: Option<Arc<crate::books::Ledger>>,
    name: String,
    js: jetstream::Context,
    subject: Subject,
    stats: Arc<Stats>,
    /// `Bearer <token>`, as a request must send it.
    authorization: Option<String>,
    tracer: Option<crate::trace::Tracer>,
    spans: Option<crate::otlp::Spans>,
}

/// What a person does about a token that is not there.
const TOKEN_HINT: &str = "in a cluster give http.bearerToken.secretKeyRef; locally export the variable before `switchyard run`";

/// The `Authorization` value a request must carry, if the source asks for one.
fn authorization(settings: &Settings) -> Result<Option<String>, SourceError> {
    let Some(token) = &settings.bearer_token else {
        return Ok(None);
    };
    match std::env::var(&token.env) {
        Ok(value) if !value.trim().is_empty() => Ok(Some(format!("Bearer {}", value.trim()))),
        _ => Err(SourceError::MissingToken {
            var: token.env.clone(),
            hint: TOKEN_HINT,
        }),
    }
}

/// Compares in time that depends on the lengths only, so that the answer's timing does not tell how
/// much of a guessed token was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

impl Source for HttpSource<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        use axum::routing::{get, post};
        let port = self.0.port;
        let path = self.0.path.as_deref().unwrap_or("/");
        let max_body = (self.0.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES) as usize)
            .min(unit.client.server_info().max_payload);
        let state = Arc::new(Ingest {
            books: unit.books.clone(),
            name: unit.name.clone(),
            js: unit.js.clone(),
            subject: unit.subject.clone(),
            stats: unit.stats.clone(),
            authorization: authorization(self.0)?,
            tracer: unit.tracer.clone(),
            spans: unit.spans.clone(),
        });
        let app = axum::Router::new()
            .route(path, post(ingest))
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::extract::DefaultBodyLimit::max(max_body))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(|source| SourceError::Listen { port, source })?;
        tracing::info!(
            port,
            path,
            max_body,
            bearer_token = self.0.bearer_token.is_some(),
            "accepting POST requests"
        );
        let mut shutdown = unit.shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                crate::shutdown::stopped(&mut shutdown).await;
            })
            .await
            .map_err(SourceError::Serve)
    }
}

async fn ingest(
    axum::extract::State(state): axum::extract::State<Arc<Ingest>>,
    request_headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if let Some(expected) = &state.authorization {
        let given = request_headers
            .get(axum::http::header::AUTHORIZATION)
            .map_or(&[][..], |v| v.as_bytes());
        if !same_secret(given, expected.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "send Authorization: Bearer <token>"}).to_string(),
            );
        }
    }
    let header = |name: &str| {
        request_headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // A client that sends an idempotency key may retry safely: the same key is stored once.
    let key = header("Idempotency-Key")
        .or_else(|| header(headers::MSG_ID))
        .unwrap_or_else(|| nuid::next().as_str().to_string());
    let mut lineage = lineage(&state.name, key);
    lineage.traceparent = header(headers::TRACEPARENT);
    lineage.tracestate = header(headers::TRACESTATE);
    let carried = record_emitted(state.tracer.as_ref(), state.spans.as_ref(), &mut lineage).await;
    let stored = async {
        publish(
            &state.js,
            &state.subject,
            carried.as_ref().unwrap_or(&lineage),
            body,
            state.books.as_ref(),
        )
        .await?
        .await
    };
    match stored.await {
        Ok(ack) => {
            Stats::add(&state.stats.processed, 1);
            (
                StatusCode::ACCEPTED,
                serde_json::json!({"id": lineage.id, "duplicate": ack.duplicate}).to_string(),
            )
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": format!("the message was not stored: {e}; try again")})
                .to_string(),
        ),
    }
}
