//! How a running Pipeline becomes the edited one without losing or doubling a message: the ordered
//! steps from the units that run to the units the new spec lays out. Pure; the operator and
//! `switchyard run --watch` execute the steps, each of which can be done again safely.
//!
//! The one hard part is a publisher whose readers change: a reader that stops reading it must get
//! every message up to some point and none after, while the readers that take over get the rest. A
//! JetStream consumer cannot be told to stop at a sequence, so the cut is made by the publisher: it
//! moves to a subject of a new epoch (`data.<unit>_<n>`), which its new readers already read. Each
//! message is then on exactly one of the two subjects; the old one is read to its end by the readers
//! it had, and a message the publisher handles twice across its restart keeps its id, which the
//! stream's duplicate window drops. Everything else is ordering: a consumer exists before anything
//! publishes to its subjects (interest retention drops a message nobody is interested in), a unit that
//! goes away has nothing left to read before it goes, and a reader lets go of a subject only once it
//! is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::epochs::{epoch_of, epoch_subject, epochs, with_epochs};
use crate::pipeline::PipelineSpec;
use crate::unit::{ConsumerConfig, UnitConfig, UnitRole};
pub use crate::unit_state::{pod_aspects, unit_states, UnitState, REPLICAS};

/// What the operator and a local run do with a change, from `spec.migration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Wait for a unit that goes away (and for a subject nobody publishes to any more) to be read to
    /// its end. Without it those messages are dropped, which needs `allow_loss`.
    pub drain: bool,
    pub allow_loss: bool,
}

impl Policy {
    /// `spec.migration`, with its defaults.
    pub fn of(spec: &PipelineSpec) -> Policy {
        let written = spec.migration.clone().unwrap_or_default();
        let default = Policy::default();
        Policy {
            drain: written.drain.unwrap_or(default.drain),
            allow_loss: written.allow_loss.unwrap_or(default.allow_loss),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            drain: true,
            allow_loss: false,
        }
    }
}

/// One step of a migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "step")]
pub enum Step {
    /// Create a unit's consumer, or change what it reads.
    #[serde(rename_all = "camelCase")]
    Read {
        unit: String,
        consumer: ConsumerConfig,
    },
    /// Start a new unit.
    #[serde(rename_all = "camelCase")]
    Start { unit: String },
    /// Replace a unit's processes with ones running its new configuration, and wait until no process
    /// of the old one is left (what they held is finished or handed back).
    #[serde(rename_all = "camelCase")]
    Roll { unit: String, changes: Vec<String> },
    /// New replica bounds for a switcher; its processes stay.
    #[serde(rename_all = "camelCase")]
    Rescale { unit: String, change: String },
    /// Wait until a unit that goes away has nothing pending or unacknowledged. Nothing new can reach it:
    /// every publisher it read has moved on.
    #[serde(rename_all = "camelCase")]
    Drain { unit: String },
    /// Stop a unit and delete it with its consumer.
    #[serde(rename_all = "camelCase")]
    Remove { unit: String },
    /// Wait until no message is left on a subject nobody publishes to any more.
    #[serde(rename_all = "camelCase")]
    AwaitEmpty {
        subject: String,
        readers: Vec<String>,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Read { unit, consumer } => {
                write!(
                    f,
                    "consumer {unit} reads {}",
                    consumer.filter_subjects.join(", ")
                )
            }
            Step::Start { unit } => write!(f, "start {unit}"),
            Step::Roll { unit, changes } => write!(f, "roll {unit} ({})", changes.join("; ")),
            Step::Rescale { unit, change } => write!(f, "rescale {unit} ({change})"),
            Step::Drain { unit } => write!(f, "drain {unit}: wait until its queue is empty"),
            Step::Remove { unit } => write!(f, "remove {unit} and its consumer"),
            Step::AwaitEmpty { subject, readers } => write!(
                f,
                "wait until {} have read {subject} to its end",
                readers.join(", ")
            ),
        }
    }
}

/// Messages a migration without `drain` would drop: the executor checks, before its first step,
/// that none is there, and refuses otherwise unless loss is allowed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Discard {
    /// What is left in a unit's consumer when it is removed.
    #[serde(rename_all = "camelCase")]
    Queue { unit: String },
    /// What is left on a subject when its readers stop reading it.
    #[serde(rename_all = "camelCase")]
    Subject { subject: String },
}

impl fmt::Display for Discard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Discard::Queue { unit } => write!(f, "the queue of {unit}"),
            Discard::Subject { subject } => write!(f, "what is left on {subject}"),
        }
    }
}

/// The steps from what runs to what the spec now says, and what runs afterwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    pub steps: Vec<Step>,
    /// The units once every step is done, in the new spec's order.
    pub target: Vec<UnitState>,
    /// Without `drain`: what may be dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discards: Vec<Discard>,
    /// Why the edit cannot be carried out in place at all (`joins`): then nothing is changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

impl Migration {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether the steps must be taken one after the other. Without a publisher that moves, a unit
    /// that goes or a subject left behind, everything can be applied at once (consumers first), as
    /// the operator applies any spec.
    pub fn is_stepwise(&self) -> bool {
        self.steps.iter().any(|s| match s {
            Step::Roll { changes, .. } => changes.iter().any(|c| c.ends_with(FROM_NOW_ON)),
            Step::Drain { .. } | Step::Remove { .. } | Step::AwaitEmpty { .. } => true,
            Step::Read { .. } | Step::Start { .. } | Step::Rescale { .. } => false,
        })
    }
}

/// How a roll that moves its unit to a new epoch says so.
const FROM_NOW_ON: &str = "from now on";

/// Units in flow order (each after the publishers it reads), as read back from what runs in any
/// order. A cycle, which validation never lets through, keeps the order it was given.
pub fn in_flow_order(mut units: Vec<UnitState>) -> Vec<UnitState> {
    let mut ordered: Vec<UnitState> = Vec::with_capacity(units.len());
    while !units.is_empty() {
        let published: BTreeSet<String> = units
            .iter()
            .filter_map(|u| u.config.output_subject.clone())
            .collect();
        let next = units.iter().position(|u| {
            u.config
                .input
                .as_ref()
                .is_none_or(|i| i.filter_subjects.iter().all(|s| !published.contains(s)))
        });
        ordered.push(units.remove(next.unwrap_or(0)));
    }
    ordered
}

/// Why an edit without drain is refused, given what it would drop (`admin::held_in`).
pub fn refusal(held: &[String]) -> String {
    format!(
        "with spec.migration.drain false it would drop {}; set drain: true to read them first, or allowLoss: true to drop them",
        held.join(" and ")
    )
}

/// The steps from `running` to `desired`. `desired` is laid out afresh from the new spec, so its
/// units publish and read plain (epoch 0) subjects; the target gives each publisher the epoch it
/// needs. Both list units in topological order (every unit after its inputs).
///
/// The steps come in this order, each from a function of its own below: consumers widen to read
/// both what they read now and what they will read; new units start; units that stay but change
/// roll (publishers move to their new epoch) or rescale; units that go are drained and removed;
/// subjects nobody publishes to any more are read to their end; consumers narrow to what they need.
pub fn plan(running: &[UnitState], desired: &[UnitState], policy: Policy) -> Migration {
    let now: BTreeMap<&str, &UnitState> = running
        .iter()
        .map(|u| (u.config.unit.as_str(), u))
        .collect();
    let epochs = publisher_epochs(running, desired, &now);
    let target = retargeted(desired, &epochs);
    let (mut steps, widened) = widen_consumers(&now, &target);
    steps.extend(start_new_units(&now, &target));
    steps.extend(roll_changed_units(&now, &target, &epochs.moved));
    let (removals, mut discards) = remove_gone_units(running, desired, policy);
    steps.extend(removals);
    let (waits, left_on_subjects) = await_abandoned_subjects(running, &target, &widened, policy);
    steps.extend(waits);
    discards.extend(left_on_subjects);
    steps.extend(narrow_consumers(&target, &widened));
    Migration {
        steps,
        target,
        discards,
        refused: joins::refused(running, desired),
    }
}

/// Where each desired publisher publishes once the migration is done.
struct PublisherEpochs<'a> {
    /// The subject each desired publisher publishes to afterwards, by unit.
    subject_then: BTreeMap<&'a str, String>,
    /// Publishers that keep running but move to a new epoch: a reader let go of them.
    moved: BTreeSet<&'a str>,
    /// Who publishes each plain (epoch 0) subject of the new spec.
    plain_publisher: BTreeMap<&'a str, &'a str>,
}

/// A publisher that keeps running moves to a new epoch when a reader lets go of it, so that what it
/// publishes from then on reaches only the readers it has now; a new publisher starts on its plain
/// subject, and one whose readers only grow stays where it is.
fn publisher_epochs<'a>(
    running: &'a [UnitState],
    desired: &'a [UnitState],
    now: &BTreeMap<&str, &'a UnitState>,
) -> PublisherEpochs<'a> {
    let publisher_of: BTreeMap<&str, &str> = running
        .iter()
        .filter_map(|u| Some((u.config.output_subject.as_deref()?, u.config.unit.as_str())))
        .collect();
    let readers_now = readers(running, |s| publisher_of.get(s).copied());
    let plain_publisher: BTreeMap<&str, &str> = desired
        .iter()
        .filter_map(|u| Some((u.config.output_subject.as_deref()?, u.config.unit.as_str())))
        .collect();
    let readers_then = readers(desired, |s| plain_publisher.get(s).copied());
    let mut subject_then = BTreeMap::new();
    let mut moved = BTreeSet::new();
    for unit in desired {
        let name = unit.config.unit.as_str();
        let Some(plain) = unit.config.output_subject.as_deref() else {
            continue;
        };
        let subject = match now
            .get(name)
            .and_then(|u| u.config.output_subject.as_deref())
        {
            None => plain.to_string(),
            Some(current) => {
                let epoch = epoch_of(current, plain).unwrap_or(0);
                let before = readers_now.get(name).cloned().unwrap_or_default();
                let after = readers_then.get(name).cloned().unwrap_or_default();
                if before.difference(&after).next().is_some() {
                    moved.insert(name);
                    epoch_subject(plain, epoch + 1)
                } else {
                    current.to_string()
                }
            }
        };
        subject_then.insert(name, subject);
    }
    PublisherEpochs {
        subject_then,
        moved,
        plain_publisher,
    }
}

/// The desired units with each publisher on its subject afterwards, and each reader reading it there.
fn retargeted(desired: &[UnitState], epochs: &PublisherEpochs) -> Vec<UnitState> {
    desired
        .iter()
        .map(|unit| {
            let mut unit = unit.clone();
            if let Some(subject) = epochs.subject_then.get(unit.config.unit.as_str()) {
                unit.config.output_subject = Some(subject.clone());
            }
            if let Some(input) = &mut unit.config.input {
                for subject in &mut input.filter_subjects {
                    let publisher = epochs.plain_publisher.get(subject.as_str());
                    if let Some(then) = publisher.and_then(|p| epochs.subject_then.get(p)) {
                        *subject = then.clone();
                    }
                }
            }
            unit
        })
        .collect()
}

/// Every consumer reads what it will read, and meanwhile what it reads now: nothing is published to a
/// subject before its readers' consumers take it. Returns the steps and each consumer as widened.
fn widen_consumers(
    now: &BTreeMap<&str, &UnitState>,
    target: &[UnitState],
) -> (Vec<Step>, BTreeMap<String, ConsumerConfig>) {
    let mut steps = Vec::new();
    let mut widened = BTreeMap::new();
    for unit in target {
        let Some(input) = &unit.config.input else {
            continue;
        };
        let mut consumer = input.clone();
        let current = now
            .get(unit.config.unit.as_str())
            .and_then(|u| u.config.input.as_ref());
        if let Some(current) = current {
            for subject in &current.filter_subjects {
                if !consumer.filter_subjects.contains(subject) {
                    consumer.filter_subjects.push(subject.clone());
                }
            }
        }
        if current != Some(&consumer) {
            steps.push(Step::Read {
                unit: unit.config.unit.clone(),
                consumer: consumer.clone(),
            });
        }
        widened.insert(unit.config.unit.clone(), consumer);
    }
    (steps, widened)
}

/// New units, readers first and sources last: each has its readers before it publishes.
fn start_new_units(now: &BTreeMap<&str, &UnitState>, target: &[UnitState]) -> Vec<Step> {
    let mut starting: Vec<&UnitState> = target
        .iter()
        .filter(|u| !now.contains_key(u.config.unit.as_str()))
        .collect();
    starting.reverse();
    starting.sort_by_key(|u| is_source(&u.config));
    starting
        .into_iter()
        .map(|unit| Step::Start {
            unit: unit.config.unit.clone(),
        })
        .collect()
}

/// Units that stay but change roll (publishers move to their new epoch here); switchers whose replica
/// bounds change rescale.
fn roll_changed_units(
    now: &BTreeMap<&str, &UnitState>,
    target: &[UnitState],
    moved: &BTreeSet<&str>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for unit in target {
        let name = unit.config.unit.as_str();
        let Some(current) = now.get(name) else {
            continue;
        };
        let changes = changes(current, unit, moved.contains(name));
        if !changes.is_empty() {
            steps.push(Step::Roll {
                unit: name.to_string(),
                changes,
            });
        }
        let (before, after) = (current.pod.get(REPLICAS), unit.pod.get(REPLICAS));
        if before != after {
            steps.push(Step::Rescale {
                unit: name.to_string(),
                change: format!(
                    "{} → {}",
                    before.map_or("?", |s| s.as_str()),
                    after.map_or("?", |s| s.as_str())
                ),
            });
        }
    }
    steps
}

/// Units that go away, upstream first: sources stop; the others are read to their end (their
/// publishers have moved on or gone), then removed. Without drain, their queues are what may be lost.
fn remove_gone_units(
    running: &[UnitState],
    desired: &[UnitState],
    policy: Policy,
) -> (Vec<Step>, Vec<Discard>) {
    let wanted: BTreeSet<&str> = desired.iter().map(|u| u.config.unit.as_str()).collect();
    let mut steps = Vec::new();
    let mut discards = Vec::new();
    for unit in running {
        let name = unit.config.unit.as_str();
        if wanted.contains(name) {
            continue;
        }
        if unit.config.input.is_some() {
            if policy.drain {
                steps.push(Step::Drain {
                    unit: name.to_string(),
                });
            } else {
                discards.push(Discard::Queue {
                    unit: name.to_string(),
                });
            }
        }
        steps.push(Step::Remove {
            unit: name.to_string(),
        });
    }
    (steps, discards)
}

/// Subjects nobody publishes to any more are read to their end by whoever still reads them (as
/// widened); without drain, what is left on them is what may be lost.
fn await_abandoned_subjects(
    running: &[UnitState],
    target: &[UnitState],
    widened: &BTreeMap<String, ConsumerConfig>,
    policy: Policy,
) -> (Vec<Step>, Vec<Discard>) {
    let published_then: BTreeSet<&str> = target
        .iter()
        .filter_map(|u| u.config.output_subject.as_deref())
        .collect();
    let mut steps = Vec::new();
    let mut discards = Vec::new();
    for unit in running {
        let Some(subject) = unit.config.output_subject.as_deref() else {
            continue;
        };
        if published_then.contains(subject) {
            continue;
        }
        let readers: Vec<String> = widened
            .iter()
            .filter(|(_, c)| c.filter_subjects.iter().any(|s| s == subject))
            .map(|(name, _)| name.clone())
            .collect();
        if readers.is_empty() {
            continue;
        }
        if policy.drain {
            steps.push(Step::AwaitEmpty {
                subject: subject.to_string(),
                readers: ordered_as(target, readers),
            });
        } else {
            discards.push(Discard::Subject {
                subject: subject.to_string(),
            });
        }
    }
    (steps, discards)
}

/// Consumers let go of the subjects they no longer need.
fn narrow_consumers(target: &[UnitState], widened: &BTreeMap<String, ConsumerConfig>) -> Vec<Step> {
    target
        .iter()
        .filter_map(|unit| {
            let input = unit.config.input.as_ref()?;
            let wide = widened.get(&unit.config.unit)?;
            (input != wide).then(|| Step::Read {
                unit: unit.config.unit.clone(),
                consumer: input.clone(),
            })
        })
        .collect()
}

/// For each publisher, the units that read it.
fn readers<'a>(
    units: &'a [UnitState],
    publisher: impl Fn(&str) -> Option<&'a str>,
) -> BTreeMap<&'a str, BTreeSet<&'a str>> {
    let mut readers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for unit in units {
        let Some(input) = &unit.config.input else {
            continue;
        };
        for subject in &input.filter_subjects {
            if let Some(p) = publisher(subject) {
                readers
                    .entry(p)
                    .or_default()
                    .insert(unit.config.unit.as_str());
            }
        }
    }
    readers
}

fn is_source(config: &UnitConfig) -> bool {
    matches!(config.role, UnitRole::Source { .. })
}

/// Names in the order their units have in `units`.
fn ordered_as(units: &[UnitState], mut names: Vec<String>) -> Vec<String> {
    names.sort_by_key(|n| units.iter().position(|u| &u.config.unit == n));
    names
}

/// Why a unit that stays must restart: what differs in its configuration or its pods.
fn changes(current: &UnitState, target: &UnitState, moved: bool) -> Vec<String> {
    let (a, b) = (&current.config, &target.config);
    let mut changes = Vec::new();
    if moved {
        changes.push(format!(
            "publishes to {} {FROM_NOW_ON}",
            b.output_subject.as_deref().unwrap_or_default()
        ));
    } else if a.output_subject != b.output_subject {
        changes.push(format!(
            "publishes to {}",
            b.output_subject.as_deref().unwrap_or_default()
        ));
    }
    if a.role != b.role {
        changes.push(role_change(&a.role, &b.role).to_string());
    }
    match (&a.input, &b.input) {
        (Some(x), Some(y)) if x.filter_subjects == y.filter_subjects && x != y => {
            changes.push("its consumer's limits".to_string())
        }
        (x, y) if x != y => changes.push("its input".to_string()),
        _ => {}
    }
    if a.trace != b.trace {
        changes.push("tracing".to_string());
    }
    if a.frame_items != b.frame_items {
        // A reader's concurrency changed (or a batch stage came or went): frames follow it.
        changes.push(format!("its frames (at most {} items)", b.frame_items));
    }
    if a.dead_letter_subject != b.dead_letter_subject {
        changes.push("its dead-letter subject".to_string());
    }
    let aspects: BTreeSet<&String> = current.pod.keys().chain(target.pod.keys()).collect();
    for aspect in aspects {
        if aspect != REPLICAS && current.pod.get(aspect) != target.pod.get(aspect) {
            changes.push(aspect.clone());
        }
    }
    changes
}

fn role_change(a: &UnitRole, b: &UnitRole) -> &'static str {
    match (a, b) {
        (UnitRole::Process { steps: x, .. }, UnitRole::Process { steps: y, .. }) if x != y => {
            "its steps"
        }
        (UnitRole::Process { .. }, UnitRole::Process { .. }) => "its batch or concurrency",
        (UnitRole::Source { source: x, .. }, UnitRole::Source { source: y, .. }) if x != y => {
            "its source"
        }
        (UnitRole::Sink { sink: x, .. }, UnitRole::Sink { sink: y, .. }) if x != y => "its sink",
        (UnitRole::Source { .. }, UnitRole::Source { .. })
        | (UnitRole::Sink { .. }, UnitRole::Sink { .. }) => "its settings",
        _ => "its role",
    }
}

mod joins;

#[cfg(test)]
mod tests;
