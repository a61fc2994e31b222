//! When a job is finished: the items a row of a `postgres` source became, followed to every sink
//! they were routed to, as an XOR ack tree (the acker of Apache Storm), kept by the source.
//!
//! Each delivery of an item to a reading unit is a *tag*, a 64-bit hash of the item's id and the
//! reader's name, never 0. The source starts a job's state at the XOR of the tags of its item for
//! every reader of its subject. A unit that finishes an input item sends the XOR of the input's tag
//! and the tags of each of its outputs for every reader of its own subject; a sink sends the input's
//! tag alone (it writes, nothing follows), so does a unit that filtered the item out; a unit that
//! dead-letters it fails the job. Every tag then appears exactly twice once all is done, so the
//! state is 0, whatever order the contributions arrive in: a contribution from far downstream can
//! arrive before the one that created its input and the state simply is not 0 yet.
//!
//! Ids are derived from the input's, so a unit that runs an input again after a crash makes the
//! same outputs with the same tags, and its contribution carries the same id, which the stream
//! takes once. The state is pure: `JobState` is what the source keeps per job.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The tag of `item` delivered to `reader`: a hash of both, never 0.
pub fn tag(item: &str, reader: &str) -> u64 {
    crate::unit::spread_hash(item.bytes().chain([0]).chain(reader.bytes())).max(1)
}

/// The tags of `item` for every reader of the subject it is stored on.
pub fn delivered(item: &str, readers: &[String]) -> u64 {
    readers.iter().fold(0, |x, reader| x ^ tag(item, reader))
}

/// What a unit says about one input item of a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Contribution {
    /// The job: the item's origin sequence at its source (`<key>/<attempt>`).
    pub job: String,
    /// The XOR this unit adds to the job's state, in hex.
    pub xor: String,
    /// Set when the unit dead-lettered the item: why. The job has failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Contribution {
    /// Unit `unit` finished input item `input` of `job` and stored `outputs` (their ids) on a
    /// subject that `readers` read; a sink or a unit that filtered the item out stores none.
    pub fn finished(
        job: &str,
        input: &str,
        unit: &str,
        outputs: &[String],
        readers: &[String],
    ) -> Contribution {
        let xor = outputs
            .iter()
            .fold(tag(input, unit), |x, output| x ^ delivered(output, readers));
        Contribution {
            job: job.to_string(),
            xor: format!("{xor:016x}"),
            error: None,
        }
    }

    /// Unit `unit` dead-lettered input item `input` of `job`.
    pub fn failed(job: &str, input: &str, unit: &str, error: &str) -> Contribution {
        Contribution {
            job: job.to_string(),
            xor: format!("{:016x}", tag(input, unit)),
            error: Some(error.to_string()),
        }
    }

    fn value(&self) -> Option<u64> {
        u64::from_str_radix(&self.xor, 16).ok()
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every item it became reached every sink it was routed to.
    Succeeded,
    /// An item was dead-lettered: the first error.
    Failed(String),
}

/// A job's state at its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobState {
    xor: u64,
    /// The contributions applied, by the stream sequence of the message that carried them: one
    /// delivered again is not applied twice (XOR would take it back).
    applied: BTreeSet<(u64, usize)>,
    failed: Option<String>,
}

impl JobState {
    /// A job whose item `item` was stored where `readers` read it.
    pub fn started(item: &str, readers: &[String]) -> JobState {
        JobState {
            xor: delivered(item, readers),
            applied: BTreeSet::new(),
            failed: None,
        }
    }

    /// Applies contribution number `index` of the message stored at `sequence`; how the job ended,
    /// once it has. A contribution that cannot be read fails the job: its state can no longer
    /// reach 0 by itself.
    pub fn apply(
        &mut self,
        sequence: u64,
        index: usize,
        contribution: &Contribution,
    ) -> Option<Ended> {
        if self.applied.insert((sequence, index)) {
            match contribution.value() {
                Some(value) => self.xor ^= value,
                None => {
                    self.failed.get_or_insert_with(|| {
                        format!(
                            "a unit's account of this job cannot be read: `{}`",
                            contribution.xor
                        )
                    });
                }
            }
            if let Some(error) = &contribution.error {
                self.failed.get_or_insert_with(|| error.clone());
            }
        }
        self.ended()
    }

    pub fn ended(&self) -> Option<Ended> {
        match &self.failed {
            Some(error) => Some(Ended::Failed(error.clone())),
            None if self.xor == 0 => Some(Ended::Succeeded),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_job_through_a_stage_and_two_sinks_ends_once_both_sinks_wrote_in_any_order() {
        // jobs → work (2 outputs) → [db, log]
        let readers_of_work = names(&["db", "log"]);
        let outputs = names(&["n/1/1/work", "n/1/1/work#1"]);
        let mut contributions = vec![Contribution::finished(
            "1/1",
            "n/1/1",
            "work",
            &outputs,
            &readers_of_work,
        )];
        for output in &outputs {
            for sink in &readers_of_work {
                contributions.push(Contribution::finished("1/1", output, sink, &[], &[]));
            }
        }
        // Every order ends it, and only the last contribution does.
        for first in 0..contributions.len() {
            let mut order = contributions.clone();
            order.rotate_left(first);
            let mut state = JobState::started("n/1/1", &names(&["work"]));
            for (i, c) in order.iter().enumerate() {
                let ended = state.apply(i as u64, 0, c);
                assert_eq!(
                    ended.is_some(),
                    i + 1 == order.len(),
                    "after {} of {}",
                    i + 1,
                    order.len()
                );
            }
            assert_eq!(state.ended(), Some(Ended::Succeeded));
        }
    }

    #[test]
    fn a_contribution_delivered_again_is_applied_once() {
        let mut state = JobState::started("n/2/1", &names(&["sink"]));
        let c = Contribution::finished("2/1", "n/2/1", "sink", &[], &[]);
        assert_eq!(state.apply(7, 0, &c), Some(Ended::Succeeded));
        assert_eq!(
            state.apply(7, 0, &c),
            Some(Ended::Succeeded),
            "not taken back"
        );
    }

    #[test]
    fn a_filtered_item_finishes_its_job_and_a_dead_letter_fails_it() {
        let mut filtered = JobState::started("n/3/1", &names(&["select"]));
        let c = Contribution::finished("3/1", "n/3/1", "select", &[], &names(&["sink"]));
        assert_eq!(filtered.apply(1, 0, &c), Some(Ended::Succeeded));

        let mut failed = JobState::started("n/4/1", &names(&["work", "audit"]));
        let dead = Contribution::failed("4/1", "n/4/1", "work", "4 is bad");
        assert_eq!(
            failed.apply(1, 0, &dead),
            Some(Ended::Failed("4 is bad".into()))
        );
    }

    #[test]
    fn a_missing_branch_keeps_the_job_open() {
        let mut state = JobState::started("n/5/1", &names(&["a", "b"]));
        let a = Contribution::finished("5/1", "n/5/1", "a", &[], &[]);
        assert_eq!(state.apply(1, 0, &a), None, "b has not finished it");
    }

    #[test]
    fn tags_differ_by_item_and_reader_and_are_never_zero() {
        assert_ne!(tag("x", "a"), tag("x", "b"));
        assert_ne!(tag("x", "a"), tag("y", "a"));
        assert_ne!(tag("xa", ""), tag("x", "a"));
        assert!((0..1000).all(|i| tag(&i.to_string(), "r") != 0));
    }
}
