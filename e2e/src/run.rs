//! A `switchyard run` in the background, as the fault tests drive it: its notes (stderr) in a file
//! that can be read while it grows, its sink's file, and what it says about its NATS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::binaries::binary;
use crate::wait::wait_until;

pub struct BackgroundRun {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl BackgroundRun {
    /// Writes `yaml` as `p.yaml` in a folder of its own and runs it with `extra` arguments and `env`.
    pub fn start(yaml: &str, extra: &[&str], env: &[(&str, &str)]) -> BackgroundRun {
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::write(dir.path().join("p.yaml"), yaml).expect("write the Pipeline");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("a log file");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("a log file");
        let child = Command::new(binary("switchyard"))
            .args(["run", "p.yaml", "--progress", "lines"])
            .args(extra)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start switchyard run");
        BackgroundRun { child, dir }
    }

    /// Runs `p.yaml` again in the same folder, with `extra` arguments (`--resume`), once the run
    /// before has ended. Its notes and output start afresh.
    pub fn again(&mut self, extra: &[&str]) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "the run before is still going"
        );
        let stderr = std::fs::File::create(self.path("stderr.log")).expect("a log file");
        let stdout = std::fs::File::create(self.path("stdout.log")).expect("a log file");
        self.child = Command::new(binary("switchyard"))
            .args(["run", "p.yaml", "--progress", "lines"])
            .args(extra)
            .current_dir(self.dir.path())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start switchyard run");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the run has said so far (its notes and progress lines).
    pub fn notes(&self) -> String {
        std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
    }

    /// What the run printed on stdout (its summary, once it has finished).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.path("stdout.log")).unwrap_or_default()
    }

    pub fn wait_for_note(&self, words: &str) {
        let started = Instant::now();
        while !self.notes().contains(words) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no `{words}` in:\n{}",
                self.notes()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the file `name` has at least `lines` lines.
    pub fn wait_for_lines(&self, name: &str, lines: usize) {
        let file = self.path(name);
        wait_until(
            Duration::from_secs(120),
            &format!("{lines} lines in {name}"),
            || crate::wait::line_count(&file) >= lines,
        );
    }

    /// Waits for the run to end, killing it (and failing) after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the run") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "the run did not stop within {limit:?}; it said:\n{}",
                    self.notes()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The NATS servers the run says it uses (`NATS at URL` in its first note).
    pub fn nats_url(&self) -> String {
        self.wait_for_note("NATS at ");
        let notes = self.notes();
        let after = &notes[notes.find("NATS at ").map_or(0, |i| i + 8)..];
        after
            .split([' ', ';', '\n'])
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The run's stream (`stream NAME` in its first note).
    pub fn stream(&self) -> String {
        self.wait_for_note("; stream ");
        let notes = self.notes();
        let after = &notes[notes.find("; stream ").map_or(0, |i| i + 9)..];
        after
            .split([' ', '\n'])
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The leader of the run's stream and its followers, as JetStream reports them (a run on a
    /// cluster of its own, `--nats-cluster N`); waits up to a minute for a leader.
    pub fn stream_peers(&self) -> (String, Vec<String>) {
        let (url, stream) = (self.nats_url(), self.stream());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let servers = switchyard_platform::nats::server_addrs(&url).expect("the run's servers");
            let client = async_nats::connect(servers).await.expect("connect");
            let js = async_nats::jetstream::new(client);
            let started = Instant::now();
            loop {
                let info = match js.get_stream(&stream).await {
                    Ok(mut s) => s.info().await.ok().cloned(),
                    Err(_) => None,
                };
                if let Some(cluster) = info.and_then(|i| i.cluster) {
                    if let Some(leader) = cluster.leader.filter(|l| !l.is_empty()) {
                        let followers = cluster.replicas.into_iter().map(|r| r.name).collect();
                        return (leader, followers);
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no leader of stream {stream}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// The pid of the run's own nats-server named `name` (`node-2`), or its only one.
    pub fn nats_server_pid(&self, name: Option<&str>) -> u32 {
        let servers = crate::processes::children_with(self.child.id(), "nats-server");
        let chosen: Vec<u32> = servers
            .into_iter()
            .filter(|pid| {
                name.is_none_or(|name| {
                    crate::processes::command_line(*pid).contains(&format!("--name {name} "))
                })
            })
            .collect();
        assert_eq!(chosen.len(), 1, "nats-server {name:?}: {chosen:?}");
        chosen[0]
    }
}

/// A generator (`count` items at `rate` a second) through a two-replica jq switcher to a file sink
/// `out.jsonl`: the Pipeline of the outage and failover tests.
pub fn generator_through_a_switcher(count: u64, rate: u64) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: outage}}\nspec:\n  sources: [{{name: numbers, generator: {{count: {count}, ratePerSecond: {rate}}}}}]\n  stages:\n    - name: work\n      switcher: {{minReplicas: 2, maxReplicas: 2}}\n      jq: '. + {{seen: true}}'\n  sinks: [{{name: out, file: {{path: out.jsonl}}}}]\n"
    )
}

impl Drop for BackgroundRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How many of the items 1..=`total` a sink file lost or holds more than once, by the integer at
/// `field` in each line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub lines: usize,
    pub lost: Vec<u64>,
    pub duplicated: Vec<u64>,
}

impl Tally {
    pub fn of(file: &Path, field: &str, total: u64) -> Tally {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for line in text.lines() {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let seq = value[field]
                .as_u64()
                .unwrap_or_else(|| panic!("no integer `{field}` in {line}"));
            *seen.entry(seq).or_default() += 1;
        }
        Tally {
            lines: text.lines().count(),
            lost: (1..=total).filter(|i| !seen.contains_key(i)).collect(),
            duplicated: seen
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(seq, _)| *seq)
                .collect(),
        }
    }

    /// Every item exactly once.
    pub fn assert_exactly_once(&self, total: u64) {
        assert!(
            self.lost.is_empty() && self.duplicated.is_empty(),
            "{} lines for {total} items: {} lost (first {:?}), {} duplicated (first {:?})",
            self.lines,
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)],
            self.duplicated.len(),
            &self.duplicated[..self.duplicated.len().min(5)]
        );
        assert_eq!(self.lines as u64, total);
    }
}
