//! How many replicas a switcher should run: one pure function, used by the operator and by
//! `switchyard run` alike.
//!
//! Two needs are compared, and the larger wins:
//! - the **backlog**: `lag ÷ targetLagPerReplica` replicas, so that a backlog is met at once and in
//!   proportion, not one replica at a time;
//! - the **work**: the replicas busy right now (each replica's share of its concurrency in use, summed)
//!   ÷ `targetUtilization`, which keeps a steady load from building the backlog again after it drained.
//!
//! Up is immediate. Down waits: the switcher scales down only to the highest need seen during the
//! stabilization window, so a dip does not make it flap. Changes within 10 % are ignored. A switcher
//! whose downstream unit is near its limit holds instead of growing, because more replicas would only
//! move the backlog downstream. The result never leaves `[minReplicas, maxReplicas]`; with
//! `minReplicas: 0` an idle switcher goes to zero and wakes when messages arrive.

use std::time::Duration;

use crate::Switcher;
use serde::Serialize;

/// Relative changes this small are noise.
pub const TOLERANCE: f64 = 0.1;
/// A downstream unit is near its limit at this share of it.
pub const DOWNSTREAM_NEAR_LIMIT: f64 = 0.9;

/// A switcher's scaling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub target_lag: u64,
    /// 0 to 1.
    pub target_utilization: f64,
    pub stabilization: Duration,
}

impl Policy {
    pub fn of(switcher: &Switcher) -> Policy {
        let stabilization = switcher
            .scale_down_stabilization
            .as_deref()
            .and_then(|t| crate::duration::parse_duration(t).ok())
            .unwrap_or(DEFAULT_STABILIZATION);
        Policy {
            min: switcher.min_replicas,
            max: switcher.max_replicas.max(1),
            target_lag: switcher.target_lag_per_replica.max(1),
            target_utilization: (f64::from(switcher.target_utilization) / 100.0).clamp(0.01, 1.0),
            stabilization,
        }
    }
}

pub const DEFAULT_STABILIZATION: Duration = Duration::from_secs(30);

/// One observation of a switcher, taken every reporting interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// When, on the caller's clock.
    #[serde(serialize_with = "seconds")]
    pub at: Duration,
    /// Pending plus unacknowledged messages of the switcher's consumer.
    pub lag: u64,
    /// Replicas' worth of busy concurrency: the sum over replicas of the share each was busy with.
    pub busy: f64,
    /// Inputs finished per second by all replicas.
    pub rate: f64,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The downstream unit nearest its limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressure {
    pub unit: String,
    pub lag: u64,
    pub limit: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Up,
    Down,
    Hold,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub desired: u32,
    pub change: Change,
    /// Why, in words; for a hold, why it is not scaling. Numbers stay out of hold reasons that repeat
    /// every interval, so the status does not change every second.
    pub reason: String,
}

/// What `sample` says the switcher needs, before the bounds.
pub fn need(policy: &Policy, sample: &Sample) -> u32 {
    let for_backlog = sample.lag.div_ceil(policy.target_lag);
    let for_work = (sample.busy / policy.target_utilization).ceil().max(0.0) as u64;
    for_backlog.max(for_work).min(u64::from(u32::MAX)) as u32
}

/// The decision, from the samples of the last stabilization window (oldest first, the newest last),
/// the replicas running now and the pressure on the most loaded downstream unit.
pub fn decide(
    policy: &Policy,
    current: u32,
    samples: &[Sample],
    downstream: Option<&Pressure>,
) -> Decision {
    let Some(latest) = samples.last() else {
        return match current.clamp(policy.min, policy.max) {
            n if n != current => moved(current, n, "outside minReplicas..maxReplicas".into()),
            _ => hold(current, "waiting for the first report".into()),
        };
    };
    if current == 0 {
        return from_zero(policy, latest);
    }
    if current < policy.min || current > policy.max {
        return moved(
            current,
            current.clamp(policy.min, policy.max),
            format!(
                "kept within minReplicas {}..maxReplicas {}",
                policy.min, policy.max
            ),
        );
    }
    let now = need(policy, latest);
    let within_tolerance =
        (f64::from(now) - f64::from(current)).abs() <= f64::from(current) * TOLERANCE;
    if now > current && !within_tolerance {
        return up(policy, current, now, latest, downstream);
    }
    if now < current && current == policy.min {
        return hold(
            current,
            format!("at minReplicas {}: the load needs no more", policy.min),
        );
    }
    if now < current && !within_tolerance {
        return down(policy, current, samples, latest);
    }
    hold(current, "steady: the replicas match the load".into())
}

/// A switcher at zero wakes for the first message waiting (or for its minimum).
fn from_zero(policy: &Policy, latest: &Sample) -> Decision {
    if latest.lag > 0 {
        let desired = need(policy, latest).max(1).clamp(policy.min, policy.max);
        moved(
            0,
            desired,
            format!("woke from zero: {} messages waiting", latest.lag),
        )
    } else if policy.min > 0 {
        moved(0, policy.min, format!("minReplicas is {}", policy.min))
    } else {
        hold(0, "idle at zero replicas (minReplicas 0)".into())
    }
}

/// Up to what the load needs now, unless at the maximum or the unit downstream is near its limit.
fn up(
    policy: &Policy,
    current: u32,
    now: u32,
    latest: &Sample,
    downstream: Option<&Pressure>,
) -> Decision {
    if current == policy.max {
        return hold(
            current,
            format!("at maxReplicas {}: the load needs more", policy.max),
        );
    }
    if let Some(p) = downstream.filter(|p| p.lag as f64 >= p.limit as f64 * DOWNSTREAM_NEAR_LIMIT) {
        return hold(
            current,
            format!(
                "holding: downstream unit `{}` is near its limit, more replicas would only move the backlog there",
                p.unit
            ),
        );
    }
    moved(
        current,
        now.clamp(policy.min, policy.max),
        why_up(policy, latest),
    )
}

/// Down only to the most the window needed; a window not yet full holds.
fn down(policy: &Policy, current: u32, samples: &[Sample], latest: &Sample) -> Decision {
    let covered = samples.first().is_some_and(|first| {
        latest.at.saturating_sub(first.at) + Duration::from_millis(1) >= policy.stabilization
    });
    let window_need = samples
        .iter()
        .map(|s| need(policy, s))
        .max()
        .unwrap_or_else(|| need(policy, latest));
    let desired = window_need.clamp(policy.min, policy.max);
    if covered && desired < current {
        return moved(
            current,
            desired,
            format!(
                "the load fell: at most {window_need} replica{} needed over the last {}",
                if window_need == 1 { "" } else { "s" },
                crate::duration::human(policy.stabilization)
            ),
        );
    }
    hold(
        current,
        format!(
            "waiting: scaling down needs {} of lower load",
            crate::duration::human(policy.stabilization)
        ),
    )
}

fn why_up(policy: &Policy, sample: &Sample) -> String {
    let for_backlog = sample.lag.div_ceil(policy.target_lag);
    if u64::from(need(policy, sample)) == for_backlog {
        format!(
            "lag {} over target {} per replica",
            sample.lag, policy.target_lag
        )
    } else {
        format!(
            "{:.1} replicas' worth of work at a target of {:.0}% busy",
            sample.busy,
            policy.target_utilization * 100.0
        )
    }
}

fn moved(current: u32, desired: u32, why: String) -> Decision {
    let change = match desired.cmp(&current) {
        std::cmp::Ordering::Greater => Change::Up,
        std::cmp::Ordering::Less => Change::Down,
        std::cmp::Ordering::Equal => Change::Hold,
    };
    let reason = match change {
        Change::Up => format!("scaled up from {current} to {desired}: {why}"),
        Change::Down => format!("scaled down from {current} to {desired}: {why}"),
        Change::Hold => why,
    };
    Decision {
        desired,
        change,
        reason,
    }
}

fn hold(current: u32, reason: String) -> Decision {
    Decision {
        desired: current,
        change: Change::Hold,
        reason,
    }
}

/// Keeps the samples of the last stabilization window for one switcher.
#[derive(Clone, Debug, Default)]
pub struct Window {
    samples: std::collections::VecDeque<Sample>,
}

impl Window {
    /// Adds a sample and forgets those the window no longer needs. The newest sample at or beyond the
    /// window's start stays, so a full window is recognised whatever the spacing of the samples.
    pub fn push(&mut self, sample: Sample, stabilization: Duration) {
        self.samples.push_back(sample);
        while self
            .samples
            .get(1)
            .is_some_and(|second| sample.at.saturating_sub(second.at) >= stabilization)
        {
            self.samples.pop_front();
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests;

/// How much backlog a unit holds before it counts as full: a switcher's `maxReplicas ×
/// targetLagPerReplica`, any other unit ten times its consumer's `maxAckPending`.
pub fn lag_limit(
    unit: &crate::topology::Unit,
    consumer: Option<&crate::unit::ConsumerConfig>,
) -> u64 {
    match &unit.switcher {
        Some(s) => u64::from(s.max_replicas.max(1)).saturating_mul(s.target_lag_per_replica.max(1)),
        None => consumer.map_or(10_000, |c| {
            (c.max_ack_pending.max(1) as u64).saturating_mul(10)
        }),
    }
}

/// Of the units reading `unit`'s output, the one nearest its limit, from their current lag.
pub fn downstream_pressure(
    topology: &crate::topology::Topology,
    consumers: &[crate::unit::ConsumerConfig],
    unit: &str,
    lags: &std::collections::HashMap<String, u64>,
) -> Option<Pressure> {
    topology
        .readers_of(unit)
        .filter_map(|reader| {
            let lag = *lags.get(&reader.name)?;
            let consumer = consumers.iter().find(|c| c.durable == reader.name);
            let limit = lag_limit(reader, consumer).max(1);
            Some(Pressure {
                unit: reader.name.clone(),
                lag,
                limit,
            })
        })
        .max_by(|a, b| {
            let ra = a.lag as f64 / a.limit as f64;
            let rb = b.lag as f64 / b.limit as f64;
            ra.total_cmp(&rb)
        })
}

/// A sample from the consumer's lag and the latest reports of the replicas alive now.
pub fn sample(at: Duration, lag: u64, reports: &[crate::unit::StatsReport]) -> Sample {
    Sample {
        at,
        lag,
        busy: reports.iter().map(|r| r.utilization).sum(),
        rate: reports.iter().map(|r| r.rate).sum(),
    }
}
