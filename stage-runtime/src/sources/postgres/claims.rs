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
    CompleteOn, Outcome, PostgresSource as Settings, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_CLAIMED, DEFAULT_POLL, DEFAULT_SOURCE_BATCH,
};
use switchyard_crds::RowCounts;
use switchyard_platform::frame::FrameWriter;

use super::{duration, item_expression, open_table, refused, wait_for_rows};
use crate::lineage::Lineage;
use crate::postgres::{quoted, Database};
use crate::sources::{SourceError, SourceUnit, Stored};

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

/// Writes the outcomes back in one statement, each fenced by its reservation; how many were
/// written (the others' rows are held by another attempt now).
async fn write_outcomes(
    database: &Database,
    finish: &str,
    done: &[Done],
) -> Result<usize, SourceError> {
    if done.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = done.iter().map(|d| d.key.as_str()).collect();
    let reservations: Vec<&str> = done.iter().map(|d| d.reservation.as_str()).collect();
    let successes: Vec<bool> = done.iter().map(|d| d.success).collect();
    let errors: Vec<Option<&str>> = done.iter().map(|d| d.error.as_deref()).collect();
    let written = database
        .query_until_answered(finish, &[&keys, &reservations, &successes, &errors])
        .await
        .map_err(SourceError::Settings)?
        .len();
    if written < done.len() {
        tracing::warn!(
            rows = done.len() - written,
            "outcomes not written: another attempt holds those rows now (their lease ran out)"
        );
    }
    Ok(written)
}

/// What the source writes back about one row.
struct Done {
    key: String,
    reservation: String,
    success: bool,
    error: Option<String>,
}

/// The statements, built once from the settings.
struct Statements {
    claim: String,
    give_up: String,
    finish: String,
    take_back: String,
    count: String,
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

/// A table this big (in bytes, about 10,000 narrow rows) is worth a word about its index.
const BIG_TABLE: i64 = 1 << 20;

/// Whether a partial index with one of `predicates` (as the database writes them back) leaves the
/// finished rows out, so that a claim in key order starts at the first unfinished row: one that
/// holds `<success> IS NULL`, alone or among other conditions joined by AND.
fn claims_read_unfinished_rows_only(predicates: &[String], success: &str) -> bool {
    let wanted = [
        format!("{success} IS NULL"),
        format!("{} IS NULL", quoted(success)),
    ];
    predicates.iter().any(|predicate| {
        !predicate.contains(" OR ")
            && predicate
                .split(" AND ")
                .map(|part| part.trim_matches(|c| c == '(' || c == ')' || c == ' '))
                .any(|part| wanted.iter().any(|w| part == w))
    })
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
        let mut woken = super::listen(self.settings, &self.database);
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
        let carried =
            crate::sources::record_emitted(unit.tracer.as_ref(), unit.spans.as_ref(), &mut lineage)
                .await;
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

/// `%` and `_` taken literally in a LIKE pattern.
fn like_escaped(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn statements(settings: &Settings, outcome: &Outcome, key_type: &str) -> Statements {
    let t = quoted(&settings.table);
    let k = quoted(&settings.key);
    let q = |c: &str| quoted(c);
    let (reservation, reserved_at, attempts, started_at, ended_at, success, error) = (
        q(&outcome.reservation),
        q(&outcome.reserved_at),
        q(&outcome.attempts),
        q(&outcome.started_at),
        q(&outcome.ended_at),
        q(&outcome.success),
        q(&outcome.error),
    );
    let filter = settings
        .filter
        .as_deref()
        .map_or("TRUE".to_string(), |f| format!("({f})"));
    let item = item_expression(settings);
    let claim = format!(
        "WITH claimable AS (\
           SELECT {k} FROM {t} \
           WHERE {success} IS NULL \
             AND ({reservation} IS NULL OR {reserved_at} < now() - $3::int8 * interval '1 millisecond') \
             AND coalesce({attempts}, 0) < $4::int4 \
             AND {filter} \
           ORDER BY {k} LIMIT $2::int8 FOR UPDATE SKIP LOCKED\
         ), claimed AS (\
           UPDATE {t} AS row SET {reservation} = $1::text, {reserved_at} = now(), \
             {attempts} = coalesce(row.{attempts}, 0) + 1, {started_at} = now(), {ended_at} = NULL \
           FROM claimable WHERE row.{k} = claimable.{k} \
           RETURNING row.{k} AS sort_key, row.{k}::text AS key, row.{attempts}::int4 AS attempt, {item} AS item\
         ) \
         SELECT key, attempt, item FROM claimed ORDER BY sort_key"
    );
    let give_up = format!(
        "UPDATE {t} SET {success} = false, {ended_at} = now(), \
           {error} = format('gave up after %s attempts: the last lease ran out', {attempts}) \
         WHERE {success} IS NULL AND {reservation} IS NOT NULL \
           AND {reserved_at} < now() - $2::int8 * interval '1 millisecond' \
           AND coalesce({attempts}, 0) >= $1::int4 AND {filter} \
         RETURNING {k}::text"
    );
    let finish = format!(
        "UPDATE {t} AS row SET {success} = done.success, {ended_at} = now(), {error} = done.error \
         FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[]) AS done(key, reservation, success, error) \
         WHERE row.{k} = CAST(done.key AS {key_type}) AND row.{reservation} = done.reservation \
           AND row.{success} IS NULL \
         RETURNING row.{k}::text"
    );
    // The lease starts again: the rows are this source's again from now.
    let take_back = format!(
        "WITH taken AS (\
           UPDATE {t} AS row SET {reserved_at} = now() \
           WHERE row.{reservation} LIKE $1::text AND row.{success} IS NULL \
           RETURNING row.{k} AS sort_key, row.{k}::text AS key, row.{attempts}::int4 AS attempt, {item} AS item, row.{reservation} AS reservation\
         ) \
         SELECT key, attempt, item, reservation FROM taken ORDER BY sort_key"
    );
    // A row is claimed while its lease runs; unfinished and not claimed, it waits.
    let leased = format!(
        "{reservation} IS NOT NULL AND coalesce({reserved_at} >= now() - $1::int8 * interval '1 millisecond', false)"
    );
    let count = format!(
        "SELECT count(*) FILTER (WHERE {success} IS NULL AND NOT ({leased})), \
           count(*) FILTER (WHERE {success} IS NULL AND {leased}), \
           count(*) FILTER (WHERE {success}), \
           count(*) FILTER (WHERE NOT {success}) \
         FROM {t} WHERE {filter}"
    );
    Statements {
        claim,
        give_up,
        finish,
        take_back,
        count,
    }
}

/// A job the tracker follows: its row, its claim, where it stands, and the account messages that
/// brought it there (by stream sequence; see `Held`).
struct Open {
    key: String,
    reservation: String,
    state: switchyard_crds::jobs::JobState,
    accounts: Vec<u64>,
    since: std::time::Instant,
}

/// The account messages read and not yet acknowledged, by stream sequence. A message speaks of
/// the items of one input, often of many jobs; it is acknowledged once every job it spoke of is
/// written back or forgotten, so that a restarted source reads again what it has not done.
#[derive(Default)]
struct Held {
    messages: std::collections::HashMap<u64, (async_nats::jetstream::Message, usize)>,
}

impl Held {
    /// Holds `message`, which open jobs spoke of `waiting` times; acknowledges it now if none did.
    async fn hold(
        &mut self,
        sequence: u64,
        message: async_nats::jetstream::Message,
        waiting: usize,
    ) {
        if waiting == 0 {
            let _ = message.ack().await;
        } else {
            self.messages.insert(sequence, (message, waiting));
        }
    }

    /// A job is done with: the messages no other open job waits on are acknowledged.
    async fn release(&mut self, accounts: Vec<u64>) {
        for sequence in accounts {
            let last = match self.messages.get_mut(&sequence) {
                Some((_, waiting)) => {
                    *waiting = waiting.saturating_sub(1);
                    *waiting == 0
                }
                None => false,
            };
            if last {
                if let Some((message, _)) = self.messages.remove(&sequence) {
                    let _ = message.ack().await;
                }
            }
        }
    }
}

/// Follows the jobs of a source that completes a row once its item is finished: reads the units'
/// accounts, and writes each row's outcome back once its job has ended.
struct Tracker {
    open: std::sync::Arc<OpenJobs>,
    jobs: tokio::sync::mpsc::UnboundedSender<(String, Open)>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

/// Jobs followed and not yet written back (or forgotten): the source claims no more while
/// `maxClaimed` are, and is woken as soon as some are done with.
#[derive(Default)]
struct OpenJobs {
    count: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

impl OpenJobs {
    fn done_with(&self, jobs: usize) {
        if jobs > 0 {
            self.count
                .fetch_sub(jobs, std::sync::atomic::Ordering::Relaxed);
            self.freed.notify_one();
        }
    }
}

/// Jobs that ended are written back as soon as no account is waiting to be read (so they go
/// together under load), and once this many have, whatever is waiting.
const WRITE_BACK_AT_ONCE: usize = 2000;
/// How often the tracker looks for jobs followed too long.
const FORGET_EVERY: Duration = Duration::from_millis(500);

impl Tracker {
    /// Starts reading the accounts of `unit`'s jobs: every one still in the stream, that is every
    /// job not yet written back, so jobs taken back after a restart pick up where they stood.
    async fn start(
        unit: &SourceUnit,
        config: &switchyard_crds::unit::JobsConfig,
        database: Database,
        finish: String,
        known: Vec<(String, Open)>,
        lease: Duration,
    ) -> Result<Tracker, SourceError> {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let failed =
            |what: &str, e: &dyn std::fmt::Display| SourceError::Jobs(format!("{what}: {e}"));
        let stream = unit
            .js
            .get_stream(config.stream.clone())
            .await
            .map_err(|e| failed(&format!("stream {}", config.stream), &e))?;
        let durable = format!("{}-jobs", unit.name);
        // A consumer left by an earlier process holds what it delivered until its deadline: start
        // afresh, from everything still in the stream.
        let _ = stream.delete_consumer(&durable).await;
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("{}.{}", config.prefix, unit.name),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                // Accounts are held until their job ends, however long its lease.
                ack_wait: Duration::from_secs(24 * 3600),
                max_ack_pending: -1,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&format!("consumer {durable}"), &e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| failed("reading accounts", &e))?;
        let (jobs, registered) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let stats = unit.stats.clone();
        let open = std::sync::Arc::new(OpenJobs {
            count: known.len().into(),
            freed: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(follow(
            messages,
            known.into_iter().collect(),
            Following {
                registered,
                stopping,
                database,
                finish,
                stats,
                open: open.clone(),
                forget_after: lease * 2,
            },
        ));
        Ok(Tracker {
            open,
            jobs,
            stop,
            task,
        })
    }

    fn follow(&self, job: String, open: Open) {
        self.open
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.jobs.send((job, open));
    }

    fn open(&self) -> usize {
        self.open.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Until some open jobs are done with (at once if some were since the last call).
    async fn freed(&self) {
        self.open.freed.notified().await
    }

    /// Writes back what has ended and stops.
    async fn finish(self) -> Result<(), SourceError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(SourceError::Task(e)),
        }
    }
}

/// What the tracker's task works with besides the accounts.
struct Following {
    registered: tokio::sync::mpsc::UnboundedReceiver<(String, Open)>,
    stopping: tokio::sync::watch::Receiver<bool>,
    database: Database,
    finish: String,
    stats: std::sync::Arc<crate::stats::Stats>,
    open: std::sync::Arc<OpenJobs>,
    /// A job followed this long has had its row claimed again or given up by now: a late outcome
    /// would be refused by the fence anyway.
    forget_after: Duration,
}

async fn follow(
    mut messages: async_nats::jetstream::consumer::pull::Stream,
    mut open: std::collections::HashMap<String, Open>,
    mut with: Following,
) -> Result<(), SourceError> {
    use futures::StreamExt;
    let mut ended: Vec<(Open, switchyard_crds::jobs::Ended)> = Vec::new();
    let mut tick = tokio::time::interval(FORGET_EVERY);
    let mut forgotten = Vec::new();
    let mut held = Held::default();
    loop {
        tokio::select! {
            // A job is known before its item is published: its accounts never come first.
            biased;
            // An earlier attempt of the same row stays followed: should it end first, the fence
            // refuses its outcome in the database.
            Some((job, entry)) = with.registered.recv() => {
                open.insert(job, entry);
            }
            message = messages.next() => {
                let Some(message) = message else { break };
                let message = message.map_err(|e| SourceError::Jobs(format!("reading accounts: {e}")))?;
                let sequence = message.info().map(|i| i.stream_sequence).unwrap_or_default();
                let Some(accounts) = switchyard_crds::jobs::read_account(&message.payload) else {
                    tracing::warn!(sequence, "an account that cannot be read: dropped");
                    let _ = message.ack().await;
                    continue;
                };
                let mut waiting = 0;
                for account in accounts {
                    // A job already written back (or another attempt's): nothing to do.
                    let Some(job) = open.get_mut(&account.job) else { continue };
                    let end = job.state.apply(&account);
                    job.accounts.push(sequence);
                    waiting += 1;
                    if let Some(end) = end {
                        if let Some(job) = open.remove(&account.job) {
                            ended.push((job, end));
                        }
                    }
                }
                held.hold(sequence, message, waiting).await;
                if ended.len() >= WRITE_BACK_AT_ONCE {
                    write_back(&with, &mut ended, &mut held).await?;
                }
            }
            // No account is waiting to be read: what ended goes now.
            _ = std::future::ready(()), if !ended.is_empty() => {
                write_back(&with, &mut ended, &mut held).await?;
            }
            _ = tick.tick() => {
                let stale: Vec<String> = open
                    .iter()
                    .filter(|(_, o)| o.since.elapsed() > with.forget_after)
                    .map(|(job, _)| job.clone())
                    .collect();
                for job in stale {
                    if let Some(o) = open.remove(&job) {
                        forgotten.push(o);
                    }
                }
                with.open.done_with(forgotten.len());
                for job in forgotten.drain(..) {
                    held.release(job.accounts).await;
                }
            }
            _ = crate::stopped(&mut with.stopping) => break,
        }
    }
    write_back(&with, &mut ended, &mut held).await?;
    Ok(())
}

/// Writes the outcomes of the jobs that ended, fenced by their reservations, then acknowledges the
/// accounts nothing else waits on.
async fn write_back(
    with: &Following,
    ended: &mut Vec<(Open, switchyard_crds::jobs::Ended)>,
    held: &mut Held,
) -> Result<(), SourceError> {
    let done: Vec<Done> = ended
        .iter()
        .map(|(job, end)| Done {
            key: job.key.clone(),
            reservation: job.reservation.clone(),
            success: *end == switchyard_crds::jobs::Ended::Succeeded,
            error: match end {
                switchyard_crds::jobs::Ended::Failed(error) => Some(error.clone()),
                switchyard_crds::jobs::Ended::Succeeded => None,
            },
        })
        .collect();
    let written = write_outcomes(&with.database, &with.finish, &done).await?;
    crate::stats::Stats::add(&with.stats.published, written as u64);
    with.open.done_with(ended.len());
    for (job, _) in ended.drain(..) {
        held.release(job.accounts).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::claims_read_unfinished_rows_only as unfinished_only;

    fn texts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_index_of_the_unfinished_rows_is_known_by_its_predicate() {
        assert!(unfinished_only(&texts(&["(success IS NULL)"]), "success"));
        assert!(unfinished_only(
            &texts(&["((success IS NULL) AND (kind = 'a'::text))"]),
            "success"
        ));
        assert!(unfinished_only(&texts(&["(\"Done\" IS NULL)"]), "Done"));
        assert!(!unfinished_only(&texts(&[]), "success"));
        assert!(!unfinished_only(
            &texts(&["(success IS NOT NULL)"]),
            "success"
        ));
        assert!(!unfinished_only(&texts(&["(ok IS NULL)"]), "success"));
        assert!(!unfinished_only(
            &texts(&["((success IS NULL) OR (kind = 'a'::text))"]),
            "success"
        ));
    }
}
