//! Each scenario is something a platform team does on its first days with the operator, with pods.
//! Figures are printed, never asserted.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{exactly_once, is_ready, secs, succeeded, text, wait_for, Suite, SYSTEM};
use crate::nats::Nats;

const MINUTE: Duration = Duration::from_secs(60);

fn ready(suite: &Suite, ns: &str, name: &str) -> bool {
    suite
        .condition(ns, name, "Ready")
        .is_some_and(|(status, _, _)| status == "True")
}

/// A pod of the handlers' image that runs `script` (Python) once and is done; its log.
fn run_python(suite: &Suite, ns: &str, name: &str, script: &str) -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": "python:3.12-slim", "imagePullPolicy": "IfNotPresent",
                "command": ["python3", "-c", script],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    });
    suite.apply_ok(&pod.to_string());
    wait_for(MINUTE, &format!("pod {name} done"), || {
        let phase = suite.json(&["get", "pod", name, "-n", ns])["status"]["phase"].clone();
        phase == "Succeeded" || phase == "Failed"
    });
    suite.kubectl_ok(&["logs", "-n", ns, name])
}

/// The guards: a pod reaches no address outside the cluster, the cluster DNS answers cluster names
/// only and refuses the rest, a pull goes to the dead registry and fails, the cluster's namespace has
/// no default route, and this machine forwarded nothing from it (the suite checks that again at
/// its end).
pub fn nothing_leaves_the_machine(suite: &Suite) {
    let ns = "guard";
    suite.namespace(ns);
    let script = r#"
import json, socket, struct
out = {}
for host, port in [("192.0.2.1", 80), ("8.8.8.8", 53), ("1.1.1.1", 443), ("151.101.0.223", 443)]:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); out[host] = "connected"
    except OSError as e:
        out[host] = e.strerror or type(e).__name__
    finally:
        s.close()
def query(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, ("10.96.0.10", 53))
    answer = s.recv(512)
    return {"rcode": answer[3] & 0x0f, "answers": struct.unpack(">H", answer[6:8])[0]}
out["dns example.com"] = query("example.com")
out["dns kubernetes"] = query("kubernetes.default.svc.cluster.local")
try:
    out["resolve example.com"] = socket.gethostbyname("example.com")
except OSError as e:
    out["resolve example.com"] = "failed"
out["resolve kubernetes"] = socket.gethostbyname("kubernetes.default.svc.cluster.local")
print(json.dumps(out))
"#;
    let log = run_python(suite, ns, "reach", script);
    let seen: Value = serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("{e}: {log}"));
    println!("  from a pod: {seen}");
    for host in ["192.0.2.1", "8.8.8.8", "1.1.1.1", "151.101.0.223"] {
        let said = seen[host].as_str().unwrap_or_default();
        assert!(
            said.contains("unreachable"),
            "{host}: {said} (expected: network unreachable)"
        );
    }
    assert_ne!(
        seen["dns example.com"]["rcode"], 0,
        "the cluster DNS answered a public name"
    );
    assert_eq!(seen["dns example.com"]["answers"], 0);
    assert_eq!(seen["dns kubernetes"]["rcode"], 0);
    assert_eq!(seen["resolve example.com"], "failed");
    assert_eq!(seen["resolve kubernetes"], "10.96.0.1");

    // A pull: the runtime asks the dead registry, and nothing else.
    suite.apply_ok(&format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "pull", "namespace": "{ns}"}},
            "spec": {{"containers": [{{"name": "c", "image": "docker.io/library/busybox:1.36", "imagePullPolicy": "Always"}}]}}}}"#
    ));
    let mut message = String::new();
    wait_for(MINUTE, "the pull to fail", || {
        let pod = suite.json(&["get", "pod", "pull", "-n", ns]);
        let waiting = &pod["status"]["containerStatuses"][0]["state"]["waiting"];
        message = waiting["message"].as_str().unwrap_or_default().to_string();
        matches!(
            waiting["reason"].as_str(),
            Some("ErrImagePull" | "ImagePullBackOff")
        ) && !message.is_empty()
    });
    println!("  a pull: {message}");
    assert!(
        message.contains("127.0.0.1:1"),
        "the pull went elsewhere: {message}"
    );

    let routes = succeeded(
        "ip route in the cluster's namespace",
        suite
            .cluster
            .in_netns("ip")
            .args(["route"])
            .output()
            .expect("ip"),
    );
    let routes = text(&routes.stdout);
    assert!(!routes.contains("default"), "{routes}");
    assert_eq!(
        suite.cluster.forwarded_by_host().expect("the guard rule"),
        0
    );
    suite.delete_namespace(ns);
}

/// The chart as a user installs it: the operator's Deployment and metrics Service select the
/// operator's pod only (not NATS's), NATS's store is bound and JetStream keeps to the chart's limits.
pub fn the_chart_runs_the_operator_and_its_nats(suite: &Suite) {
    let logs = suite.kubectl_ok(&["logs", "-n", SYSTEM, "deploy/switchyard"]);
    assert!(
        logs.contains("switchyard_operator"),
        "kubectl logs deploy/switchyard shows: {}",
        &logs[..logs.len().min(500)]
    );
    assert!(
        !logs.contains("nats-server"),
        "the operator's log is NATS's"
    );
    let operator = suite.json(&[
        "get",
        "pods",
        "-n",
        SYSTEM,
        "-l",
        "app.kubernetes.io/component=operator",
    ]);
    let ips: BTreeSet<String> = operator["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ips.len(), 1, "{operator}");
    let slices = suite.json(&[
        "get",
        "endpointslices",
        "-n",
        SYSTEM,
        "-l",
        "kubernetes.io/service-name=switchyard-metrics",
    ]);
    let endpoints: BTreeSet<String> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["addresses"][0].as_str().map(str::to_string))
        .collect();
    assert_eq!(endpoints, ips, "the metrics Service's endpoints");

    let pvc = suite.json(&["get", "pvc", "data-switchyard-nats-0", "-n", SYSTEM]);
    assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    let nats_log = suite.kubectl_ok(&["logs", "-n", SYSTEM, "switchyard-nats-0"]);
    assert!(
        nats_log.contains("Max Memory:      256.00 MB"),
        "{nats_log}"
    );
    assert!(
        nats_log.contains("Max Storage:     900.00 MB"),
        "{nats_log}"
    );
    let operator_pod = &operator["items"][0];
    let context = &operator_pod["spec"]["containers"][0]["securityContext"];
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert_eq!(context["runAsNonRoot"], true);
}

/// `kubectl apply -f examples/laundry.yaml` and `kubectl wait`: every item at the sink once, the
/// status caught up, and what it cost.
pub fn the_laundry_moves_every_item_once(suite: &Suite) {
    let ns = "laundry";
    suite.namespace(ns);
    let file = suite.repo.join("examples/laundry.yaml");
    let applied = Instant::now();
    suite.kubectl_ok(&["apply", "-n", ns, "-f", &file.display().to_string()]);
    // The items may all be through before the Pipeline says Ready (10,000 at 2,000/s): watch both
    // from the apply on.
    let (mut to_ready, mut first_item, mut all_seen) = (None, None, None);
    wait_for(
        Duration::from_secs(180),
        "Ready and 10,000 items at the closet",
        || {
            let n = suite
                .sink_lines(ns, "laundry", "closet", "closet.jsonl")
                .len();
            if n > 0 && first_item.is_none() {
                first_item = Some(Instant::now());
            }
            if n >= 10_000 && all_seen.is_none() {
                all_seen = Some(Instant::now());
            }
            if to_ready.is_none() && ready(suite, ns, "laundry") {
                to_ready = Some(secs(applied));
            }
            all_seen.is_some() && to_ready.is_some()
        },
    );
    let to_all = all_seen
        .map(|t| (t - applied).as_secs_f64())
        .unwrap_or_default();
    suite.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "pipeline/laundry",
        "--timeout=60s",
    ]);
    let to_ready = to_ready.unwrap_or_default();
    let moving = match (first_item, all_seen) {
        (Some(first), Some(all)) => (all - first).as_secs_f64(),
        _ => 0.0,
    };
    let lines = suite.sink_lines(ns, "laundry", "closet", "closet.jsonl");
    exactly_once(&lines, "item", 10_000);
    let all_there = Instant::now();
    wait_for(MINUTE, "the status's lag at 0", || {
        suite.pipeline(ns, "laundry")["status"]["lag"].as_u64() == Some(0)
    });
    let caught_up = secs(all_there);
    let pods = suite.pods(ns, "laundry", None);
    let mut memory: Vec<(String, f64)> = Vec::new();
    for pod in &pods {
        let unit = pod["metadata"]["labels"]["switchyard.dev/unit"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for pid in suite.container_pids(std::slice::from_ref(pod)) {
            memory.push((unit.clone(), Suite::rss_mib(pid)));
        }
    }
    let rss: Vec<String> = memory.iter().map(|(u, m)| format!("{u} {m:.0}")).collect();
    println!(
        "  laundry: apply to Ready {to_ready}s, apply to all 10,000 at the sink {to_all:.1}s, first to last item seen {moving:.1}s (about {:.0} items/s, looked at every half second; the generator sends 2,000/s); status lag 0 {caught_up}s after; {} pods; stage process RSS MiB: {}",
        10_000.0 / moving.max(0.001),
        pods.len(),
        rss.join(", ")
    );
    suite.delete_namespace(ns);
}

/// Found on the first node: with every switcher pod in CrashLoopBackOff the status said "no
/// failures". Here a user forgets the stage's `image`: its exec step's python3 is not in
/// Switchyard's own image, the unit stops at start and its pods crash-loop, and the Pipeline is
/// Degraded within seconds, naming the unit, the pod, the reason and the container's last words.
pub fn a_crash_loop_is_degraded_within_seconds(suite: &Suite) {
    let ns = "crash";
    suite.namespace(ns);
    suite.apply_ok(&format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: wash, namespace: {ns}}}
spec:
  sources: [{{name: src, generator: {{count: 100}}}}]
  stages:
    - name: machines
      switcher: {{minReplicas: 2, maxReplicas: 2}}
      exec:
        command:
          - python3
          - -c
          - |
            import json, sys
            for line in sys.stdin:
                m = json.loads(line)
                print(json.dumps({{"id": m["id"], "outputs": [m["data"]]}}), flush=True)
  sinks: [{{name: out, log: {{}}}}]
"#
    ));
    let applied = Instant::now();
    let mut message = String::new();
    wait_for(
        Duration::from_secs(90),
        "Degraded=True naming the crashing unit",
        || match suite.condition(ns, "wash", "Degraded") {
            Some((status, reason, m)) if status == "True" && reason == "PodsFailing" => {
                message = m;
                true
            }
            _ => false,
        },
    );
    println!("  Degraded {}s after apply: {message}", secs(applied));
    assert!(
        message.starts_with("machines: pod") && message.contains(" wash-machines-"),
        "{message}"
    );
    assert!(message.contains("container stage"), "{message}");
    assert!(
        message.contains("`python3` is not on PATH"),
        "the container's last words: {message}"
    );
    let (progressing, reason, _) = suite
        .condition(ns, "wash", "Progressing")
        .expect("Progressing");
    assert_eq!(
        (progressing.as_str(), reason.as_str()),
        ("False", "PodsFailing")
    );
    assert_eq!(suite.pipeline(ns, "wash")["status"]["phase"], "Degraded");
    // The fix (an image with python3) clears it.
    suite.kubectl_ok(&[
        "patch",
        "pipeline",
        "wash",
        "-n",
        ns,
        "--type=json",
        "-p",
        r#"[{"op": "add", "path": "/spec/stages/0/image", "value": "python:3.12-slim"}]"#,
    ]);
    wait_for(
        Duration::from_secs(90),
        "Degraded=False once the image has python3",
        || {
            suite
                .condition(ns, "wash", "Degraded")
                .is_some_and(|(s, _, _)| s == "False")
                && ready(suite, ns, "wash")
        },
    );
    suite.delete_namespace(ns);
}

fn metric(suite: &Suite, ns: &str, pod: &str, name: &str) -> Option<f64> {
    let out = suite.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/pods/{pod}:9090/proxy/metrics"),
    ]);
    if !out.status.success() {
        return None;
    }
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// examples/autoscale.yaml in the cluster: a backlog raises the switcher, new pods become Ready and
/// take work (their own counters say so), and it comes back down.
pub fn the_autoscaler_raises_and_lowers_real_pods(suite: &Suite) {
    let ns = "autoscale";
    suite.namespace(ns);
    let file = suite.repo.join("examples/autoscale.yaml");
    suite.kubectl_ok(&["apply", "-n", ns, "-f", &file.display().to_string()]);
    let mut first_pod = String::new();
    wait_for(Duration::from_secs(120), "the switcher's first pod", || {
        let pods = suite.pods(ns, "autoscale", Some("slow"));
        match pods.iter().find(|p| is_ready(p)) {
            Some(p) => {
                first_pod = p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                true
            }
            None => false,
        }
    });
    let mut backlog_at = None;
    wait_for(
        Duration::from_secs(120),
        "a backlog at the switcher",
        || {
            let lag = metric(suite, ns, &first_pod, "switchyard_stage_lag").unwrap_or(0.0);
            if lag > 100.0 {
                backlog_at = Some(Instant::now());
            }
            backlog_at.is_some()
        },
    );
    let backlog_at = backlog_at.expect("a backlog");
    let mut working: BTreeSet<String> = BTreeSet::new();
    let (mut first_new, mut last_new, mut peak) = (None, None, 1usize);
    let deadline = Instant::now() + Duration::from_secs(90);
    // Until the burst is through: which pods have finished inputs, and when each started to.
    while Instant::now() < deadline {
        let pods = suite.pods(ns, "autoscale", Some("slow"));
        let ready: Vec<&Value> = pods
            .iter()
            .filter(|p| is_ready(p) && p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        peak = peak.max(ready.len());
        for pod in &ready {
            let name = pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if working.contains(&name) || name == first_pod {
                continue;
            }
            if metric(suite, ns, &name, "switchyard_stage_processed_total").unwrap_or(0.0) > 0.0 {
                working.insert(name);
                first_new.get_or_insert_with(|| backlog_at.elapsed());
                last_new = Some(backlog_at.elapsed());
            }
        }
        let lag = suite.pipeline(ns, "autoscale")["status"]["units"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["name"] == "slow")
            .and_then(|u| u["lag"].as_u64())
            .unwrap_or(1);
        if peak > 1 && lag == 0 && first_new.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(peak > 1, "the switcher was never raised");
    assert!(!working.is_empty(), "no new pod took work");
    let down_from = Instant::now();
    wait_for(
        Duration::from_secs(180),
        "the switcher back at one pod",
        || {
            suite.json(&["get", "deployment", "autoscale-slow", "-n", ns])["spec"]["replicas"]
                .as_i64()
                == Some(1)
        },
    );
    let mut lines = Vec::new();
    wait_for(Duration::from_secs(120), "15,040 items at the sink", || {
        lines = suite.sink_lines(ns, "autoscale", "out", "autoscale-out.jsonl");
        lines.len() >= 15_040
    });
    exactly_once(
        &lines
            .iter()
            .filter(|l| l.contains("burst"))
            .cloned()
            .collect::<Vec<_>>(),
        "burst",
        15_000,
    );
    println!(
        "  autoscale: backlog to the first new pod taking work {:.1}s, to the last {:.1}s; {} new pods took work, peak {peak} Ready; back to 1 replica {:.1}s after the burst was through",
        first_new.unwrap_or_default().as_secs_f64(),
        last_new.unwrap_or_default().as_secs_f64(),
        working.len(),
        down_from.elapsed().as_secs_f64()
    );
    suite.delete_namespace(ns);
}

/// 50,000 items while a container of the Pipeline is SIGKILLed every 3 s (source, group, switcher
/// or sink, in turn), and the operator's pod deleted once: every item reaches the file once.
pub fn killed_pods_lose_and_double_nothing(suite: &Suite) {
    let ns = "chaos";
    suite.namespace(ns);
    suite.apply_ok(&format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: chaos, namespace: {ns}}}
spec:
  sources: [{{name: src, generator: {{count: 50000, ratePerSecond: 2500, payload: '{{"n": {{{{seq}}}}}}'}}}}]
  stages:
    - name: enrich
      image: python:3.12-slim
      stages:
        - {{name: tag, jq: '. + {{tagged: true}}'}}
        - name: py
          exec:
            command:
              - python3
              - -c
              - |
                import json, sys
                for line in sys.stdin:
                    m = json.loads(line)
                    print(json.dumps({{"id": m["id"], "outputs": [dict(m["data"], py=True)]}}), flush=True)
    - name: spread
      switcher: {{minReplicas: 2, maxReplicas: 3, targetLagPerReplica: 500}}
      passthrough: {{}}
  sinks: [{{name: out, file: {{path: out.jsonl}}}}]
"#
    ));
    wait_for(Duration::from_secs(120), "chaos Ready", || {
        ready(suite, ns, "chaos")
    });
    let started = Instant::now();
    let units = ["enrich", "spread", "out", "src"];
    let (mut kills, mut round, mut operator_deleted) = (0usize, 0usize, false);
    let mut lines = Vec::new();
    while started.elapsed() < Duration::from_secs(300) {
        lines = suite.sink_lines(ns, "chaos", "out", "out.jsonl");
        if lines.len() >= 50_000 {
            break;
        }
        if lines.len() < 45_000 {
            let unit = units[round % units.len()];
            round += 1;
            let pods = suite.pods(ns, "chaos", Some(unit));
            if let Some(pod) = pods.iter().find(|p| is_ready(p)) {
                kills += suite.kill_containers(std::slice::from_ref(pod));
            }
            if !operator_deleted && lines.len() > 20_000 {
                suite.kubectl_ok(&[
                    "delete",
                    "pod",
                    "-n",
                    SYSTEM,
                    "-l",
                    "app.kubernetes.io/component=operator",
                    "--wait=false",
                ]);
                operator_deleted = true;
            }
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(
        operator_deleted,
        "the run ended before the operator's pod was deleted"
    );
    exactly_once(&lines, "n", 50_000);
    let restarts: i64 = suite
        .pods(ns, "chaos", None)
        .iter()
        .flat_map(|p| {
            p["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum();
    println!(
        "  chaos: 50,000 items once in {:.1}s, {kills} containers SIGKILLed ({restarts} restarts counted), the operator's pod deleted once",
        started.elapsed().as_secs_f64()
    );
    wait_for(MINUTE, "the operator back", || {
        suite.json(&["get", "deployment", "switchyard", "-n", SYSTEM])["status"]["readyReplicas"]
            .as_i64()
            == Some(1)
    });
    suite.delete_namespace(ns);
}

/// Fork and join in pods (issue 26): 10,000 items (40 s of them) fork to three branches (one drops every third,
/// one makes two outputs of each) and two join replicas join them, while a pod of the join or of
/// a branch is SIGKILLed every 3 s; every item reaches the sink once with all its parts, and the
/// Pipeline's status shows what the join waits on.
pub fn a_join_in_pods_joins_every_item_once_while_its_pods_are_killed(suite: &Suite) {
    let ns = "forks";
    suite.namespace(ns);
    suite.apply_ok(&format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: forks, namespace: {ns}}}
spec:
  sources: [{{name: src, generator: {{count: 10000, ratePerSecond: 250, payload: '{{"n": {{{{seq}}}}}}'}}}}]
  stages:
    - {{name: price, inputs: [src], jq: '{{n, price: (.n * 2)}}'}}
    - {{name: stock, inputs: [src], jq: 'if .n % 3 == 0 then empty else {{n}} end'}}
    - {{name: reviews, inputs: [src], jq: '{{n, stars: 4}}, {{n, stars: 5}}'}}
    - name: answer
      join: {{of: [price, stock, reviews], timeout: 2m}}
      switcher: {{minReplicas: 2, maxReplicas: 2}}
      jq: '{{n: .price[0].n, price: .price[0].price, stock: (.stock | length), stars: [.reviews[].stars]}}'
  sinks: [{{name: out, file: {{path: out.jsonl}}}}]
"#
    ));
    wait_for(Duration::from_secs(120), "forks Ready", || {
        ready(suite, ns, "forks")
    });
    let started = Instant::now();
    let units = ["answer", "price", "stock", "reviews"];
    let (mut kills, mut round) = (0usize, 0usize);
    let mut lines = Vec::new();
    while started.elapsed() < Duration::from_secs(300) {
        lines = suite.sink_lines(ns, "forks", "out", "out.jsonl");
        if lines.len() >= 10_000 {
            break;
        }
        if lines.len() < 9_000 {
            let pods = suite.pods(ns, "forks", Some(units[round % units.len()]));
            round += 1;
            if let Some(pod) = pods.iter().find(|p| is_ready(p)) {
                kills += suite.kill_containers(std::slice::from_ref(pod));
            }
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    exactly_once(&lines, "n", 10_000);
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let n = v["n"].as_u64().unwrap();
        assert_eq!(v["price"].as_u64(), Some(n * 2), "{line}");
        assert_eq!(
            v["stock"].as_u64(),
            Some(u64::from(!n.is_multiple_of(3))),
            "{line}"
        );
        assert_eq!(v["stars"], serde_json::json!([4, 5]), "{line}");
    }
    assert!(kills >= 4, "only {kills} kills before the end");
    wait_for(
        MINUTE,
        "the status to show the join waiting on nothing",
        || {
            let pipeline = suite.json(&["get", "pipeline", "forks", "-n", ns]);
            pipeline["status"]["units"]
                .as_array()
                .and_then(|units| units.iter().find(|u| u["name"] == "answer"))
                .is_some_and(|u| u["join"]["waiting"].as_u64() == Some(0))
        },
    );
    println!(
        "  forks: 10,000 items joined once in {:.1}s, {kills} containers SIGKILLed",
        started.elapsed().as_secs_f64()
    );
    suite.delete_namespace(ns);
}

/// A Pipeline whose items end on a subject a stream of the test keeps (they outlive the sink's pod).
fn to_results(ns: &str, name: &str, count: u32, rate: u32, stages: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: {ns}}}
spec:
{extra}  sources: [{{name: src, generator: {{count: {count}, ratePerSecond: {rate}, payload: '{{"n": {{{{seq}}}}}}'}}}}]
  stages:
{stages}
  sinks: [{{name: out, nats: {{subject: results.{ns}.{name}}}}}]
"#
    )
}

/// A message that gets its stage's pod killed (here: a jq filter that outgrows the container's memory
/// limit on one item, and the kernel's OOM killer) costs only itself: the kubelet starts the
/// container again, JetStream delivers again what it held, each of those runs alone behind a crash
/// record, and after `afterCrashes` crashes of its own the culprit is dead-lettered while every
/// other item reaches the sink once.
pub fn a_message_that_kills_its_pod_is_dead_lettered_alone(suite: &Suite) {
    let ns = "poison";
    suite.namespace(ns);
    let nats = Nats::connect(suite);
    nats.results("poison_results", "results.poison.>");
    const TOTAL: u64 = 300;
    let stages = r#"    - name: greedy
      resources: {limits: {memory: 64Mi}, requests: {memory: 32Mi}}
      jq: 'if .n == 77 then ([range(100000000)] | length) as $all | . else . end'
"#;
    let extra = "  nats: {redeliverAfter: 2s}\n  deadLetter: {afterCrashes: 2}\n";
    let applied = Instant::now();
    suite.apply_ok(&to_results(ns, "pay", TOTAL as u32, 300, stages, extra));
    wait_for(
        Duration::from_secs(240),
        "the culprit dead-lettered and everything else at the sink",
        || {
            nats.count("poison_results") >= TOTAL - 1
                && suite
                    .plugin_ok(&["dlq", "list", "pay", "-n", ns])
                    .contains("pay: 1 dead letter ")
        },
    );
    let took = secs(applied);
    let shown = suite.plugin_ok(&["dlq", "show", "pay", "-n", ns, "--json"]);
    let letters: Vec<Value> = shown
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dlq show wrote {l:?}: {e}")))
        .collect();
    assert_eq!(letters.len(), 1, "{shown}");
    let letter = &letters[0];
    assert_eq!(letter["data"]["n"], 77, "{letter}");
    assert_eq!(letter["unit"], "greedy", "{letter}");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the unit's process died 2 times while it worked on this message alone"),
        "{error}"
    );
    let restarts: u64 = suite
        .pods(ns, "pay", Some("greedy"))
        .iter()
        .filter_map(|p| p["status"]["containerStatuses"][0]["restartCount"].as_u64())
        .sum();
    let killed_for = suite
        .pods(ns, "pay", Some("greedy"))
        .iter()
        .filter_map(|p| {
            p["status"]["containerStatuses"][0]["lastState"]["terminated"]["reason"]
                .as_str()
                .map(str::to_string)
        })
        .collect::<Vec<_>>();
    assert!(restarts >= 3, "the container restarted {restarts} times");
    let lines = nats.read_all("poison_results");
    let mut seen = std::collections::BTreeMap::<u64, usize>::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        *seen.entry(v["n"].as_u64().unwrap_or_default()).or_default() += 1;
    }
    let missing: Vec<u64> = (1..=TOTAL).filter(|n| !seen.contains_key(n)).collect();
    let doubled: Vec<u64> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(missing, vec![77], "missing at the sink");
    assert!(doubled.is_empty(), "twice at the sink: {doubled:?}");
    println!(
        "  a message that gets its pod OOM-killed: {} restarts ({killed_for:?}), the culprit dead-lettered after {} deliveries, the other {} at the sink once, {took}s after the apply",
        restarts,
        letter["deliveries"],
        lines.len()
    );
    suite.delete_namespace(ns);
}

fn deployments_at_zero(suite: &Suite, ns: &str, name: &str) -> bool {
    let all = suite.json(&[
        "get",
        "deployments",
        "-n",
        ns,
        "-l",
        &format!("switchyard.dev/pipeline={name}"),
    ]);
    let items = all["items"].as_array().cloned().unwrap_or_default();
    !items.is_empty()
        && items.iter().all(|d| {
            d["spec"]["replicas"].as_i64() == Some(0)
                && d["status"]["replicas"].as_i64().unwrap_or(0) == 0
        })
        && suite.pods(ns, name, None).is_empty()
}

/// `spec.paused`: the source stops, the units drain, every Deployment reaches 0 pods; unpaused, they
/// come back and the run completes, each item once.
pub fn a_paused_pipeline_drains_to_zero_pods_and_comes_back(suite: &Suite) {
    let ns = "pause";
    suite.namespace(ns);
    let nats = Nats::connect(suite);
    nats.results("pause_results", "results.pause.>");
    suite.apply_ok(&to_results(
        ns, "p", 20_000, 1000,
        "    - name: work\n      switcher: {minReplicas: 2, maxReplicas: 4, targetLagPerReplica: 500}\n      sleep: 1ms\n",
        "",
    ));
    wait_for(Duration::from_secs(120), "p Ready", || {
        ready(suite, ns, "p")
    });
    wait_for(MINUTE, "items flowing", || {
        nats.count("pause_results") > 2000
    });
    let paused = Instant::now();
    suite.kubectl_ok(&[
        "patch",
        "pipeline",
        "p",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    wait_for(
        Duration::from_secs(120),
        "every Deployment at 0 pods",
        || deployments_at_zero(suite, ns, "p"),
    );
    let to_zero = secs(paused);
    let (status, _, _) = suite.condition(ns, "p", "Paused").expect("Paused");
    assert_eq!(status, "True");
    let held = nats.count("pause_results");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        nats.count("pause_results"),
        held,
        "items kept coming while paused"
    );
    assert!(held < 20_000, "the run finished before the pause took");
    let resumed = Instant::now();
    suite.kubectl_ok(&[
        "patch",
        "pipeline",
        "p",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":false}}"#,
    ]);
    wait_for(
        Duration::from_secs(180),
        "all 20,000 after the resume",
        || nats.count("pause_results") >= 20_000,
    );
    let lines = nats.read_all("pause_results");
    exactly_once(&lines, "n", 20_000);
    println!(
        "  pause: every pod gone {to_zero}s after spec.paused ({held} items through by then); resumed, the rest through in {}s",
        secs(resumed)
    );
    suite.delete_namespace(ns);
}

/// An edit in place while items flow, with real pods: a stage inserted, then one removed; each item
/// once, by the definitions in force, and the migration's steps reported as they are taken.
pub fn an_edit_in_place_with_real_pods(suite: &Suite) {
    let ns = "edit";
    suite.namespace(ns);
    let nats = Nats::connect(suite);
    nats.results("edit_results", "results.edit.>");
    let first = "    - {name: a, jq: '. + {a: true}'}\n";
    let inserted = "    - {name: a, jq: '. + {a: true}'}\n    - {name: b, jq: '. + {b: true}'}\n";
    let removed = "    - {name: b, jq: '. + {b: true}'}\n";
    suite.apply_ok(&to_results(ns, "e", 30_000, 1000, first, ""));
    wait_for(Duration::from_secs(120), "e Ready", || {
        ready(suite, ns, "e")
    });
    wait_for(MINUTE, "items flowing", || {
        nats.count("edit_results") > 3000
    });
    let mut steps_seen: Vec<String> = Vec::new();
    let mut watch = |suite: &Suite| {
        let (status, reason, message) = suite.condition(ns, "e", "Progressing").unwrap_or_default();
        if status == "True" && reason == "Migrating" && steps_seen.last() != Some(&message) {
            steps_seen.push(message);
        }
    };
    for (what, stages) in [("insert b", inserted), ("remove a", removed)] {
        let edited = Instant::now();
        suite.apply_ok(&to_results(ns, "e", 30_000, 1000, stages, ""));
        let generation = suite.pipeline(ns, "e")["metadata"]["generation"].as_i64();
        wait_for(
            Duration::from_secs(180),
            &format!("the edit ({what}) carried out"),
            || {
                watch(suite);
                let p = suite.pipeline(ns, "e");
                p["status"]["observedGeneration"].as_i64() == generation
                    && p["status"]["migration"].is_null()
                    && ready(suite, ns, "e")
            },
        );
        println!("  edit {what}: carried out in {}s", secs(edited));
        std::thread::sleep(Duration::from_secs(2));
    }
    wait_for(Duration::from_secs(180), "all 30,000", || {
        nats.count("edit_results") >= 30_000
    });
    let lines = nats.read_all("edit_results");
    exactly_once(&lines, "n", 30_000);
    let items: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let with = |a: bool, b: bool| {
        items
            .iter()
            .filter(|v| {
                v["a"].as_bool().unwrap_or(false) == a && v["b"].as_bool().unwrap_or(false) == b
            })
            .count()
    };
    let (only_a, both, only_b, neither) = (
        with(true, false),
        with(true, true),
        with(false, true),
        with(false, false),
    );
    println!("  edit: a only {only_a}, a and b {both}, b only {only_b}, neither {neither}; steps reported: {steps_seen:?}");
    assert!(only_a > 0 && only_b > 0, "both edits showed in the items");
    assert_eq!(neither, 0, "an item passed no stage");
    assert!(!steps_seen.is_empty(), "no migration step was reported");
    suite.delete_namespace(ns);
}

/// The day-2 commands against a Pipeline that runs in pods: status, dead letters listed and
/// replayed into the fixed unit, a tap and a trace.
pub fn kubectl_switchyard_against_a_running_pipeline(suite: &Suite) {
    let ns = "day2";
    suite.namespace(ns);
    let nats = Nats::connect(suite);
    nats.results("day2_results", "results.day2.>");
    let stages = |fixed: bool| {
        format!(
            r#"    - name: charge
      image: python:3.12-slim
      retry: {{maxAttempts: 1}}
      env: [{{name: FIXED, value: "{fixed}"}}]
      exec:
        command:
          - python3
          - -c
          - |
            import json, os, sys
            fixed = os.environ["FIXED"] == "true"
            for line in sys.stdin:
                m = json.loads(line)
                if m["data"]["n"] % 10 == 0 and not fixed:
                    print(json.dumps({{"id": m["id"], "error": "card declined for order %d" % m["data"]["n"]}}), flush=True)
                else:
                    print(json.dumps({{"id": m["id"], "outputs": [m["data"]]}}), flush=True)
"#
        )
    };
    let tracing = "  tracing: {sampleRate: 1}\n";
    suite.apply_ok(&to_results(ns, "pay", 300, 300, &stages(false), tracing));
    wait_for(Duration::from_secs(120), "270 paid", || {
        nats.count("day2_results") >= 270
    });
    wait_for(MINUTE, "30 dead letters in the status", || {
        suite.pipeline(ns, "pay")["status"]["units"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|u| u["name"] == "charge" && u["deadLettered"].as_u64() == Some(30))
    });
    let status = suite.plugin_ok(&["status", "pay", "-n", ns]);
    println!(
        "  kubectl switchyard status:\n{}",
        status
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(status.contains("live from NATS"), "{status}");
    assert!(
        status.lines().any(|l| l.trim_start().starts_with("charge")),
        "{status}"
    );
    let list = suite.plugin_ok(&["dlq", "list", "pay", "-n", ns]);
    assert!(list.contains("pay: 30 dead letters"), "{list}");
    assert!(list.contains("card declined for order #"), "{list}");
    let trace = suite.plugin_ok(&["trace", "pay", "src:7", "-n", ns]);
    assert!(trace.contains("charge") && trace.contains("out"), "{trace}");

    // The fix rolls the unit's pods; the replay puts the letters back where they failed.
    suite.apply_ok(&to_results(ns, "pay", 300, 300, &stages(true), tracing));
    wait_for(
        Duration::from_secs(120),
        "the fixed unit rolled out",
        || {
            let pods = suite.pods(ns, "pay", Some("charge"));
            !pods.is_empty()
                && pods.iter().all(|p| {
                    is_ready(p)
                        && p["spec"]["containers"][0]["env"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|e| e["name"] == "FIXED" && e["value"] == "true")
                })
        },
    );
    // Everything is through and acknowledged, so a tap shows what comes next: the replayed letters
    // on the input of the unit they failed in.
    let mut tap = suite.plugin_in_background(&["tap", "pay", "charge", "-n", ns, "--count", "30"]);
    tap.wait_for_stderr("tapping switchyard.day2.pay.data.src", MINUTE);
    let replayed = suite.plugin_ok(&["dlq", "replay", "pay", "-n", ns]);
    assert!(replayed.contains("replayed 30 dead letters"), "{replayed}");
    let tapped = tap.finish(MINUTE);
    let records: Vec<Value> = tapped
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("tap wrote {l:?}: {e}")))
        .collect();
    assert_eq!(records.len(), 30, "{tapped}");
    assert!(
        records
            .iter()
            .all(|r| r["data"]["n"].as_u64().is_some_and(|n| n % 10 == 0)),
        "the tap showed what was not replayed: {tapped}"
    );
    wait_for(Duration::from_secs(120), "all 300 paid", || {
        nats.count("day2_results") >= 300
    });
    exactly_once(&nats.read_all("day2_results"), "n", 300);
    assert!(suite
        .plugin_ok(&["dlq", "list", "pay", "-n", ns])
        .contains("pay: 0 dead letters"));
    suite.delete_namespace(ns);
}

/// A NATS that wants a token: the Pipeline names a Secret, and its units read the token from the
/// Secret mounted in their pods (it appears in no pod's spec or environment).
pub fn units_read_nats_credentials_from_the_mounted_secret(suite: &Suite) {
    let ns = "creds";
    suite.namespace(ns);
    let token = "pods-suite-token-5f1c2a";
    suite.apply_ok(&format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: nats-token, namespace: {ns}}}
stringData: {{token: {token}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: nats-auth, namespace: {ns}}}
data:
  nats.conf: |
    port: 4222
    http_port: 8222
    authorization {{ token: "{token}" }}
    jetstream {{ store_dir: /data, max_memory_store: 64Mi, max_file_store: 256Mi }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: nats-auth, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: nats-auth}}}}
  template:
    metadata: {{labels: {{app: nats-auth}}}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 1000, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
        - name: nats
          image: nats:2.11-alpine
          imagePullPolicy: IfNotPresent
          args: ["--config", "/etc/nats/nats.conf"]
          ports: [{{containerPort: 4222}}]
          readinessProbe: {{httpGet: {{path: /healthz, port: 8222}}, periodSeconds: 2}}
          securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
          volumeMounts: [{{name: config, mountPath: /etc/nats}}, {{name: data, mountPath: /data}}]
      volumes: [{{name: config, configMap: {{name: nats-auth}}}}, {{name: data, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: nats-auth, namespace: {ns}}}
spec:
  selector: {{app: nats-auth}}
  ports: [{{port: 4222, targetPort: 4222}}]
---
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: secret, namespace: {ns}}}
spec:
  nats: {{url: "nats://nats-auth.{ns}.svc:4222", credentialsSecret: nats-token}}
  sources: [{{name: src, generator: {{count: 1000, ratePerSecond: 500}}}}]
  stages: [{{name: work, passthrough: {{}}}}]
  sinks: [{{name: out, file: {{path: out.jsonl}}}}]
"#
    ));
    wait_for(
        Duration::from_secs(120),
        "the Pipeline Ready on the NATS that wants a token",
        || ready(suite, ns, "secret"),
    );
    wait_for(Duration::from_secs(120), "1,000 items at the sink", || {
        suite.sink_lines(ns, "secret", "out", "out.jsonl").len() >= 1000
    });
    exactly_once(
        &suite.sink_lines(ns, "secret", "out", "out.jsonl"),
        "seq",
        1000,
    );
    let pods = suite.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        "switchyard.dev/pipeline=secret",
        "-o",
        "json",
    ]);
    assert!(!pods.contains(token), "the token is in a pod's spec");
    let pod: Value = serde_json::from_str(&pods).expect("JSON");
    let mounted = pod["items"][0]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["secret"]["secretName"] == "nats-token");
    assert!(mounted, "the Secret is not mounted");
    let logs = suite.kubectl_ok(&["logs", "-n", SYSTEM, "deploy/switchyard"]);
    assert!(!logs.contains(token), "the token is in the operator's log");
    suite.delete_namespace(ns);
}

/// A second node with a label and a taint: a stage with the matching nodeSelector and toleration
/// runs there, the others stay on the first node; one that asks for the node without tolerating its
/// taint cannot be scheduled, and the status says so.
pub fn placement_follows_node_selector_and_tolerations(suite: &Suite) {
    let ns = "placement";
    suite.namespace(ns);
    let pool = switchyard_e2e::cluster::layout::POOL_LABEL;
    let taint = switchyard_e2e::cluster::layout::POOL_TAINT;
    suite.apply_ok(&format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: placed, namespace: {ns}}}
spec:
  sources: [{{name: src, generator: {{count: 500, ratePerSecond: 500}}}}]
  stages:
    - name: batch
      switcher: {{minReplicas: 2, maxReplicas: 2}}
      nodeSelector: {{"{pool}": batch}}
      tolerations: [{{key: "{taint}", operator: Equal, value: batch, effect: NoSchedule}}]
      passthrough: {{}}
    - name: general
      passthrough: {{}}
  sinks: [{{name: out, file: {{path: out.jsonl}}}}]
"#
    ));
    wait_for(Duration::from_secs(120), "placed Ready", || {
        ready(suite, ns, "placed")
    });
    let worker = &suite.cluster.layout.nodes[1].name;
    let first = &suite.cluster.layout.nodes[0].name;
    for pod in suite.pods(ns, "placed", None) {
        let unit = pod["metadata"]["labels"]["switchyard.dev/unit"]
            .as_str()
            .unwrap_or_default();
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        let expected = if unit == "batch" { worker } else { first };
        assert_eq!(node, expected, "unit {unit}'s pod");
    }
    wait_for(MINUTE, "500 items at the sink", || {
        suite.sink_lines(ns, "placed", "out", "out.jsonl").len() >= 500
    });

    suite.apply_ok(&format!(
        r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {{name: untolerated, namespace: {ns}}}
spec:
  sources: [{{name: src, generator: {{count: 10}}}}]
  stages:
    - name: batch
      nodeSelector: {{"{pool}": batch}}
      passthrough: {{}}
  sinks: [{{name: out, log: {{}}}}]
"#
    ));
    let mut message = String::new();
    wait_for(
        MINUTE,
        "Degraded naming the unschedulable pod",
        || match suite.condition(ns, "untolerated", "Degraded") {
            Some((s, r, m)) if s == "True" && r == "PodsFailing" => {
                message = m;
                true
            }
            _ => false,
        },
    );
    println!("  placement: batch on {worker}, the rest on {first}; untolerated: {message}");
    assert!(message.contains("Unschedulable"), "{message}");
    assert!(
        message.starts_with("batch: pod untolerated-batch-"),
        "{message}"
    );
    suite.delete_namespace(ns);
}

/// `helm uninstall` with a Pipeline left is refused, naming it, and the operator stays; with
/// `uninstall.pipelines=delete` it deletes the Pipeline while the operator still runs, and nothing is
/// left running. The last scenario: it takes the chart away.
pub fn helm_uninstall_with_pipelines_left(suite: &Suite) {
    let ns = "leftover";
    suite.namespace(ns);
    suite.apply_ok(&to_results(
        ns,
        "left",
        100,
        100,
        "    - {name: work, passthrough: {}}\n",
        "",
    ));
    wait_for(Duration::from_secs(120), "left Ready", || {
        ready(suite, ns, "left")
    });
    let refused = suite.helm(&[
        "uninstall",
        "switchyard",
        "-n",
        SYSTEM,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(
        !refused.status.success(),
        "helm uninstall went ahead with a Pipeline left"
    );
    let said = suite.kubectl_ok(&["logs", "-n", SYSTEM, "job/switchyard-uninstall"]);
    println!("  refused: {}", text(&refused.stderr).trim());
    assert!(
        said.contains("not uninstalling") && said.contains("leftover/left"),
        "{said}"
    );
    assert!(
        suite.json(&["get", "deployment", "switchyard", "-n", SYSTEM])["status"]["readyReplicas"]
            .as_i64()
            == Some(1),
        "the operator went away"
    );
    assert!(ready(suite, ns, "left"));

    // Helm keeps a release whose pre-delete hook failed as `uninstalling`, and upgrades only a
    // deployed one: the refusal says to roll back first.
    let rollback = format!("`helm rollback switchyard 1 -n {SYSTEM}`");
    assert!(said.contains(&rollback), "{said}");
    succeeded(
        "helm rollback",
        suite.helm(&[
            "rollback",
            "switchyard",
            "1",
            "-n",
            SYSTEM,
            "--wait",
            "--timeout",
            "120s",
        ]),
    );
    let chart = suite.repo.join("charts/switchyard");
    succeeded(
        "helm upgrade",
        suite.helm(&[
            "upgrade",
            "switchyard",
            &chart.display().to_string(),
            "-n",
            SYSTEM,
            "--reuse-values",
            "--set",
            "uninstall.pipelines=delete",
            "--wait",
            "--timeout",
            "120s",
        ]),
    );
    let started = Instant::now();
    succeeded(
        "helm uninstall",
        suite.helm(&[
            "uninstall",
            "switchyard",
            "-n",
            SYSTEM,
            "--wait",
            "--timeout",
            "180s",
        ]),
    );
    println!(
        "  helm uninstall with uninstall.pipelines=delete took {}s",
        secs(started)
    );
    assert!(suite.json(&["get", "pipelines", "-A"])["items"]
        .as_array()
        .is_some_and(|a| a.is_empty()));
    wait_for(MINUTE, "no unit left running", || {
        suite.pods(ns, "left", None).is_empty()
    });
    let left = suite.json(&[
        "get",
        "deployments",
        "-A",
        "-l",
        "app.kubernetes.io/managed-by=switchyard-operator",
    ]);
    assert!(
        left["items"].as_array().is_some_and(|a| a.is_empty()),
        "{left}"
    );
    suite.delete_namespace(ns);
}
