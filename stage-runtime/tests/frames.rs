//! Frames (several items in one stored message) against a real nats-server: each item keeps its own
//! fate, a crash between storing a frame's outputs and acknowledging it stores nothing twice, and an
//! item that comes alone is not held back for company.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{harness, header, json_lines, settled_reports, Harness};
use switchyard_crds::unit::headers;

const LIMIT: Duration = Duration::from_secs(60);

fn pipeline(name: &str, body: &str) -> String {
    format!("apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n{body}")
}

/// Waits until the stream holds `items` items, and returns how many each of its messages holds.
async fn stored_items(h: &Harness, items: usize) -> Vec<usize> {
    let started = Instant::now();
    loop {
        let mut stream = h.js.get_stream(&h.layout.nats.stream.name).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut counts = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let n = switchyard_platform::frame::frame_count(Some(&m.headers))
                    .map_or(1, |n| n.unwrap());
                counts.push(n);
            }
        }
        if counts.iter().sum::<usize>() >= items {
            return counts;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the stream holds {counts:?} after {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seqs(lines: &[String]) -> Vec<u64> {
    json_lines(lines)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_items_of_a_frame_are_dead_lettered_one_by_one() {
    let mut h = harness(&pipeline(
        "framedlq",
        r#"  sources: [{name: src, generator: {count: 100}}]
  stages:
    - name: check
      jq: 'if .seq % 10 == 0 then error("\(.seq) is bad") else . end'
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start("src");
    let stored = stored_items(&h, 100).await;
    assert!(
        stored.iter().any(|&n| n > 1),
        "the generator stored no frame: {stored:?}"
    );
    h.start("check");
    h.start("out");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 90, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let dead = h.dead_letters(10).await;
    h.stop().await;
    let good: Vec<u64> = (1..=100).filter(|n| n % 10 != 0).collect();
    let mut written = seqs(&lines);
    written.sort();
    assert_eq!(written, good, "every good item once, none of the bad ones");
    let mut bad = Vec::new();
    for m in &dead {
        let n: u64 = header(m, headers::ORIGIN_SEQ).parse().unwrap();
        assert!(
            header(m, headers::ERROR).contains(&format!("{n} is bad")),
            "{}",
            header(m, headers::ERROR)
        );
        assert_eq!(header(m, headers::MSG_ID), format!("src:{n}/check!0.0"));
        assert_eq!(header(m, headers::FAILED_STAGE), "check");
        assert_eq!(header(m, headers::PATH), "src,check");
        assert!(m.headers.as_ref().unwrap().get(headers::FRAME).is_none());
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["seq"], n, "a dead letter holds its own item only");
        bad.push(n);
    }
    bad.sort();
    assert_eq!(bad, (1..=10).map(|n| n * 10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_storing_a_frames_outputs_and_acknowledging_it_stores_nothing_twice() {
    let mut h = harness(&pipeline(
        "framekill",
        r#"  nats: {redeliverAfter: 1s}
  sources: [{name: src, generator: {count: 600}}]
  stages:
    - {name: copy, passthrough: {}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start("src");
    let stored = stored_items(&h, 600).await;
    assert!(
        stored.len() >= 2 && stored.iter().all(|&n| n > 1),
        "the generator stored no frames: {stored:?}"
    );
    let sink = h.watch_stats("out").await;
    h.start("out");
    h.killed_after_stored("copy", "first", "2").await;
    // Its second input's outputs are stored; the input itself comes again to the next process.
    h.spawn("copy", "second");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 600, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let reports = settled_reports(&sink, Duration::from_secs(5), |r| {
        r.values().map(|s| s.processed).sum::<u64>() >= 600
    })
    .await;
    h.stop().await;
    let written = seqs(&lines);
    let unique: BTreeSet<u64> = written.iter().copied().collect();
    assert_eq!(unique, (1..=600).collect(), "every item");
    assert_eq!(written.len(), 600, "and each once");
    // JetStream dropped the frames the second process made again: the sink never saw them.
    let skipped: u64 = reports.values().map(|s| s.duplicates_skipped).sum();
    assert_eq!(skipped, 0, "the sink had to drop copies: {reports:?}");
    assert_eq!(reports.values().map(|s| s.processed).sum::<u64>(), 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_comes_alone_is_not_held_back_for_company() {
    let mut h = harness(&pipeline(
        "framelone",
        r#"  sources: [{name: src, generator: {count: 6, ratePerSecond: 2}}]
  stages:
    - {name: copy, passthrough: {}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start("copy");
    h.start("out");
    h.start("src");
    let out = h.path("out.jsonl");
    let started = Instant::now();
    let mut arrivals = Vec::new();
    while arrivals.len() < 6 {
        let n = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count();
        while arrivals.len() < n {
            arrivals.push(started.elapsed());
        }
        assert!(started.elapsed() < LIMIT, "{} items after {LIMIT:?}", n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.stop().await;
    // The source makes one item every 500 ms: each reaches the sink before the next is made, so the
    // items arrive spread out, not together once a frame would have filled.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        arrivals[5] - arrivals[0] >= Duration::from_millis(1500),
        "{arrivals:?}"
    );
    assert!(
        gaps.iter().all(|g| *g < Duration::from_millis(1200)),
        "{gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_after_storing_frames_resumes_without_storing_an_item_twice() {
    let mut h = harness(&pipeline(
        "framesource",
        // At this rate the generator waits for the clock every millisecond or so and stores what
        // it made meanwhile: frames of a few items each, cut by timing, which a restart cuts
        // elsewhere. At most 16 items each (the copy stage's concurrency): on a loaded machine the
        // generator fell far behind, frames grew to hundreds of items, and the first run finished
        // its 3,000 in fewer than the 40 messages it was to die after.
        r#"  sources: [{name: src, generator: {count: 3000, ratePerSecond: 20000}}]
  stages:
    - {name: copy, passthrough: {}, concurrency: 16}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.killed_after_stored("src", "first", "40").await;
    let before = stored_items(&h, 1).await;
    assert!(
        before.len() >= 40 && before.iter().filter(|&&n| n > 1).count() >= 10,
        "the first run stored no frames: {before:?}"
    );
    let copy = h.watch_stats("copy").await;
    let sink = h.watch_stats("out").await;
    h.start("copy");
    h.start("out");
    h.spawn("src", "second");
    let lines = h.wait_for_lines(&h.path("out.jsonl"), 3000, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let copied = settled_reports(&copy, Duration::from_secs(5), |r| {
        r.values().map(|s| s.processed).sum::<u64>() >= 3000
    })
    .await;
    let written = settled_reports(&sink, Duration::from_secs(5), |r| {
        r.values().map(|s| s.processed).sum::<u64>() >= 3000
    })
    .await;
    h.stop().await;
    let seqs = seqs(&lines);
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique, (1..=3000).collect(), "every item");
    assert_eq!(seqs.len(), 3000, "and each once");
    // Nothing reached the stream twice: not the copy unit, not the sink.
    assert_eq!(
        copied.values().map(|s| s.processed).sum::<u64>(),
        3000,
        "{copied:?}"
    );
    assert_eq!(
        written.values().map(|s| s.duplicates_skipped).sum::<u64>(),
        0,
        "{written:?}"
    );
    assert!(
        h.log_of("src", "second").contains("finished"),
        "{}",
        h.log_of("src", "second")
    );
}
