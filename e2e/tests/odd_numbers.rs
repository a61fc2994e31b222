//! The odd-numbers example end to end through `switchyard run`, on a real PostgreSQL server: the
//! 100,000 rows of `examples/odd-numbers.sql` dispatched as jobs to a switcher of three workers,
//! `is_odd` written into each row and each row finished once, and the run ending by itself.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_e2e::{binary, examples_copy};
use switchyard_platform::embedded_postgres::PostgresServer;

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_odd_numbers_example_finishes_every_row_once_and_ends_by_itself() {
    let db = PostgresServer::start()
        .unwrap_or_else(|e| panic!("a PostgreSQL server for the example: {e}"));
    let dir = examples_copy();
    let sql = std::fs::read_to_string(dir.path().join("odd-numbers.sql")).unwrap();
    db.psql(&sql).unwrap();
    let started = Instant::now();
    let mut run = Command::new(binary("switchyard"))
        .args(["run", "odd-numbers.yaml", "--progress", "lines"])
        .env("DATABASE_URL", db.url_with_password())
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("switchyard run");
    while run.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = run.kill();
            panic!("switchyard run did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = run.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    println!(
        "100,000 rows in {:.1}s through switchyard run",
        started.elapsed().as_secs_f64()
    );
    let rows = db
        .psql("select count(*) filter (where success and is_odd = (value % 2 = 1) and reservation_times = 1 and end_time >= start_time), count(*) from numbers")
        .unwrap();
    assert_eq!(rows, "100000|100000", "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(db.password()) && !stderr.contains(db.password()),
        "the password was shown"
    );
}
