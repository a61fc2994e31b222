//! Spans over OTLP: `switchyard-stage` processes with `OTEL_EXPORTER_OTLP_ENDPOINT` set export one span
//! per item and unit to a collector (here a small HTTP receiver that decodes what it gets), continuing
//! an incoming `traceparent`; the data path does not depend on the collector being there.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, harness};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;

const LIMIT: Duration = Duration::from_secs(30);
const INCOMING_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const INCOMING_SPAN: &str = "b7ad6b7169203331";
const UNSAMPLED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// One span as the collector got it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

type Collected = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text_of(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => s.clone(),
                any_value::Value::IntValue(i) => i.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

/// An OTLP/HTTP receiver on a free port: decodes each `ExportTraceServiceRequest` it is sent.
async fn collector() -> (String, Collected) {
    let collected: Collected = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(
                |axum::extract::State(collected): axum::extract::State<Collected>,
                 body: axum::body::Bytes| async move {
                    let request = ExportTraceServiceRequest::decode(body)
                        .expect("an ExportTraceServiceRequest in protobuf");
                    let mut collected = collected.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .map(|r| text_of(&r.attributes))
                            .and_then(|a| a.get("service.name").cloned())
                            .unwrap_or_default();
                        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                            collected.push(Received {
                                service: service.clone(),
                                name: span.name,
                                trace: hex(&span.trace_id),
                                span: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                                attributes: text_of(&span.attributes),
                            });
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                },
            ),
        )
        .with_state(collected.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, collected)
}

fn pipeline(port: u16) -> String {
    format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: spans}}
spec:
  tracing: {{sampleRate: 1.0}}
  sources:
    - {{name: web, http: {{port: {port}, path: /ingest}}}}
    - {{name: gen, generator: {{count: 3}}}}
  stages:
    - {{name: a, passthrough: {{}}}}
    - {{name: b, jq: '.'}}
  sinks: [{{name: bus, nats: {{subject: spans.out}}}}]
"#
    )
}

async fn post(url: &str, traceparent: &str, body: &str) {
    let client = switchyard_stage::steps::http_client().unwrap();
    for attempt in 0.. {
        match client
            .post(url)
            .header("traceparent", traceparent)
            .body(body.to_string())
            .send()
            .await
        {
            Ok(r) => {
                assert_eq!(r.status(), 202);
                return;
            }
            Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_export_a_span_each_continuing_the_incoming_traceparent() {
    let (endpoint, collected) = collector().await;
    let port = free_port();
    let mut h = harness(&pipeline(port)).await;
    let mut out = h.client.subscribe("spans.out").await.unwrap();
    h.client.flush().await.unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    for unit in ["web", "gen", "a", "b", "bus"] {
        h.spawn_with_env(unit, "0", &env);
    }
    let url = format!("http://127.0.0.1:{port}/ingest");
    post(
        &url,
        &format!("00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"),
        r#"{"sampled": true}"#,
    )
    .await;
    post(
        &url,
        &format!("00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00"),
        r#"{"sampled": false}"#,
    )
    .await;

    // Five items at the sink; what each one's traceparent says there.
    let mut arrived = BTreeMap::new();
    for _ in 0..5 {
        let m = tokio::time::timeout(LIMIT, out.next())
            .await
            .expect("five items at the sink")
            .unwrap();
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        let item = format!(
            "{}:{}",
            header("Switchyard-Origin"),
            header("Switchyard-Origin-Seq")
        );
        arrived.insert(item, header("traceparent"));
    }
    assert_eq!(arrived.len(), 5, "{arrived:?}");

    // Four sampled items, four units each: sixteen spans.
    let started = Instant::now();
    let spans = loop {
        let spans = collected.lock().unwrap().clone();
        if spans.len() >= 16 || started.elapsed() > LIMIT {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    h.stop().await;
    assert_eq!(spans.len(), 16, "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.trace != UNSAMPLED_TRACE),
        "an item whose traceparent says 'not sampled' got spans: {spans:#?}"
    );
    let unsampled = arrived
        .iter()
        .find(|(_, t)| t.contains(UNSAMPLED_TRACE))
        .map(|(_, t)| t.clone());
    assert_eq!(
        unsampled.as_deref(),
        Some(format!("00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00").as_str()),
        "the unsampled traceparent reaches the sink unchanged"
    );

    let mut by_trace: BTreeMap<String, Vec<Received>> = BTreeMap::new();
    for span in &spans {
        by_trace
            .entry(span.trace.clone())
            .or_default()
            .push(span.clone());
    }
    assert_eq!(
        by_trace.len(),
        4,
        "one trace per sampled item: {by_trace:#?}"
    );
    for (trace, spans) in &by_trace {
        let find = |unit: &str| {
            spans
                .iter()
                .find(|s| s.name == unit)
                .unwrap_or_else(|| panic!("no span of {unit} in trace {trace}: {spans:#?}"))
        };
        let source = if trace == INCOMING_TRACE {
            "web"
        } else {
            "gen"
        };
        let (made, a, b, bus) = (find(source), find("a"), find("b"), find("bus"));
        // The source continues the caller's span, or starts the trace.
        let expected_root = if trace == INCOMING_TRACE {
            INCOMING_SPAN.to_string()
        } else {
            String::new()
        };
        assert_eq!(made.parent, expected_root, "{made:?}");
        assert_eq!(a.parent, made.span, "a continues {source}: {spans:#?}");
        assert_eq!(b.parent, a.span, "b continues a: {spans:#?}");
        assert_eq!(bus.parent, b.span, "bus continues b: {spans:#?}");
        assert_eq!(bus.service, "spans.bus");
        assert_eq!(bus.attributes["switchyard.outcome"], "written");
        assert_eq!(b.attributes["switchyard.outcome"], "published");
        assert_eq!(made.attributes["switchyard.origin"], source);
        let item = format!("{source}:{}", made.attributes["switchyard.origin_seq"]);
        // What the sink got carries the sink's span.
        assert_eq!(
            arrived.get(&item),
            Some(&format!("00-{trace}-{}-01", bus.span)),
            "{item}: {arrived:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_not_there_costs_spans_not_data() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut h = harness(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: nocollector}
spec:
  tracing: {sampleRate: 1.0}
  sources: [{name: gen, generator: {count: 200}}]
  stages: [{name: a, passthrough: {}}]
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    )
    .await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", closed.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    for unit in ["gen", "a", "out"] {
        h.spawn_with_env(unit, "0", &env);
    }
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 200, LIMIT).await;
    assert_eq!(lines.len(), 200);
    let started = Instant::now();
    while !h.log_of("a", "0").contains("cannot export spans to") && started.elapsed() < LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
    let log = h.log_of("a", "0");
    assert_eq!(
        log.matches("cannot export spans to").count(),
        1,
        "one warning, not one per batch: {log}"
    );
}
