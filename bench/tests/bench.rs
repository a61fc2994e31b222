//! `switchyard-bench` runs every scenario and reports each as a ratio to the raw limit measured in
//! the same run. Its figures are not checked here (timings are not test assertions); that it measures
//! and reports them is.

use std::path::PathBuf;
use std::process::Command;

/// `switchyard-bench`, once `program`, which it runs, is built beside it.
fn bench_needing(program: &str) -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_switchyard-bench"));
    assert!(
        bin.with_file_name(program).is_file(),
        "{program} is not built: run `cargo build --workspace --bins` first (scripts/test does)"
    );
    Command::new(bin)
}

/// Runs the command, which must succeed; its stdout.
fn stdout_of(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_benchmark_measures_every_scenario_against_the_raw_limit() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let stdout = stdout_of(
        bench_needing("switchyard-stage")
            .args([
                "--messages",
                "2000",
                "--repeat",
                "1",
                "--latency-for",
                "1s",
                "--sizes",
                "128",
            ])
            .arg("--json")
            .arg(&json),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    let scenarios: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    // The raw loop once (it is the per-message limit), every other scenario without frames and with,
    // but the fork and the join, whose outputs frames would cut by when each item completes.
    let mut expected = vec!["raw"];
    for kind in [
        "passthrough",
        "chain",
        "group",
        "jq",
        "exec",
        "exec-bad-lines",
        "traced",
    ] {
        expected.extend([kind, kind]);
    }
    expected.extend(["fork", "join"]);
    assert_eq!(scenarios, expected);
    let frames: Vec<bool> = results
        .iter()
        .map(|r| r["frames"].as_bool().unwrap())
        .collect();
    assert!(!frames[0], "the raw loop has no frames");
    assert!(
        frames[1..15].chunks(2).all(|pair| pair == [false, true]),
        "{frames:?}"
    );
    assert_eq!(frames[15..], [false, false]);
    let raw = results[0]["perSecond"].as_f64().unwrap();
    for r in results {
        let rate = r["perSecond"].as_f64().unwrap();
        assert!(rate > 0.0, "{r}");
        assert!(
            (r["ratioToRaw"].as_f64().unwrap() - rate / raw).abs() < 1e-9,
            "{r}"
        );
        // Latency is not measured through the fork and the join (a join's output holds the input
        // one level down).
        if !matches!(r["scenario"].as_str(), Some("fork" | "join")) {
            assert!(
                r["p50Ms"].as_f64().unwrap() > 0.0
                    && r["p99Ms"].as_f64().unwrap() >= r["p50Ms"].as_f64().unwrap()
            );
        }
        assert!(r["cpuSecondsPer100k"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peakRssMib"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(report["idleRssMib"].as_f64().unwrap() > 0.0);
    assert!(report["steps"]["perStepMicros"].as_f64().unwrap() >= 0.0);
    for needle in [
        "| 128 B | raw async-nats loop |",
        "× raw",
        "Targets:",
        "- one unit ≥ 0.70 of the raw limit",
        "- one passthrough unit with frames ≥ 3 × the raw loop: ",
        "- one exec step (Python echo) with frames ≥ 2 × the raw loop: ",
        "Finding the item behind each bad line (1 in 1,000, tried alone, dead-lettered), 128 B: ",
        "Fork and join, 128 B: ",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

/// The peer comparison's own half: `switchyard run` of file → Python function → file, its output
/// checked (every record once, enriched) and its figure printed. Bytewax is left out here: it comes
/// from PyPI.
#[test]
fn the_peer_comparison_runs_the_job_through_switchyard_and_checks_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let output = bench_needing("switchyard")
        .args(["peer", "--items", "2000", "--bytewax", "none", "--keep"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        // The runs' folders (with their NATS stores) are what tells why.
        let kept = dir.keep();
        panic!(
            "{stdout}\n{}\nthe runs' folders are kept in {}",
            String::from_utf8_lossy(&output.stderr),
            kept.display()
        );
    }
    assert!(
        stdout.contains("file → Python function → file, 2,000 records of ")
            && stdout.contains("switchyard run (exec step, file sink with its ledger): "),
        "{stdout}"
    );
    let written = std::fs::read_to_string(dir.path().join("switchyard-out.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 2000);
}

/// The postgres comparison on a small table: both raw loops and both Switchyard runs, each
/// checked against its table (every row done once), and their figures as ratios.
#[test]
fn the_postgres_comparison_runs_both_jobs_against_their_raw_loops_and_checks_every_row() {
    let stdout = stdout_of(bench_needing("switchyard").args(["postgres", "--rows", "2000"]));
    for needle in [
        "postgres: 2,000 rows a table",
        "raw claim + update loop (3 connections, 500 rows a claim): ",
        "raw loop of the example's statements (claim, is_odd upserted, outcome fenced; 3 connections): ",
        "examples/odd-numbers.yaml (source with leases, 3 workers, sink, outcomes): ",
        "claimed and written against the raw loop: ",
        "against the example's statements: ",
        "raw insert loop (4 connections, 500 rows a statement",
        "raw loop of the sink's statement (4 connections, 500 rows a statement as one JSON array): ",
        "generator → jq → postgres sink: ",
        "written against the raw loop: ",
        "against the sink's statement: ",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    // Each rate comes with its CPU a row; a Switchyard run's units and NATS are counted (they
    // cost something), not lost with the processes that ran them.
    let costs: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("CPU a row: "))
        .collect();
    assert_eq!(costs.len(), 6, "{stdout}");
    for run in costs.iter().filter(|l| l.contains("over the whole run")) {
        let rest = run
            .split(" µs PostgreSQL + ")
            .nth(1)
            .and_then(|r| r.split(" µs the rest").next())
            .and_then(|r| r.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no CPU the rest in {run}"));
        assert!(rest > 1.0, "{run}");
    }
}
