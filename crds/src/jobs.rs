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
//! same outputs with the same tags. Each contribution names the delivery it settles (the input's
//! tag at the unit), and a job applies a delivery's contribution once: a unit that ran a frame
//! again, whole or item by item, after the stream's duplicate window, adds nothing twice (XOR would
//! take it back). A unit stores the contributions of one input message together, as one account
//! (`account_messages`): one stored message per frame rather than one per item, which is most of
//! what following jobs costs the NATS server. The state is pure: `JobState` is what the source
//! keeps per job.

use std::collections::HashSet;

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
    /// The delivery it settles: the input item's tag at this unit, in hex. A job applies it once.
    pub settles: String,
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
        let settles = tag(input, unit);
        let xor = outputs
            .iter()
            .fold(settles, |x, output| x ^ delivered(output, readers));
        Contribution {
            job: job.to_string(),
            xor: format!("{xor:016x}"),
            settles: format!("{settles:016x}"),
            error: None,
        }
    }

    /// Unit `unit` dead-lettered input item `input` of `job`.
    pub fn failed(job: &str, input: &str, unit: &str, error: &str) -> Contribution {
        let settles = format!("{:016x}", tag(input, unit));
        Contribution {
            job: job.to_string(),
            xor: settles.clone(),
            settles,
            error: Some(error.to_string()),
        }
    }

    fn value(&self) -> Option<u64> {
        u64::from_str_radix(&self.xor, 16).ok()
    }

    fn delivery(&self) -> Option<u64> {
        u64::from_str_radix(&self.settles, 16).ok()
    }
}

/// The contributions of one input message, as the payloads of the messages that store them: a JSON
/// array each, every one within `most_bytes` unless a single contribution is larger (it then goes
/// alone; the server refuses it, and the job is settled by its lease instead). The cut depends only
/// on the contributions, so an input run again makes the same messages.
pub fn account_messages(contributions: &[Contribution], most_bytes: usize) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    for contribution in contributions {
        let Ok(json) = serde_json::to_vec(contribution) else {
            continue;
        };
        // `[` before the first, `,` before the others, `]` at the end.
        if !current.is_empty() && current.len() + json.len() + 2 > most_bytes {
            current.push(b']');
            messages.push(std::mem::take(&mut current));
        }
        current.push(if current.is_empty() { b'[' } else { b',' });
        current.extend_from_slice(&json);
    }
    if !current.is_empty() {
        current.push(b']');
        messages.push(current);
    }
    messages
}

/// Reads what `account_messages` stored: None when it is no account at all.
pub fn read_account(payload: &[u8]) -> Option<Vec<Contribution>> {
    serde_json::from_slice(payload).ok()
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
    /// The deliveries settled: a contribution stored again (the unit ran its input again) is not
    /// applied twice, XOR would take it back.
    settled: HashSet<u64>,
    failed: Option<String>,
}

impl JobState {
    /// A job whose item `item` was stored where `readers` read it.
    pub fn started(item: &str, readers: &[String]) -> JobState {
        JobState {
            xor: delivered(item, readers),
            settled: HashSet::new(),
            failed: None,
        }
    }

    /// Applies a contribution, unless its delivery is settled already; how the job ended, once it
    /// has. A contribution that cannot be read fails the job: its state can no longer reach 0 by
    /// itself.
    pub fn apply(&mut self, contribution: &Contribution) -> Option<Ended> {
        let delivery = contribution.delivery();
        if delivery.is_none_or(|delivery| self.settled.insert(delivery)) {
            match contribution.value().filter(|_| delivery.is_some()) {
                Some(value) => self.xor ^= value,
                None => {
                    self.failed.get_or_insert_with(|| {
                        format!(
                            "a unit's account of this job cannot be read: xor `{}`, settles `{}`",
                            contribution.xor, contribution.settles
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
                let ended = state.apply(c);
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
        assert_eq!(state.apply(&c), Some(Ended::Succeeded));
        assert_eq!(state.apply(&c), Some(Ended::Succeeded), "not taken back");
    }

    #[test]
    fn a_filtered_item_finishes_its_job_and_a_dead_letter_fails_it() {
        let mut filtered = JobState::started("n/3/1", &names(&["select"]));
        let c = Contribution::finished("3/1", "n/3/1", "select", &[], &names(&["sink"]));
        assert_eq!(filtered.apply(&c), Some(Ended::Succeeded));

        let mut failed = JobState::started("n/4/1", &names(&["work", "audit"]));
        let dead = Contribution::failed("4/1", "n/4/1", "work", "4 is bad");
        assert_eq!(failed.apply(&dead), Some(Ended::Failed("4 is bad".into())));
    }

    #[test]
    fn a_missing_branch_keeps_the_job_open() {
        let mut state = JobState::started("n/5/1", &names(&["a", "b"]));
        let a = Contribution::finished("5/1", "n/5/1", "a", &[], &[]);
        assert_eq!(state.apply(&a), None, "b has not finished it");
    }

    #[test]
    fn a_unit_that_ran_its_input_again_settles_each_delivery_once() {
        // work → sink; work ran the item, stored its account, died before the ack, and ran it
        // again after the duplicate window: a second account of the same delivery, in another
        // message, that XOR would otherwise cancel.
        let mut state = JobState::started("n/6/1", &names(&["work"]));
        let outputs = names(&["n/6/1/work"]);
        let work = Contribution::finished("6/1", "n/6/1", "work", &outputs, &names(&["sink"]));
        assert_eq!(state.apply(&work), None);
        assert_eq!(state.apply(&work.clone()), None, "the same delivery again");
        let sink = Contribution::finished("6/1", "n/6/1/work", "sink", &[], &[]);
        assert_eq!(state.apply(&sink), Some(Ended::Succeeded));
    }

    #[test]
    fn an_account_that_names_no_delivery_fails_its_job() {
        let mut state = JobState::started("n/7/1", &names(&["sink"]));
        let mut c = Contribution::finished("7/1", "n/7/1", "sink", &[], &[]);
        c.settles = "not hex".into();
        assert!(matches!(state.apply(&c), Some(Ended::Failed(e)) if e.contains("not hex")));
    }

    #[test]
    fn an_inputs_contributions_are_stored_in_as_few_messages_as_fit_and_read_back_alike() {
        let contributions: Vec<Contribution> = (0..500)
            .map(|i| {
                Contribution::finished(
                    &format!("{i}/1"),
                    &format!("n/{i}/1"),
                    "work",
                    &[format!("n/{i}/1/work")],
                    &names(&["sink"]),
                )
            })
            .collect();
        let one = account_messages(&contributions, 1 << 20);
        assert_eq!(one.len(), 1);
        assert_eq!(read_account(&one[0]).as_deref(), Some(&contributions[..]));

        let cut = account_messages(&contributions, 4096);
        assert!(cut.len() > 1);
        assert!(cut.iter().all(|m| m.len() <= 4096));
        let read: Vec<Contribution> = cut.iter().flat_map(|m| read_account(m).unwrap()).collect();
        assert_eq!(read, contributions);
        assert_eq!(
            cut,
            account_messages(&contributions, 4096),
            "cut alike again"
        );

        // One larger than the limit still goes, alone.
        let mut big = Contribution::failed("9/1", "n/9/1", "work", &"x".repeat(5000));
        big.job = "9/1".into();
        let alone = account_messages(&[contributions[0].clone(), big.clone()], 4096);
        assert_eq!(alone.len(), 2);
        assert_eq!(read_account(&alone[1]), Some(vec![big]));
        assert_eq!(read_account(b"{}"), None);
    }

    #[test]
    fn tags_differ_by_item_and_reader_and_are_never_zero() {
        assert_ne!(tag("x", "a"), tag("x", "b"));
        assert_ne!(tag("x", "a"), tag("y", "a"));
        assert_ne!(tag("xa", ""), tag("x", "a"));
        assert!((0..1000).all(|i| tag(&i.to_string(), "r") != 0));
    }
}
