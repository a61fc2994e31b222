//! Reading a stream without taking part in it: an ordered consumer of one's own, with no
//! acknowledgements, that the server drops when it goes away.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use crate::target::OpsError;

/// What is on `subjects` of `stream` now, in stream order, from `start`; at most `limit` messages.
pub async fn stored(
    js: &jetstream::Context,
    stream: &str,
    subjects: &[String],
    start: consumer::DeliverPolicy,
    limit: usize,
) -> Result<Vec<jetstream::Message>, OpsError> {
    let mut reader = Stored::open(js, stream, subjects, start).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        match reader.next().await? {
            Some(message) => out.push(message),
            None => break,
        }
    }
    Ok(out)
}

/// What is on some subjects of a stream now, read one message at a time, so that a queue of
/// millions is never held at once. It ends with the last message stored when it was opened.
pub struct Stored {
    stream: String,
    messages: Option<Ordered>,
    /// The stream's last sequence when it was opened: what is stored later (a dead letter that a
    /// removal stored again, say) is not read.
    last: u64,
}

impl Stored {
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        subjects: &[String],
        start: consumer::DeliverPolicy,
    ) -> Result<Stored, OpsError> {
        let Opened {
            messages,
            pending,
            last,
        } = open(js, stream, subjects, start).await?;
        Ok(Stored {
            stream: stream.to_string(),
            messages: (pending > 0).then_some(messages),
            last,
        })
    }

    /// The next message, or None at the end.
    pub async fn next(&mut self) -> Result<Option<jetstream::Message>, OpsError> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let message = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                self.messages = None;
                return Err(OpsError::nats(format!("read {}", self.stream))(e));
            }
            // What was there was taken (a replay, a purge) while it was being read: the end.
            Ok(None) | Err(_) => {
                self.messages = None;
                return Ok(None);
            }
        };
        let (seq, pending) = message
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .unwrap_or((0, 0));
        if seq > self.last {
            self.messages = None;
            return Ok(None);
        }
        if pending == 0 || seq == self.last {
            self.messages = None;
        }
        Ok(Some(message))
    }
}

pub type Ordered = jetstream::consumer::pull::Ordered;

/// An ordered consumer on some subjects of a stream.
pub struct Opened {
    pub messages: Ordered,
    /// How many messages it has to deliver right now.
    pub pending: u64,
    /// The stream's last sequence just before the consumer was made.
    pub last: u64,
}

/// An ordered consumer on `subjects` of `stream`, from `start`.
pub async fn open(
    js: &jetstream::Context,
    stream: &str,
    subjects: &[String],
    start: consumer::DeliverPolicy,
) -> Result<Opened, OpsError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(OpsError::nats(format!("open stream {stream}")))?;
    let last = handle.cached_info().state.last_sequence;
    let (filter_subject, filter_subjects) = match subjects {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    let mut consumer = handle
        .create_consumer(consumer::pull::OrderedConfig {
            description: Some("switchyard day-2 reader".to_string()),
            filter_subject,
            filter_subjects,
            deliver_policy: start,
            ..Default::default()
        })
        .await
        .map_err(OpsError::nats(format!("read stream {stream}")))?;
    let pending = consumer
        .info()
        .await
        .map_err(OpsError::nats(format!("read stream {stream}")))?
        .num_pending;
    let messages = consumer
        .messages()
        .await
        .map_err(OpsError::nats(format!("read stream {stream}")))?;
    Ok(Opened {
        messages,
        pending,
        last,
    })
}

/// A header of a stored message, or "".
pub fn header(message: &jetstream::Message, name: &str) -> String {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

/// When the stream stored it, in milliseconds since the Unix epoch.
pub fn stored_at_ms(message: &jetstream::Message) -> i64 {
    message
        .info()
        .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// A payload as JSON: itself when it is JSON, a string otherwise.
pub fn data(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    })
}
