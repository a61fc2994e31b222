//! The laundry example end to end through `switchyard run`: 20,000 items, each exactly once in the
//! closet, also when a stage process is killed with SIGKILL partway.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_e2e::{binary, children_with, examples_copy, line_count, wait_until};

const ITEMS: u64 = 20_000;
/// A killed process's messages come back after JetStream's acknowledgement deadline (10 s).
const LIMIT: Duration = Duration::from_secs(300);

fn start_laundry(dir: &Path) -> Child {
    let file = dir.join("laundry.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(
        yaml.contains("count: 10000"),
        "the example changed: update this test"
    );
    std::fs::write(
        &file,
        yaml.replace("count: 10000", &format!("count: {ITEMS}")),
    )
    .unwrap();
    Command::new(binary("switchyard"))
        .args(["run", "laundry.yaml", "--progress", "lines"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard run")
}

fn finish(mut child: Child) -> (String, String) {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("switchyard run did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "switchyard run failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

/// Every item 1..=ITEMS exactly once, each through every stage.
fn assert_every_item_once(closet: &Path) {
    let text = std::fs::read_to_string(closet).unwrap();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["worn"], true, "{line}");
        assert_eq!(v["basket"], "blue", "{line}");
        assert_eq!(v["washed"], true, "{line}");
        assert_eq!(v["folded"], true, "{line}");
        *seen.entry(v["item"].as_u64().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "items in the closet more than once: {twice:?}"
    );
    let missing: Vec<u64> = (1..=ITEMS)
        .filter(|i| !seen.contains_key(i))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "items missing from the closet: {missing:?}"
    );
    assert_eq!(text.lines().count() as u64, ITEMS);
}

#[test]
fn every_item_reaches_the_closet_exactly_once() {
    let dir = examples_copy();
    let (stdout, _) = finish(start_laundry(dir.path()));
    assert_every_item_once(&dir.path().join("closet.jsonl"));
    assert!(
        stdout.contains("20,000 from sources, 20,000 at sinks, 0 dead-lettered"),
        "{stdout}"
    );
}

fn kill_one_process_of(unit: &str) {
    let dir = examples_copy();
    let closet = dir.path().join("closet.jsonl");
    let child = start_laundry(dir.path());
    wait_until(LIMIT, "a quarter of the items in the closet", || {
        line_count(&closet) >= (ITEMS / 4) as usize
    });
    let needle = format!("/{unit}.json");
    // A switcher may have scaled up by now: any one of its processes will do.
    let victims = children_with(child.id(), &needle);
    assert!(!victims.is_empty(), "no process of {unit}");
    unsafe {
        libc::kill(victims[0] as i32, libc::SIGKILL);
    }
    let at_kill = line_count(&closet);
    assert!((at_kill as u64) < ITEMS, "the run was over before the kill");
    let (stdout, stderr) = finish(child);
    assert!(
        stderr.contains(&format!(
            "unit `{unit}`: process {} ended (signal 9)",
            victims[0]
        )),
        "{stderr}"
    );
    assert_every_item_once(&closet);
    assert!(
        stdout.contains("20,000 from sources, 20,000 at sinks, 0 dead-lettered"),
        "{stdout}"
    );
}

#[test]
fn killing_the_switcher_loses_and_duplicates_nothing() {
    kill_one_process_of("machines");
}

#[test]
fn killing_the_sink_loses_and_duplicates_nothing() {
    kill_one_process_of("closet");
}
