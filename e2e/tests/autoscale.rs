//! Local-mode autoscaling end to end: a slow switcher fed at 1,000 messages a second scales up until
//! the lag falls, returns to minReplicas after the load ends, never exceeds maxReplicas, and loses
//! nothing — all read back from `--summary-json`, and drawn by `--plot`.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use switchyard_e2e::{binary, examples_copy};

#[test]
fn a_slow_switcher_scales_up_drains_and_returns_to_its_minimum() {
    let dir = examples_copy();
    let output = Command::new(binary("switchyard"))
        .args(["run", "autoscale.yaml", "--progress", "lines"])
        .args(["--summary-json", "summary.json", "--plot", "autoscale.svg"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    let settings = &summary["switchers"]["slow"];
    let (min, max, target) = (
        settings["minReplicas"].as_u64().unwrap(),
        settings["maxReplicas"].as_u64().unwrap(),
        settings["targetLagPerReplica"].as_u64().unwrap(),
    );
    let window = settings["scaleDownStabilizationSeconds"].as_f64().unwrap();
    let timeline: Vec<(f64, u64, u64, u64)> = summary["timeline"]["slow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["t"].as_f64().unwrap(),
                p["lag"].as_u64().unwrap_or(0),
                p["replicas"].as_u64().unwrap(),
                p["desired"].as_u64().unwrap(),
            )
        })
        .collect();
    let show = || format!("{timeline:?}\n{}", summary["scaleEvents"]);

    // Never above maxReplicas.
    assert!(
        timeline.iter().all(|(_, _, r, d)| *r <= max && *d <= max),
        "{}",
        show()
    );
    // A backlog appears, and within 10 s the switcher runs enough replicas: 1,000 a second at 200 each.
    let backlog = timeline
        .iter()
        .find(|(_, lag, _, _)| *lag > target)
        .map(|p| p.0)
        .expect("a backlog");
    let enough = timeline
        .iter()
        .find(|(t, _, r, _)| *t >= backlog && *r >= 5)
        .map(|p| p.0)
        .expect("enough replicas");
    assert!(enough - backlog <= 10.0, "{enough} - {backlog}: {}", show());
    // The lag drains while the load still comes.
    let drained = timeline
        .iter()
        .find(|(t, lag, _, _)| *t > enough && *lag < target)
        .map(|p| p.0);
    assert!(drained.is_some_and(|t| t < 15.0), "{}", show());
    // After the burst (the last moment the work needed more than one replica), it goes back to
    // minReplicas, and not before the stabilization window.
    let events = summary["scaleEvents"].as_array().unwrap();
    let last_down = events
        .iter()
        .rev()
        .find(|e| e["to"].as_u64() < e["from"].as_u64())
        .expect("a scale-down");
    assert_eq!(last_down["to"].as_u64(), Some(min), "{}", show());
    let (t_last, _, replicas_last, _) = *timeline.last().unwrap();
    assert_eq!(replicas_last, min, "{}", show());
    let first_down = events
        .iter()
        .find(|e| e["to"].as_u64() < e["from"].as_u64())
        .unwrap();
    let peak = events
        .iter()
        .take_while(|e| e["to"].as_u64() > e["from"].as_u64())
        .last()
        .unwrap();
    assert!(
        first_down["t"].as_f64().unwrap() - peak["t"].as_f64().unwrap() >= window - 0.5,
        "scaled down before the window: {}",
        show()
    );
    assert!(t_last > last_down["t"].as_f64().unwrap());

    // Nothing lost, nothing twice.
    let text = std::fs::read_to_string(dir.path().join("autoscale-out.jsonl")).unwrap();
    let items: BTreeSet<String> = text.lines().map(str::to_string).collect();
    assert_eq!(text.lines().count(), 15_040);
    assert_eq!(items.len(), 15_040);
    assert!(
        stdout.contains("15,040 from sources, 15,040 at sinks, 0 dead-lettered"),
        "{stdout}"
    );

    // The picture shows every unit, lag and replicas.
    let svg = std::fs::read_to_string(dir.path().join("autoscale.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    for needle in [
        "slow (switcher: 1..10 replicas",
        "burst (source)",
        "out (sink)",
        "replicas running",
    ] {
        assert!(svg.contains(needle), "{needle}");
    }
    assert!(svg.matches("<polyline").count() >= 8);
}
