//! Starts, watches and restarts the `switchyard-stage` processes of a local run.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A line a unit printed on stdout (what a log sink writes).
pub struct OutputLine {
    pub unit: String,
    pub line: String,
}

/// Something the person watching should know.
pub enum Event {
    Restarted {
        unit: String,
        pid: u32,
        status: String,
    },
}

struct Replica {
    child: Child,
    /// Asked to stop because the unit scaled down: its exit is expected, not a failure.
    retiring: bool,
    /// Kept apart: the child forgets its pid once it has been reaped.
    pid: u32,
    /// How the process names itself in its reports (`<unit>-<n>`): unique in the run, unlike the host
    /// name the stage runtime would otherwise use.
    name: String,
    started: Instant,
    log: PathBuf,
}

pub struct UnitProcesses {
    pub unit: String,
    pub is_source: bool,
    pub is_finite_source: bool,
    pub wanted: usize,
    /// A finite source that exited successfully: its work is done.
    pub finished: bool,
    pub restarts: u32,
    pub most_replicas: usize,
    config: PathBuf,
    replicas: Vec<Replica>,
    /// Processes started so far, to name their logs.
    started: usize,
    quick_failures: u32,
    next_start: Option<Instant>,
    delay: Duration,
}

impl UnitProcesses {
    /// Replicas running and not on their way out.
    pub fn running(&self) -> usize {
        self.replicas.iter().filter(|r| !r.retiring).count()
    }
}

/// A process that dies this soon after starting counts towards a crash loop.
const QUICK: Duration = Duration::from_secs(5);
/// Quick deaths in a row after which the run gives up instead of restarting forever.
const CRASH_LOOP: u32 = 5;

pub struct Supervisor {
    pub units: Vec<UnitProcesses>,
    stage_bin: PathBuf,
    nats_url: String,
    /// The NATS credentials, as environment variables: never on a command line, which every user of
    /// the machine can read.
    nats_env: Vec<(&'static str, String)>,
    work_dir: PathBuf,
    logs_dir: PathBuf,
    output: mpsc::UnboundedSender<OutputLine>,
    verbose: bool,
}

/// Why the run cannot go on.
#[derive(Debug)]
pub struct CrashLoop {
    pub unit: String,
    pub status: String,
    pub log: PathBuf,
}

impl Supervisor {
    pub fn new(
        stage_bin: PathBuf,
        nats_url: String,
        nats_env: Vec<(&'static str, String)>,
        work_dir: PathBuf,
        logs_dir: PathBuf,
        output: mpsc::UnboundedSender<OutputLine>,
        verbose: bool,
    ) -> Supervisor {
        Supervisor {
            units: Vec::new(),
            stage_bin,
            nats_url,
            nats_env,
            work_dir,
            logs_dir,
            output,
            verbose,
        }
    }

    pub fn add(
        &mut self,
        unit: &str,
        config: PathBuf,
        wanted: usize,
        is_source: bool,
        is_finite_source: bool,
    ) {
        self.units.push(UnitProcesses {
            unit: unit.to_string(),
            is_source,
            is_finite_source,
            wanted,
            finished: false,
            restarts: 0,
            most_replicas: 0,
            config,
            replicas: Vec::new(),
            started: 0,
            quick_failures: 0,
            next_start: Some(Instant::now()),
            delay: Duration::from_millis(200),
        });
    }

    /// Reaps exited processes, restarts what must run, and starts what is due.
    pub fn poll(&mut self, events: &mut Vec<Event>) -> Result<(), CrashLoop> {
        let now = Instant::now();
        for index in 0..self.units.len() {
            let mut exited: Vec<(u32, ExitStatus, Duration, PathBuf)> = Vec::new();
            let unit = &mut self.units[index];
            unit.replicas.retain_mut(|r| match r.child.try_wait() {
                Ok(Some(_)) if r.retiring => false,
                Ok(Some(status)) => {
                    exited.push((r.pid, status, r.started.elapsed(), r.log.clone()));
                    false
                }
                _ => true,
            });
            for (pid, status, ran, log) in exited {
                if unit.is_finite_source && status.success() {
                    unit.finished = true;
                    continue;
                }
                unit.restarts += 1;
                if ran < QUICK {
                    unit.quick_failures += 1;
                } else {
                    unit.quick_failures = 1;
                    unit.delay = Duration::from_millis(200);
                }
                if unit.quick_failures >= CRASH_LOOP {
                    return Err(CrashLoop {
                        unit: unit.unit.clone(),
                        status: describe(status),
                        log,
                    });
                }
                events.push(Event::Restarted {
                    unit: unit.unit.clone(),
                    pid,
                    status: describe(status),
                });
                unit.next_start = Some(now + unit.delay);
                unit.delay = (unit.delay * 2).min(Duration::from_secs(5));
            }
            let unit = &mut self.units[index];
            if unit.finished || unit.running() >= unit.wanted {
                continue;
            }
            let due = *unit.next_start.get_or_insert(now) <= now;
            if !due {
                continue;
            }
            let missing = unit.wanted - unit.running();
            for _ in 0..missing {
                if let Err(e) = self.spawn(index) {
                    return Err(CrashLoop {
                        unit: self.units[index].unit.clone(),
                        status: format!("cannot start {}: {e}", self.stage_bin.display()),
                        log: PathBuf::new(),
                    });
                }
            }
            let unit = &mut self.units[index];
            unit.next_start = None;
            unit.most_replicas = unit.most_replicas.max(unit.running());
        }
        Ok(())
    }

    fn spawn(&mut self, index: usize) -> std::io::Result<()> {
        let unit = &mut self.units[index];
        unit.started += 1;
        let log = self
            .logs_dir
            .join(format!("{}-{}.log", unit.unit, unit.started));
        let name = format!("{}-{}", unit.unit, unit.started);
        let unit = &self.units[index];
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(&self.stage_bin);
        command
            .arg("--config")
            .arg(&unit.config)
            .arg("--replica")
            .arg(&name)
            .arg("--nats-url")
            .arg(&self.nats_url)
            .arg("--exit-when-done")
            // Each process serves its Prometheus metrics on a port of its own (see its log).
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            // Ctrl-C reaches `switchyard run` only; it stops the units in order.
            .process_group(0);
        switchyard_platform::credentials::env::withhold(command.as_std_mut());
        command.envs(self.nats_env.iter().map(|(k, v)| (k, v)));
        if !self.verbose {
            command.env("SWITCHYARD_LOG", "info,async_nats=warn");
        }
        switchyard_platform::os::die_with_parent(command.as_std_mut());
        let mut child = command.spawn()?;
        if let Some(stdout) = child.stdout.take() {
            let sender = self.output.clone();
            let name = unit.unit.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if sender
                        .send(OutputLine {
                            unit: name.clone(),
                            line,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        let unit = &mut self.units[index];
        let replica_id = child.id().unwrap_or_default();
        tracing::debug!(unit = %unit.unit, pid = replica_id, "started");
        unit.replicas.push(Replica {
            child,
            retiring: false,
            pid: replica_id,
            name,
            started: Instant::now(),
            log,
        });
        Ok(())
    }

    /// Sets how many replicas `unit` runs: more are started by the next poll, surplus ones (the newest)
    /// are asked to stop and finish what they hold.
    pub fn scale(&mut self, unit: &str, wanted: usize) {
        let Some(u) = self.units.iter_mut().find(|u| u.unit == unit) else {
            return;
        };
        u.wanted = wanted;
        let surplus = u.running().saturating_sub(wanted);
        for replica in u
            .replicas
            .iter_mut()
            .rev()
            .filter(|r| !r.retiring)
            .take(surplus)
        {
            replica.retiring = true;
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(replica.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if u.running() < wanted {
            u.next_start.get_or_insert_with(Instant::now);
        }
    }

    /// Replaces a unit's processes with ones that run `config`: the old ones are asked to stop and
    /// finish what they hold while the new ones start. See `rolled`.
    pub fn roll(&mut self, unit: &str, config: PathBuf) {
        let Some(u) = self.units.iter_mut().find(|u| u.unit == unit) else {
            return;
        };
        u.config = config;
        // A finished source that changes runs again: from its checkpoint, it may have more to do.
        u.finished = false;
        for replica in u.replicas.iter_mut().filter(|r| !r.retiring) {
            replica.retiring = true;
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(replica.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        u.quick_failures = 0;
        u.next_start = Some(Instant::now());
    }

    /// No process of the unit's configuration before the last `roll` is left.
    pub fn rolled(&self, unit: &str) -> bool {
        self.units
            .iter()
            .find(|u| u.unit == unit)
            .is_none_or(|u| u.replicas.iter().all(|r| !r.retiring))
    }

    /// Stops a unit for good: its processes finish what they hold, then `forget` drops it.
    pub fn retire(&mut self, unit: &str) {
        self.scale(unit, 0);
    }

    /// Drops a retired unit once none of its processes is left; true when it is gone.
    pub fn forget(&mut self, unit: &str) -> bool {
        let Some(index) = self.units.iter().position(|u| u.unit == unit) else {
            return true;
        };
        if self.units[index].replicas.is_empty() {
            self.units.remove(index);
            return true;
        }
        false
    }

    pub fn all_sources_finished(&self) -> bool {
        self.units
            .iter()
            .filter(|u| u.is_source)
            .all(|u| u.is_finite_source && u.finished)
    }

    /// Asks every process to stop (sources first, so nothing new comes in), then waits up to `grace`
    /// before killing what is left.
    /// Returns the replicas that stopped by themselves within `grace` (the others are killed): each sent
    /// a last report as it went.
    pub async fn stop_all(&mut self, grace: Duration) -> Vec<String> {
        let order: Vec<usize> = (0..self.units.len())
            .filter(|&i| self.units[i].is_source)
            .chain((0..self.units.len()).filter(|&i| !self.units[i].is_source))
            .collect();
        for i in &order {
            for replica in &self.units[*i].replicas {
                if let Some(pid) = replica.child.id() {
                    // SAFETY: kill(2) on a child we started and have not reaped.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                }
            }
        }
        let deadline = Instant::now() + grace;
        let mut stopped = Vec::new();
        for i in order {
            for replica in &mut self.units[i].replicas {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, replica.child.wait()).await {
                    Ok(Ok(status)) if status.success() => stopped.push(replica.name.clone()),
                    Ok(_) => {}
                    Err(_) => {
                        let _ = replica.child.kill().await;
                    }
                }
            }
            self.units[i].replicas.clear();
        }
        stopped
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
