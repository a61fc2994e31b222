//! The postgres source against a real PostgreSQL server: rows claimed in key order with leases,
//! published once, written back fenced by their reservation, taken back after a crash, given up
//! after their last lease.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{harness, terminate, Harness};
use switchyard_platform::embedded_postgres::PostgresServer;

const LIMIT: Duration = Duration::from_secs(120);
/// The variable the source's processes read the password from (`password.env`).
const PASSWORD: &str = "SWITCHYARD_TEST_PGPASSWORD";

fn database() -> PostgresServer {
    PostgresServer::start().unwrap_or_else(|e| panic!("a PostgreSQL server for the test: {e}"))
}

fn count(db: &PostgresServer, sql: &str) -> u64 {
    db.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The table of the issue's example, with `rows` numbers in it and nothing claimed.
fn numbers(db: &PostgresServer, rows: u64) {
    db.psql(&format!(
        "create table numbers (value bigint primary key, is_odd boolean, reservation_id text, \
         reservation_time timestamptz, reservation_times int, start_time timestamptz, \
         end_time timestamptz, success boolean, error_description text); \
         insert into numbers (value) select generate_series(1, {rows})"
    ))
    .unwrap();
}

fn source_pipeline(name: &str, db: &PostgresServer, settings: &str, out: &str) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  sources:\n    - name: jobs\n      postgres:\n        connection: {{url: \"{url}\", password: {{env: {PASSWORD}}}}}\n        table: numbers\n        key: value\n{settings}  stages: [{{name: pass, passthrough: {{}}}}]\n  sinks: [{{name: out, file: {{path: \"{out}\"}}}}]\n",
        url = db.url()
    )
}

/// Waits for a process of the harness to end by itself.
async fn ended(h: &mut Harness, index: usize, limit: Duration) -> std::process::ExitStatus {
    let mut child = h.take_process(index);
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            terminate(&mut child);
            panic!("still running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A table of `rows` numbers, and a Pipeline reading it with `settings` into a file through a
/// pass-through stage, whose sink and stage already run: the test starts the source. Bind `_dir`
/// by name: left to `..`, it is removed at once, and the sink writes into a file nobody can read.
struct JobsRun {
    db: PostgresServer,
    h: Harness,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn jobs_run(name: &str, rows: u64, settings: &str) -> JobsRun {
    let db = database();
    numbers(&db, rows);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut h = harness(&source_pipeline(
        name,
        &db,
        settings,
        &out.display().to_string(),
    ))
    .await;
    h.spawn("out", "r");
    h.spawn("pass", "r");
    JobsRun {
        db,
        h,
        out,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_claimed_in_key_order_published_once_and_finished_once_stored() {
    const ROWS: u64 = 1000;
    let JobsRun {
        db, mut h, out, _dir
    } = jobs_run("pg-jobs", ROWS, "        completeOn: publish\n        endWhenEmpty: true\n        batch: 50\n        maxClaimed: 20\n").await;
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    let status = ended(&mut h, 2, LIMIT).await;
    assert!(status.success(), "{}", h.log_of("jobs", "r"));
    let lines = h.wait_for_lines(&out, ROWS as usize, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let log = h.log_of("jobs", "r");
    h.stop().await;
    let values: BTreeSet<u64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["value"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(values, (1..=ROWS).collect(), "every row once");
    assert_eq!(lines.len() as u64, ROWS, "a row was published twice");
    assert_eq!(
        count(&db, "select count(*) from numbers where success and reservation_times = 1 and end_time >= start_time"),
        ROWS
    );
    let most = count(
        &db,
        "select max(n) from (select count(*) as n from numbers group by reservation_id) claims",
    );
    assert!(
        (1..=20).contains(&most),
        "a claim took {most} rows: no more than maxClaimed may be open"
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers a join numbers b on a.value < b.value and a.reservation_time > b.reservation_time"
        ),
        0,
        "claimed in key order"
    );
    assert!(!log.contains(db.password()), "the password is in the log");
}

/// The source dies right after a claim's rows are stored and before they are written back; started
/// again, it takes its claims back at once (its lease is an hour) and publishes them under the same
/// ids, which the stream drops: every row once, each claimed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_after_publishing_takes_its_claims_back_at_once() {
    const ROWS: u64 = 300;
    let JobsRun {
        db, mut h, out, _dir
    } = jobs_run("pg-taken-back", ROWS, "        completeOn: publish\n        endWhenEmpty: true\n        batch: 100\n        lease: 1h\n").await;
    h.killed_after_stored_with("jobs", "killed", "2", &[(PASSWORD, db.password())])
        .await;
    let claimed = count(
        &db,
        "select count(*) from numbers where reservation_id is not null and success is null",
    );
    assert!(claimed > 0, "the killed source left no claim");
    let started = Instant::now();
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    let status = ended(&mut h, 2, LIMIT).await;
    assert!(status.success(), "{}", h.log_of("jobs", "r"));
    let lines = h.wait_for_lines(&out, ROWS as usize, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    println!(
        "{claimed} rows claimed by the killed source; all done {:.1}s after the restart",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lines.len() as u64, ROWS, "a row was published twice");
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where success and reservation_times = 1"
        ),
        ROWS,
        "taken back, not claimed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_that_ran_out_are_claimed_again_or_given_up_and_live_ones_are_left_alone() {
    let db = database();
    numbers(&db, 4);
    db.psql(
        "update numbers set reservation_id = 'other/1', reservation_time = now() - interval '2 hours', reservation_times = 1 where value = 1; \
         update numbers set reservation_id = 'other/2', reservation_time = now() - interval '2 hours', reservation_times = 3 where value = 2; \
         update numbers set reservation_id = 'other/3', reservation_time = now(), reservation_times = 1 where value = 3",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut h = harness(&source_pipeline(
        "pg-leases",
        &db,
        "        completeOn: publish\n        lease: 1h\n        maxAttempts: 3\n        poll: 100ms\n",
        &out.display().to_string(),
    ))
    .await;
    h.spawn("out", "r");
    h.spawn("pass", "r");
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    let lines = h.wait_for_lines(&out, 2, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let started = Instant::now();
    while count(
        &db,
        "select count(*) from numbers where value = 2 and success = false",
    ) == 0
    {
        assert!(started.elapsed() < LIMIT, "row 2 was not given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
    let rows = db
        .psql("select value, coalesce(success::text, '-'), reservation_times, coalesce(error_description, '-'), reservation_id like 'other/%' from numbers order by value")
        .unwrap();
    assert_eq!(
        rows,
        "1|true|2|-|f\n2|false|3|gave up after 3 attempts: the last lease ran out|t\n3|-|1|-|t\n4|true|1|-|f",
        "{lines:?}"
    );
}

/// The issue's example: rows dispatched to a switcher of three workers, `is_odd` written into each
/// row by a postgres sink, and each row's outcome written back once its item reached that sink, or
/// was dead-lettered. Every row finished once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_finish_once_their_item_is_written_and_fail_with_their_dead_letters_error() {
    const ROWS: u64 = 3000;
    let db = database();
    numbers(&db, ROWS);
    let connection = format!("{{url: \"{}\", password: {{env: {PASSWORD}}}}}", db.url());
    let mut h = harness(&format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: pg-finished}}\nspec:\n  sources:\n    - name: jobs\n      postgres: {{connection: {connection}, table: numbers, key: value, endWhenEmpty: true, batch: 200}}\n  stages:\n    - name: work\n      switcher: {{minReplicas: 3, maxReplicas: 3}}\n      stages:\n        - name: decide\n          jq: 'if .value % 500 == 0 then error(\"no \\(.value)\") elif .value % 7 == 0 then empty else {{value: .value, is_odd: (.value % 2 == 1)}} end'\n  sinks:\n    - name: results\n      postgres: {{connection: {connection}, table: numbers, columns: {{value: .value, is_odd: .is_odd}}, conflict: {{columns: [value], action: update}}}}\n"
    ))
    .await;
    let env = [(PASSWORD, db.password())];
    h.spawn_with_env("results", "r", &env);
    for replica in ["w1", "w2", "w3"] {
        h.spawn("work", replica);
    }
    let reports = h.watch_stats("jobs").await;
    h.spawn_with_env("jobs", "r", &env);
    let started = Instant::now();
    let status = ended(&mut h, 4, LIMIT).await;
    assert!(status.success(), "{}", h.log_of("jobs", "r"));
    h.wait_until_drained(LIMIT).await;
    h.stop().await;
    // The source counted the table as it ended, and said so in its last report.
    let reports = common::settled_reports(&reports, Duration::from_secs(5), |r| {
        r.values().any(|r| r.last)
    })
    .await;
    let rows = reports
        .values()
        .find(|r| r.last)
        .and_then(|r| r.rows)
        .unwrap_or_else(|| panic!("no count of the rows in the source's last report: {reports:?}"));
    assert_eq!(
        rows,
        switchyard_crds::RowCounts {
            waiting: 0,
            claimed: 0,
            succeeded: ROWS - ROWS / 500,
            failed: ROWS / 500
        }
    );
    println!(
        "{ROWS} rows through 3 workers, each finished, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        db.psql("select success, left(coalesce(error_description, '-'), 60), count(*) from numbers group by 1, 2 order by 1, 2")
            .unwrap()
    );
    let failed = ROWS / 500;
    let filtered = ROWS / 7 - ROWS / 3500;
    assert_eq!(
        count(&db, "select count(*) from numbers where success is null"),
        0,
        "a row left unfinished"
    );
    assert_eq!(
        count(
            &db,
            r#"select count(*) from numbers where not success and error_description = format('jq: "no %s"', value) and value % 500 = 0"#
        ),
        failed
    );
    assert_eq!(
        count(&db, "select count(*) from numbers where not success"),
        failed
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where success and is_odd = (value % 2 = 1)"
        ),
        ROWS - failed - filtered,
        "each row written by the sink before it was finished"
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where success and is_odd is null and value % 7 = 0"
        ),
        filtered,
        "a filtered row finishes with nothing written"
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where reservation_times <> 1"
        ),
        0
    );
    assert_eq!(
        count(&db, "select count(*) from numbers where end_time is null"),
        0
    );
}

/// The same job while a process of the Pipeline (the source, a worker or the sink, in turn) is
/// SIGKILLed every 2 s, and the database is stopped at once and started again once: every row is
/// finished once, none is left claimed, the refused ones failed with their error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_is_finished_once_across_kills_and_a_database_restart() {
    const ROWS: u64 = 100_000;
    let mut db = database();
    numbers(&db, ROWS);
    // As the README advises for a table this big.
    db.psql("create index on numbers (value) where success is null")
        .unwrap();
    let connection = format!("{{url: \"{}\", password: {{env: {PASSWORD}}}}}", db.url());
    let mut h = harness(&format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: pg-chaos}}\nspec:\n  nats: {{redeliverAfter: 2s}}\n  sources:\n    - name: jobs\n      postgres: {{connection: {connection}, table: numbers, key: value, batch: 200}}\n  stages:\n    - name: work\n      switcher: {{minReplicas: 3, maxReplicas: 3}}\n      stages:\n        - name: decide\n          jq: 'if .value % 500 == 0 then error(\"no \\(.value)\") else {{value: .value, is_odd: (.value % 2 == 1)}} end'\n  sinks:\n    - name: results\n      postgres: {{connection: {connection}, table: numbers, columns: {{value: .value, is_odd: .is_odd}}, conflict: {{columns: [value], action: update}}}}\n"
    ))
    .await;
    let password = db.password().to_string();
    // What runs, in the harness's order of processes.
    let mut running: Vec<(&str, String)> = Vec::new();
    let mut generation = 0;
    let mut start = |h: &mut Harness, running: &mut Vec<(&str, String)>, unit: &'static str| {
        generation += 1;
        let replica = format!("{unit}-{generation}");
        h.spawn_with_env(unit, &replica, &[(PASSWORD, password.as_str())]);
        running.push((unit, replica));
    };
    for unit in ["results", "work", "work", "work", "jobs"] {
        start(&mut h, &mut running, unit);
    }
    let started = Instant::now();
    let mut kills = Vec::new();
    let mut restarted = false;
    let victims = ["jobs", "work", "results", "work"];
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let open = count(&db, "select count(*) from numbers where success is null");
        if open == 0 {
            break;
        }
        let victim = victims[kills.len() % victims.len()];
        let index = running
            .iter()
            .position(|(unit, _)| *unit == victim)
            .unwrap();
        let mut child = h.take_process(index);
        child.kill().unwrap();
        child.wait().unwrap();
        running.remove(index);
        kills.push((victim, ROWS - open));
        start(&mut h, &mut running, victim);
        if !restarted && open < ROWS * 3 / 4 {
            tokio::task::block_in_place(|| {
                db.stop_immediately();
                std::thread::sleep(Duration::from_millis(500));
                db.start_again()
            })
            .unwrap();
            restarted = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{open} rows open after {:?} and {} kills",
            started.elapsed(),
            kills.len()
        );
    }
    h.stop().await;
    println!(
        "{ROWS} rows in {:.1}s; killed (unit, rows finished by then): {kills:?}; the database restarted: {restarted}",
        started.elapsed().as_secs_f64()
    );
    assert!(restarted && kills.len() >= 3, "{kills:?}");
    let failed = ROWS / 500;
    assert_eq!(
        count(&db, "select count(*) from numbers where not success"),
        failed
    );
    assert_eq!(
        count(
            &db,
            r#"select count(*) from numbers where not success and error_description = format('jq: "no %s"', value)"#
        ),
        failed
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where success and is_odd = (value % 2 = 1)"
        ),
        ROWS - failed
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from numbers where reservation_times <> 1"
        ),
        0,
        "a row claimed twice: a restarted source takes its claims back"
    );
    assert_eq!(
        count(&db, "select count(*) from numbers where end_time is null"),
        0
    );
}

/// A row whose first attempt outlives its lease is claimed again; the first attempt, finishing
/// late, is refused by the fence, and the row holds the second attempt's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_attempt_is_refused_by_the_fence_once_its_lease_ran_out() {
    let db = database();
    numbers(&db, 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut h = harness(&format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: pg-fence}}\nspec:\n  sources:\n    - name: jobs\n      postgres: {{connection: {{url: \"{}\", password: {{env: {PASSWORD}}}}}, table: numbers, key: value, columns: [value, reservation_times], lease: 3s, poll: 100ms, endWhenEmpty: true}}\n  stages:\n    - name: slow\n      timeout: 30s\n      exec: {{command: [python3, \"{{dir}}/slow.py\"]}}\n  sinks: [{{name: out, file: {{path: \"{}\"}}}}]\n",
        db.url(),
        out.display()
    ))
    .await;
    common::handler(
        &h,
        "slow.py",
        "import json, sys, time\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['data']['reservation_times'] == 1:\n        time.sleep(4)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n",
    );
    h.spawn("out", "r");
    h.spawn("slow", "r");
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    let status = ended(&mut h, 2, LIMIT).await;
    let log = h.log_of("jobs", "r");
    assert!(status.success(), "{log}");
    let lines = h.wait_for_lines(&out, 2, LIMIT).await;
    h.stop().await;
    assert_eq!(
        db.psql("select reservation_times, success, end_time is not null from numbers")
            .unwrap(),
        "2|t|t",
        "{lines:?}"
    );
    assert!(
        log.contains("another attempt holds those rows"),
        "the first attempt's outcome was to be refused: {log}"
    );
}

/// With an hour's poll, rows inserted into an empty table are claimed as soon as a trigger's
/// NOTIFY says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_wakes_the_source_long_before_its_poll() {
    let JobsRun {
        db,
        mut h,
        out,
        _dir,
    } = jobs_run(
        "pg-notify",
        0,
        "        completeOn: publish\n        poll: 1h\n        notifyChannel: numbers_added\n",
    )
    .await;
    db.psql(
        "create function numbers_added() returns trigger as $$ begin perform pg_notify('numbers_added', ''); return null; end $$ language plpgsql; \
         create trigger numbers_added after insert on numbers for each statement execute function numbers_added()",
    )
    .unwrap();
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    // Once the source has looked and found nothing, it waits for an hour or a NOTIFY; the rows go
    // in once it listens (a NOTIFY before that reaches nobody), whatever the machine's load.
    let started = Instant::now();
    while count(
        &db,
        "select count(*) from pg_stat_activity where query = 'LISTEN \"numbers_added\"'",
    ) == 0
    {
        assert!(
            started.elapsed() < LIMIT,
            "the source does not listen: {}",
            h.log_of("jobs", "r")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let inserted = Instant::now();
    db.psql("insert into numbers (value) select generate_series(1, 10)")
        .unwrap();
    let lines = h.wait_for_lines(&out, 10, Duration::from_secs(30)).await;
    let took = inserted.elapsed();
    h.stop().await;
    println!(
        "10 rows inserted: at the sink {:.2}s later",
        took.as_secs_f64()
    );
    assert_eq!(lines.len(), 10);
    assert_eq!(count(&db, "select count(*) from numbers where success"), 10);
}

/// A table the source must not write, followed by its `updated_at` (ten rows share each time, and a
/// batch of 7 ends inside such a group, where reading on by the time alone would skip or repeat
/// rows): every row once across a kill right after a frame was stored; rows added later and a row
/// changed later arrive as new items; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_source_reads_each_row_once_across_a_kill_and_writes_nothing() {
    let db = database();
    let events = |from: u64, to: u64| {
        format!(
            "insert into events (id, updated_at, body) select n, timestamptz '2026-01-01' + (n / 10) * interval '1 second', \
             json_build_object('n', n) from generate_series({from}, {to}) n"
        )
    };
    db.psql(&format!(
        "create table events (id bigint primary key, updated_at timestamptz not null, body jsonb); {}",
        events(1, 500)
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut h = harness(&format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: pg-follow}}\nspec:\n  sources:\n    - name: events\n      postgres: {{connection: {{url: \"{url}\", password: {{env: {PASSWORD}}}}}, table: events, key: id, itemColumn: body, follow: {{column: updated_at}}, batch: 7, poll: 100ms}}\n  stages: [{{name: pass, passthrough: {{}}}}]\n  sinks: [{{name: out, file: {{path: \"{out}\"}}}}]\n",
        url = db.url(),
        out = out.display()
    ))
    .await;
    h.spawn("out", "r");
    h.spawn("pass", "r");
    let env = [(PASSWORD, db.password())];
    h.killed_after_stored_with("events", "killed", "1", &env)
        .await;
    h.spawn_with_env("events", "r", &env);
    h.wait_for_lines(&out, 500, LIMIT).await;
    // Later rows, and a row changed later: new items.
    db.psql(&format!(
        "{}; update events set updated_at = timestamptz '2026-02-01', body = '{{\"n\": 3, \"again\": true}}' where id = 3",
        events(501, 800)
    ))
    .unwrap();
    let lines = h.wait_for_lines(&out, 801, LIMIT).await;
    h.wait_until_drained(LIMIT).await;
    let log = h.log_of("events", "r");
    h.stop().await;
    let items = common::json_lines(&lines);
    let numbers: Vec<u64> = items.iter().map(|i| i["n"].as_u64().unwrap()).collect();
    let mut expected: Vec<u64> = (1..=800).collect();
    expected.push(3);
    assert_eq!(numbers.len(), 801, "{log}");
    let once: BTreeSet<u64> = numbers.iter().copied().collect();
    assert_eq!(once.len(), 800, "a row is missing");
    assert_eq!(
        numbers.iter().filter(|&&n| n == 3).count(),
        2,
        "the changed row once more"
    );
    assert_eq!(
        items
            .iter()
            .filter(|i| **i == serde_json::json!({"n": 3, "again": true}))
            .count(),
        1,
        "the changed row, as it is now"
    );
    assert_eq!(
        count(
            &db,
            "select n_tup_upd + n_tup_del from pg_stat_user_tables where relname = 'events'"
        ),
        1,
        "the source wrote to the table (the one update is the test's)"
    );
}

/// A delay counts back from a time: following a number with one is refused at start, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_on_a_column_that_is_not_a_time_is_refused_at_start() {
    let JobsRun {
        db, mut h, _dir, ..
    } = jobs_run("pg-follow-delay", 10, "        follow: {delay: 5s}\n").await;
    h.spawn_with_env("jobs", "r", &[(PASSWORD, db.password())]);
    let status = ended(&mut h, 2, LIMIT).await;
    let log = h.log_of("jobs", "r");
    h.stop().await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "postgres.follow.delay counts back from a time, and value is a column of bigint"
        ),
        "{log}"
    );
}

/// A big table whose finished rows every claim would read again is named at the start, with the
/// index to add; once it has that index, nothing is said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_table_without_an_index_of_its_unfinished_rows_gets_the_statement_to_add_one() {
    const ROWS: u64 = 40_000;
    let JobsRun {
        db, mut h, _dir, ..
    } = jobs_run(
        "pg-index",
        ROWS,
        "        completeOn: publish\n        batch: 10\n        maxClaimed: 10\n",
    )
    .await;
    let advice = "Add one: CREATE INDEX ON \"numbers\" (\"value\") WHERE \"success\" IS NULL";
    let claimed = |db: &PostgresServer| {
        count(
            db,
            "select count(*) from numbers where reservation_id is not null",
        )
    };
    h.spawn_with_env("jobs", "r1", &[(PASSWORD, db.password())]);
    let started = Instant::now();
    while claimed(&db) == 0 {
        assert!(started.elapsed() < LIMIT, "{}", h.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = h.log_of("jobs", "r1");
    assert!(log.contains(advice), "{log}");

    h.stop().await;
    db.psql("create index on numbers (value) where success is null")
        .unwrap();
    let before = claimed(&db);
    h.spawn_with_env("jobs", "r2", &[(PASSWORD, db.password())]);
    while claimed(&db) == before {
        assert!(started.elapsed() < LIMIT, "{}", h.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = h.log_of("jobs", "r2");
    assert!(!log.contains("has no index"), "{log}");
}
