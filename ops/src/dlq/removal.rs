//! Removing dead letters from the queue (see `Removal`): the requests that cost least, decided
//! (pure), and carried out, storing again the letters that stay when a subject is purged.

use std::collections::BTreeMap;

use async_nats::header::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use switchyard_crds::unit::headers;

use crate::target::Target;

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
pub(super) const DELETE_US: u64 = 1_600;
pub(super) const PURGE_US: u64 = DELETE_US;
pub(super) const COPY_US: u64 = 50;

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
pub(super) struct OnSubject {
    /// The highest sequence told: every letter of the subject below it was told too.
    pub(super) last: u64,
    /// Told to go, not removed yet.
    pub(super) going: Vec<u64>,
    /// Told to stay, and still where they were stored: a purge must store them again first.
    pub(super) staying: Vec<u64>,
    /// Letters deleted one by one while `staying` were there: what not copying them has cost.
    pub(super) deleted_one_by_one: u64,
    /// Letters that stayed were stored again at the end of the subject: every later one that stays
    /// must follow them there, or it would come before them (see `finish`).
    pub(super) moved: bool,
}

impl Removal {
    pub(super) fn on(&mut self, subject: &str, seq: u64) -> &mut OnSubject {
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
pub(super) struct Carried {
    /// Letters removed.
    pub(super) gone: Vec<u64>,
    /// Letters a request could not remove, and why.
    pub(super) failed: Vec<(Vec<u64>, RemovalError)>,
    /// Letters that stay, stored again: where each was, and where it is now.
    pub(super) moved: BTreeMap<u64, u64>,
}

/// Carries out removals; each request's letters are gone, or come back with why not.
pub(super) async fn carry_out(
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
pub(super) const COPY_WINDOW: usize = 64;

/// Purges `subject` below `seq`, having stored the letters `keep` again at its end (in their order);
/// when anything fails, the copies made are deleted and nothing is purged.
pub(super) async fn purge_keeping(
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
pub(super) async fn store_again(
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
pub(super) fn kept_headers(original: &HeaderMap, stored_at_ms: i64) -> HeaderMap {
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
