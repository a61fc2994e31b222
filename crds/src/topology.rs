//! What a Pipeline means: its units (one process type each: a Deployment in a cluster, processes locally)
//! and how they are wired. Built only from a spec that passed validation.
//!
//! A top-level stage becomes a linear chain of units: normally one, but every nested `switcher` cuts its
//! parent group there, into the steps before it, the switcher's own unit(s), and the steps after it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};

use serde::Serialize;

use crate::join::Join;
use crate::pipeline::{Batch, Retry, Sink, Source, Stage, Switcher};

#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub pipeline: String,
    pub namespace: String,
    /// Sources first, then stage units in spec order, then sinks.
    pub units: Vec<Unit>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum UnitKind {
    Source(Source),
    Process,
    Sink(Sink),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub name: String,
    pub kind: UnitKind,
    /// Where the unit comes from in the spec, for messages: `stages[1] machines`.
    pub spec_path: String,
    /// Names of the units whose output this one reads.
    pub inputs: Vec<String>,
    /// In-process steps, in flow order (process units only).
    pub steps: Vec<Step>,
    pub switcher: Option<Switcher>,
    pub batch: Option<Batch>,
    pub concurrency: Option<u32>,
    pub image: Option<String>,
    pub env: Vec<EnvVar>,
    pub resources: Option<ResourceRequirements>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub tolerations: Option<Vec<Toleration>>,
    /// A join stage's unit: the branches it waits for (each one unit, named as its stage).
    pub join: Option<Join>,
    /// A branch's unit: the join unit it hands each item's outputs to, as one part.
    pub branch_of: Option<String>,
}

/// What a unit is, as `plan`, `run` and the status name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitType {
    Source,
    Group,
    Switcher,
    Sink,
}

impl UnitType {
    pub const ALL: [UnitType; 4] = [
        UnitType::Source,
        UnitType::Group,
        UnitType::Switcher,
        UnitType::Sink,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UnitType::Source => "source",
            UnitType::Group => "group",
            UnitType::Switcher => "switcher",
            UnitType::Sink => "sink",
        }
    }
}

impl std::fmt::Display for UnitType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Replicas {
    pub min: u32,
    pub max: u32,
}

pub fn type_of(unit: &Unit) -> UnitType {
    match unit.kind {
        UnitKind::Source(_) => UnitType::Source,
        UnitKind::Sink(_) => UnitType::Sink,
        UnitKind::Process if unit.switcher.is_some() => UnitType::Switcher,
        UnitKind::Process => UnitType::Group,
    }
}

/// Sources and sinks run once: two copies of a generator would generate twice, two file sinks would
/// write one file from two places.
pub fn replicas_of(unit: &Unit) -> Replicas {
    match &unit.switcher {
        Some(s) => Replicas {
            min: s.min_replicas,
            max: s.max_replicas,
        },
        None => Replicas { min: 1, max: 1 },
    }
}

/// One step with the settings it inherits from the groups around it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// `machines > wash`: names from the top-level stage down.
    pub path: String,
    /// `stages[1] machines > stages[0] wash`.
    pub spec_path: String,
    pub stage: Stage,
    pub timeout: Option<String>,
    pub retry: Option<Retry>,
    pub image: Option<String>,
    pub env: Vec<EnvVar>,
}

impl Topology {
    pub fn unit(&self, name: &str) -> Option<&Unit> {
        self.units.iter().find(|u| u.name == name)
    }

    /// Units in an order where every unit comes after all of its inputs.
    pub fn topological_order(&self) -> Vec<&Unit> {
        let mut done: Vec<&str> = Vec::new();
        let mut order = Vec::new();
        while order.len() < self.units.len() {
            let before = order.len();
            for unit in &self.units {
                if !done.contains(&unit.name.as_str())
                    && unit.inputs.iter().all(|i| done.contains(&i.as_str()))
                {
                    done.push(&unit.name);
                    order.push(unit);
                }
            }
            if order.len() == before {
                // Validation rejects cycles; never loop forever on one that slipped through.
                break;
            }
        }
        order
    }

    /// Units that read `name`'s output.
    pub fn readers_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Unit> + 'a {
        self.units
            .iter()
            .filter(move |u| u.inputs.iter().any(|i| i == name))
    }
}

/// Settings a group hands down to the stages inside it.
#[derive(Clone, Default)]
struct Inherited {
    timeout: Option<String>,
    retry: Option<Retry>,
    image: Option<String>,
    env: Vec<EnvVar>,
}

impl Inherited {
    fn under(&self, stage: &Stage) -> Inherited {
        let mut env = self.env.clone();
        for var in stage.env.iter().flatten() {
            env.retain(|e| e.name != var.name);
            env.push(var.clone());
        }
        Inherited {
            timeout: stage.timeout.clone().or_else(|| self.timeout.clone()),
            retry: stage.retry.clone().or_else(|| self.retry.clone()),
            image: stage.image.clone().or_else(|| self.image.clone()),
            env,
        }
    }
}

/// Splits one top-level stage (or nested switcher) into its chain of units. `inputs` of the first unit are
/// left empty: the caller wires the chain's entry.
fn chain_of_units(
    stage: &Stage,
    unit_name: &str,
    name_path: &str,
    spec_path: &str,
    outer: &Inherited,
) -> Vec<Unit> {
    let inherited = outer.under(stage);
    let mut chain = ChainBuilder {
        base: unit_name.to_string(),
        root: stage,
        units: Vec::new(),
        current: new_unit(unit_name, stage, spec_path, &inherited, true),
    };
    chain.visit(stage, name_path, spec_path, &inherited);
    chain.finish()
}

struct ChainBuilder<'a> {
    base: String,
    root: &'a Stage,
    units: Vec<Unit>,
    current: Unit,
}

impl ChainBuilder<'_> {
    fn visit(&mut self, stage: &Stage, name_path: &str, spec_path: &str, inherited: &Inherited) {
        let Some(children) = &stage.stages else {
            self.current.steps.push(Step {
                path: name_path.to_string(),
                spec_path: spec_path.to_string(),
                stage: Stage {
                    stages: None,
                    ..stage.clone()
                },
                timeout: inherited.timeout.clone(),
                retry: inherited.retry.clone(),
                image: inherited.image.clone(),
                env: inherited.env.clone(),
            });
            return;
        };
        for (i, child) in children.iter().enumerate() {
            let child_name_path = format!("{name_path} > {}", child.name);
            let child_spec_path = format!("{spec_path} > stages[{i}] {}", child.name);
            if child.switcher.is_some() {
                let after = format!("{}-after-{}", self.base, child.name);
                let rest = new_unit(&after, self.root, &child_spec_path, inherited, false);
                let before = std::mem::replace(&mut self.current, rest);
                if !before.steps.is_empty() {
                    self.units.push(before);
                }
                let nested = chain_of_units(
                    child,
                    &format!("{}-{}", self.base, child.name),
                    &child_name_path,
                    &child_spec_path,
                    inherited,
                );
                self.units.extend(nested);
            } else {
                self.visit(
                    child,
                    &child_name_path,
                    &child_spec_path,
                    &inherited.under(child),
                );
            }
        }
    }

    fn finish(mut self) -> Vec<Unit> {
        if !self.current.steps.is_empty() || self.units.is_empty() {
            self.units.push(self.current);
        }
        for i in 1..self.units.len() {
            let previous = self.units[i - 1].name.clone();
            self.units[i].inputs = vec![previous];
        }
        self.units
    }
}

fn new_unit(
    name: &str,
    root: &Stage,
    spec_path: &str,
    inherited: &Inherited,
    is_root: bool,
) -> Unit {
    Unit {
        name: name.to_string(),
        kind: UnitKind::Process,
        spec_path: spec_path.to_string(),
        inputs: Vec::new(),
        steps: Vec::new(),
        switcher: if is_root { root.switcher.clone() } else { None },
        batch: if is_root { root.batch.clone() } else { None },
        concurrency: root.concurrency,
        image: inherited.image.clone(),
        env: inherited.env.clone(),
        resources: root.resources.clone(),
        node_selector: root.node_selector.clone(),
        tolerations: root.tolerations.clone(),
        join: if is_root { root.join.clone() } else { None },
        branch_of: None,
    }
}

impl Unit {
    /// A source or sink: a unit of its own with no steps, in the Pipeline's image.
    fn edge(
        name: &str,
        kind: UnitKind,
        spec_path: String,
        inputs: Vec<String>,
        spec: &crate::PipelineSpec,
    ) -> Unit {
        Unit {
            name: name.to_string(),
            kind,
            spec_path,
            inputs,
            steps: Vec::new(),
            switcher: None,
            batch: None,
            concurrency: None,
            image: spec.image.clone(),
            env: Vec::new(),
            resources: None,
            node_selector: None,
            tolerations: None,
            join: None,
            branch_of: None,
        }
    }
}

/// Builds the topology of a spec whose names and inputs are known to resolve.
pub(crate) fn build(
    pipeline: &str,
    namespace: &str,
    spec: &crate::PipelineSpec,
) -> (Topology, BTreeMap<String, String>) {
    let mut units = Vec::new();
    // What a name in `inputs` refers to: the unit whose output carries that stage's (or source's) output.
    let mut exit_of: BTreeMap<String, String> = BTreeMap::new();
    for (i, source) in spec.sources.iter().enumerate() {
        exit_of.insert(source.name.clone(), source.name.clone());
        units.push(Unit::edge(
            &source.name,
            UnitKind::Source(source.clone()),
            format!("sources[{i}] {}", source.name),
            Vec::new(),
            spec,
        ));
    }
    let chains = stage_chains(spec, &mut exit_of);
    let all_sources: Vec<String> = spec.sources.iter().map(|s| s.name.clone()).collect();
    let resolve = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter_map(|n| exit_of.get(n).cloned())
            .collect()
    };
    for (i, (stage, mut chain)) in spec.stages.iter().zip(chains).enumerate() {
        let entry_inputs = match (&stage.join, &stage.inputs) {
            (Some(join), _) => resolve(&join.of),
            (None, Some(names)) => resolve(names),
            (None, None) if i == 0 => all_sources.clone(),
            (None, None) => resolve(std::slice::from_ref(&spec.stages[i - 1].name)),
        };
        if let Some(first) = chain.first_mut() {
            first.inputs = entry_inputs;
        }
        units.extend(chain);
    }
    mark_branches(spec, &exit_of, &mut units);
    let default_sink_input = match spec.stages.last() {
        Some(stage) => resolve(std::slice::from_ref(&stage.name)),
        None => all_sources,
    };
    for (i, sink) in spec.sinks.iter().enumerate() {
        let inputs = match &sink.inputs {
            Some(names) => resolve(names),
            None => default_sink_input.clone(),
        };
        units.push(Unit::edge(
            &sink.name,
            UnitKind::Sink(sink.clone()),
            format!("sinks[{i}] {}", sink.name),
            inputs,
            spec,
        ));
    }
    (
        Topology {
            pipeline: pipeline.to_string(),
            namespace: namespace.to_string(),
            units,
        },
        exit_of,
    )
}

/// Each top-level stage's chain of units; notes in `exit_of` the unit its output leaves from.
fn stage_chains(
    spec: &crate::PipelineSpec,
    exit_of: &mut BTreeMap<String, String>,
) -> Vec<Vec<Unit>> {
    let global = Inherited {
        image: spec.image.clone(),
        ..Inherited::default()
    };
    let mut chains = Vec::new();
    for (i, stage) in spec.stages.iter().enumerate() {
        let chain = chain_of_units(
            stage,
            &stage.name,
            &stage.name,
            &format!("stages[{i}] {}", stage.name),
            &global,
        );
        if let Some(last) = chain.last() {
            exit_of.insert(stage.name.clone(), last.name.clone());
        }
        chains.push(chain);
    }
    chains
}

/// Tells each branch's unit which join it hands its parts to.
fn mark_branches(
    spec: &crate::PipelineSpec,
    exit_of: &BTreeMap<String, String>,
    units: &mut [Unit],
) {
    for stage in &spec.stages {
        let Some(join) = &stage.join else { continue };
        for branch in &join.of {
            if let Some(unit) = units
                .iter_mut()
                .find(|u| Some(&u.name) == exit_of.get(branch))
            {
                unit.branch_of = Some(stage.name.clone());
            }
        }
    }
}
