//! How a source's messages reach the stream: sent with their lineage's headers and book record,
//! their acknowledgements awaited in a window, a sampled item's trace and span recorded.

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::jetstream;
use async_nats::Subject;
use bytes::Bytes;
use futures::FutureExt;

use super::error::SourceError;
use crate::acks::Disconnects;
use crate::lineage::Lineage;
use crate::stats::Stats;

/// Publishes in flight at once: enough to keep the server busy, well below the client's limit.
pub(super) const WINDOW: usize = 1000;
/// Items in flight at once, whatever frames hold them: a window of full frames would otherwise buffer
/// hundreds of megabytes.
const WINDOW_ITEMS: u64 = 8192;
/// Records an item a source makes: its trace event and its span, when it is sampled. Returns the
/// lineage to publish it with when a span was begun (its outputs' parent).
pub(super) async fn record_emitted(
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
pub(super) async fn publish(
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
pub(super) async fn send(
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
pub(super) type Stored =
    futures::future::BoxFuture<'static, Result<jetstream::publish::PublishAck, SourceError>>;

/// A publish's acknowledgement, or the lost connection that took it.
async fn settle(ack: Stored, epoch: u64, disconnects: &Disconnects) -> Result<(), SourceError> {
    crate::acks::acknowledged(ack, epoch, disconnects).await??;
    Ok(())
}

/// Publishes waiting for their acknowledgements, in publish order, each with what it stands for; the
/// newest confirmed one is what a checkpoint may record.
pub(super) struct Window<T> {
    /// Each publish with the items it holds and the disconnect count when it was made.
    pending: VecDeque<(T, u64, Stored, u64)>,
    pending_items: u64,
    stats: Arc<Stats>,
    disconnects: Disconnects,
}

impl<T> Window<T> {
    pub(super) fn new(stats: Arc<Stats>, disconnects: Disconnects) -> Window<T> {
        Window {
            pending: VecDeque::new(),
            pending_items: 0,
            stats,
            disconnects,
        }
    }

    /// Adds a publish and returns the newest item confirmed by now, if any; when the window is full,
    /// waits for the oldest first.
    pub(super) async fn push(
        &mut self,
        item: T,
        items: u64,
        ack: Stored,
    ) -> Result<Option<T>, SourceError> {
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
    pub(super) async fn drain(&mut self) -> Result<Option<T>, SourceError> {
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
