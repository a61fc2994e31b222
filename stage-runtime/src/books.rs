//! This process's part of the Pipeline's books (`switchyard_crds::books`): one record per input
//! message it finished (per message stored, for a source), stored before the input is acknowledged
//! (before the checkpoint moves), under an id taken from the message's, so that JetStream keeps one
//! however often the message comes. Records go on a subject of this process's own, which it rolls
//! up into one message now and then and as it stops; the records summed go once they are older than
//! the stream's duplicate window (`switchyard_platform::books::roll_up`), so the books stay a roll-up
//! and a window's records per process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishError};
use async_nats::{HeaderMap, Subject};
use switchyard_crds::books::{Counts, Record};
use switchyard_crds::unit::headers as names;

use crate::acks::Disconnects;

/// Records since the last roll-up that make one due at once.
const ROLL_UP_AFTER: u64 = 5_000;
/// A roll-up of whatever came since is due this often.
const ROLL_UP_EVERY: Duration = Duration::from_secs(30);
/// A roll-up that finds another stored since it read tries again this often, at most.
const ROLL_UP_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BooksError {
    #[error("cannot record the books on {subject}: {source}")]
    Publish {
        subject: String,
        source: PublishError,
    },
    #[error("the books' record on {subject} was not acknowledged: {source}")]
    Unacknowledged {
        subject: String,
        source: PublishError,
    },
    #[error(transparent)]
    ConnectionLost(#[from] crate::acks::ConnectionLost),
}

/// Where this process records what it did.
pub struct Ledger {
    js: jetstream::Context,
    stream: String,
    subject: Subject,
    unit: String,
    disconnects: Disconnects,
    since_roll_up: AtomicU64,
}

impl Ledger {
    /// The ledger of `replica` of `unit`, on `<prefix>.<replica>` of `stream`.
    pub fn new(
        js: jetstream::Context,
        stream: String,
        prefix: &str,
        unit: &str,
        replica: &str,
        disconnects: Disconnects,
    ) -> Ledger {
        Ledger {
            js,
            stream,
            subject: format!("{prefix}.{}", subject_token(replica)).into(),
            unit: unit.to_string(),
            disconnects,
            since_roll_up: AtomicU64::new(0),
        }
    }

    /// Sends the record of the message `key` (its id), whose items took `route`
    /// (`switchyard_crds::books::route`).
    async fn send(
        &self,
        key: &str,
        route: String,
        counts: Counts,
    ) -> Result<PublishAckFuture, BooksError> {
        let record = Record::from([(route, counts)]);
        // A map of strings to numbers always encodes.
        let body = serde_json::to_vec(&record).unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert(names::MSG_ID, format!("{}/{key}", self.unit).as_str());
        let message = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(body.into());
        let ack = self
            .js
            .send_publish(self.subject.clone(), message)
            .await
            .map_err(|source| BooksError::Publish {
                subject: self.subject.to_string(),
                source,
            })?;
        self.since_roll_up.fetch_add(1, Ordering::Relaxed);
        Ok(ack)
    }

    /// Records what became of the message `key` and waits until the stream has it (or had it).
    pub async fn record(&self, key: &str, route: String, counts: Counts) -> Result<(), BooksError> {
        let epoch = *self.disconnects.borrow();
        let ack = self.send(key, route, counts).await?;
        crate::acks::acknowledged(ack, epoch, &self.disconnects)
            .await?
            .map_err(|source| BooksError::Unacknowledged {
                subject: self.subject.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Sums this process's records into its roll-up. A record on its way meanwhile is summed by the
    /// next one.
    pub async fn roll_up(&self) -> Result<(), switchyard_platform::books::BooksError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match switchyard_platform::books::roll_up(&self.js, &self.stream, &self.subject).await {
                Ok(rolled) => {
                    // It may have summed records an earlier process left on this subject too.
                    let summed = rolled.summed as u64;
                    let _ = self.since_roll_up.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |n| Some(n.saturating_sub(summed)),
                    );
                    return Ok(());
                }
                // Another roll-up of this subject was stored since the read: read again.
                Err(e) if attempt < ROLL_UP_ATTEMPTS => {
                    tracing::debug!("roll-up of {} tried again: {e}", self.subject);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Rolls up every `ROLL_UP_EVERY`, or sooner after `ROLL_UP_AFTER` records, until dropped.
    pub fn spawn_roll_ups(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut since = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let records = self.since_roll_up.load(Ordering::Relaxed);
                if records == 0 || (records < ROLL_UP_AFTER && since.elapsed() < ROLL_UP_EVERY) {
                    continue;
                }
                if let Err(e) = self.roll_up().await {
                    // The records stay; the books read the same, from more messages.
                    tracing::warn!("cannot roll up the books on {}: {e}", self.subject);
                }
                since = tokio::time::Instant::now();
            }
        })
    }
}

/// A replica's name as one subject token: pod names and process ids already are; anything else
/// loses the characters a token cannot hold.
fn subject_token(replica: &str) -> String {
    let token: String = replica
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' | ' ' | '\t' | '\r' | '\n' => '_',
            c => c,
        })
        .collect();
    if token.is_empty() {
        "_".to_string()
    } else {
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_name_becomes_one_subject_token() {
        assert_eq!(
            subject_token("laundry-wash-7d9f-x2"),
            "laundry-wash-7d9f-x2"
        );
        assert_eq!(subject_token("host.example.com"), "host_example_com");
        assert_eq!(subject_token("a b>*"), "a_b__");
        assert_eq!(subject_token(""), "_");
    }
}
