//! Reading the dead letters: which a command is about, each as stored, counted by unit and
//! grouped by where and why they failed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use switchyard_crds::layout::{Layout, DEAD_LETTER_CONSUMER};
use switchyard_crds::unit::headers;

use crate::read::{self, header};
use crate::target::{OpsError, Target};

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
    /// The dead-letter subject it is stored on.
    #[serde(skip)]
    pub subject: String,
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
    pub(super) fn of(message: &jetstream::Message) -> DeadLetter {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let get = |name| header(message, name);
        // A letter stored again by a removal (see `Removal`) says when it was first stored, and
        // which id it had.
        let time_ms = get(headers::DEAD_SINCE)
            .parse()
            .unwrap_or_else(|_| read::stored_at_ms(message));
        let id = Some(get(headers::MSG_ID))
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| get(headers::LETTER_ID));
        DeadLetter {
            seq,
            subject: message.subject.to_string(),
            time: crate::text::when(time_ms),
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
            id,
            data: read::data(&message.payload),
            payload: message.payload.clone(),
            headers: message.headers.clone().unwrap_or_default(),
            replay_step: get(headers::REPLAY_STEP).parse().ok(),
        }
    }

    /// Whether `selection` takes it; `not_before_ms` is when its `since` began.
    pub(super) fn selected(&self, selection: &Selection, not_before_ms: Option<i64>) -> bool {
        let stage = selection.stage.as_deref();
        selection.unit.as_deref().is_none_or(|u| u == self.unit)
            && stage.is_none_or(|s| self.stage == s || self.stage.ends_with(&format!("> {s}")))
            && not_before_ms.is_none_or(|t| self.time_ms >= t)
    }
}

/// The dead-letter subjects of the Pipeline, as its layout holds them.
pub(super) fn subjects(target: &Target) -> Vec<String> {
    target
        .layout
        .nats
        .consumers
        .iter()
        .find(|c| c.durable == DEAD_LETTER_CONSUMER)
        .map(|c| c.filter_subjects.clone())
        .unwrap_or_default()
}

/// The dead letters a selection takes, oldest first, read one at a time: a queue of millions is
/// never held in memory.
pub struct Letters {
    stored: read::Stored,
    selection: Selection,
    /// When the selection's `since` began, in milliseconds since the Unix epoch.
    not_before_ms: Option<i64>,
    left: usize,
}

/// A dead letter as a reading passes it.
#[derive(Debug)]
pub(super) enum Seen {
    Selected(Box<DeadLetter>),
    /// One the selection leaves alone: where it is.
    Passed {
        subject: String,
        seq: u64,
    },
}

impl Letters {
    /// The next selected dead letter, or None at the end (or at the selection's limit).
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, OpsError> {
        loop {
            match self.next_seen().await? {
                None => return Ok(None),
                Some(Seen::Selected(letter)) => return Ok(Some(*letter)),
                Some(Seen::Passed { .. }) => {}
            }
        }
    }

    /// The next dead letter, selected or passed, or None at the end (or at the selection's limit).
    pub(super) async fn next_seen(&mut self) -> Result<Option<Seen>, OpsError> {
        if self.left == 0 {
            return Ok(None);
        }
        let Some(message) = self.stored.next().await? else {
            return Ok(None);
        };
        let letter = DeadLetter::of(&message);
        if !letter.selected(&self.selection, self.not_before_ms) {
            return Ok(Some(Seen::Passed {
                subject: letter.subject,
                seq: letter.seq,
            }));
        }
        self.left -= 1;
        Ok(Some(Seen::Selected(Box::new(letter))))
    }
}

/// The dead letters the selection takes, as they are stored now, to look at: a selection by time
/// starts reading there.
pub async fn letters(target: &Target, selection: &Selection) -> Result<Letters, OpsError> {
    open_letters(target, selection, Reading::FromSince).await
}

/// Where a reading of dead letters starts.
pub(super) enum Reading {
    /// At the selection's `since`: enough to look at them.
    FromSince,
    /// At the first letter, whatever the selection: a removal must know every letter below the ones
    /// it purges, to keep those that stay.
    FromFirst,
}

pub(super) async fn open_letters(
    target: &Target,
    selection: &Selection,
    reading: Reading,
) -> Result<Letters, OpsError> {
    let not_before = selection.since.map(|since| {
        SystemTime::now()
            .checked_sub(since)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    });
    // A letter stored again by a removal sits among later ones with an earlier time: reading from
    // a time on still takes the letters stored since, and `selected` compares their own times.
    let start = match (reading, not_before) {
        (Reading::FromSince, Some(from)) => DeliverPolicy::ByStartTime {
            start_time: from.into(),
        },
        _ => DeliverPolicy::All,
    };
    let stored = read::Stored::open(
        &target.js,
        &target.layout.nats.stream.name,
        &subjects(target),
        start,
    )
    .await?;
    Ok(Letters {
        stored,
        selection: selection.clone(),
        not_before_ms: not_before.map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        }),
        left: selection.limit.unwrap_or(usize::MAX),
    })
}

/// Pure: which unit each dead-letter subject belongs to, when each unit has one of its own (None: one
/// subject for all, `spec.deadLetter.subject`).
pub fn subject_units(layout: &Layout) -> Option<BTreeMap<String, String>> {
    let by_subject: BTreeMap<String, String> = layout
        .units
        .iter()
        .map(|u| (u.dead_letter_subject.clone(), u.unit.clone()))
        .collect();
    (by_subject.len() == layout.units.len()).then_some(by_subject)
}

/// How many dead letters each unit has. Each unit's letters on a subject of their own (the default)
/// are counted by the server; one subject for all is read through.
pub async fn count_by_unit(
    target: &Target,
    stream: &jetstream::stream::Stream,
) -> Result<BTreeMap<String, u64>, OpsError> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let Some(by_subject) = subject_units(&target.layout) else {
        let mut letters = letters(target, &Selection::default()).await?;
        while let Some(letter) = letters.next().await? {
            *counts.entry(letter.unit).or_default() += 1;
        }
        return Ok(counts);
    };
    let name = &target.layout.nats.stream.name;
    for filter in subjects(target) {
        let mut info = stream
            .info_with_subjects(&filter)
            .await
            .map_err(OpsError::nats(format!("count the dead letters of {name}")))?;
        while let Some(entry) = info.next().await {
            let (subject, count) =
                entry.map_err(OpsError::nats(format!("count the dead letters of {name}")))?;
            if let Some(unit) = by_subject.get(&subject) {
                *counts.entry(unit.clone()).or_default() += count as u64;
            }
        }
    }
    Ok(counts)
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

/// The counts `dlq list` shows, added up one letter at a time; errors are grouped by their kind.
#[derive(Debug, Default)]
pub struct Groups {
    counts: BTreeMap<(String, String, String), (u64, i64, i64)>,
    total: u64,
}

impl Groups {
    pub fn add(&mut self, d: &DeadLetter) {
        let entry = self
            .counts
            .entry((d.unit.clone(), d.stage.clone(), error_kind(&d.error)))
            .or_insert((0, i64::MAX, i64::MIN));
        entry.0 += 1;
        entry.1 = entry.1.min(d.time_ms);
        entry.2 = entry.2.max(d.time_ms);
        self.total += 1;
    }

    /// Letters added.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The groups, most first.
    pub fn sorted(&self) -> Vec<Group> {
        let mut out: Vec<Group> = self
            .counts
            .iter()
            .map(|((unit, stage, error), &(count, first, last))| Group {
                unit: unit.clone(),
                stage: stage.clone(),
                error: error.clone(),
                count,
                first: crate::text::when(first),
                last: crate::text::when(last),
            })
            .collect();
        out.sort_by_key(|g| std::cmp::Reverse(g.count));
        out
    }
}
