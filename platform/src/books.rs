//! Reading a Pipeline's books back from their stream, and rolling one replica's records up into one
//! message. What the books mean is `switchyard_crds::books`; the stage runtime writes the records.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use futures::StreamExt;
use switchyard_crds::books::{records_of_sum, sum_subject, Books, Record, Tally, THROUGH_HEADER};

/// Why the books could not be read or rolled up.
#[derive(Debug, thiserror::Error)]
pub enum BooksError {
    #[error("cannot {action} in stream {stream}: {source}")]
    Nats {
        action: &'static str,
        stream: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading stream {stream} stopped after {read} of {expected} book messages: nothing came for {waited:?}")]
    Stalled {
        stream: String,
        read: u64,
        expected: u64,
        waited: Duration,
    },
}

fn nats<E: std::error::Error + Send + Sync + 'static>(
    action: &'static str,
    stream: &str,
) -> impl FnOnce(E) -> BooksError {
    let stream = stream.to_string();
    move |e| BooksError::Nats {
        action,
        stream,
        source: Box::new(e),
    }
}

/// How long one book message may take to come before a read gives up.
const NEXT_MESSAGE_WITHIN: Duration = Duration::from_secs(10);
/// At most this much longer than the duplicate window do summed records stay (`kept_for`).
const KEEP_MARGIN: Duration = Duration::from_secs(30);

/// Every book message on a filter of the books stream, by replica (`Tally`).
#[derive(Debug, Default)]
pub struct Read {
    /// By the subject of the replica's records (`<root>.<unit>.<replica>`): its roll-up and the
    /// records after it.
    pub by_subject: BTreeMap<String, Tally>,
    /// Book messages read.
    pub messages: u64,
    /// Messages that are not books (written by hand, or by something else): skipped, and counted.
    pub unreadable: u64,
    /// When the last record on each records subject was stored.
    pub last_recorded: BTreeMap<String, time::OffsetDateTime>,
}

impl Read {
    /// The books by unit: `root` is what comes before `.<unit>.<replica>` in the subjects
    /// (`Names::books_root`).
    pub fn books(&self, root: &str) -> Books {
        let mut books = Books::default();
        for (subject, tally) in &self.by_subject {
            let unit = subject
                .strip_prefix(root)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.split('.').next());
            if let Some(unit) = unit {
                books.add(unit, &tally.total());
            }
        }
        books
    }
}

/// One book message as stored.
enum Book {
    Record {
        subject: String,
        record: Record,
    },
    RollUp {
        records: String,
        through: u64,
        sum: Record,
    },
}

/// What a message of the books stream holds; `Err` says why it is not a book message.
fn book(subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Book, String> {
    let record: Record = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let Some(through) = headers.and_then(|h| h.get(THROUGH_HEADER)) else {
        // A roll-up of the records before it on its own subject (as the first books wrote them)
        // reads as a record too: the server removed what it sums when it stored it.
        return Ok(Book::Record {
            subject: subject.to_string(),
            record,
        });
    };
    let through = through
        .as_str()
        .parse()
        .map_err(|_| format!("{THROUGH_HEADER} is not a sequence: {through}"))?;
    let records = records_of_sum(subject)
        .ok_or_else(|| format!("a roll-up on {subject}, not on a subject ending in .sum"))?;
    Ok(Book::RollUp {
        records: records.to_string(),
        through,
        sum: record,
    })
}

/// Reads every book message on `filter` now stored: each replica's latest roll-up and the records
/// after it, so a record read before a roll-up that sums it is not counted twice.
pub async fn read(js: &jetstream::Context, stream: &str, filter: &str) -> Result<Read, BooksError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(nats("open the books", stream))?;
    let mut read = Read::default();
    each_message(&handle, stream, filter, consumer::DeliverPolicy::All, |message| {
        read.messages += 1;
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        match book(&message.subject, message.headers.as_ref(), &message.payload) {
            Ok(Book::Record { subject, record }) => {
                if let Ok(info) = message.info() {
                    read.last_recorded.insert(subject.clone(), info.published);
                }
                read.by_subject
                    .entry(subject)
                    .or_default()
                    .record(sequence, record)
            }
            Ok(Book::RollUp {
                records,
                through,
                sum,
            }) => read
                .by_subject
                .entry(records)
                .or_default()
                .rolled_up(through, sum),
            Err(e) => {
                read.unreadable += 1;
                tracing::warn!(
                    "message {sequence} on {} in stream {stream} is not a book record ({e}); skipped",
                    message.subject
                );
            }
        }
    })
    .await?;
    Ok(read)
}

/// An ordered reader of the messages on `filter` from `from` on, and how many it has to read; none
/// when there is nothing.
async fn reader(
    handle: &jetstream::stream::Stream,
    stream: &str,
    filter: &str,
    from: consumer::DeliverPolicy,
) -> Result<Option<(consumer::pull::Ordered, u64)>, BooksError> {
    let mut reader = handle
        .create_consumer(consumer::pull::OrderedConfig {
            description: Some("switchyard books reader".to_string()),
            filter_subject: filter.to_string(),
            deliver_policy: from,
            ..Default::default()
        })
        .await
        .map_err(nats("read the books", stream))?;
    let expected = reader
        .info()
        .await
        .map_err(nats("read the books", stream))?
        .num_pending;
    if expected == 0 {
        return Ok(None);
    }
    let messages = reader
        .messages()
        .await
        .map_err(nats("read the books", stream))?;
    Ok(Some((messages, expected)))
}

/// Calls `each` with every message on `filter` from `from` on that is stored now, in order.
async fn each_message(
    handle: &jetstream::stream::Stream,
    stream: &str,
    filter: &str,
    from: consumer::DeliverPolicy,
    mut each: impl FnMut(&jetstream::Message),
) -> Result<(), BooksError> {
    let Some((mut messages, expected)) = reader(handle, stream, filter, from).await? else {
        return Ok(());
    };
    let mut count = 0;
    loop {
        let message = match tokio::time::timeout(NEXT_MESSAGE_WITHIN, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(nats("read the books", stream)(e)),
            Ok(None) => return Ok(()),
            Err(_) => {
                return Err(BooksError::Stalled {
                    stream: stream.to_string(),
                    read: count,
                    expected,
                    waited: NEXT_MESSAGE_WITHIN,
                })
            }
        };
        count += 1;
        each(&message);
        if message.info().map_or(0, |i| i.pending) == 0 {
            return Ok(());
        }
    }
}

/// How long summed records stay: the stream's duplicate window, and a quarter more (at most
/// `KEEP_MARGIN`) for clocks that disagree.
fn kept_for(window: Duration) -> Duration {
    window + (window / 4).min(KEEP_MARGIN)
}

/// What a roll-up did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RolledUp {
    /// Records it added to the subject's roll-up.
    pub summed: usize,
    /// Records it removed: summed, and older than the stream's duplicate window.
    pub removed: u64,
}

/// Sums the records on `subject` into its roll-up (`sum_subject`), and removes the summed records
/// that are older than the stream's duplicate window (`Tally` says why not sooner). Anyone may
/// call it for any replica's subject: a roll-up is stored only if the one it read is still the
/// latest, so two at once store one, and a record stored meanwhile stays until the next.
pub async fn roll_up(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<RolledUp, BooksError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(nats("open the books", stream))?;
    let keep_for = kept_for(handle.cached_info().config.duplicate_window);
    let sums = sum_subject(subject);
    let mut tally = Tally::default();
    let last_sum = match handle.get_last_raw_message_by_subject(&sums).await {
        Ok(message) => {
            match book(&message.subject, Some(&message.headers), &message.payload) {
                Ok(Book::RollUp { through, sum, .. }) => tally.rolled_up(through, sum),
                Ok(Book::Record { .. }) | Err(_) => {
                    return Err(BooksError::Nats {
                        action: "read the roll-up",
                        stream: stream.to_string(),
                        source: format!("message {} on {sums} is not a roll-up", message.sequence)
                            .into(),
                    })
                }
            }
            message.sequence
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
        Err(e) => return Err(nats("read the roll-up", stream)(e)),
    };
    let from = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: tally.through() + 1,
    };
    each_message(&handle, stream, subject, from, |message| {
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        match book(&message.subject, message.headers.as_ref(), &message.payload) {
            Ok(Book::Record { record, .. }) => tally.record(sequence, record),
            // Not a record: nothing to sum, and it goes when the records around it go.
            Ok(Book::RollUp { .. }) | Err(_) => {}
        }
    })
    .await?;
    let mut rolled = RolledUp {
        summed: tally.records_after(),
        removed: 0,
    };
    let through = tally.last();
    if rolled.summed > 0 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        // 0: there must be none yet.
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last_sum.to_string().as_str(),
        );
        headers.insert(THROUGH_HEADER, through.to_string().as_str());
        let body = serde_json::to_vec(&tally.total())
            .map_err(nats("encode a roll-up of the books", stream))?;
        js.publish_with_headers(sums, headers, body.into())
            .await
            .map_err(nats("roll up the books", stream))?
            .await
            .map_err(nats("roll up the books", stream))?;
    }
    // Summed records stored within the window stay: `Tally` says why.
    let young_since = time::OffsetDateTime::now_utc() - keep_for;
    let young = first_since(&handle, stream, subject, young_since).await?;
    let below = young.unwrap_or(u64::MAX).min(through + 1);
    if below > 1 {
        rolled.removed = handle
            .purge()
            .filter(subject)
            .sequence(below)
            .await
            .map_err(nats("remove summed records", stream))?
            .purged;
    }
    Ok(rolled)
}

/// Rolls up the subjects in `read` whose writer has recorded nothing for longer than the stream's
/// duplicate window and left records: a process that stopped leaves its last window's records (or,
/// killed, everything since its last roll-up), and nobody else writes its subject. Returns the
/// records removed.
///
/// `window` is the stream's duplicate window, which the caller knows from the layout: with nothing
/// idle, this asks the server nothing.
pub async fn roll_up_idle(
    js: &jetstream::Context,
    stream: &str,
    read: &Read,
    window: Duration,
) -> Result<u64, BooksError> {
    let idle_before = time::OffsetDateTime::now_utc() - kept_for(window);
    let mut removed = 0;
    for (subject, at) in &read.last_recorded {
        if *at < idle_before {
            removed += roll_up(js, stream, subject).await?.removed;
        }
    }
    Ok(removed)
}

/// The sequence of the first message on `subject` stored at `since` or later.
async fn first_since(
    handle: &jetstream::stream::Stream,
    stream: &str,
    subject: &str,
    since: time::OffsetDateTime,
) -> Result<Option<u64>, BooksError> {
    let from = consumer::DeliverPolicy::ByStartTime { start_time: since };
    let Some((mut messages, _)) = reader(handle, stream, subject, from).await? else {
        return Ok(None);
    };
    match tokio::time::timeout(NEXT_MESSAGE_WITHIN, messages.next()).await {
        Ok(Some(Ok(message))) => Ok(message.info().ok().map(|i| i.stream_sequence)),
        Ok(Some(Err(e))) => Err(nats("read the books", stream)(e)),
        // Removed meanwhile: what was there is summed or young, and stays either way.
        Ok(None) | Err(_) => Ok(Some(0)),
    }
}
