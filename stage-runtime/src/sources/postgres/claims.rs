//! The rows of a table dispatched as jobs.
//!
//! Rows are claimed in key order, a batch at a time, with `FOR UPDATE SKIP LOCKED` inside a CTE (so
//! that the planner cannot update more rows than the limit, and claimers never wait for each
//! other). A claim writes a lease into the row: a reservation token (`<namespace>/<pipeline>/
//! <unit>/<random>`), the time, the attempt (one more than before) and the start time. Each row
//! becomes an item with the id `<table>/<key>/<attempt>`, so that a row published again after a
//! crash, within JetStream's duplicate window, is stored once. A claim's rows go out in frames as
//! full as the readers take, cut in key order, so that the same rows of a claim make the same
//! frames (named by their first and last items) and a claim published again is dropped as a whole.
//!
//! A row's outcome is written back fenced by its reservation (`… AND reservation = $token`): a
//! replica whose lease ran out, and whose row another attempt took, changes nothing. A row whose last
//! lease ran out after `maxAttempts` claims is finished as failed, never left stuck. On start, the
//! source takes back its own earlier claims (those whose token names its unit) and publishes them
//! again under their ids instead of waiting for their leases.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::FutureExt;
use switchyard_crds::postgres::{
    CompleteOn, PostgresSource as Settings, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_CLAIMED, DEFAULT_POLL, DEFAULT_SOURCE_BATCH,
};
use switchyard_crds::RowCounts;
use switchyard_platform::frame::FrameWriter;

use super::statements::{
    claims_read_unfinished_rows_only, like_escaped, statements, Statements, BIG_TABLE,
};
use super::table::{duration, listen, open_table, refused, wait_for_rows};
use super::tracker::{write_outcomes, Done, Open, Tracker};
use crate::lineage::Lineage;
use crate::postgres::{quoted, Database};
use crate::sources::error::SourceError;
use crate::sources::publish::{record_emitted, Stored};
use crate::sources::unit::SourceUnit;

/// How long the source waits before it looks again while `maxClaimed` rows are open (unless the
/// tracker wakes it first).
const FULL_PAUSE: Duration = Duration::from_millis(20);
/// How often the source counts where its table's rows stand, at most (see `Dispatcher::count`).
const COUNT_EVERY: Duration = Duration::from_secs(5);

/// Messages sent and not yet known stored, each with the rows it holds, in the order sent.
type InFlight = VecDeque<(Vec<Claimed>, Stored)>;

/// Publishes held rows as one message; the rows with the future of their storing.
async fn publish_held(
    unit: &SourceUnit,
    held: Vec<(Claimed, HeaderMap, Bytes)>,
) -> Result<(Vec<Claimed>, Stored), SourceError> {
    let stored = {
        let items: Vec<(&HeaderMap, &Bytes)> = held.iter().map(|(_, h, p)| (h, p)).collect();
        unit.publish_together(&items).await?
    };
    Ok((held.into_iter().map(|(row, ..)| row).collect(), stored))
}

/// A claimed row on its way.
struct Claimed {
    key: String,
    attempt: i32,
    reservation: String,
    item: String,
}

impl Claimed {
    /// A row as the claim and take-back statements return it: key, attempt, item.
    fn of(row: &tokio_postgres::Row, reservation: String) -> Claimed {
        Claimed {
            key: row.get(0),
            attempt: row.get(1),
            reservation,
            item: row
                .get::<_, Option<String>>(2)
                .unwrap_or_else(|| "null".into()),
        }
    }
}

/// Claims, publishes and writes back until the unit stops, or the table is done (`endWhenEmpty`).
pub(super) async fn run(settings: &Settings, unit: &SourceUnit) -> Result<(), SourceError> {
    let outcome = settings.outcome();
    let written: Vec<String> = outcome.all().iter().map(|c| c.to_string()).collect();
    let table = open_table(
        settings,
        unit,
        &written,
        "name the table's own outcome columns under postgres.outcome",
    )
    .await?;
    let key_type = table.column_type(&settings.key).await?;
    let statements = statements(settings, &outcome, &key_type);
    table
        .prepare(&[
            &statements.claim,
            &statements.give_up,
            &statements.finish,
            &statements.take_back,
            &statements.count,
        ])
        .await?;
    let (predicates, size) = table
        .database
        .partial_indexes_on(&table.name, &settings.key)
        .await
        .map_err(|e| table.refused_for_table(e))?;
    if size >= BIG_TABLE && !claims_read_unfinished_rows_only(&predicates, &outcome.success) {
        tracing::warn!(
            "postgres source {}: table {} has no index on {} of its unfinished rows alone: each claim reads every finished row before the first it takes, and claims slow down as the table is done (on 100,000 rows, 37 ms a claim of 500 rather than 6). Add one: CREATE INDEX ON {} ({}) WHERE {} IS NULL",
            unit.name,
            settings.table,
            settings.key,
            table.name,
            quoted(&settings.key),
            quoted(&outcome.success)
        );
    }
    let failed = |e: String| refused(unit, e);
    let dispatcher = Dispatcher {
        settings,
        database: table.database,
        statements,
        lease: duration(&settings.lease, DEFAULT_LEASE).map_err(failed)?,
        poll: duration(&settings.poll, DEFAULT_POLL).map_err(failed)?,
        max_attempts: settings.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS) as i32,
        batch: settings.batch.unwrap_or(DEFAULT_SOURCE_BATCH) as i64,
        max_claimed: settings.max_claimed.unwrap_or(DEFAULT_MAX_CLAIMED) as usize,
        // `switchyard.<namespace>.<pipeline>.<unit>/`: this unit's claims, no other's.
        token_prefix: format!("{}/", unit.queue_group),
    };
    unit.resuming(|| dispatcher.dispatch(unit)).await
}

struct Dispatcher<'a> {
    settings: &'a Settings,
    database: Database,
    statements: Statements,
    lease: Duration,
    poll: Duration,
    max_attempts: i32,
    batch: i64,
    max_claimed: usize,
    /// What every reservation of this unit starts with: its earlier claims are known by it.
    token_prefix: String,
}

impl Dispatcher<'_> {
    /// Claims, publishes and writes back until the unit stops, or the table is done
    /// (`endWhenEmpty`).
    async fn dispatch(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let mut in_flight = InFlight::new();
        // Earlier claims of this unit: published again under the same ids, so that what the stream
        // has already is not stored twice.
        let earlier = self.take_back().await?;
        if !earlier.is_empty() {
            tracing::info!(
                rows = earlier.len(),
                "taking back the rows this source had claimed before it restarted"
            );
        }
        let tracker = match self.settings.complete_on.unwrap_or_default() {
            CompleteOn::Publish => None,
            CompleteOn::Finished => {
                let config = unit.jobs.as_ref().ok_or_else(|| {
                    SourceError::Settings(
                        "the unit's configuration names no jobs stream: it was written by an older switchyard; apply the Pipeline again".into(),
                    )
                })?;
                let known = earlier.iter().map(|row| self.job(unit, row)).collect();
                Some(
                    Tracker::start(
                        unit,
                        config,
                        self.database.clone(),
                        self.statements.finish.clone(),
                        known,
                        self.lease,
                    )
                    .await?,
                )
            }
        };
        // Each claim's rows framed as they were the first time: the frames the stream has are
        // made again, under the same ids, and dropped.
        let mut claims: std::collections::BTreeMap<String, Vec<Claimed>> = Default::default();
        for row in earlier {
            claims.entry(row.reservation.clone()).or_default().push(row);
        }
        for rows in claims.into_values() {
            self.publish_rows(unit, rows, &mut in_flight).await?;
        }
        // Woken by a NOTIFY as well as by the poll, when the table has a trigger that says so.
        let mut woken = listen(self.settings, &self.database);
        let result = self
            .claim_and_publish(unit, &mut in_flight, tracker.as_ref(), &mut woken)
            .await;
        match tracker {
            Some(tracker) => {
                let finished = tracker.finish().await;
                result.and(finished)
            }
            None => result,
        }
    }

    /// The job a claimed row is, as the tracker follows it: where it starts, before its item is
    /// published (an account of it never comes first).
    fn job(&self, unit: &SourceUnit, row: &Claimed) -> (String, Open) {
        (
            format!("{}/{}", row.key, row.attempt),
            Open {
                key: row.key.clone(),
                reservation: row.reservation.clone(),
                state: switchyard_crds::jobs::JobState::started(&self.item_id(row), &unit.readers),
                accounts: Vec::new(),
                since: std::time::Instant::now(),
            },
        )
    }

    fn item_id(&self, row: &Claimed) -> String {
        format!("{}/{}/{}", self.settings.table, row.key, row.attempt)
    }

    async fn claim_and_publish(
        &self,
        unit: &SourceUnit,
        in_flight: &mut InFlight,
        tracker: Option<&Tracker>,
        woken: &mut Option<tokio::sync::mpsc::Receiver<()>>,
    ) -> Result<(), SourceError> {
        let mut last_sweep = std::time::Instant::now() - self.poll;
        let mut next_count = std::time::Instant::now();
        loop {
            self.settle(unit, in_flight, false).await?;
            if unit.stopping() {
                break;
            }
            if last_sweep.elapsed() >= self.poll {
                self.give_up().await?;
                last_sweep = std::time::Instant::now();
            }
            if std::time::Instant::now() >= next_count {
                let started = std::time::Instant::now();
                self.count(unit).await?;
                // Counting reads the whole table: on a big one, count less often.
                next_count = std::time::Instant::now() + (started.elapsed() * 20).max(COUNT_EVERY);
            }
            // Claim no further ahead of the workers than maxClaimed: a lease runs from the claim.
            let open = tracker.map_or_else(
                || in_flight.iter().map(|(rows, _)| rows.len()).sum(),
                Tracker::open,
            );
            if open >= self.max_claimed {
                let freed = async {
                    match tracker {
                        Some(tracker) => tracker.freed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = freed => {}
                    alive = unit.sleep_or_stop(FULL_PAUSE) => if !alive { break },
                }
                continue;
            }
            let claimed = self
                .claim(self.batch.min((self.max_claimed - open) as i64))
                .await?;
            if claimed.is_empty() {
                self.settle(unit, in_flight, true).await?;
                if self.settings.end_when_empty {
                    let rows = self.count(unit).await?;
                    if rows.waiting + rows.claimed == 0 {
                        tracing::info!(
                            succeeded = rows.succeeded,
                            failed = rows.failed,
                            "every row is done: the source ends"
                        );
                        return Ok(());
                    }
                }
                if !wait_for_rows(unit, self.poll, woken).await {
                    break;
                }
                continue;
            }
            if let Some(tracker) = tracker {
                for row in &claimed {
                    let (job, open) = self.job(unit, row);
                    tracker.follow(job, open);
                }
            }
            self.publish_rows(unit, claimed, in_flight).await?;
        }
        self.settle(unit, in_flight, true).await
    }

    /// Publishes the rows of one claim, in key order, in frames as full as the readers take (a
    /// lone row as itself): the same rows of a claim make the same frames, under the same ids.
    async fn publish_rows(
        &self,
        unit: &SourceUnit,
        rows: Vec<Claimed>,
        in_flight: &mut InFlight,
    ) -> Result<(), SourceError> {
        let (most_items, most_bytes) = unit.frame_limits();
        let mut held: Vec<(Claimed, HeaderMap, Bytes)> = Vec::new();
        let mut held_bytes = 0;
        for row in rows {
            let (headers, payload) = self.item(unit, &row).await;
            let size = FrameWriter::encoded_size(&headers, &payload);
            if !held.is_empty() && (held.len() >= most_items || held_bytes + size > most_bytes) {
                in_flight.push_back(publish_held(unit, std::mem::take(&mut held)).await?);
                held_bytes = 0;
            }
            held_bytes += size;
            held.push((row, headers, payload));
        }
        if !held.is_empty() {
            in_flight.push_back(publish_held(unit, held).await?);
        }
        Ok(())
    }

    /// A row as an item: its headers (its id, `<table>/<key>/<attempt>`, and lineage) and payload.
    async fn item(&self, unit: &SourceUnit, row: &Claimed) -> (HeaderMap, Bytes) {
        let mut lineage = Lineage::at_source(
            &unit.name,
            format!("{}/{}", row.key, row.attempt),
            self.item_id(row),
        );
        let carried = record_emitted(unit.tracer.as_ref(), unit.spans.as_ref(), &mut lineage).await;
        let headers = carried.as_ref().unwrap_or(&lineage).source_headers();
        (headers, Bytes::from(row.item.clone()))
    }

    /// Waits for the publishes that are done (all of them with `all`), and writes back the rows
    /// they complete.
    async fn settle(
        &self,
        unit: &SourceUnit,
        in_flight: &mut InFlight,
        all: bool,
    ) -> Result<(), SourceError> {
        let mut done = Vec::new();
        while let Some((_, stored)) = in_flight.front_mut() {
            let result = if all {
                Some(stored.await)
            } else {
                stored.now_or_never()
            };
            let Some(result) = result else { break };
            let (rows, _) = in_flight.pop_front().expect("the front");
            result?;
            if crate::faults::due() {
                // Stored, not yet written back: the rows are still this source's claims.
                crate::faults::kill();
            }
            crate::stats::Stats::add(&unit.stats.processed, rows.len() as u64);
            if self.settings.complete_on == Some(CompleteOn::Publish) {
                done.extend(rows.into_iter().map(|row| Done {
                    key: row.key,
                    reservation: row.reservation,
                    success: true,
                    error: None,
                }));
            }
        }
        self.finish(done).await
    }

    /// Writes the outcomes back, each fenced by its reservation.
    async fn finish(&self, done: Vec<Done>) -> Result<(), SourceError> {
        write_outcomes(&self.database, &self.statements.finish, &done).await?;
        Ok(())
    }

    /// Claims up to `limit` rows.
    async fn claim(&self, limit: i64) -> Result<Vec<Claimed>, SourceError> {
        let reservation = format!("{}{}", self.token_prefix, nuid::next());
        let lease_ms = self.lease.as_millis() as i64;
        let rows = self
            .until_reachable(
                &self.statements.claim,
                &[&reservation, &limit, &lease_ms, &self.max_attempts],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Claimed::of(row, reservation.clone()))
            .collect())
    }

    async fn take_back(&self) -> Result<Vec<Claimed>, SourceError> {
        let pattern = format!("{}%", like_escaped(&self.token_prefix));
        let rows = self
            .until_reachable(&self.statements.take_back, &[&pattern])
            .await?;
        Ok(rows
            .iter()
            .map(|row| Claimed::of(row, row.get(3)))
            .collect())
    }

    /// Finishes as failed the rows whose last lease ran out.
    async fn give_up(&self) -> Result<(), SourceError> {
        let lease_ms = self.lease.as_millis() as i64;
        let rows = self
            .until_reachable(&self.statements.give_up, &[&self.max_attempts, &lease_ms])
            .await?;
        if !rows.is_empty() {
            tracing::warn!(
                rows = rows.len(),
                "rows finished as failed: their last attempt's lease ran out"
            );
        }
        Ok(())
    }

    /// Counts where the table's rows stand, and reports it with the unit's stats.
    async fn count(&self, unit: &SourceUnit) -> Result<RowCounts, SourceError> {
        let lease_ms = self.lease.as_millis() as i64;
        let rows = self
            .until_reachable(&self.statements.count, &[&lease_ms])
            .await?;
        let counts = rows.first().map_or_else(RowCounts::default, |row| {
            let at = |i: usize| row.get::<_, i64>(i).max(0) as u64;
            RowCounts {
                waiting: at(0),
                claimed: at(1),
                succeeded: at(2),
                failed: at(3),
            }
        });
        if let Ok(mut rows) = unit.stats.rows.lock() {
            *rows = Some(counts);
        }
        Ok(counts)
    }

    /// Runs `statement` until it is answered (the rows keep their leases meanwhile); a refusal
    /// stops the attempt, which the source resumes.
    async fn until_reachable(
        &self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        self.database
            .query_until_answered(statement, params)
            .await
            .map_err(SourceError::Settings)
    }
}
