//! What a NATS failover can leave in the stream, and a source resuming over it without losing an item.
//!
//! When the stream's leader dies, a publish in flight to it is lost while publishes made after it
//! reach the newly elected leader and are stored: the stream holds an item without the one published
//! just before it. A source that then resumes from its checkpoint cannot tell which of its items are
//! stored beyond the checkpoint. These tests put the stream in exactly that state (the items the
//! failover left there, published as the source publishes them) and run the source over it, so the
//! race is met on every run instead of one run in many (issue 38: 12 items lost in one run of three).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::header::HeaderMap;
use common::{harness, json_lines, settled_reports, Harness};
use switchyard_crds::unit::{headers, UnitRole};

const LIMIT: Duration = Duration::from_secs(60);
const TOTAL: u64 = 400;

/// One kind of framing source named `src`, through a passthrough unit to a file.
struct Case {
    source: String,
    /// The key of item `seq` (its id is `src:<key>`).
    key: fn(u64) -> String,
    /// The source's checkpoint once every item up to `seq` is stored.
    checkpoint: fn(u64) -> String,
}

impl Case {
    /// The generator as fast as the stream takes it: waiting items travel in frames.
    fn generator() -> Case {
        Case {
            source: format!("generator: {{count: {TOTAL}}}"),
            key: |seq| seq.to_string(),
            checkpoint: |seq| format!("{{\"at\":{{\"seq\":{seq}}}}}"),
        }
    }

    /// A file's lines: all waiting from the start, in frames as full as the limits allow.
    fn file(dir: &std::path::Path) -> Case {
        let lines: String = (1..=TOTAL).map(|s| format!("{{\"seq\": {s}}}\n")).collect();
        std::fs::write(dir.join("in.jsonl"), lines).expect("the input");
        Case {
            source: format!("file: {{path: \"{}/in.jsonl\"}}", dir.display()),
            key: |seq| format!("in.jsonl:{seq}"),
            checkpoint: |seq| format!("{{\"at\":{{\"file\":\"in.jsonl\",\"line\":{seq}}}}}"),
        }
    }

    async fn harness(&self) -> Harness {
        harness(&format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: failover}}\nspec:\n  sources: [{{name: src, {}}}]\n  stages:\n    - {{name: copy, passthrough: {{}}}}\n  sinks: [{{name: out, file: {{path: \"{{dir}}/out.jsonl\"}}}}]\n",
            self.source
        ))
        .await
    }

    /// Stores item `seq` as its source publishes an item that goes alone.
    async fn store_alone(&self, h: &Harness, seq: u64) {
        let subject = h.config("src").output_subject.expect("a source publishes");
        let key = (self.key)(seq);
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, format!("src:{key}").as_str());
        map.insert(headers::ORIGIN, "src");
        map.insert(headers::ORIGIN_SEQ, key.as_str());
        map.insert(headers::PATH, "src");
        h.js.publish_with_headers(subject, map, format!("{{\"seq\": {seq}}}").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        // And its record in the books, as the source that stored it before it died wrote it.
        let books = h.config("src").books.expect("books");
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, format!("src/src:{key}#1").as_str());
        h.js.publish_with_headers(
            format!("{}.before", books.prefix),
            map,
            r#"{"_source>src":{"out":1}}"#.into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }

    /// Writes the source's checkpoint: every item up to `seq` is stored.
    async fn checkpoint_at(&self, h: &Harness, seq: u64) {
        let UnitRole::Source {
            checkpoint_bucket, ..
        } = h.config("src").role
        else {
            panic!("src is a source")
        };
        let bucket =
            h.js.get_key_value(&checkpoint_bucket)
                .await
                .expect("bucket");
        bucket
            .put("source.src", (self.checkpoint)(seq).into())
            .await
            .expect("checkpoint");
    }

    /// The leader died with item 11 in flight; items 12 and 13, published after it, reached the
    /// new leader. The source checkpointed 10 before it noticed and resumes from there: 11 is new to
    /// the stream, and the items waiting behind it go out in frames again. A frame that began with
    /// item 12 had 12's own message id, and the stream took it for the lone 12 it holds: every other
    /// item of that frame was lost (14 up to the frame's end), and the run ended as if all were well.
    async fn resume_over_a_failover(self, h: &mut Harness) {
        for seq in (1..=10).chain([12, 13]) {
            self.store_alone(h, seq).await;
        }
        self.checkpoint_at(h, 10).await;
        let source = h.watch_stats("src").await;
        h.start_all();
        settled_reports(&source, LIMIT, |r| {
            r.values().map(|s| s.processed).sum::<u64>() >= TOTAL - 10
        })
        .await;
        h.wait_until_drained(LIMIT).await;
        let lines = h.wait_for_lines(&h.path("out.jsonl"), 0, LIMIT).await;
        h.stop().await;
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for value in json_lines(&lines) {
            *counts
                .entry(value["seq"].as_u64().expect("a seq"))
                .or_default() += 1;
        }
        let lost: Vec<u64> = (1..=TOTAL).filter(|s| !counts.contains_key(s)).collect();
        let twice: Vec<u64> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        assert!(
            lost.is_empty(),
            "{} items lost: {:?} … {:?}",
            lost.len(),
            &lost[..lost.len().min(5)],
            lost.last()
        );
        assert!(twice.is_empty(), "written more than once: {twice:?}");
        assert_eq!(lines.len() as u64, TOTAL);
        // The books say so too: a frame the stream took for another would have unbalanced them.
        let books = h.books().await;
        assert_eq!(
            switchyard_crds::books::check(&switchyard_crds::books::wiring(&h.layout.units), &books),
            Vec::new()
        );
        // Items 12 and 13 are stored alone and then again in a frame after 11 (the source cannot
        // know they were stored): the books count them twice on every edge, and the sink's ledger
        // drops the second of each.
        let twice = books.total("src").out - TOTAL;
        assert_eq!(twice, 2, "{books:?}");
        assert_eq!(books.total("out").duplicates, twice, "{books:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_resuming_after_its_stream_stored_a_later_item_than_an_earlier_one_loses_nothing(
) {
    let case = Case::generator();
    let mut h = case.harness().await;
    case.resume_over_a_failover(&mut h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_source_resuming_after_its_stream_stored_a_later_line_than_an_earlier_one_loses_nothing(
) {
    let input = tempfile::tempdir().expect("a folder");
    let case = Case::file(input.path());
    let mut h = case.harness().await;
    case.resume_over_a_failover(&mut h).await;
}
