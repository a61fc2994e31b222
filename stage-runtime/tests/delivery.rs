//! Delivery guarantees against a real nats-server: retries, dead letters, timeouts, crashes, replicas,
//! fan-out and fan-in, batches, graceful shutdown, tracing headers.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{handler, harness, header, json_lines, settled_reports, terminate};
use futures::StreamExt;
use switchyard_crds::unit::headers;

const LIMIT: Duration = Duration::from_secs(60);

fn pipeline(name: &str, body: &str) -> String {
    format!("apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n{body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_is_retried_until_it_succeeds() {
    let mut h = harness(&pipeline(
        "retry",
        r#"  sources: [{name: src, generator: {count: 30}}]
  stages:
    - name: flaky
      exec: {command: ["python3", "{dir}/flaky.py"]}
      retry: {maxAttempts: 3, backoff: 10ms}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    // Fails the first attempt of every message, succeeds on the second.
    handler(
        &h,
        "flaky.py",
        "import json, sys\nseen = set()\nfor line in sys.stdin:\n    m = json.loads(line)\n    n = m['data']['seq']\n    if n in seen:\n        print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n    else:\n        seen.add(n)\n        print(json.dumps({'id': m['id'], 'error': 'not yet'}), flush=True)\n",
    );
    let stats = h.watch_stats("flaky").await;
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 30, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let seqs: BTreeSet<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=30).collect());
    assert_eq!(lines.len(), 30);
    let dead: u64 = stats
        .lock()
        .unwrap()
        .values()
        .map(|r| r.dead_lettered)
        .sum();
    assert_eq!(dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_send_the_message_to_the_dead_letter_subject_with_headers() {
    let mut h = harness(&pipeline(
        "dlq",
        r#"  sources: [{name: src, generator: {count: 20}}]
  stages:
    - name: work
      stages:
        - name: check
          exec: {command: ["python3", "{dir}/check.py"]}
          retry: {maxAttempts: 3, backoff: 5ms}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    handler(
        &h,
        "check.py",
        "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    n = m['data']['seq']\n    with open('{dir}/calls', 'a') as f:\n        f.write(f'{n}\\n')\n    if n % 5 == 0:\n        print(json.dumps({'id': m['id'], 'error': f'{n} is bad\\nreally'}), flush=True)\n    else:\n        print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n"
            .replace("{dir}", &h.dir.path().display().to_string())
            .as_str(),
    );
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 16, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let dead = h.dead_letters(4).await;
    h.stop().await;
    assert_eq!(lines.len(), 16);
    assert_eq!(dead.len(), 4);
    let mut bad = Vec::new();
    for m in &dead {
        let n: u64 = header(m, headers::ORIGIN_SEQ).parse().unwrap();
        bad.push(n);
        assert_eq!(header(m, headers::ERROR), format!("{n} is bad really"));
        assert_eq!(header(m, headers::FAILED_STAGE), "work > check");
        assert_eq!(header(m, headers::FAILED_UNIT), "work");
        assert_eq!(header(m, headers::ATTEMPTS), "3");
        assert_eq!(header(m, headers::ORIGIN), "src");
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["seq"], n);
    }
    bad.sort();
    assert_eq!(bad, vec![5, 10, 15, 20]);
    let calls = std::fs::read_to_string(h.path("calls")).unwrap();
    assert_eq!(
        calls.lines().filter(|l| *l == "10").count(),
        3,
        "three attempts for a bad message"
    );
    assert_eq!(
        calls.lines().filter(|l| *l == "11").count(),
        1,
        "one attempt for a good one"
    );
}

/// The case a new user tried: 1,000 items through a pass-through handler and then one that answers
/// every 50th with `this is not json`. Each bad line used to fail every item the child held with it:
/// 285 dead letters, most of them good items. Exactly the 20 culprits may reach the dead letters,
/// each quoting its line, and every other item the sink exactly once, with one attempt or two.
async fn only_the_items_that_provoke_a_bad_line_are_dead_lettered(max_attempts: u32) {
    let mut h = harness(&pipeline(
        &format!("garbage{max_attempts}"),
        &format!(
            r#"  sources: [{{name: src, generator: {{count: 1000}}}}]
  stages:
    - name: pass
      exec: {{command: ["python3", "{{dir}}/pass.py"]}}
    - name: garb
      exec: {{command: ["python3", "{{dir}}/garb.py"]}}
      retry: {{maxAttempts: {max_attempts}, backoff: 5ms}}
  sinks: [{{name: out, file: {{path: "{{dir}}/out.jsonl"}}}}]
"#
        ),
    ))
    .await;
    handler(
        &h,
        "pass.py",
        "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n",
    );
    handler(
        &h,
        "garb.py",
        "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['data']['seq'] % 50 == 0:\n        print('this is not json', flush=True)\n    else:\n        print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n",
    );
    let stats = h.watch_stats("garb").await;
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 980, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let dead = h.dead_letters(20).await;
    let reports = settled_reports(&stats, LIMIT, |r| {
        r.values().map(|s| s.processed).sum::<u64>() >= 1000
    })
    .await;
    h.stop().await;
    let seqs: BTreeSet<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=1000).filter(|n| n % 50 != 0).collect());
    assert_eq!(lines.len(), 980, "an item reached the sink twice");
    let dead_lettered: u64 = reports.values().map(|r| r.dead_lettered).sum();
    assert_eq!(
        dead_lettered, 20,
        "good items were dead-lettered with the bad ones"
    );
    let mut bad: Vec<u64> = dead
        .iter()
        .map(|m| header(m, headers::ORIGIN_SEQ).parse().unwrap())
        .collect();
    bad.sort();
    assert_eq!(bad, (1..=1000).filter(|n| n % 50 == 0).collect::<Vec<_>>());
    for m in &dead {
        assert_eq!(header(m, headers::FAILED_STAGE), "garb");
        assert_eq!(header(m, headers::ATTEMPTS), max_attempts.to_string());
        let error = header(m, headers::ERROR);
        assert!(
            error.starts_with(
                "the handler of step garb wrote `this is not json` instead of a reply ("
            ),
            "{error}"
        );
        assert_eq!(error.matches("not a reply").count(), 0, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_line_in_fifty_dead_letters_only_its_item_with_one_attempt() {
    only_the_items_that_provoke_a_bad_line_are_dead_lettered(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_line_in_fifty_dead_letters_only_its_item_with_two_attempts() {
    only_the_items_that_provoke_a_bad_line_are_dead_lettered(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_over_its_timeout_fails_each_attempt() {
    let mut h = harness(&pipeline(
        "timeout",
        r#"  sources: [{name: src, generator: {count: 3}}]
  stages:
    - name: slow
      sleep: 2s
      timeout: 50ms
      retry: {maxAttempts: 2, backoff: 10ms}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start_all();
    let dead = h.dead_letters(3).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    assert_eq!(dead.len(), 3);
    for m in &dead {
        assert_eq!(header(m, headers::ERROR), "timed out after 50ms");
        assert_eq!(header(m, headers::ATTEMPTS), "2");
    }
    assert!(std::fs::read_to_string(h.path("out.jsonl"))
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_child_that_crashes_is_restarted_and_nothing_is_lost() {
    let mut h = harness(&pipeline(
        "crash",
        r#"  sources: [{name: src, generator: {count: 200, ratePerSecond: 1000}}]
  stages:
    - name: fragile
      exec: {command: ["python3", "{dir}/fragile.py"]}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    // Dies (without answering) on its 30th message, twice in the run.
    let code = "import json, os, sys\ncount = 0\nfor line in sys.stdin:\n    count += 1\n    crashes = len(os.listdir('{dir}/crashes'))\n    if count == 30 and crashes < 2:\n        open(f'{dir}/crashes/{crashes}', 'w').close()\n        os._exit(3)\n    m = json.loads(line)\n    print(json.dumps({'id': m['id'], 'outputs': [dict(m['data'], pid=os.getpid())]}), flush=True)\n";
    std::fs::create_dir(h.path("crashes")).unwrap();
    handler(
        &h,
        "fragile.py",
        &code.replace("{dir}", &h.dir.path().display().to_string()),
    );
    h.start("src");
    h.start("out");
    h.spawn("fragile", "r1");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 200, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let values = json_lines(&lines);
    let seqs: BTreeSet<u64> = values.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=200).collect());
    assert_eq!(lines.len(), 200, "a message reached the sink twice");
    let pids: BTreeSet<u64> = values.iter().map(|v| v["pid"].as_u64().unwrap()).collect();
    // Two crashes: the shared child's second life, or the child that tries suspects alone, took over.
    assert!(
        pids.len() >= 3,
        "two crashes, three handler lives at least: {pids:?}"
    );
    assert_eq!(std::fs::read_dir(h.path("crashes")).unwrap().count(), 2);
    assert!(h
        .log_of("fragile", "r1")
        .contains("handler ended (exit status: 3)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_runs_in_one_process() {
    let mut h = harness(&pipeline(
        "group",
        r#"  sources: [{name: src, generator: {count: 10}}]
  stages:
    - name: g
      stages:
        - {name: first, exec: {command: ["python3", "{dir}/parent.py", "first"]}}
        - {name: middle, jq: '. + {middle: true}'}
        - {name: last, exec: {command: ["python3", "{dir}/parent.py", "last"]}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    handler(
        &h,
        "parent.py",
        "import json, os, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    print(json.dumps({'id': m['id'], 'outputs': [dict(m['data'], **{sys.argv[1]: os.getppid()})]}), flush=True)\n",
    );
    h.start("src");
    h.start("out");
    let pid = h.spawn("g", "only");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 10, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    for v in json_lines(&lines) {
        assert_eq!(v["first"], pid, "{v}");
        assert_eq!(v["last"], pid, "{v}");
        assert_eq!(v["middle"], true);
    }
    // The group is one unit: one consumer between the source and the sink, no subject in between.
    let consumers: Vec<&str> = h
        .layout
        .nats
        .consumers
        .iter()
        .map(|c| c.durable.as_str())
        .collect();
    assert_eq!(consumers, vec!["g", "out", "_dead_letters"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switcher_with_three_replicas_shares_the_load() {
    let mut h = harness(&pipeline(
        "share",
        r#"  sources: [{name: src, generator: {count: 300}}]
  stages:
    - name: work
      switcher: {minReplicas: 3, maxReplicas: 3}
      concurrency: 4
      sleep: 10ms
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    let stats = h.watch_stats("work").await;
    h.start("out");
    for replica in ["a", "b", "c"] {
        h.spawn("work", replica);
    }
    // The run lasts about 250 ms: a replica that starts later than that would get nothing.
    h.wait_for_pullers("work", 3, LIMIT).await;
    h.start("src");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 300, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    assert_eq!(lines.len(), 300);
    let reports = settled_reports(&stats, Duration::from_secs(10), |r| {
        r.len() == 3 && r.values().map(|s| s.processed).sum::<u64>() >= 300
    })
    .await;
    let processed: Vec<(String, u64)> = reports
        .iter()
        .map(|(r, s)| (r.clone(), s.processed))
        .collect();
    assert_eq!(reports.len(), 3, "{processed:?}");
    assert!(processed.iter().all(|(_, n)| *n > 0), "{processed:?}");
    assert_eq!(
        processed.iter().map(|(_, n)| n).sum::<u64>(),
        300,
        "{processed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_and_fan_in() {
    let mut h = harness(&pipeline(
        "fan",
        r#"  sources: [{name: src, generator: {count: 50}}]
  stages:
    - {name: split, passthrough: {}}
    - {name: left, inputs: [split], jq: '. + {side: "left"}'}
    - {name: right, inputs: [split], jq: '. + {side: "right"}'}
    - {name: join, inputs: [left, right], passthrough: {}}
  sinks:
    - {name: out, file: {path: "{dir}/out.jsonl"}}
    - {name: raw, inputs: [split], file: {path: "{dir}/raw.jsonl"}}
"#,
    ))
    .await;
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 100, LIMIT).await;
    let raw = h.wait_for_lines(&h.path("raw.jsonl"), 50, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    assert_eq!(lines.len(), 100);
    assert_eq!(raw.len(), 50);
    let pairs: BTreeSet<(u64, String)> = json_lines(&lines)
        .iter()
        .map(|v| {
            (
                v["seq"].as_u64().unwrap(),
                v["side"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 100, "every item once through each side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fill_up_or_time_out() {
    let mut h = harness(&pipeline(
        "batch",
        r#"  sources: [{name: src, generator: {count: 95}}]
  stages:
    - name: count
      batch: {size: 10, timeout: 300ms}
      jq: '{size: length, first: .[0].seq}'
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start_all();
    let started = std::time::Instant::now();
    let mut total = 0;
    let mut lines = Vec::new();
    while total < 95 && started.elapsed() < LIMIT {
        let text = std::fs::read_to_string(h.path("out.jsonl")).unwrap_or_default();
        lines = text.lines().map(str::to_string).collect();
        total = json_lines(&lines)
            .iter()
            .map(|v| v["size"].as_u64().unwrap())
            .sum();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    assert_eq!(total, 95);
    let sizes: Vec<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["size"].as_u64().unwrap())
        .collect();
    assert!(sizes.iter().all(|s| *s <= 10), "{sizes:?}");
    assert!(
        sizes.iter().any(|s| *s < 10),
        "the last batch was handed on by its timeout: {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_acknowledges_what_is_in_flight() {
    let mut h = harness(&pipeline(
        "term",
        r#"  sources: [{name: src, generator: {count: 100}}]
  stages:
    - name: slow
      concurrency: 10
      sleep: 300ms
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    let stats = h.watch_stats("slow").await;
    h.start("src");
    h.start("out");
    h.spawn("slow", "first");
    // Terminate it mid-work: some messages finished, others in its hands.
    settled_reports(&stats, LIMIT, |r| {
        r.get("first")
            .is_some_and(|s| s.processed >= 10 && s.in_flight > 0)
    })
    .await;
    let mut first = h.take_process(0);
    let started = std::time::Instant::now();
    terminate(&mut first);
    let status = first.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let done_before = std::fs::read_to_string(h.path("out.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!((10..100).contains(&done_before), "{done_before}");
    h.spawn("slow", "second");
    // What the first replica had fetched but not started was handed back, not left to time out (30s).
    let lines = h
        .wait_for_lines(&h.path("out.jsonl"), 100, Duration::from_secs(15))
        .await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let seqs: BTreeSet<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 100);
    assert_eq!(lines.len(), 100);
    // What the first replica was working on, it finished and acknowledged: nothing was done twice.
    let reports = settled_reports(&stats, Duration::from_secs(10), |r| {
        r.len() == 2 && r.values().map(|s| s.processed).sum::<u64>() >= 100
    })
    .await;
    let processed: Vec<u64> = reports.values().map(|r| r.processed).collect();
    assert_eq!(processed.iter().sum::<u64>(), 100, "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trace_an_item_through_every_unit() {
    let mut h = harness(&pipeline(
        "trace",
        r#"  sources: [{name: src, generator: {count: 3}}]
  stages:
    - {name: a, passthrough: {}}
    - {name: b, jq: '.'}
  sinks: [{name: bus, nats: {subject: traced.out}}]
"#,
    ))
    .await;
    let mut out = h.client.subscribe("traced.out").await.unwrap();
    h.client.flush().await.unwrap();
    h.start_all();
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(LIMIT, out.next())
            .await
            .unwrap()
            .unwrap();
        let get = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        assert_eq!(get(headers::PATH), "src,a,b,bus");
        assert_eq!(get(headers::ORIGIN), "src");
        let seq = get(headers::ORIGIN_SEQ);
        assert_eq!(get(headers::MSG_ID), format!("src:{seq}/a/b"));
        seen.insert(seq);
    }
    h.stop().await;
    assert_eq!(seen.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_loses_and_duplicates_nothing() {
    let mut h = harness(&pipeline(
        "restart",
        r#"  sources: [{name: src, generator: {count: 3000, ratePerSecond: 1000}}]
  stages:
    - {name: a, passthrough: {}}
    - {name: b, sleep: 1ms}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    for unit in ["out", "b", "a", "src"] {
        h.spawn(unit, "r");
    }
    h.wait_for_lines(&h.path("out.jsonl"), 500, LIMIT).await;
    tokio::task::block_in_place(|| h.nats.restart()).unwrap();
    let lines = h
        .wait_for_lines(&h.path("out.jsonl"), 3000, Duration::from_secs(120))
        .await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    let seqs: BTreeSet<u64> = json_lines(&lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=3000).collect());
    assert_eq!(lines.len(), 3000, "a message reached the sink twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_s_queue_does_not_count_against_its_timeout() {
    // 400 messages in flight at once (concurrency 512) before a handler that takes 10 ms each, one at a
    // time: all of them handed to the child together would wait up to 4 s there, and the timeout of 2 s
    // would fail half of them. Only the time a message spends with the child may count.
    let mut h = harness(&pipeline(
        "slowqueue",
        r#"  sources: [{name: src, generator: {count: 400}}]
  stages:
    - name: slow
      exec: {command: ["python3", "{dir}/slow.py"]}
      timeout: 2s
      retry: {maxAttempts: 1}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    handler(
        &h,
        "slow.py",
        "import json, sys, time\nfor line in sys.stdin:\n    m = json.loads(line)\n    time.sleep(0.01)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n",
    );
    h.start_all();
    let lines = h
        .wait_for_lines(&h.path("out.jsonl"), 400, Duration::from_secs(30))
        .await;
    h.stop().await;
    assert_eq!(
        lines.len(),
        400,
        "messages timed out while they waited for the handler"
    );
}

/// An output the NATS server cannot take (over its max_payload) used to fail its publish on every
/// delivery until the message counted as poison, eleven deliveries later. Its input is dead-lettered at
/// once now, with the sizes, and the rest flows on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_servers_limit_is_dead_lettered_at_once_with_the_sizes() {
    let mut h = harness(&pipeline(
        "huge",
        r#"  sources: [{name: src, generator: {count: 4}}]
  stages:
    - name: work
      stages:
        - name: grow
          jq: 'if .seq == 2 then [range(0; 400000)] else . end'
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start_all();
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 3, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let dead = h.dead_letters(1).await;
    h.stop().await;
    assert_eq!(lines.len(), 3);
    assert_eq!(dead.len(), 1);
    let m = &dead[0];
    assert_eq!(header(m, headers::ORIGIN_SEQ), "2");
    assert_eq!(header(m, headers::ATTEMPTS), "1");
    assert_eq!(header(m, headers::FAILED_STAGE), "work > grow");
    let error = header(m, headers::ERROR);
    assert!(
        error.contains("bytes is larger than the 1048576 bytes the NATS server takes"),
        "{error}"
    );
    let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body["seq"], 2);
}

/// A handler image often has no CA certificates (Debian's minbase, scratch): a unit that makes no
/// HTTP request must run without them. It used to build an HTTP client at start and exit with "No CA
/// certificates were loaded from the system"; an http step in such an image still fails at start,
/// saying what it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_without_http_needs_no_ca_certificates() {
    let mut h = harness(&pipeline(
        "noca",
        r#"  sources: [{name: src, generator: {count: 50, ratePerSecond: 1000}}]
  stages:
    - name: plain
      jq: '. + {plain: true}'
    - name: web
      http: {url: "https://127.0.0.1:1/"}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    let no_certificates = [
        ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
        ("SSL_CERT_DIR", "/nonexistent"),
    ];
    let stats = h.watch_stats("plain").await;
    h.start("src");
    h.spawn_with_env("plain", "r1", &no_certificates);
    h.spawn_with_env("web", "r1", &no_certificates);
    // `plain` runs: its outputs reach web's input (one message each, or frames of several), and it
    // stays up.
    let reports = settled_reports(&stats, LIMIT, |r| {
        r.get("r1").is_some_and(|s| s.published >= 50)
    })
    .await;
    assert_eq!(
        reports.get("r1").map(|s| s.published),
        Some(50),
        "plain did not pass 50 items on; its log: {}",
        h.log_of("plain", "r1")
    );
    let busy = h.busy_consumers().await;
    assert!(
        busy.get("web").is_some_and(|(pending, _)| *pending >= 1),
        "{busy:?}"
    );
    assert!(!h.log_of("plain", "r1").contains("CA certificates"));
    // `web` cannot start, and says why and what to do.
    let started = Instant::now();
    while !h.log_of("web", "r1").contains("CA certificates") {
        assert!(
            started.elapsed() < LIMIT,
            "web did not say it lacks CA certificates: {}",
            h.log_of("web", "r1")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(h
        .log_of("web", "r1")
        .contains("install them in the unit's image"));
    h.stop().await;
}
