//! Source units: they create messages and store them in the pipeline's stream. One file per kind of
//! source; what they share (publishing in a window, checkpoints, waiting to be stopped) is here.
//!
//! Every message gets an id derived from what it is (the generator's sequence number, the file and line,
//! the timer tick), so a source restarted from its last checkpoint republishes what was not yet
//! checkpointed and JetStream drops what it already has.

mod cron;
mod file;
mod framer;
mod generator;
mod http;
mod nats;
mod postgres;
mod timer;

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError, kv};
use async_nats::Subject;
use bytes::Bytes;
use futures::FutureExt;
use serde::Serialize;
use switchyard_crds::SourceKind;
use tokio::sync::watch;

use crate::lineage::Lineage;
use crate::stats::Stats;

/// Publishes in flight at once: enough to keep the server busy, well below the client's limit.
const WINDOW: usize = 1000;
/// Items in flight at once, whatever frames hold them: a window of full frames would otherwise buffer
/// hundreds of megabytes.
const WINDOW_ITEMS: u64 = 8192;
/// How often a source records how far it got, at most.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the source's checkpoint: {0}")]
    ReadCheckpoint(#[from] kv::EntryError),
    #[error("cannot save the source's checkpoint: {0}")]
    SaveCheckpoint(#[from] kv::PutError),
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        subject: Subject,
        source: PublishError,
    },
    #[error("a publish was not acknowledged: {0}")]
    Unacknowledged(PublishError),
    #[error(transparent)]
    ConnectionLost(#[from] crate::acks::ConnectionLost),
    #[error(transparent)]
    Books(#[from] crate::books::BooksError),
    #[error("the task that waits for a message to be stored and recorded ended: {0}")]
    Task(tokio::task::JoinError),
    /// The input of a file source is missing or unreadable.
    #[error("cannot read {}: {source}{hint}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("cannot listen on port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("http.bearerToken.env names {var}, which is not set (or empty) in this unit's environment: {hint}")]
    MissingToken { var: String, hint: &'static str },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
    /// After a restart, what an earlier run stored could not be read back to compare.
    #[error("cannot read back what the source stored before it restarted: {0}")]
    Recover(String),
    /// The source's settings cannot be used (validation catches these before a unit runs).
    #[error("{0}")]
    Settings(String),
    /// The accounts of the source's jobs cannot be read (`switchyard_crds::jobs`).
    #[error("cannot follow the source's jobs: {0}")]
    Jobs(String),
}

impl SourceError {
    /// A file source's input is not there: trying again will not help.
    fn is_missing_input(&self) -> bool {
        matches!(self, SourceError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// One kind of source.
pub trait Source {
    /// Publishes until the source is finished (finite sources) or the unit is asked to stop.
    fn run(&self, unit: &SourceUnit) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Runs the source `kind` as `unit`.
pub async fn run(kind: &SourceKind, unit: &SourceUnit) -> Result<(), SourceError> {
    match kind {
        SourceKind::Generator(settings) => generator::Generator(settings).run(unit).await,
        SourceKind::File(settings) => file::FileSource(settings).run(unit).await,
        SourceKind::Timer(settings) => timer::Timer(settings).run(unit).await,
        SourceKind::Cron(settings) => cron::Cron(settings).run(unit).await,
        SourceKind::Http(settings) => http::HttpSource(settings).run(unit).await,
        SourceKind::Nats(settings) => nats::NatsSource(settings).run(unit).await,
        SourceKind::Postgres(settings) => postgres::PostgresSource(settings).run(unit).await,
    }
}

/// What every source needs: where to publish, where to checkpoint, and when to stop.
pub struct SourceUnit {
    pub name: String,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub subject: Subject,
    pub checkpoints: kv::Store,
    pub stats: Arc<Stats>,
    pub shutdown: watch::Receiver<bool>,
    /// Lost connections so far: see `acks`.
    pub disconnects: crate::Disconnects,
    /// Prefix for names that must differ between pipelines (the NATS source's queue group).
    pub queue_group: String,
    /// Records the items it makes, when the Pipeline traces.
    pub tracer: Option<crate::trace::Tracer>,
    /// Exports the items' spans over OTLP, when the environment asks for it.
    pub spans: Option<crate::otlp::Spans>,
    /// The most items one message holds (1: no frames).
    pub frame_items: usize,
    /// Where each stored message is recorded (see `books`).
    pub books: Option<Arc<crate::books::Ledger>>,
    /// The last item this process sent to the stream, across resumes (see `framer`): its id and
    /// its position as a checkpoint writes it.
    pub last_sent: std::sync::Mutex<Option<(String, String)>>,
    /// Where the accounts of this source's items arrive, when it follows its jobs to their end.
    pub jobs: Option<switchyard_crds::unit::JobsConfig>,
    /// The units that read what this source stores.
    pub readers: Vec<String>,
}

impl SourceUnit {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Notes the last item sent to the stream: its id and its position (as JSON).
    fn sent(&self, id: &str, position: String) {
        if let Ok(mut last) = self.last_sent.lock() {
            *last = Some((id.to_string(), position));
        }
    }

    /// The last item this process sent before it resumed, if any.
    fn last_sent(&self) -> Option<(String, String)> {
        self.last_sent.lock().ok().and_then(|last| last.clone())
    }

    fn checkpoint_key(&self) -> String {
        format!("source.{}", self.name)
    }

    fn lineage(&self, key: String) -> Lineage {
        lineage(&self.name, key)
    }

    async fn save_checkpoint<T: Serialize>(&self, checkpoint: &T) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec(checkpoint)
            .map_err(|e| SourceError::Settings(format!("cannot encode a checkpoint: {e}")))?;
        self.checkpoints
            .put(self.checkpoint_key(), bytes.into())
            .await?;
        Ok(())
    }

    /// Sends one message to the stream; the returned future resolves when the stream has it (and
    /// its book record).
    async fn publish(&self, lineage: &Lineage, payload: Bytes) -> Result<Stored, SourceError> {
        let mut lineage = lineage.clone();
        let carried = record_emitted(self.tracer.as_ref(), self.spans.as_ref(), &mut lineage).await;
        let lineage = carried.as_ref().unwrap_or(&lineage);
        publish(
            &self.js,
            &self.subject,
            lineage,
            payload,
            self.books.as_ref(),
        )
        .await
    }

    /// The most items and bytes one frame of this unit holds: no more items than its readers work on
    /// at once, no more bytes than the server takes in a message.
    fn frame_limits(&self) -> (usize, usize) {
        use switchyard_platform::frame;
        let server_takes = self.client.server_info().max_payload;
        (
            self.frame_items.clamp(1, frame::MOST_ITEMS),
            frame::MOST_BYTES.min(server_takes.saturating_sub(framer::HEADERS_ROOM)),
        )
    }

    /// Publishes items (their headers and payloads) as one message: a lone item as itself, several as
    /// a frame under an id naming them all (`frame::frame_id`), never the first one's own.
    async fn publish_together(
        &self,
        items: &[(&async_nats::HeaderMap, &Bytes)],
    ) -> Result<Stored, SourceError> {
        let (headers, payload) = match items {
            [(headers, payload)] => ((*headers).clone(), (*payload).clone()),
            several => {
                let mut writer = switchyard_platform::frame::FrameWriter::new();
                for (headers, payload) in several {
                    writer.push(headers, payload);
                }
                writer.finish()
            }
        };
        send(
            &self.js,
            &self.subject,
            headers,
            payload,
            items.len() as u64,
            self.books.as_ref(),
        )
        .await
    }

    /// Publishes one message and waits until the stream has it.
    async fn publish_stored(&self, lineage: &Lineage, payload: Bytes) -> Result<(), SourceError> {
        self.publish(lineage, payload).await?.await?;
        Stats::add(&self.stats.processed, 1);
        Ok(())
    }

    /// Runs `attempt` until it succeeds, the unit stops, or it fails in a way retrying cannot fix;
    /// each attempt resumes from the last checkpoint.
    async fn resuming<F, Fut>(&self, mut attempt: F) -> Result<(), SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), SourceError>>,
    {
        loop {
            match attempt().await {
                Ok(()) => return Ok(()),
                Err(e) if !self.stopping() && !e.is_missing_input() => {
                    tracing::warn!("{e}; resuming from the last checkpoint in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps; false when asked to stop meanwhile.
    async fn sleep_or_stop(&self, wait: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.changed() => false,
        }
    }

    /// Publishes one tick of a timer or cron source, retrying for a while: a tick lost to a NATS outage
    /// is gone for good.
    async fn fire(&self, seq: u64, template: &Template) {
        let lineage = self.lineage(seq.to_string());
        for attempt in 1..=5 {
            match self.publish_stored(&lineage, template.render(seq)).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(attempt, "cannot store tick {seq}: {e}");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        tracing::error!("tick {seq} was not stored after 5 attempts");
    }
}

/// The message that source `name` made under `key` (a sequence number, `file:line`, a tick, a client's
/// idempotency key): its id is `name:key`, so the same key is stored once.
fn lineage(name: &str, key: String) -> Lineage {
    let id = format!("{name}:{key}");
    Lineage::at_source(name, key, id)
}

/// Records an item a source makes: its trace event and its span, when it is sampled. Returns the
/// lineage to publish it with when a span was begun (its outputs' parent).
async fn record_emitted(
    tracer: Option<&crate::trace::Tracer>,
    spans: Option<&crate::otlp::Spans>,
    lineage: &mut Lineage,
) -> Option<Lineage> {
    if let Some(tracer) = tracer {
        tracer.decide(lineage);
    }
    let lineage = &*lineage;
    let done = || crate::trace::Done {
        outputs: 1,
        ..Default::default()
    };
    let carried = spans
        .and_then(|s| {
            s.begin(
                lineage,
                opentelemetry::trace::SpanKind::Producer,
                std::time::SystemTime::now(),
                &[],
            )
        })
        .map(|(carried, span)| {
            span.end(&done());
            carried
        });
    if let Some(tracer) = tracer.filter(|t| t.samples(lineage)) {
        tracer
            .record(lineage, crate::trace::Began::now(), done())
            .await;
    }
    carried
}

/// Sends one message with its lineage's headers; shared by every source, the HTTP handler included.
async fn publish(
    js: &jetstream::Context,
    subject: &Subject,
    lineage: &Lineage,
    payload: Bytes,
    books: Option<&Arc<crate::books::Ledger>>,
) -> Result<Stored, SourceError> {
    send(js, subject, lineage.source_headers(), payload, 1, books).await
}

/// Sends one message (`items` items, its id in `headers`) and its book record; the returned future
/// resolves when the stream has both.
async fn send(
    js: &jetstream::Context,
    subject: &Subject,
    headers: async_nats::HeaderMap,
    payload: Bytes,
    items: u64,
    books: Option<&Arc<crate::books::Ledger>>,
) -> Result<Stored, SourceError> {
    let id = headers
        .get(crate::lineage::names::MSG_ID)
        .map(|v| v.as_str().to_string());
    let message = jetstream::message::PublishMessage::build()
        .headers(headers)
        .payload(payload);
    let ack = js
        .send_publish(subject.clone(), message)
        .await
        .map_err(|source| SourceError::Publish {
            subject: subject.clone(),
            source,
        })?;
    let (Some(books), Some(id)) = (books.cloned(), id) else {
        // Every message a source makes has an id (without one, JetStream could not keep it once);
        // a unit configured before the books keeps none.
        return Ok(async move { ack.await.map_err(SourceError::Unacknowledged) }.boxed());
    };
    // Recorded once the stream has the message, never before: a record of a message that was not
    // stored would count its items, published again in another message, twice. Named by the
    // message's id and its items, so that should the stream ever take a message for one it holds
    // under the same id with other contents, the books say so (issue 38). A task of its own, so
    // that the records of a window of messages go out together, not one round trip after another.
    let to = subject.rsplit('.').next().unwrap_or_default();
    let route = switchyard_crds::books::route(switchyard_crds::books::FROM_SOURCE, to);
    let recorded = tokio::spawn(async move {
        let stored = ack.await.map_err(SourceError::Unacknowledged)?;
        let counts = switchyard_crds::books::Counts {
            out: items,
            ..Default::default()
        };
        books
            .record(&format!("{id}#{items}"), route, counts)
            .await?;
        Ok(stored)
    });
    Ok(async move { recorded.await.map_err(SourceError::Task)? }.boxed())
}

/// A message on its way: resolves once the stream has it and the books record it.
type Stored =
    futures::future::BoxFuture<'static, Result<jetstream::publish::PublishAck, SourceError>>;

/// A publish's acknowledgement, or the lost connection that took it.
async fn settle(
    ack: Stored,
    epoch: u64,
    disconnects: &crate::Disconnects,
) -> Result<(), SourceError> {
    crate::acks::acknowledged(ack, epoch, disconnects).await??;
    Ok(())
}

/// Publishes waiting for their acknowledgements, in publish order, each with what it stands for; the
/// newest confirmed one is what a checkpoint may record.
struct Window<T> {
    /// Each publish with the items it holds and the disconnect count when it was made.
    pending: VecDeque<(T, u64, Stored, u64)>,
    pending_items: u64,
    stats: Arc<Stats>,
    disconnects: crate::Disconnects,
}

impl<T> Window<T> {
    fn new(unit: &SourceUnit) -> Window<T> {
        Window {
            pending: VecDeque::new(),
            pending_items: 0,
            stats: unit.stats.clone(),
            disconnects: unit.disconnects.clone(),
        }
    }

    /// Adds a publish and returns the newest item confirmed by now, if any; when the window is full,
    /// waits for the oldest first.
    async fn push(&mut self, item: T, items: u64, ack: Stored) -> Result<Option<T>, SourceError> {
        let epoch = *self.disconnects.borrow();
        self.pending.push_back((item, items, ack, epoch));
        let mut confirmed = None;
        self.pending_items += items;
        while self.pending.len() > WINDOW
            || (self.pending_items > WINDOW_ITEMS && self.pending.len() > 1)
        {
            if let Some((item, items, ack, epoch)) = self.pending.pop_front() {
                settle(ack, epoch, &self.disconnects).await?;
                confirmed = Some(self.count(item, items));
            }
        }
        while let Some((_, _, ack, _)) = self.pending.front_mut() {
            match ack.now_or_never() {
                None => break,
                Some(result) => {
                    result?;
                    if let Some((item, items, _, _)) = self.pending.pop_front() {
                        confirmed = Some(self.count(item, items));
                    }
                }
            }
        }
        Ok(confirmed)
    }

    /// Waits for every publish; returns the newest item, if any was still pending.
    async fn drain(&mut self) -> Result<Option<T>, SourceError> {
        let mut confirmed = None;
        while let Some((item, items, ack, epoch)) = self.pending.pop_front() {
            settle(ack, epoch, &self.disconnects).await?;
            confirmed = Some(self.count(item, items));
        }
        Ok(confirmed)
    }

    fn count(&mut self, item: T, items: u64) -> T {
        self.pending_items -= items;
        Stats::add(&self.stats.processed, items);
        item
    }
}

/// A payload with `{{seq}}` placeholders, split once.
struct Template {
    parts: Vec<String>,
}

impl Template {
    fn new(text: &str) -> Template {
        Template {
            parts: text.split("{{seq}}").map(str::to_string).collect(),
        }
    }

    /// The payload `settings` give, or the default one.
    fn or_default(payload: &Option<String>) -> Template {
        Template::new(
            payload
                .as_deref()
                .unwrap_or(switchyard_crds::DEFAULT_PAYLOAD),
        )
    }

    fn render(&self, seq: u64) -> Bytes {
        let seq = seq.to_string();
        let mut out = Vec::with_capacity(self.parts.iter().map(String::len).sum::<usize>() + 8);
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(seq.as_bytes());
            }
            out.extend_from_slice(part.as_bytes());
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_number_every_message() {
        let t = Template::new(r#"{"item": {{seq}}, "again": "{{seq}}"}"#);
        assert_eq!(&t.render(17)[..], br#"{"item": 17, "again": "17"}"#);
        assert_eq!(&Template::new("{}").render(1)[..], b"{}");
    }
}
