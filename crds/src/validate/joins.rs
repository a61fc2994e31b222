//! The checks of join stages (`crate::join`): what they name, that their branches fork from the same
//! items, and that only the join reads a branch, which runs as one unit.

use std::collections::BTreeMap;

use crate::pipeline::{PipelineSpec, Stage};
use crate::problem::Problem;
use crate::topology::Topology;

/// What each stage reads, as the topology wires it: its `inputs`, its join's branches, the previous
/// stage, or every source for the first.
fn reads(spec: &PipelineSpec, i: usize) -> Vec<String> {
    let stage = &spec.stages[i];
    match (&stage.join, &stage.inputs) {
        (Some(join), _) => join.of.clone(),
        (None, Some(inputs)) => inputs.clone(),
        (None, None) if i == 0 => spec.sources.iter().map(|s| s.name.clone()).collect(),
        (None, None) => vec![spec.stages[i - 1].name.clone()],
    }
}

/// The stages a join stage waits for, by position, for the cycle check: its branches.
pub(super) fn join_inputs(stage: &Stage) -> Option<&[String]> {
    stage.join.as_ref().map(|j| j.of.as_slice())
}

/// Every join's settings and branches, on the spec alone.
pub(super) fn check_joins(problems: &mut Vec<Problem>, spec: &PipelineSpec) {
    let mut branch_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, stage) in spec.stages.iter().enumerate() {
        let Some(join) = &stage.join else { continue };
        let path = format!("stages[{i}] {}", stage.name);
        if stage.inputs.is_some() {
            problems.push(Problem::at(
                &path,
                "a join reads the branches `join.of` names: remove `inputs`",
            ));
        }
        if stage.batch.is_some() {
            problems.push(Problem::at(
                &path,
                "a join hands on one item per forked item: batch them in a stage after it",
            ));
        }
        if let Some(first) = stage.stages.as_ref().and_then(|s| s.first()) {
            if first.switcher.is_some() {
                problems.push(Problem::at(&path, format!("its first stage `{}` is a switcher, but the join's own unit must come first: make the join stage itself the switcher to scale it", first.name)));
            }
        }
        if let Some(timeout) = &join.timeout {
            crate::duration::check_duration(problems, &path, "join.timeout", timeout);
        }
        let following = spec.sources.iter().find(|source| {
            matches!(
                source.kind.one(),
                Some(crate::pipeline::SourceKind::Postgres(p)) if p.follows_its_jobs()
            )
        });
        if let Some(source) = following {
            problems.push(Problem::at(&path, format!("source `{}` follows its rows to the end of their items (postgres completeOn: finished), and a join cannot account for them yet: set completeOn: publish on it, or join in a Pipeline of its own", source.name)));
        }
        if stage.switcher.as_ref().is_some_and(|s| s.min_replicas == 0) {
            problems.push(Problem::at(&path, "a join times out the items it waits on, which needs a replica: set switcher.minReplicas to at least 1"));
        }
        if join.max_waiting == Some(0) {
            problems.push(Problem::at(&path, "join.maxWaiting must be at least 1"));
        }
        if join.of.len() < 2 {
            problems.push(Problem::at(
                &path,
                "a join waits for at least two branches: name them in join.of",
            ));
        }
        let mut inputs: Vec<(&str, Vec<String>)> = Vec::new();
        for (n, branch) in join.of.iter().enumerate() {
            if let Some(b) = check_branch(problems, spec, &path, i, n, &mut branch_of) {
                inputs.push((branch, reads(spec, b)));
            }
        }
        check_same_fork(problems, &path, &mut inputs);
    }
}

/// The `n`-th branch of the join at `stages[i]`: its position among the stages, when it is one
/// that can be a branch.
fn check_branch<'a>(
    problems: &mut Vec<Problem>,
    spec: &'a PipelineSpec,
    path: &str,
    i: usize,
    n: usize,
    branch_of: &mut BTreeMap<&'a str, &'a str>,
) -> Option<usize> {
    let stage = &spec.stages[i];
    let join = stage.join.as_ref()?;
    let branch = &join.of[n];
    if join.of[..n].contains(branch) {
        problems.push(Problem::at(path, format!("join.of names `{branch}` twice")));
        return None;
    }
    if branch == &stage.name {
        problems.push(Problem::at(
            path,
            "the join names itself in join.of: it cannot wait for its own output",
        ));
        return None;
    }
    let Some(b) = spec.stages.iter().position(|s| &s.name == branch) else {
        let known: Vec<&str> = spec
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| *n != stage.name)
            .collect();
        let what = if spec.sources.iter().any(|s| &s.name == branch) {
            format!("`{branch}` is a source, and a join waits for the branches of a fork, which are stages reading the same input")
        } else {
            format!("join.of names `{branch}`, which is no top-level stage")
        };
        problems.push(Problem::at(
            path,
            format!("{what}; stages: {}", known.join(", ")),
        ));
        return None;
    };
    let branch_stage = &spec.stages[b];
    if let Some(other) = branch_of.insert(branch, &stage.name) {
        problems.push(Problem::at(path, format!("`{branch}` is already a branch of join `{other}`: a branch hands its parts to one join")));
    }
    if branch_stage.join.is_some() {
        problems.push(Problem::at(path, format!("`{branch}` is a join itself, and a branch cannot be: put a stage after it and name that one")));
    }
    if branch_stage.batch.is_some() {
        problems.push(Problem::at(path, format!("branch `{branch}` batches its items, and a join matches each item's own outputs: remove its batch")));
    }
    Some(b)
}

/// Every branch must read the same inputs: each item then forks to all of them.
fn check_same_fork(problems: &mut Vec<Problem>, path: &str, inputs: &mut [(&str, Vec<String>)]) {
    for (_, reads) in inputs.iter_mut() {
        reads.sort();
    }
    let Some((first, first_reads)) = inputs.first() else {
        return;
    };
    let differ: Vec<String> = inputs
        .iter()
        .filter(|(_, reads)| reads != first_reads)
        .map(|(branch, reads)| format!("`{branch}` reads {}", reads.join(", ")))
        .collect();
    if !differ.is_empty() {
        problems.push(Problem::at(
            path,
            format!(
                "the branches of a join must read the same inputs, so that each item forks to all of them: `{first}` reads {}, {}; give them the same `inputs`",
                first_reads.join(", "),
                differ.join(", ")
            ),
        ));
    }
}

/// On the topology: each branch runs as one unit, which only its join reads.
pub(super) fn check_join_units(
    problems: &mut Vec<Problem>,
    spec: &PipelineSpec,
    topology: &Topology,
) {
    for (i, stage) in spec.stages.iter().enumerate() {
        let Some(join) = &stage.join else { continue };
        let path = format!("stages[{i}] {}", stage.name);
        for branch in &join.of {
            let Some(b) = spec.stages.iter().position(|s| &s.name == branch) else {
                continue;
            };
            let own = format!("stages[{b}] {branch}");
            let units: Vec<&str> = topology
                .units
                .iter()
                .filter(|u| u.spec_path == own || u.spec_path.starts_with(&format!("{own} >")))
                .map(|u| u.name.as_str())
                .collect();
            if units.len() > 1 {
                problems.push(Problem::at(&path, format!("branch `{branch}` runs as several units ({}), and a join needs all of a branch's outputs of an item from one: make `{branch}` itself the switcher instead of a stage inside it", units.join(", "))));
                continue;
            }
            for reader in topology.readers_of(branch).filter(|u| u.name != stage.name) {
                problems.push(Problem::at(&reader.spec_path, format!("it reads `{branch}`, a branch of join `{}`, which hands its outputs to the join alone: read `{}` instead, or name its input in `inputs` (a stage without `inputs` reads the one before it; a sink without, the last)", stage.name, stage.name)));
            }
        }
    }
}

#[cfg(test)]
mod tests;
