//! `switchyard validate`: every problem in a Pipeline at once, each with the stage's path and what to do.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{MAX_STAGES_PER_GROUP, MAX_STAGE_DEPTH, MAX_TOP_LEVEL_STAGES};
use crate::duration::parse_duration;
use crate::kinds;
use crate::pipeline::{
    Pipeline, Retry, Sink, SinkKind, Source, SourceKind, Stage, StepKind, Switcher,
};
use crate::problem::Problem;
use crate::topology::{self, Topology};

mod joins;
mod kind_settings;
mod parse;

use kind_settings::{check_sink_kind, check_source_kind, check_step_kind, is_valid_subject};
pub use parse::{parse_pipeline, MAX_MANIFEST_BYTES, MAX_MANIFEST_NESTING};

/// Longest name Kubernetes accepts for a label value, and so for the objects we derive from unit names.
pub const MAX_OBJECT_NAME: usize = 63;

/// Checks a Pipeline; on success returns what it means (its units and their wiring).
pub fn analyze(pipeline: &Pipeline) -> Result<Topology, Vec<Problem>> {
    let mut problems = Vec::new();
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        problems.push(Problem::at(
            "metadata.name",
            "the Pipeline has no name: set metadata.name",
        ));
    } else {
        check_name(&mut problems, "metadata.name", &name);
    }
    let namespace = pipeline
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    check_spec(&mut problems, &pipeline.spec);
    if !problems.is_empty() {
        return Err(problems);
    }
    let (topology, _) = topology::build(&name, &namespace, &pipeline.spec);
    check_units(&mut problems, &name, &topology);
    joins::check_join_units(&mut problems, &pipeline.spec, &topology);
    if problems.is_empty() {
        Ok(topology)
    } else {
        Err(problems)
    }
}

/// Sources, top-level stages and sinks share one namespace of names; each name's first path.
#[derive(Default)]
struct TopNames(BTreeMap<String, String>);

impl TopNames {
    fn claim(&mut self, problems: &mut Vec<Problem>, name: &str, path: &str) {
        if let Some(first) = self.0.get(name) {
            problems.push(Problem::at(
                path,
                format!("the name `{name}` is already used by {first}: sources, top-level stages and sinks need distinct names"),
            ));
        } else {
            self.0.insert(name.to_string(), path.to_string());
        }
    }
}

fn check_spec(problems: &mut Vec<Problem>, spec: &crate::PipelineSpec) {
    let mut names = TopNames::default();
    if spec.sources.is_empty() {
        problems.push(Problem::at(
            "sources",
            format!(
                "the Pipeline has no sources: add at least one ({})",
                kinds::or_list(kinds::names::<SourceKind>())
            ),
        ));
    }
    for (i, source) in spec.sources.iter().enumerate() {
        let path = format!("sources[{i}] {}", source.name);
        check_name(problems, &path, &source.name);
        names.claim(problems, &source.name, &path);
        check_source(problems, &path, source);
    }
    if spec.stages.len() > MAX_TOP_LEVEL_STAGES {
        problems.push(Problem::at(
            "stages",
            format!("the Pipeline has {} top-level stages and may have at most {MAX_TOP_LEVEL_STAGES}: group some of them", spec.stages.len()),
        ));
    }
    for (i, stage) in spec.stages.iter().enumerate() {
        let path = format!("stages[{i}] {}", stage.name);
        names.claim(problems, &stage.name, &path);
        check_stage(problems, &path, stage, 1);
    }
    if spec.sinks.is_empty() {
        problems.push(Problem::at(
            "sinks",
            format!(
                "the Pipeline has no sinks: add at least one ({})",
                kinds::or_list(kinds::names::<SinkKind>())
            ),
        ));
    }
    for (i, sink) in spec.sinks.iter().enumerate() {
        let path = format!("sinks[{i}] {}", sink.name);
        check_name(problems, &path, &sink.name);
        names.claim(problems, &sink.name, &path);
        check_sink(problems, &path, sink);
    }
    check_settings(problems, spec);
    check_inputs(problems, spec);
    joins::check_joins(problems, spec);
}

/// The Pipeline-wide settings: dead letters, NATS, tracing.
fn check_settings(problems: &mut Vec<Problem>, spec: &crate::PipelineSpec) {
    if let Some(subject) = spec.dead_letter.as_ref().and_then(|d| d.subject.as_ref()) {
        if !is_valid_subject(subject) {
            problems.push(Problem::at("deadLetter.subject", format!("`{subject}` is not a NATS subject: use dot-separated tokens without spaces or wildcards")));
        }
    }
    if let Some(crashes) = spec.dead_letter.as_ref().and_then(|d| d.after_crashes) {
        if !(1..=100).contains(&crashes) {
            problems.push(Problem::at("deadLetter.afterCrashes", format!("{crashes} is out of range: give 1 to 100 crashes of a unit's process a message may cause before it is dead-lettered")));
        }
    }
    if let Some(after) = spec.nats.as_ref().and_then(|n| n.redeliver_after.as_ref()) {
        let range = crate::pipeline::REDELIVER_AFTER_RANGE;
        match parse_duration(after) {
            Ok(d) if range.contains(&d) => {}
            Ok(_) => problems.push(Problem::at(
                "nats.redeliverAfter",
                format!("`{after}` is out of range: give 1s to 1m (how long a message whose process died waits before it is delivered again)"),
            )),
            Err(e) => problems.push(Problem::at("nats.redeliverAfter", format!("{e}"))),
        }
    }
    if let Some(replicas) = spec.nats.as_ref().and_then(|n| n.replicas) {
        if !matches!(replicas, 1 | 3 | 5) {
            problems.push(Problem::at("nats.replicas", format!("{replicas} replicas cannot be had: JetStream keeps 1, 3 or 5 (a majority must survive a lost server)")));
        }
    }
    if let Some(tracing) = &spec.tracing {
        if let Some(rate) = tracing.sample_rate {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(Problem::at("tracing.sampleRate", format!("{rate} is not a share of items: give a number from 0 (trace none) to 1 (trace every item)")));
            }
        }
        if let Some(retention) = &tracing.retention {
            match parse_duration(retention) {
                Ok(d) if d >= std::time::Duration::from_secs(1) => {}
                Ok(_) => problems.push(Problem::at(
                    "tracing.retention",
                    "keep trace events at least 1s".to_string(),
                )),
                Err(e) => problems.push(Problem::at("tracing.retention", format!("{e}"))),
            }
        }
    }
}

fn check_name(problems: &mut Vec<Problem>, path: &str, name: &str) {
    if !is_dns_label(name) {
        problems.push(Problem::at(
            path,
            format!("`{name}` is not a valid name: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"),
        ));
    }
}

pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_OBJECT_NAME
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Reports a holder given no kind or several; `names` are the kinds given, `all` every kind it may have.
fn exactly_one(problems: &mut Vec<Problem>, path: &str, what: &str, names: &[&str], all: &str) {
    match names {
        [_] => {}
        [] => problems.push(Problem::at(
            path,
            format!("{what} has no kind: give it exactly one of {all}"),
        )),
        several => problems.push(Problem::at(
            path,
            format!(
                "{what} sets {}: give it exactly one of {all}",
                several
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        )),
    }
}

fn check_source(problems: &mut Vec<Problem>, path: &str, source: &Source) {
    for kind in source.kind.iter() {
        check_source_kind(problems, path, kind);
    }
    let all = kinds::names::<SourceKind>().join(", ");
    exactly_one(problems, path, "the source", &source.kind.names(), &all);
}

fn check_sink(problems: &mut Vec<Problem>, path: &str, sink: &Sink) {
    for kind in sink.kind.iter() {
        check_sink_kind(problems, path, kind);
    }
    let all = kinds::names::<SinkKind>().join(", ");
    exactly_one(problems, path, "the sink", &sink.kind.names(), &all);
}

/// `depth` is 1 for a top-level stage, 2 for a stage in its group, and so on.
fn check_stage(problems: &mut Vec<Problem>, path: &str, stage: &Stage, depth: usize) {
    check_name(problems, path, &stage.name);
    let top_level = depth == 1;
    // Top-level stages and switchers become units of their own.
    let is_unit = top_level || stage.switcher.is_some();
    let mut kinds = Vec::new();
    if let Some(children) = &stage.stages {
        kinds.push("stages");
        check_group(problems, path, children, depth);
    }
    for kind in stage.step.iter() {
        check_step_kind(problems, path, kind);
    }
    kinds.extend(stage.step.names());
    let all = format!(
        "{}, or nested stages",
        kinds::names::<StepKind>().join(", ")
    );
    exactly_one(problems, path, "the stage", &kinds, &all);
    if let Some(timeout) = &stage.timeout {
        crate::duration::check_duration(problems, path, "timeout", timeout);
    }
    if let Some(retry) = &stage.retry {
        check_retry(problems, path, retry);
    }
    if let Some(batch) = &stage.batch {
        if !is_unit {
            problems.push(Problem::at(path, "batch works on a unit's input: move it to the top-level stage, or make this stage a switcher"));
        }
        if batch.size == 0 {
            problems.push(Problem::at(path, "batch.size must be at least 1"));
        }
        if let Some(t) = &batch.timeout {
            crate::duration::check_duration(problems, path, "batch.timeout", t);
        }
    }
    if let Some(switcher) = &stage.switcher {
        check_switcher(problems, path, switcher);
    }
    if let Some(c) = stage.concurrency {
        if c == 0 {
            problems.push(Problem::at(path, "concurrency must be at least 1"));
        } else if !is_unit {
            problems.push(Problem::at(
                path,
                "concurrency applies to a unit: set it on the top-level stage or on a switcher",
            ));
        }
    }
    if !top_level && stage.join.is_some() {
        problems.push(Problem::at(
            path,
            "join works on a top-level stage: its branches are top-level stages",
        ));
    }
    if !top_level && stage.inputs.is_some() {
        problems.push(Problem::at(
            path,
            "inputs can only be set on a top-level stage: inside a group the order is the flow",
        ));
    }
}

/// The stages of the group at `path` (itself at `depth`): their number, nesting and names.
fn check_group(problems: &mut Vec<Problem>, path: &str, children: &[Stage], depth: usize) {
    if children.is_empty() {
        problems.push(Problem::at(
            path,
            "the group has no stages: add at least one, or make this stage a step",
        ));
    }
    if depth >= MAX_STAGE_DEPTH && !children.is_empty() {
        problems.push(Problem::at(
            path,
            format!("stages nest at most {MAX_STAGE_DEPTH} levels deep and this group is at level {depth}: move its stages up a level, or into a top-level stage of their own"),
        ));
        return;
    }
    if depth > 1 && children.len() > MAX_STAGES_PER_GROUP {
        problems.push(Problem::at(
            path,
            format!("the group has {} stages and a nested group holds at most {MAX_STAGES_PER_GROUP}: split it into groups", children.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, child) in children.iter().enumerate() {
        let child_path = format!("{path} > stages[{i}] {}", child.name);
        if !seen.insert(child.name.as_str()) {
            problems.push(Problem::at(
                &child_path,
                format!("another stage in this group is already named `{}`: give each stage of a group its own name", child.name),
            ));
        }
        check_stage(problems, &child_path, child, depth + 1);
    }
}

fn check_retry(problems: &mut Vec<Problem>, path: &str, retry: &Retry) {
    if retry.max_attempts == 0 {
        problems.push(Problem::at(
            path,
            "retry.maxAttempts must be at least 1 (it counts the first attempt)",
        ));
    }
    for (field, value) in [
        ("retry.backoff", &retry.backoff),
        ("retry.maxBackoff", &retry.max_backoff),
    ] {
        if let Some(Err(e)) = value.as_deref().map(parse_duration) {
            problems.push(Problem::at(path, format!("{field}: {e}")));
        }
    }
}

fn check_switcher(problems: &mut Vec<Problem>, path: &str, sw: &Switcher) {
    if sw.max_replicas == 0 {
        problems.push(Problem::at(path, "switcher.maxReplicas must be at least 1"));
    }
    if sw.min_replicas > sw.max_replicas {
        problems.push(Problem::at(
            path,
            format!(
                "switcher.minReplicas ({}) is greater than maxReplicas ({}): lower minReplicas or raise maxReplicas",
                sw.min_replicas, sw.max_replicas
            ),
        ));
    }
    if sw.target_lag_per_replica == 0 {
        problems.push(Problem::at(
            path,
            "switcher.targetLagPerReplica must be at least 1",
        ));
    }
    if !(1..=100).contains(&sw.target_utilization) {
        problems.push(Problem::at(
            path,
            format!(
                "switcher.targetUtilization {} must be a percentage from 1 to 100",
                sw.target_utilization
            ),
        ));
    }
    if let Some(window) = &sw.scale_down_stabilization {
        crate::duration::check_duration(problems, path, "switcher.scaleDownStabilization", window);
    }
}

fn check_inputs(problems: &mut Vec<Problem>, spec: &crate::PipelineSpec) {
    let mut known: Vec<&str> = spec
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .chain(spec.stages.iter().map(|s| s.name.as_str()))
        .collect();
    known.sort();
    for (i, stage) in spec.stages.iter().enumerate() {
        let path = format!("stages[{i}] {}", stage.name);
        check_named_inputs(
            problems,
            &path,
            stage.inputs.as_deref(),
            &known,
            Some(&stage.name),
        );
    }
    for (i, sink) in spec.sinks.iter().enumerate() {
        let path = format!("sinks[{i}] {}", sink.name);
        check_named_inputs(problems, &path, sink.inputs.as_deref(), &known, None);
    }
    check_cycles(problems, spec);
}

/// The `inputs` of the stage or sink at `path` (named `own`, for a stage) name what exists.
fn check_named_inputs(
    problems: &mut Vec<Problem>,
    path: &str,
    inputs: Option<&[String]>,
    known: &[&str],
    own: Option<&str>,
) {
    for input in inputs.into_iter().flatten() {
        if Some(input.as_str()) == own {
            problems.push(Problem::at(path, "the stage names itself in inputs"));
        } else if !known.contains(&input.as_str()) {
            problems.push(Problem::at(
                path,
                format!(
                    "inputs names `{input}`, which is no source or top-level stage; known: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    if inputs.is_some_and(<[String]>::is_empty) {
        problems.push(Problem::at(
            path,
            "inputs is empty: name at least one source or stage, or leave it out",
        ));
    }
}

/// Cycles among top-level stages (each stage depends on its inputs, or on the previous stage).
fn check_cycles(problems: &mut Vec<Problem>, spec: &crate::PipelineSpec) {
    let deps = |i: usize| -> Vec<usize> {
        let stage = &spec.stages[i];
        match joins::join_inputs(stage).or(stage.inputs.as_deref()) {
            Some(names) => names
                .iter()
                .filter_map(|n| spec.stages.iter().position(|s| &s.name == n))
                .collect(),
            None if i == 0 => Vec::new(),
            None => vec![i - 1],
        }
    };
    let mut state = vec![0u8; spec.stages.len()]; // 0 new, 1 on the path, 2 done
    let mut reported = BTreeSet::new();
    for start in 0..spec.stages.len() {
        let mut path = Vec::new();
        find_cycle(
            start,
            &deps,
            &mut state,
            &mut path,
            &mut |cycle: &[usize]| {
                let mut key: Vec<usize> = cycle.to_vec();
                key.sort();
                if reported.insert(key) {
                    let names: Vec<&str> = cycle
                        .iter()
                        .chain(cycle.first())
                        .map(|&i| spec.stages[i].name.as_str())
                        .collect();
                    problems.push(Problem::at(
                    format!("stages[{}] {}", cycle[0], spec.stages[cycle[0]].name),
                    format!("inputs form a cycle: {}; a message must not come back to a stage it left, so remove one of these inputs", names.join(" -> ")),
                ));
                }
            },
        );
    }
}

fn find_cycle(
    node: usize,
    deps: &dyn Fn(usize) -> Vec<usize>,
    state: &mut [u8],
    path: &mut Vec<usize>,
    report: &mut dyn FnMut(&[usize]),
) {
    if state[node] == 2 {
        return;
    }
    if state[node] == 1 {
        if let Some(pos) = path.iter().position(|&n| n == node) {
            report(&path[pos..]);
        }
        return;
    }
    state[node] = 1;
    path.push(node);
    for next in deps(node) {
        find_cycle(next, deps, state, path, report);
    }
    path.pop();
    state[node] = 2;
}

fn check_units(problems: &mut Vec<Problem>, pipeline: &str, topology: &Topology) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for unit in &topology.units {
        if let Some(other) = seen.insert(&unit.name, &unit.spec_path) {
            problems.push(Problem::at(
                &unit.spec_path,
                format!(
                    "this makes a unit named `{}`, as does {other}: rename one of them",
                    unit.name
                ),
            ));
        }
        let object = crate::layout::object_name(pipeline, &unit.name);
        if object.len() > MAX_OBJECT_NAME {
            problems.push(Problem::at(
                &unit.spec_path,
                format!(
                    "its Deployment would be named `{object}` ({} characters, Kubernetes allows {MAX_OBJECT_NAME}): shorten the Pipeline's or the stage's name",
                    object.len()
                ),
            ));
        }
        let images: BTreeSet<&str> = unit
            .steps
            .iter()
            .filter_map(|s| s.image.as_deref())
            .collect();
        if images.len() > 1 {
            problems.push(Problem::at(
                &unit.spec_path,
                format!(
                    "its steps run in one process but ask for different images ({}): use one image, or make the stage that needs another one a switcher",
                    images.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests;
