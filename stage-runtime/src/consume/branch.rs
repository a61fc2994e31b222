//! A branch of a join: what its steps made of an item goes to the join as one part (every output,
//! in order, or the failure), so that the join knows when the branch is done with the item, also
//! when it made nothing of it.

use switchyard_crds::join::{BranchConfig, Part};

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::steps::{Failure, StepFailure};

use switchyard_platform::frame::HEADERS_ROOM;

use super::input::Input;
use super::worker::Worker;

/// An output as the join keeps it: JSON as it is, anything else as a JSON string.
fn as_value(payload: &Payload) -> serde_json::Value {
    let mut json = Vec::with_capacity(payload.size());
    payload.write_as_json(&mut json);
    serde_json::from_slice(&json).unwrap_or(serde_json::Value::Null)
}

/// The lineage a part goes with: the forked item's id in it, for the join's key. A replayed letter
/// of this branch carries the fork it came from; anything else forked here.
fn with_fork(lineage: &Lineage, input: &Input) -> Lineage {
    let mut carried = lineage.clone();
    carried.fork = match (&input.lineage.fork, input.replayed) {
        (Some(fork), true) => Some(fork.clone()),
        _ => Some(input.lineage.id.clone()),
    };
    carried
}

impl Worker {
    /// The part `branch` hands its join for `input`, from what the steps made of it, and the
    /// lineage it goes with: the forked item's id in it, for the join's key. A failed item leaves
    /// one dead letter, of the item as it came (a replay runs the whole branch again and makes the
    /// whole part), and the join learns of the failure.
    pub(super) fn as_part(
        &self,
        branch: &BranchConfig,
        input: &Input,
        lineage: &Lineage,
        outputs: Vec<Payload>,
        mut failures: Vec<StepFailure>,
    ) -> (Lineage, Vec<Payload>, Vec<StepFailure>) {
        if failures.is_empty() {
            match self.whole_part(branch, &outputs) {
                Ok(part) => {
                    let carried = with_fork(lineage, input);
                    return (carried, vec![Payload::Bytes(part.into())], Vec::new());
                }
                Err(too_large) => failures.push(self.failed_whole(Failure {
                    item: input.payload.clone(),
                    error: too_large,
                    attempts: 1,
                    deliveries: None,
                })),
            }
        }
        // Failed: one letter, of the item as it came; the join learns why.
        let attempts = failures
            .iter()
            .map(|f| f.failure.attempts)
            .max()
            .unwrap_or(1);
        let Some(first) = failures.into_iter().next() else {
            return (with_fork(lineage, input), Vec::new(), Vec::new());
        };
        let error = first.failure.error.clone();
        let letter = StepFailure {
            stage: first.stage,
            step_index: first.step_index,
            item_index: 0,
            replay_step: input.first_step,
            failure: Failure {
                item: input.payload.clone(),
                error: error.clone(),
                attempts,
                deliveries: first.failure.deliveries,
            },
        };
        let part = Part {
            branch: branch.name.clone(),
            outputs: None,
            failed: Some(error),
        };
        let payload = serde_json::to_vec(&part).unwrap_or_default();
        (
            with_fork(lineage, input),
            vec![Payload::Bytes(payload.into())],
            vec![letter],
        )
    }

    /// The part of an item the branch finished, as stored; why not, when its outputs (each small
    /// enough) do not fit in one message together: the part could never be stored, and its input
    /// would come back for ever.
    fn whole_part(&self, branch: &BranchConfig, outputs: &[Payload]) -> Result<Vec<u8>, String> {
        let part = Part {
            branch: branch.name.clone(),
            outputs: Some(outputs.iter().map(as_value).collect()),
            failed: None,
        };
        let bytes = serde_json::to_vec(&part).unwrap_or_default();
        let limit = self.max_payload.saturating_sub(HEADERS_ROOM);
        if bytes.len() > limit {
            return Err(format!(
                "the branch made {} outputs of this item, {} bytes together, more than the {limit} one part for the join may hold: the item is dead-lettered instead",
                outputs.len(),
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}
