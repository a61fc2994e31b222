//! Spans over OTLP, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set: one span per
//! item and unit, continuing the item's incoming `traceparent`, and the outputs carry the new span's.
//!
//! Which items get spans: one whose `traceparent` says "sampled" always does (the caller decided); one
//! without a `traceparent` does when the Pipeline's `spec.tracing.sampleRate` picks it, the same items
//! the trace stream records. An item whose `traceparent` says "not sampled" keeps it unchanged and gets
//! no span: nothing is spent on it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;
use switchyard_crds::unit::{traced, TraceOutcome, UnitConfig};

use crate::lineage::Lineage;
use crate::trace::Done;

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const PROTOCOLS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// How long the last spans get to leave when the unit stops.
const FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// The unit's span exporter, shared by its tasks.
#[derive(Clone)]
pub struct Spans {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sample_rate: f64,
    unit: Arc<str>,
    pipeline: Arc<str>,
}

/// A span begun for an item, ended with what became of it.
pub struct ItemSpan(Span);

/// Where the OTLP environment asks spans to go, if anywhere.
pub fn configured(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    [TRACES_ENDPOINT, ENDPOINT]
        .into_iter()
        .find_map(|name| env(name).filter(|v| !v.trim().is_empty()))
}

/// Why a unit exports no spans although the environment asks for it.
#[derive(Debug, thiserror::Error)]
pub enum SpansError {
    #[error("{variable}={value} is not supported: Switchyard exports spans over http/protobuf only; unset it or set it to http/protobuf (spans are not exported)")]
    Protocol {
        variable: &'static str,
        value: String,
    },
    #[error("cannot build the OTLP exporter for {endpoint}: {reason} (spans are not exported)")]
    Exporter { endpoint: String, reason: String },
}

impl Spans {
    /// The exporter the environment asks for; None when no OTLP endpoint is set.
    pub fn from_env(
        config: &UnitConfig,
        replica: &str,
        client: reqwest::Client,
    ) -> Result<Option<Spans>, SpansError> {
        let env = |name: &str| std::env::var(name).ok();
        let Some(endpoint) = configured(env) else {
            return Ok(None);
        };
        for variable in PROTOCOLS {
            if let Some(value) = env(variable) {
                if value.trim() != "http/protobuf" {
                    return Err(SpansError::Protocol { variable, value });
                }
            }
        }
        let runtime = tokio::runtime::Handle::current();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(OnRuntime::new(client, runtime, endpoint.clone()))
            .build()
            .map_err(|e| SpansError::Exporter {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
        let service = env(SERVICE_NAME)
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| format!("{}.{}", config.pipeline, config.unit));
        let resource = Resource::builder_empty()
            .with_service_name(service)
            .with_attributes([
                KeyValue::new("service.namespace", config.namespace.clone()),
                KeyValue::new("service.instance.id", replica.to_string()),
                KeyValue::new("switchyard.pipeline", config.pipeline.clone()),
                KeyValue::new("switchyard.unit", config.unit.clone()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("switchyard-stage");
        tracing::info!("exporting spans over OTLP to {endpoint}");
        Ok(Some(Spans {
            provider,
            tracer,
            sample_rate: config.trace.as_ref().map_or(0.0, |t| t.sample_rate),
            unit: config.unit.as_str().into(),
            pipeline: config.pipeline.as_str().into(),
        }))
    }

    /// Begins the span of `lineage`'s item in this unit, if it gets one, and returns the lineage its
    /// outputs carry: the same, with this span as their parent.
    pub fn begin(
        &self,
        lineage: &Lineage,
        kind: SpanKind,
        started: SystemTime,
        also: &[&Lineage],
    ) -> Option<(Lineage, ItemSpan)> {
        let parent = parent_of(lineage);
        match &parent {
            Parent::Unsampled => return None,
            Parent::Root if !traced(self.sample_rate, &lineage.origin, &lineage.origin_seq) => {
                return None
            }
            _ => {}
        }
        let cx = match parent {
            Parent::Sampled(cx) => cx,
            _ => Context::new(),
        };
        let links = also
            .iter()
            .filter_map(|member| match parent_of(member) {
                Parent::Sampled(cx) => Some(Link::with_context(cx.span().span_context().clone())),
                _ => None,
            })
            .collect();
        let builder = SpanBuilder::from_name(self.unit.to_string())
            .with_kind(kind)
            .with_start_time(started)
            .with_links(links)
            .with_attributes([
                KeyValue::new("switchyard.pipeline", self.pipeline.to_string()),
                KeyValue::new("switchyard.unit", self.unit.to_string()),
                KeyValue::new("switchyard.origin", lineage.origin.clone()),
                KeyValue::new("switchyard.origin_seq", lineage.origin_seq.clone()),
                KeyValue::new("switchyard.message_id", lineage.id.clone()),
                KeyValue::new("messaging.system", "nats"),
            ]);
        let span = self.tracer.build_with_context(builder, &cx);
        let mut carried = lineage.clone();
        carried.traceparent = Some(traceparent(&span));
        Some((carried, ItemSpan(span)))
    }

    /// Sends what is still queued; the unit is stopping.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_WITHIN));
        match flushed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("the last spans may not have reached the OTLP endpoint: {e}")
            }
            Err(e) => tracing::warn!("cannot flush the spans: {e}"),
        }
    }
}

impl ItemSpan {
    /// Ends the span with what became of the item.
    pub fn end(mut self, done: &Done) {
        let span = &mut self.0;
        span.set_attribute(KeyValue::new(
            "switchyard.outcome",
            outcome_name(done.outcome),
        ));
        span.set_attribute(KeyValue::new("switchyard.outputs", done.outputs as i64));
        span.set_attribute(KeyValue::new(
            "switchyard.deliveries",
            done.deliveries as i64,
        ));
        span.set_attribute(KeyValue::new(
            "switchyard.attempts",
            i64::from(done.attempts),
        ));
        if let Some(stage) = &done.stage {
            span.set_attribute(KeyValue::new("switchyard.failed_stage", stage.clone()));
        }
        if let Some(error) = &done.error {
            span.set_status(Status::error(error.clone()));
        }
        span.end();
    }
}

fn outcome_name(outcome: TraceOutcome) -> &'static str {
    match outcome {
        TraceOutcome::Emitted => "emitted",
        TraceOutcome::Published => "published",
        TraceOutcome::Written => "written",
        TraceOutcome::Duplicate => "duplicate",
        TraceOutcome::DeadLettered => "dead-lettered",
        TraceOutcome::Waiting => "waiting",
        TraceOutcome::Joined => "joined",
        TraceOutcome::Late => "late",
    }
}

/// What an item's incoming `traceparent` says.
enum Parent {
    /// None (or one that does not parse): the item's trace starts here, if it is sampled.
    Root,
    Sampled(Context),
    Unsampled,
}

fn parent_of(lineage: &Lineage) -> Parent {
    let Some(header) = &lineage.traceparent else {
        return Parent::Root;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), header.clone());
    if let Some(state) = &lineage.tracestate {
        carrier.insert("tracestate".to_string(), state.clone());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let remote = cx.span().span_context().clone();
    if !remote.is_valid() {
        Parent::Root
    } else if remote.is_sampled() {
        Parent::Sampled(cx)
    } else {
        Parent::Unsampled
    }
}

/// The W3C `traceparent` of a span: what its children continue.
fn traceparent(span: &Span) -> String {
    let context = span.span_context();
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags()
    )
}

/// The HTTP client of the exporter. The SDK exports from a thread of its own, outside any Tokio
/// runtime, and reqwest needs one: each request is run on the unit's runtime and awaited from there.
/// A failing endpoint is logged at the first failure and then at most once a minute, never per batch.
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    endpoint: String,
    last_warning_s: AtomicU64,
}

impl OnRuntime {
    fn new(client: reqwest::Client, runtime: tokio::runtime::Handle, endpoint: String) -> Self {
        OnRuntime {
            client,
            runtime,
            endpoint,
            last_warning_s: AtomicU64::new(0),
        }
    }

    fn warn(&self, error: &dyn fmt::Display) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning_s.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 60)
            && self
                .last_warning_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "cannot export spans to {}: {error} (spans are dropped while this lasts)",
                self.endpoint
            );
        }
    }
}

impl fmt::Debug for OnRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnRuntime")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?.error_for_status()?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut answer = opentelemetry_http::Response::builder()
                .status(status)
                .body(body)?;
            *answer.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(answer)
        });
        let answer = match sent.await {
            Ok(answer) => answer,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = &answer {
            self.warn(e);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lineage(traceparent: Option<&str>) -> Lineage {
        let mut l = Lineage::at_source("src", "7".into(), "src:7".into());
        l.traceparent = traceparent.map(str::to_string);
        l
    }

    #[test]
    fn an_endpoint_is_taken_from_the_traces_variable_first() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(configured(env(&[])), None);
        assert_eq!(configured(env(&[(ENDPOINT, " ")])), None);
        assert_eq!(
            configured(env(&[(ENDPOINT, "http://a:4318")])).as_deref(),
            Some("http://a:4318")
        );
        assert_eq!(
            configured(env(&[
                (ENDPOINT, "http://a:4318"),
                (TRACES_ENDPOINT, "http://b:4318/v1/traces")
            ]))
            .as_deref(),
            Some("http://b:4318/v1/traces")
        );
    }

    #[test]
    fn a_traceparent_is_followed_by_its_sampled_flag() {
        assert!(matches!(parent_of(&lineage(None)), Parent::Root));
        assert!(matches!(parent_of(&lineage(Some("garbage"))), Parent::Root));
        assert!(matches!(
            parent_of(&lineage(Some(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ))),
            Parent::Sampled(_)
        ));
        assert!(matches!(
            parent_of(&lineage(Some(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            ))),
            Parent::Unsampled
        ));
    }
}
