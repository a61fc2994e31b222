//! What a join keeps per item in its bucket, and what a part, a replay of the item's dead letter or
//! its timeout does to it. Pure: the stage runtime reads the bucket, asks `arrive` or `expire`, and
//! writes what they decide (with the revision it read, so that two replicas never overwrite each
//! other's parts: the loser reads again and decides again).
//!
//! An item's life: the first part starts a wait (`Waiting`, `since` now); more parts are added; the
//! last one completes it: the item is handed on and its entry replaced by a short-lived marker
//! (`Found::Finished`), so that a part delivered again afterwards is known as late. A branch's
//! failure, or the timeout under `deadLetter`, fails it (`Failed`): its dead letter is stored, and
//! parts that come later are kept with it, so that replaying the letter (a `Reopen`) waits again
//! with everything that arrived. Under `continue` the timeout closes it (`Closing`): it goes on
//! with what arrived.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::join::{OnTimeout, MISSING_KEY};

/// An item the join waits on, as its bucket keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub state: State,
    /// When the wait began (or began again, after a replay), in milliseconds since the Unix epoch.
    pub since_ms: u64,
    pub ancestry: Ancestry,
    /// Each branch's outputs, by branch name.
    #[serde(default)]
    pub parts: BTreeMap<String, Vec<Value>>,
    /// Branches that dead-lettered the item, and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "is")]
pub enum State {
    Waiting,
    /// The timeout passed under `continue`: it goes on with what arrived.
    Closing,
    /// A branch failed, or the timeout passed under `deadLetter`; `letter_stored` once its dead
    /// letter is (until then a replica that finds it stores the letter).
    #[serde(rename_all = "camelCase")]
    Failed {
        letter_stored: bool,
    },
    /// Handed on (`by` the branch whose part completed it, `_replay` or `_timeout`): kept a while,
    /// so that a part delivered again is known.
    Finished {
        by: String,
    },
}

impl State {
    /// Whether the join still has something to do for the item: wait for parts, or carry out a
    /// failure or a close a replica began. A failed item whose letter is stored waits for its replay,
    /// not for the join.
    pub fn open(&self) -> bool {
        !matches!(
            self,
            State::Finished { .. }
                | State::Failed {
                    letter_stored: true
                }
        )
    }
}

/// Who completes an item that is replayed, and who closes one at its timeout (branch names are
/// DNS labels: no `_`).
pub const BY_REPLAY: &str = "_replay";
pub const BY_TIMEOUT: &str = "_timeout";

/// Where the item comes from, as the joined item carries it on: the forked item's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Ancestry {
    pub origin: String,
    pub origin_seq: String,
    /// The units the item passed before it forked.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traced: Option<bool>,
    #[serde(default)]
    pub replays: u32,
}

/// What the bucket holds for an item.
// Read once per arrival and taken apart at once: boxing the entry would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    Nothing,
    /// A marker of an item that went on and nothing else (a deleted or purged key).
    Finished,
    Entry(Entry),
}

/// What reached the join for an item.
#[derive(Clone, Debug, PartialEq)]
pub enum Arrival {
    Part {
        branch: String,
        outputs: Vec<Value>,
    },
    Failure {
        branch: String,
        error: String,
    },
    /// The item's dead letter, replayed: wait again, with the parts it holds.
    Reopen {
        parts: BTreeMap<String, Vec<Value>>,
    },
}

/// What to do about an arrival (or a timeout).
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Store the entry: the item waits on (or, failed, keeps a late part for its replay).
    Write(Entry),
    /// Every branch has given its part: store the entry (finished) unless it is stored so, then
    /// hand on `joined(entry)`.
    Complete(Entry),
    /// Store the entry (failed, its letter not yet stored), then its dead letter, then note that.
    Fail(Entry),
    /// Store the entry (closing), hand on what arrived, then mark the item finished.
    Close(Entry),
    /// Nothing to store.
    Skip(Skipped),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// The branch's part is there already: the same part delivered again.
    Duplicate,
    /// The item went on already.
    Late,
}

/// What `arrival` does to the item, found in the bucket as `found`; `branches` are the join's, in
/// the order of `join.of`.
pub fn arrive(
    found: Found,
    arrival: Arrival,
    ancestry: &Ancestry,
    branches: &[String],
    now_ms: u64,
) -> Decision {
    let by = match &arrival {
        Arrival::Part { branch, .. } | Arrival::Failure { branch, .. } => branch.clone(),
        Arrival::Reopen { .. } => BY_REPLAY.to_string(),
    };
    let mut entry = match found {
        Found::Finished => return Decision::Skip(Skipped::Late),
        Found::Entry(entry) => match &entry.state {
            State::Closing => return Decision::Skip(Skipped::Late),
            // What completed it, delivered again: hand it on again (the stream drops it).
            State::Finished { by: done_by } if *done_by == by => return Decision::Complete(entry),
            State::Finished { .. } => return Decision::Skip(Skipped::Late),
            _ => entry,
        },
        Found::Nothing => Entry {
            state: State::Waiting,
            since_ms: now_ms,
            ancestry: ancestry.clone(),
            parts: BTreeMap::new(),
            failed: BTreeMap::new(),
        },
    };
    let failed_before = matches!(entry.state, State::Failed { .. });
    match arrival {
        Arrival::Part { branch, outputs } => {
            if entry.parts.contains_key(&branch) {
                return Decision::Skip(Skipped::Duplicate);
            }
            entry.parts.insert(branch, outputs);
        }
        Arrival::Failure { branch, error } => {
            if entry.parts.contains_key(&branch) || entry.failed.contains_key(&branch) {
                // Delivered again because its letter could not be stored: try that again.
                if entry.state
                    == (State::Failed {
                        letter_stored: false,
                    })
                {
                    return Decision::Fail(entry);
                }
                return Decision::Skip(Skipped::Duplicate);
            }
            entry.failed.insert(branch, error);
            if !failed_before {
                entry.state = State::Failed {
                    letter_stored: false,
                };
                return Decision::Fail(entry);
            }
        }
        Arrival::Reopen { parts } => {
            for (branch, outputs) in parts {
                if branches.contains(&branch) {
                    entry.parts.entry(branch).or_insert(outputs);
                }
            }
            if failed_before {
                entry.state = State::Waiting;
                entry.since_ms = now_ms;
                entry.failed.clear();
                entry.ancestry.replays = entry.ancestry.replays.max(ancestry.replays);
            }
        }
    }
    if entry.state == State::Waiting && missing(&entry, branches).is_empty() {
        entry.state = State::Finished { by };
        Decision::Complete(entry)
    } else {
        Decision::Write(entry)
    }
}

/// What a replica that finds `entry` in the bucket must do for it at `now_ms`, if anything: a wait
/// that timed out, one that misses no branch the join now waits for (an edit removed the one it
/// missed), or a failure or a close that a replica began and did not finish (it died).
pub fn expire(
    entry: Entry,
    branches: &[String],
    (on_timeout, timeout_ms): (OnTimeout, u64),
    now_ms: u64,
) -> Option<Decision> {
    match &entry.state {
        // The join's branches were edited: it waits for none of those still missing.
        State::Waiting if missing(&entry, branches).is_empty() => {
            let mut entry = entry;
            entry.state = State::Closing;
            Some(Decision::Close(entry))
        }
        State::Waiting if now_ms >= entry.since_ms.saturating_add(timeout_ms) => {
            let mut entry = entry;
            Some(match on_timeout {
                OnTimeout::DeadLetter => {
                    entry.state = State::Failed {
                        letter_stored: false,
                    };
                    Decision::Fail(entry)
                }
                OnTimeout::Continue => {
                    entry.state = State::Closing;
                    Decision::Close(entry)
                }
            })
        }
        State::Waiting
        | State::Failed {
            letter_stored: true,
        }
        | State::Finished { .. } => None,
        State::Failed {
            letter_stored: false,
        } => Some(Decision::Fail(entry)),
        State::Closing => Some(Decision::Close(entry)),
    }
}

/// The branches that have not given their part, in the join's order.
pub fn missing<'a>(entry: &Entry, branches: &'a [String]) -> Vec<&'a str> {
    branches
        .iter()
        .filter(|b| !entry.parts.contains_key(*b))
        .map(String::as_str)
        .collect()
}

/// The item the join hands on: each branch's outputs under its name, in the join's order, and
/// `_missing` listing those that did not arrive (only when it goes on without them).
pub fn joined(entry: &Entry, branches: &[String]) -> Value {
    let mut object = serde_json::Map::new();
    for branch in branches {
        if let Some(outputs) = entry.parts.get(branch) {
            object.insert(branch.clone(), Value::Array(outputs.clone()));
        }
    }
    let missing = missing(entry, branches);
    if !missing.is_empty() {
        object.insert(
            MISSING_KEY.to_string(),
            Value::Array(missing.into_iter().map(Value::from).collect()),
        );
    }
    Value::Object(object)
}

/// The parts a replayed dead letter of the join holds (`joined` of the failed item).
pub fn parts_of_letter(letter: &Value, branches: &[String]) -> BTreeMap<String, Vec<Value>> {
    let Some(object) = letter.as_object() else {
        return BTreeMap::new();
    };
    branches
        .iter()
        .filter_map(|b| match object.get(b) {
            Some(Value::Array(outputs)) => Some((b.clone(), outputs.clone())),
            _ => None,
        })
        .collect()
}

/// Why a failed item went to the dead letters, for the letter's error header.
pub fn failure_reason(entry: &Entry, join: &str, branches: &[String], timeout_ms: u64) -> String {
    let arrived: Vec<&str> = branches
        .iter()
        .filter(|b| entry.parts.contains_key(*b))
        .map(String::as_str)
        .collect();
    let arrived = if arrived.is_empty() {
        "none".to_string()
    } else {
        arrived.join(", ")
    };
    let missing = missing(entry, branches).join(", ");
    match entry.failed.iter().next() {
        Some((branch, error)) => format!(
            "join `{join}`: branch `{branch}` dead-lettered the item ({error}); arrived: {arrived}; missing: {missing}. Replay the branch's letter, then this one"
        ),
        None => format!(
            "join `{join}`: timed out after {} waiting for {missing}; arrived: {arrived}. Replaying this letter waits again, with what arrived since",
            crate::duration::human(std::time::Duration::from_millis(timeout_ms))
        ),
    }
}

#[cfg(test)]
mod tests;
