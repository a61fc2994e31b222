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

/// A nats-server that restarts rebuilds its duplicate window from the messages it still holds: a
/// record that a roll-up had folded away was forgotten, so the same input recorded again after the
/// restart (its redelivery, or its writer's outputs stored again) counted twice. `switchyard-bench
/// peer` met it: a SIGKILLed run resumed with "256 taken in twice" and every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_recorded_again_after_a_roll_up_and_a_server_restart_counts_once() {
    let (mut h, config) = copy_books("booksrestart").await;
    let (_connected, disconnects) = tokio::sync::watch::channel(0u64);
    let ledger = copy_ledger(&h, &config, "copy-1", disconnects);
    let edge = || route("src", "copy");
    ledger.record("m1", edge(), taken(256)).await.expect("m1");
    ledger.record("m2", edge(), taken(100)).await.expect("m2");
    ledger.roll_up().await.expect("roll-up");
    tokio::task::block_in_place(|| h.nats.restart()).expect("restart");
    // The client reconnects by itself; the record goes out once it has.
    let started = Instant::now();
    while let Err(e) = ledger.record("m1", edge(), taken(256)).await {
        assert!(
            started.elapsed() < LIMIT,
            "no record after the restart: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ledger.roll_up().await.expect("roll-up after the restart");
    assert_eq!(h.books().await.total("copy"), taken(356));
    h.stop().await;
}

/// A roll-up removes the records it summed only once they are older than the stream's duplicate
/// window (here shortened to a second): the books read the same before and after, and the subject
/// keeps a roll-up and the records of the last window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summed_records_go_once_they_are_older_than_the_duplicate_window() {
    let (mut h, config) = copy_books("bookswindow").await;
    let mut stream = h.js.get_stream(&config.stream).await.expect("books stream");
    let mut shortened = stream.cached_info().config.clone();
    shortened.duplicate_window = Duration::from_secs(1);
    h.js.update_stream(shortened)
        .await
        .expect("shorten the window");
    let (_connected, disconnects) = tokio::sync::watch::channel(0u64);
    let ledger = copy_ledger(&h, &config, "copy-1", disconnects);
    let subject = format!("{}.copy-1", config.prefix);
    let roll_up = || switchyard_platform::books::roll_up(&h.js, &config.stream, &subject);
    for key in ["m1", "m2"] {
        ledger
            .record(key, route("src", "copy"), taken(5))
            .await
            .expect(key);
    }
    let first = roll_up().await.expect("roll-up");
    assert_eq!((first.summed, first.removed), (2, 0));
    assert_eq!(h.books().await.total("copy"), taken(10));
    let sum = switchyard_crds::books::sum_subject(&subject);
    assert_eq!(
        messages_by_subject(&mut stream, &config.prefix).await,
        [(subject.clone(), 2), (sum.clone(), 1)].into()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ledger
        .record("m3", route("src", "copy"), taken(5))
        .await
        .expect("m3");
    let second = roll_up().await.expect("roll-up");
    assert_eq!((second.summed, second.removed), (1, 2));
    assert_eq!(h.books().await.total("copy"), taken(15));
    assert_eq!(
        messages_by_subject(&mut stream, &config.prefix).await,
        [(subject.clone(), 1), (sum, 1)].into()
    );
    h.stop().await;
}

/// How many messages the books stream holds on each subject under `prefix`.
async fn messages_by_subject(
    stream: &mut async_nats::jetstream::stream::Stream,
    prefix: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut info = stream
        .info_with_subjects(format!("{prefix}.>"))
        .await
        .expect("subjects");
    let mut counts = std::collections::BTreeMap::new();
    while let Some(entry) = futures::StreamExt::next(&mut info).await {
        let (subject, count) = entry.expect("a subject");
        counts.insert(subject, count);
    }
    counts
}

/// What a stopped replica leaves (its last window's records beside its roll-up) and what a killed
/// one leaves (records nobody summed) are rolled up by whoever reads the books once the window has
/// passed: the books read the same, and each subject keeps one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_stopped_recording_are_rolled_up_once_their_window_has_passed() {
    let (mut h, config) = copy_books("booksidle").await;
    let mut stream = h.js.get_stream(&config.stream).await.expect("books stream");
    let mut shortened = stream.cached_info().config.clone();
    let window = Duration::from_secs(1);
    shortened.duplicate_window = window;
    h.js.update_stream(shortened)
        .await
        .expect("shorten the window");
    let (_connected, disconnects) = tokio::sync::watch::channel(0u64);
    let ledger = |replica| copy_ledger(&h, &config, replica, disconnects.clone());
    let (stopped, killed) = (ledger("copy-stopped"), ledger("copy-killed"));
    for key in ["m1", "m2"] {
        stopped
            .record(key, route("src", "copy"), taken(5))
            .await
            .expect(key);
    }
    stopped.roll_up().await.expect("the roll-up as it stops");
    killed
        .record("m3", route("src", "copy"), taken(5))
        .await
        .expect("m3");
    let subject = |replica| format!("{}.{replica}", config.prefix);
    let sum = |replica| switchyard_crds::books::sum_subject(&subject(replica));
    assert_eq!(
        messages_by_subject(&mut stream, &config.prefix).await,
        [
            (subject("copy-killed"), 1),
            (subject("copy-stopped"), 2),
            (sum("copy-stopped"), 1)
        ]
        .into()
    );
    let filter = format!("{}.>", config.prefix);
    let read = || switchyard_platform::books::read(&h.js, &config.stream, &filter);
    // Within the window nothing is idle yet.
    let within = read().await.expect("read");
    let removed =
        switchyard_platform::books::roll_up_idle(&h.js, &config.stream, &within, window).await;
    assert_eq!(removed.expect("roll-up"), 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = read().await.expect("read");
    let removed =
        switchyard_platform::books::roll_up_idle(&h.js, &config.stream, &after, window).await;
    assert_eq!(removed.expect("roll-up"), 3);
    assert_eq!(
        messages_by_subject(&mut stream, &config.prefix).await,
        [(sum("copy-killed"), 1), (sum("copy-stopped"), 1)].into()
    );
    assert_eq!(h.books().await.total("copy"), taken(15));
    h.stop().await;
}

/// A Pipeline whose `copy` unit's books a test writes itself, and where they go.
async fn copy_books(name: &str) -> (Harness, switchyard_crds::unit::BooksConfig) {
    let h = harness(&pipeline(
        name,
        r#"  sources: [{name: src, generator: {count: 10}}]
  stages:
    - {name: copy, passthrough: {}}
  sinks: [{name: out, file: {path: "{dir}/out.jsonl"}}]
"#,
    ))
    .await;
    let config = h.config("copy").books.expect("books");
    (h, config)
}

/// The ledger a `copy` process named `replica` would keep.
fn copy_ledger(
    h: &Harness,
    config: &switchyard_crds::unit::BooksConfig,
    replica: &str,
    disconnects: tokio::sync::watch::Receiver<u64>,
) -> switchyard_stage::books::Ledger {
    switchyard_stage::books::Ledger::new(
        h.js.clone(),
        config.stream.clone(),
        &config.prefix,
        "copy",
        replica,
        disconnects,
    )
}

/// `items` taken in and passed on.
fn taken(items: u64) -> Counts {
    Counts {
        received: items,
        passed: items,
        out: items,
        ..Counts::default()
    }
}
