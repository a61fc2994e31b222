//! Units that read: process units (steps, then publish downstream) and sinks (write out).
//!
//! One task pulls from the unit's durable consumer and keeps up to `concurrency` inputs in flight. Each
//! input runs through the steps; its outputs are published with ids derived from the input's id; the
//! input is acknowledged only once every output (and every dead letter) is stored.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use async_nats::Subject;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use switchyard_crds::unit::{BatchConfig, ConsumerConfig, RetryConfig};
use tokio::sync::watch;

use crate::crashes::{CrashRecordError, CrashRecords, Verdict};
use crate::lineage::{dead_letter_headers, names, owned_header_value, Lineage, Replay};
use crate::otlp::{ItemSpan, Spans};
use crate::payload::Payload;

use crate::sinks::{Sink, Written};
use crate::stats::Stats;
use crate::steps::{Failure, Step, StepFailure};
use crate::trace::{Began, Done, Tracer};
use opentelemetry::trace::SpanKind;
use switchyard_crds::unit::TraceOutcome;

/// Where a unit's results go.
pub enum Output {
    /// Published to the unit's output subject, for the units downstream.
    Publish(Subject),
    /// Written by a sink, retried per `retry` before being dead-lettered.
    Sink {
        sink: Box<dyn Sink>,
        retry: RetryConfig,
    },
}

/// Why a unit could not read its input or store what it made of it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot open stream {stream}: {source}")]
    Stream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create consumer {durable}: {source}")]
    CreateConsumer {
        durable: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot pull from consumer {durable}: {source}")]
    Pull {
        durable: String,
        source: jetstream::consumer::StreamError,
    },
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        subject: Subject,
        source: jetstream::context::PublishError,
    },
    #[error("a publish was not acknowledged by JetStream: {0}")]
    Unacknowledged(jetstream::context::PublishError),
    #[error(transparent)]
    ConnectionLost(#[from] crate::acks::ConnectionLost),
    #[error(transparent)]
    CrashRecord(#[from] CrashRecordError),
}

pub struct Worker {
    pub unit: String,
    pub stream: String,
    pub js: jetstream::Context,
    pub steps: Vec<Step>,
    pub output: Output,
    pub dead_letter_subject: Subject,
    pub stats: Arc<Stats>,
    pub batch: Option<BatchConfig>,
    /// Inputs (for a batch stage: batches) in flight at once.
    pub concurrency: usize,
    /// Messages held longer than this get a progress acknowledgement, so JetStream does not redeliver
    /// them while they are still being worked on.
    pub progress_every: Duration,
    /// The largest message the NATS server takes, headers included.
    pub max_payload: usize,
    /// Lost connections so far: see `acks`.
    pub disconnects: crate::Disconnects,
    /// Records what becomes of sampled items, when the Pipeline traces.
    pub tracer: Option<Tracer>,
    /// Exports spans over OTLP, when the environment asks for it.
    pub spans: Option<Spans>,
    /// Where a message delivered again is recorded while it runs alone: see `crashes`.
    pub crashes: CrashRecords,
}

/// What storing one input's results came to, for its trace event.
#[derive(Clone, Default)]
struct Emitted {
    /// Published downstream, or written by the sink.
    stored: u64,
    duplicates: u64,
    /// The first dead letter's stage and error, and the most attempts any failure took.
    dead: Option<(String, String)>,
    attempts: u32,
}

impl Emitted {
    fn done(self, sink: bool, deliveries: u64) -> Done {
        let outcome = match (&self.dead, sink) {
            (Some(_), _) => TraceOutcome::DeadLettered,
            (None, true) if self.stored == 0 && self.duplicates > 0 => TraceOutcome::Duplicate,
            (None, true) => TraceOutcome::Written,
            (None, false) => TraceOutcome::Published,
        };
        let (stage, error) = self.dead.unzip();
        Done {
            outcome,
            outputs: self.stored,
            deliveries,
            attempts: self.attempts.max(1),
            error,
            stage,
        }
    }
}

/// Room left for a message's headers when its payload is measured against the server's limit.
const HEADERS_ROOM: usize = 4096;

/// Work for one future: a single input, or a batch of them.
// The single message is the hot path: keep it inline rather than boxing it per message.
#[allow(clippy::large_enum_variant)]
enum Work {
    One(Message),
    Batch(Vec<Message>),
}

/// The publishes of one input awaiting their acknowledgements, and the disconnect count when the input
/// began: a connection lost since then took their acknowledgements with it.
struct Pending {
    acks: Vec<jetstream::context::PublishAckFuture>,
    epoch: u64,
}

/// Publishes outstanding at once for one input; more fan-out than this waits for the first acks.
const PUBLISH_WINDOW: usize = 256;
/// Back-off between attempts to open the unit's consumer.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(10);
/// How long a stopping unit waits for its in-flight messages.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

type PullStream = jetstream::consumer::pull::Stream;

/// The pull stream, and when to open it again after it was lost.
struct Pull {
    messages: Option<PullStream>,
    reopen_at: tokio::time::Instant,
    /// Doubles with every failure to open, up to `REOPEN_MAX`.
    reopen_delay: Duration,
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
    fn opened(&mut self, messages: PullStream) {
        self.messages = Some(messages);
        self.reopen_delay = REOPEN_FIRST;
    }

    /// The stream failed (or could not be opened): try again after a growing delay.
    fn lost(&mut self) {
        self.messages = None;
        self.reopen_at = tokio::time::Instant::now() + self.reopen_delay;
        self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
    }

    /// The stream ended (it expires now and then): open it again after the current delay.
    fn ended(&mut self) {
        self.messages = None;
        self.reopen_at = tokio::time::Instant::now() + self.reopen_delay;
    }
}

/// Gathers messages into batches for a batch stage; hands single messages on otherwise.
struct Batcher {
    size: Option<usize>,
    timeout: Duration,
    pending: Vec<Message>,
    /// When the pending batch goes, full or not.
    deadline: tokio::time::Instant,
}

impl Batcher {
    fn new(config: Option<BatchConfig>) -> Batcher {
        Batcher {
            size: config.map(|b| b.size.max(1) as usize),
            timeout: config
                .map(|b| Duration::from_millis(b.timeout_ms))
                .unwrap_or_default(),
            pending: Vec::new(),
            deadline: tokio::time::Instant::now(),
        }
    }

    /// The work `message` completes, if any: itself, or a full batch. A replayed batch holds its
    /// batch already: it goes alone.
    fn add(&mut self, message: Message) -> Option<Work> {
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
        self.pending.push(message);
        (self.pending.len() >= size).then(|| Work::Batch(self.take()))
    }

    fn take(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.pending)
    }

    /// The work of one message that runs alone: a batch of one for a batch stage.
    fn alone(&self, message: Message) -> Work {
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
struct Isolation {
    /// Delivered again: held by a process that died (perhaps because of one of them).
    suspects: std::collections::VecDeque<Message>,
    /// First deliveries that came while suspects were waiting or running.
    waiting: std::collections::VecDeque<Message>,
    /// A suspect is in flight, alone.
    running: bool,
}

impl Isolation {
    /// True while nothing but suspects may start.
    fn busy(&self) -> bool {
        self.running || !self.suspects.is_empty()
    }

    fn queued(&self) -> usize {
        self.suspects.len() + self.waiting.len()
    }
}

/// A message JetStream delivered before: its process died holding it, or its acknowledgement was lost.
fn delivered_again(message: &Message) -> bool {
    message.info().is_ok_and(|info| info.delivered > 1)
}

/// The next message of the pull stream; never resolves while there is none.
async fn next_message(
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
        // Queued messages are not being worked on, but they must not be redelivered meanwhile.
        let mut queued_progress = tokio::time::interval(self.progress_every);
        queued_progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !isolation.running {
                if !isolation.suspects.is_empty() {
                    // Alone means alone: the suspect starts once everything else has finished.
                    if in_flight.is_empty() {
                        if let Some(suspect) = isolation.suspects.pop_front() {
                            isolation.running = true;
                            in_flight.push(self.work(batch.alone(suspect), true));
                        }
                    }
                } else {
                    while let Some(message) = isolation.waiting.pop_front() {
                        if let Some(work) = batch.add(message) {
                            in_flight.push(self.work(work, false));
                        }
                    }
                }
            }
            if pull.messages.is_none() && tokio::time::Instant::now() >= pull.reopen_at {
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
            let can_pull =
                pull.messages.is_some() && in_flight.len() + isolation.queued() < self.concurrency;
            tokio::select! {
                biased;
                _ = crate::stopped(&mut shutdown) => break,
                Some(alone) = in_flight.next(), if !in_flight.is_empty() => {
                    if alone {
                        isolation.running = false;
                    }
                }
                _ = tokio::time::sleep_until(batch.deadline), if !batch.pending.is_empty() && !isolation.busy() => {
                    in_flight.push(self.work(Work::Batch(batch.take()), false));
                }
                _ = queued_progress.tick(), if isolation.queued() > 0 => {
                    for m in isolation.suspects.iter().chain(&isolation.waiting) {
                        let _ = Box::pin(m.ack_with(AckKind::Progress)).await;
                    }
                }
                _ = tokio::time::sleep_until(pull.reopen_at), if pull.messages.is_none() => {}
                next = next_message(&mut pull.messages), if can_pull => match next {
                    Some(Ok(message)) => {
                        if delivered_again(&message) {
                            isolation.suspects.push_back(message);
                        } else if isolation.busy() {
                            isolation.waiting.push_back(message);
                        } else if let Some(work) = batch.add(message) {
                            in_flight.push(self.work(work, false));
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

    /// Stops pulling, hands back what was fetched but not started (so other replicas get it now
    /// rather than after the acknowledgement deadline), and finishes what is in flight.
    async fn wind_down<F: Future<Output = bool>>(
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
    async fn open(&self, config: &ConsumerConfig) -> Result<PullStream, ConsumeError> {
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

    /// Works on one input (or batch) and acknowledges it. `alone`: a message delivered again, run
    /// with nothing beside it after its crash record is written (see `crashes`). Returns `alone`.
    async fn work(&self, work: Work, alone: bool) -> bool {
        let messages: &[Message] = match &work {
            Work::One(m) => std::slice::from_ref(m),
            Work::Batch(ms) => ms,
        };
        let count = messages.len() as u64;
        if let Work::One(message) = &work {
            if Replay::of(message.headers.as_ref()).is_some_and(|r| r.unit != self.unit) {
                // Put back on a subject this unit reads for the one unit that failed it.
                if let Err(e) = message.ack().await {
                    tracing::debug!("cannot acknowledge another unit's replay: {e}");
                }
                return alone;
            }
        }
        let recorded_seq = alone
            .then(|| messages.first().and_then(|m| m.info().ok()))
            .flatten()
            .map(|info| info.stream_sequence);
        Stats::add(&self.stats.in_flight, count);
        // The work is pinned here and lent to `with_progress`: handed over by value, it would be
        // stored twice in this future (rust-lang/rust#62958), and every message's future is moved
        // into the in-flight set as it starts, so its size is copied per message.
        let result = {
            let processing = async {
                let verdict = match recorded_seq {
                    Some(seq) => Box::pin(self.crashes.before_running_alone(seq)).await?,
                    None => Verdict::Run { crashes: 0 },
                };
                match (&work, verdict) {
                    (Work::Batch(ms), Verdict::Run { .. }) => self.process_batch(ms).await,
                    // A suspect of a batch stage is a batch of one.
                    (Work::Batch(ms), dead @ Verdict::DeadLetter { .. }) => match ms.first() {
                        Some(m) => self.process_one(m, dead).await,
                        None => Ok(()),
                    },
                    (Work::One(m), verdict) => self.process_one(m, verdict).await,
                }
            };
            tokio::pin!(processing);
            self.with_progress(messages, processing).await
        };
        match result {
            Ok(()) => {
                for m in messages {
                    if let Err(e) = m.ack().await {
                        tracing::warn!("cannot acknowledge a message: {e}; it will be redelivered and de-duplicated");
                    }
                }
                Stats::add(&self.stats.processed, count);
            }
            Err(e) => {
                tracing::warn!("{e}; the input will be delivered again");
                for m in messages {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
        if let Some(seq) = recorded_seq {
            // Finished, or handed back: either way the process did not die on it. (Should it die
            // right here, the record outlives a message that is done, which is never delivered again.)
            if let Err(e) = Box::pin(self.crashes.forget(seq)).await {
                tracing::warn!("{e}; should the message come again, a crash it did not cause counts against it");
            }
        }
        self.stats
            .in_flight
            .fetch_sub(count, std::sync::atomic::Ordering::Relaxed);
        alone
    }

    /// The dead letter of a message that crashed its unit's process `crashes` times when it ran alone.
    fn crashed_it(&self, item: Payload, crashes: u32, delivered: u64) -> StepFailure {
        let how_often = match crashes {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        StepFailure {
            stage: self.unit.clone(),
            step_index: 0,
            item_index: 0,
            replay_step: 0,
            failure: Failure {
                item,
                error: format!(
                    "the unit's process died {how_often} while it worked on this message alone (each time after it was delivered again): it probably crashes on it; spec.deadLetter.afterCrashes is the limit"
                ),
                // Attempts stay within what the unit's retry allows; the deliveries say the rest.
                attempts: crashes.min(self.allowed_attempts()),
                deliveries: Some(delivered),
            },
        }
    }

    async fn with_progress<F: Future>(&self, messages: &[Message], work: F) -> F::Output {
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

    async fn process_one(&self, message: &Message, verdict: Verdict) -> Result<(), ConsumeError> {
        let (stream_seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered.max(1) as u64),
            Err(_) => (0, 1),
        };
        let lineage = Lineage::from_headers(message.headers.as_ref(), &self.stream, stream_seq);
        let began = self.tracing(&lineage).then(Began::now);
        let (carried, span) = self.begin_span(&lineage, &[]);
        let carried = carried.as_ref().unwrap_or(&lineage);
        let input = Payload::Bytes(message.payload.clone());
        let emitted = if let Verdict::DeadLetter { crashes } = verdict {
            let crashed = self.crashed_it(input, crashes, delivered);
            self.emit(carried, Vec::new(), vec![crashed]).await?
        } else {
            let first = Replay::of(message.headers.as_ref()).map_or(0, |r| r.step);
            let chained =
                crate::steps::run_chain_from(&self.steps, first, input.clone(), carried).await;
            let (outputs, failures) = self.oversized_to_dead_letters(input, chained);
            self.emit(carried, outputs, failures).await?
        };
        if began.is_some() || span.is_some() {
            let done = emitted.done(self.is_sink(), delivered);
            if let Some(span) = span {
                span.end(&done);
            }
            if let (Some(began), Some(tracer)) = (began, &self.tracer) {
                tracer.record(&lineage, began, done).await;
            }
        }
        Ok(())
    }

    /// The item's span in this unit, when it gets one, and the lineage its outputs then carry.
    fn begin_span(
        &self,
        lineage: &Lineage,
        also: &[&Lineage],
    ) -> (Option<Lineage>, Option<ItemSpan>) {
        let kind = if self.is_sink() {
            SpanKind::Consumer
        } else {
            SpanKind::Internal
        };
        match self
            .spans
            .as_ref()
            .and_then(|s| s.begin(lineage, kind, SystemTime::now(), also))
        {
            Some((carried, span)) => (Some(carried), Some(span)),
            None => (None, None),
        }
    }

    /// Whether this item's events are recorded.
    fn tracing(&self, lineage: &Lineage) -> bool {
        self.tracer.as_ref().is_some_and(|t| t.samples(lineage))
    }

    fn is_sink(&self) -> bool {
        matches!(self.output, Output::Sink { .. })
    }

    /// The most attempts a message gets in this unit: its steps' (or its sink's) `retry.maxAttempts`.
    fn allowed_attempts(&self) -> u32 {
        match &self.output {
            Output::Sink { retry, .. } => retry.max_attempts,
            Output::Publish(_) => self.steps.iter().map(Step::max_attempts).max().unwrap_or(1),
        }
    }

    /// An output the server cannot take would fail its publish on every delivery: its input goes to
    /// the dead-letter subject at once instead, with the sizes.
    fn oversized_to_dead_letters(
        &self,
        input: Payload,
        chained: crate::steps::Chained,
    ) -> (Vec<Payload>, Vec<StepFailure>) {
        let mut failures = chained.failures;
        if !matches!(self.output, Output::Publish(_)) {
            return (chained.outputs, failures);
        }
        let limit = self.max_payload.saturating_sub(HEADERS_ROOM);
        let outputs: Vec<Payload> = chained
            .outputs
            .into_iter()
            .map(|p| Payload::Bytes(p.into_bytes()))
            .collect();
        let Some(size) = outputs.iter().map(Payload::size).find(|&n| n > limit) else {
            return (outputs, failures);
        };
        failures.push(StepFailure {
            stage: self
                .steps
                .last()
                .map_or_else(|| self.unit.clone(), |s| s.path.clone()),
            step_index: self.steps.len(),
            item_index: 0,
            replay_step: 0,
            failure: Failure {
                item: input,
                error: format!(
                    "an output of {size} bytes is larger than the {} bytes the NATS server takes in one message (its max_payload, less {HEADERS_ROOM} for headers): the input is dead-lettered instead",
                    self.max_payload
                ),
                attempts: 1,
                deliveries: None,
            },
        });
        (Vec::new(), failures)
    }

    /// A batch is one JSON array of its messages; it carries the first message's ancestry.
    async fn process_batch(&self, messages: &[Message]) -> Result<(), ConsumeError> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        let stream_seq = first.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut lineage = Lineage::from_headers(first.headers.as_ref(), &self.stream, stream_seq);
        lineage.id = format!("{}*{}", lineage.id, messages.len());
        let mut array =
            Vec::with_capacity(messages.iter().map(|m| m.payload.len() + 1).sum::<usize>() + 2);
        array.push(b'[');
        for (i, m) in messages.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            crate::payload::write_bytes_as_json(&m.payload, &mut array);
        }
        array.push(b']');
        let input = Payload::Bytes(array.into());
        let began = Began::now();
        let members: Vec<Lineage> = if self.spans.is_some() {
            messages[1..]
                .iter()
                .map(|m| {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    Lineage::from_headers(m.headers.as_ref(), &self.stream, seq)
                })
                .collect()
        } else {
            Vec::new()
        };
        let (carried, span) = self.begin_span(&lineage, &members.iter().collect::<Vec<_>>());
        let carried = carried.as_ref().unwrap_or(&lineage);
        let chained = crate::steps::run_chain(&self.steps, input.clone(), carried).await;
        let (outputs, failures) = self.oversized_to_dead_letters(input, chained);
        let emitted = self.emit(carried, outputs, failures).await?;
        if let Some(span) = span {
            span.end(&emitted.clone().done(false, 1));
        }
        if let Some(tracer) = &self.tracer {
            // Each traced member of the batch gets the batch's event, under its own identity.
            for m in messages {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                let member = Lineage::from_headers(m.headers.as_ref(), &self.stream, seq);
                if tracer.samples(&member) {
                    let deliveries = m.info().map_or(1, |i| i.delivered.max(1) as u64);
                    tracer
                        .record(&member, began, emitted.clone().done(false, deliveries))
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Stores every output and dead letter; Ok only when all of them are stored.
    async fn emit(
        &self,
        lineage: &Lineage,
        outputs: Vec<Payload>,
        mut failures: Vec<StepFailure>,
    ) -> Result<Emitted, ConsumeError> {
        let mut emitted = Emitted::default();
        let mut acks = Pending {
            acks: Vec::new(),
            epoch: *self.disconnects.borrow(),
        };
        match &self.output {
            Output::Publish(subject) => {
                emitted.stored = outputs.len() as u64;
                self.publish_outputs(lineage, outputs, subject, &mut acks)
                    .await?
            }
            Output::Sink { sink, retry } => {
                for output in outputs {
                    let written = crate::sinks::write_with_retry(
                        sink.as_ref(),
                        retry,
                        &self.unit,
                        lineage,
                        output.into_bytes(),
                    )
                    .await;
                    match written {
                        Ok(Written::New) => {
                            emitted.stored += 1;
                            Stats::add(&self.stats.published, 1)
                        }
                        Ok(Written::Duplicate) => {
                            emitted.duplicates += 1;
                            Stats::add(&self.stats.duplicates_skipped, 1)
                        }
                        Err(failure) => failures.push(StepFailure {
                            stage: self.unit.clone(),
                            step_index: self.steps.len(),
                            item_index: 0,
                            replay_step: self.steps.len(),
                            failure,
                        }),
                    }
                }
            }
        }
        let dead = failures.len() as u64;
        for failure in failures {
            emitted.attempts = emitted.attempts.max(failure.failure.attempts);
            if emitted.dead.is_none() && self.tracer.is_some() {
                emitted.dead = Some((failure.stage.clone(), failure.failure.error.clone()));
            }
            self.dead_letter(lineage, failure, &mut acks).await?;
        }
        for ack in acks.acks {
            self.settle(ack, acks.epoch).await?;
        }
        Stats::add(&self.stats.dead_lettered, dead);
        Ok(emitted)
    }

    /// Publishes the outputs with ids derived from the input's, so a redelivery publishes the same ids.
    async fn publish_outputs(
        &self,
        lineage: &Lineage,
        outputs: Vec<Payload>,
        subject: &Subject,
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let count = outputs.len();
        let mut base = (count > 0).then(|| lineage.headers_after(&self.unit));
        for (index, output) in outputs.into_iter().enumerate() {
            // The last output takes the headers themselves; the others take copies.
            let mut map = if index + 1 == count {
                base.take().unwrap_or_default()
            } else {
                base.clone().unwrap_or_default()
            };
            map.insert(
                names::MSG_ID,
                owned_header_value(lineage.output_id(&self.unit, index)),
            );
            let publish = jetstream::message::PublishMessage::build()
                .headers(map)
                .payload(output.into_bytes());
            self.publish_into(acks, subject, publish).await?;
        }
        Stats::add(&self.stats.published, count as u64);
        Ok(())
    }

    async fn dead_letter(
        &self,
        lineage: &Lineage,
        failure: StepFailure,
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let StepFailure {
            stage,
            step_index,
            item_index,
            replay_step,
            failure,
        } = failure;
        let id = lineage.dead_letter_id(&self.unit, step_index, item_index);
        let map = dead_letter_headers(
            lineage,
            &self.unit,
            &stage,
            &failure.error,
            (failure.attempts, failure.deliveries),
            (&id, replay_step),
        );
        let publish = jetstream::message::PublishMessage::build()
            .headers(map)
            .payload(failure.item.into_bytes());
        self.publish_into(acks, &self.dead_letter_subject, publish)
            .await
    }

    /// A publish's acknowledgement, or the lost connection that took it.
    async fn settle(
        &self,
        ack: jetstream::context::PublishAckFuture,
        epoch: u64,
    ) -> Result<(), ConsumeError> {
        crate::acks::acknowledged(ack, epoch, &self.disconnects)
            .await?
            .map_err(ConsumeError::Unacknowledged)?;
        Ok(())
    }

    async fn publish_into(
        &self,
        acks: &mut Pending,
        subject: &Subject,
        publish: jetstream::message::PublishMessage,
    ) -> Result<(), ConsumeError> {
        if acks.acks.len() >= PUBLISH_WINDOW {
            for ack in acks.acks.drain(..) {
                self.settle(ack, acks.epoch).await?;
            }
        }
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|source| ConsumeError::Publish {
                subject: subject.clone(),
                source,
            })?;
        acks.acks.push(ack);
        Ok(())
    }
}
