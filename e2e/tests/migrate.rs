//! `switchyard run --watch`: a Pipeline edited while a continuous generator feeds it. Every item
//! reaches the sink exactly once, each shaped by the definitions in force where it was processed.

use std::collections::BTreeMap;
use std::time::Duration;

use switchyard_e2e::run::BackgroundRun;

const ITEMS: u64 = 60_000;
const LIMIT: Duration = Duration::from_secs(240);

fn spec(generator: &str, stages: &[&str]) -> String {
    let mut yaml = format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: edited}}\nspec:\n  sources: [{{name: gen, generator: {generator}}}]\n  stages:\n"
    );
    for stage in stages {
        yaml.push_str(&format!("    - {stage}\n"));
    }
    yaml.push_str("  sinks: [{name: out, file: {path: out.jsonl}}]\n");
    yaml
}

const A: &str = "{name: a, jq: '.a = true'}";
const INS: &str = "{name: ins, jq: '.ins = true'}";
const B: &str = "{name: b, jq: '.b = true'}";
const C: &str = "{name: c, jq: '.c = true'}";

/// The units an item passed, read off the fields the jq stages added, in flow order.
fn path_of(item: &serde_json::Value) -> Vec<&'static str> {
    let mut path = vec!["gen"];
    for unit in ["a", "ins", "b", "c"] {
        if item.get(unit).is_some() {
            path.push(unit);
        }
    }
    path.push("out");
    path
}

/// Whether each hop of `path` is an edge of some spec, none older than the hop before it's.
fn monotone(path: &[&str], specs: &[Vec<&str>]) -> bool {
    let mut since = 0;
    for hop in path.windows(2) {
        match (since..specs.len()).find(|&k| specs[k].windows(2).any(|edge| edge == hop)) {
            Some(k) => since = k,
            None => return false,
        }
    }
    true
}

#[test]
fn three_edits_while_it_runs_lose_and_double_nothing() {
    // 30 s of items: room for three edits with thousands of items between them, even on a busy machine.
    let generator = format!("{{count: {ITEMS}, ratePerSecond: 2000}}");
    let stages: [Vec<&str>; 4] = [
        vec![A, B],
        // Insert a jq stage between two units.
        vec![A, INS, B],
        // Remove a stage.
        vec![INS, B],
        // Rewire the sink to a new stage.
        vec![INS, B, C],
    ];
    let paths: Vec<Vec<&str>> = stages
        .iter()
        .map(|s| {
            let mut p = vec!["gen"];
            p.extend(s.iter().map(|st| {
                ["a", "ins", "b", "c"]
                    .into_iter()
                    .find(|u| st.contains(&format!("name: {u},")))
                    .unwrap()
            }));
            p.push("out");
            p
        })
        .collect();
    let mut run = BackgroundRun::start(&spec(&generator, &stages[0]), &["--watch"], &[]);
    run.wait_for_lines("out.jsonl", 3_000);
    for (n, stages) in stages.iter().enumerate().skip(1) {
        std::fs::write(run.path("p.yaml"), spec(&generator, stages)).unwrap();
        run.wait_for_note(&format!("edit {n} done"));
        // Items flow through each spec for a while before the next edit.
        let now = switchyard_e2e::line_count(&run.path("out.jsonl")) as u64;
        run.wait_for_lines("out.jsonl", (now + 6_000).min(ITEMS) as usize);
    }
    let status = run.wait(LIMIT);
    let notes = run.notes();
    assert!(status.success(), "{notes}\n{}", run.output());
    assert!(
        run.output()
            .contains("60,000 from sources, 60,000 at sinks, 0 dead-lettered"),
        "{}",
        run.output()
    );

    let text = std::fs::read_to_string(run.path("out.jsonl")).unwrap();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut by_path: BTreeMap<Vec<&str>, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let item: serde_json::Value = serde_json::from_str(line).unwrap();
        let seq = item["seq"].as_u64().unwrap();
        *seen.entry(seq).or_default() += 1;
        let path = path_of(&item);
        assert!(
            monotone(&path, &paths),
            "item {seq} went {path:?}, which no sequence of the specs in force makes"
        );
        by_path.entry(path).or_default().push(seq);
    }
    let lost: Vec<u64> = (1..=ITEMS).filter(|s| !seen.contains_key(s)).collect();
    let doubled: Vec<(&u64, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(
        (lost.len(), doubled.len()),
        (0, 0),
        "lost {lost:?}, doubled {doubled:?}"
    );
    // Every spec carried items from end to end, and later specs took later items.
    let mut medians = Vec::new();
    for path in &paths {
        let seqs = by_path
            .get(path)
            .unwrap_or_else(|| panic!("no item went {path:?}: {by_path:?}"));
        medians.push(seqs[seqs.len() / 2]);
    }
    assert!(
        medians.windows(2).all(|m| m[0] < m[1]),
        "items of later specs are later items: medians {medians:?}"
    );
    // Each step was printed, with what it did.
    for words in [
        "edit 1 step 3/7: start ins",
        "roll a (publishes to switchyard.default.edited.data.a_1 from now on)",
        "edit 2 step 4/7: drain a: wait until its queue is empty",
        "edit 3 step 3/7: start c",
    ] {
        assert!(notes.contains(words), "no `{words}` in:\n{notes}");
    }
    eprintln!(
        "{}",
        by_path
            .iter()
            .map(|(p, s)| format!("{}: {}", p.join(" > "), s.len()))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The same, with the items in frames: a generator fast enough that each message holds many, and
/// a stage inserted while they flow. Its frames go on being cut and read across the edit, and each
/// item still reaches the sink once.
#[test]
fn items_in_frames_cross_an_edit_once_each() {
    const FAST: u64 = 150_000;
    let generator = format!("{{count: {FAST}, ratePerSecond: 15000}}");
    let mut run = BackgroundRun::start(&spec(&generator, &[A, B]), &["--watch"], &[]);
    run.wait_for_lines("out.jsonl", 15_000);
    // What b reads now: frames, each item a record of its own with its place in the frame.
    let tapped = std::process::Command::new(switchyard_e2e::binary("switchyard"))
        .args(["tap", "p.yaml", "b", "--count", "200"])
        .current_dir(run.dir.path())
        .output()
        .expect("switchyard tap");
    let records = String::from_utf8_lossy(&tapped.stdout).into_owned();
    assert!(
        records.lines().any(|l| l.contains("\"item\":1,")),
        "b's input holds no frames: {records}\n{}",
        String::from_utf8_lossy(&tapped.stderr)
    );
    std::fs::write(run.path("p.yaml"), spec(&generator, &[A, INS, B])).unwrap();
    run.wait_for_note("edit 1 done");
    let status = run.wait(LIMIT);
    assert!(status.success(), "{}\n{}", run.notes(), run.output());
    let tally = switchyard_e2e::run::Tally::of(&run.path("out.jsonl"), "seq", FAST);
    tally.assert_exactly_once(FAST);
    let text = std::fs::read_to_string(run.path("out.jsonl")).unwrap();
    let through_ins = text.lines().filter(|l| l.contains("\"ins\":true")).count();
    assert!(
        through_ins > 0 && through_ins < FAST as usize,
        "{through_ins} items went through the inserted stage"
    );
}

#[test]
fn an_edit_that_would_drop_messages_or_is_invalid_is_refused_and_the_run_goes_on() {
    // A slow stage builds a queue that removing it without draining would drop.
    let slow = "{name: slow, sleep: 2ms, concurrency: 1}";
    let generator = "{count: 3000, ratePerSecond: 3000}";
    let mut run = BackgroundRun::start(&spec(generator, &[slow, B]), &["--watch"], &[]);
    run.wait_for_lines("out.jsonl", 50);
    std::fs::write(run.path("p.yaml"), "spec: [this is not a Pipeline").unwrap();
    run.wait_for_note("edit 1 not applied; the run goes on as it was");
    let lossy =
        spec(generator, &[B]).replace("  sources:", "  migration: {drain: false}\n  sources:");
    std::fs::write(run.path("p.yaml"), lossy).unwrap();
    run.wait_for_note(
        "edit 2 refused, nothing changed: with spec.migration.drain false it would drop",
    );
    let status = run.wait(LIMIT);
    assert!(
        status.success(),
        "{status}\n{}\n{}",
        run.notes(),
        run.output()
    );
    assert!(
        run.output()
            .contains("3,000 from sources, 3,000 at sinks, 0 dead-lettered"),
        "{}",
        run.output()
    );
    let text = std::fs::read_to_string(run.path("out.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3000);
    let notes = run.notes();
    assert!(notes.contains("messages in the queue of slow"), "{notes}");
}
