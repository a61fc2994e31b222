//! One input (or batch) from start to acknowledgement: worked on, its books recorded, then
//! acknowledged, or handed back on a failure; progress acknowledgements while it runs long.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use switchyard_crds::books::Counts;
use switchyard_platform::frame;

use crate::crashes::Verdict;
use crate::lineage::{names, Replay};
use crate::stats::Stats;

use super::input::Work;
use super::worker::{ConsumeError, Output, Worker};

/// The last token of a subject: a unit's output subject's names the unit and its epoch.
pub(super) fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

impl Worker {
    /// Works on one input (or batch) and acknowledges it. `alone`: a message delivered again, run
    /// with nothing beside it after its crash record is written (see `crashes`). Returns `alone`.
    pub(super) async fn work(&self, work: Work, alone: bool) -> (bool, usize) {
        let messages: &[Message] = match &work {
            Work::One(m) => std::slice::from_ref(m),
            Work::Batch(ms) => ms,
        };
        let items = work.items();
        if self.let_replay_pass(&work).await {
            return (alone, items);
        }
        let recorded_seq = alone
            .then(|| messages.first().and_then(|m| m.info().ok()))
            .flatten()
            .map(|info| info.stream_sequence);
        Stats::add(&self.stats.in_flight, items as u64);
        // The work is pinned here and lent to `with_progress`: handed over by value, it would be
        // stored twice in this future (rust-lang/rust#62958), and every message's future is moved
        // into the in-flight set as it starts, so its size is copied per message.
        let result = {
            let recorded = async {
                let counts = self.process_work(&work, recorded_seq).await?;
                self.record_books(messages, &counts).await?;
                Ok::<_, ConsumeError>(counts.iter().map(|c| c.received).sum::<u64>())
            };
            tokio::pin!(recorded);
            self.with_progress(messages, recorded).await
        };
        self.acknowledge(messages, result).await;
        if let Some(seq) = recorded_seq {
            // Finished, or handed back: either way the process did not die on it. (Should it die
            // right here, the record outlives a message that is done, which is never delivered again.)
            if let Err(e) = Box::pin(self.crashes.forget(seq)).await {
                tracing::warn!("{e}; should the message come again, a crash it did not cause counts against it");
            }
        }
        self.stats
            .in_flight
            .fetch_sub(items as u64, std::sync::atomic::Ordering::Relaxed);
        (alone, items)
    }

    /// A dead letter replayed for another unit that reads the same subject: acknowledged, nothing
    /// else. True when it was one.
    async fn let_replay_pass(&self, work: &Work) -> bool {
        let Work::One(message) = work else {
            return false;
        };
        if Replay::of(message.headers.as_ref()).is_none_or(|r| r.unit == self.unit) {
            return false;
        }
        // Put back on a subject this unit reads for the one unit that failed it.
        if let Err(e) = message.ack().await {
            tracing::debug!("cannot acknowledge another unit's replay: {e}");
        }
        true
    }

    /// Runs the work's items and stores what they made: a frame delivered again item by item, a
    /// message or batch as its crash record says (`recorded_seq`: it runs alone). The books of
    /// each message.
    async fn process_work(
        &self,
        work: &Work,
        recorded_seq: Option<u64>,
    ) -> Result<Vec<Counts>, ConsumeError> {
        if let (Work::One(m), Some(seq)) = (work, recorded_seq) {
            if frame::frame_count(m.headers.as_ref()).is_some() {
                return self.process_suspect_frame(m, seq).await.map(|c| vec![c]);
            }
        }
        let verdict = match recorded_seq {
            Some(seq) => Box::pin(self.crashes.before_running_alone(seq)).await?,
            None => Verdict::Run { crashes: 0 },
        };
        match (work, verdict) {
            (Work::Batch(ms), Verdict::Run { .. }) => self.process_batch(ms).await,
            // A suspect of a batch stage is a batch of one.
            (Work::Batch(ms), dead @ Verdict::DeadLetter { .. }) => match ms.first() {
                Some(m) => self.process_message(m, dead).await.map(|c| vec![c]),
                None => Ok(Vec::new()),
            },
            (Work::One(m), verdict) => self.process_message(m, verdict).await.map(|c| vec![c]),
        }
    }

    /// Acknowledges the messages once what they made is stored (`result`: their items), or hands
    /// them back to be delivered again.
    async fn acknowledge(&self, messages: &[Message], result: Result<u64, ConsumeError>) {
        match result {
            Ok(items) => {
                if crate::faults::due() {
                    crate::faults::kill();
                }
                for m in messages {
                    if let Err(e) = m.ack().await {
                        tracing::warn!("cannot acknowledge a message: {e}; it will be redelivered and de-duplicated");
                    }
                }
                Stats::add(&self.stats.processed, items);
                Stats::add(&self.stats.messages, messages.len() as u64);
            }
            Err(e) => {
                if let ConsumeError::Held(why) = &e {
                    tracing::debug!("{why}");
                } else {
                    tracing::warn!("{e}; the input will be delivered again");
                }
                for m in messages {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    }

    /// Records what became of each message's items (`books`) and waits until the stream has every
    /// record: only then may the messages be acknowledged.
    pub(super) async fn record_books(
        &self,
        messages: &[Message],
        counts: &[Counts],
    ) -> Result<(), ConsumeError> {
        let Some(books) = &self.books else {
            return Ok(());
        };
        let to = match &self.output {
            Output::Publish(subject) => last_token(subject),
            Output::Sink { .. } => "",
        };
        let records = messages.iter().zip(counts).map(|(message, counts)| {
            let key = match message.headers.as_ref().and_then(|h| h.get(names::MSG_ID)) {
                Some(id) => id.as_str().to_string(),
                None => {
                    let seq = message.info().map_or(0, |i| i.stream_sequence);
                    format!("{}:{seq}", self.stream)
                }
            };
            let from = if Replay::of(message.headers.as_ref()).is_some() {
                switchyard_crds::books::FROM_REPLAY
            } else {
                // `<prefix>.data.<unit>[_<epoch>]`: the subject's own token.
                last_token(&message.subject)
            };
            let route = switchyard_crds::books::route(from, to);
            async move { books.record(&key, route, *counts).await }
        });
        for recorded in futures::future::join_all(records).await {
            recorded?;
        }
        Ok(())
    }

    pub(super) async fn with_progress<F: Future>(
        &self,
        messages: &[Message],
        work: F,
    ) -> F::Output {
        tokio::pin!(work);
        let beat = tokio::time::sleep(self.progress_every);
        tokio::pin!(beat);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = &mut beat => {
                    for m in messages {
                        // Boxed: this runs once in `progress_every`, and an acknowledgement's future
                        // would otherwise add its size to every message's future.
                        let _ = Box::pin(m.ack_with(AckKind::Progress)).await;
                    }
                    beat.as_mut().reset(tokio::time::Instant::now() + self.progress_every);
                }
            }
        }
    }
}
