//! The books against a real nats-server: every input recorded once however often it comes, every
//! item accounted for, and an item that goes missing on an edge named with the edge and the count.

mod common;

use std::time::{Duration, Instant};

use common::{harness, Harness};
use switchyard_crds::books::{check, route, wiring, Books, Counts, Edge, Imbalance, FROM_SOURCE};

const LIMIT: Duration = Duration::from_secs(60);

fn pipeline(name: &str, body: &str) -> String {
    format!("apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n{body}")
}

/// Waits until the books say `done`.
async fn books_until(h: &Harness, what: &str, done: impl Fn(&Books) -> bool) -> Books {
    let started = Instant::now();
    loop {
        let books = h.books().await;
        if done(&books) {
            return books;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{what}: not after {LIMIT:?}: {books:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `items` lines are in the sink's file, nothing is pending, and the sink recorded
/// taking them in; stops the units and returns the books.
async fn books_once_through(h: &mut Harness, items: u64) -> Books {
    h.wait_for_lines(&h.path("out.jsonl"), items as usize, LIMIT)
        .await;
    h.wait_until_drained(LIMIT).await;
    let books = books_until(h, "the sink recorded what came", |b| {
        b.total("out").received >= items
    })
    .await;
    h.stop().await;
    books
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_killed_between_storing_and_acknowledging_are_recorded_once() {
    let mut h = harness(&pipeline(
        "bookskill",
        r#"  nats: {redeliverAfter: 1s}
  sources: [{name: src, generator: {count: 600}}]
  stages:
    - {name: copy, passthrough: {}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    // The source dies once its second message and that message's record are stored, before its
    // checkpoint says so: the next process stores both again, and the stream keeps one of each.
    h.killed_after_stored("src", "killed", "2").await;
    h.spawn("src", "again");
    books_until(&h, "the source stored its items", |b| {
        b.total("src").out >= 600
    })
    .await;
    h.start("out");
    // The unit dies once an input's outputs and its record are stored, before the input is
    // acknowledged: the input comes again to the next process, which records it again.
    h.killed_after_stored("copy", "killed", "2").await;
    h.spawn("copy", "again");
    let books = books_once_through(&mut h, 600).await;
    assert_eq!(
        check(&wiring(&h.layout.units), &books),
        Vec::new(),
        "{books:?}"
    );
    assert_eq!(
        books.units["src"][&route(FROM_SOURCE, "src")],
        Counts {
            out: 600,
            ..Counts::default()
        }
    );
    assert_eq!(
        books.units["copy"][&route("src", "copy")],
        Counts {
            received: 600,
            passed: 600,
            out: 600,
            ..Counts::default()
        }
    );
    assert_eq!(
        books.units["out"][&route("copy", "")],
        Counts {
            received: 600,
            passed: 600,
            out: 600,
            ..Counts::default()
        }
    );
    // Both dead processes' records stay on their own subjects, beside the roll-ups of the others.
    let read = switchyard_platform::books::read(
        &h.js,
        &h.layout.nats.books.name,
        &format!("{}.>", h.config("src").books.expect("books").prefix),
    )
    .await
    .expect("read");
    assert_eq!(read.by_subject.len(), 2, "{:?}", read.by_subject.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_and_dead_lettered_items_are_accounted_for() {
    let mut h = harness(&pipeline(
        "booksfates",
        r#"  sources: [{name: src, generator: {count: 100}}]
  stages:
    - name: sort
      jq: 'if .seq % 10 == 0 then error("\(.seq) is bad") elif .seq % 3 == 0 then empty else . end'
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start_all();
    // 10 multiples of ten fail; 30 multiples of three that are not are dropped; 60 go on.
    let books = books_once_through(&mut h, 60).await;
    assert_eq!(
        check(&wiring(&h.layout.units), &books),
        Vec::new(),
        "{books:?}"
    );
    assert_eq!(
        books.total("sort"),
        Counts {
            received: 100,
            passed: 60,
            filtered: 30,
            dead_lettered: 10,
            out: 60,
            duplicates: 0,
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_removed_from_an_edge_unbalances_the_books_by_its_items() {
    let mut h = harness(&pipeline(
        "bookslost",
        r#"  sources: [{name: src, generator: {count: 100}}]
  stages:
    - {name: copy, passthrough: {}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    h.start("src");
    books_until(&h, "the source stored its items", |b| {
        b.total("src").out >= 100
    })
    .await;
    // Behind the Pipeline's back, as a lost write or a wrong deduplication would: the first
    // message on the edge goes before anyone took it in.
    let stream =
        h.js.get_stream(&h.layout.nats.stream.name)
            .await
            .expect("stream");
    let first = stream.cached_info().state.first_sequence;
    let message = stream.get_raw_message(first).await.expect("the first");
    let items = switchyard_platform::frame::frame_count(Some(&message.headers))
        .map_or(1, |n| n.expect("a count")) as u64;
    assert!(stream.delete_message(first).await.expect("deleted"));
    h.start("copy");
    h.start("out");
    let books = books_once_through(&mut h, 100 - items).await;
    let found = check(&wiring(&h.layout.units), &books);
    assert_eq!(
        found,
        vec![Imbalance::Edge(Edge {
            from: "src".into(),
            epoch: 0,
            to: "copy".into(),
            out: 100,
            received: 100 - items,
        })]
    );
    assert_eq!(
        found[0].to_string(),
        format!(
            "src → copy: src stored 100 items, copy took in {}: {items} lost on the way",
            100 - items
        )
    );
}
