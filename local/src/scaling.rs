//! Autoscaling in local mode: the same decisions as the operator's, applied by starting and stopping
//! `switchyard-stage` processes, and a record of replicas and lag over time.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use switchyard_crds::layout::Layout;
use switchyard_crds::topology::Topology;
use switchyard_crds::unit::StatsReport;

use crate::supervisor::Supervisor;
use switchyard_crds::autoscale::{self, Policy, Window};

/// One scaling change.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    /// Seconds since the run started.
    pub t: f64,
    pub unit: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// A unit at one moment of the run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub t: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Processes running.
    pub replicas: usize,
    /// Processes wanted (the autoscaler's decision).
    pub desired: usize,
}

/// A switcher's scaling settings, as the summary shows them.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitcherSettings {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target_lag_per_replica: u64,
    pub target_utilization: f64,
    pub scale_down_stabilization_seconds: f64,
}

pub struct LocalScaler {
    switchers: BTreeMap<String, (Policy, Window)>,
    pub events: Vec<ScaleEvent>,
    pub timeline: BTreeMap<String, Vec<Point>>,
}

impl LocalScaler {
    pub fn new(topology: &Topology) -> LocalScaler {
        LocalScaler {
            switchers: topology
                .units
                .iter()
                .filter_map(|u| {
                    u.switcher
                        .as_ref()
                        .map(|s| (u.name.clone(), (Policy::of(s), Window::default())))
                })
                .collect(),
            events: Vec::new(),
            timeline: BTreeMap::new(),
        }
    }

    /// Takes up the switchers of an edited topology: their windows stay, their policies are the new ones.
    pub fn adopt(&mut self, topology: &Topology) {
        let mut switchers = BTreeMap::new();
        for unit in &topology.units {
            if let Some(s) = &unit.switcher {
                let window = self
                    .switchers
                    .remove(&unit.name)
                    .map(|(_, w)| w)
                    .unwrap_or_default();
                switchers.insert(unit.name.clone(), (Policy::of(s), window));
            }
        }
        self.switchers = switchers;
    }

    pub fn settings(&self) -> BTreeMap<String, SwitcherSettings> {
        self.switchers
            .iter()
            .map(|(name, (p, _))| {
                (
                    name.clone(),
                    SwitcherSettings {
                        min_replicas: p.min,
                        max_replicas: p.max,
                        target_lag_per_replica: p.target_lag,
                        target_utilization: p.target_utilization,
                        scale_down_stabilization_seconds: p.stabilization.as_secs_f64(),
                    },
                )
            })
            .collect()
    }

    /// One reporting interval: decide for every switcher, apply, and record every unit's state.
    /// Returns what the person watching should be told.
    pub fn step(
        &mut self,
        at: Duration,
        topology: &Topology,
        layout: &Layout,
        lags: &HashMap<String, u64>,
        fresh_reports: &HashMap<String, Vec<StatsReport>>,
        supervisor: &mut Supervisor,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        for (unit, (policy, window)) in self.switchers.iter_mut() {
            let Some(&lag) = lags.get(unit) else { continue };
            let reports = fresh_reports
                .get(unit)
                .map(Vec::as_slice)
                .unwrap_or_default();
            window.push(autoscale::sample(at, lag, reports), policy.stabilization);
            let pressure =
                autoscale::downstream_pressure(topology, &layout.nats.consumers, unit, lags);
            let current = supervisor
                .units
                .iter()
                .find(|u| u.unit == *unit)
                .map_or(0, |u| u.wanted) as u32;
            let decision = autoscale::decide(policy, current, &window.samples(), pressure.as_ref());
            if decision.desired != current {
                supervisor.scale(unit, decision.desired as usize);
                notes.push(format!("unit `{unit}`: {}", decision.reason));
                self.events.push(ScaleEvent {
                    t: at.as_secs_f64(),
                    unit: unit.clone(),
                    from: current,
                    to: decision.desired,
                    reason: decision.reason,
                });
            }
        }
        for processes in &supervisor.units {
            self.timeline
                .entry(processes.unit.clone())
                .or_default()
                .push(Point {
                    t: at.as_secs_f64(),
                    lag: lags.get(&processes.unit).copied(),
                    replicas: processes.running(),
                    desired: processes.wanted,
                });
        }
        notes
    }
}
