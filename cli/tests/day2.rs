//! The day-2 commands as a user runs them, on a real local run: dead letters listed, replayed after the
//! cause is fixed and processed by `run --resume` exactly once; a tap during a run; a trace; pause and
//! resume of a run in progress; the graph.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use switchyard_e2e::run::{BackgroundRun, Tally};
use switchyard_e2e::{binary, line_count};

fn switchyard(dir: &Path, args: &[&str]) -> Output {
    Command::new(binary("switchyard"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run switchyard")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let output = switchyard(dir, args);
    assert!(
        output.status.success(),
        "switchyard {args:?} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Orders 1..=1000; the charge step declines every seventh, except those the file `fixed` lets
/// through: it holds the highest order number the fix covers.
const FLAKY: &str = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: flaky}
spec:
  sources:
    - name: orders
      generator: {count: 1000, payload: '{"n": {{seq}}}'}
  stages:
    - name: shop
      stages:
        - name: price
          jq: '. + {price: (.n * 3)}'
        - name: charge
          exec:
            command:
              - python3
              - -c
              - |
                import json, os, sys
                for line in sys.stdin:
                    msg = json.loads(line)
                    n = msg["data"]["n"]
                    fixed = int(open("fixed").read()) if os.path.exists("fixed") else 0
                    if n % 7 == 0 and n > fixed:
                        out = {"id": msg["id"], "error": "card declined for order %d" % n}
                    else:
                        out = {"id": msg["id"], "outputs": [dict(msg["data"], charged=True)]}
                    print(json.dumps(out), flush=True)
  sinks:
    - name: ledger
      file: {path: charged.jsonl}
"#;

fn dead_letters(dir: &Path) -> Vec<serde_json::Value> {
    json_lines(&ok(dir, &["dlq", "show", "p.yaml", "--json"]))
}

#[test]
fn dead_letters_are_listed_replayed_and_reach_the_sink_once_after_the_fix() {
    let mut run = BackgroundRun::start(FLAKY, &[], &[]);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    let dir = run.dir.path().to_path_buf();
    let declined: Vec<u64> = (1..=1000).filter(|n| n % 7 == 0).collect();
    assert_eq!(
        line_count(&dir.join("charged.jsonl")),
        1000 - declined.len()
    );
    assert!(
        dir.join(".switchyard/flaky/nats").is_dir(),
        "the run keeps its store beside the file"
    );

    let list = ok(&dir, &["dlq", "list", "p.yaml"]);
    assert!(list.contains("flaky: 142 dead letters"), "{list}");
    assert!(list.contains("card declined for order #"), "{list}");
    let groups = json_lines(&ok(&dir, &["dlq", "list", "p.yaml", "--json"]));
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["count"], 142);
    assert_eq!(groups[0]["stage"], "shop > charge");
    let status = ok(&dir, &["status", "p.yaml"]);
    let dead = |unit: &str| {
        status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(unit))
            .and_then(|l| l.split_whitespace().nth(5))
            .map(str::to_string)
    };
    assert_eq!(dead("shop").as_deref(), Some("142"), "{status}");
    assert_eq!(dead("ledger").as_deref(), Some("0"), "{status}");
    let letters = dead_letters(&dir);
    assert_eq!(letters.len(), 142);
    let first = &letters[0];
    assert_eq!(first["unit"], "shop");
    assert_eq!(first["origin"], "orders");
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["path"], "orders,shop");
    // What failed is the input of the failed step: priced, not charged.
    let n = first["data"]["n"].as_u64().expect("the order number");
    assert_eq!(first["data"]["price"].as_u64(), Some(n * 3));
    assert!(first["data"].get("charged").is_none());
    assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let limited = json_lines(&ok(
        &dir,
        &[
            "dlq", "show", "p.yaml", "--json", "--limit", "3", "--since", "1h", "--stage", "charge",
        ],
    ));
    assert_eq!(limited.len(), 3);
    assert!(json_lines(&ok(
        &dir,
        &["dlq", "show", "p.yaml", "--json", "--unit", "ledger"]
    ))
    .is_empty());

    // Purging asks first; with nobody to answer, nothing goes.
    let refused = switchyard(&dir, &["dlq", "purge", "p.yaml"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(dead_letters(&dir).len(), 142);

    let failed = ok(&dir, &["trace", "p.yaml", "orders:14"]);
    assert!(
        failed.contains("dead-lettered at shop > charge: card declined for order 14"),
        "{failed}"
    );
    let passed = ok(&dir, &["trace", "p.yaml", "orders:15"]);
    assert!(
        passed.contains("orders") && passed.contains("published 1"),
        "{passed}"
    );
    assert!(passed.contains("ended: sink ledger"), "{passed}");

    // A fix for the orders up to 500: those replayed above it fail again and go back to the queue.
    std::fs::write(dir.join("fixed"), "500").unwrap();
    let replayed = ok(&dir, &["dlq", "replay", "p.yaml"]);
    assert!(
        replayed.contains("replayed 142 dead letters (142 into shop)"),
        "{replayed}"
    );
    assert!(replayed.contains("run p.yaml --resume"), "{replayed}");
    assert!(
        dead_letters(&dir).is_empty(),
        "a replayed letter leaves the queue"
    );
    run.again(&["--resume"]);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    let again = dead_letters(&dir);
    let above: Vec<u64> = declined.iter().copied().filter(|n| *n > 500).collect();
    let mut again_n: Vec<u64> = again
        .iter()
        .filter_map(|d| d["data"]["n"].as_u64())
        .collect();
    again_n.sort();
    assert_eq!(
        again_n, above,
        "only those the fix does not cover fail again"
    );
    assert!(again.iter().all(|d| d["replays"] == 1), "{again:?}");

    // The three oldest given up on: by time (`--since`), so one by one; the rest as a whole.
    let purged = ok(
        &dir,
        &[
            "dlq", "purge", "p.yaml", "--since", "1h", "--limit", "3", "--yes",
        ],
    );
    assert!(purged.contains("purged 3 dead letters"), "{purged}");
    let numbers = |letters: &[serde_json::Value]| -> Vec<u64> {
        letters
            .iter()
            .filter_map(|d| d["data"]["n"].as_u64())
            .collect()
    };
    let mut given_up = numbers(&again[..3]);
    assert_eq!(
        numbers(&dead_letters(&dir)),
        numbers(&again[3..]),
        "the oldest three went"
    );

    std::fs::write(dir.join("fixed"), "1000").unwrap();
    ok(&dir, &["dlq", "replay", "p.yaml", "--unit", "shop"]);
    run.again(&["--resume"]);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    let charged = Tally::of(&dir.join("charged.jsonl"), "n", 1000);
    given_up.sort();
    assert_eq!(charged.lost, given_up, "all but the purged, once");
    assert!(charged.duplicated.is_empty(), "{:?}", charged.duplicated);
    assert!(dead_letters(&dir).is_empty());
    let list = ok(&dir, &["dlq", "list", "p.yaml"]);
    assert!(list.contains("flaky: 0 dead letters"), "{list}");
    let twice = ok(&dir, &["trace", "p.yaml", "orders:994"]);
    assert!(twice.contains("(replay 2)"), "{twice}");
    assert!(twice.contains("ended: sink ledger"), "{twice}");

    // A fresh run forgets it all.
    std::fs::remove_file(dir.join("fixed")).unwrap();
    run.again(&[]);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    assert_eq!(dead_letters(&dir).len(), 142);
    assert_eq!(
        line_count(&dir.join("charged.jsonl")),
        1000 - declined.len()
    );
}

/// Two units whose dead letters share one subject, interleaved: every tenth order has no price,
/// every tenth from the fifth no box. Enough letters that a reading outlasts what the server sends
/// at once, so that letters stored again during it would be read again if it did not end where it
/// began.
const SHARED_SUBJECT: &str = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: mixed}
spec:
  deadLetter: {subject: failures}
  sources:
    - name: orders
      generator: {count: 10000, payload: '{"n": {{seq}}}'}
  stages:
    - name: price
      stages:
        - name: quote
          jq: 'if .n % 10 == 0 then error("no price for order \(.n)") else . end'
    - name: pack
      stages:
        - name: box
          jq: 'if .n % 10 == 5 then error("no box for order \(.n)") else . end'
  sinks:
    - name: out
      file: {path: out.jsonl}
"#;

/// What a dead letter is to its user, not where it is stored.
fn identity(letter: &serde_json::Value) -> (String, String, String, String) {
    (
        letter["id"].to_string(),
        letter["time"].to_string(),
        letter["data"].to_string(),
        letter["error"].to_string(),
    )
}

/// Letters that stay among letters that go on one subject are stored again, so that the subject
/// can be purged in one request instead of deleting each letter that goes (1.5 ms or more each): what
/// stays keeps its id, time, data and order, and is read once.
#[test]
fn letters_that_stay_among_those_that_go_keep_their_id_time_and_order() {
    let mut run = BackgroundRun::start(SHARED_SUBJECT, &[], &[]);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    let dir = run.dir.path().to_path_buf();
    let before = dead_letters(&dir);
    assert_eq!(before.len(), 2000);
    let pack_before: Vec<_> = before
        .iter()
        .filter(|d| d["unit"] == "pack")
        .map(identity)
        .collect();
    assert_eq!(pack_before.len(), 1000);

    // Old enough that a letter taken for stored at the replay would show below.
    std::thread::sleep(Duration::from_secs(3));
    // `pack` renamed: its letters cannot be replayed, `price`'s can. In windows of 256, each
    // window's `pack` letters are stored again and the subject purged below them.
    let renamed = SHARED_SUBJECT.replace("name: pack", "name: packing");
    std::fs::write(dir.join("p.yaml"), renamed).unwrap();
    let replay = switchyard(&dir, &["dlq", "replay", "p.yaml"]);
    let said = text(&replay.stdout);
    assert!(!replay.status.success(), "letters were kept: {said}");
    assert!(
        said.contains("replayed 1000 dead letters (1000 into price)"),
        "{said}"
    );
    assert!(
        said.contains("kept 1000 dead letters")
            && said.contains("unit `pack` is not in the Pipeline"),
        "each kept letter is counted once: {said}"
    );
    let after = dead_letters(&dir);
    assert_eq!(
        after.iter().map(identity).collect::<Vec<_>>(),
        pack_before,
        "the kept letters as they were, in their order"
    );
    // The seqs the replay named are where the letters are now.
    let seqs: Vec<u64> = after.iter().filter_map(|d| d["seq"].as_u64()).collect();
    let named = said
        .lines()
        .find(|l| l.starts_with("kept 1000"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|first| {
            first
                .trim_start_matches('#')
                .trim_end_matches(',')
                .parse::<u64>()
                .ok()
        })
        .expect("the first kept letter named");
    assert!(seqs.contains(&named), "#{named} is not among {seqs:?}");
    // By their own time, not the time they were stored again.
    let listed = ok(&dir, &["dlq", "list", "p.yaml", "--since", "1h"]);
    assert!(listed.contains("mixed: 1000 dead letters"), "{listed}");
    let older = ok(&dir, &["dlq", "list", "p.yaml", "--since", "2s"]);
    assert!(older.contains("mixed: 0 dead letters"), "{older}");

    ok(&dir, &["dlq", "purge", "p.yaml", "--yes"]);
    assert!(dead_letters(&dir).is_empty());
}

/// 3,000 items at 300 a second: about ten seconds to tap, pause and resume in.
const SLOW: &str = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: slow}
spec:
  sources:
    - name: ticks
      generator: {count: 3000, ratePerSecond: 300, payload: '{"n": {{seq}}}'}
  stages:
    - name: double
      jq: '. + {twice: (.n * 2)}'
  sinks:
    - name: out
      file: {path: out.jsonl}
"#;

#[test]
fn a_tap_changes_nothing_and_a_paused_run_drains_stops_and_resumes() {
    let mut run = BackgroundRun::start(SLOW, &[], &[]);
    run.wait_for_lines("out.jsonl", 300);
    let dir = run.dir.path().to_path_buf();

    let tapped = json_lines(&ok(&dir, &["tap", "p.yaml", "double", "--count", "5"]));
    assert_eq!(tapped.len(), 5);
    for record in &tapped {
        assert_eq!(record["subject"], "switchyard.default.slow.data.ticks");
        assert_eq!(record["headers"]["Switchyard-Origin"], "ticks");
        assert!(record["data"]["n"].is_u64(), "{record}");
        assert!(
            record["data"].get("twice").is_none(),
            "the input edge, before the step"
        );
    }
    let doubled = ok(
        &dir,
        &[
            "tap",
            "p.yaml",
            "double",
            "--output",
            "--count",
            "3",
            "--filter",
            "select(.data.twice % 2 == 0) | .data.twice",
        ],
    );
    let values: Vec<u64> = doubled.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(values.len(), 3, "{doubled}");
    assert!(values.iter().all(|v| v % 2 == 0 && *v > 0));
    let unknown = switchyard(&dir, &["tap", "p.yaml", "nowhere"]);
    assert!(text(&unknown.stderr).contains("no unit `nowhere`: its units are ticks, double, out"));

    let status = ok(&dir, &["status", "p.yaml"]);
    assert!(status.contains("the run in progress"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with("double") && l.contains("group")),
        "{status}"
    );

    let paused = ok(&dir, &["pause", "p.yaml"]);
    assert!(paused.contains("sources stopped (ticks)"), "{paused}");
    run.wait_for_note("paused: every unit drained and stopped");
    let held = line_count(&run.path("out.jsonl"));
    assert!(held < 3000, "paused before the end: {held}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        line_count(&run.path("out.jsonl")),
        held,
        "nothing moves while paused"
    );
    assert!(ok(&dir, &["pause", "p.yaml"]).contains("already paused"));
    let status = ok(&dir, &["status", "p.yaml"]);
    assert!(
        status
            .lines()
            .skip(3)
            .take_while(|l| !l.trim().is_empty())
            .all(|l| l.split_whitespace().nth(2) == Some("0")),
        "no replica while paused:\n{status}"
    );
    // Drained: every edge is settled, and what each unit stored the next took in.
    assert!(
        status.contains("The books balance") && status.contains("ticks → double"),
        "{status}"
    );
    let resumed = ok(&dir, &["resume", "p.yaml"]);
    assert!(resumed.contains("resumed"), "{resumed}");
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.notes()
    );
    Tally::of(&run.path("out.jsonl"), "n", 3000).assert_exactly_once(3000);
    let summary = run.output();
    assert!(
        summary.contains("3,000 from sources, 3,000 at sinks, 0 dead-lettered"),
        "the taps took nothing from the pipeline:\n{summary}"
    );
    let gone = switchyard(&dir, &["pause", "p.yaml"]);
    assert!(
        text(&gone.stderr).contains("no run of p.yaml is in progress"),
        "{}",
        text(&gone.stderr)
    );

    let trace = ok(&dir, &["trace", "p.yaml", "ticks:2999"]);
    assert!(trace.contains("ended: sink out"), "{trace}");
}

#[test]
fn the_graph_is_mermaid_dot_or_svg_with_the_last_runs_counts() {
    let mut run = BackgroundRun::start(
        &SLOW.replace("count: 3000, ratePerSecond: 300", "count: 400"),
        &[],
        &[],
    );
    let dir = run.dir.path().to_path_buf();
    let before = ok(&dir, &["graph", "p.yaml", "--format", "svg"]);
    assert!(!before.contains(">400<"), "no counts before a run");
    assert!(
        run.wait(Duration::from_secs(60)).success(),
        "{}",
        run.notes()
    );
    let mermaid = ok(&dir, &["graph", "p.yaml"]);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(
        mermaid.contains("u_ticks -- \"400\" --> u_double"),
        "{mermaid}"
    );
    let dot = ok(&dir, &["graph", "p.yaml", "--format", "dot"]);
    assert!(
        dot.contains("\"double\" -> \"out\" [label=\"400\"]"),
        "{dot}"
    );
    let svg = ok(&dir, &["graph", "p.yaml", "--format", "svg"]);
    assert_eq!(svg.matches(">400</text>").count(), 2, "{svg}");
    std::fs::write(dir.join("graph.svg"), &svg).unwrap();
    std::fs::write(dir.join("graph.dot"), &dot).unwrap();
    // Both render: the SVG is well-formed XML, and Graphviz draws the DOT.
    let parsed = Command::new("python3")
        .args(["-c", "import sys, xml.dom.minidom as m; d = m.parse(sys.argv[1]); print(len(d.getElementsByTagName('rect')))"])
        .arg(dir.join("graph.svg"))
        .output()
        .expect("python3");
    assert_eq!(text(&parsed.stdout).trim(), "3", "{}", text(&parsed.stderr));
    // scripts/test installs Graphviz.
    let drawn = Command::new("dot")
        .args(["-Tsvg", "-o"])
        .arg(dir.join("dot.svg"))
        .arg(dir.join("graph.dot"))
        .output()
        .expect("Graphviz's `dot` (scripts/test installs it)");
    assert!(drawn.status.success(), "{}", text(&drawn.stderr));
    assert!(std::fs::read_to_string(dir.join("dot.svg"))
        .unwrap()
        .contains("<svg"));
}
