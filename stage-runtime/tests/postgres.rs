//! The postgres sink against a real PostgreSQL server (Debian's `postgresql`, started by the test as
//! `switchyard_platform::embedded_postgres` does it): every item once across SIGKILLs of the sink
//! and an immediate stop of the database, a row the database refuses dead-lettered alone, and a
//! table that is not there named at start.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{harness, header, settled_reports, terminate, Harness};
use switchyard_crds::unit::headers;
use switchyard_platform::embedded_postgres::PostgresServer;

const LIMIT: Duration = Duration::from_secs(120);
/// The variable the sink's processes read the password from (`password.env`).
const PASSWORD: &str = "SWITCHYARD_TEST_PGPASSWORD";

fn database() -> PostgresServer {
    PostgresServer::start().unwrap_or_else(|e| panic!("a PostgreSQL server for the test: {e}"))
}

fn pipeline(name: &str, db: &PostgresServer, source: &str, sink: &str) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  sources: [{{name: src, {source}}}]\n  stages: [{{name: pass, passthrough: {{}}}}]\n  sinks:\n    - name: out\n      postgres:\n        connection: {{url: \"{url}\", password: {{env: {PASSWORD}}}}}\n{sink}",
        url = db.url()
    )
}

fn count(db: &PostgresServer, sql: &str) -> u64 {
    db.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Runs the sink as a process with the password in its environment; returns its index among the
/// harness's processes.
fn spawn_sink(h: &mut Harness, db: &PostgresServer, replica: &str) {
    h.spawn_with_env("out", replica, &[(PASSWORD, db.password())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_is_written_once_across_kills_of_the_sink_and_an_immediate_stop_of_the_database()
{
    const ITEMS: u64 = 100_000;
    let mut db = database();
    db.psql(
        "create table items (item_id text primary key, seq bigint not null, body jsonb not null)",
    )
    .unwrap();
    let mut h = harness(&pipeline(
        "pg-once",
        &db,
        &format!("generator: {{count: {ITEMS}}}"),
        "        table: items\n        columns: {seq: .seq, body: .}\n        itemIdColumn: item_id\n",
    ))
    .await;
    h.spawn("src", "r");
    h.spawn("pass", "r");
    let started = Instant::now();
    let mut kills = Vec::new();
    let mut restarted_database = false;
    let mut generation = 0;
    loop {
        generation += 1;
        spawn_sink(&mut h, &db, &format!("r{generation}"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let written = count(&db, "select count(*) from items");
        if written == ITEMS {
            break;
        }
        // The sink process is the last one spawned, after the source and the stage.
        let mut sink = h.take_process(2);
        sink.kill().expect("SIGKILL the sink");
        sink.wait().expect("the sink ends");
        kills.push(written);
        if !restarted_database && written > ITEMS / 4 {
            // As `pg_ctl stop -m immediate`: no checkpoint, connections cut; then up again.
            tokio::task::block_in_place(|| {
                db.stop_immediately();
                std::thread::sleep(Duration::from_millis(500));
                db.start_again()
            })
            .expect("the database starts again");
            restarted_database = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{written} of {ITEMS} rows after {:?} and {} kills",
            started.elapsed(),
            kills.len()
        );
    }
    h.wait_until_drained(LIMIT).await;
    let dead = h.busy_consumers().await;
    h.stop().await;
    println!(
        "{ITEMS} items in {:.1}s; the sink SIGKILLed {} times, with {kills:?} rows written; the database stopped at once and started again: {restarted_database}",
        started.elapsed().as_secs_f64(),
        kills.len()
    );
    assert!(dead.is_empty(), "{dead:?}");
    assert!(
        kills.iter().filter(|&&w| w > 0 && w < ITEMS).count() >= 2,
        "the sink was to be killed while it wrote: {kills:?}"
    );
    assert!(restarted_database, "the database was to stop mid-run");
    assert_eq!(count(&db, "select count(*) from items"), ITEMS);
    assert_eq!(
        count(
            &db,
            &format!("select count(*) from generate_series(1, {ITEMS}) s where not exists (select 1 from items where seq = s)")
        ),
        0,
        "items missing"
    );
    assert_eq!(
        count(&db, "select count(distinct seq) from items"),
        ITEMS,
        "an item written twice under two ids"
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from items where body->>'seq' <> seq::text"
        ),
        0
    );
}

/// Deterministic, where the kills above are not: the sink dies right after a batch has committed
/// and before it acknowledges the inputs, so every row of that batch comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_by_a_sink_killed_before_its_acknowledgement_are_not_written_again() {
    let db = database();
    db.psql("create table once (item_id text primary key, seq bigint not null)")
        .unwrap();
    let mut h = harness(&pipeline(
        "pg-acked",
        &db,
        "generator: {count: 2000}",
        "        table: once\n        columns: {seq: .seq}\n        itemIdColumn: item_id\n",
    ))
    .await;
    h.spawn("src", "r");
    h.spawn("pass", "r");
    // Its third input message: items travel in frames, a few messages hold them all.
    h.killed_after_stored_with("out", "killed", "3", &[(PASSWORD, db.password())])
        .await;
    let before = count(&db, "select count(*) from once");
    assert!(before > 0, "the killed sink wrote {before} rows");
    let reports = h.watch_stats("out").await;
    spawn_sink(&mut h, &db, "r");
    h.wait_until_drained(LIMIT).await;
    // The batch comes again only after the acknowledgement deadline, and reports are a second
    // apart: wait for one that says so (a sink that wrote those rows twice never sends it).
    let skipped = settled_reports(&reports, Duration::from_secs(15), |r| {
        r.values().map(|r| r.duplicates_skipped).sum::<u64>() > 0
    })
    .await
    .values()
    .map(|r| r.duplicates_skipped)
    .sum::<u64>();
    h.stop().await;
    assert_eq!(count(&db, "select count(*) from once"), 2000);
    assert_eq!(count(&db, "select count(distinct seq) from once"), 2000);
    assert!(
        skipped > 0,
        "the rows of the killed sink's last batch were to come again and be skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_dead_lettered_alone_with_its_sqlstate() {
    let db = database();
    db.psql("create table checked (item_id text primary key, seq bigint not null check (seq % 7 <> 0), label text)")
        .unwrap();
    let mut h = harness(&pipeline(
        "pg-refused",
        &db,
        "generator: {count: 700, payload: '{\"seq\": {{seq}}, \"label\": \"n{{seq}}\"}'}",
        "        table: checked\n        columns: {seq: .seq, label: .label}\n        itemIdColumn: item_id\n",
    ))
    .await;
    h.spawn("src", "r");
    h.spawn("pass", "r");
    spawn_sink(&mut h, &db, "r");
    let dead = h.dead_letters(100).await;
    h.wait_until_drained(LIMIT).await;
    let log = h.log_of("out", "r");
    h.stop().await;
    assert_eq!(count(&db, "select count(*) from checked"), 600);
    assert_eq!(
        count(&db, "select count(*) from checked where seq % 7 = 0"),
        0
    );
    assert_eq!(dead.len(), 100, "one dead letter per refused row");
    let mut refused = BTreeSet::new();
    for letter in &dead {
        let seq: u64 = header(letter, headers::ORIGIN_SEQ).parse().unwrap();
        assert_eq!(seq % 7, 0, "a row the database takes was dead-lettered");
        refused.insert(seq);
        let error = header(letter, headers::ERROR);
        assert!(
            error.contains("SQLSTATE 23514") && error.contains("checked_seq_check"),
            "{error}"
        );
        assert_eq!(header(letter, headers::FAILED_UNIT), "out");
    }
    assert_eq!(refused.len(), 100);
    assert!(!log.contains(db.password()), "the password is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_is_not_there_stops_the_sink_at_start_with_the_databases_words() {
    let db = database();
    let mut h = harness(&pipeline(
        "pg-missing",
        &db,
        "generator: {count: 10}",
        "        table: missing\n        itemIdColumn: item_id\n",
    ))
    .await;
    spawn_sink(&mut h, &db, "r");
    let mut sink = h.take_process(0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sink.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            terminate(&mut sink);
            panic!("the sink still runs: {}", h.log_of("out", "r"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = h.log_of("out", "r");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("sink out") && log.contains("relation \"missing\" does not exist"),
        "{log}"
    );
    assert!(!log.contains(db.password()), "the password is in the log");
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM: (CA, server certificate, server key).
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Reaches the server with `tls` as a Pipeline would write it; whether the connection is encrypted (`pg_stat_ssl`).
async fn encrypted(db: &PostgresServer, tls: serde_json::Value) -> Result<bool, String> {
    let settings: switchyard_crds::postgres::PostgresConnection =
        serde_json::from_value(serde_json::json!({
            "url": db.url_with_password(),
            "tls": tls,
            "connectTimeout": "5s",
        }))
        .unwrap();
    let database = switchyard_stage::postgres::Database::connect(&settings)
        .await
        .map_err(|e| e.to_string())?;
    let rows = database
        .query(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows[0].get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_used_when_asked_and_verify_full_refuses_a_certificate_of_another_authority() {
    let (ca, certificate, key) = certificates();
    let db = PostgresServer::start_with_tls(&certificate, &key).expect("a server with TLS");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let (other_ca, _, _) = certificates();
    let other_ca_file = dir.path().join("other.crt");
    std::fs::write(&other_ca_file, &other_ca).unwrap();

    assert_eq!(encrypted(&db, serde_json::json!(null)).await, Ok(false));
    assert_eq!(
        encrypted(&db, serde_json::json!({"mode": "require"})).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(
            &db,
            serde_json::json!({"mode": "verify-full", "caFile": ca_file})
        )
        .await,
        Ok(true)
    );
    let refused = encrypted(
        &db,
        serde_json::json!({"mode": "verify-full", "caFile": other_ca_file}),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    assert!(!refused.contains(db.password()), "{refused}");
}
