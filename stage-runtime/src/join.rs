//! A join unit's store: the Pipeline's join bucket, where the parts of each item it waits on are
//! kept (`switchyard_crds::join_state` decides, this reads and writes). Every write names the
//! revision it read, so replicas (and the items in flight in one) that add parts of one item at
//! once never lose one another's: the loser reads again and decides again.
//!
//! Each replica also remembers the items it saw waiting and when their wait began, to time them
//! out (`due`); what a replica that died was waiting on is found by the scan each one makes as it
//! starts, and again every `RESCAN_EVERY`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use switchyard_crds::join::{bucket_key, item_of_key, JoinConfig};
use switchyard_crds::unit::JoinReport;

use crate::locks::lock;
use crate::stats::Stats;
use switchyard_crds::join_state::{
    self, Ancestry, Arrival, Decision, Entry, Found, Skipped, State, BY_TIMEOUT,
};

/// How often a replica reads the whole bucket again for items nobody remembers (their replica died).
pub const RESCAN_EVERY: Duration = Duration::from_secs(300);
/// The headers of a key-value write: over which revision, and for how long it stays.
const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
const MESSAGE_TTL: &str = "Nats-TTL";
/// How long a replica trusts that an item it saw waiting still waits, and how many it reads again
/// at once.
const RECHECK_EVERY: Duration = Duration::from_secs(5);
const RECHECK_AT_ONCE: usize = 256;
/// Attempts at one item's write when other writers keep winning.
const MOST_CONFLICTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot read item {item} from the join bucket {bucket}: {source}")]
    Read {
        item: String,
        bucket: String,
        source: kv::EntryError,
    },
    #[error("cannot write item {item} to the join bucket {bucket}: {source}")]
    Write {
        item: String,
        bucket: String,
        source: async_nats::jetstream::context::PublishError,
    },
    #[error(
        "item {item} kept changing under {MOST_CONFLICTS} attempts to write it to the join bucket"
    )]
    Contended { item: String },
    #[error("the parts of item {item} come to {size} bytes, more than the {limit} a value of the join bucket may hold")]
    TooLarge {
        item: String,
        size: usize,
        limit: usize,
    },
    #[error("cannot list the join bucket {bucket}: {reason}")]
    Scan { bucket: String, reason: String },
}

/// What became of an arrival.
#[derive(Debug)]
pub enum Arrived {
    /// Stored; the item waits for more (for these branches), or, failed, keeps it for its replay.
    Waiting {
        missing: Vec<String>,
        failed: bool,
    },
    Skipped(Skipped),
    /// Every branch has given its part (the entry says so now): hand it on.
    Complete(Entry),
    /// Stored as failed: dead-letter it, then `letter_stored`.
    Failed(Entry),
    /// The replica waits on `max_waiting` items already: the part that would start another must wait.
    Held,
}

pub struct Join {
    pub config: JoinConfig,
    pub unit: String,
    /// The branch names, in the join's order.
    pub branches: Vec<String>,
    store: kv::Store,
    js: async_nats::jetstream::Context,
    /// The largest value the bucket takes.
    max_value: usize,
    /// Items this replica saw waiting, by key: when their wait began and when this replica last
    /// read it so (ms since the epoch). Another replica may finish an item: `recheck` reads those
    /// not read for `RECHECK_EVERY` again, so that the count reported drops within seconds.
    waiting: Mutex<HashMap<String, (u64, u64)>>,
    /// Waits being started (their first part on its way to the bucket): counted against
    /// `max_waiting` with those in `waiting`, so that parts in flight at once cannot all pass it.
    starting: Mutex<usize>,
    /// Where the count of `waiting` is reported, as it changes.
    stats: Arc<Stats>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Join {
    pub fn new(
        unit: &str,
        config: JoinConfig,
        store: kv::Store,
        js: async_nats::jetstream::Context,
        max_value: usize,
        stats: Arc<Stats>,
    ) -> Join {
        Join {
            branches: config.branches.iter().map(|b| b.name.clone()).collect(),
            config,
            unit: unit.to_string(),
            store,
            js,
            max_value,
            waiting: Mutex::new(HashMap::new()),
            starting: Mutex::new(0),
            stats,
        }
    }

    fn remember(&self, key: &str, since: Option<u64>) {
        let mut waiting = lock(&self.waiting);
        match since {
            Some(since) => waiting.insert(key.to_string(), (since, now_ms())),
            None => waiting.remove(key),
        };
        let count = waiting.len() as u64;
        drop(waiting);
        let mut report = lock(&self.stats.join);
        report.get_or_insert_with(JoinReport::default).waiting = count;
    }

    /// Reports how long the oldest item has waited (the count is kept as it changes).
    pub fn report_oldest(&self, now_ms: u64) {
        let (count, oldest) = self.waiting();
        let mut report = lock(&self.stats.join);
        *report = Some(JoinReport {
            waiting: count as u64,
            oldest_wait_ms: oldest.map_or(0, |since| now_ms.saturating_sub(since)),
        });
    }

    /// Whether another wait may start (counted as starting when it may).
    fn may_start(&self) -> bool {
        // Both held at once (always in this order): a wait being written is counted in one or
        // the other, or for a moment in both, never in neither.
        let waiting = lock(&self.waiting);
        let mut starting = lock(&self.starting);
        if waiting.len() + *starting >= self.config.max_waiting as usize {
            return false;
        }
        *starting += 1;
        true
    }

    /// A wait `may_start` let through is written (it is in `waiting` now) or not.
    fn started(&self) {
        let mut starting = lock(&self.starting);
        *starting = starting.saturating_sub(1);
    }

    /// Items waiting in this replica, and when the oldest began to.
    pub fn waiting(&self) -> (usize, Option<u64>) {
        let waiting = lock(&self.waiting);
        (
            waiting.len(),
            waiting.values().map(|(since, _)| *since).min(),
        )
    }

    /// The items (their forked ids) whose wait began `timeout_ms` ago or more.
    pub fn due(&self, now_ms: u64) -> Vec<String> {
        let waiting = lock(&self.waiting);
        waiting
            .iter()
            .filter(|(_, (since, _))| now_ms >= since.saturating_add(self.config.timeout_ms))
            .filter_map(|(key, _)| item_of_key(&self.unit, key))
            .collect()
    }

    /// Up to `RECHECK_AT_ONCE` of the items remembered waiting that this replica has not read for
    /// `RECHECK_EVERY`: another replica may have finished them.
    pub fn stale(&self, now_ms: u64) -> Vec<String> {
        let waiting = lock(&self.waiting);
        let every = RECHECK_EVERY.as_millis() as u64;
        waiting
            .iter()
            .filter(|(_, (_, checked))| now_ms >= checked.saturating_add(every))
            .filter_map(|(key, _)| item_of_key(&self.unit, key))
            .take(RECHECK_AT_ONCE)
            .collect()
    }

    /// Reads `item` again: remembered as waiting only while it is.
    pub async fn recheck(&self, item: &str) -> Result<(), JoinError> {
        let key = bucket_key(&self.unit, item);
        let since = match self.read(item, &key).await?.0 {
            Found::Entry(entry) => Self::remembered_since(&entry),
            Found::Nothing | Found::Finished => None,
        };
        self.remember(&key, since);
        Ok(())
    }

    /// What the bucket holds for `key`, and the revision to write over it (0: nothing).
    async fn read(&self, item: &str, key: &str) -> Result<(Found, u64), JoinError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|source| JoinError::Read {
                item: item.to_string(),
                bucket: self.config.bucket.clone(),
                source,
            })?;
        Ok(match entry {
            None => (Found::Nothing, 0),
            Some(e) if matches!(e.operation, Operation::Delete | Operation::Purge) => {
                (Found::Finished, e.revision)
            }
            Some(e) => {
                match serde_json::from_slice::<Entry>(&e.value) {
                    Ok(entry) => (Found::Entry(entry), e.revision),
                    Err(err) => {
                        // Not ours to read: start again over it rather than stop the join.
                        tracing::warn!(item, "the join bucket holds no entry we can read ({err}); it is started afresh");
                        (Found::Nothing, e.revision)
                    }
                }
            }
        })
    }

    /// Writes `entry` over `revision` (with a time to live when it is finished); None when
    /// another writer came first.
    async fn write(
        &self,
        item: &str,
        key: &str,
        entry: &Entry,
        revision: u64,
    ) -> Result<Option<u64>, JoinError> {
        let value = serde_json::to_vec(entry).unwrap_or_default();
        if value.len() > self.max_value {
            return Err(JoinError::TooLarge {
                item: item.to_string(),
                size: value.len(),
                limit: self.max_value,
            });
        }
        let subject = format!(
            "{}{key}",
            self.store
                .put_prefix
                .as_deref()
                .unwrap_or(&self.store.prefix)
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        if matches!(entry.state, State::Finished { .. }) {
            let ttl = (self.config.finished_kept_ms / 1000).max(1);
            headers.insert(MESSAGE_TTL, ttl.to_string().as_str());
        }
        let written = match self
            .js
            .publish_with_headers(subject, headers, value.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match written {
            Ok(ack) => {
                self.remember(key, Self::remembered_since(entry));
                Ok(Some(ack.sequence))
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(source) => Err(JoinError::Write {
                item: item.to_string(),
                bucket: self.config.bucket.clone(),
                source,
            }),
        }
    }

    /// When this replica counts `entry` as waiting from: a wait, from when it began; a failure or
    /// close a replica began and did not carry out, from the epoch (due at once); nothing else.
    fn remembered_since(entry: &Entry) -> Option<u64> {
        match entry.state {
            State::Waiting => Some(entry.since_ms),
            ref state if state.open() => Some(0),
            _ => None,
        }
    }

    /// Adds what arrived for `item` (the forked item's id) to what the bucket keeps of it.
    pub async fn arrive(
        &self,
        item: &str,
        arrival: Arrival,
        ancestry: &Ancestry,
    ) -> Result<Arrived, JoinError> {
        let key = bucket_key(&self.unit, item);
        for _ in 0..MOST_CONFLICTS {
            let (found, revision) = self.read(item, &key).await?;
            let starts = found == Found::Nothing;
            let finished =
                matches!(&found, Found::Entry(e) if matches!(e.state, State::Finished { .. }));
            match join_state::arrive(found, arrival.clone(), ancestry, &self.branches, now_ms()) {
                Decision::Skip(skipped) => return Ok(Arrived::Skipped(skipped)),
                // Stored before the item is handed on: should the process die in between, the
                // part that completed it is delivered again and hands it on again.
                Decision::Complete(entry) => {
                    if finished || self.write(item, &key, &entry, revision).await?.is_some() {
                        self.remember(&key, None);
                        return Ok(Arrived::Complete(entry));
                    }
                }
                Decision::Write(entry) | Decision::Close(entry) => {
                    if starts && !self.may_start() {
                        return Ok(Arrived::Held);
                    }
                    let written = self.write(item, &key, &entry, revision).await;
                    if starts {
                        self.started();
                    }
                    if written?.is_some() {
                        let missing = join_state::missing(&entry, &self.branches);
                        return Ok(Arrived::Waiting {
                            missing: missing.into_iter().map(str::to_string).collect(),
                            failed: matches!(entry.state, State::Failed { .. }),
                        });
                    }
                }
                Decision::Fail(entry) => {
                    if self.write(item, &key, &entry, revision).await?.is_some() {
                        return Ok(Arrived::Failed(entry));
                    }
                }
            }
        }
        Err(JoinError::Contended {
            item: item.to_string(),
        })
    }

    /// What a replica must do now for `item`, whose wait it remembers as due: the decision of
    /// `expire`, written; None when there is nothing to do (it went on, or waits on).
    pub async fn expire(&self, item: &str) -> Result<Option<Decision>, JoinError> {
        let key = bucket_key(&self.unit, item);
        for _ in 0..MOST_CONFLICTS {
            let (found, revision) = self.read(item, &key).await?;
            let Found::Entry(entry) = found else {
                self.remember(&key, None);
                return Ok(None);
            };
            let state = entry.state.clone();
            let Some(decision) = join_state::expire(
                entry.clone(),
                &self.branches,
                (self.config.on_timeout, self.config.timeout_ms),
                now_ms(),
            ) else {
                self.remember(&key, (state == State::Waiting).then_some(entry.since_ms));
                return Ok(None);
            };
            let (Decision::Fail(next) | Decision::Close(next)) = &decision else {
                return Ok(None);
            };
            if next.state == state {
                // Begun by a replica that did not finish: carry it out, nothing to write.
                return Ok(Some(decision));
            }
            if self.write(item, &key, next, revision).await?.is_some() {
                return Ok(Some(decision));
            }
        }
        Err(JoinError::Contended {
            item: item.to_string(),
        })
    }

    /// The item went on at its timeout with what arrived: its entry is finished.
    pub async fn closed(&self, item: &str) -> Result<(), JoinError> {
        let finished = State::Finished {
            by: BY_TIMEOUT.to_string(),
        };
        self.carried_out(item, State::Closing, finished).await
    }

    /// The failed item's dead letter is stored: nobody needs to store it again.
    pub async fn letter_stored(&self, item: &str) -> Result<(), JoinError> {
        let stored = State::Failed {
            letter_stored: true,
        };
        let pending = State::Failed {
            letter_stored: false,
        };
        self.carried_out(item, pending, stored).await
    }

    /// What a replica began for `item` (in state `from`) is done: it is in state `to` now, unless
    /// something else changed it meanwhile.
    async fn carried_out(&self, item: &str, from: State, to: State) -> Result<(), JoinError> {
        let key = bucket_key(&self.unit, item);
        for _ in 0..MOST_CONFLICTS {
            let (found, revision) = self.read(item, &key).await?;
            let Found::Entry(mut entry) = found else {
                break;
            };
            if entry.state != from {
                break;
            }
            entry.state = to.clone();
            if self.write(item, &key, &entry, revision).await?.is_some() {
                break;
            }
        }
        self.remember(&key, None);
        Ok(())
    }

    /// Reads every item of this join in the bucket and remembers those that wait, or whose
    /// failure or close a replica began and did not finish.
    pub async fn scan(&self) -> Result<usize, JoinError> {
        let scan_error = |reason: String| JoinError::Scan {
            bucket: self.config.bucket.clone(),
            reason,
        };
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| scan_error(e.to_string()))?;
        let mut found = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| scan_error(e.to_string()))?;
            let Some(item) = item_of_key(&self.unit, &key) else {
                continue;
            };
            if let (Found::Entry(entry), _) = self.read(&item, &key).await? {
                let since = match entry.state {
                    State::Waiting if join_state::missing(&entry, &self.branches).is_empty() => {
                        Some(0)
                    }
                    _ => Self::remembered_since(&entry),
                };
                if since.is_some() {
                    found += 1;
                    self.remember(&key, since);
                }
            }
        }
        Ok(found)
    }
}
