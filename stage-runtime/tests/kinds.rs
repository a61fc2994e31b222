//! Every step kind, source and sink, against a real nats-server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, handler, harness, json_lines, settled_reports};
use futures::StreamExt;

const LIMIT: Duration = Duration::from_secs(30);

/// A local HTTP server that answers POST / with the JSON body plus `{"viaHttp": true}` and remembers
/// every body it got.
async fn http_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Arc<Mutex<Vec<String>>>>,
                 body: String| async move {
                    seen.lock().unwrap().push(body.clone());
                    let mut value: serde_json::Value = serde_json::from_str(&body).unwrap();
                    value["viaHttp"] = true.into();
                    value.to_string()
                },
            ),
        )
        .with_state(seen.clone());
    (format!("{}/", serve(app).await), seen)
}

/// Serves `app` on a free loopback port; returns its base URL, without a trailing slash.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_kind_runs_in_one_group() {
    let (url, _) = http_server().await;
    let yaml = format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: kinds}}
spec:
  sources: [{{name: src, generator: {{count: 50, payload: '{{"n": {{{{seq}}}}}}'}}}}]
  stages:
    - name: all
      stages:
        - {{name: double, jq: '. + {{doubled: (.n * 2)}}'}}
        - {{name: tag, exec: {{command: ["python3", "{{dir}}/tag.py"]}}}}
        - {{name: web, http: {{url: "{url}"}}}}
        - {{name: pause, sleep: 1ms}}
        - {{name: keep, passthrough: {{}}}}
  sinks: [{{name: out, file: {{path: "{{dir}}/out.jsonl"}}}}]
"#
    );
    let mut h = harness(&yaml).await;
    handler(
        &h,
        "tag.py",
        "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    print(json.dumps({'id': m['id'], 'outputs': [dict(m['data'], tagged=m['headers']['Switchyard-Origin'])]}), flush=True)\n",
    );
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 50, LIMIT).await;
    let mut values = json_lines(&lines);
    values.sort_by_key(|v| v["n"].as_u64());
    for (i, v) in values.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(v["n"], n);
        assert_eq!(v["doubled"], n * 2);
        assert_eq!(v["tagged"], "src");
        assert_eq!(v["viaHttp"], true);
    }
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    assert_eq!(lines.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_reads_every_line_of_every_file_in_a_folder() {
    let yaml = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: files}
spec:
  sources: [{name: src, file: {path: "{dir}/in"}}]
  stages: [{name: copy, passthrough: {}}]
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#;
    let mut h = harness(yaml).await;
    std::fs::create_dir(h.path("in")).unwrap();
    std::fs::write(
        h.path("in/a.jsonl"),
        "{\"f\":\"a\",\"l\":1}\n\n{\"f\":\"a\",\"l\":3}\r\n",
    )
    .unwrap();
    std::fs::write(
        h.path("in/b.jsonl"),
        "{\"f\":\"b\",\"l\":1}\n{\"f\":\"b\",\"l\":2}",
    )
    .unwrap();
    std::fs::write(h.path("in/.hidden"), "{\"f\":\"hidden\"}\n").unwrap();
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 4, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let mut got: Vec<String> = json_lines(&lines)
        .iter()
        .map(|v| format!("{}{}", v["f"].as_str().unwrap(), v["l"]))
        .collect();
    got.sort();
    assert_eq!(got, vec!["a1", "a3", "b1", "b2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_resumes_from_its_checkpoint_without_duplicates() {
    let yaml = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: resume}
spec:
  sources: [{name: src, generator: {count: 400, ratePerSecond: 400}}]
  stages: [{name: copy, passthrough: {}}]
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#;
    let mut h = harness(yaml).await;
    h.start("copy");
    h.start("out");
    // Kill the generator's process partway; the restarted one continues from its checkpoint.
    let first = h.spawn("src", "first");
    // Partway: once it has recorded a checkpoint.
    let bucket = match h.config("src").role {
        switchyard_crds::unit::UnitRole::Source {
            checkpoint_bucket, ..
        } => checkpoint_bucket,
        other => panic!("not a source: {other:?}"),
    };
    let js = switchyard_platform::nats::jetstream_context(h.client.clone());
    let started = std::time::Instant::now();
    loop {
        let saved = match js.get_key_value(&bucket).await {
            Ok(kv) => kv.get("source.src").await.ok().flatten().is_some(),
            Err(_) => false,
        };
        if saved {
            break;
        }
        assert!(started.elapsed() < LIMIT, "no checkpoint within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    h.spawn("src", "second");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 400, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let log = h.log_of("src", "second");
    let published: u64 = log
        .split("published=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the second generator's log:\n{log}"));
    assert!(
        published < 400,
        "the second generator started over: {published} published"
    );
    let mut seqs: Vec<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_and_cron_sources_tick() {
    let yaml = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: ticks}
spec:
  sources:
    - {name: timer, timer: {interval: 100ms, payload: '{"tick": {{seq}}}'}}
    - {name: cron, cron: {schedule: '* * * * * *'}}
  stages: [{name: copy, passthrough: {}}]
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#;
    let mut h = harness(yaml).await;
    let started = std::time::Instant::now();
    h.start_all();
    let read = |h: &common::Harness| {
        let text = std::fs::read_to_string(h.path("out.jsonl")).unwrap_or_default();
        json_lines(&text.lines().map(str::to_string).collect::<Vec<_>>())
    };
    let ticks_and_cron = |values: &[serde_json::Value]| {
        let ticks: Vec<u64> = values.iter().filter_map(|v| v["tick"].as_u64()).collect();
        let cron = values.iter().filter(|v| v.get("seq").is_some()).count();
        (ticks, cron)
    };
    loop {
        let (ticks, cron) = ticks_and_cron(&read(&h));
        if ticks.len() >= 15 && cron >= 1 {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{} ticks, {cron} cron firings",
            ticks.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
    let elapsed = started.elapsed().as_secs();
    let (ticks, cron) = ticks_and_cron(&read(&h));
    assert!(ticks.len() >= 15, "timer ticks: {ticks:?}");
    let mut sorted = ticks.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ticks.len(), "a tick came twice: {ticks:?}");
    // A cron firing each second: never more often than the seconds that passed.
    assert!(
        (1..=elapsed as usize + 1).contains(&cron),
        "cron fired {cron} times in {elapsed}s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_nats_sources_store_before_they_answer() {
    let port = free_port();
    let yaml = format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: ingest}}
spec:
  sources:
    - {{name: web, http: {{port: {port}, path: /ingest}}}}
    - {{name: bus, nats: {{subject: orders.created}}}}
  stages: [{{name: copy, passthrough: {{}}}}]
  sinks: [{{name: out, file: {{path: "{{dir}}/out.jsonl"}}}}]
"#
    );
    let mut h = harness(&yaml).await;
    h.start_all();
    let client = switchyard_stage::steps::http_client().unwrap();
    let url = format!("http://127.0.0.1:{port}/ingest");
    let mut posted = 0;
    for i in 0..3 {
        for attempt in 0.. {
            match client
                .post(&url)
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .body(format!("{{\"via\": \"http\", \"i\": {i}}}"))
                .send()
                .await
            {
                Ok(r) => {
                    assert_eq!(r.status(), 202);
                    posted += 1;
                    break;
                }
                Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(posted, 3);
    // The NATS source's subscription may not be up yet: retry the request until it answers.
    let mut stored = 0;
    for i in 0..2 {
        for attempt in 0.. {
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                h.client.request(
                    "orders.created",
                    format!("{{\"via\": \"nats\", \"i\": {i}}}").into(),
                ),
            )
            .await;
            match reply {
                Ok(Ok(m)) => {
                    assert_eq!(&m.payload[..], b"{\"stored\":true}");
                    stored += 1;
                    break;
                }
                _ if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(stored, 2);
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 5, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let values = json_lines(&lines);
    assert_eq!(values.iter().filter(|v| v["via"] == "http").count(), 3);
    assert_eq!(values.iter().filter(|v| v["via"] == "nats").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_nats_and_http_sinks_deliver_every_message() {
    let (url, seen) = http_server().await;
    let yaml = format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: sinks}}
spec:
  sources: [{{name: src, generator: {{count: 20}}}}]
  stages: [{{name: copy, passthrough: {{}}}}]
  sinks:
    - {{name: printed, log: {{}}}}
    - {{name: bus, nats: {{subject: results.out}}}}
    - {{name: web, http: {{url: "{url}"}}}}
"#
    );
    let mut h = harness(&yaml).await;
    let mut results = h.client.subscribe("results.out").await.unwrap();
    h.client.flush().await.unwrap();
    for unit in ["copy", "bus", "web"] {
        h.start(unit);
    }
    // The log sink prints to its process's stdout: run it as a process to read that.
    h.spawn("printed", "p");
    h.start("src");
    let mut from_nats = Vec::new();
    while from_nats.len() < 20 {
        let m = tokio::time::timeout(LIMIT, results.next())
            .await
            .unwrap()
            .unwrap();
        let origin = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Switchyard-Origin"))
            .map(|v| v.as_str().to_string());
        assert_eq!(origin.as_deref(), Some("src"));
        from_nats.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    h.wait_until_drained(LIMIT).await;
    assert_eq!(seen.lock().unwrap().len(), 20);
    h.stop().await;
    assert_eq!(from_nats.len(), 20);
    let printed: Vec<String> = h
        .output_of("printed", "p")
        .lines()
        .map(str::to_string)
        .collect();
    let mut seqs: Vec<u64> = json_lines(&printed)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finite_source_stopped_halfway_does_not_claim_to_be_finished() {
    let h = harness(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: early}
spec:
  sources: [{name: src, generator: {count: 1000, ratePerSecond: 100}}]
  stages: [{name: copy, passthrough: {}}]
  sinks: [{name: out, log: {}}]
"#,
    )
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let options = switchyard_stage::RunOptions {
        nats_url: h.nats.url(),
        credentials: Default::default(),
        replica: "r".into(),
        exit_when_done: true,
        metrics_addr: None,
    };
    let run = tokio::spawn(switchyard_stage::run_unit(
        h.config("src"),
        options,
        stopped,
    ));
    // Stop once it has stored something, and long before its 1,000 at 100 a second.
    let stream = h.js.get_stream(&h.layout.nats.stream.name).await.unwrap();
    let started = std::time::Instant::now();
    while stream.get_info().await.unwrap().state.messages == 0 {
        assert!(started.elapsed() < LIMIT, "the source stored nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let result = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap();
    let error = result.expect_err("a source stopped halfway reported success");
    assert!(
        error
            .to_string()
            .contains("stopped before the source finished"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_carry_lag_rate_and_utilization_and_metrics_show_them() {
    let mut h = harness(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: busy}
spec:
  sources: [{name: src, generator: {count: 2000, ratePerSecond: 400}}]
  stages: [{name: work, concurrency: 2, sleep: 50ms}]
  sinks: [{name: out, log: {}}]
"#,
    )
    .await;
    let port = free_port();
    let stats = h.watch_stats("work").await;
    h.start("src");
    h.start("out");
    let addr = format!("127.0.0.1:{port}");
    h.spawn_with("work", "only", &["--metrics-addr", &addr]);
    // One replica does 2 / 50ms = 40 a second, ten times less than comes in: a backlog builds. Its
    // figures are read once it has worked at that pace for a few report intervals.
    let reports = settled_reports(&stats, LIMIT, |r| {
        r.get("only").is_some_and(|r| r.processed >= 120)
    })
    .await;
    let report = reports
        .get("only")
        .cloned()
        .expect("a report from the replica");
    assert!(report.lag.unwrap_or(0) > 100, "{report:?}");
    assert!((20.0..=60.0).contains(&report.rate), "{report:?}");
    assert!(report.utilization > 0.8, "{report:?}");
    assert_eq!(report.concurrency, 2);
    let metrics = reqwest_get(&format!("http://{addr}/metrics")).await;
    assert!(
        metrics.contains("switchyard_stage_lag{pipeline=\"busy\",unit=\"work\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_stage_utilization{pipeline=\"busy\",unit=\"work\"}"),
        "{metrics}"
    );
    assert_eq!(reqwest_get(&format!("http://{addr}/readyz")).await, "ready");
    h.stop().await;
}

async fn reqwest_get(url: &str) -> String {
    let client = switchyard_stage::steps::http_client().unwrap();
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Requests a local HTTP server is answering at once, at most, on each of its paths.
#[derive(Default)]
struct Concurrency {
    now: std::collections::HashMap<String, usize>,
    most: std::collections::HashMap<String, usize>,
    answered: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_service_gets_a_bounded_number_of_requests_at_once() {
    // Every request takes 20 ms; 300 messages in flight would otherwise all be posted at once.
    let counts = Arc::new(Mutex::new(Concurrency::default()));
    let app = axum::Router::new()
        .route(
            "/{path}",
            axum::routing::post(
                |axum::extract::State(counts): axum::extract::State<Arc<Mutex<Concurrency>>>,
                 axum::extract::Path(path): axum::extract::Path<String>,
                 body: String| async move {
                    {
                        let mut c = counts.lock().unwrap();
                        let now = c.now.entry(path.clone()).or_default();
                        *now += 1;
                        let now = *now;
                        let most = c.most.entry(path.clone()).or_default();
                        *most = (*most).max(now);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let mut c = counts.lock().unwrap();
                    *c.now.entry(path).or_default() -= 1;
                    c.answered += 1;
                    body
                },
            ),
        )
        .with_state(counts.clone());
    let base = serve(app).await;
    let yaml = format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: bounded}}
spec:
  sources: [{{name: src, generator: {{count: 300}}}}]
  stages: [{{name: enrich, http: {{url: "{base}/step"}}}}]
  sinks: [{{name: web, http: {{url: "{base}/sink"}}}}]
"#
    );
    let mut h = harness(&yaml).await;
    h.start_all();
    let started = std::time::Instant::now();
    while counts.lock().unwrap().answered < 600 && started.elapsed() < LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let c = counts.lock().unwrap();
    assert_eq!(
        c.answered, 600,
        "every message through the step and the sink"
    );
    for path in ["step", "sink"] {
        let most = c.most[path];
        assert!(
            most <= switchyard_stage::steps::OUTSTANDING_CALLS,
            "{path} had {most} requests at once"
        );
    }
}

/// A server that answers `first` to the first request and 200 with the body to every later one.
async fn answering_first(first: (u16, Option<&'static str>)) -> (String, Arc<Mutex<usize>>) {
    let calls = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(
                move |axum::extract::State(calls): axum::extract::State<Arc<Mutex<usize>>>,
                      body: String| async move {
                    let n = {
                        let mut calls = calls.lock().unwrap();
                        *calls += 1;
                        *calls
                    };
                    let mut response = axum::http::Response::builder();
                    if n == 1 {
                        response = response.status(first.0);
                        if let Some(after) = first.1 {
                            response = response.header("Retry-After", after);
                        }
                        return response.body(axum::body::Body::from("not now")).unwrap();
                    }
                    response
                        .status(200)
                        .body(axum::body::Body::from(body))
                        .unwrap()
                },
            ),
        )
        .with_state(calls.clone());
    (format!("{}/", serve(app).await), calls)
}

fn http_step(url: &str) -> switchyard_stage::steps::Step {
    http_step_with(url, 3)
}

fn http_step_with(url: &str, max_attempts: u32) -> switchyard_stage::steps::Step {
    use switchyard_crds::unit::{RetryConfig, StepConfig};
    switchyard_stage::steps::Step::build(
        &StepConfig {
            path: "u > web".into(),
            kind: switchyard_crds::StepKind::Http(switchyard_crds::HttpStep {
                url: url.into(),
                headers: None,
            }),
            env: Vec::new(),
            timeout_ms: None,
            retry: RetryConfig {
                max_attempts,
                backoff_ms: 5,
                max_backoff_ms: 10,
            },
        },
        &switchyard_stage::steps::LazyClient::default(),
    )
    .unwrap()
}

/// 503 with `Retry-After: 1` waits a second, not the 5 ms backoff; a 400 is final at once; a 429 is
/// worth another attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_decide_retries_and_retry_after_is_honoured() {
    use switchyard_stage::lineage::Lineage;
    use switchyard_stage::payload::Payload;
    let lineage = Lineage::at_source("s", "1".into(), "s:1".into());
    let item = || Payload::Bytes("{\"n\":1}".into());

    let (url, calls) = answering_first((503, Some("1"))).await;
    let started = std::time::Instant::now();
    let out = http_step(&url).run(item(), &lineage).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.len(), 1);
    assert_eq!(*calls.lock().unwrap(), 2);

    let (url, calls) = answering_first((400, None)).await;
    let failure = http_step(&url).run(item(), &lineage).await.unwrap_err();
    assert_eq!(failure.attempts, 1);
    assert!(failure.error.contains("400"), "{}", failure.error);
    assert_eq!(*calls.lock().unwrap(), 1);

    let (url, calls) = answering_first((429, None)).await;
    http_step(&url).run(item(), &lineage).await.unwrap();
    assert_eq!(*calls.lock().unwrap(), 2);
}

/// A web service that crashes on one request: every connection with a request in it breaks at once,
/// and every other connection it had open breaks under the next request sent on it, as a pooled
/// connection that the crash closed does when the client has not noticed yet (which on a busy
/// machine it may not have). Connections made after the crash work. Speaks just enough HTTP/1.1 by
/// hand, because a framework does not let a request cut its neighbours' connections. Answers each
/// body after `answer_after`, so that many are held.
async fn crashing_on(poison: &'static str, answer_after: Duration) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (crash, _) = tokio::sync::broadcast::channel::<()>(4);
    let crashes = std::sync::Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let crash = crash.clone();
            let crashes = crashes.clone();
            let born_after = crashes.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut crashed = crash.subscribe();
                let mut socket = tokio::io::BufReader::new(socket);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            let Ok(value) = value.trim().parse() else {
                                return;
                            };
                            length = value;
                        }
                    }
                    let mut body = vec![0; length];
                    if socket.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if crashes.load(Ordering::SeqCst) != born_after {
                        return; // open when the service crashed
                    }
                    if String::from_utf8_lossy(&body).contains(poison) {
                        crashes.fetch_add(1, Ordering::SeqCst);
                        let _ = crash.send(());
                        return;
                    }
                    // A crash while this request is held drops it.
                    tokio::select! {
                        _ = tokio::time::sleep(answer_after) => {}
                        _ = crashed.recv() => return,
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                    if socket.write_all(head.as_bytes()).await.is_err()
                        || socket.write_all(&body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A request tried alone after a crash of the web service gets a connection of its own: the pooled
/// ones may be ones that the crash broke, and a failure there is not the request's. It used to take
/// one from the pool, and a good request failed (CI, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_tried_alone_does_not_take_a_connection_the_crash_broke() {
    use switchyard_stage::lineage::Lineage;
    use switchyard_stage::payload::Payload;
    let url = crashing_on("\"poison\"", Duration::from_millis(300)).await;
    let step = http_step_with(&url, 1);
    let lineage = Lineage::at_source("s", "1".into(), "s:1".into());
    let body = |n: &str| Payload::Bytes(format!("{{\"n\": {n}}}").into());
    // Four connections in the pool.
    let warm = (0..4).map(|n| step.run(body(&n.to_string()), &lineage));
    for result in futures::future::join_all(warm).await {
        result.unwrap();
    }
    // Two of them take a good request and the poison; the crash breaks all four.
    let (good, poison) = tokio::time::timeout(
        LIMIT,
        futures::future::join(
            step.run(body("1"), &lineage),
            step.run(body("\"poison\""), &lineage),
        ),
    )
    .await
    .expect("the requests did not finish");
    let outputs = good.map_err(|f| f.error).expect("the good request failed");
    let answered: Vec<_> = outputs.into_iter().map(Payload::into_bytes).collect();
    assert_eq!(answered, vec![body("1").into_bytes()]);
    let failure = poison.expect_err("the poison crashed the service");
    assert_eq!(failure.attempts, 1);
}

/// A request that crashes the web service breaks the connections of every request in flight with
/// it; they used to fail their attempts with it. Only the request that crashes it alone fails now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_that_breaks_the_service_fails_alone() {
    use switchyard_stage::lineage::Lineage;
    use switchyard_stage::payload::Payload;
    let url = crashing_on("\"poison\"", Duration::from_millis(20)).await;
    let step = http_step_with(&url, 1);
    let lineage = Lineage::at_source("s", "1".into(), "s:1".into());
    let runs = (0..150).map(|n| {
        let body = if n == 37 {
            "{\"n\": \"poison\"}".to_string()
        } else {
            format!("{{\"n\": {n}}}")
        };
        step.run(Payload::Bytes(body.into()), &lineage)
    });
    let results = tokio::time::timeout(LIMIT, futures::future::join_all(runs))
        .await
        .expect("the requests did not finish");
    let failed: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        failed,
        vec![37],
        "{:?}",
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|f| &f.error)
            .take(3)
            .collect::<Vec<_>>()
    );
    let Err(failure) = &results[37] else {
        unreachable!()
    };
    assert_eq!(failure.attempts, 1);
    assert!(
        failure.error.starts_with(&format!("POST {url}: ")),
        "{}",
        failure.error
    );
}

/// The same for the http sink: a write that crashes the web service breaks the writes in flight with
/// it, which used to be charged an attempt each (with `maxAttempts: 1`, dead-lettered). Each is now
/// written again alone on a connection of its own, and only the poison fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_write_that_breaks_the_service_fails_alone() {
    use switchyard_crds::unit::RetryConfig;
    use switchyard_stage::lineage::Lineage;
    use switchyard_stage::sinks::{self, http::HttpSink, Written};
    let url = crashing_on("\"poison\"", Duration::from_millis(20)).await;
    let sink = HttpSink::new(&switchyard_crds::HttpSink {
        url: url.clone(),
        headers: None,
    })
    .unwrap();
    let once = RetryConfig {
        max_attempts: 1,
        backoff_ms: 5,
        max_backoff_ms: 10,
    };
    let lineage = Lineage::at_source("s", "1".into(), "s:1".into());
    let writes = (0..150).map(|n| {
        let body = if n == 37 {
            "{\"n\": \"poison\"}".to_string()
        } else {
            format!("{{\"n\": {n}}}")
        };
        sinks::write_with_retry(&sink, &once, "u", &lineage, body.into())
    });
    let results = tokio::time::timeout(LIMIT, futures::future::join_all(writes))
        .await
        .expect("the writes did not finish");
    let failed: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        failed,
        vec![37],
        "{:?}",
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|f| &f.error)
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .all(|w| *w == Written::New));
    let Err(failure) = &results[37] else {
        unreachable!()
    };
    assert_eq!(failure.attempts, 1);
    assert!(
        failure.error.starts_with(&format!("POST {url}: ")),
        "{}",
        failure.error
    );
}

/// What a handler writes on stderr reaches the unit's log under the step's name, a bounded number of
/// lines a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_stderr_reaches_the_units_log_rate_limited() {
    let mut h = harness(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: talk}
spec:
  sources: [{name: src, generator: {count: 3}}]
  stages:
    - name: work
      stages:
        - name: chatty
          exec: {command: ["python3", "{dir}/chatty.py"]}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    )
    .await;
    handler(
        &h,
        "chatty.py",
        "import json, sys\nfor i in range(500):\n    print(f'warming up {i}', file=sys.stderr, flush=True)\nfor line in sys.stdin:\n    m = json.loads(line)\n    print(f'working on {m[\"data\"][\"seq\"]}', file=sys.stderr, flush=True)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n",
    );
    h.start("src");
    h.start("out");
    h.spawn("work", "only");
    h.wait_for_lines(&h.path("out.jsonl"), 3, LIMIT).await;
    let started = std::time::Instant::now();
    while !h.log_of("work", "only").contains("skipped") {
        assert!(started.elapsed() < LIMIT, "{}", h.log_of("work", "only"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
    let log = h.log_of("work", "only");
    assert!(log.contains("work > chatty"), "{log}");
    assert!(log.contains("warming up 0"), "{log}");
    assert!(
        !log.contains("warming up 499"),
        "every line was logged:\n{log}"
    );
    assert!(log.contains("lines of the handler's stderr"), "{log}");
}

/// With `bearerToken`, only requests that carry the token are stored (401 otherwise); bodies over
/// `maxBodyBytes` get 413. Nothing refused reaches the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_source_wants_its_token_and_bounds_its_bodies() {
    let port = free_port();
    // The variable's name is this test's own: no other test reads it.
    std::env::set_var("SWITCHYARD_TEST_INGEST_TOKEN", "s3cret-ingest\n");
    let yaml = format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: guarded}}
spec:
  sources:
    - name: web
      http: {{port: {port}, path: /ingest, maxBodyBytes: 1000, bearerToken: {{env: SWITCHYARD_TEST_INGEST_TOKEN}}}}
  stages: [{{name: copy, passthrough: {{}}}}]
  sinks: [{{name: out, file: {{path: "{{dir}}/out.jsonl"}}}}]
"#
    );
    let mut h = harness(&yaml).await;
    h.start_all();
    let client = switchyard_stage::steps::http_client().unwrap();
    let url = format!("http://127.0.0.1:{port}/ingest");
    let post = |auth: Option<&'static str>, body: String| {
        let mut request = client.post(&url).body(body);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.send()
    };
    // The source may not listen yet: the first request is retried until it is answered.
    let mut first = None;
    for _ in 0..50 {
        if let Ok(r) = post(None, "{\"i\": 0}".into()).await {
            first = Some(r.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(first, Some(reqwest::StatusCode::UNAUTHORIZED));
    let wrong = post(Some("Bearer s3cret-ingesT"), "{\"i\": 1}".into())
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = post(Some("Bearer s3cret-ingest"), "{\"i\": 2}".into())
        .await
        .unwrap();
    assert_eq!(right.status(), 202);
    let large = format!("{{\"i\": 3, \"pad\": \"{}\"}}", "x".repeat(2000));
    let too_large = post(Some("Bearer s3cret-ingest"), large).await.unwrap();
    assert_eq!(too_large.status(), 413);
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 1, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let values = json_lines(&lines);
    assert_eq!(values.len(), 1, "{values:?}");
    assert_eq!(values[0]["i"], 2);
}
