//! The dead-letter queue: what failed, where, why and how often; replayed into the unit that failed
//! it, or purged.
//!
//! Dead letters are messages of the Pipeline's stream on its dead-letter subjects, held there by the
//! `_dead_letters` consumer, which nobody acknowledges. Listing reads them with a consumer of its own;
//! replaying and purging remove them by subject purges and deletes (see `Removal`), a replayed one
//! only once its copy is stored.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
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
    fn of(message: &jetstream::Message) -> DeadLetter {
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
            id,
            data: read::data(&message.payload),
            payload: message.payload.clone(),
            headers: message.headers.clone().unwrap_or_default(),
            replay_step: get(headers::REPLAY_STEP).parse().ok(),
        }
    }

    /// Whether `selection` takes it; `not_before_ms` is when its `since` began.
    fn selected(&self, selection: &Selection, not_before_ms: Option<i64>) -> bool {
        let stage = selection.stage.as_deref();
        selection.unit.as_deref().is_none_or(|u| u == self.unit)
            && stage.is_none_or(|s| self.stage == s || self.stage.ends_with(&format!("> {s}")))
            && not_before_ms.is_none_or(|t| self.time_ms >= t)
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
enum Seen {
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
    async fn next_seen(&mut self) -> Result<Option<Seen>, OpsError> {
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
enum Reading {
    /// At the selection's `since`: enough to look at them.
    FromSince,
    /// At the first letter, whatever the selection: a removal must know every letter below the ones
    /// it purges, to keep those that stay.
    FromFirst,
}

async fn open_letters(
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
                first: crate::when(first),
                last: crate::when(last),
            })
            .collect();
        out.sort_by_key(|g| std::cmp::Reverse(g.count));
        out
    }
}

/// One request that removes dead letters from the queue.
#[derive(Debug, PartialEq)]
pub enum Remove {
    /// Every message on `subject` below `seq`: the dead letters `letters` go, and `keep` are stored
    /// again at the end of the subject first (their copies keep their time and id).
    Below {
        subject: String,
        seq: u64,
        letters: Vec<u64>,
        keep: Vec<u64>,
    },
    /// One dead letter.
    One(u64),
}

impl Remove {
    /// The dead letters it removes.
    pub fn letters(&self) -> Vec<u64> {
        match self {
            Remove::Below { letters, .. } => letters.clone(),
            Remove::One(seq) => vec![*seq],
        }
    }
}

/// What nats-server takes for each request (2.15, file storage, measured here on a subject of
/// 40,000 dead letters in a stream past sequence 580,000, debug CLI): deleting one message
/// 1.5–1.7 ms (and more in larger streams: 4.6 ms each among 200,000 letters), purging a subject
/// below a sequence about as long for any number of messages (a purge of 40,000 was too short to
/// tell from reading them), storing a copy of one (a direct get and a publish, 64 in flight) about
/// 0.05 ms. The smallest delete is taken, so copies are chosen only where they surely pay.
const DELETE_US: u64 = 1_600;
const PURGE_US: u64 = DELETE_US;
const COPY_US: u64 = 50;

/// Pure: turns the dead letters that go and those that stay, told in stream order, into few
/// requests. A subject whose every letter read goes is purged below a sequence, one request for
/// any number of them. Where some stay, either they are stored again at the end of the subject and
/// the subject is purged, or the letters that go are deleted one by one, whichever costs less
/// (`DELETE_US`, `COPY_US`). Told in windows (a replay), it deletes one by one until the deletes
/// made would have paid for the copies, and copies from then on: never more than twice the
/// cheaper way.
#[derive(Debug, Default)]
pub struct Removal {
    subjects: BTreeMap<String, OnSubject>,
}

#[derive(Debug, Default)]
struct OnSubject {
    /// The highest sequence told: every letter of the subject below it was told too.
    last: u64,
    /// Told to go, not removed yet.
    going: Vec<u64>,
    /// Told to stay, and still where they were stored: a purge must store them again first.
    staying: Vec<u64>,
    /// Letters deleted one by one while `staying` were there: what not copying them has cost.
    deleted_one_by_one: u64,
    /// Letters that stayed were stored again at the end of the subject: every later one that stays
    /// must follow them there, or it would come before them (see `finish`).
    moved: bool,
}

impl Removal {
    fn on(&mut self, subject: &str, seq: u64) -> &mut OnSubject {
        let on = self.subjects.entry(subject.to_string()).or_default();
        on.last = on.last.max(seq);
        on
    }

    /// The letter at `seq` on `subject` goes.
    pub fn remove(&mut self, subject: &str, seq: u64) {
        self.on(subject, seq).going.push(seq);
    }

    /// The letter at `seq` on `subject` stays.
    pub fn keep(&mut self, subject: &str, seq: u64) {
        self.on(subject, seq).staying.push(seq);
    }

    /// The requests that remove every letter told to go so far.
    pub fn take(&mut self) -> Vec<Remove> {
        let mut ready = Vec::new();
        for (subject, on) in &mut self.subjects {
            if on.going.is_empty() {
                continue;
            }
            let going = std::mem::take(&mut on.going);
            let deletes = on.deleted_one_by_one + going.len() as u64;
            let copies = on.staying.len() as u64;
            if copies * COPY_US + PURGE_US <= deletes * DELETE_US {
                on.moved |= !on.staying.is_empty();
                ready.push(Remove::Below {
                    subject: subject.clone(),
                    seq: on.last + 1,
                    letters: going,
                    keep: std::mem::take(&mut on.staying),
                });
                on.deleted_one_by_one = 0;
            } else {
                on.deleted_one_by_one = deletes;
                ready.extend(going.into_iter().map(Remove::One));
            }
        }
        ready
    }

    /// Once everything was told: the letters that stayed where they were on a subject whose earlier
    /// stayers were stored again at its end would now come before those (a replay whose last window
    /// held only letters that stay, or whose stayers after a copy were cheaper to leave): they follow
    /// them to the end, so what stays keeps its order.
    pub fn finish(&mut self) -> Vec<Remove> {
        let mut ready = Vec::new();
        for (subject, on) in &mut self.subjects {
            if on.moved && !on.staying.is_empty() {
                ready.push(Remove::Below {
                    subject: subject.clone(),
                    seq: on.last + 1,
                    letters: Vec::new(),
                    keep: std::mem::take(&mut on.staying),
                });
            }
        }
        ready
    }
}

/// Why letters told to go are still in the queue. The letters that stay are never lost on the way:
/// a failure after some were stored again deletes those copies.
#[derive(Debug, thiserror::Error)]
pub enum RemovalError {
    #[error("cannot read the dead letter at {seq} to keep it: {source}")]
    ReadToKeep {
        seq: u64,
        source: jetstream::stream::RawMessageError,
    },
    #[error("cannot store the dead letter at {seq} again: {source}")]
    StoreAgain {
        seq: u64,
        source: jetstream::context::PublishError,
    },
    #[error("cannot purge {subject}: {source}")]
    Purge {
        subject: String,
        source: jetstream::stream::PurgeError,
    },
    #[error("cannot delete the dead letter at {seq}: {source}")]
    Delete {
        seq: u64,
        source: jetstream::stream::DeleteMessageError,
    },
}

/// What carrying out removals did.
#[derive(Debug, Default)]
struct Carried {
    /// Letters removed.
    gone: Vec<u64>,
    /// Letters a request could not remove, and why.
    failed: Vec<(Vec<u64>, RemovalError)>,
    /// Letters that stay, stored again: where each was, and where it is now.
    moved: BTreeMap<u64, u64>,
}

/// Carries out removals; each request's letters are gone, or come back with why not.
async fn carry_out(
    target: &Target,
    stream: &jetstream::stream::Stream,
    removals: Vec<Remove>,
) -> Carried {
    let mut carried = Carried::default();
    for removal in removals {
        let result = match &removal {
            Remove::Below {
                subject, seq, keep, ..
            } => purge_keeping(target, stream, subject, *seq, keep, &mut carried.moved).await,
            Remove::One(seq) => stream
                .delete_message(*seq)
                .await
                .map(|_| ())
                .map_err(|source| RemovalError::Delete { seq: *seq, source }),
        };
        match result {
            Ok(()) => carried.gone.extend(removal.letters()),
            Err(e) => carried.failed.push((removal.letters(), e)),
        }
    }
    carried
}

/// Copies of stored letters in flight at once.
const COPY_WINDOW: usize = 64;

/// Purges `subject` below `seq`, having stored the letters `keep` again at its end (in their order);
/// when anything fails, the copies made are deleted and nothing is purged.
async fn purge_keeping(
    target: &Target,
    stream: &jetstream::stream::Stream,
    subject: &str,
    seq: u64,
    keep: &[u64],
    moved: &mut BTreeMap<u64, u64>,
) -> Result<(), RemovalError> {
    let mut copies = Vec::with_capacity(keep.len());
    let copied = store_again(target, stream, subject, keep, &mut copies).await;
    let purged = match copied {
        Ok(()) => stream
            .purge()
            .filter(subject)
            .sequence(seq)
            .await
            .map(|_| ())
            .map_err(|source| RemovalError::Purge {
                subject: subject.to_string(),
                source,
            }),
        Err(e) => Err(e),
    };
    if let Err(e) = purged {
        for (_, copy) in copies {
            if let Err(again) = stream.delete_message(copy).await {
                tracing::warn!(
                    "a dead letter stored again at {copy} of {subject} is there twice now: {again}"
                );
            }
        }
        return Err(e);
    }
    moved.extend(copies);
    Ok(())
}

/// Stores the letters at `seqs` of `subject` again at its end, in order; `copies` gets where each
/// went as it is stored.
async fn store_again(
    target: &Target,
    stream: &jetstream::stream::Stream,
    subject: &str,
    seqs: &[u64],
    copies: &mut Vec<(u64, u64)>,
) -> Result<(), RemovalError> {
    let mut stored = futures::stream::iter(seqs.iter().copied())
        .map(|seq| async move {
            stream
                .get_raw_message(seq)
                .await
                .map(|m| (seq, m))
                .map_err(|source| RemovalError::ReadToKeep { seq, source })
        })
        .buffered(COPY_WINDOW);
    let mut acks = std::collections::VecDeque::with_capacity(COPY_WINDOW);
    loop {
        let next = stored.next().await;
        let ended = next.is_none();
        if let Some(read) = next {
            let (seq, message) = read?;
            let publish = jetstream::message::PublishMessage::build()
                .headers(kept_headers(
                    &message.headers,
                    (message.time.unix_timestamp_nanos() / 1_000_000) as i64,
                ))
                .payload(message.payload.clone());
            // Published one after another on one connection, so the copies keep their order.
            let ack = target
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .map_err(|source| RemovalError::StoreAgain { seq, source })?;
            acks.push_back((seq, ack));
        }
        if acks.len() >= COPY_WINDOW || (ended && !acks.is_empty()) {
            if let Some((seq, ack)) = acks.pop_front() {
                let copy = ack
                    .await
                    .map_err(|source| RemovalError::StoreAgain { seq, source })?;
                copies.push((seq, copy.sequence));
            }
        }
        if ended && acks.is_empty() {
            return Ok(());
        }
    }
}

/// Pure: the headers of a dead letter stored again: its own, without the stream's de-duplication id
/// (the copy would be dropped as the letter itself), with when it was first stored and its id.
fn kept_headers(original: &HeaderMap, stored_at_ms: i64) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in original.iter() {
        if AsRef::<str>::as_ref(name) == headers::MSG_ID {
            continue;
        }
        for value in values {
            out.append(name.clone(), value.clone());
        }
    }
    if original.get(headers::DEAD_SINCE).is_none() {
        out.insert(headers::DEAD_SINCE, stored_at_ms.to_string().as_str());
    }
    if original.get(headers::LETTER_ID).is_none() {
        if let Some(id) = original.get(headers::MSG_ID) {
            out.insert(headers::LETTER_ID, id.clone());
        }
    }
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
    fn keep(&mut self, seq: u64, why: String) {
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
    fn moved(&mut self, moved: &BTreeMap<u64, u64>) {
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
const REPLAY_WINDOW: usize = 256;

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
enum NotReplayed {
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
    let stream = target
        .js
        .get_stream(&target.layout.nats.stream.name)
        .await
        .map_err(OpsError::nats("open the Pipeline's stream"))?;
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
        let mut acks = Vec::with_capacity(window.len());
        for seen in &window {
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
        // Told in stream order, so that a letter that stays is never purged with those before it.
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
        let Carried {
            gone,
            failed,
            moved,
        } = carry_out(target, &stream, removal.take()).await;
        report.moved(&moved);
        for seq in gone {
            report.replayed += 1;
            if let Some(unit) = units.get(&seq) {
                *report.by_unit.entry(unit.to_string()).or_default() += 1;
            }
        }
        for (seqs, e) in failed {
            for seq in seqs {
                report.keep(
                    seq,
                    format!("replayed, but not removed from the queue ({e}): a second replay would be dropped as a duplicate for 2 minutes"),
                );
            }
        }
    }
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
    let stream = target
        .js
        .get_stream(&target.layout.nats.stream.name)
        .await
        .map_err(OpsError::nats("open the Pipeline's stream"))?;
    let Carried { gone, failed, .. } = carry_out(target, &stream, to_purge.removals).await;
    for (seqs, e) in failed {
        tracing::warn!("cannot remove {} dead letter(s): {e}", seqs.len());
    }
    Ok(gone.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(unit: &str, stage: &str, error: &str, ms: i64) -> DeadLetter {
        DeadLetter {
            seq: 1,
            subject: format!("switchyard.default.p.dlq.{unit}"),
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
        let mut groups = Groups::default();
        for d in &letters {
            groups.add(d);
        }
        assert_eq!(groups.total(), 5);
        let groups = groups.sorted();
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

    #[test]
    fn the_server_counts_dead_letters_per_unit_unless_all_units_share_a_subject() {
        let own = subject_units(&laundry_layout()).expect("a subject per unit");
        assert_eq!(own.len(), 3);
        assert!(own.values().any(|u| u == "machines"));
        let shared = layout_of("  deadLetter: {subject: failures}\n");
        assert_eq!(subject_units(&shared), None);
    }

    fn below(subject: &str, seq: u64, letters: Vec<u64>, keep: Vec<u64>) -> Remove {
        Remove::Below {
            subject: subject.into(),
            seq,
            letters,
            keep,
        }
    }

    #[test]
    fn a_subject_whose_every_letter_goes_is_purged_in_one_request() {
        let mut removal = Removal::default();
        for seq in [3, 7, 9] {
            removal.remove("dlq.wash", seq);
        }
        removal.remove("dlq.dry", 8);
        assert_eq!(
            removal.take(),
            vec![
                below("dlq.dry", 9, vec![8], vec![]),
                below("dlq.wash", 10, vec![3, 7, 9], vec![]),
            ]
        );
        // Later letters of a whole subject: still one request each time.
        removal.remove("dlq.wash", 12);
        assert_eq!(
            removal.take(),
            vec![below("dlq.wash", 13, vec![12], vec![])]
        );
        assert_eq!(removal.take(), vec![]);
    }

    /// A letter that stays near the start of a subject used to make every later one a delete of its
    /// own (1.6 ms each, more in a large stream): 16 requests here, one now.
    #[test]
    fn letters_that_stay_are_stored_again_and_the_subject_purged_when_that_costs_less() {
        let mut removal = Removal::default();
        removal.remove("dlq.wash", 3);
        removal.remove("dlq.wash", 5);
        removal.keep("dlq.wash", 6);
        let after: Vec<u64> = (7..=20).collect();
        for &seq in &after {
            removal.remove("dlq.wash", seq);
        }
        removal.keep("dlq.wash", 21);
        removal.remove("dlq.dry", 4);
        let going: Vec<u64> = [3, 5].into_iter().chain(after).collect();
        assert_eq!(
            removal.take(),
            vec![
                below("dlq.dry", 5, vec![4], vec![]),
                below("dlq.wash", 22, going, vec![6, 21]),
            ]
        );
        // What stays was stored again: the subject's next letters go as a whole.
        removal.remove("dlq.wash", 30);
        assert_eq!(
            removal.take(),
            vec![below("dlq.wash", 31, vec![30], vec![])]
        );

        // One letter that goes after one that stays: a delete is cheaper than a copy and a purge.
        let mut removal = Removal::default();
        removal.keep("dlq.wash", 4);
        removal.remove("dlq.wash", 9);
        assert_eq!(removal.take(), vec![Remove::One(9)]);
    }

    /// Told in windows, letters after many that stay are deleted one by one until those deletes
    /// would have paid for storing the others again; then the rest go with one purge. Storing 100
    /// again and a purge cost 6.6 ms, four deletes 6.4 ms: the fifth letter is purged.
    #[test]
    fn deletes_one_by_one_stop_once_they_would_have_paid_for_the_copies() {
        let mut removal = Removal::default();
        let staying: Vec<u64> = (1..=100).collect();
        for &seq in &staying {
            removal.keep("dlq.wash", seq);
        }
        for seq in 101..=104 {
            removal.remove("dlq.wash", seq);
            assert_eq!(removal.take(), vec![Remove::One(seq)]);
        }
        removal.remove("dlq.wash", 105);
        assert_eq!(
            removal.take(),
            vec![below("dlq.wash", 106, vec![105], staying)]
        );
        removal.remove("dlq.wash", 106);
        assert_eq!(
            removal.take(),
            vec![below("dlq.wash", 107, vec![106], vec![])]
        );
    }

    /// Stayers at the end of a subject, after others were stored again, used to stay where they were
    /// and so came before those (the day-2 test saw 7925..9995 before 5..7915 once the pack unit
    /// lagged behind price); they follow them now. A subject where nothing moved is left as it is.
    #[test]
    fn letters_that_stay_after_others_were_stored_again_follow_them() {
        let mut removal = Removal::default();
        removal.keep("dlq.wash", 1);
        for seq in 2..=20 {
            removal.remove("dlq.wash", seq);
        }
        assert_eq!(
            removal.take(),
            vec![below("dlq.wash", 21, (2..=20).collect(), vec![1])]
        );
        // Cheaper to delete 22 than to copy 21 and purge: 21 stays where it is, for now.
        removal.keep("dlq.wash", 21);
        removal.remove("dlq.wash", 22);
        assert_eq!(removal.take(), vec![Remove::One(22)]);
        // The last window holds only letters that stay.
        removal.keep("dlq.wash", 23);
        assert_eq!(removal.take(), vec![]);
        removal.keep("dlq.dry", 5);
        removal.remove("dlq.dry", 6);
        assert_eq!(removal.take(), vec![Remove::One(6)]);
        assert_eq!(
            removal.finish(),
            vec![below("dlq.wash", 24, vec![], vec![21, 23])]
        );
        assert_eq!(removal.finish(), vec![]);
    }

    #[test]
    fn a_letter_stored_again_keeps_its_time_and_id_but_not_the_streams_dedup_id() {
        let mut original = HeaderMap::new();
        original.insert(headers::MSG_ID, "src:1/wash!0.0");
        original.insert(headers::FAILED_UNIT, "wash");
        let copy = kept_headers(&original, 1_700_000_000_123);
        assert_eq!(copy.get(headers::MSG_ID), None);
        let get = |h: &HeaderMap, name| h.get(name).map(|v| v.as_str().to_string());
        assert_eq!(get(&copy, headers::FAILED_UNIT).as_deref(), Some("wash"));
        assert_eq!(
            get(&copy, headers::DEAD_SINCE).as_deref(),
            Some("1700000000123")
        );
        assert_eq!(
            get(&copy, headers::LETTER_ID).as_deref(),
            Some("src:1/wash!0.0")
        );
        // Stored again a second time: still the first time and id.
        let again = kept_headers(&copy, 1_800_000_000_000);
        assert_eq!(
            get(&again, headers::DEAD_SINCE).as_deref(),
            Some("1700000000123")
        );
        assert_eq!(
            get(&again, headers::LETTER_ID).as_deref(),
            Some("src:1/wash!0.0")
        );
    }

    #[test]
    fn a_replay_counts_what_it_keeps_by_reason_and_names_a_few() {
        let mut report = Replayed::default();
        for seq in 1..=12 {
            report.keep(seq, "unit `gone` is not in the Pipeline any more".into());
        }
        report.keep(40, "not stored again: timed out".into());
        assert_eq!(report.kept_count(), 13);
        assert_eq!(report.kept.len(), 2);
        assert_eq!(report.kept[0].count, 12);
        assert_eq!(report.kept[0].seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(report.kept[1].seqs, vec![40]);
    }

    fn laundry_layout() -> Layout {
        layout_of("")
    }

    fn layout_of(extra: &str) -> Layout {
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
"#
        .to_string()
            + extra;
        let pipeline: switchyard_crds::Pipeline = serde_norway::from_str(&text).unwrap();
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
        d.headers.insert(headers::TRACED, "1");
        let (subject, map) = replay_message(&layout, &d).unwrap();
        assert_eq!(subject, "switchyard.default.p.data.src");
        let get = |name| map.get(name).unwrap().as_str().to_string();
        assert_eq!(get(headers::REPLAY_FOR), "machines");
        assert_eq!(get(headers::REPLAY_STEP), "1");
        assert_eq!(get(headers::REPLAYS), "2");
        assert_eq!(get(headers::MSG_ID), "src:1/machines!0.0~2");
        assert_eq!(get(headers::PATH), "src");
        assert_eq!(get(headers::ORIGIN), "src");
        assert_eq!(
            get(headers::TRACED),
            "1",
            "traced again, as its source decided"
        );
        let mut old = d.clone();
        old.replay_step = None;
        assert_eq!(
            replay_message(&layout, &old).unwrap_err(),
            ReplayRefused::PredatesReplays {
                unit: "machines".into(),
                steps: 2
            }
        );
        assert!(replay_message(&layout, &old)
            .unwrap_err()
            .to_string()
            .contains("predates replays"));
        let gone = letter("shrunk", "shrunk", "x", 0);
        assert_eq!(
            replay_message(&layout, &gone).unwrap_err(),
            ReplayRefused::UnitGone {
                unit: "shrunk".into()
            }
        );
    }

    #[test]
    fn a_selection_matches_a_stage_by_its_last_part_or_whole() {
        let d = letter("machines", "machines > wash", "x", 0);
        let by = |unit: Option<&str>, stage: Option<&str>| {
            d.selected(
                &Selection {
                    unit: unit.map(str::to_string),
                    stage: stage.map(str::to_string),
                    ..Selection::default()
                },
                None,
            )
        };
        assert!(by(None, None));
        assert!(by(Some("machines"), Some("wash")));
        assert!(by(None, Some("machines > wash")));
        assert!(!by(None, Some("ash")));
        assert!(!by(Some("dry"), None));
        // By its own time, which a letter stored again keeps.
        let since = |not_before| d.selected(&Selection::default(), Some(not_before));
        assert!(since(0));
        assert!(!since(1));
    }
}
