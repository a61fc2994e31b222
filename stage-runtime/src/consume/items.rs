//! The items of an input through the unit's steps: a single item, a frame's items together or
//! one by one behind a crash record, or a batch as one JSON array.

use async_nats::jetstream::Message;
use switchyard_crds::books::Counts;
use switchyard_platform::frame::{self, FrameError};

use switchyard_crds::unit::TraceOutcome;

use crate::crashes::Verdict;
use crate::lineage::{names, Lineage, Replay};
use crate::payload::Payload;
use crate::trace::Began;

use super::input::{counts_of, unreadable_counts, Input, Items, Processed};
use super::worker::{ConsumeError, Worker};

impl Worker {
    /// Works on every item of one stored message (a single item, or a frame of them) and stores what
    /// they made. Returns the number of items.
    pub(super) async fn process_message(
        &self,
        message: &Message,
        verdict: Verdict,
    ) -> Result<Counts, ConsumeError> {
        self.process_items(message, Items::Together(verdict)).await
    }

    /// Works on the items of `message` (a single item, or a frame), together or one by one, and
    /// stores what they made. Returns what became of them.
    pub(super) async fn process_items(
        &self,
        message: &Message,
        how: Items,
    ) -> Result<Counts, ConsumeError> {
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
        // A join's outputs go out one by one: which items of a frame of parts complete depends
        // on what its store held when it came, so a frame delivered again may complete others,
        // and output frames would not come out the same (nor be dropped as duplicates).
        let framed = framed && self.join.is_none();
        let emitted = self.emit(framed, &mut processed).await?;
        self.after_stored(&mut processed).await?;
        let books = counts_of(count, &emitted, delivered > 1);
        for (item, emitted) in processed.into_iter().zip(emitted) {
            if item.began.is_some() || item.span.is_some() {
                let mut done = emitted.done(self.is_sink(), delivered);
                if let Some((outcome, note)) = item.joined {
                    if done.outcome != TraceOutcome::DeadLettered {
                        done.outcome = outcome;
                        done.note = Some(note);
                    }
                }
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
    pub(super) async fn run_item(
        &self,
        input: Input,
        verdict: Verdict,
        delivered: u64,
    ) -> Processed {
        if let (Some(join), Verdict::Run { .. }) = (&self.join, verdict) {
            if let Some(joined) = self.join_item(join, &input).await {
                return joined;
            }
        }
        let began = self.tracing(&input.lineage).then(Began::now);
        let (carried, span) = self.begin_span(&input.lineage, &[]);
        let run_with = carried.as_ref().unwrap_or(&input.lineage).clone();
        let (outputs, failures) = if let Verdict::DeadLetter { crashes } = verdict {
            let crashed = self.crashed_it(input.payload.clone(), crashes, delivered);
            (Vec::new(), vec![crashed])
        } else {
            let chained = crate::steps::run_chain_from(
                &self.steps,
                input.first_step,
                input.payload.clone(),
                &run_with,
            )
            .await;
            self.oversized_to_dead_letters(input.payload.clone(), chained)
        };
        let (carried, outputs, failures) = match &self.branch {
            Some(branch) => {
                let lineage = carried.as_ref().unwrap_or(&input.lineage);
                let (carried, outputs, failures) =
                    self.as_part(branch, &input, lineage, outputs, failures);
                (Some(carried), outputs, failures)
            }
            None => (carried, outputs, failures),
        };
        let mut item = Processed::of(input.lineage, began, span, outputs, failures);
        item.carried = carried;
        item
    }

    /// A frame delivered again, run alone (see `crashes`): whole the first time, as a single message
    /// is; if the process died while it did, item by item behind a record naming the item, so that
    /// only the item that kills the process is dead-lettered, never the others beside it.
    pub(super) async fn process_suspect_frame(
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
    pub(super) fn inputs(
        &self,
        message: &Message,
        stream_seq: u64,
    ) -> Result<Vec<Input>, FrameError> {
        let Some(items) = frame::items(message.headers.as_ref(), &message.payload) else {
            return Ok(vec![Input {
                lineage: Lineage::from_headers(message.headers.as_ref(), &self.stream, stream_seq),
                payload: Payload::Bytes(message.payload.clone()),
                first_step: Replay::of(message.headers.as_ref()).map_or(0, |r| r.step),
                replayed: Replay::of(message.headers.as_ref()).is_some_and(|r| r.unit == self.unit),
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
                    replayed: false,
                }
            })
            .collect())
    }

    /// A batch is one JSON array of the items of its messages; it carries the first item's ancestry.
    /// Returns the books of each message: its items share the batch's fate, and the batch's outputs
    /// are the first message's.
    pub(super) async fn process_batch(
        &self,
        messages: &[Message],
    ) -> Result<Vec<Counts>, ConsumeError> {
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
        let input = json_array(members.iter().map(|(member, _)| &member.payload));
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
        share_fate(
            &mut books,
            counts_of(1, std::slice::from_ref(&emitted), false),
        );
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
}

/// One JSON array of the payloads, in order: a batch's input.
fn json_array<'a>(payloads: impl Iterator<Item = &'a Payload> + Clone) -> Payload {
    let size = payloads.clone().map(|p| p.size() + 1).sum::<usize>() + 2;
    let mut array = Vec::with_capacity(size);
    array.push(b'[');
    for (i, payload) in payloads.enumerate() {
        if i > 0 {
            array.push(b',');
        }
        payload.write_as_json(&mut array);
    }
    array.push(b']');
    Payload::Bytes(array.into())
}

/// Each readable message of a batch shares the batch's `fate`, item for item; the batch's outputs
/// count as the first one's.
fn share_fate(books: &mut [Counts], fate: Counts) {
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
}
