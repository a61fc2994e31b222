//! Fork and join through `switchyard run` (issue 26): every item forks to three branches (one
//! drops some items, one makes two outputs of each) and the join hands on each item once with all
//! three parts; also with two join replicas and the join's and branches' processes SIGKILLed every
//! 2 s; an item a branch fails or does not answer in time is dead-lettered with what arrived, and
//! its replay waits again with what came since. The example ends by itself.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use switchyard_e2e::run::{BackgroundRun, Tally};
use switchyard_e2e::{binary, children_with, examples_copy, line_count, signal, wait_until};

/// A killed process's messages come back after JetStream's acknowledgement deadline (10 s).
const LIMIT: Duration = Duration::from_secs(300);
const ITEMS: u64 = 20_000;

/// ITEMS orders (at `rate` a second, when given) fork to `price`, to `stock` (which drops every
/// third) and to `reviews` (two outputs each); `answer` joins them, with `join_replicas`.
fn three_branches(rate: Option<u32>, join_replicas: u32) -> String {
    let rate = rate.map_or(String::new(), |r| format!(", ratePerSecond: {r}"));
    format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: forks}}
spec:
  sources:
    - name: orders
      generator: {{count: {ITEMS}, payload: '{{"order": {{{{seq}}}}}}'{rate}}}
  stages:
    - {{name: price, inputs: [orders], jq: '{{order, price: (.order * 2)}}'}}
    - {{name: stock, inputs: [orders], jq: 'if .order % 3 == 0 then empty else {{order, stocked: true}} end'}}
    - {{name: reviews, inputs: [orders], jq: '{{order, stars: 4}}, {{order, stars: 5}}'}}
    - name: answer
      join: {{of: [price, stock, reviews], timeout: 60s}}
      switcher: {{minReplicas: {join_replicas}, maxReplicas: {join_replicas}}}
      jq: '{{order: .price[0].order, price: .price[0].price, stock: (.stock | length), stars: [.reviews[].stars]}}'
  sinks:
    - {{name: out, file: {{path: out.jsonl}}}}
"#
    )
}

/// Every order once, each with all three parts as its branches made them.
fn assert_joined_once(file: &Path) {
    Tally::of(file, "order", ITEMS).assert_exactly_once(ITEMS);
    let text = std::fs::read_to_string(file).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let order = v["order"].as_u64().unwrap();
        assert_eq!(v["price"].as_u64(), Some(order * 2), "{line}");
        let stocked = u64::from(!order.is_multiple_of(3));
        assert_eq!(
            v["stock"].as_u64(),
            Some(stocked),
            "a dropped item is an empty part: {line}"
        );
        assert_eq!(
            v["stars"],
            serde_json::json!([4, 5]),
            "both outputs, in order: {line}"
        );
    }
}

fn assert_ended_clean(run: &mut BackgroundRun) {
    let status = run.wait(LIMIT);
    let output = run.output();
    assert!(status.success(), "{}\n{output}", run.notes());
    assert!(
        output.contains(&format!(
            "{} from sources, {} at sinks, 0 dead-lettered",
            thousands(ITEMS),
            thousands(ITEMS)
        )),
        "{output}"
    );
    assert!(output.contains("The books balance"), "{output}");
    // What the join stored, the sink took in once each: a sink that drops a second copy (the file
    // sink's ledger) would hide a copy the stream took under another id.
    assert_eq!(
        sink_took_in(&output),
        Some(thousands(ITEMS)),
        "the sink took in other than one copy of each: {output}"
    );
}

/// What the sink `out` took in, as the run's summary says (its `in` column).
fn sink_took_in(output: &str) -> Option<String> {
    let row = output
        .lines()
        .find(|l| l.trim_start().starts_with("out ") && l.contains(" sink "))?;
    row.split_whitespace().nth(3).map(str::to_string)
}

/// `20,000`, as the run's summary writes it.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn every_item_is_joined_once_with_all_three_parts() {
    let mut run = BackgroundRun::start(&three_branches(None, 1), &[], &[]);
    assert_ended_clean(&mut run);
    assert_joined_once(&run.path("out.jsonl"));
}

#[test]
fn two_join_replicas_and_kills_every_two_seconds_lose_and_double_nothing() {
    let mut run = BackgroundRun::start(&three_branches(Some(1500), 2), &[], &[]);
    let out = run.path("out.jsonl");
    let pid = run.child.id();
    wait_until(LIMIT, "two join replicas", || {
        children_with(pid, "/answer.json").len() == 2
    });
    let victims = ["answer", "price", "stock", "reviews"];
    let mut killed = Vec::new();
    let started = Instant::now();
    while line_count(&out) < (ITEMS as usize) * 3 / 4 && started.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_secs(2));
        if run.child.try_wait().unwrap().is_some() {
            break;
        }
        let unit = victims[killed.len() % victims.len()];
        if let Some(&pid) = children_with(run.child.id(), &format!("/{unit}.json")).first() {
            signal(pid, libc::SIGKILL);
            killed.push((unit, pid));
        }
    }
    assert!(
        killed.len() >= 4,
        "too few kills before the end: {killed:?}"
    );
    assert_ended_clean(&mut run);
    let notes = run.notes();
    for (unit, pid) in &killed {
        assert!(
            notes.contains(&format!("unit `{unit}`: process {pid} ended (signal 9)")),
            "{notes}"
        );
    }
    assert_joined_once(&out);
    println!("{} kills: {killed:?}", killed.len());
}

fn switchyard(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(binary("switchyard"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run switchyard");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "switchyard {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Items 1..=20: `fast` answers at once but fails item 5; `slow` takes 3 s, three times the join's
/// timeout.
const LATE: &str = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: late}
spec:
  sources:
    - name: items
      generator: {count: 20, payload: '{"n": {{seq}}}'}
  stages:
    - {name: fast, inputs: [items], jq: 'if .n == 5 then error("no price for 5") else {n, fast: true} end'}
    - name: slow
      inputs: [items]
      stages:
        - {name: wait, sleep: 3s}
        - {name: mark, jq: '{n, slow: true}'}
    - name: answer
      join: {of: [fast, slow], timeout: 1s}
      jq: '{n: .slow[0].n, fast: .fast[0].fast, slow: .slow[0].slow}'
  sinks:
    - {name: out, file: {path: out.jsonl}}
"#;

#[test]
fn an_item_missing_a_branch_is_dead_lettered_with_what_arrived_and_its_replay_joins_it() {
    let mut run = BackgroundRun::start(LATE, &[], &[]);
    assert!(run.wait(LIMIT).success(), "{}", run.notes());
    let dir = run.dir.path().to_path_buf();
    assert_eq!(
        line_count(&run.path("out.jsonl")),
        0,
        "nothing joined in time"
    );
    let letters: Vec<serde_json::Value> = switchyard(&dir, &["dlq", "show", "p.yaml", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = |unit: &str| -> Vec<&serde_json::Value> {
        letters.iter().filter(|l| l["unit"] == unit).collect()
    };
    assert_eq!(at("fast").len(), 1, "the branch's own letter: {letters:?}");
    let joins = at("answer");
    assert_eq!(joins.len(), 20, "{letters:?}");
    let failed = joins
        .iter()
        .find(|l| l["data"].get("fast").is_none())
        .unwrap();
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("branch `fast` dead-lettered the item (")
            && error.contains("no price for 5"),
        "{error}"
    );
    assert_eq!(
        failed["data"]["_missing"],
        serde_json::json!(["fast", "slow"])
    );
    let timed_out = joins
        .iter()
        .find(|l| l["data"].get("fast").is_some())
        .unwrap();
    let error = timed_out["error"].as_str().unwrap();
    assert!(
        error.contains("timed out after 1s waiting for slow; arrived: fast"),
        "{error}"
    );
    assert_eq!(timed_out["data"]["_missing"], serde_json::json!(["slow"]));

    // The slow parts came after the timeout and were kept: the replayed letters find them.
    let replayed = switchyard(&dir, &["dlq", "replay", "p.yaml", "--unit", "answer"]);
    assert!(replayed.contains("replayed 20 dead letters"), "{replayed}");
    run.again(&["--resume"]);
    assert!(run.wait(LIMIT).success(), "{}", run.notes());
    let joined = Tally::of(&run.path("out.jsonl"), "n", 20);
    assert_eq!(
        joined.lost,
        vec![5],
        "all but the item `fast` failed, once: {joined:?}"
    );
    assert!(joined.duplicated.is_empty(), "{joined:?}");
    // Item 5 waits again for `fast`, whose letter is still there, and times out once more.
    let again: Vec<serde_json::Value> = switchyard(
        &dir,
        &["dlq", "show", "p.yaml", "--json", "--unit", "answer"],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(
        again[0]["error"]
            .as_str()
            .unwrap()
            .contains("waiting for fast; arrived: slow"),
        "{again:?}"
    );
    assert_eq!(again[0]["replays"], 1);
}

#[test]
fn the_example_joins_every_order_and_ends_by_itself() {
    let dir = examples_copy();
    let output = Command::new(binary("switchyard"))
        .args(["run", "fan-out-join.yaml", "--progress", "lines"])
        .current_dir(dir.path())
        .output()
        .expect("switchyard run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers = dir.path().join("answers.jsonl");
    Tally::of(&answers, "order", 10_000).assert_exactly_once(10_000);
    for line in std::fs::read_to_string(&answers).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let order = v["order"].as_u64().unwrap();
        assert_eq!(
            v["in_stock"].as_bool(),
            Some(!order.is_multiple_of(7)),
            "{line}"
        );
        assert_eq!(v["days"].as_u64(), Some(1 + order % 5), "{line}");
        assert!(v["price"].is_f64(), "{line}");
    }
}

/// Items 1..=30 fork to the branches, `slow` taking 45 s for each; the join would wait ten minutes.
fn waiting_join(branches: &[&str]) -> String {
    let mut stages = String::new();
    for branch in branches {
        let step = match *branch {
            "slow" => "stages: [{name: wait, sleep: 45s}, {name: mark, jq: '{n, slow: true}'}]",
            _ => "jq: '{n}'",
        };
        stages.push_str(&format!(
            "    - {{name: {branch}, inputs: [items], {step}}}\n"
        ));
    }
    format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: edited}}
spec:
  sources:
    - name: items
      generator: {{count: 30, payload: '{{"n": {{{{seq}}}}}}'}}
  stages:
{stages}    - name: answer
      join: {{of: [{}], timeout: 10m}}
      jq: '{{n: .fast[0].n, parts: keys}}'
  sinks:
    - {{name: out, file: {{path: out.jsonl}}}}
"#,
        branches.join(", ")
    )
}

#[test]
fn an_edit_adding_a_branch_is_refused_and_one_removing_the_branch_items_wait_for_hands_them_on() {
    let mut run =
        BackgroundRun::start(&waiting_join(&["fast", "quick", "slow"]), &["--watch"], &[]);
    // Every item has its `fast` and `quick` parts at the join and waits for `slow`.
    wait_until(
        LIMIT,
        "the join to take in the parts of `fast` and `quick`",
        || {
            run.notes().lines().any(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.starts_with(&["answer", "group", "1", "60"])
            })
        },
    );
    std::fs::write(
        run.path("p.yaml"),
        waiting_join(&["fast", "quick", "slow", "extra"]),
    )
    .unwrap();
    run.wait_for_note("edit 1 refused, nothing changed: join `answer` would wait for `extra` too");
    let started = Instant::now();
    std::fs::write(run.path("p.yaml"), waiting_join(&["fast", "quick"])).unwrap();
    let out = run.path("out.jsonl");
    // Before `slow` is done with any item (45 s from the start): they go on without it.
    wait_until(
        Duration::from_secs(30),
        "the items to go on at the edit",
        || line_count(&out) == 30,
    );
    assert!(run.wait(LIMIT).success(), "{}", run.notes());
    let output = run.output();
    assert!(
        output.contains("30 from sources, 30 at sinks, 0 dead-lettered"),
        "the parts `slow` made before it went are late, not failures: {output}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the items went on at the edit, not at their timeout: {:?}",
        started.elapsed()
    );
    let joined = Tally::of(&out, "n", 30);
    joined.assert_exactly_once(30);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["parts"], serde_json::json!(["fast", "quick"]), "{line}");
    }
}

/// Items 1..=`count` fork to `fast` and to `slow`, which takes `slow` for each; the join's own
/// settings follow.
fn fast_and_slow(count: u64, slow: &str, join: &str) -> String {
    format!(
        r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: settings}}
spec:
  sources:
    - name: items
      generator: {{count: {count}, payload: '{{"n": {{{{seq}}}}}}'}}
  stages:
    - {{name: fast, inputs: [items], jq: '{{n}}'}}
    - name: slow
      inputs: [items]
      stages: [{{name: wait, sleep: {slow}}}, {{name: mark, jq: '{{n}}'}}]
    - name: answer
      join: {join}
      jq: '{{n: .fast[0].n, slow: (.slow | length), missing: ._missing}}'
  sinks:
    - {{name: out, file: {{path: out.jsonl}}}}
"#
    )
}

#[test]
fn under_continue_an_item_goes_on_at_its_timeout_with_what_arrived_and_the_books_balance() {
    let mut run = BackgroundRun::start(
        &fast_and_slow(
            20,
            "3s",
            "{of: [fast, slow], timeout: 1s, onTimeout: continue}",
        ),
        &[],
        &[],
    );
    assert!(run.wait(LIMIT).success(), "{}", run.notes());
    let output = run.output();
    assert!(
        output.contains("20 from sources, 20 at sinks, 0 dead-lettered"),
        "{output}"
    );
    assert!(output.contains("The books balance"), "{output}");
    let out = run.path("out.jsonl");
    Tally::of(&out, "n", 20).assert_exactly_once(20);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["slow"], 0, "went on without `slow`: {line}");
        assert_eq!(v["missing"], serde_json::json!(["slow"]), "{line}");
    }
}

#[test]
fn a_join_holding_its_most_waiting_items_holds_back_new_ones_and_loses_none() {
    let mut run = BackgroundRun::start(
        &fast_and_slow(300, "2s", "{of: [fast, slow], timeout: 2m, maxWaiting: 40}"),
        &[],
        &[],
    );
    let dir = run.dir.path().to_path_buf();
    let out = run.path("out.jsonl");
    let mut most = 0u64;
    while run.child.try_wait().unwrap().is_none() && line_count(&out) < 300 {
        let status = Command::new(binary("switchyard"))
            .args(["status", "p.yaml"])
            .current_dir(&dir)
            .output()
            .expect("switchyard status");
        let text = String::from_utf8_lossy(&status.stdout);
        if let Some(waiting) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("answer: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            most = most.max(waiting);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        run.wait(LIMIT).success(),
        "{}\n{}",
        run.notes(),
        run.output()
    );
    assert!(most > 0, "the join was never seen waiting");
    assert!(
        most <= 40,
        "{most} items waited at once, more than maxWaiting"
    );
    let joined = Tally::of(&out, "n", 300);
    joined.assert_exactly_once(300);
    // A part held back comes again with the others of its frame, some of whose items went on
    // meanwhile: they go on again under the same ids, which the stream drops.
    let output = run.output();
    assert_eq!(sink_took_in(&output), Some("300".to_string()), "{output}");
    println!("at most {most} items waited at once");
}

#[test]
fn a_branch_whose_outputs_of_an_item_do_not_fit_in_one_part_fails_that_item_alone() {
    let yaml = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: big}
spec:
  sources:
    - name: items
      generator: {count: 3, payload: '{"n": {{seq}}}'}
  stages:
    - {name: small, inputs: [items], jq: '{n}'}
    - name: big
      inputs: [items]
      jq: 'if .n == 2 then ([range(1000)] | map("x") | add) as $pad | range(1200) | {n: 2, $pad} else {n} end'
    - name: answer
      join: {of: [small, big]}
      jq: '{n: .small[0].n}'
  sinks:
    - {name: out, file: {path: out.jsonl}}
"#;
    let mut run = BackgroundRun::start(yaml, &[], &[]);
    assert!(run.wait(LIMIT).success(), "{}", run.notes());
    let joined = Tally::of(&run.path("out.jsonl"), "n", 3);
    assert_eq!(joined.lost, vec![2], "{joined:?}");
    assert!(joined.duplicated.is_empty());
    let dir = run.dir.path().to_path_buf();
    let letters: Vec<serde_json::Value> = switchyard(&dir, &["dlq", "show", "p.yaml", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let error_at = |unit: &str| -> String {
        letters
            .iter()
            .find(|l| l["unit"] == unit)
            .and_then(|l| l["error"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        error_at("big").contains("1200 outputs of this item"),
        "{letters:?}"
    );
    assert!(
        error_at("answer").contains("branch `big` dead-lettered the item"),
        "{letters:?}"
    );
}
