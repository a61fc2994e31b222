//! A branch of a join: what its steps made of an item goes to the join as one part (every output,
//! in order, or the failure), so that the join knows when the branch is done with the item, also
//! when it made nothing of it.

use switchyard_crds::join::{BranchConfig, Part};

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::steps::{Failure, StepFailure};

use super::input::Input;
use super::worker::Worker;

/// An output as the join keeps it: JSON as it is, anything else as a JSON string.
fn as_value(payload: &Payload) -> serde_json::Value {
    let mut json = Vec::with_capacity(payload.size());
    payload.write_as_json(&mut json);
    serde_json::from_slice(&json).unwrap_or(serde_json::Value::Null)
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
        failures: Vec<StepFailure>,
    ) -> (Lineage, Vec<Payload>, Vec<StepFailure>) {
        let mut carried = lineage.clone();
        // A replayed letter of this branch carries the fork it came from; anything else forked here.
        carried.fork = match (&input.lineage.fork, input.replayed) {
            (Some(fork), true) => Some(fork.clone()),
            _ => Some(input.lineage.id.clone()),
        };
        let (part, letters) = match failures.first() {
            None => (
                Part {
                    branch: branch.name.clone(),
                    outputs: Some(outputs.iter().map(as_value).collect()),
                    failed: None,
                },
                Vec::new(),
            ),
            Some(first) => {
                let error = first.failure.error.clone();
                let letter = StepFailure {
                    stage: first.stage.clone(),
                    step_index: first.step_index,
                    item_index: 0,
                    replay_step: input.first_step,
                    failure: Failure {
                        item: input.payload.clone(),
                        error: error.clone(),
                        attempts: failures
                            .iter()
                            .map(|f| f.failure.attempts)
                            .max()
                            .unwrap_or(1),
                        deliveries: first.failure.deliveries,
                    },
                };
                (
                    Part {
                        branch: branch.name.clone(),
                        outputs: None,
                        failed: Some(error),
                    },
                    vec![letter],
                )
            }
        };
        let payload = serde_json::to_vec(&part).unwrap_or_default();
        (carried, vec![Payload::Bytes(payload.into())], letters)
    }
}
