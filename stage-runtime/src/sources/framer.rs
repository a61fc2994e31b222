//! How a source that reads faster than one message at a time (a file, the generator) stores its items:
//! several in one frame (`switchyard_platform::frame`) while more are waiting, a lone item as one
//! message of its own, as before frames. No item waits for company: the source says when nothing
//! else is ready (`flush`), and whatever is held goes then.
//!
//! Exactly once across a restart. A lone item's message has the item's id (`source:key`) and a
//! frame an id naming its items (`frame::frame_id`), so a restarted source that makes the same
//! messages again is dropped by JetStream's de-duplication, and a message it makes otherwise is never
//! mistaken for one already stored. But where a frame ends depends on timing (which items were
//! waiting), and a restarted source would cut its frames elsewhere and store the items of the stored
//! frames again (the sinks drop those copies, at a cost on every hop). So the source's checkpoint also
//! lists the frames it has published beyond the checkpointed position (their first and last items'
//! ids), written before each frame is published. A restarted source cuts exactly those frames again,
//! and publishes the items around them alone, as they were. Beyond the last listed frame it
//! publishes items alone and waits for each acknowledgement, until JetStream takes one as new, and
//! frames form again from there. That one item is new says nothing of the items after it: a NATS
//! failover loses a publish in flight to the old leader and stores the ones made after it on the new
//! one, so later items can be stored already. They are stored again inside new frames, never lost:
//! a frame only ever shares its id with the very same items.

use std::collections::VecDeque;
use std::time::Instant;

use async_nats::header::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_platform::frame::FrameWriter;

use super::error::SourceError;
use super::publish::{record_emitted, Stored, Window};
use super::unit::{SourceUnit, CHECKPOINT_EVERY};
use crate::lineage::{names, Lineage};
use crate::stats::Stats;

/// A source's checkpoint: how far its stored items reach (`at`, the source's own position type), and
/// the frames it published beyond that, first and last item ids, in publish order.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct Resume<P> {
    at: Option<P>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    frames: Vec<[String; 2]>,
}

/// Where a source resumes: the position of the last item stored before, if any, and the frames to
/// cut again.
pub(super) struct Resumed<P> {
    pub at: Option<P>,
    frames: Vec<[String; 2]>,
    /// A checkpoint was there: the source ran before and may have stored items beyond `at`.
    ran_before: bool,
}

/// Reads the checkpoint; one written before frames (just a position) reads as that position.
pub(super) async fn resume<P: for<'de> Deserialize<'de>>(
    unit: &SourceUnit,
) -> Result<Resumed<P>, SourceError> {
    let Some(bytes) = unit.checkpoints.get(unit.checkpoint_key()).await? else {
        return Ok(Resumed {
            at: None,
            frames: Vec::new(),
            ran_before: false,
        });
    };
    let (at, frames) = match serde_json::from_slice::<Resume<P>>(&bytes) {
        Ok(r) => (r.at, r.frames),
        Err(_) => match serde_json::from_slice::<P>(&bytes) {
            Ok(position) => (Some(position), Vec::new()),
            Err(e) => {
                tracing::warn!(
                    "ignoring an unreadable checkpoint ({e}); starting from the beginning"
                );
                (None, Vec::new())
            }
        },
    };
    Ok(Resumed {
        at,
        frames,
        ran_before: true,
    })
}

/// One item held for the next message: its headers (its id among them), payload, and the position a
/// checkpoint records once it is stored.
struct Held<P> {
    headers: HeaderMap,
    payload: Bytes,
    position: P,
}

impl<P> Held<P> {
    fn id(&self) -> &str {
        self.headers.get(names::MSG_ID).map_or("", |v| v.as_str())
    }
}

pub(super) struct Framer<P> {
    held: Vec<Held<P>>,
    held_bytes: usize,
    most_bytes: usize,
    most_items: usize,
    /// Publishes awaiting acknowledgement: each with its last item's position and its number.
    window: Window<(P, u64)>,
    /// Messages published so far.
    published: u64,
    /// Frames published and not yet acknowledged, by message number: what the checkpoint lists.
    unconfirmed: VecDeque<(u64, [String; 2])>,
    /// The last item stored, as far as acknowledgements say.
    confirmed: Option<P>,
    /// Whether `confirmed` moved since the checkpoint was last written, and when that was.
    moved: bool,
    saved_at: Instant,
    /// Frames an earlier run published beyond its checkpoint: cut again exactly so.
    plan: VecDeque<[String; 2]>,
    /// `held` is the planned frame at the front of `plan`, still being gathered.
    gathering_planned: bool,
    /// Items go alone and each waits for its acknowledgement, until one is new to the stream.
    checking: bool,
    /// The last item this process sent before it resumed: items go alone at least up to it.
    check_until: Option<String>,
}

impl<P: Serialize + Clone> Framer<P> {
    pub(super) fn new(unit: &SourceUnit, resumed: Resumed<P>) -> Framer<P> {
        // Resuming in the same process (its connection was lost, its stream changed leader): what
        // it sent beyond the checkpoint may be stored although no acknowledgement said so. Stored
        // again in other messages, such an item would be stored twice under two ids; alone, as it
        // went, JetStream knows it by its id. So items go alone up to the last one sent, whatever
        // JetStream says of the ones before: after a server restart it no longer knows the ids of
        // messages already taken and removed, and says "new" of one it had.
        // Nothing sent beyond the checkpoint: the items to come were never sent.
        let at = resumed
            .at
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok());
        let last_sent = unit
            .last_sent()
            .filter(|(_, position)| at.as_deref() != Some(position.as_str()))
            .map(|(id, _)| id);
        let (most_items, most_bytes) = unit.frame_limits();
        Framer {
            held: Vec::new(),
            held_bytes: 0,
            most_bytes,
            most_items,
            window: unit.window(),
            published: 0,
            unconfirmed: VecDeque::new(),
            confirmed: resumed.at,
            moved: false,
            saved_at: Instant::now(),
            plan: resumed.frames.into(),
            gathering_planned: false,
            checking: resumed.ran_before || last_sent.is_some(),
            check_until: last_sent,
        }
    }

    /// Takes one item; stores what is held first when the item would not fit beside it.
    pub(super) async fn offer(
        &mut self,
        unit: &SourceUnit,
        mut lineage: Lineage,
        payload: Bytes,
        position: P,
    ) -> Result<(), SourceError> {
        let carried = record_emitted(unit.tracer.as_ref(), unit.spans.as_ref(), &mut lineage).await;
        let headers = carried.as_ref().unwrap_or(&lineage).source_headers();
        let size = FrameWriter::encoded_size(&headers, &payload);
        let item = Held {
            headers,
            payload,
            position,
        };
        if self.gathering_planned {
            let last = self.plan.front().is_some_and(|[_, last]| item.id() == last);
            self.hold(item, size);
            if last {
                self.plan.pop_front();
                self.gathering_planned = false;
                self.store_held(unit, false).await?;
            }
            return Ok(());
        }
        if self
            .plan
            .front()
            .is_some_and(|[first, _]| item.id() == first)
        {
            self.hold(item, size);
            self.gathering_planned = true;
            return Ok(());
        }
        if !self.plan.is_empty() || self.checking {
            // Published alone before the restart (or never): alone again.
            self.hold(item, size);
            return self.store_held(unit, true).await;
        }
        if !self.held.is_empty()
            && (self.held.len() >= self.most_items || self.held_bytes + size > self.most_bytes)
        {
            self.store_held(unit, true).await?;
        }
        self.hold(item, size);
        Ok(())
    }

    fn hold(&mut self, item: Held<P>, size: usize) {
        self.held_bytes += size;
        self.held.push(item);
    }

    /// Nothing else is ready now: stores what is held (a planned frame waits for its last item).
    pub(super) async fn flush(&mut self, unit: &SourceUnit) -> Result<(), SourceError> {
        if self.held.is_empty() || self.gathering_planned {
            return Ok(());
        }
        self.store_held(unit, true).await
    }

    /// Nothing else is ready, and the source will wait for more (a followed table): stores what is
    /// held, waits for every acknowledgement and writes the checkpoint, so that an idle source's
    /// checkpoint is where its items are. A planned frame still being gathered stays held.
    pub(super) async fn settle(&mut self, unit: &SourceUnit) -> Result<(), SourceError> {
        if self.gathering_planned {
            return Ok(());
        }
        self.flush(unit).await?;
        let confirmed = self.window.drain().await?;
        self.confirm(confirmed);
        if self.moved {
            self.save(unit).await?;
        }
        Ok(())
    }

    /// Stores what is held, waits for every acknowledgement and writes the checkpoint.
    pub(super) async fn finish(&mut self, unit: &SourceUnit) -> Result<(), SourceError> {
        if self.gathering_planned {
            // Stopped halfway through a frame an earlier run stored: the next run gathers it again.
            self.held.clear();
        }
        self.flush(unit).await?;
        let confirmed = self.window.drain().await?;
        self.confirm(confirmed);
        self.save(unit).await
    }

    /// Publishes what is held: alone, or as a frame listed in the checkpoint first (`new`: it is
    /// not listed yet).
    async fn store_held(&mut self, unit: &SourceUnit, new: bool) -> Result<(), SourceError> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let Some(last) = held.last() else {
            return Ok(());
        };
        let number = self.published;
        self.published += 1;
        let items = held.len() as u64;
        let last_position = last.position.clone();
        if let [first, .., last] = held.as_slice() {
            self.unconfirmed
                .push_back((number, [first.id().to_string(), last.id().to_string()]));
            if new {
                // Listed before it is published: should the process die once it is sent, the next
                // run knows where this frame ends.
                self.save(unit).await?;
            }
        }
        let last_id = held.last().map(|h| h.id().to_string()).unwrap_or_default();
        let ack = publish_items(unit, &held).await?;
        unit.sent(
            &last_id,
            serde_json::to_string(&last_position).unwrap_or_default(),
        );
        if crate::faults::due() {
            // Stored, and not checkpointed: where a restart must neither lose nor repeat it.
            let _ = ack.await;
            crate::faults::kill();
            return Ok(());
        }
        if self.checking {
            let epoch = *unit.disconnects.borrow();
            let stored = crate::acks::acknowledged(ack, epoch, &unit.disconnects).await??;
            if self.check_until.as_deref() == Some(last_id.as_str()) {
                self.check_until = None;
            }
            if !stored.duplicate && self.check_until.is_none() {
                self.checking = false;
            }
            Stats::add(&unit.stats.processed, items);
            self.confirm(Some((last_position, number)));
        } else {
            let confirmed = self
                .window
                .push((last_position, number), items, ack)
                .await?;
            self.confirm(confirmed);
        }
        if self.moved && self.saved_at.elapsed() >= CHECKPOINT_EVERY {
            self.save(unit).await?;
        }
        Ok(())
    }

    /// Every message up to number `n`, whose last item is at `position`, is stored.
    fn confirm(&mut self, confirmed: Option<(P, u64)>) {
        let Some((position, n)) = confirmed else {
            return;
        };
        while self.unconfirmed.front().is_some_and(|(m, _)| *m <= n) {
            self.unconfirmed.pop_front();
        }
        self.confirmed = Some(position);
        self.moved = true;
    }

    async fn save(&mut self, unit: &SourceUnit) -> Result<(), SourceError> {
        let resume = Resume {
            at: self.confirmed.clone(),
            frames: self
                .unconfirmed
                .iter()
                .map(|(_, ids)| ids.clone())
                .chain(self.plan.iter().cloned())
                .collect(),
        };
        unit.save_checkpoint(&resume).await?;
        self.moved = false;
        self.saved_at = Instant::now();
        Ok(())
    }
}

/// Publishes held items: alone as one message, several as a frame (`SourceUnit::publish_together`).
async fn publish_items<P>(unit: &SourceUnit, held: &[Held<P>]) -> Result<Stored, SourceError> {
    let items: Vec<(&HeaderMap, &Bytes)> = held.iter().map(|h| (&h.headers, &h.payload)).collect();
    unit.publish_together(&items).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Seq {
        seq: u64,
    }

    #[test]
    fn a_checkpoint_lists_its_frames_and_an_older_one_still_reads() {
        let resume = Resume {
            at: Some(Seq { seq: 7 }),
            frames: vec![["g:8".to_string(), "g:20".to_string()]],
        };
        let text = serde_json::to_string(&resume).unwrap();
        assert_eq!(text, r#"{"at":{"seq":7},"frames":[["g:8","g:20"]]}"#);
        assert_eq!(serde_json::from_str::<Resume<Seq>>(&text).unwrap(), resume);
        // Written before frames: the position alone, which is not a Resume.
        assert!(serde_json::from_str::<Resume<Seq>>(r#"{"seq":7}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Seq>(r#"{"seq":7}"#).unwrap(),
            Seq { seq: 7 }
        );
    }
}
