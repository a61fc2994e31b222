//! A Pipeline's status, computed from what the reconcile found. Pure: the same observation and the
//! previous status always give the same result, and a condition's `lastTransitionTime` moves only when
//! its status does.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use switchyard_crds::{EdgeStatus, MigrationStatus, PipelineStatus, UnitStatus};

use crate::pause::PauseState;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// True once every unit of a Pipeline with `spec.paused` is stopped.
pub const PAUSED: &str = "Paused";
/// The phase of a paused Pipeline; a reconcile that finds it keeps the units at zero.
pub const PHASE_PAUSED: &str = "Paused";
/// The phase of a Pipeline with `spec.paused` whose units are still draining.
pub const PHASE_PAUSING: &str = "Pausing";
/// Reason of the Progressing condition and of the Warning Event of a refused edit.
pub const MIGRATION_REFUSED: &str = "MigrationRefused";

/// What the reconcile did and saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub generation: Option<i64>,
    pub outcome: Outcome,
    pub units: Vec<UnitObservation>,
    /// The books per edge, as just read (none when they could not be).
    pub edges: Vec<EdgeStatus>,
    /// Where the Pipeline stands with `spec.paused`.
    pub pause: PauseState,
    /// Where dead letters can be inspected, for messages.
    pub dead_letter_subject: String,
    /// The epochs of the publishers, as the status keeps them.
    pub epochs: BTreeMap<String, u32>,
    pub migration: MigrationState,
}

/// Where the Pipeline stands with an edit that is carried out in steps.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum MigrationState {
    #[default]
    None,
    /// Carrying one out: what the status keeps of it, and what its current step waits for.
    Migrating {
        status: MigrationStatus,
        waiting: Option<String>,
    },
    /// The edit would drop messages: refused, with the reason; what runs stays as it was.
    Refused { reason: String },
}

/// The phase of a Pipeline whose edit is being carried out step by step.
pub const PHASE_MIGRATING: &str = "Migrating";

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The spec was rejected; nothing was applied.
    Invalid { problems: Vec<String> },
    /// The spec is fine but NATS could not be reached or refused the stream.
    NatsUnavailable { message: String },
    /// A step of the reconcile failed; `reason` is the conditions' reason. `retrying`: the reconcile
    /// tries again by itself (a passing fault) rather than waiting for the user to act.
    Failed {
        reason: &'static str,
        message: String,
        retrying: bool,
    },
    /// Everything was applied.
    Applied,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct UnitObservation {
    pub name: String,
    pub deployment: String,
    pub desired: i32,
    pub ready: i32,
    /// Replicas that run the current pod template.
    pub updated: i32,
    /// The Deployment controller has seen the latest spec, every replica runs it, no old one is left
    /// and all are available: what `kubectl rollout status` waits for.
    pub rolled_out: bool,
    /// Why the Deployment's rollout failed (its Progressing condition said ProgressDeadlineExceeded).
    pub rollout_failed: Option<String>,
    pub lag: Option<u64>,
    /// Inputs finished per second, from the replicas' reports.
    pub rate: Option<f64>,
    /// A postgres source's table, as a live replica last counted it.
    pub rows: Option<switchyard_crds::RowCounts>,
    /// A join's items waiting, as its live replicas report them.
    pub join: Option<switchyard_crds::status::JoinWaiting>,
    pub dead_lettered: u64,
    /// When the autoscaler last changed the replicas, and why it did (or why it holds).
    pub last_scale_time: Option<Time>,
    pub last_scale_reason: Option<String>,
    /// Why its pods fail (crash loops, images that cannot be pulled, unschedulable), from their status.
    pub failing: Vec<String>,
}

impl UnitObservation {
    fn is_ready(&self) -> bool {
        self.rolled_out && self.ready >= self.desired
    }

    fn progress(&self) -> String {
        if self.ready < self.desired {
            format!("{} ({}/{} ready)", self.name, self.ready, self.desired)
        } else if self.updated < self.desired {
            format!("{} ({}/{} updated)", self.name, self.updated, self.desired)
        } else {
            format!("{} (rolling out: old replicas still running)", self.name)
        }
    }
}

/// Minimum time between two status writes that differ only in figures (lag, counts, messages);
/// a change of a condition, phase or replicas is written at once.
pub const FIGURES_REFRESH: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether `next` must be written now, given what the Pipeline has and how long ago the operator last
/// wrote its status (None: not since it started).
pub fn needs_write(
    previous: Option<&PipelineStatus>,
    next: &PipelineStatus,
    since_last_write: Option<std::time::Duration>,
) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    if previous == next {
        return false;
    }
    if shape(previous) != shape(next) {
        return true;
    }
    since_last_write.is_none_or(|t| t >= FIGURES_REFRESH)
}

/// What a status says, without its figures. Whether the Pipeline has caught up (no lag at all) is
/// part of it: a status that still shows a backlog once everything is through misleads whoever waits.
fn shape(s: &PipelineStatus) -> impl PartialEq + '_ {
    (
        s.lag.map(|lag| lag == 0),
        (
            &s.epochs,
            s.migration.as_ref().map(|m| (m.generation, m.done)),
        ),
        s.observed_generation,
        &s.phase,
        &s.units_summary,
        s.conditions
            .iter()
            .map(|c| (&c.type_, &c.status, &c.reason, c.observed_generation))
            .collect::<Vec<_>>(),
        s.units
            .iter()
            .map(|u| {
                (
                    &u.name,
                    u.desired_replicas,
                    u.ready_replicas,
                    &u.last_scale_time,
                    &u.last_scale_reason,
                )
            })
            .collect::<Vec<_>>(),
    )
}

pub fn compute(previous: Option<&PipelineStatus>, obs: &Observation, now: &Time) -> PipelineStatus {
    let (ready, progressing, mut degraded, phase) = conditions(obs);
    if obs.outcome == Outcome::Applied {
        if let Some(unbalanced) = books_condition(previous, &obs.edges) {
            degraded = unbalanced;
        }
    }
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let condition = |c: Cond| observed_condition(previous_conditions, obs.generation, now, c);
    let applied = obs.outcome == Outcome::Applied;
    if !applied {
        // Nothing new was observed: the units keep what was last known of them.
        if let Some(previous) = previous {
            return PipelineStatus {
                observed_generation: obs.generation,
                phase: Some(phase.to_string()),
                conditions: vec![
                    condition(ready),
                    condition(progressing),
                    condition(degraded),
                    condition(paused_condition(&obs.pause)),
                ],
                ..previous.clone()
            };
        }
    }
    let ready_units = obs.units.iter().filter(|u| u.is_ready()).count();
    PipelineStatus {
        observed_generation: obs.generation,
        phase: Some(phase.to_string()),
        conditions: vec![
            condition(ready),
            condition(progressing),
            condition(degraded),
            condition(paused_condition(&obs.pause)),
        ],
        epochs: obs.epochs.clone(),
        migration: match &obs.migration {
            MigrationState::Migrating { status, .. } => Some(status.clone()),
            _ => None,
        },
        edges: obs.edges.clone(),
        units_summary: applied.then(|| format!("{ready_units}/{}", obs.units.len())),
        lag: applied.then(|| obs.units.iter().filter_map(|u| u.lag).sum()),
        units: obs
            .units
            .iter()
            .map(|u| {
                let before = previous.and_then(|p| p.units.iter().find(|b| b.name == u.name));
                unit_status(u, before)
            })
            .collect(),
    }
}

/// A condition as observed, its transition time kept from `previous` while its status is the
/// same.
fn observed_condition(
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
    (type_, status, reason, message): Cond,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// A unit's status as observed; what this observation lacks (the last scaling, a source's last row
/// count) stays as it was `before`.
fn unit_status(u: &UnitObservation, before: Option<&UnitStatus>) -> UnitStatus {
    UnitStatus {
        name: u.name.clone(),
        deployment: Some(u.deployment.clone()),
        desired_replicas: u.desired,
        ready_replicas: u.ready,
        lag: u.lag.unwrap_or_default(),
        rate: u.rate,
        dead_lettered: u.dead_lettered,
        last_scale_time: u
            .last_scale_time
            .clone()
            .or_else(|| before.and_then(|b| b.last_scale_time.clone())),
        last_scale_reason: u
            .last_scale_reason
            .clone()
            .or_else(|| before.and_then(|b| b.last_scale_reason.clone())),
        // A source that ended (or is between replicas) leaves its last count standing.
        rows: u.rows.or_else(|| before.and_then(|b| b.rows)),
        join: u.join,
    }
}

type Cond<'a> = (&'a str, bool, &'a str, String);

fn conditions(obs: &Observation) -> (Cond<'static>, Cond<'static>, Cond<'static>, &'static str) {
    match &obs.outcome {
        Outcome::Invalid { problems } => {
            let message = format!(
                "the spec has {} problem{}, so nothing was applied: {}; `switchyard validate` on the file shows the same",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("; ")
            );
            (
                (READY, false, "InvalidSpec", message.clone()),
                (
                    PROGRESSING,
                    false,
                    "InvalidSpec",
                    "waiting for a valid spec".to_string(),
                ),
                (DEGRADED, true, "InvalidSpec", message),
                "Invalid",
            )
        }
        Outcome::NatsUnavailable { message } => {
            let message = format!("{message}; retrying with backoff");
            (
                (READY, false, "NatsUnavailable", message.clone()),
                (PROGRESSING, true, "WaitingForNats", message.clone()),
                (DEGRADED, true, "NatsUnavailable", message),
                "Waiting",
            )
        }
        Outcome::Failed {
            reason,
            message,
            retrying,
        } => {
            let (progressing, message) = if *retrying {
                let message = format!("{message}; retrying with backoff");
                ((PROGRESSING, true, "Retrying", message.clone()), message)
            } else {
                let waiting = "waiting for a change".to_string();
                ((PROGRESSING, false, *reason, waiting), message.clone())
            };
            (
                (READY, false, *reason, message.clone()),
                progressing,
                (DEGRADED, true, *reason, message.clone()),
                if *retrying { "Waiting" } else { "Failed" },
            )
        }
        Outcome::Applied => applied_conditions(obs),
    }
}

fn applied_conditions(
    obs: &Observation,
) -> (Cond<'static>, Cond<'static>, Cond<'static>, &'static str) {
    let not_ready: Vec<String> = obs
        .units
        .iter()
        .filter(|u| !u.is_ready())
        .map(UnitObservation::progress)
        .collect();
    let failed: Vec<String> = obs
        .units
        .iter()
        .filter_map(|u| {
            u.rollout_failed
                .as_ref()
                .map(|m| format!("{}: {m}", u.name))
        })
        .collect();
    let failing: Vec<String> = obs
        .units
        .iter()
        .filter(|u| !u.failing.is_empty())
        .map(|u| format!("{}: {}", u.name, u.failing.join("; ")))
        .collect();
    let total = obs.units.len();
    let phase = if !failed.is_empty() || !failing.is_empty() {
        "Degraded"
    } else if not_ready.is_empty() {
        "Running"
    } else {
        "Deploying"
    };
    let degraded = degraded_condition(obs, &failed, &failing);
    match (&obs.pause, &obs.migration) {
        (PauseState::Running, MigrationState::Migrating { status, waiting }) => (
            ready_condition(&not_ready, total),
            (
                PROGRESSING,
                true,
                "Migrating",
                migration_message(status, waiting.as_deref()),
            ),
            degraded,
            PHASE_MIGRATING,
        ),
        (PauseState::Running, MigrationState::Refused { reason }) => (
            ready_condition(&not_ready, total),
            (PROGRESSING, false, MIGRATION_REFUSED, reason.clone()),
            degraded,
            phase,
        ),
        (PauseState::Running, MigrationState::None) => (
            ready_condition(&not_ready, total),
            progressing_condition(&not_ready, &failed, &failing, total),
            degraded,
            phase,
        ),
        (PauseState::Draining { waiting }, _) => {
            let message = format!("pausing (spec.paused): waiting for {}", waiting.join(", "));
            (
                (READY, false, "Pausing", message.clone()),
                (PROGRESSING, true, "Pausing", message),
                degraded,
                PHASE_PAUSING,
            )
        }
        (PauseState::Paused, _) => {
            let message = PAUSED_MESSAGE.to_string();
            (
                (READY, false, "Paused", message.clone()),
                (PROGRESSING, false, "Paused", message),
                degraded,
                PHASE_PAUSED,
            )
        }
    }
}

/// Where an edit being carried out stands: its step, and what it waits for.
fn migration_message(status: &MigrationStatus, waiting: Option<&str>) -> String {
    let step = status
        .steps
        .get(status.done as usize)
        .map_or("finishing", String::as_str);
    let mut message = format!(
        "carrying out generation {} in {} steps: step {} of {}: {step}",
        status.generation,
        status.steps.len(),
        (status.done as usize + 1).min(status.steps.len()),
        status.steps.len()
    );
    if let Some(waiting) = waiting {
        message.push_str(&format!("; waiting for {waiting}"));
    }
    message
}

const PAUSED_MESSAGE: &str =
    "every unit is stopped (spec.paused); set spec.paused to false to resume";

fn paused_condition(pause: &PauseState) -> Cond<'static> {
    match pause {
        PauseState::Running => (
            PAUSED,
            false,
            "NotPaused",
            "spec.paused is false".to_string(),
        ),
        PauseState::Draining { waiting } => (
            PAUSED,
            false,
            "Draining",
            format!("sources stopped; waiting for {}", waiting.join(", ")),
        ),
        PauseState::Paused => (PAUSED, true, "Paused", PAUSED_MESSAGE.to_string()),
    }
}

fn ready_condition(not_ready: &[String], total: usize) -> Cond<'static> {
    if not_ready.is_empty() {
        let message = format!("all {total} units are ready");
        (READY, true, "AllUnitsReady", message)
    } else {
        let message = format!(
            "{} of {total} units are not ready: {}",
            not_ready.len(),
            not_ready.join(", ")
        );
        (READY, false, "UnitsNotReady", message)
    }
}

fn progressing_condition(
    not_ready: &[String],
    failed: &[String],
    failing: &[String],
    total: usize,
) -> Cond<'static> {
    if not_ready.is_empty() {
        let message = format!("all {total} units are rolled out");
        (PROGRESSING, false, "RolloutComplete", message)
    } else if !failed.is_empty() {
        (PROGRESSING, false, "RolloutFailed", failed.join("; "))
    } else if !failing.is_empty() {
        // Pods that crash or cannot start do not get better by waiting.
        (PROGRESSING, false, "PodsFailing", failing.join("; "))
    } else {
        let message = format!("waiting for {}", not_ready.join(", "));
        (PROGRESSING, true, "RollingOut", message)
    }
}

fn degraded_condition(obs: &Observation, failed: &[String], failing: &[String]) -> Cond<'static> {
    let dead: Vec<String> = obs
        .units
        .iter()
        .filter(|u| u.dead_lettered > 0)
        .map(|u| format!("{} {}", u.name, u.dead_lettered))
        .collect();
    let dead_total: u64 = obs.units.iter().map(|u| u.dead_lettered).sum();
    if !failed.is_empty() {
        let message = format!(
            "{}; see `kubectl describe deployment` for the unit",
            failed.join("; ")
        );
        (DEGRADED, true, "RolloutFailed", message)
    } else if !failing.is_empty() {
        let message = format!(
            "{}; `kubectl logs` of the pod shows the rest",
            failing.join("; ")
        );
        (DEGRADED, true, "PodsFailing", message)
    } else if dead_total > 0 {
        let message = format!(
            "{dead_total} messages were dead-lettered ({}); they wait on {} with their errors in headers",
            dead.join(", "),
            obs.dead_letter_subject
        );
        (DEGRADED, true, "DeadLetters", message)
    } else {
        (DEGRADED, false, "AsExpected", "no failures".to_string())
    }
}

/// Degraded, when an edge whose reader has nothing pending does not balance, and did not the last
/// time either, with the same figures: a record of what was stored can land a moment after what it
/// records was taken in, never for two looks in a row.
fn books_condition(
    previous: Option<&PipelineStatus>,
    edges: &[EdgeStatus],
) -> Option<Cond<'static>> {
    let unbalanced = |e: &&EdgeStatus| e.settled && e.stored != e.taken_in;
    let before: Vec<&EdgeStatus> = previous
        .map(|p| p.edges.iter().filter(unbalanced).collect())
        .unwrap_or_default();
    let lasting: Vec<String> = edges
        .iter()
        .filter(unbalanced)
        .filter(|e| before.contains(e))
        .map(|e| switchyard_crds::books::Imbalance::Edge(e.into()).to_string())
        .collect();
    (!lasting.is_empty()).then(|| {
        let message = format!(
            "the books do not balance: {}; `switchyard status` (or `kubectl switchyard status`) shows every edge",
            lasting.join("; ")
        );
        (DEGRADED, true, BOOKS_DO_NOT_BALANCE, message)
    })
}

/// Reason of Degraded when an edge's reader took in a different number of items than were stored.
pub const BOOKS_DO_NOT_BALANCE: &str = "BooksDoNotBalance";

/// The condition of `type_`, if set.
pub fn condition<'a>(status: &'a PipelineStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn unit(name: &str, desired: i32, ready: i32) -> UnitObservation {
        UnitObservation {
            name: name.into(),
            deployment: format!("p-{name}"),
            desired,
            ready,
            updated: desired,
            rolled_out: ready >= desired,
            lag: Some(3),
            ..UnitObservation::default()
        }
    }

    fn observe(outcome: Outcome, units: Vec<UnitObservation>) -> Observation {
        Observation {
            generation: Some(2),
            outcome,
            units,
            edges: Vec::new(),
            pause: PauseState::Running,
            epochs: BTreeMap::new(),
            migration: MigrationState::None,
            dead_letter_subject: "switchyard.default.p.dlq.*".into(),
        }
    }

    fn edge(stored: u64, taken_in: u64, settled: bool) -> EdgeStatus {
        EdgeStatus {
            from: "src".into(),
            epoch: 0,
            to: "work".into(),
            stored,
            taken_in,
            settled,
        }
    }

    #[test]
    fn books_that_do_not_balance_twice_in_a_row_make_the_pipeline_degraded() {
        let mut obs = observe(
            Outcome::Applied,
            vec![unit("src", 1, 1), unit("work", 1, 1)],
        );
        // Items on their way: nothing to say, however far apart the ends are.
        obs.edges = vec![edge(400, 300, false)];
        let first = compute(None, &obs, &at(10));
        assert_eq!(first.edges, obs.edges);
        assert_eq!(condition(&first, DEGRADED).unwrap().reason, "AsExpected");
        // Settled and short: once could be a record still on its way…
        obs.edges = vec![edge(400, 388, true)];
        let once = compute(Some(&first), &obs, &at(20));
        assert_eq!(condition(&once, DEGRADED).unwrap().status, "False");
        // …twice with the same figures is not.
        let twice = compute(Some(&once), &obs, &at(30));
        let degraded = condition(&twice, DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", BOOKS_DO_NOT_BALANCE)
        );
        assert!(
            degraded
                .message
                .contains("src → work: src stored 400 items, work took in 388: 12 lost on the way"),
            "{}",
            degraded.message
        );
        // Taken in after all: as expected again.
        obs.edges = vec![edge(400, 400, true)];
        let caught_up = compute(Some(&twice), &obs, &at(40));
        assert_eq!(condition(&caught_up, DEGRADED).unwrap().status, "False");
    }

    /// Found on a real node: with every switcher pod in CrashLoopBackOff the status said
    /// `Degraded=False AsExpected: no failures` for as long as it was watched.
    #[test]
    fn failing_pods_make_the_pipeline_degraded_naming_unit_pod_and_reason() {
        let mut machines = unit("machines", 8, 0);
        machines.rolled_out = false;
        machines.failing = vec![
            "pod laundry-machines-1: container stage: CrashLoopBackOff (exited with 1: boom)"
                .into(),
        ];
        let obs = observe(Outcome::Applied, vec![unit("src", 1, 1), machines]);
        let status = compute(None, &obs, &at(10));
        let degraded = condition(&status, DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "PodsFailing")
        );
        assert!(degraded.message.starts_with("machines: pod laundry-machines-1: container stage: CrashLoopBackOff (exited with 1: boom)"), "{}", degraded.message);
        let progressing = condition(&status, PROGRESSING).unwrap();
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "PodsFailing")
        );
        assert_eq!(status.phase.as_deref(), Some("Degraded"));
        assert_eq!(condition(&status, READY).unwrap().status, "False");
    }

    #[test]
    fn a_pause_says_what_it_waits_for_then_that_everything_is_stopped() {
        let mut obs = observe(
            Outcome::Applied,
            vec![unit("src", 0, 0), unit("work", 2, 2)],
        );
        obs.pause = PauseState::Draining {
            waiting: vec!["work to drain (40 messages)".into()],
        };
        let s = compute(None, &obs, &at(10));
        assert_eq!(s.phase.as_deref(), Some("Pausing"));
        assert_eq!(get(&s, PAUSED).status, "False");
        assert_eq!(get(&s, PAUSED).reason, "Draining");
        assert!(get(&s, PROGRESSING)
            .message
            .contains("work to drain (40 messages)"));
        obs.pause = PauseState::Paused;
        obs.units = vec![unit("src", 0, 0), unit("work", 0, 0)];
        let paused = compute(Some(&s), &obs, &at(20));
        assert_eq!(paused.phase.as_deref(), Some(PHASE_PAUSED));
        assert_eq!(get(&paused, PAUSED).status, "True");
        assert_eq!(get(&paused, READY).reason, "Paused");
        assert_eq!(get(&paused, READY).status, "False");
        obs.pause = PauseState::Running;
        obs.units = vec![unit("src", 1, 1), unit("work", 2, 2)];
        let back = compute(Some(&paused), &obs, &at(30));
        assert_eq!(back.phase.as_deref(), Some("Running"));
        assert_eq!(get(&back, PAUSED).reason, "NotPaused");
        assert_eq!(get(&back, PAUSED).last_transition_time, at(30));
    }

    fn get<'a>(s: &'a PipelineStatus, t: &str) -> &'a Condition {
        condition(s, t).unwrap()
    }

    #[test]
    fn an_invalid_spec_is_not_ready_and_says_why() {
        let s = compute(
            None,
            &observe(
                Outcome::Invalid {
                    problems: vec!["stages[0] a: the stage has no kind".into()],
                },
                vec![],
            ),
            &at(10),
        );
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(
            ready.message.contains("stages[0] a: the stage has no kind"),
            "{}",
            ready.message
        );
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
        assert_eq!(s.observed_generation, Some(2));
        assert!(s
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(2)));
    }

    #[test]
    fn all_units_ready_is_ready() {
        let s = compute(
            None,
            &observe(Outcome::Applied, vec![unit("a", 1, 1), unit("b", 3, 3)]),
            &at(10),
        );
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, DEGRADED).reason, "AsExpected");
        assert_eq!(s.units_summary.as_deref(), Some("2/2"));
        assert_eq!(s.lag, Some(6));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.units[1].desired_replicas, 3);
    }

    #[test]
    fn a_unit_still_rolling_out_is_progressing_and_named() {
        let s = compute(
            None,
            &observe(
                Outcome::Applied,
                vec![unit("a", 1, 1), unit("machines", 2, 0)],
            ),
            &at(10),
        );
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "UnitsNotReady")
        );
        assert!(
            ready.message.contains("machines (0/2 ready)"),
            "{}",
            ready.message
        );
        assert_eq!(get(&s, PROGRESSING).reason, "RollingOut");
        assert_eq!(s.units_summary.as_deref(), Some("1/2"));
        assert_eq!(s.phase.as_deref(), Some("Deploying"));
    }

    #[test]
    fn a_failed_rollout_is_degraded() {
        let mut m = unit("machines", 1, 0);
        m.rollout_failed = Some("ReplicaSet has timed out progressing".into());
        let s = compute(None, &observe(Outcome::Applied, vec![m]), &at(10));
        assert_eq!(get(&s, DEGRADED).reason, "RolloutFailed");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(s.phase.as_deref(), Some("Degraded"));
    }

    #[test]
    fn nats_trouble_is_not_ready_and_degraded() {
        let s = compute(
            None,
            &observe(
                Outcome::NatsUnavailable {
                    message: "cannot reach NATS at nats://nats:4222".into(),
                },
                vec![],
            ),
            &at(10),
        );
        assert_eq!(get(&s, READY).reason, "NatsUnavailable");
        assert!(get(&s, READY).message.contains("nats://nats:4222"));
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(s.phase.as_deref(), Some("Waiting"));
    }

    #[test]
    fn dead_letters_make_a_ready_pipeline_degraded_with_where_to_look() {
        let mut a = unit("a", 1, 1);
        a.dead_lettered = 12;
        let s = compute(None, &observe(Outcome::Applied, vec![a]), &at(10));
        assert_eq!(get(&s, READY).status, "True");
        let d = get(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "DeadLetters")
        );
        assert!(
            d.message.contains("12 messages") && d.message.contains("switchyard.default.p.dlq.*")
        );
        assert_eq!(s.units[0].dead_lettered, 12);
    }

    #[test]
    fn a_sources_row_counts_are_shown_and_outlive_its_replica() {
        let rows = switchyard_crds::RowCounts {
            waiting: 5,
            claimed: 3,
            succeeded: 90,
            failed: 2,
        };
        let mut jobs = unit("jobs", 1, 1);
        jobs.rows = Some(rows);
        let first = compute(None, &observe(Outcome::Applied, vec![jobs]), &at(10));
        assert_eq!(first.units[0].rows, Some(rows));
        // The source ended (or is being replaced): no live replica counts, the last count stands.
        let later = compute(
            Some(&first),
            &observe(Outcome::Applied, vec![unit("jobs", 1, 0)]),
            &at(20),
        );
        assert_eq!(later.units[0].rows, Some(rows));
    }

    #[test]
    fn transition_times_move_only_when_the_status_does() {
        let not_ready = observe(Outcome::Applied, vec![unit("a", 1, 0)]);
        let ready = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        let first = compute(None, &not_ready, &at(10));
        // Same status later, even with another message: the time stays.
        let mut slower = not_ready.clone();
        slower.units[0].desired = 2;
        let second = compute(Some(&first), &slower, &at(20));
        assert_eq!(get(&second, READY).last_transition_time, at(10));
        assert_ne!(get(&second, READY).message, get(&first, READY).message);
        // A real transition moves it.
        let third = compute(Some(&second), &ready, &at(30));
        assert_eq!(get(&third, READY).last_transition_time, at(30));
        assert_eq!(get(&third, PROGRESSING).last_transition_time, at(30));
        // Degraded stayed False throughout.
        assert_eq!(get(&third, DEGRADED).last_transition_time, at(10));
        // And a repeat changes nothing at all.
        assert_eq!(compute(Some(&third), &ready, &at(40)), third);
    }

    #[test]
    fn scaling_facts_recorded_earlier_are_kept() {
        let mut before = compute(
            None,
            &observe(Outcome::Applied, vec![unit("a", 1, 1)]),
            &at(10),
        );
        before.units[0].last_scale_reason = Some("lag 500 over target".into());
        let after = compute(
            Some(&before),
            &observe(Outcome::Applied, vec![unit("a", 1, 1)]),
            &at(20),
        );
        assert_eq!(
            after.units[0].last_scale_reason.as_deref(),
            Some("lag 500 over target")
        );
    }

    #[test]
    fn a_ready_unit_whose_new_replicas_are_not_all_up_is_still_rolling_out() {
        // After a change of env: the old pod is ready, the new one Pending.
        let mut machines = unit("machines", 1, 1);
        machines.rolled_out = false;
        let s = compute(None, &observe(Outcome::Applied, vec![machines]), &at(10));
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert!(get(&s, READY)
            .message
            .contains("old replicas still running"));
        assert_eq!(s.phase.as_deref(), Some("Deploying"));
    }

    #[test]
    fn a_failure_keeps_the_units_last_known_state_and_says_why() {
        let before = compute(
            None,
            &observe(Outcome::Applied, vec![unit("a", 2, 2)]),
            &at(10),
        );
        let failed = Outcome::Failed {
            reason: "NameConflict",
            message: "ConfigMap a-b-c belongs to Pipeline a".into(),
            retrying: false,
        };
        let s = compute(Some(&before), &observe(failed, vec![]), &at(20));
        assert_eq!(get(&s, READY).reason, "NameConflict");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(s.units, before.units);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn figures_alone_are_written_at_a_bounded_rate_and_changes_at_once() {
        let a = compute(
            None,
            &observe(Outcome::Applied, vec![unit("a", 1, 1)]),
            &at(10),
        );
        let mut busier = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        busier.units[0].lag = Some(900);
        let b = compute(Some(&a), &busier, &at(11));
        let soon = Some(std::time::Duration::from_secs(1));
        assert!(!needs_write(Some(&a), &b, soon));
        assert!(needs_write(Some(&a), &b, Some(FIGURES_REFRESH)));
        assert!(needs_write(Some(&a), &b, None));
        assert!(!needs_write(Some(&a), &a, None));
        let c = compute(
            Some(&a),
            &observe(Outcome::Applied, vec![unit("a", 2, 1)]),
            &at(12),
        );
        assert!(needs_write(Some(&a), &c, soon));
    }

    /// Found on a real node: the status said lag 509 while the sink had every item, for up to a
    /// refresh and a figures interval.
    #[test]
    fn catching_up_is_written_at_once() {
        let mut behind = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        behind.units[0].lag = Some(509);
        let a = compute(None, &behind, &at(10));
        let mut through = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        through.units[0].lag = Some(0);
        let b = compute(Some(&a), &through, &at(11));
        assert!(needs_write(
            Some(&a),
            &b,
            Some(std::time::Duration::from_secs(1))
        ));
        // From a backlog to a smaller one is still a figure.
        let mut less = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        less.units[0].lag = Some(100);
        let c = compute(Some(&a), &less, &at(11));
        assert!(!needs_write(
            Some(&a),
            &c,
            Some(std::time::Duration::from_secs(1))
        ));
    }

    #[test]
    fn a_units_rate_is_shown_and_is_a_figure() {
        let mut quiet = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        quiet.units[0].rate = Some(40.5);
        let a = compute(None, &quiet, &at(10));
        assert_eq!(a.units[0].rate, Some(40.5));
        let mut busier = observe(Outcome::Applied, vec![unit("a", 1, 1)]);
        busier.units[0].rate = Some(120.0);
        let b = compute(Some(&a), &busier, &at(11));
        assert_eq!(b.units[0].rate, Some(120.0));
        assert!(!needs_write(
            Some(&a),
            &b,
            Some(std::time::Duration::from_secs(1))
        ));
        assert!(needs_write(Some(&a), &b, Some(FIGURES_REFRESH)));
    }
}
