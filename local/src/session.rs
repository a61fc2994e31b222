//! A run in progress: the stage processes, their reports, the lag of every consumer, the autoscaler,
//! and the progress view, until the sources are done and everything is drained (or Ctrl-C).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use switchyard_crds::layout::Names;
use switchyard_crds::topology::type_of;
use switchyard_crds::unit::{StatsReport, UnitRole};
use switchyard_crds::{GeneratorSource, SourceKind};
use switchyard_platform::reports::Reports;
use tokio::sync::mpsc;

use crate::args::RunArgs;
use crate::error::RunError;
use crate::migrate::{self, Edit, FileWatch, Hands, Planned, Progress};
use crate::prepare::Prepared;
use crate::progress::{Display, Row};
use crate::quiet::Quiet;
use crate::run_folder;
use crate::scaling::LocalScaler;
use crate::supervisor::{self, CrashLoop, Event, OutputLine, Supervisor};
use crate::watchdog::{NatsWatch, ServerCrashLoop, StopSignals};
use crate::RunNats;

/// Why a run had to end early.
#[derive(Debug)]
pub enum Failure {
    /// A unit's processes keep dying.
    Unit(CrashLoop),
    /// One of the run's own NATS servers keeps exiting.
    Server(ServerCrashLoop),
}

impl From<CrashLoop> for Failure {
    fn from(crash: CrashLoop) -> Failure {
        Failure::Unit(crash)
    }
}

/// How often lags are read and the progress view redrawn.
const REFRESH_EVERY: Duration = Duration::from_millis(300);
/// How long one reading of every consumer's lag may take.
const LAGS_WITHIN: Duration = Duration::from_secs(2);
/// How long a stopped run waits for the last reports of the processes that stopped cleanly.
const LAST_REPORTS_WITHIN: Duration = Duration::from_secs(2);

/// How a run that did not crash ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every source finished and every consumer is empty.
    Completed,
    /// Ctrl-C.
    Interrupted,
}

pub struct Session {
    pub supervisor: Supervisor,
    pub reports: Reports,
    pub scaler: LocalScaler,
    pub nats_watch: NatsWatch,
    pub started: Instant,
    /// Holds each unit's config and the processes' logs; kept when a unit crash-loops.
    run_dir: tempfile::TempDir,
    /// The processes' logs: `--logs`, or a folder in `run_dir`.
    logs_dir: PathBuf,
    output: mpsc::UnboundedReceiver<OutputLine>,
    stream: jetstream::stream::Stream,
    lags: HashMap<String, u64>,
    /// Units that read, in flow order, with their consumers.
    consumers: Vec<(String, String)>,
    /// What a generator with a count will have produced when it finishes.
    totals_of_source: HashMap<String, u64>,
    /// `switchyard pause` and `resume`, from other terminals.
    control: async_nats::Subscriber,
    pause: Option<Pause>,
    /// `--watch`: the file, and the edit being carried out.
    file: PathBuf,
    file_watch: Option<FileWatch>,
    edit: Option<Box<Edit>>,
    edits: u32,
    edit_seen: bool,
    /// Whether anything is left to do once every consumer is empty (joins' waiting items).
    quiet: Quiet,
}

/// A run paused by `switchyard pause`: its sources stopped, its units draining or stopped.
struct Pause {
    /// Each unit's replicas when the pause came, to come back at.
    previous: Vec<(String, usize)>,
    /// Every unit is stopped (false: they are draining what the sources had stored).
    stopped: bool,
}

/// What `switchyard pause` and `resume` send a run.
pub const PAUSE: &str = "pause";
pub const RESUME: &str = "resume";
/// Asks a run for each switcher's last scaling change, as JSON (`{"unit": "2 → 4: why"}`).
pub const SCALING: &str = "scaling";

impl Session {
    /// Listens for reports and starts every unit's processes, readers first, so that every consumer is
    /// being pulled from before anything is produced.
    pub async fn start(
        prepared: &Prepared,
        nats: &RunNats,
        stage_bin: PathBuf,
        args: &RunArgs,
    ) -> Result<Session, RunError> {
        let (run_dir, logs_dir) = run_folder::create(&prepared.name, args.logs.as_deref())?;
        let reports = Reports::default();
        let names = Names::new(&prepared.topology.namespace, &prepared.name);
        reports
            .listen(&nats.client, names.all_stats_subjects(), |_, report| {
                Some(report.unit.clone())
            })
            .await?;
        nats.client
            .flush()
            .await
            .map_err(RunError::nats("subscribe to the units' reports"))?;
        let (output_tx, output) = mpsc::unbounded_channel::<OutputLine>();
        let mut supervisor = Supervisor::new(
            stage_bin,
            nats.url.clone(),
            nats.auth.child_env(),
            prepared.base_dir.clone(),
            logs_dir.clone(),
            output_tx,
            args.verbose,
        );
        run_folder::add_units(&mut supervisor, prepared, run_dir.path())?;
        let stream = nats
            .js
            .get_stream(&prepared.layout.nats.stream.name)
            .await
            .map_err(RunError::nats("open the run's stream"))?;
        let control = nats
            .client
            .subscribe(names.control_subject())
            .await
            .map_err(RunError::nats("listen for pause and resume"))?;
        Ok(Session {
            supervisor,
            reports,
            scaler: LocalScaler::new(&prepared.topology),
            nats_watch: NatsWatch::default(),
            started: Instant::now(),
            run_dir,
            logs_dir,
            output,
            stream,
            lags: HashMap::new(),
            consumers: consumers_in_flow_order(prepared),
            totals_of_source: totals_of_sources(prepared),
            control,
            pause: None,
            file: args.file.clone(),
            file_watch: args.watch.then(|| FileWatch::new(&args.file)),
            edit: None,
            quiet: Quiet::new(&prepared.layout.units),
            edits: 0,
            edit_seen: false,
        })
    }

    /// Keeps the units running and the view current until the run completes or is interrupted; a unit
    /// that keeps failing ends it early.
    pub async fn watch(
        &mut self,
        prepared: &mut Prepared,
        nats: &mut RunNats,
        signals: &mut StopSignals,
        display: &mut Display,
    ) -> Result<Ending, Failure> {
        let mut last_refresh = Instant::now() - REFRESH_EVERY;
        let mut last_scale = Instant::now();
        let mut events = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = signals.recv() => {
                    display.note("stopping: finishing the messages in flight (Ctrl-C again to force)");
                    return Ok(Ending::Interrupted);
                }
                Some(line) = self.output.recv() => {
                    display.output(&format!("[{}] {}", line.unit, line.line));
                    continue;
                }
                Some(request) = futures::StreamExt::next(&mut self.control) => {
                    let answer = self.control_request(&request.payload, display);
                    if let Some(reply) = request.reply {
                        let _ = nats.client.publish(reply, answer.into()).await;
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            self.nats_watch
                .check(nats, display)
                .map_err(Failure::Server)?;
            self.supervisor.poll(&mut events)?;
            for Event::Restarted { unit, pid, status } in events.drain(..) {
                display.note(&format!(
                    "unit `{unit}`: process {pid} ended ({status}); restarting it, its messages will be delivered again"
                ));
            }
            if let Some(watch) = &mut self.file_watch {
                if watch.changed() {
                    self.edit_seen = true;
                }
            }
            if last_refresh.elapsed() < REFRESH_EVERY {
                continue;
            }
            last_refresh = Instant::now();
            self.carry_out_edits(prepared, nats, display).await;
            // Sources must be done before the pass starts: then a unit found empty, checked after all of
            // its inputs were found empty, can never receive anything again.
            let sources_done = self.supervisor.all_sources_finished();
            // Reading lags from a server that is gone would hold the loop (and Ctrl-C) for a while.
            let all_empty = nats.connected()
                && tokio::time::timeout(LAGS_WITHIN, self.read_lags())
                    .await
                    .unwrap_or(false);
            if self.pause.is_some() {
                self.settle_pause(all_empty, display);
            } else if last_scale.elapsed() >= switchyard_crds::unit::REPORT_EVERY {
                last_scale = Instant::now();
                self.autoscale(prepared, display);
            }
            display.update(self.started.elapsed(), &self.rows(prepared));
            if self.quiet.done(
                sources_done && all_empty && self.edit.is_none(),
                &self.reports,
            ) {
                return Ok(Ending::Completed);
            }
        }
    }

    /// `--watch`: plans an edit of the file once the one before is done, and carries it on.
    async fn carry_out_edits(
        &mut self,
        prepared: &mut Prepared,
        nats: &RunNats,
        display: &mut Display,
    ) {
        if self.edit.is_none() && self.edit_seen {
            if self.pause.is_some() {
                return;
            }
            self.edit_seen = false;
            self.edits += 1;
            if let Planned::Edit(edit) =
                migrate::plan_edit(&self.file, self.edits, prepared, display)
            {
                self.edit = Some(edit);
            }
        }
        let Some(edit) = &mut self.edit else {
            return;
        };
        let stream = prepared.layout.nats.stream.name.clone();
        let mut hands = Hands {
            nats,
            supervisor: &mut self.supervisor,
            config_dir: self.run_dir.path(),
            stream: &stream,
        };
        match edit.advance(&mut hands, display).await {
            Ok(Progress::Working) => {}
            Ok(Progress::Refused) => self.edit = None,
            Ok(Progress::Done) => {
                if let Some(edit) = self.edit.take() {
                    *prepared = edit.into_running(prepared);
                    self.consumers = consumers_in_flow_order(prepared);
                    self.totals_of_source = totals_of_sources(prepared);
                    self.scaler.adopt(&prepared.topology);
                    let units: Vec<&str> = self.consumers.iter().map(|(u, _)| u.as_str()).collect();
                    self.lags.retain(|u, _| units.contains(&u.as_str()));
                    display.resize(prepared.layout.units.len());
                    if let Some((state, _)) = &nats.state {
                        let mut kept = state.kept();
                        kept.epochs = switchyard_crds::migration::epochs(&prepared.layout.units);
                        if let Err(e) = state.save_kept(&kept) {
                            display.note(&format!("{e}: a --resume of this run may not find the messages of the last edit"));
                        }
                    }
                }
            }
            // NATS said no for now: the same step is tried again at the next refresh.
            Err(e) => display.note(&format!("edit {}: {e}; trying again", edit.number)),
        }
    }

    /// Reads every consumer's lag; true when all of them are empty.
    async fn read_lags(&mut self) -> bool {
        let mut all_empty = true;
        for (unit, durable) in &self.consumers {
            match self.stream.consumer_info(durable).await {
                Ok(info) => {
                    let lag = info.num_pending + info.num_ack_pending as u64;
                    all_empty &= lag == 0;
                    let lag = switchyard_crds::unit::items_pending(lag, &self.reports.fresh(unit));
                    self.lags.insert(unit.clone(), lag);
                }
                Err(e) => {
                    all_empty = false;
                    tracing::debug!("cannot read consumer {durable}: {e}");
                }
            }
        }
        all_empty
    }

    /// Pauses or resumes the run; the answer is for the person who asked.
    fn control_request(&mut self, request: &[u8], display: &mut Display) -> String {
        match (request, &self.pause) {
            (b"pause", Some(_)) => "already paused".to_string(),
            (b"pause", None) => {
                let previous: Vec<(String, usize)> = self
                    .supervisor
                    .units
                    .iter()
                    .map(|u| (u.unit.clone(), u.wanted))
                    .collect();
                let sources: Vec<String> = self
                    .supervisor
                    .units
                    .iter()
                    .filter(|u| u.is_source && !u.finished)
                    .map(|u| u.unit.clone())
                    .collect();
                for source in &sources {
                    self.supervisor.scale(source, 0);
                }
                self.pause = Some(Pause {
                    previous,
                    stopped: false,
                });
                let note = format!(
                    "pausing: sources stopped ({}); the units finish what is queued, then stop",
                    if sources.is_empty() {
                        "all had finished".to_string()
                    } else {
                        sources.join(", ")
                    }
                );
                display.note(&note);
                note
            }
            (b"resume", None) => "not paused".to_string(),
            (b"resume", Some(_)) => {
                let Some(pause) = self.pause.take() else {
                    return "not paused".to_string();
                };
                for (unit, wanted) in &pause.previous {
                    let finished = self
                        .supervisor
                        .units
                        .iter()
                        .any(|u| &u.unit == unit && u.finished);
                    if !finished {
                        self.supervisor.scale(unit, *wanted);
                    }
                }
                let note = "resumed: every unit back at the replicas it had, sources from their checkpoints".to_string();
                display.note(&note);
                note
            }
            (b"scaling", _) => {
                let mut last = std::collections::BTreeMap::new();
                for e in &self.scaler.events {
                    last.insert(
                        e.unit.clone(),
                        format!("{} → {} at {:.0}s: {}", e.from, e.to, e.t, e.reason),
                    );
                }
                serde_json::to_string(&last).unwrap_or_default()
            }
            (other, _) => format!(
                "unknown request `{}`: send `{PAUSE}`, `{RESUME}` or `{SCALING}`",
                String::from_utf8_lossy(other)
            ),
        }
    }

    /// A pausing run stops its units once what the sources stored is drained.
    fn settle_pause(&mut self, all_empty: bool, display: &mut Display) {
        let Some(pause) = &mut self.pause else {
            return;
        };
        let sources_gone = self
            .supervisor
            .units
            .iter()
            .filter(|u| u.is_source)
            .all(|u| u.running() == 0);
        if pause.stopped || !all_empty || !sources_gone {
            return;
        }
        pause.stopped = true;
        let units: Vec<String> = self
            .supervisor
            .units
            .iter()
            .filter(|u| !u.is_source)
            .map(|u| u.unit.clone())
            .collect();
        for unit in &units {
            self.supervisor.scale(unit, 0);
        }
        display
            .note("paused: every unit drained and stopped; `switchyard resume` brings them back");
    }

    fn autoscale(&mut self, prepared: &Prepared, display: &mut Display) {
        let notes = self.scaler.step(
            self.started.elapsed(),
            &prepared.topology,
            &prepared.layout,
            &self.lags,
            &self.reports.fresh_all(),
            &mut self.supervisor,
        );
        for note in notes {
            display.note(&note);
        }
    }

    /// Stops every process (Ctrl-C during the stop forces it when the run was interrupted), then waits
    /// for the last reports of those that stopped cleanly, so that the summary counts everything.
    pub async fn stop(
        &mut self,
        interrupted: bool,
        signals: &mut StopSignals,
        display: &mut Display,
    ) {
        let stopped = {
            let stopping = self.supervisor.stop_all(Duration::from_secs(30));
            tokio::pin!(stopping);
            tokio::select! {
                stopped = &mut stopping => stopped,
                _ = signals.recv(), if interrupted => {
                    display.note("forcing the stop");
                    Vec::new()
                }
            }
        };
        let deadline = Instant::now() + LAST_REPORTS_WITHIN;
        while !self.reports.have_last_reports(&stopped) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops everything after a unit or a server crash-looped and says why, keeping the units' logs.
    pub async fn crashed(self, failure: Failure) -> RunError {
        let mut supervisor = self.supervisor;
        supervisor.stop_all(Duration::from_secs(10)).await;
        let crash = match failure {
            Failure::Unit(crash) => crash,
            Failure::Server(ServerCrashLoop {
                server,
                status,
                exits,
                log,
            }) => {
                return RunError::NatsCrashLoop {
                    server,
                    status,
                    exits,
                    log,
                }
            }
        };
        // Kept, since it may hold the logs; marked, so that no later run takes it for a leftover.
        run_folder::keep(self.run_dir);
        let log = if crash.log.as_os_str().is_empty() {
            String::new()
        } else {
            supervisor::tail(&crash.log, 15)
        };
        RunError::CrashLoop {
            unit: crash.unit,
            status: crash.status,
            log,
            logs: self.logs_dir,
        }
    }

    /// One row per unit. `replicas` counts running processes, or (once stopped) the most a unit had.
    pub fn rows(&self, prepared: &Prepared) -> Vec<Row> {
        prepared
            .layout
            .units
            .iter()
            .map(|config| {
                let t = totals(&self.reports, &config.unit);
                let processes = self.supervisor.units.iter().find(|u| u.unit == config.unit);
                Row {
                    unit: config.unit.clone(),
                    kind: prepared.topology.unit(&config.unit).map(type_of),
                    replicas: processes.map_or(0, |p| {
                        if p.running() > 0 {
                            p.running()
                        } else {
                            p.most_replicas
                        }
                    }),
                    processed: t.processed,
                    published: t.published,
                    lag: self.lags.get(&config.unit).copied(),
                    dead_lettered: t.dead_lettered,
                    // A postgres source's table is as big as its rows, as it last counted them.
                    total: self
                        .totals_of_source
                        .get(&config.unit)
                        .copied()
                        .or_else(|| {
                            let rows = self
                                .reports
                                .latest(&config.unit)
                                .iter()
                                .find_map(|r| r.rows)?;
                            Some(rows.waiting + rows.claimed + rows.succeeded + rows.failed)
                        }),
                    finished: processes.is_some_and(|p| p.finished),
                }
            })
            .collect()
    }
}

/// Sum of the latest report of every replica a unit has had.
pub fn totals(reports: &Reports, unit: &str) -> StatsReport {
    let mut sum = StatsReport::default();
    for r in reports.latest(unit) {
        sum.processed += r.processed;
        sum.messages += r.messages;
        sum.published += r.published;
        sum.dead_lettered += r.dead_lettered;
        sum.duplicates_skipped += r.duplicates_skipped;
        sum.in_flight += r.in_flight;
    }
    sum
}

fn consumers_in_flow_order(prepared: &Prepared) -> Vec<(String, String)> {
    prepared
        .topology
        .topological_order()
        .iter()
        .filter_map(|unit| {
            let config = prepared.layout.units.iter().find(|c| c.unit == unit.name)?;
            let input = config.input.as_ref()?;
            Some((unit.name.clone(), input.durable.clone()))
        })
        .collect()
}

fn totals_of_sources(prepared: &Prepared) -> HashMap<String, u64> {
    prepared
        .layout
        .units
        .iter()
        .filter_map(|u| match &u.role {
            UnitRole::Source {
                source: SourceKind::Generator(GeneratorSource { count: Some(c), .. }),
                ..
            } => Some((u.unit.clone(), *c)),
            _ => None,
        })
        .collect()
}
