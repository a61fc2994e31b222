//! Storing what an input's items made: outputs published (as frames when the input was one) or
//! written by the sink, dead letters, and the acknowledgements all of them must have before the
//! input may be acknowledged.

use async_nats::jetstream;
use async_nats::Subject;
use switchyard_crds::unit::RetryConfig;
use switchyard_platform::frame::{self, FrameWriter};

use crate::lineage::{names, owned_header_value, Lineage};
use crate::payload::Payload;
use crate::sinks::{Sink, Written};
use crate::stats::Stats;
use crate::steps::StepFailure;

use super::input::{Emitted, Pending, Processed};
use super::worker::{ConsumeError, Output, Worker};
use switchyard_platform::frame::HEADERS_ROOM;

/// Publishes outstanding at once for one input; more fan-out than this waits for the first acks.
pub(super) const PUBLISH_WINDOW: usize = 256;

impl Worker {
    /// Stores every item's outputs and dead letters; Ok only when all of them are stored. The outputs
    /// of a frame's items go out as frames (ids from the input message's: a redelivery makes the same
    /// frames, which JetStream drops); a single item's each go out alone, as they always did.
    pub(super) async fn emit(
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
                self.write(sink.as_ref(), retry, items, &mut emitted).await
            }
        }
        self.account_for_jobs(items, &outputs, &mut acks).await?;
        let dead = self
            .store_dead_letters(items, &mut emitted, &mut acks)
            .await?;
        for ack in acks.acks {
            self.settle(ack, acks.epoch).await?;
        }
        Stats::add(&self.stats.dead_lettered, dead);
        Ok(emitted)
    }

    /// Writes the items' outputs through the sink, all at once; what fails joins the item's
    /// failures (for its dead letter).
    async fn write(
        &self,
        sink: &dyn Sink,
        retry: &RetryConfig,
        items: &mut [Processed],
        emitted: &mut [Emitted],
    ) {
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
                sink,
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

    /// Publishes the outputs with ids derived from the input's, so a redelivery publishes the same ids.
    pub(super) async fn publish_outputs(
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
    pub(super) async fn publish_frames(
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

    pub(super) async fn publish_frame(
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

    /// A publish's acknowledgement, or the lost connection that took it.
    pub(super) async fn settle(
        &self,
        ack: jetstream::context::PublishAckFuture,
        epoch: u64,
    ) -> Result<(), ConsumeError> {
        crate::acks::acknowledged(ack, epoch, &self.disconnects)
            .await?
            .map_err(ConsumeError::Unacknowledged)?;
        Ok(())
    }

    pub(super) async fn publish_into(
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
