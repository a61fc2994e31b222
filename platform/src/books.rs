//! Reading a Pipeline's books back from their stream, and rolling one replica's records up into one
//! message. What the books mean is `switchyard_crds::books`; the stage runtime writes the records.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use futures::StreamExt;
use switchyard_crds::books::{Books, Record, ROLLUP_HEADER};

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

/// The sum of every book message on `filter` of `stream`, by subject; and the sequence of the last
/// one read.
#[derive(Debug, Default)]
pub struct Read {
    pub by_subject: BTreeMap<String, Record>,
    pub last_sequence: u64,
    /// Book messages read.
    pub messages: u64,
    /// Messages that are not books (written by hand, or by something else): skipped, and counted.
    pub unreadable: u64,
}

impl Read {
    /// The books by unit: `root` is what comes before `.<unit>.<replica>` in the subjects
    /// (`Names::books_root`).
    pub fn books(&self, root: &str) -> Books {
        let mut books = Books::default();
        for (subject, record) in &self.by_subject {
            let unit = subject
                .strip_prefix(root)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.split('.').next());
            if let Some(unit) = unit {
                books.add(unit, record);
            }
        }
        books
    }
}

/// Reads every book message on `filter` now stored. A roll-up stands for everything before it on its
/// subject, so a record read before a roll-up that came meanwhile is not counted twice.
pub async fn read(js: &jetstream::Context, stream: &str, filter: &str) -> Result<Read, BooksError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(nats("open the books", stream))?;
    let mut reader = handle
        .create_consumer(consumer::pull::OrderedConfig {
            description: Some("switchyard books reader".to_string()),
            filter_subject: filter.to_string(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(nats("read the books", stream))?;
    let expected = reader
        .info()
        .await
        .map_err(nats("read the books", stream))?
        .num_pending;
    let mut read = Read::default();
    if expected == 0 {
        return Ok(read);
    }
    let mut messages = reader
        .messages()
        .await
        .map_err(nats("read the books", stream))?;
    let mut count = 0;
    loop {
        let message = match tokio::time::timeout(NEXT_MESSAGE_WITHIN, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(nats("read the books", stream)(e)),
            // A roll-up took what was left while it was being read: the end.
            Ok(None) => return Ok(read),
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
        read.messages = count;
        let (sequence, pending) = message
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .unwrap_or((0, 0));
        read.last_sequence = read.last_sequence.max(sequence);
        match serde_json::from_slice::<Record>(&message.payload) {
            Ok(record) => {
                let sum = read
                    .by_subject
                    .entry(message.subject.to_string())
                    .or_default();
                if is_rollup(message.headers.as_ref()) {
                    sum.clear();
                }
                for (from, counts) in record {
                    sum.entry(from).or_default().add(&counts);
                }
            }
            Err(e) => {
                read.unreadable += 1;
                tracing::warn!(
                    "message {sequence} on {} in stream {stream} is not a book record ({e}); skipped",
                    message.subject
                );
            }
        }
        if pending == 0 {
            return Ok(read);
        }
    }
}

fn is_rollup(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(ROLLUP_HEADER).is_some())
}

/// Replaces every message on `subject` with one that sums them, if more than one is there. Only the
/// process that writes `subject` calls it, with none of its records in flight: the roll-up is
/// stored only if the subject's last message is still the last one read.
pub async fn roll_up(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<(), BooksError> {
    let read = read(js, stream, subject).await?;
    let Some(sum) = read.by_subject.get(subject).filter(|_| read.messages > 1) else {
        return Ok(());
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        read.last_sequence.to_string().as_str(),
    );
    headers.insert(ROLLUP_HEADER, "1");
    let body = serde_json::to_vec(sum).map_err(nats("encode a roll-up of the books", stream))?;
    js.publish_with_headers(subject.to_string(), headers, body.into())
        .await
        .map_err(nats("roll up the books", stream))?
        .await
        .map_err(nats("roll up the books", stream))?;
    Ok(())
}
