//! `switchyard-bench postgres`: rows per second through the postgres source and sink, against raw
//! loops on the same private server in the same run.
//!
//! - Jobs: `examples/odd-numbers.yaml` as it is (a source claiming 500 rows at a time with leases, a
//!   switcher of three workers, a sink writing `is_odd` into each row, each row's outcome written
//!   back once that is done), against three connections that only claim a batch with the same
//!   statement shape and update it (`is_odd`, success, end time) in one statement, and against
//!   three that run the example's own statements on each claim (`is_odd` upserted, the outcome
//!   fenced): the second says what the database alone costs the example, the rest is Switchyard.
//! - Inserts: a generator into a postgres sink (one row per item, idempotent by the item's id),
//!   against four connections inserting batches of 500 with `unnest` and the same conflict clause,
//!   and against four that send the sink's own statement the same batches as JSON.
//!
//! Each line also gives the CPU a row cost, the database's apart from the rest (the raw loop's
//! client, or Switchyard's units, NATS and runner): with the database on the same machine, the
//! two share its CPUs, and their sum bounds the rate.
//!
//! Switchyard's rate is counted twice: on the database's clock (first claim to last outcome, first
//! row to last), which leaves out starting NATS and the units, and over the whole `switchyard run`.
//! Every run's table is checked: every row done once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use switchyard_local::thousands;
use switchyard_platform::embedded_postgres::PostgresServer;

#[derive(Args, Debug)]
pub struct PostgresArgs {
    /// Rows in each table.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// The jobs Pipeline, to try a setting (default: examples/odd-numbers.yaml as built in). It
    /// must read and finish the table `numbers` as the example does.
    #[arg(long)]
    jobs: Option<PathBuf>,
    /// The `switchyard` binary (default: the one beside this program).
    #[arg(long, env = "SWITCHYARD_BIN")]
    switchyard: Option<PathBuf>,
}

const JOBS_PIPELINE: &str = include_str!("../../examples/odd-numbers.yaml");
const JOBS_TABLE: &str = include_str!("../../examples/odd-numbers.sql");

/// Claimers in the raw loop: as many as the example's workers.
const RAW_CLAIMERS: usize = 3;
/// Writers in the raw insert loop: as many connections as the sink's pool.
const RAW_WRITERS: usize = 4;
const BATCH: i64 = 500;

const INSERT_PIPELINE: &str = r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: inserts}
spec:
  sources:
    - name: numbers
      generator: {count: ROWS, payload: '{"value": {{seq}}}'}
  stages:
    - name: decide
      jq: '{value: .value, is_odd: (.value % 2 == 1)}'
  sinks:
    - name: results
      postgres:
        connection: {urlFrom: {env: DATABASE_URL}}
        table: results
        columns: {value: .value, is_odd: .is_odd}
        itemIdColumn: item_id
"#;

const RESULTS_TABLE: &str = "DROP TABLE IF EXISTS results; CREATE TABLE results (value bigint PRIMARY KEY, \
    is_odd boolean, item_id text UNIQUE, written_at timestamptz NOT NULL DEFAULT clock_timestamp())";

pub fn main(args: PostgresArgs) -> std::process::ExitCode {
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard-bench postgres: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &PostgresArgs) -> anyhow::Result<()> {
    let db = PostgresServer::start().context("a PostgreSQL server for the benchmark")?;
    let dir = tempfile::tempdir()?;
    let switchyard = match &args.switchyard {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("switchyard"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "postgres: {} rows a table, PostgreSQL on the same machine, on {}",
        thousands(args.rows),
        crate::args::machine()
    );
    let bench = Bench {
        db: &db,
        runtime: &runtime,
        dir: dir.path(),
        switchyard: &switchyard,
        rows: args.rows,
    };
    bench.jobs(args.jobs.as_deref())?;
    bench.inserts()
}

struct Bench<'a> {
    db: &'a PostgresServer,
    runtime: &'a tokio::runtime::Runtime,
    dir: &'a Path,
    switchyard: &'a Path,
    rows: u64,
}

impl Bench<'_> {
    /// Jobs: claimed, decided, written back.
    fn jobs(&self, pipeline: Option<&Path>) -> anyhow::Result<()> {
        let (db, rows) = (self.db, self.rows);
        let (raw, raw_cost) = self
            .timed_raw_claims(RawWrites::OneUpdate)
            .context("the raw claim loop")?;
        println!(
            "  raw claim + update loop ({RAW_CLAIMERS} connections, {BATCH} rows a claim): {}; {}",
            rate(rows, raw),
            raw_cost.per_row(rows)
        );
        let (raw_as_example, raw_as_example_cost) = self
            .timed_raw_claims(RawWrites::AsTheExample)
            .context("the raw loop of the example's statements")?;
        println!(
            "  raw loop of the example's statements (claim, is_odd upserted, outcome fenced; {RAW_CLAIMERS} connections): {}; {}",
            rate(rows, raw_as_example),
            raw_as_example_cost.per_row(rows)
        );
        fill_numbers(db, rows)?;
        let (name, text) = match pipeline {
            Some(file) => (
                file.display().to_string(),
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?,
            ),
            None => (
                "examples/odd-numbers.yaml".to_string(),
                JOBS_PIPELINE.to_string(),
            ),
        };
        std::fs::write(self.dir.join("jobs.yaml"), text)?;
        let (wall, cost) =
            self.measured(|| switchyard_run(self.switchyard, self.dir, "jobs.yaml", db))?;
        check(db, EVERY_ROW_DONE_ONCE, rows).with_context(|| name.clone())?;
        let span = seconds(
            db,
            "select extract(epoch from max(end_time) - min(start_time)) from numbers",
        )?;
        println!(
            "  {name} (source with leases, 3 workers, sink, outcomes): {} on the database's clock, {} over the whole run ({wall:.1} s); {}",
            rate(rows, span),
            rate(rows, wall),
            cost.per_row(rows)
        );
        println!(
            "  claimed and written against the raw loop: {:.2} × (whole run {:.2} ×); against the example's statements: {:.2} ×",
            raw / span,
            raw / wall,
            raw_as_example / span
        );
        Ok(())
    }

    /// Inserts: a generator's items written as rows.
    fn inserts(&self) -> anyhow::Result<()> {
        let (db, rows) = (self.db, self.rows);
        let url = db.url_with_password();
        db.psql(RESULTS_TABLE)?;
        let (raw, raw_cost) = self.measured(|| self.runtime.block_on(raw_inserts(&url, rows)))?;
        check(db, "select count(*) from results", rows).context("the raw insert loop")?;
        println!(
            "  raw insert loop ({RAW_WRITERS} connections, {BATCH} rows a statement, unnest, on conflict do nothing): {}; {}",
            rate(rows, raw),
            raw_cost.per_row(rows)
        );
        db.psql(RESULTS_TABLE)?;
        let (raw_as_sink, raw_as_sink_cost) =
            self.measured(|| self.runtime.block_on(raw_inserts_as_the_sink(&url, rows)))?;
        check(db, "select count(*) from results", rows)
            .context("the raw loop of the sink's statement")?;
        println!(
            "  raw loop of the sink's statement ({RAW_WRITERS} connections, {BATCH} rows a statement as one JSON array): {}; {}",
            rate(rows, raw_as_sink),
            raw_as_sink_cost.per_row(rows)
        );
        db.psql(RESULTS_TABLE)?;
        std::fs::write(
            self.dir.join("inserts.yaml"),
            INSERT_PIPELINE.replace("ROWS", &rows.to_string()),
        )?;
        let (wall, cost) =
            self.measured(|| switchyard_run(self.switchyard, self.dir, "inserts.yaml", db))?;
        check(
            db,
            "select count(*) from results where is_odd = (value % 2 = 1) and item_id is not null",
            rows,
        )
        .context("generator → postgres sink")?;
        let span = seconds(
            db,
            "select extract(epoch from max(written_at) - min(written_at)) from results",
        )?;
        println!(
            "  generator → jq → postgres sink: {} on the database's clock, {} over the whole run ({wall:.1} s); {}",
            rate(rows, span),
            rate(rows, wall),
            cost.per_row(rows)
        );
        println!(
            "  written against the raw loop: {:.2} × (whole run {:.2} ×); against the sink's statement: {:.2} ×",
            raw / span,
            raw / wall,
            raw_as_sink / span
        );
        Ok(())
    }

    /// Runs `phase`, and what it cost in CPU: the database's processes, and everything else this
    /// benchmark ran meanwhile (its own raw loop's client, or a `switchyard run` with its NATS and
    /// units, counted once it has been waited for).
    fn measured<T>(&self, phase: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Cost)> {
        let database = || {
            self.db
                .pid()
                .and_then(crate::procfs::tree_cpu_seconds)
                .unwrap_or(0.0)
        };
        let (database_before, rest_before) = (database(), rest_cpu_seconds());
        let value = phase()?;
        Ok((
            value,
            Cost {
                database: database() - database_before,
                rest: rest_cpu_seconds() - rest_before,
            },
        ))
    }
}

/// CPU seconds a phase of the benchmark used.
struct Cost {
    database: f64,
    rest: f64,
}

impl Cost {
    /// What each row cost, and the rate at which the machine's CPUs would be busy all the time.
    fn per_row(&self, rows: u64) -> String {
        let micros = |seconds: f64| seconds * 1e6 / rows.max(1) as f64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = micros(self.database + self.rest);
        format!(
            "CPU a row: {:.1} µs PostgreSQL + {:.1} µs the rest (at most {} on {cpus} CPUs)",
            micros(self.database),
            micros(self.rest),
            rate(rows, rows as f64 * total / 1e6 / cpus),
        )
    }
}

/// CPU seconds of this process and of the children it has waited for.
fn rest_cpu_seconds() -> f64 {
    let used = |who| {
        // SAFETY: getrusage writes into the struct it is given and has no other precondition.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut usage) } != 0 {
            return 0.0;
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

fn rate(rows: u64, seconds: f64) -> String {
    format!(
        "{} rows/s",
        thousands((rows as f64 / seconds.max(1e-9)) as u64)
    )
}

/// The example's table, filled afresh.
/// Every row finished once, with its result.
const EVERY_ROW_DONE_ONCE: &str = "select count(*) from numbers where success and is_odd = (value % 2 = 1) and reservation_times = 1";

impl Bench<'_> {
    /// A fresh table of `rows` numbers through a raw claim loop that writes `writes`, checked; its
    /// seconds and what the loop alone cost.
    fn timed_raw_claims(&self, writes: RawWrites) -> anyhow::Result<(f64, Cost)> {
        fill_numbers(self.db, self.rows)?;
        let url = self.db.url_with_password();
        let timed = self.measured(|| self.runtime.block_on(raw_claims(&url, self.rows, writes)))?;
        check(self.db, EVERY_ROW_DONE_ONCE, self.rows)?;
        Ok(timed)
    }
}

fn fill_numbers(db: &PostgresServer, rows: u64) -> anyhow::Result<()> {
    let sql = JOBS_TABLE.replace(
        "generate_series(1, 100000)",
        &format!("generate_series(1, {rows})"),
    );
    if sql == JOBS_TABLE && rows != 100_000 {
        bail!("examples/odd-numbers.sql no longer fills the table with generate_series(1, 100000): the benchmark cannot size it");
    }
    db.psql(&sql)?;
    db.psql("VACUUM ANALYZE numbers")?;
    Ok(())
}

fn check(db: &PostgresServer, sql: &str, rows: u64) -> anyhow::Result<()> {
    let found: u64 = db.psql(sql)?.trim().parse()?;
    if found != rows {
        bail!("{found} rows of {rows} done as they should be ({sql})");
    }
    Ok(())
}

fn seconds(db: &PostgresServer, sql: &str) -> anyhow::Result<f64> {
    Ok(db.psql(sql)?.trim().parse()?)
}

/// `switchyard run FILE` in `dir` with the server's URL in `DATABASE_URL`; its wall time.
fn switchyard_run(
    switchyard: &Path,
    dir: &Path,
    file: &str,
    db: &PostgresServer,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = Command::new(switchyard)
        .args(["run", file, "--progress", "none"])
        .env("DATABASE_URL", db.url_with_password())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", switchyard.display()))?;
    let wall = started.elapsed().as_secs_f64();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        bail!(
            "`switchyard run {file}` {}:\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(wall)
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the benchmark's database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// What a raw claim loop writes into a claimed batch.
#[derive(Clone, Copy, PartialEq)]
enum RawWrites {
    /// `is_odd` and the outcome in one update: the least a claim loop can do.
    OneUpdate,
    /// The example's statements: `is_odd` upserted as its sink does, then the outcome fenced by
    /// the reservation as its source does. What the database itself costs the example.
    AsTheExample,
}

/// Claims `BATCH` rows at a time the way the source does (a CTE with `FOR UPDATE SKIP LOCKED`,
/// lease columns written) and writes them done, on `RAW_CLAIMERS` connections until none is left;
/// its seconds.
async fn raw_claims(url: &str, rows: u64, writes: RawWrites) -> anyhow::Result<f64> {
    const CLAIM: &str = "WITH claimable AS (SELECT value FROM numbers WHERE success IS NULL \
        AND reservation_id IS NULL ORDER BY value LIMIT $2 FOR UPDATE SKIP LOCKED) \
        UPDATE numbers AS row SET reservation_id = $1, reservation_time = now(), \
        reservation_times = coalesce(row.reservation_times, 0) + 1, start_time = now() \
        FROM claimable WHERE row.value = claimable.value RETURNING row.value";
    const DONE: &str = "UPDATE numbers AS row SET is_odd = done.value % 2 = 1, success = true, \
        end_time = now() FROM unnest($1::int8[]) AS done(value) \
        WHERE row.value = done.value AND row.reservation_id = $2";
    const IS_ODD: &str = "INSERT INTO numbers (value, is_odd) \
        SELECT value, value % 2 = 1 FROM unnest($1::int8[]) AS v(value) \
        ON CONFLICT (value) DO UPDATE SET is_odd = excluded.is_odd";
    const OUTCOME: &str = "UPDATE numbers AS row SET success = true, end_time = now() \
        FROM unnest($1::int8[]) AS done(value) \
        WHERE row.value = done.value AND row.reservation_id = $2 AND row.success IS NULL";
    let started = Instant::now();
    let mut claimers = Vec::new();
    for worker in 0..RAW_CLAIMERS {
        let client = connect(url).await?;
        claimers.push(tokio::spawn(async move {
            let claim = client.prepare(CLAIM).await?;
            let done = client.prepare(DONE).await?;
            let is_odd = client.prepare(IS_ODD).await?;
            let outcome = client.prepare(OUTCOME).await?;
            let mut claimed = 0u64;
            for round in 0u64.. {
                let token = format!("raw/{worker}/{round}");
                let values: Vec<i64> = client
                    .query(&claim, &[&token, &BATCH])
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                if values.is_empty() {
                    break;
                }
                claimed += values.len() as u64;
                match writes {
                    RawWrites::OneUpdate => {
                        client.execute(&done, &[&values, &token]).await?;
                    }
                    RawWrites::AsTheExample => {
                        client.execute(&is_odd, &[&values]).await?;
                        client.execute(&outcome, &[&values, &token]).await?;
                    }
                }
            }
            anyhow::Ok(claimed)
        }));
    }
    let mut claimed = 0;
    for claimer in claimers {
        claimed += claimer.await??;
    }
    if claimed != rows {
        bail!("the raw loop claimed {claimed} rows of {rows}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The raw insert loop with the postgres sink's own statement: the rows as one JSON array.
async fn raw_inserts_as_the_sink(url: &str, rows: u64) -> anyhow::Result<f64> {
    let settings: switchyard_crds::postgres::PostgresSink =
        serde_json::from_value(serde_json::json!({
            "connection": {"url": url},
            "table": "results",
            "columns": {"value": ".value", "is_odd": ".is_odd"},
            "itemIdColumn": "item_id",
        }))?;
    let statement = switchyard_stage::sinks::postgres_statement(&settings);
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..RAW_WRITERS as u64 {
        let client = connect(url).await?;
        let statement = statement.clone();
        writers.push(tokio::spawn(async move {
            let insert = client.prepare(&statement).await?;
            let mut first = 1 + writer * BATCH as u64;
            while first <= rows {
                let last = (first + BATCH as u64 - 1).min(rows);
                let batch: Vec<serde_json::Value> = (first..=last)
                    .map(|v| serde_json::json!({"value": v, "is_odd": v % 2 == 1, "item_id": format!("numbers:{v}")}))
                    .collect();
                client.query(&insert, &[&tokio_postgres::types::Json(&batch)]).await?;
                first += RAW_WRITERS as u64 * BATCH as u64;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Inserts `rows` rows in statements of `BATCH` on `RAW_WRITERS` connections; its seconds.
async fn raw_inserts(url: &str, rows: u64) -> anyhow::Result<f64> {
    const INSERT: &str = "INSERT INTO results (value, is_odd, item_id) \
        SELECT value, value % 2 = 1, 'numbers:' || value FROM unnest($1::int8[]) AS v(value) \
        ON CONFLICT (item_id) DO NOTHING";
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..RAW_WRITERS as u64 {
        let client = connect(url).await?;
        writers.push(tokio::spawn(async move {
            let insert = client.prepare(INSERT).await?;
            // Batches dealt out in turn: writer w takes the w-th, the (w + writers)-th, …
            let mut first = 1 + writer * BATCH as u64;
            while first <= rows {
                let last = (first + BATCH as u64 - 1).min(rows);
                let values: Vec<i64> = (first as i64..=last as i64).collect();
                client.execute(&insert, &[&values]).await?;
                first += RAW_WRITERS as u64 * BATCH as u64;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}
