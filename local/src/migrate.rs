//! `switchyard run --watch`: edits of the Pipeline file carried out while the run goes on, through the
//! planner the operator uses (`switchyard_crds::migration`). Each step is printed as it starts and as
//! it ends; a step that waits says what for.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use switchyard_crds::migration::{self, Migration, Step, UnitState};
use switchyard_crds::topology::replicas_of;
use switchyard_crds::unit::UnitRole;
use switchyard_platform::admin;

use crate::error::RunError;
use crate::prepare::{self, Prepared};
use crate::progress::Display;
use crate::supervisor::Supervisor;
use crate::RunNats;

/// How often the file is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How often a step that waits says so.
const WAITING_NOTE_EVERY: Duration = Duration::from_secs(5);

/// Notices when the Pipeline file's text changes.
pub struct FileWatch {
    file: PathBuf,
    seen: Option<(SystemTime, String)>,
    looked: Instant,
}

impl FileWatch {
    pub fn new(file: &Path) -> FileWatch {
        let mut watch = FileWatch {
            file: file.to_path_buf(),
            seen: None,
            looked: Instant::now(),
        };
        watch.seen = watch.read();
        watch
    }

    fn read(&self) -> Option<(SystemTime, String)> {
        let modified = std::fs::metadata(&self.file)
            .and_then(|m| m.modified())
            .ok()?;
        let text = std::fs::read_to_string(&self.file).ok()?;
        Some((modified, text))
    }

    /// True once when the text has changed since the last look (an editor's save that rewrites the
    /// same text is no edit).
    pub fn changed(&mut self) -> bool {
        if self.looked.elapsed() < LOOK_EVERY {
            return false;
        }
        self.looked = Instant::now();
        let Some((modified, text)) = self.read() else {
            return false;
        };
        match &self.seen {
            Some((m, _)) if *m == modified => false,
            Some((_, t)) if *t == text => {
                self.seen = Some((modified, text));
                false
            }
            _ => {
                self.seen = Some((modified, text));
                true
            }
        }
    }
}

/// An edit being carried out.
pub struct Edit {
    pub number: u32,
    pub prepared: Prepared,
    pub migration: Migration,
    next: usize,
    /// The current step has been set going and is being waited for.
    begun: bool,
    step_started: Instant,
    started: Instant,
    last_note: Instant,
}

/// What became of a look at an edited file.
pub enum Planned {
    Edit(Box<Edit>),
    /// Nothing to do, or something to say instead (invalid, refused).
    Nothing,
}

/// Plans the edit in `file` against what runs, or says why there is none.
pub fn plan_edit(file: &Path, number: u32, running: &Prepared, display: &Display) -> Planned {
    let prepared = match prepare::prepare(file) {
        Ok(p) => p,
        Err(e) => {
            display.note(&format!(
                "edit {number} not applied; the run goes on as it was:\n{}",
                e.to_string().trim_end()
            ));
            return Planned::Nothing;
        }
    };
    if prepared.name != running.name || prepared.topology.namespace != running.topology.namespace {
        display.note(&format!(
            "edit {number} not applied: it renames the Pipeline ({} → {}); stop the run and start the new one",
            running.name, prepared.name
        ));
        return Planned::Nothing;
    }
    if prepared.layout.nats != running.layout.nats && nats_settings_differ(&prepared, running) {
        display.note(&format!(
            "edit {number}: spec.nats, spec.deadLetter and the tracing retention take effect at the next run; the rest is applied now"
        ));
    }
    let current = running_states(running);
    let desired = migration::unit_states(&prepared.topology, &prepared.layout);
    let migration = migration::plan(&current, &desired, prepared.policy);
    if migration.is_empty() {
        display.note(&format!("edit {number}: nothing to change"));
        return Planned::Nothing;
    }
    if !migration.refused.is_empty() {
        display.note(&format!(
            "edit {number} refused, nothing changed: {}",
            migration.refused.join("; ")
        ));
        return Planned::Nothing;
    }
    let now = Instant::now();
    display.note(&format!(
        "edit {number}: {} step{}",
        migration.steps.len(),
        if migration.steps.len() == 1 { "" } else { "s" }
    ));
    Planned::Edit(Box::new(Edit {
        number,
        prepared,
        migration,
        next: 0,
        begun: false,
        step_started: now,
        started: now,
        last_note: now,
    }))
}

/// What runs, as the planner takes it.
pub fn running_states(running: &Prepared) -> Vec<UnitState> {
    migration::unit_states(&running.topology, &running.layout)
}

/// Whether the NATS objects themselves (not the consumers, which a migration changes) differ.
fn nats_settings_differ(a: &Prepared, b: &Prepared) -> bool {
    let (x, y) = (&a.layout.nats, &b.layout.nats);
    x.stream.subjects != y.stream.subjects
        || x.trace.as_ref().map(|t| t.max_age_ms) != y.trace.as_ref().map(|t| t.max_age_ms)
        || a.nats_replicas != b.nats_replicas
}

/// How far an edit got this time round.
pub enum Progress {
    Working,
    Done,
    /// It would drop messages and may not: nothing was changed.
    Refused,
}

/// What an edit's steps act on.
pub struct Hands<'a> {
    pub nats: &'a RunNats,
    pub supervisor: &'a mut Supervisor,
    pub config_dir: &'a Path,
    pub stream: &'a str,
}

impl Edit {
    /// Carries the edit on as far as it goes without waiting.
    pub async fn advance(
        &mut self,
        hands: &mut Hands<'_>,
        display: &Display,
    ) -> Result<Progress, RunError> {
        if self.next == 0 && !self.begun {
            // An edit that adds the Pipeline's first join adds the bucket it keeps its items in.
            if let Some(bucket) = &self.prepared.layout.nats.join_bucket {
                let replicas = self.prepared.layout.nats.stream.replicas;
                admin::join_bucket(&hands.nats.js, bucket, replicas).await?;
            }
        }
        if self.next == 0 && !self.begun && !self.migration.discards.is_empty() {
            if let Some(refusal) = self.refusal(hands).await? {
                display.note(&format!(
                    "edit {} refused, nothing changed: {refusal}",
                    self.number
                ));
                return Ok(Progress::Refused);
            }
        }
        while let Some(step) = self.migration.steps.get(self.next).cloned() {
            if !self.begun {
                display.note(&format!(
                    "edit {} step {}/{}: {step}",
                    self.number,
                    self.next + 1,
                    self.migration.steps.len()
                ));
                self.begun = true;
                self.step_started = Instant::now();
                self.last_note = Instant::now();
                self.begin(&step, hands).await?;
            }
            match self.waiting_for(&step, hands).await? {
                None => {
                    self.next += 1;
                    self.begun = false;
                }
                Some(what) => {
                    if self.last_note.elapsed() >= WAITING_NOTE_EVERY {
                        self.last_note = Instant::now();
                        display.note(&format!(
                            "edit {} step {}: waiting {:.0}s for {what}",
                            self.number,
                            self.next + 1,
                            self.step_started.elapsed().as_secs_f64()
                        ));
                    }
                    return Ok(Progress::Working);
                }
            }
        }
        display.note(&format!(
            "edit {} done in {:.1}s",
            self.number,
            self.started.elapsed().as_secs_f64()
        ));
        Ok(Progress::Done)
    }

    /// Without drain, what is still there to be dropped, unless loss is allowed.
    async fn refusal(&self, hands: &Hands<'_>) -> Result<Option<String>, RunError> {
        if self.prepared.policy.allow_loss {
            return Ok(None);
        }
        let held = admin::held_in(&hands.nats.js, hands.stream, &self.migration.discards).await?;
        Ok((!held.is_empty()).then(|| migration::refusal(&held)))
    }

    fn target(&self, unit: &str) -> Option<&UnitState> {
        self.migration.target.iter().find(|u| u.config.unit == unit)
    }

    /// Sets a step going.
    async fn begin(&self, step: &Step, hands: &mut Hands<'_>) -> Result<(), RunError> {
        match step {
            Step::Read { consumer, .. } => {
                admin::put_consumer(&hands.nats.js, hands.stream, consumer).await?;
            }
            Step::Start { unit } => {
                let Some(target) = self.target(unit) else {
                    return Ok(());
                };
                let path = self.write_config(hands, target)?;
                let topology_unit = self.prepared.topology.unit(unit);
                let wanted = topology_unit.map_or(1, |u| replicas_of(u).min as usize);
                let (is_source, finite) = match &target.config.role {
                    UnitRole::Source { source, .. } => (true, source.is_finite()),
                    _ => (false, false),
                };
                hands.supervisor.add(unit, path, wanted, is_source, finite);
            }
            Step::Roll { unit, .. } => {
                if let Some(target) = self.target(unit) {
                    let path = self.write_config(hands, target)?;
                    hands.supervisor.roll(unit, path);
                }
            }
            Step::Rescale { unit, .. } => {
                if let Some(u) = self.prepared.topology.unit(unit) {
                    let bounds = replicas_of(u);
                    if let Some(p) = hands.supervisor.units.iter().find(|p| &p.unit == unit) {
                        let wanted =
                            (p.wanted as u32).clamp(bounds.min, bounds.max.max(bounds.min));
                        hands.supervisor.scale(unit, wanted as usize);
                    }
                }
            }
            Step::Remove { unit } => hands.supervisor.retire(unit),
            Step::Drain { .. } | Step::AwaitEmpty { .. } => {}
        }
        Ok(())
    }

    /// None once the step is done; else what it waits for.
    async fn waiting_for(
        &self,
        step: &Step,
        hands: &mut Hands<'_>,
    ) -> Result<Option<String>, RunError> {
        Ok(match step {
            Step::Read { .. } | Step::Start { .. } | Step::Rescale { .. } => None,
            Step::Roll { unit, .. } => (!hands.supervisor.rolled(unit))
                .then(|| format!("the processes of {unit} before the edit to finish")),
            Step::Drain { unit } => {
                match admin::queue_of(&hands.nats.js, hands.stream, unit).await? {
                    None | Some(0) => {
                        match admin::join_waiting(&hands.nats.js, hands.stream, unit).await? {
                            None | Some(0) => None,
                            Some(n) => Some(format!("the {n} items join {unit} waits on")),
                        }
                    }
                    Some(n) => Some(format!("{n} messages in the queue of {unit}")),
                }
            }
            Step::Remove { unit } => {
                if hands.supervisor.forget(unit) {
                    // A source has none; deleting what is not there is no error.
                    admin::delete_consumer(&hands.nats.js, hands.stream, unit).await?;
                    None
                } else {
                    Some(format!("the processes of {unit} to stop"))
                }
            }
            Step::AwaitEmpty { subject, readers } => {
                match admin::messages_on(&hands.nats.js, hands.stream, subject).await? {
                    0 => None,
                    n => Some(format!(
                        "{} to read the {n} messages left on {subject}",
                        readers.join(", ")
                    )),
                }
            }
        })
    }

    fn write_config(&self, hands: &Hands<'_>, target: &UnitState) -> Result<PathBuf, RunError> {
        let path = hands
            .config_dir
            .join(format!("{}.edit{}.json", target.config.unit, self.number));
        let text = serde_json::to_vec_pretty(&target.config)?;
        std::fs::write(&path, text).map_err(RunError::io("write a unit's config"))?;
        Ok(path)
    }

    /// What runs once the edit is done: the new spec, with the epochs its publishers are at. The NATS
    /// objects other than the consumers stay as the run made them.
    pub fn into_running(self, running: &Prepared) -> Prepared {
        let configs: Vec<_> = self
            .migration
            .target
            .iter()
            .map(|u| u.config.clone())
            .collect();
        let mut prepared = self.prepared;
        let mut layout =
            migration::with_epochs(prepared.layout.clone(), &migration::epochs(&configs));
        let consumers = layout.nats.consumers.clone();
        layout.nats = running.layout.nats.clone();
        layout.nats.consumers = consumers;
        prepared.layout = layout;
        prepared.nats_replicas = running.nats_replicas;
        prepared
    }
}
