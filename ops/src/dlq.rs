//! The dead-letter queue: what failed, where, why and how often; replayed into the unit that failed
//! it, or purged.
//!
//! Dead letters are messages of the Pipeline's stream on its dead-letter subjects, held there by the
//! `_dead_letters` consumer, which nobody acknowledges. Listing reads them with a consumer of its own;
//! replaying and purging delete them by sequence, a replayed one only once its copy is stored.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use serde::Serialize;
use switchyard_crds::layout::{Layout, DEAD_LETTER_CONSUMER};
use switchyard_crds::unit::{headers, UnitRole};

use crate::read::{self, header};
use crate::{OpsError, Target};

/// Which dead letters a command is about.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Those of this unit only.
    pub unit: Option<String>,
    /// Those whose failed stage is (or ends with) this, such as `wash` or `machines > wash`.
    pub stage: Option<String>,
    /// Those stored within this long.
    pub since: Option<Duration>,
    /// At most this many, oldest first.
    pub limit: Option<usize>,
}

/// One dead letter, as stored.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Its place in the Pipeline's stream, which `replay` and `purge` remove it by.
    pub seq: u64,
    pub time: String,
    #[serde(skip)]
    pub time_ms: i64,
    pub unit: String,
    pub stage: String,
    pub error: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    pub origin: String,
    pub origin_seq: String,
    /// The units it passed, the failed one last.
    pub path: String,
    pub replays: u32,
    pub id: String,
    /// What failed: the input of the failed step.
    pub data: serde_json::Value,
    #[serde(skip)]
    pub payload: Bytes,
    #[serde(skip)]
    pub headers: HeaderMap,
    /// The step of its unit a replay starts at (None: a dead letter from before replays, which does
    /// not say).
    #[serde(skip)]
    pub replay_step: Option<usize>,
}

impl DeadLetter {
    fn of(message: &jetstream::Message) -> DeadLetter {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let time_ms = read::stored_at_ms(message);
        let get = |name| header(message, name);
        DeadLetter {
            seq,
            time: crate::when(time_ms),
            time_ms,
            unit: get(headers::FAILED_UNIT),
            stage: get(headers::FAILED_STAGE),
            error: get(headers::ERROR),
            attempts: get(headers::ATTEMPTS).parse().unwrap_or(0),
            deliveries: get(headers::DELIVERIES).parse().ok(),
            origin: get(headers::ORIGIN),
            origin_seq: get(headers::ORIGIN_SEQ),
            path: get(headers::PATH),
            replays: get(headers::REPLAYS).parse().unwrap_or(0),
            id: get(headers::MSG_ID),
            data: read::data(&message.payload),
            payload: message.payload.clone(),
            headers: message.headers.clone().unwrap_or_default(),
            replay_step: get(headers::REPLAY_STEP).parse().ok(),
        }
    }

    fn selected(&self, selection: &Selection) -> bool {
        let stage = selection.stage.as_deref();
        selection.unit.as_deref().is_none_or(|u| u == self.unit)
            && stage.is_none_or(|s| self.stage == s || self.stage.ends_with(&format!("> {s}")))
    }
}

/// The dead-letter subjects of the Pipeline, as its layout holds them.
fn subjects(target: &Target) -> Vec<String> {
    target
        .layout
        .nats
        .consumers
        .iter()
        .find(|c| c.durable == DEAD_LETTER_CONSUMER)
        .map(|c| c.filter_subjects.clone())
        .unwrap_or_default()
}

/// Every dead letter the selection takes, oldest first.
pub async fn read(target: &Target, selection: &Selection) -> Result<Vec<DeadLetter>, OpsError> {
    let start = match selection.since {
        None => DeliverPolicy::All,
        Some(since) => {
            let from = SystemTime::now()
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            DeliverPolicy::ByStartTime {
                start_time: from.into(),
            }
        }
    };
    let stored = read::stored(
        &target.js,
        &target.layout.nats.stream.name,
        &subjects(target),
        start,
        usize::MAX,
    )
    .await?;
    let limit = selection.limit.unwrap_or(usize::MAX);
    Ok(stored
        .iter()
        .map(DeadLetter::of)
        .filter(|d| d.selected(selection))
        .take(limit)
        .collect())
}

/// Dead letters counted by unit, stage and error.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    pub unit: String,
    pub stage: String,
    pub error: String,
    pub count: u64,
    pub first: String,
    pub last: String,
}

/// An error with its numbers taken out (`card declined for order #`): errors that differ only in an
/// id, a count or a time are one kind of failure.
pub fn error_kind(error: &str) -> String {
    let mut out = String::with_capacity(error.len());
    let mut in_number = false;
    for c in error.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// Pure: the counts `dlq list` shows, most first; errors are grouped by their kind.
pub fn group(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String, String), (u64, i64, i64)> = BTreeMap::new();
    for d in letters {
        let entry = groups
            .entry((d.unit.clone(), d.stage.clone(), error_kind(&d.error)))
            .or_insert((0, i64::MAX, i64::MIN));
        entry.0 += 1;
        entry.1 = entry.1.min(d.time_ms);
        entry.2 = entry.2.max(d.time_ms);
    }
    let mut out: Vec<Group> = groups
        .into_iter()
        .map(|((unit, stage, error), (count, first, last))| Group {
            unit,
            stage,
            error,
            count,
            first: crate::when(first),
            last: crate::when(last),
        })
        .collect();
    out.sort_by_key(|g| std::cmp::Reverse(g.count));
    out
}

/// What a replay did.
#[derive(Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    /// Put back into their units' inputs and removed from the queue.
    pub replayed: u64,
    /// Per unit.
    pub by_unit: BTreeMap<String, u64>,
    /// Left in the queue, each with why.
    pub kept: Vec<(u64, String)>,
}

/// Replays in flight at once: their stores are awaited in windows of this many.
const REPLAY_WINDOW: usize = 256;

/// Where a replay of `letter` goes: the input subject of the unit that failed it, and the headers that
/// make that unit (and only it) take it up again at the failed step.
pub fn replay_message(layout: &Layout, letter: &DeadLetter) -> Result<(String, HeaderMap), String> {
    let consumer = layout
        .nats
        .consumers
        .iter()
        .find(|c| c.durable == letter.unit && letter.unit != DEAD_LETTER_CONSUMER)
        .ok_or_else(|| {
            format!(
                "unit `{}` is not in the Pipeline any more: nothing would take the replay",
                letter.unit
            )
        })?;
    let subject = consumer
        .filter_subjects
        .first()
        .cloned()
        .ok_or_else(|| format!("unit `{}` reads nothing", letter.unit))?;
    let steps = layout
        .units
        .iter()
        .find(|u| u.unit == letter.unit)
        .map_or(0, |u| match &u.role {
            UnitRole::Process { steps, .. } => steps.len(),
            _ => 0,
        });
    // A letter from before replays does not say which step's input it holds: in a unit of one step (or
    // a sink) that can only be the first; in a longer one, replaying from the first step would run
    // earlier steps again on an item that already passed them.
    let step = match letter.replay_step {
        Some(step) => step,
        None if steps <= 1 => 0,
        None => {
            return Err(format!(
                "the dead letter predates replays and does not say at which of the {steps} steps of `{}` it failed; `dlq show --json` has its data, to publish by hand",
                letter.unit
            ))
        }
    };
    let mut map = HeaderMap::new();
    for name in [
        headers::ORIGIN,
        headers::ORIGIN_SEQ,
        headers::TRACEPARENT,
        headers::TRACESTATE,
    ] {
        if let Some(value) = letter.headers.get(name) {
            map.insert(name, value.clone());
        }
    }
    // The path as it was when the unit took the item; the unit adds itself again.
    let path = letter
        .path
        .strip_suffix(&format!(",{}", letter.unit))
        .unwrap_or(&letter.path);
    map.insert(headers::PATH, path);
    let replays = letter.replays + 1;
    map.insert(headers::REPLAYS, replays.to_string().as_str());
    map.insert(headers::REPLAY_FOR, letter.unit.as_str());
    map.insert(headers::REPLAY_STEP, step.to_string().as_str());
    // A fresh id for each replay of each dead letter: the outputs' ids derive from it, so they cannot
    // be mistaken for those of the first try (or of an earlier replay), and a replay repeated after a
    // crash is dropped by the stream as the duplicate it is.
    let id = if letter.id.is_empty() {
        format!("{}:{}", layout.nats.stream.name, letter.seq)
    } else {
        letter.id.clone()
    };
    map.insert(headers::MSG_ID, format!("{id}~{replays}").as_str());
    Ok((subject, map))
}

/// Puts every letter back into the input of the unit that failed it, and removes each from the queue
/// once its copy is stored. A letter that cannot be replayed stays, with the reason.
pub async fn replay(target: &Target, letters: &[DeadLetter]) -> Result<Replayed, OpsError> {
    let stream = target
        .js
        .get_stream(&target.layout.nats.stream.name)
        .await
        .map_err(OpsError::nats("open the Pipeline's stream"))?;
    let mut report = Replayed::default();
    for window in letters.chunks(REPLAY_WINDOW) {
        let mut pending = Vec::new();
        for letter in window {
            match replay_message(&target.layout, letter) {
                Ok((subject, map)) => {
                    let publish = jetstream::message::PublishMessage::build()
                        .headers(map)
                        .payload(letter.payload.clone());
                    match target.js.send_publish(subject, publish).await {
                        Ok(ack) => pending.push((letter, ack)),
                        Err(e) => report.kept.push((letter.seq, e.to_string())),
                    }
                }
                Err(why) => report.kept.push((letter.seq, why)),
            }
        }
        for (letter, ack) in pending {
            if let Err(e) = ack.await {
                report
                    .kept
                    .push((letter.seq, format!("not stored again: {e}")));
                continue;
            }
            match stream.delete_message(letter.seq).await {
                Ok(_) => {
                    report.replayed += 1;
                    *report.by_unit.entry(letter.unit.clone()).or_default() += 1;
                }
                Err(e) => report.kept.push((
                    letter.seq,
                    format!("replayed, but not removed from the queue ({e}): a second replay would be dropped as a duplicate for 2 minutes"),
                )),
            }
        }
    }
    Ok(report)
}

/// Removes the letters from the queue for good; returns how many went.
pub async fn purge(target: &Target, letters: &[DeadLetter]) -> Result<u64, OpsError> {
    let stream = target
        .js
        .get_stream(&target.layout.nats.stream.name)
        .await
        .map_err(OpsError::nats("open the Pipeline's stream"))?;
    let mut purged = 0;
    for letter in letters {
        match stream.delete_message(letter.seq).await {
            Ok(_) => purged += 1,
            Err(e) => tracing::warn!("cannot remove dead letter {}: {e}", letter.seq),
        }
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(unit: &str, stage: &str, error: &str, ms: i64) -> DeadLetter {
        DeadLetter {
            seq: 1,
            time: crate::when(ms),
            time_ms: ms,
            unit: unit.into(),
            stage: stage.into(),
            error: error.into(),
            attempts: 1,
            deliveries: None,
            origin: "src".into(),
            origin_seq: "1".into(),
            path: format!("src,{unit}"),
            replays: 0,
            id: format!("src:1/{unit}!0.0"),
            data: serde_json::json!(1),
            payload: Bytes::from_static(b"1"),
            headers: HeaderMap::new(),
            replay_step: Some(0),
        }
    }

    #[test]
    fn groups_count_by_unit_stage_and_error_most_first() {
        let letters = vec![
            letter("wash", "machines > wash", "too hot", 1_000),
            letter("dry", "dry", "wet", 2_000),
            letter("wash", "machines > wash", "too hot", 3_000),
            letter("dry", "dry", "wet after 3 tries", 4_000),
            letter("dry", "dry", "wet after 12 tries", 5_000),
        ];
        let groups = group(&letters);
        assert_eq!(groups.len(), 3);
        let wash = groups.iter().find(|g| g.unit == "wash").unwrap();
        assert_eq!(wash.count, 2);
        assert_eq!(wash.first, "1970-01-01T00:00:01.000Z");
        assert_eq!(wash.last, "1970-01-01T00:00:03.000Z");
        let tries = groups
            .iter()
            .find(|g| g.error == "wet after # tries")
            .unwrap();
        assert_eq!(tries.count, 2);
        assert_eq!(error_kind("order 12 at 10:30"), "order # at #:#");
    }

    fn laundry_layout() -> Layout {
        let text = r#"
apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: p}
spec:
  sources: [{name: src, generator: {count: 3}}]
  stages:
    - name: machines
      stages:
        - {name: wash, jq: '.'}
        - {name: dry, jq: '.'}
  sinks: [{name: out, log: {}}]
"#;
        let pipeline: switchyard_crds::Pipeline = serde_norway::from_str(text).unwrap();
        let topology = switchyard_crds::validate::analyze(&pipeline).unwrap();
        switchyard_crds::layout::layout(&topology, &pipeline.spec).unwrap()
    }

    #[test]
    fn a_replay_goes_to_the_failed_unit_only_at_its_step_with_a_fresh_id() {
        let layout = laundry_layout();
        let mut d = letter("machines", "machines > dry", "wet", 0);
        d.replay_step = Some(1);
        d.replays = 1;
        d.headers.insert(headers::ORIGIN, "src");
        d.headers.insert(headers::ORIGIN_SEQ, "1");
        let (subject, map) = replay_message(&layout, &d).unwrap();
        assert_eq!(subject, "switchyard.default.p.data.src");
        let get = |name| map.get(name).unwrap().as_str().to_string();
        assert_eq!(get(headers::REPLAY_FOR), "machines");
        assert_eq!(get(headers::REPLAY_STEP), "1");
        assert_eq!(get(headers::REPLAYS), "2");
        assert_eq!(get(headers::MSG_ID), "src:1/machines!0.0~2");
        assert_eq!(get(headers::PATH), "src");
        assert_eq!(get(headers::ORIGIN), "src");
        let mut old = d.clone();
        old.replay_step = None;
        assert!(replay_message(&layout, &old)
            .unwrap_err()
            .contains("predates replays"));
        let gone = letter("shrunk", "shrunk", "x", 0);
        assert!(replay_message(&layout, &gone)
            .unwrap_err()
            .contains("not in the Pipeline"));
    }

    #[test]
    fn a_selection_matches_a_stage_by_its_last_part_or_whole() {
        let d = letter("machines", "machines > wash", "x", 0);
        let by = |unit: Option<&str>, stage: Option<&str>| {
            d.selected(&Selection {
                unit: unit.map(str::to_string),
                stage: stage.map(str::to_string),
                ..Selection::default()
            })
        };
        assert!(by(None, None));
        assert!(by(Some("machines"), Some("wash")));
        assert!(by(None, Some("machines > wash")));
        assert!(!by(None, Some("ash")));
        assert!(!by(Some("dry"), None));
    }
}
