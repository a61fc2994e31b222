//! Replaying dead letters into the unit that failed them, at the step it failed, under a fresh
//! id, and purging them.

use std::collections::BTreeMap;

use async_nats::header::HeaderMap;
use async_nats::jetstream;
use serde::Serialize;
use switchyard_crds::layout::{Layout, DEAD_LETTER_CONSUMER};
use switchyard_crds::unit::{headers, UnitRole};

use crate::target::{OpsError, Target};

use super::read::{open_letters, DeadLetter, Reading, Seen, Selection};
use super::removal::{carry_out, Carried, Removal, Remove};

/// What a replay did.
#[derive(Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    /// Put back into their units' inputs and removed from the queue.
    pub replayed: u64,
    /// Per unit.
    pub by_unit: BTreeMap<String, u64>,
    /// Left in the queue, by why.
    pub kept: Vec<Kept>,
}

/// Dead letters a replay left in the queue for one reason.
#[derive(Debug, Serialize, PartialEq)]
pub struct Kept {
    pub why: String,
    pub count: u64,
    /// The first few, by sequence.
    pub seqs: Vec<u64>,
}

/// Sequences a `Kept` names; the rest are counted.
pub const KEPT_NAMED: usize = 5;

impl Replayed {
    pub(super) fn keep(&mut self, seq: u64, why: String) {
        let kept = match self.kept.iter_mut().position(|k| k.why == why) {
            Some(at) => &mut self.kept[at],
            None => {
                self.kept.push(Kept {
                    why,
                    count: 0,
                    seqs: Vec::new(),
                });
                let last = self.kept.len() - 1;
                &mut self.kept[last]
            }
        };
        kept.count += 1;
        if kept.seqs.len() < KEPT_NAMED {
            kept.seqs.push(seq);
        }
    }

    /// Letters kept that were stored again (see `Removal`) are named where they are now.
    /// What one round of removals did: the letters gone are replayed (counted by their `units`),
    /// those that could not be removed stay, with why.
    fn count(&mut self, carried: Carried, units: &BTreeMap<u64, &str>) {
        let Carried {
            gone,
            failed,
            moved,
        } = carried;
        self.moved(&moved);
        for seq in gone {
            self.replayed += 1;
            if let Some(unit) = units.get(&seq) {
                *self.by_unit.entry(unit.to_string()).or_default() += 1;
            }
        }
        for (seqs, e) in failed {
            for seq in seqs {
                self.keep(
                    seq,
                    format!("replayed, but not removed from the queue ({e}): a second replay would be dropped as a duplicate for 2 minutes"),
                );
            }
        }
    }

    pub(super) fn moved(&mut self, moved: &BTreeMap<u64, u64>) {
        for kept in &mut self.kept {
            for seq in &mut kept.seqs {
                if let Some(now) = moved.get(seq) {
                    *seq = *now;
                }
            }
        }
    }

    /// Letters left in the queue.
    pub fn kept_count(&self) -> u64 {
        self.kept.iter().map(|k| k.count).sum()
    }
}

/// Replays in flight at once: their stores are awaited in windows of this many.
pub(super) const REPLAY_WINDOW: usize = 256;

/// Why a dead letter cannot be replayed, whatever NATS does: it stays in the queue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayRefused {
    #[error("unit `{unit}` is not in the Pipeline any more: nothing would take the replay")]
    UnitGone { unit: String },
    #[error("unit `{unit}` reads nothing")]
    ReadsNothing { unit: String },
    #[error("the dead letter predates replays and does not say at which of the {steps} steps of `{unit}` it failed; `dlq show --json` has its data, to publish by hand")]
    PredatesReplays { unit: String, steps: usize },
}

/// Why one selected dead letter stayed in the queue.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotReplayed {
    #[error(transparent)]
    Refused(#[from] ReplayRefused),
    #[error("not stored again: {0}")]
    NotStored(#[from] jetstream::context::PublishError),
}

/// Where a replay of `letter` goes: the input subject of the unit that failed it, and the headers that
/// make that unit (and only it) take it up again at the failed step.
pub fn replay_message(
    layout: &Layout,
    letter: &DeadLetter,
) -> Result<(String, HeaderMap), ReplayRefused> {
    let consumer = layout
        .nats
        .consumers
        .iter()
        .find(|c| c.durable == letter.unit && letter.unit != DEAD_LETTER_CONSUMER)
        .ok_or_else(|| ReplayRefused::UnitGone {
            unit: letter.unit.clone(),
        })?;
    let subject =
        consumer
            .filter_subjects
            .first()
            .cloned()
            .ok_or_else(|| ReplayRefused::ReadsNothing {
                unit: letter.unit.clone(),
            })?;
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
            return Err(ReplayRefused::PredatesReplays {
                unit: letter.unit.clone(),
                steps,
            })
        }
    };
    let mut map = HeaderMap::new();
    // The source's decision to trace the item too: a replay is traced if the item was.
    for name in [
        headers::ORIGIN,
        headers::ORIGIN_SEQ,
        headers::TRACEPARENT,
        headers::TRACESTATE,
        headers::TRACED,
        // A branch's or a join's letter: the item that forked, which the join keys its parts by.
        headers::FORK,
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

/// Puts every letter the selection takes back into the input of the unit that failed it, and removes
/// each from the queue once its copy is stored. A letter that cannot be replayed stays, with the
/// reason.
pub async fn replay(target: &Target, selection: &Selection) -> Result<Replayed, OpsError> {
    let mut letters = open_letters(target, selection, Reading::FromFirst).await?;
    let stream = target.stream().await?;
    let mut report = Replayed::default();
    let mut removal = Removal::default();
    let mut window: Vec<Seen> = Vec::with_capacity(REPLAY_WINDOW);
    loop {
        window.clear();
        while window.len() < REPLAY_WINDOW {
            match letters.next_seen().await? {
                Some(seen) => window.push(seen),
                None => break,
            }
        }
        if window.is_empty() {
            let Carried { moved, failed, .. } = carry_out(target, &stream, removal.finish()).await;
            report.moved(&moved);
            for (_, e) in failed {
                // Nothing is lost: the letters are where they were, only not after the others.
                tracing::warn!(
                    "dead letters that stay could not follow the others stored again: {e}"
                );
            }
            return Ok(report);
        }
        let acks = publish_window(target, &window).await;
        let units = settle_window(&window, acks, &mut removal, &mut report).await;
        let carried = carry_out(target, &stream, removal.take()).await;
        report.count(carried, &units);
    }
}

/// Puts each selected letter of the window back on its unit's input: the acknowledgement to wait
/// for, or why it was not sent; None for a letter that was not selected.
async fn publish_window(
    target: &Target,
    window: &[Seen],
) -> Vec<Option<Result<jetstream::context::PublishAckFuture, NotReplayed>>> {
    let mut acks = Vec::with_capacity(window.len());
    for seen in window {
        let Seen::Selected(letter) = seen else {
            acks.push(None);
            continue;
        };
        let ack = match replay_message(&target.layout, letter) {
            Ok((subject, map)) => {
                let publish = jetstream::message::PublishMessage::build()
                    .headers(map)
                    .payload(letter.payload.clone());
                target
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(NotReplayed::NotStored)
            }
            Err(why) => Err(NotReplayed::Refused(why)),
        };
        acks.push(Some(ack));
    }
    acks
}

/// Waits for the window's copies and tells `removal` what goes and what stays, in stream order,
/// so that a letter that stays is never purged with those before it. The unit of each letter
/// that goes, by its place in the stream.
async fn settle_window<'a>(
    window: &'a [Seen],
    acks: Vec<Option<Result<jetstream::context::PublishAckFuture, NotReplayed>>>,
    removal: &mut Removal,
    report: &mut Replayed,
) -> BTreeMap<u64, &'a str> {
    let mut units: BTreeMap<u64, &str> = BTreeMap::new();
    for (seen, ack) in window.iter().zip(acks) {
        let letter = match seen {
            Seen::Passed { subject, seq } => {
                removal.keep(subject, *seq);
                continue;
            }
            Seen::Selected(letter) => letter,
        };
        let stored = match ack {
            Some(Ok(ack)) => ack.await.map(|_| ()).map_err(NotReplayed::NotStored),
            Some(Err(why)) => Err(why),
            None => continue,
        };
        match stored {
            Ok(()) => {
                removal.remove(&letter.subject, letter.seq);
                units.insert(letter.seq, &letter.unit);
            }
            Err(why) => {
                removal.keep(&letter.subject, letter.seq);
                report.keep(letter.seq, why.to_string());
            }
        }
    }
    units
}

/// What a purge of the selected dead letters would remove. Only where they are is kept (for a
/// subject whose every letter goes, not even that): what is asked about is what goes, however many.
pub struct ToPurge {
    pub count: u64,
    removals: Vec<Remove>,
}

/// Reads the selection through: every letter it takes goes, every other stays.
pub async fn to_purge(target: &Target, selection: &Selection) -> Result<ToPurge, OpsError> {
    let mut letters = open_letters(target, selection, Reading::FromFirst).await?;
    let mut removal = Removal::default();
    let mut count = 0;
    while let Some(seen) = letters.next_seen().await? {
        match seen {
            Seen::Selected(letter) => {
                removal.remove(&letter.subject, letter.seq);
                count += 1;
            }
            Seen::Passed { subject, seq } => removal.keep(&subject, seq),
        }
    }
    Ok(ToPurge {
        count,
        removals: removal.take(),
    })
}

/// Removes dead letters for good; returns how many went.
pub async fn purge(target: &Target, to_purge: ToPurge) -> Result<u64, OpsError> {
    let stream = target.stream().await?;
    let Carried { gone, failed, .. } = carry_out(target, &stream, to_purge.removals).await;
    for (seqs, e) in failed {
        tracing::warn!("cannot remove {} dead letter(s): {e}", seqs.len());
    }
    Ok(gone.len() as u64)
}
