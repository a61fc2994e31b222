//! Pulling from the unit's durable consumer: the loop that keeps up to `concurrency` items in
//! flight, gathers batches, holds messages delivered again until they can run alone, opens the pull
//! again when it is lost, and winds down on a stop.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use switchyard_crds::unit::{BatchConfig, ConsumerConfig};
use tokio::sync::watch;

use crate::lineage::names;

use super::input::{items_held, Work};
use super::worker::{ConsumeError, Output, Worker};

/// Back-off between attempts to open the unit's consumer.
pub(super) const REOPEN_FIRST: Duration = Duration::from_millis(100);
pub(super) const REOPEN_MAX: Duration = Duration::from_secs(10);
/// How long a stopping unit waits for its in-flight messages.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

pub(super) type PullStream = jetstream::consumer::pull::Stream;

/// The pull stream, and when to open it again after it was lost.
pub(super) struct Pull {
    pub(super) messages: Option<PullStream>,
    pub(super) reopen_at: tokio::time::Instant,
    /// Doubles with every failure to open, up to `REOPEN_MAX`.
    pub(super) reopen_delay: Duration,
}

impl Default for Pull {
    fn default() -> Self {
        Pull {
            messages: None,
            reopen_at: tokio::time::Instant::now(),
            reopen_delay: REOPEN_FIRST,
        }
    }
}

impl Pull {
    pub(super) fn opened(&mut self, messages: PullStream) {
        self.messages = Some(messages);
        self.reopen_delay = REOPEN_FIRST;
    }

    /// The stream failed (or could not be opened): try again after a growing delay.
    pub(super) fn lost(&mut self) {
        self.messages = None;
        self.reopen_at = tokio::time::Instant::now() + self.reopen_delay;
        self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
    }

    /// The stream ended (it expires now and then): open it again after the current delay.
    pub(super) fn ended(&mut self) {
        self.messages = None;
        self.reopen_at = tokio::time::Instant::now() + self.reopen_delay;
    }
}

/// Gathers messages into batches for a batch stage; hands single messages on otherwise.
pub(super) struct Batcher {
    pub(super) size: Option<usize>,
    pub(super) timeout: Duration,
    pub(super) pending: Vec<Message>,
    /// Items in the pending messages.
    pub(super) items: usize,
    /// When the pending batch goes, full or not.
    pub(super) deadline: tokio::time::Instant,
}

impl Batcher {
    pub(super) fn new(config: Option<BatchConfig>) -> Batcher {
        Batcher {
            size: config.map(|b| b.size.max(1) as usize),
            timeout: config
                .map(|b| Duration::from_millis(b.timeout_ms))
                .unwrap_or_default(),
            pending: Vec::new(),
            items: 0,
            deadline: tokio::time::Instant::now(),
        }
    }

    /// The work `message` completes, if any: itself, or a full batch. A replayed batch holds its
    /// batch already: it goes alone.
    pub(super) fn add(&mut self, message: Message) -> Option<Work> {
        let replayed = || {
            message
                .headers
                .as_ref()
                .is_some_and(|h| h.get(names::REPLAY_FOR).is_some())
        };
        let Some(size) = self.size.filter(|_| !replayed()) else {
            return Some(Work::One(message));
        };
        if self.pending.is_empty() {
            self.deadline = tokio::time::Instant::now() + self.timeout;
        }
        // A batch counts items: a frame is never split between batches, so one may hold a few more.
        self.items += items_held(&message);
        self.pending.push(message);
        (self.items >= size).then(|| Work::Batch(self.take()))
    }

    pub(super) fn take(&mut self) -> Vec<Message> {
        self.items = 0;
        std::mem::take(&mut self.pending)
    }

    /// The work of one message that runs alone: a batch of one for a batch stage.
    pub(super) fn alone(&self, message: Message) -> Work {
        let replayed = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(names::REPLAY_FOR).is_some());
        if self.size.is_some() && !replayed {
            Work::Batch(vec![message])
        } else {
            Work::One(message)
        }
    }
}

/// Messages delivered again, waiting to run alone, and the messages that wait until they have.
#[derive(Default)]
pub(super) struct Isolation {
    /// Delivered again: held by a process that died (perhaps because of one of them).
    pub(super) suspects: std::collections::VecDeque<Message>,
    /// First deliveries that came while suspects were waiting or running.
    pub(super) waiting: std::collections::VecDeque<Message>,
    /// A suspect is in flight, alone.
    pub(super) running: bool,
}

impl Isolation {
    /// True while nothing but suspects may start.
    pub(super) fn busy(&self) -> bool {
        self.running || !self.suspects.is_empty()
    }

    pub(super) fn queued(&self) -> usize {
        self.suspects.len() + self.waiting.len()
    }

    /// What may start now: the next suspect, alone, once nothing else is in flight; or, with no
    /// suspect left, the first deliveries that waited for them (as the batches they complete).
    fn ready(&mut self, batch: &mut Batcher, nothing_in_flight: bool) -> Vec<(Work, bool)> {
        if self.running {
            return Vec::new();
        }
        if !self.suspects.is_empty() {
            // Alone means alone: the suspect starts once everything else has finished.
            let suspect = nothing_in_flight
                .then(|| self.suspects.pop_front())
                .flatten();
            self.running = suspect.is_some();
            return suspect
                .map(|suspect| vec![(batch.alone(suspect), true)])
                .unwrap_or_default();
        }
        std::mem::take(&mut self.waiting)
            .into_iter()
            .filter_map(|message| batch.add(message).map(|work| (work, false)))
            .collect()
    }

    /// A message just pulled: held as a suspect if it was delivered before, kept waiting while
    /// suspects are, or added to the batch (the work it completes, if any).
    fn admit(&mut self, message: Message, batch: &mut Batcher) -> Option<Work> {
        if delivered_again(&message) {
            self.suspects.push_back(message);
            None
        } else if self.busy() {
            self.waiting.push_back(message);
            None
        } else {
            batch.add(message)
        }
    }
}

/// A message JetStream delivered before: its process died holding it, or its acknowledgement was lost.
pub(super) fn delivered_again(message: &Message) -> bool {
    message.info().is_ok_and(|info| info.delivered > 1)
}

/// The next message of the pull stream; never resolves while there is none.
pub(super) async fn next_message(
    messages: &mut Option<PullStream>,
) -> Option<Result<Message, jetstream::consumer::pull::MessagesError>> {
    match messages {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// Pulls and works until `shutdown`, then finishes what is in flight.
    pub async fn run(
        &self,
        consumer_config: &ConsumerConfig,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConsumeError> {
        let mut pull = Pull::default();
        let mut batch = Batcher::new(self.batch);
        let mut in_flight = FuturesUnordered::new();
        let mut isolation = Isolation::default();
        // Items in the work in flight.
        let mut held = 0usize;
        let start =
            |work: Work, alone: bool, held: &mut usize, in_flight: &mut FuturesUnordered<_>| {
                *held += work.items();
                in_flight.push(self.work(work, alone));
            };
        // Queued messages are not being worked on, but they must not be redelivered meanwhile.
        let mut queued_progress = tokio::time::interval(self.progress_every);
        queued_progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            for (work, alone) in isolation.ready(&mut batch, in_flight.is_empty()) {
                start(work, alone, &mut held, &mut in_flight);
            }
            self.reopen_when_due(&mut pull, consumer_config).await;
            // Concurrency counts items: a frame takes as much of it as the items it holds.
            let can_pull = pull.messages.is_some() && held + isolation.queued() < self.concurrency;
            tokio::select! {
                biased;
                _ = crate::shutdown::stopped(&mut shutdown) => break,
                Some((alone, items)) = in_flight.next(), if !in_flight.is_empty() => {
                    held -= items;
                    if alone {
                        isolation.running = false;
                    }
                }
                _ = tokio::time::sleep_until(batch.deadline), if !batch.pending.is_empty() && !isolation.busy() => {
                    start(Work::Batch(batch.take()), false, &mut held, &mut in_flight);
                }
                _ = queued_progress.tick(), if isolation.queued() > 0 => {
                    for m in isolation.suspects.iter().chain(&isolation.waiting) {
                        let _ = Box::pin(m.ack_with(AckKind::Progress)).await;
                    }
                }
                _ = tokio::time::sleep_until(pull.reopen_at), if pull.messages.is_none() => {}
                next = next_message(&mut pull.messages), if can_pull => match next {
                    Some(Ok(message)) => {
                        if let Some(work) = isolation.admit(message, &mut batch) {
                            start(work, false, &mut held, &mut in_flight);
                        }
                    }
                    Some(Err(e)) => {
                        // Covers the consumer being deleted or lost with a server restart: open it again
                        // (re-creating it if needed) instead of waiting on a pull that will never answer.
                        tracing::warn!("pulling from consumer {} failed: {e}; reopening it", consumer_config.durable);
                        pull.lost();
                    }
                    None => pull.ended(),
                },
            }
        }
        // Handed back at once, for another replica (or the next process) to take.
        for m in isolation.suspects.iter().chain(&isolation.waiting) {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        self.wind_down(pull, batch, in_flight).await;
        Ok(())
    }

    /// Opens the pull again once it is lost and its delay has passed.
    async fn reopen_when_due(&self, pull: &mut Pull, consumer_config: &ConsumerConfig) {
        if pull.messages.is_some() || tokio::time::Instant::now() < pull.reopen_at {
            return;
        }
        match self.open(consumer_config).await {
            Ok(messages) => {
                pull.opened(messages);
                self.stats
                    .ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("{e}; trying again in {:?}", pull.reopen_delay);
                pull.lost();
            }
        }
    }

    /// Stops pulling, hands back what was fetched but not started (so other replicas get it now
    /// rather than after the acknowledgement deadline), and finishes what is in flight.
    pub(super) async fn wind_down<F: Future<Output = (bool, usize)>>(
        &self,
        mut pull: Pull,
        mut batch: Batcher,
        mut in_flight: FuturesUnordered<F>,
    ) {
        if let Some(mut stream) = pull.messages.take() {
            while let Some(Some(Ok(message))) = futures::FutureExt::now_or_never(stream.next()) {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
        let last_batch = async {
            if !batch.pending.is_empty() {
                self.work(Work::Batch(batch.take()), false).await;
            }
        };
        let rest = async { while in_flight.next().await.is_some() {} };
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            tokio::join!(last_batch, rest);
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "{} messages were still in flight after {DRAIN_TIMEOUT:?}; they will be redelivered",
                in_flight.len()
            );
        }
        if let Output::Sink { sink, .. } = &self.output {
            sink.flush().await;
        }
    }

    /// Opens the unit's consumer, creating it when it is missing (a NATS server that lost its state).
    pub(super) async fn open(&self, config: &ConsumerConfig) -> Result<PullStream, ConsumeError> {
        let stream =
            self.js
                .get_stream(&self.stream)
                .await
                .map_err(|source| ConsumeError::Stream {
                    stream: self.stream.clone(),
                    source,
                })?;
        let consumer: PullConsumer = match stream.get_consumer(&config.durable).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(
                    "consumer {} is not there ({e}); creating it",
                    config.durable
                );
                stream
                    .create_consumer(switchyard_platform::admin::consumer_config(config))
                    .await
                    .map_err(|source| ConsumeError::CreateConsumer {
                        durable: config.durable.clone(),
                        source,
                    })?
            }
        };
        consumer
            .stream()
            .max_messages_per_batch(config.pull_batch.max(1))
            .expires(Duration::from_secs(30))
            // A pull request lost with its consumer's leader (a NATS node that died or hung) shows as
            // two missed heartbeats: 4 s without messages, rather than 10 s at 5 s.
            .heartbeat(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|source| ConsumeError::Pull {
                durable: config.durable.clone(),
                source,
            })
    }
}
