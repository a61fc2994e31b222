//! A join stage (issue 26): what a user writes, and what its unit and its branches are told.
//!
//! An item forks when several top-level stages (the branches) read the subject it is stored on;
//! each branch runs it in its own unit and hands the join one *part*: every output it made of that
//! item, in order (none when it filtered the item out), or its failure. The join keeps the parts
//! of each item in the Pipeline's join bucket, keyed by the forked item's id, and once every branch
//! has given one hands on a single item holding them all by branch name. What it keeps per item
//! and how a part, a replay or a timeout changes it is `join_state`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Waits, per item, for every branch it names, then hands on one item holding all their outputs:
/// `{"<branch>": [outputs…], …}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Join {
    /// The branches: top-level stages that read the same inputs, so that each item forks to all of
    /// them. Only the join reads them.
    #[schemars(length(min = 2, max = 16))]
    pub of: Vec<String>,
    /// How long an item waits for its branches after the first one gave its part (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// What an item whose timeout passed does: `deadLetter` (default; `switchyard dlq replay` makes
    /// it wait again, with what arrived since) or `continue` (on with what arrived, the branches
    /// that did not listed under `_missing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// Items one replica keeps waiting at once (default 10000); parts that would start another wait
    /// in the stream until one is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_waiting: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum OnTimeout {
    #[default]
    DeadLetter,
    Continue,
}

/// How long an item waits for its branches when `join.timeout` does not say.
pub const DEFAULT_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Items a join replica keeps waiting when `join.maxWaiting` does not say.
pub const DEFAULT_MAX_WAITING: u32 = 10_000;
/// The key of the branches that did not arrive, in an item that went on without them. Stage names
/// are DNS labels: no `_`, so no branch can be named so.
pub const MISSING_KEY: &str = "_missing";

impl Join {
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .as_deref()
            .and_then(|t| crate::duration::parse_duration(t).ok())
            .unwrap_or(DEFAULT_JOIN_TIMEOUT)
    }
}

/// What a join unit is told: where the parts wait, which unit gives which branch's part, and how
/// long an item waits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinConfig {
    /// The Pipeline's join bucket; this join's keys start with `<unit>.`.
    pub bucket: String,
    pub branches: Vec<JoinBranch>,
    pub timeout_ms: u64,
    pub on_timeout: OnTimeout,
    pub max_waiting: u32,
    /// How long a finished item's marker stays, so that a part delivered again after the item went
    /// on is known as late rather than the start of a new wait.
    pub finished_kept_ms: u64,
}

/// One branch of a join: the stage's name (the key of its outputs) and the unit that gives its part.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinBranch {
    pub name: String,
    pub unit: String,
}

/// What a branch unit is told: it hands each item's outputs to a join as one part.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BranchConfig {
    /// The branch's name, as the join's item holds its outputs.
    pub name: String,
    /// The join unit.
    pub join: String,
}

/// The part a branch hands the join for one item, as stored on the branch's output subject.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Part {
    pub branch: String,
    /// Every output the branch made of the item, in order, as JSON (a non-JSON output as a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<serde_json::Value>>,
    /// Set when the branch dead-lettered the item: why. The join fails the item at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The key of an item in the join bucket: the join's unit, then the forked item's id in hex (ids
/// hold characters a key may not).
pub fn bucket_key(unit: &str, item: &str) -> String {
    let mut key = String::with_capacity(unit.len() + 1 + item.len() * 2);
    key.push_str(unit);
    key.push('.');
    for byte in item.bytes() {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The forked item's id a key stands for, if it is one of `unit`'s.
pub fn item_of_key(unit: &str, key: &str) -> Option<String> {
    let hex = key.strip_prefix(unit)?.strip_prefix('.')?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_any_id_and_read_back() {
        let id = "orders:17/split.2~1";
        let key = bucket_key("answer", id);
        assert!(key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
        assert_eq!(item_of_key("answer", &key).as_deref(), Some(id));
        assert_eq!(item_of_key("other", &key), None);
        assert_eq!(item_of_key("answer", "answer.4"), None);
    }

    #[test]
    fn a_part_reads_back_as_written() {
        let part = Part {
            branch: "price".into(),
            outputs: Some(vec![serde_json::json!({"p": 3}), serde_json::json!("text")]),
            failed: None,
        };
        let json = serde_json::to_string(&part).unwrap();
        assert_eq!(json, r#"{"branch":"price","outputs":[{"p":3},"text"]}"#);
        assert_eq!(serde_json::from_str::<Part>(&json).unwrap(), part);
    }
}
