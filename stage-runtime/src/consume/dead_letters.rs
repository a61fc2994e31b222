//! What fails goes to the unit's dead letters: a step's failure, an item that kept crashing its
//! process, a frame that cannot be read, an output larger than the server takes.

use async_nats::jetstream;
use switchyard_platform::frame::FrameError;

use crate::lineage::{dead_letter_headers, Lineage};
use crate::payload::Payload;
use crate::steps::{Failure, Step, StepFailure};

use super::input::{Emitted, Pending, Processed};
use super::worker::{ConsumeError, Output, Worker};
use switchyard_platform::frame::HEADERS_ROOM;

impl Worker {
    /// The dead letter of a message that crashed its unit's process `crashes` times when it ran alone.
    pub(super) fn crashed_it(&self, item: Payload, crashes: u32, delivered: u64) -> StepFailure {
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
    pub(super) fn failed_whole(&self, failure: Failure) -> StepFailure {
        StepFailure {
            stage: self.unit.clone(),
            step_index: 0,
            item_index: 0,
            replay_step: 0,
            failure,
        }
    }

    pub(super) fn unreadable_frame(&self, item: Payload, error: &FrameError) -> StepFailure {
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

    /// The most attempts a message gets in this unit: its steps' (or its sink's) `retry.maxAttempts`.
    pub(super) fn allowed_attempts(&self) -> u32 {
        match &self.output {
            Output::Sink { retry, .. } => retry.max_attempts,
            Output::Publish(_) => self.steps.iter().map(Step::max_attempts).max().unwrap_or(1),
        }
    }

    /// An output the server cannot take would fail its publish on every delivery: its input goes to
    /// the dead-letter subject at once instead, with the sizes.
    pub(super) fn oversized_to_dead_letters(
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

    pub(super) async fn dead_letter(
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

    /// Stores every item's failures as dead letters, noting them in what the item came to; how
    /// many.
    pub(super) async fn store_dead_letters(
        &self,
        items: &mut [Processed],
        emitted: &mut [Emitted],
        acks: &mut Pending,
    ) -> Result<u64, ConsumeError> {
        let mut dead = 0;
        for (item, emitted) in items.iter_mut().zip(emitted.iter_mut()) {
            for failure in std::mem::take(&mut item.failures) {
                dead += 1;
                emitted.dead_letters += 1;
                emitted.attempts = emitted.attempts.max(failure.failure.attempts);
                if emitted.dead.is_none() && self.tracer.is_some() {
                    emitted.dead = Some((failure.stage.clone(), failure.failure.error.clone()));
                }
                self.dead_letter(item.carried(), failure, acks).await?;
            }
        }
        Ok(dead)
    }
}
