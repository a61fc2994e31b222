//! A join unit's items: each part a branch hands it (or a replayed letter of an item that failed
//! here) is added to what the join's bucket keeps of the item (`crate::join`); the part that
//! completes the item hands the joined item to the join's own steps, as if it had come in. Items
//! whose wait ran out are swept here too, into the dead letters or on with what arrived.

use std::time::Duration;

use switchyard_crds::books::{route, Counts};
use switchyard_crds::join::Part;
use switchyard_crds::join_state::{self, Ancestry, Arrival, Decision, Entry, Skipped};
use switchyard_crds::unit::TraceOutcome;
use tokio::sync::watch;

use crate::join::{now_ms, Arrived, Join, JoinError};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::steps::{Failure, StepFailure};
use crate::trace::Began;

use super::acknowledge::last_token;
use super::input::{AfterStored, Input, Processed};
use super::worker::{ConsumeError, Output, Worker};

/// Where a timed-out item's books are kept: it went on (or failed) without an input of its own.
const FROM_TIMEOUT: &str = "_timeout";

/// Where the item comes from, from a part (whose path ends at its branch) or a replayed letter
/// (whose path is the forked item's already).
fn ancestry_of(lineage: &Lineage, replayed: bool) -> Ancestry {
    let path = if replayed {
        lineage.path.clone()
    } else {
        lineage
            .path
            .rsplit_once(',')
            .map_or_else(String::new, |(before, _)| before.to_string())
    };
    Ancestry {
        origin: lineage.origin.clone(),
        origin_seq: lineage.origin_seq.clone(),
        path,
        traceparent: lineage.traceparent.clone(),
        tracestate: lineage.tracestate.clone(),
        traced: lineage.traced,
        replays: lineage.replays,
    }
}

/// The lineage of the joined item: the forked item's, under its id.
fn joined_lineage(item: &str, ancestry: &Ancestry) -> Lineage {
    Lineage {
        id: item.to_string(),
        origin: ancestry.origin.clone(),
        origin_seq: ancestry.origin_seq.clone(),
        path: ancestry.path.clone(),
        traceparent: ancestry.traceparent.clone(),
        tracestate: ancestry.tracestate.clone(),
        replays: ancestry.replays,
        traced: ancestry.traced,
        fork: None,
    }
}

/// What a branch's part says, for the join's branches; None for a part of a branch the join no
/// longer waits for (an edit removed it while it still had items on their way).
fn read_part(payload: &Payload, branches: &[String]) -> Result<Option<Arrival>, String> {
    let bytes = payload.clone().into_bytes();
    let part: Part = serde_json::from_slice(&bytes)
        .map_err(|e| format!("it is no branch's part of an item ({e})"))?;
    if !branches.contains(&part.branch) {
        tracing::debug!(
            branch = part.branch,
            "a part of a branch the join no longer waits for"
        );
        return Ok(None);
    }
    Ok(Some(match (part.failed, part.outputs) {
        (Some(error), _) => Arrival::Failure {
            branch: part.branch,
            error,
        },
        (None, outputs) => Arrival::Part {
            branch: part.branch,
            outputs: outputs.unwrap_or_default(),
        },
    }))
}

/// What a join did with a part, for the item's trace.
fn trace_note(arrived: &Arrived) -> Option<(TraceOutcome, String)> {
    Some(match arrived {
        Arrived::Waiting { failed: true, .. } => (
            TraceOutcome::Waiting,
            "kept with the failed item, for its replay".to_string(),
        ),
        Arrived::Waiting { missing, .. } => (
            TraceOutcome::Waiting,
            format!("waits for {}", missing.join(", ")),
        ),
        Arrived::Skipped(Skipped::Duplicate) => (
            TraceOutcome::Waiting,
            "stored already (delivered again)".to_string(),
        ),
        Arrived::Skipped(Skipped::Late) => (
            TraceOutcome::Late,
            "the item went on without it".to_string(),
        ),
        Arrived::Complete(entry) => {
            let parts: Vec<&str> = entry.parts.keys().map(String::as_str).collect();
            (TraceOutcome::Joined, format!("joined {}", parts.join(", ")))
        }
        Arrived::Failed(_) | Arrived::Held => return None,
    })
}

impl Worker {
    /// What a join makes of `input`; None for a replayed letter of the joined item's own steps,
    /// which runs as any item does.
    pub(super) async fn join_item(&self, join: &Join, input: &Input) -> Option<Processed> {
        let lineage = &input.lineage;
        let arrival = match (input.replayed, &lineage.fork) {
            (true, None) => return None,
            (true, Some(fork)) => {
                let letter = serde_json::from_slice(&input.payload.clone().into_bytes())
                    .unwrap_or(serde_json::Value::Null);
                Ok((
                    fork.clone(),
                    Arrival::Reopen {
                        parts: join_state::parts_of_letter(&letter, &join.branches),
                    },
                ))
            }
            (false, Some(fork)) => match read_part(&input.payload, &join.branches) {
                Ok(Some(arrival)) => Ok((fork.clone(), arrival)),
                Ok(None) => {
                    let lineage = lineage.clone();
                    return Some(Processed::of(lineage, None, None, Vec::new(), Vec::new()));
                }
                Err(e) => Err(e),
            },
            (false, None) => Err(format!(
                "it names no forked item (no {} header): only a branch's parts reach a join",
                switchyard_crds::unit::headers::FORK
            )),
        };
        let began = self.tracing(lineage).then(Began::now);
        let mut processed = Processed::of(lineage.clone(), began, None, Vec::new(), Vec::new());
        let (item, arrival) = match arrival {
            Ok(arrived) => arrived,
            Err(error) => {
                processed.failures.push(self.failed_whole(Failure {
                    item: input.payload.clone(),
                    error,
                    attempts: 1,
                    deliveries: None,
                }));
                return Some(processed);
            }
        };
        let ancestry = ancestry_of(lineage, input.replayed);
        let arrived = join.arrive(&item, arrival, &ancestry).await;
        if let Ok(arrived) = &arrived {
            processed.joined = trace_note(arrived);
        }
        match arrived {
            Ok(Arrived::Waiting { .. } | Arrived::Skipped(_)) => {}
            Ok(Arrived::Complete(entry)) => self.hand_on(join, &item, &entry, &mut processed).await,
            Ok(Arrived::Failed(entry)) => self.fail_joined(join, &item, &entry, &mut processed),
            Ok(Arrived::Held) => {
                processed.again_later = Some(ConsumeError::Held(format!(
                    "join `{}` waits on {} items already (join.maxWaiting): a part that starts another waits in the stream",
                    self.unit, join.config.max_waiting
                )))
            }
            Err(e @ JoinError::TooLarge { .. }) => {
                processed.failures.push(self.failed_whole(Failure {
                    item: input.payload.clone(),
                    error: e.to_string(),
                    attempts: 1,
                    deliveries: None,
                }))
            }
            Err(e) => processed.again_later = Some(e.into()),
        }
        Some(processed)
    }

    /// The joined item through the join's own steps; its outputs are the item's.
    async fn hand_on(&self, join: &Join, item: &str, entry: &Entry, processed: &mut Processed) {
        let lineage = joined_lineage(item, &entry.ancestry);
        let joined = join_state::joined(entry, &join.branches);
        let payload = Payload::Bytes(serde_json::to_vec(&joined).unwrap_or_default().into());
        let chained = crate::steps::run_chain_from(&self.steps, 0, payload.clone(), &lineage).await;
        let (outputs, failures) = self.oversized_to_dead_letters(payload, chained);
        processed.outputs = outputs;
        processed.failures = failures;
        processed.carried = Some(lineage);
    }

    /// The failed item's dead letter: what arrived, under an id of this wait (a replay waits again,
    /// and may fail again), naming the forked item so that its replay finds its parts.
    fn fail_joined(&self, join: &Join, item: &str, entry: &Entry, processed: &mut Processed) {
        let mut lineage = joined_lineage(item, &entry.ancestry);
        lineage.id = format!("{item}@{}", entry.since_ms);
        lineage.fork = Some(item.to_string());
        let letter = join_state::joined(entry, &join.branches);
        processed.failures.push(StepFailure {
            stage: format!("{} (join)", self.unit),
            step_index: 0,
            item_index: 0,
            replay_step: 0,
            failure: Failure {
                item: Payload::Bytes(serde_json::to_vec(&letter).unwrap_or_default().into()),
                error: join_state::failure_reason(
                    entry,
                    &self.unit,
                    &join.branches,
                    join.config.timeout_ms,
                ),
                attempts: 1,
                deliveries: None,
            },
        });
        processed.carried = Some(lineage);
        processed.after = Some(AfterStored::LetterStored(item.to_string()));
    }

    /// What a join notes once its items' outputs and letters are stored; the first item that must
    /// come again later, as the error that hands its input back.
    pub(super) async fn after_stored(&self, items: &mut [Processed]) -> Result<(), ConsumeError> {
        let Some(join) = &self.join else {
            return Ok(());
        };
        for item in items.iter_mut() {
            match item.after.take() {
                Some(AfterStored::LetterStored(key)) => join.letter_stored(&key).await?,
                Some(AfterStored::Closed(key)) => join.closed(&key).await?,
                None => {}
            }
        }
        match items.iter_mut().find_map(|i| i.again_later.take()) {
            Some(again) => Err(again),
            None => Ok(()),
        }
    }

    /// Until `stop`: finds what this replica waits on (and what a replica that died did), and
    /// sends each item whose wait ran out to the dead letters, or on with what arrived.
    pub async fn sweep_joins(&self, mut stop: watch::Receiver<bool>) {
        let Some(join) = &self.join else {
            return;
        };
        let tick = Duration::from_millis(join.config.timeout_ms / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut rescan_at = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= rescan_at {
                match join.scan().await {
                    Ok(found) => {
                        tracing::debug!(found, "read the join bucket for items waiting");
                        rescan_at = tokio::time::Instant::now() + crate::join::RESCAN_EVERY;
                    }
                    Err(e) => {
                        tracing::warn!("{e}; trying again");
                        rescan_at = tokio::time::Instant::now() + tick;
                    }
                }
            }
            for item in join.stale(now_ms()) {
                if let Err(e) = join.recheck(&item).await {
                    tracing::debug!(item, "{e}; read again later");
                }
            }
            join.report_oldest(now_ms());
            for item in join.due(now_ms()) {
                if let Err(e) = self.time_out(join, &item).await {
                    tracing::warn!(item, "{e}; the item's timeout is carried out later");
                }
            }
            tokio::select! {
                _ = crate::shutdown::stopped(&mut stop) => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// One item whose wait ran out (or whose failure or close a replica began): its dead letter,
    /// or what arrived through the join's steps, stored as an input's outputs would be, with
    /// books of their own.
    async fn time_out(&self, join: &Join, item: &str) -> Result<(), ConsumeError> {
        let entry = match join.expire(item).await? {
            Some(Decision::Fail(entry)) => {
                let lineage = joined_lineage(item, &entry.ancestry);
                let mut processed = Processed::of(lineage, None, None, Vec::new(), Vec::new());
                self.fail_joined(join, item, &entry, &mut processed);
                processed
            }
            Some(Decision::Close(entry)) => {
                let lineage = joined_lineage(item, &entry.ancestry);
                let mut processed = Processed::of(lineage, None, None, Vec::new(), Vec::new());
                self.hand_on(join, item, &entry, &mut processed).await;
                processed.after = Some(AfterStored::Closed(item.to_string()));
                processed
            }
            _ => return Ok(()),
        };
        let mut items = [entry];
        let emitted = self.emit(false, &mut items).await?;
        let counts = Counts {
            out: emitted.iter().map(|e| e.stored).sum(),
            ..Counts::default()
        };
        self.record_made(item, counts).await?;
        self.after_stored(&mut items).await
    }

    /// The books of what a timeout made (like a source's: nothing taken in).
    async fn record_made(&self, item: &str, counts: Counts) -> Result<(), ConsumeError> {
        let (Some(books), Output::Publish(subject)) = (&self.books, &self.output) else {
            return Ok(());
        };
        if counts.out == 0 {
            return Ok(());
        }
        let key = format!("{}/{}{FROM_TIMEOUT}", item, self.unit);
        books
            .record(&key, route(FROM_TIMEOUT, last_token(subject)), counts)
            .await?;
        Ok(())
    }
}
