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
        let time_ms = read::stored_at_ms(message);
        let get = |name| header(message, name);
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

/// The dead letters a selection takes, oldest first, read one at a time: a queue of millions is
/// never held in memory.
pub struct Letters {
    stored: read::Stored,
    selection: Selection,
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
        if !letter.selected(&self.selection) {
            return Ok(Some(Seen::Passed {
                subject: letter.subject,
                seq: letter.seq,
            }));
        }
        self.left -= 1;
        Ok(Some(Seen::Selected(Box::new(letter))))
    }

    /// Whether the reading started at the first dead letter (not `--since`): then a subject whose
    /// every letter so far goes can be purged below a sequence.
    fn reads_from_start(&self) -> bool {
        self.selection.since.is_none()
    }
}

/// The dead letters the selection takes, as they are stored now.
pub async fn letters(target: &Target, selection: &Selection) -> Result<Letters, OpsError> {
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
    /// Every message on `subject` below `seq`: the dead letters `letters`, and no other.
    Below {
        subject: String,
        seq: u64,
        letters: Vec<u64>,
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

/// Pure: turns the dead letters that go and those that stay, told in stream order, into as few
/// requests as it can. Deleting one message costs nats-server about 10 ms (2.15, file storage),
/// a purge of a subject below a sequence about as much for any number of them: as long as every
/// letter read on a subject goes, the subject is purged; from its first letter that stays on, its
/// letters go one by one.
#[derive(Debug)]
pub struct Removal {
    from_start: bool,
    subjects: BTreeMap<String, Run>,
    ready: Vec<Remove>,
}

#[derive(Debug)]
enum Run {
    /// Every letter read on the subject goes; these are not removed yet.
    Whole(Vec<u64>),
    /// Some letter on the subject stays.
    Broken,
}

impl Removal {
    /// `from_start`: the letters are told from the first one stored; otherwise earlier ones may stay
    /// and nothing is purged.
    pub fn new(from_start: bool) -> Removal {
        Removal {
            from_start,
            subjects: BTreeMap::new(),
            ready: Vec::new(),
        }
    }

    fn run(&mut self, subject: &str) -> &mut Run {
        let whole = self.from_start;
        self.subjects.entry(subject.to_string()).or_insert_with(|| {
            if whole {
                Run::Whole(Vec::new())
            } else {
                Run::Broken
            }
        })
    }

    /// The letter at `seq` on `subject` goes.
    pub fn remove(&mut self, subject: &str, seq: u64) {
        match self.run(subject) {
            Run::Whole(seqs) => seqs.push(seq),
            Run::Broken => self.ready.push(Remove::One(seq)),
        }
    }

    /// The letter at `seq` on `subject` stays: those before it on the subject are purged below it,
    /// any after it (told out of order) go one by one.
    pub fn keep(&mut self, subject: &str, seq: u64) {
        let run = std::mem::replace(self.run(subject), Run::Broken);
        if let Run::Whole(seqs) = run {
            let (below, above): (Vec<u64>, Vec<u64>) = seqs.into_iter().partition(|&s| s < seq);
            if !below.is_empty() {
                self.ready.push(Remove::Below {
                    subject: subject.to_string(),
                    seq,
                    letters: below,
                });
            }
            self.ready.extend(above.into_iter().map(Remove::One));
        }
    }

    /// The requests that remove every letter told to go so far.
    pub fn take(&mut self) -> Vec<Remove> {
        for (subject, run) in &mut self.subjects {
            if let Run::Whole(seqs) = run {
                if let Some(&last) = seqs.iter().max() {
                    self.ready.push(Remove::Below {
                        subject: subject.clone(),
                        seq: last + 1,
                        letters: std::mem::take(seqs),
                    });
                }
            }
        }
        std::mem::take(&mut self.ready)
    }
}

/// Carries out removals; each request's letters are gone, or come back with why not.
async fn carry_out(
    stream: &jetstream::stream::Stream,
    removals: Vec<Remove>,
) -> (Vec<u64>, Vec<(Vec<u64>, String)>) {
    let mut gone = Vec::new();
    let mut failed = Vec::new();
    for removal in removals {
        let result = match &removal {
            Remove::Below { subject, seq, .. } => stream
                .purge()
                .filter(subject.clone())
                .sequence(*seq)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Remove::One(seq) => stream
                .delete_message(*seq)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => gone.extend(removal.letters()),
            Err(e) => failed.push((removal.letters(), e)),
        }
    }
    (gone, failed)
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

    /// Letters left in the queue.
    pub fn kept_count(&self) -> u64 {
        self.kept.iter().map(|k| k.count).sum()
    }
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
pub async fn replay(target: &Target, letters: &mut Letters) -> Result<Replayed, OpsError> {
    let stream = target
        .js
        .get_stream(&target.layout.nats.stream.name)
        .await
        .map_err(OpsError::nats("open the Pipeline's stream"))?;
    let mut report = Replayed::default();
    let mut removal = Removal::new(letters.reads_from_start());
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
                        .map_err(|e| e.to_string())
                }
                Err(why) => Err(why),
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
                Some(Ok(ack)) => ack
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("not stored again: {e}")),
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
                    report.keep(letter.seq, why);
                }
            }
        }
        let (gone, failed) = carry_out(&stream, removal.take()).await;
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
pub async fn to_purge(letters: &mut Letters) -> Result<ToPurge, OpsError> {
    let mut removal = Removal::new(letters.reads_from_start());
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
    let (gone, failed) = carry_out(&stream, to_purge.removals).await;
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

    #[test]
    fn a_subject_whose_every_letter_goes_is_purged_in_one_request() {
        let mut removal = Removal::new(true);
        for seq in [3, 7, 9] {
            removal.remove("dlq.wash", seq);
        }
        removal.remove("dlq.dry", 8);
        assert_eq!(
            removal.take(),
            vec![
                Remove::Below {
                    subject: "dlq.dry".into(),
                    seq: 9,
                    letters: vec![8]
                },
                Remove::Below {
                    subject: "dlq.wash".into(),
                    seq: 10,
                    letters: vec![3, 7, 9]
                },
            ]
        );
        // Later letters of a whole subject: still one request each time.
        removal.remove("dlq.wash", 12);
        assert_eq!(
            removal.take(),
            vec![Remove::Below {
                subject: "dlq.wash".into(),
                seq: 13,
                letters: vec![12]
            }]
        );
        assert_eq!(removal.take(), vec![]);
    }

    #[test]
    fn a_letter_that_stays_is_never_purged_and_those_after_it_go_one_by_one() {
        let mut removal = Removal::new(true);
        removal.remove("dlq.wash", 3);
        removal.remove("dlq.wash", 5);
        removal.keep("dlq.wash", 6);
        removal.remove("dlq.wash", 7);
        removal.remove("dlq.dry", 4);
        assert_eq!(
            removal.take(),
            vec![
                Remove::Below {
                    subject: "dlq.wash".into(),
                    seq: 6,
                    letters: vec![3, 5]
                },
                Remove::One(7),
                Remove::Below {
                    subject: "dlq.dry".into(),
                    seq: 5,
                    letters: vec![4]
                },
            ]
        );
        // Told out of order, a later letter never rides along below one that stays.
        let mut removal = Removal::new(true);
        removal.remove("dlq.wash", 9);
        removal.keep("dlq.wash", 4);
        assert_eq!(removal.take(), vec![Remove::One(9)]);
        // Read from a time on (`--since`), earlier letters may be there: nothing is purged.
        let mut removal = Removal::new(false);
        removal.remove("dlq.wash", 3);
        assert_eq!(removal.take(), vec![Remove::One(3)]);
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
