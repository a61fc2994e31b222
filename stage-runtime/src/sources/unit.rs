//! What every source is (`Source`) and what it is given (`SourceUnit`): where to publish, where to
//! checkpoint, when to stop, and the ways every kind publishes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::Subject;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

use super::error::SourceError;
use super::publish::{publish, record_emitted, send, Stored, Window};
use super::template::Template;
use crate::acks::Disconnects;
use crate::lineage::Lineage;
use crate::stats::Stats;

/// How often a source records how far it got, at most.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// One kind of source.
pub trait Source {
    /// Publishes until the source is finished (finite sources) or the unit is asked to stop.
    fn run(&self, unit: &SourceUnit) -> impl Future<Output = Result<(), SourceError>> + Send;
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
    pub disconnects: Disconnects,
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
    /// A window for this unit's publishes (see `Window`).
    pub(super) fn window<T>(&self) -> Window<T> {
        Window::new(self.stats.clone(), self.disconnects.clone())
    }

    pub(super) fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Notes the last item sent to the stream: its id and its position (as JSON).
    pub(super) fn sent(&self, id: &str, position: String) {
        if let Ok(mut last) = self.last_sent.lock() {
            *last = Some((id.to_string(), position));
        }
    }

    /// The last item this process sent before it resumed, if any.
    pub(super) fn last_sent(&self) -> Option<(String, String)> {
        self.last_sent.lock().ok().and_then(|last| last.clone())
    }

    pub(super) fn checkpoint_key(&self) -> String {
        format!("source.{}", self.name)
    }

    pub(super) fn lineage(&self, key: String) -> Lineage {
        lineage(&self.name, key)
    }

    pub(super) async fn save_checkpoint<T: Serialize>(
        &self,
        checkpoint: &T,
    ) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec(checkpoint)
            .map_err(|e| SourceError::Settings(format!("cannot encode a checkpoint: {e}")))?;
        self.checkpoints
            .put(self.checkpoint_key(), bytes.into())
            .await?;
        Ok(())
    }

    /// Sends one message to the stream; the returned future resolves when the stream has it (and
    /// its book record).
    pub(super) async fn publish(
        &self,
        lineage: &Lineage,
        payload: Bytes,
    ) -> Result<Stored, SourceError> {
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
    pub(super) fn frame_limits(&self) -> (usize, usize) {
        use switchyard_platform::frame;
        let server_takes = self.client.server_info().max_payload;
        (
            self.frame_items.clamp(1, frame::MOST_ITEMS),
            frame::MOST_BYTES.min(server_takes.saturating_sub(frame::HEADERS_ROOM)),
        )
    }

    /// Publishes items (their headers and payloads) as one message: a lone item as itself, several as
    /// a frame under an id naming them all (`frame::frame_id`), never the first one's own.
    pub(super) async fn publish_together(
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
    pub(super) async fn publish_stored(
        &self,
        lineage: &Lineage,
        payload: Bytes,
    ) -> Result<(), SourceError> {
        self.publish(lineage, payload).await?.await?;
        Stats::add(&self.stats.processed, 1);
        Ok(())
    }

    /// Runs `attempt` until it succeeds, the unit stops, or it fails in a way retrying cannot fix;
    /// each attempt resumes from the last checkpoint.
    pub(super) async fn resuming<F, Fut>(&self, mut attempt: F) -> Result<(), SourceError>
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
    pub(super) async fn sleep_or_stop(&self, wait: Duration) -> bool {
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
    pub(super) async fn fire(&self, seq: u64, template: &Template) {
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
pub(super) fn lineage(name: &str, key: String) -> Lineage {
    let id = format!("{name}:{key}");
    Lineage::at_source(name, key, id)
}
