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
use switchyard_crds::books::Counts;
use switchyard_crds::unit::{BatchConfig, ConsumerConfig, RetryConfig};
use tokio::sync::watch;

use crate::crashes::{CrashRecordError, CrashRecords, FrameRecord, Verdict};
use crate::lineage::{dead_letter_headers, names, owned_header_value, Lineage, Replay};
use crate::otlp::{ItemSpan, Spans};
use crate::payload::Payload;
use switchyard_platform::frame::{self, FrameError, FrameWriter};

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
    #[error(transparent)]
    Books(#[from] crate::books::BooksError),
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
    /// The most items one output message holds (1: no frames).
    pub frame_items: usize,
    /// Lost connections so far: see `acks`.
    pub disconnects: crate::Disconnects,
    /// Records what becomes of sampled items, when the Pipeline traces.
    pub tracer: Option<Tracer>,
    /// Exports spans over OTLP, when the environment asks for it.
    pub spans: Option<Spans>,
    /// Where a message delivered again is recorded while it runs alone: see `crashes`.
    pub crashes: CrashRecords,
    /// Where what became of each input is recorded before it is acknowledged (see `books`).
    pub books: Option<Arc<crate::books::Ledger>>,
    /// The sources whose jobs are followed to their end, and who reads what this unit stores:
    /// each item of theirs gets an account before its input is acknowledged
    /// (`switchyard_crds::jobs`).
    pub jobs: Option<Jobs>,
}

/// What a unit needs to account for the items of followed jobs.
pub struct Jobs {
    pub config: switchyard_crds::unit::JobsConfig,
    pub readers: Vec<String>,
}

/// What storing one input's results came to, for its trace event.
#[derive(Clone, Default)]
struct Emitted {
    /// Published downstream, or written by the sink.
    stored: u64,
    duplicates: u64,
    /// Dead letters stored.
    dead_letters: u64,
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

/// The books of one input message that held `received` items, from what its items came to: each
/// is dead-lettered (whatever else it made), passed on (it made an output, or a sink found it
/// written), or filtered out. What a sink finds written when the message comes `again` was written
/// by its delivery before (whose process died before it recorded that): written, not a duplicate.
fn counts_of(received: u64, emitted: &[Emitted], again: bool) -> Counts {
    let mut counts = Counts {
        received,
        ..Counts::default()
    };
    for item in emitted {
        if item.dead_letters > 0 {
            counts.dead_lettered += 1;
        } else if item.stored + item.duplicates > 0 {
            counts.passed += 1;
        } else {
            counts.filtered += 1;
        }
        if again {
            counts.out += item.stored + item.duplicates;
        } else {
            counts.out += item.stored;
            counts.duplicates += item.duplicates;
        }
    }
    counts
}

/// The last token of a subject: a unit's output subject's names the unit and its epoch.
fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// The books of a message that could not be read as the frame it says it is: every item it says it
/// holds is dead-lettered with it.
fn unreadable_counts(message: &Message) -> Counts {
    let items = items_held(message) as u64;
    Counts {
        received: items,
        dead_lettered: items,
        ..Counts::default()
    }
}

/// Room left for a message's headers when its payload is measured against the server's limit.
const HEADERS_ROOM: usize = 4096;

/// How the items of one message run.
enum Items {
    /// All at once, each with this verdict.
    Together(Verdict),
    /// One after the other, behind a crash record naming each as it runs.
    OneByOne(FrameRecord),
}

/// One item of an input message, with its own lineage.
struct Input {
    lineage: Lineage,
    payload: Payload,
    /// The step a replay starts at (0 for everything but a replayed dead letter).
    first_step: usize,
}

/// What one item came to in this unit, until it is stored.
struct Processed {
    /// As it came in (its trace event is recorded under it).
    lineage: Lineage,
    /// The lineage its outputs and dead letters carry, when its span changed it.
    carried: Option<Lineage>,
    began: Option<Began>,
    span: Option<ItemSpan>,
    outputs: Vec<Payload>,
    failures: Vec<StepFailure>,
}

impl Processed {
    fn of(
        lineage: Lineage,
        began: Option<Began>,
        span: Option<ItemSpan>,
        outputs: Vec<Payload>,
        failures: Vec<StepFailure>,
    ) -> Processed {
        Processed {
            lineage,
            carried: None,
            began,
            span,
            outputs,
            failures,
        }
    }

    fn carried(&self) -> &Lineage {
        self.carried.as_ref().unwrap_or(&self.lineage)
    }
}

/// Work for one future: a single input, or a batch of them.
// The single message is the hot path: keep it inline rather than boxing it per message.
#[allow(clippy::large_enum_variant)]
enum Work {
    One(Message),
    Batch(Vec<Message>),
}

impl Work {
    /// The items the work's messages hold.
    fn items(&self) -> usize {
        match self {
            Work::One(m) => items_held(m),
            Work::Batch(ms) => ms.iter().map(items_held).sum(),
        }
    }
}

/// The items a stored message holds: a frame's count, one otherwise.
fn items_held(message: &Message) -> usize {
    frame::frame_count(message.headers.as_ref())
        .and_then(Result::ok)
        .unwrap_or(1)
        .max(1)
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
    /// Items in the pending messages.
    items: usize,
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
            items: 0,
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
        // A batch counts items: a frame is never split between batches, so one may hold a few more.
        self.items += items_held(&message);
        self.pending.push(message);
        (self.items >= size).then(|| Work::Batch(self.take()))
    }

    fn take(&mut self) -> Vec<Message> {
        self.items = 0;
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
        // Items in the work in flight.
        let mut held = 0usize;
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
                            let work = batch.alone(suspect);
                            held += work.items();
                            in_flight.push(self.work(work, true));
                        }
                    }
                } else {
                    while let Some(message) = isolation.waiting.pop_front() {
                        if let Some(work) = batch.add(message) {
                            held += work.items();
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
            // Concurrency counts items: a frame takes as much of it as the items it holds.
            let can_pull = pull.messages.is_some() && held + isolation.queued() < self.concurrency;
            tokio::select! {
                biased;
                _ = crate::stopped(&mut shutdown) => break,
                Some((alone, items)) = in_flight.next(), if !in_flight.is_empty() => {
                    held -= items;
                    if alone {
                        isolation.running = false;
                    }
                }
                _ = tokio::time::sleep_until(batch.deadline), if !batch.pending.is_empty() && !isolation.busy() => {
                    let work = Work::Batch(batch.take());
                    held += work.items();
                    in_flight.push(self.work(work, false));
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
                            held += work.items();
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
    async fn wind_down<F: Future<Output = (bool, usize)>>(
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
    async fn work(&self, work: Work, alone: bool) -> (bool, usize) {
        let messages: &[Message] = match &work {
            Work::One(m) => std::slice::from_ref(m),
            Work::Batch(ms) => ms,
        };
        let count = messages.len() as u64;
        let items = work.items();
        if let Work::One(message) = &work {
            if Replay::of(message.headers.as_ref()).is_some_and(|r| r.unit != self.unit) {
                // Put back on a subject this unit reads for the one unit that failed it.
                if let Err(e) = message.ack().await {
                    tracing::debug!("cannot acknowledge another unit's replay: {e}");
                }
                return (alone, items);
            }
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
            let processing = async {
                if let (Work::One(m), Some(seq)) = (&work, recorded_seq) {
                    if frame::frame_count(m.headers.as_ref()).is_some() {
                        return self.process_suspect_frame(m, seq).await.map(|c| vec![c]);
                    }
                }
                let verdict = match recorded_seq {
                    Some(seq) => Box::pin(self.crashes.before_running_alone(seq)).await?,
                    None => Verdict::Run { crashes: 0 },
                };
                match (&work, verdict) {
                    (Work::Batch(ms), Verdict::Run { .. }) => self.process_batch(ms).await,
                    // A suspect of a batch stage is a batch of one.
                    (Work::Batch(ms), dead @ Verdict::DeadLetter { .. }) => match ms.first() {
                        Some(m) => self.process_message(m, dead).await.map(|c| vec![c]),
                        None => Ok(Vec::new()),
                    },
                    (Work::One(m), verdict) => {
                        self.process_message(m, verdict).await.map(|c| vec![c])
                    }
                }
            };
            let recorded = async {
                let counts = processing.await?;
                self.record_books(messages, &counts).await?;
                Ok::<_, ConsumeError>(counts.iter().map(|c| c.received).sum::<u64>())
            };
            tokio::pin!(recorded);
            self.with_progress(messages, recorded).await
        };
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
                Stats::add(&self.stats.messages, count);
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
            .fetch_sub(items as u64, std::sync::atomic::Ordering::Relaxed);
        (alone, items)
    }

    /// Records what became of each message's items (`books`) and waits until the stream has every
    /// record: only then may the messages be acknowledged.
    async fn record_books(
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

    /// The dead letter of a message that crashed its unit's process `crashes` times when it ran alone.
    fn crashed_it(&self, item: Payload, crashes: u32, delivered: u64) -> StepFailure {
        let how_often = match crashes {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        self.failed_whole(Failure {
            item,
            error: format!(
                "the unit's process died {how_often} while it worked on this message alone (each time after it was delivered again): it probably crashes on it; spec.deadLetter.afterCrashes is the limit"
            ),
            // Attempts stay within what the unit's retry allows; the deliveries say the rest.
            attempts: crashes.min(self.allowed_attempts()),
            deliveries: Some(delivered),
        })
    }

    /// A failure of the unit's input as it came, before any step: a replay starts at the first.
    fn failed_whole(&self, failure: Failure) -> StepFailure {
        StepFailure {
            stage: self.unit.clone(),
            step_index: 0,
            item_index: 0,
            replay_step: 0,
            failure,
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

    /// Works on every item of one stored message (a single item, or a frame of them) and stores what
    /// they made. Returns the number of items.
    async fn process_message(
        &self,
        message: &Message,
        verdict: Verdict,
    ) -> Result<Counts, ConsumeError> {
        self.process_items(message, Items::Together(verdict)).await
    }

    /// Works on the items of `message` (a single item, or a frame), together or one by one, and
    /// stores what they made. Returns what became of them.
    async fn process_items(&self, message: &Message, how: Items) -> Result<Counts, ConsumeError> {
        let (stream_seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered.max(1) as u64),
            Err(_) => (0, 1),
        };
        let framed = frame::frame_count(message.headers.as_ref()).is_some();
        let inputs = match self.inputs(message, stream_seq) {
            Ok(inputs) => inputs,
            Err(e) => {
                // Reading it again will not help: the message goes to the dead letters as it is.
                let lineage =
                    Lineage::from_headers(message.headers.as_ref(), &self.stream, stream_seq);
                let unreadable = self.unreadable_frame(Payload::Bytes(message.payload.clone()), &e);
                let mut item = Processed::of(lineage, None, None, Vec::new(), vec![unreadable]);
                self.emit(false, std::slice::from_mut(&mut item)).await?;
                return Ok(unreadable_counts(message));
            }
        };
        let count = inputs.len() as u64;
        let mut processed = match how {
            Items::Together(verdict) => {
                futures::future::join_all(
                    inputs
                        .into_iter()
                        .map(|input| self.run_item(input, verdict, delivered)),
                )
                .await
            }
            Items::OneByOne(record) => {
                let mut processed = Vec::with_capacity(inputs.len());
                for (index, input) in inputs.into_iter().enumerate() {
                    let crashes = record.crashes_of(index);
                    let verdict = crate::crashes::verdict(crashes, self.crashes.dead_letter_after);
                    if let Verdict::Run { .. } = verdict {
                        // Should the process die now, the record names this item.
                        Box::pin(self.crashes.item_runs(stream_seq, index, crashes + 1)).await?;
                    }
                    processed.push(self.run_item(input, verdict, delivered).await);
                }
                processed
            }
        };
        let emitted = self.emit(framed, &mut processed).await?;
        let books = counts_of(count, &emitted, delivered > 1);
        for (item, emitted) in processed.into_iter().zip(emitted) {
            if item.began.is_some() || item.span.is_some() {
                let done = emitted.done(self.is_sink(), delivered);
                if let Some(span) = item.span {
                    span.end(&done);
                }
                if let (Some(began), Some(tracer)) = (item.began, &self.tracer) {
                    tracer.record(&item.lineage, began, done).await;
                }
            }
        }
        Ok(books)
    }

    /// One item through the steps (or, when it kept crashing the process, to the dead letters).
    async fn run_item(&self, input: Input, verdict: Verdict, delivered: u64) -> Processed {
        let began = self.tracing(&input.lineage).then(Began::now);
        let (carried, span) = self.begin_span(&input.lineage, &[]);
        let run_with = carried.as_ref().unwrap_or(&input.lineage).clone();
        let (outputs, failures) = if let Verdict::DeadLetter { crashes } = verdict {
            let crashed = self.crashed_it(input.payload, crashes, delivered);
            (Vec::new(), vec![crashed])
        } else {
            let chained = crate::steps::run_chain_from(
                &self.steps,
                input.first_step,
                input.payload.clone(),
                &run_with,
            )
            .await;
            self.oversized_to_dead_letters(input.payload, chained)
        };
        let mut item = Processed::of(input.lineage, began, span, outputs, failures);
        item.carried = carried;
        item
    }

    /// A frame delivered again, run alone (see `crashes`): whole the first time, as a single message
    /// is; if the process died while it did, item by item behind a record naming the item, so that
    /// only the item that kills the process is dead-lettered, never the others beside it.
    async fn process_suspect_frame(
        &self,
        message: &Message,
        stream_seq: u64,
    ) -> Result<Counts, ConsumeError> {
        match Box::pin(self.crashes.frame_record(stream_seq)).await? {
            None => {
                Box::pin(self.crashes.whole_frame_runs(stream_seq)).await?;
                self.process_items(message, Items::Together(Verdict::Run { crashes: 0 }))
                    .await
            }
            Some(record) => self.process_items(message, Items::OneByOne(record)).await,
        }
    }

    /// The items a stored message holds, each with its own lineage.
    fn inputs(&self, message: &Message, stream_seq: u64) -> Result<Vec<Input>, FrameError> {
        let Some(items) = frame::items(message.headers.as_ref(), &message.payload) else {
            return Ok(vec![Input {
                lineage: Lineage::from_headers(message.headers.as_ref(), &self.stream, stream_seq),
                payload: Payload::Bytes(message.payload.clone()),
                first_step: Replay::of(message.headers.as_ref()).map_or(0, |r| r.step),
            }]);
        };
        Ok(items?
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let mut lineage =
                    Lineage::from_headers(Some(&item.headers), &self.stream, stream_seq);
                if item.headers.get(names::MSG_ID).is_none() {
                    // Every frame we write gives its items ids; one written by hand may not.
                    lineage.id = format!("{}:{stream_seq}.{index}", self.stream);
                }
                Input {
                    lineage,
                    payload: Payload::Bytes(item.payload),
                    first_step: 0,
                }
            })
            .collect())
    }

    fn unreadable_frame(&self, item: Payload, error: &FrameError) -> StepFailure {
        self.failed_whole(Failure {
            item,
            error: format!(
                "the message says it is a frame of several items ({} header) but cannot be read as one: {error}",
                switchyard_crds::unit::headers::FRAME
            ),
            attempts: 1,
            deliveries: None,
        })
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

    /// A batch is one JSON array of the items of its messages; it carries the first item's ancestry.
    /// Returns the books of each message: its items share the batch's fate, and the batch's outputs
    /// are the first message's.
    async fn process_batch(&self, messages: &[Message]) -> Result<Vec<Counts>, ConsumeError> {
        let mut members = Vec::new();
        let mut unreadable = Vec::new();
        let mut books = vec![Counts::default(); messages.len()];
        for (index, m) in messages.iter().enumerate() {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            match self.inputs(m, seq) {
                Ok(inputs) => {
                    books[index].received = inputs.len() as u64;
                    members.extend(inputs.into_iter().map(|i| (i, m)));
                }
                Err(e) => unreadable.push((index, m, seq, e)),
            }
        }
        for (index, m, seq, e) in unreadable {
            let lineage = Lineage::from_headers(m.headers.as_ref(), &self.stream, seq);
            let failure = self.unreadable_frame(Payload::Bytes(m.payload.clone()), &e);
            let mut item = Processed::of(lineage, None, None, Vec::new(), vec![failure]);
            self.emit(false, std::slice::from_mut(&mut item)).await?;
            books[index] = unreadable_counts(m);
        }
        let Some((first, _)) = members.first() else {
            return Ok(books);
        };
        let mut lineage = first.lineage.clone();
        lineage.id = format!("{}*{}", lineage.id, members.len());
        let mut array = Vec::with_capacity(
            members
                .iter()
                .map(|(i, _)| i.payload.size() + 1)
                .sum::<usize>()
                + 2,
        );
        array.push(b'[');
        for (i, (member, _)) in members.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            member.payload.write_as_json(&mut array);
        }
        array.push(b']');
        let input = Payload::Bytes(array.into());
        let began = Began::now();
        let others: Vec<&Lineage> = if self.spans.is_some() {
            members[1..].iter().map(|(i, _)| &i.lineage).collect()
        } else {
            Vec::new()
        };
        let (carried, span) = self.begin_span(&lineage, &others);
        let run_with = carried.as_ref().unwrap_or(&lineage).clone();
        let chained = crate::steps::run_chain(&self.steps, input.clone(), &run_with).await;
        let (outputs, failures) = self.oversized_to_dead_letters(input, chained);
        let mut batch = Processed::of(lineage, None, None, outputs, failures);
        batch.carried = carried;
        let emitted = self
            .emit(false, std::slice::from_mut(&mut batch))
            .await?
            .pop()
            .unwrap_or_default();
        if let Some(span) = span {
            span.end(&emitted.clone().done(false, 1));
        }
        let fate = counts_of(1, std::slice::from_ref(&emitted), false);
        let mut first = true;
        for counts in books.iter_mut().filter(|c| c.dead_lettered == 0) {
            let n = counts.received;
            counts.passed = fate.passed * n;
            counts.filtered = fate.filtered * n;
            counts.dead_lettered = fate.dead_lettered * n;
            if std::mem::take(&mut first) {
                counts.out = fate.out;
            }
        }
        if let Some(tracer) = &self.tracer {
            // Each traced member of the batch gets the batch's event, under its own identity.
            for (member, m) in &members {
                if tracer.samples(&member.lineage) {
                    let deliveries = m.info().map_or(1, |i| i.delivered.max(1) as u64);
                    tracer
                        .record(
                            &member.lineage,
                            began,
                            emitted.clone().done(false, deliveries),
                        )
                        .await;
                }
            }
        }
        Ok(books)
    }

    /// Stores every item's outputs and dead letters; Ok only when all of them are stored. The outputs
    /// of a frame's items go out as frames (ids from the input message's: a redelivery makes the same
    /// frames, which JetStream drops); a single item's each go out alone, as they always did.
    async fn emit(
        &self,
        framed: bool,
        items: &mut [Processed],
    ) -> Result<Vec<Emitted>, ConsumeError> {
        let mut emitted = vec![Emitted::default(); items.len()];
        let mut acks = Pending {
            acks: Vec::new(),
            epoch: *self.disconnects.borrow(),
        };
        // Counted before the outputs leave: the account of a followed job names them.
        let outputs: Vec<usize> = items.iter().map(|item| item.outputs.len()).collect();
        match &self.output {
            Output::Publish(subject) => {
                for (item, emitted) in items.iter().zip(emitted.iter_mut()) {
                    emitted.stored = item.outputs.len() as u64;
                }
                if framed {
                    self.publish_frames(items, subject, &mut acks).await?
                } else {
                    for item in items.iter_mut() {
                        let outputs = std::mem::take(&mut item.outputs);
                        self.publish_outputs(item.carried(), outputs, subject, &mut acks)
                            .await?
                    }
                }
            }
            Output::Sink { sink, retry } => {
                let writes: Vec<(usize, bytes::Bytes)> = items
                    .iter_mut()
                    .enumerate()
                    .flat_map(|(i, item)| {
                        std::mem::take(&mut item.outputs)
                            .into_iter()
                            .map(move |output| (i, output.into_bytes()))
                    })
                    .collect();
                // All at once: the sink sees a frame's items together (the file sink writes them
                // in one go, in this order) rather than one round trip each.
                let written = futures::future::join_all(writes.iter().map(|(i, bytes)| {
                    crate::sinks::write_with_retry(
                        sink.as_ref(),
                        retry,
                        &self.unit,
                        items[*i].carried(),
                        bytes.clone(),
                    )
                }))
                .await;
                for ((i, _), written) in writes.iter().zip(written) {
                    match written {
                        Ok(Written::New) => {
                            emitted[*i].stored += 1;
                            Stats::add(&self.stats.published, 1)
                        }
                        Ok(Written::Duplicate) => {
                            emitted[*i].duplicates += 1;
                            Stats::add(&self.stats.duplicates_skipped, 1)
                        }
                        Err(failure) => items[*i].failures.push(StepFailure {
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
        self.account_for_jobs(items, &outputs, &mut acks).await?;
        let mut dead = 0;
        for (item, emitted) in items.iter_mut().zip(emitted.iter_mut()) {
            for failure in std::mem::take(&mut item.failures) {
                dead += 1;
                emitted.dead_letters += 1;
                emitted.attempts = emitted.attempts.max(failure.failure.attempts);
                if emitted.dead.is_none() && self.tracer.is_some() {
                    emitted.dead = Some((failure.stage.clone(), failure.failure.error.clone()));
                }
                self.dead_letter(item.carried(), failure, &mut acks).await?;
            }
        }
        for ack in acks.acks {
            self.settle(ack, acks.epoch).await?;
        }
        Stats::add(&self.stats.dead_lettered, dead);
        Ok(emitted)
    }

    /// Stores this unit's account of the items of followed jobs in one input message
    /// (`switchyard_crds::jobs`): for each, the tags of the item as this unit took it and of its
    /// outputs for every reader, or its dead letter's error. One message for the input's items
    /// (more only past the payload limit), under an id that names the items and what is said of
    /// them, so a redelivery that says the same within the duplicate window is stored once and one
    /// that says otherwise is stored too (the source settles each delivery once); before the input
    /// is acknowledged, like the outputs.
    async fn account_for_jobs(
        &self,
        items: &[Processed],
        outputs: &[usize],
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let Some(jobs) = &self.jobs else {
            return Ok(());
        };
        let readers: &[String] = match &self.output {
            Output::Publish(_) => &jobs.readers,
            Output::Sink { .. } => &[],
        };
        // By source: each source's tracker reads its own subject.
        let mut by_source: Vec<(&str, Vec<switchyard_crds::jobs::Contribution>, &str, &str)> =
            Vec::new();
        for (item, &count) in items.iter().zip(outputs) {
            let lineage = item.carried();
            if !jobs.config.sources.contains(&lineage.origin) {
                continue;
            }
            let account = match item.failures.first() {
                Some(failure) => switchyard_crds::jobs::Contribution::failed(
                    &lineage.origin_seq,
                    &lineage.id,
                    &self.unit,
                    &failure.failure.error,
                ),
                None => {
                    let ids: Vec<String> = (0..count)
                        .map(|index| lineage.output_id(&self.unit, index))
                        .collect();
                    switchyard_crds::jobs::Contribution::finished(
                        &lineage.origin_seq,
                        &lineage.id,
                        &self.unit,
                        &ids,
                        readers,
                    )
                }
            };
            match by_source
                .iter_mut()
                .find(|(source, ..)| *source == lineage.origin)
            {
                Some((_, accounts, _, last)) => {
                    accounts.push(account);
                    *last = &lineage.id;
                }
                None => by_source.push((&lineage.origin, vec![account], &lineage.id, &lineage.id)),
            }
        }
        let most_bytes = self.max_payload.saturating_sub(HEADERS_ROOM).max(1);
        for (source, accounts, first, last) in by_source {
            let subject: Subject = format!("{}.{source}", jobs.config.prefix).into();
            let messages = switchyard_crds::jobs::account_messages(&accounts, most_bytes);
            let items = if accounts.len() == 1 {
                format!("{}/{first}", self.unit)
            } else {
                format!("{}/{first}..{last}/{}", self.unit, accounts.len())
            };
            for payload in messages {
                let mut headers = async_nats::HeaderMap::new();
                let digest = switchyard_crds::unit::spread_hash(payload.iter().copied());
                headers.insert(
                    names::MSG_ID,
                    owned_header_value(format!("{items}:{digest:016x}")),
                );
                let publish = jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(payload.into());
                self.publish_into(acks, &subject, publish).await?;
            }
        }
        Ok(())
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

    /// Publishes the outputs of a frame's items as frames, in item order, each within the server's
    /// limit. Each item in them has the id it would have had alone, and each frame the id of what it
    /// holds (`frame::frame_id`): a redelivery that makes the same outputs makes the same frames,
    /// which JetStream drops, and never a frame under the id of other contents.
    async fn publish_frames(
        &self,
        items: &mut [Processed],
        subject: &Subject,
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let most_bytes = frame::MOST_BYTES.min(self.max_payload.saturating_sub(HEADERS_ROOM));
        let most_items = self.frame_items.clamp(1, frame::MOST_ITEMS);
        let mut writer = FrameWriter::new();
        let mut published = 0u64;
        for item in items.iter_mut() {
            let outputs = std::mem::take(&mut item.outputs);
            if outputs.is_empty() {
                continue;
            }
            let base = item.carried().headers_after(&self.unit);
            for (index, output) in outputs.into_iter().enumerate() {
                let mut map = base.clone();
                map.insert(
                    names::MSG_ID,
                    owned_header_value(item.carried().output_id(&self.unit, index)),
                );
                let bytes = output.into_bytes();
                let size = FrameWriter::encoded_size(&map, &bytes);
                if writer.count() > 0
                    && (writer.count() >= most_items || writer.size() + size > most_bytes)
                {
                    let full = std::mem::take(&mut writer);
                    self.publish_frame(full, subject, acks).await?;
                }
                writer.push(&map, &bytes);
                published += 1;
            }
        }
        if writer.count() > 0 {
            self.publish_frame(writer, subject, acks).await?;
        }
        Stats::add(&self.stats.published, published);
        Ok(())
    }

    async fn publish_frame(
        &self,
        writer: FrameWriter,
        subject: &Subject,
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let (map, payload) = writer.finish();
        let publish = jetstream::message::PublishMessage::build()
            .headers(map)
            .payload(payload);
        self.publish_into(acks, subject, publish).await
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
