//! The postgres sink: each item a row of a table, many rows to a statement, each item once.
//!
//! Writes that arrive while a statement runs wait for the next one, so rows go out in batches as
//! large as the unit keeps items in flight (up to `batch`), without a timer. A batch is one
//! statement: the rows as one JSON array, turned into the table's row type by the database itself
//! (`json_populate_recordset`), so every column type the table has is converted as PostgreSQL
//! would, and `ON CONFLICT` on the columns that make a row a repeat. A write resolves once its
//! statement has committed; only then is the input acknowledged.
//!
//! A statement the database refuses for a row's sake (a constraint, a value of the wrong type)
//! fails its whole batch: every row of it is then a suspect, written again alone
//! (`Sink::write_alone`), so that only the culprit is dead-lettered, with its SQLSTATE. A lost
//! connection or a database that is restarting is waited out (the batch is tried again, its rows
//! unchanged), a serialization failure or deadlock is retried as the unit's `retry` says.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::value::RawValue;
use switchyard_crds::jq::{JqFilter, Val};
use switchyard_crds::postgres::{ConflictAction, PostgresSink as Settings};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::types::Json;

use super::sink::{OpenSink, SinkContext, SinkError, Written};
use crate::lineage::Lineage;
use crate::postgres::{self as pg, quoted, Database};
use crate::retry::StepError;

/// Rows waiting for a statement, at most: a unit's writes in flight are far fewer.
const QUEUE: usize = 65_536;
/// How long a batch is tried again while the database cannot be reached, before its writes fail
/// (as transient: the unit's retries take over, then the dead letters).
const UNREACHABLE_FOR_AT_MOST: Duration = Duration::from_secs(300);

pub struct PostgresSink {
    rows: mpsc::Sender<Row>,
    shared: Arc<Shared>,
}

/// What the batches and the writes alone share.
struct Shared {
    database: Database,
    statement: String,
    columns: Vec<(String, JqFilter)>,
    item_id_column: Option<String>,
    conflict_columns: Vec<String>,
    action: ConflictAction,
    unit: String,
}

/// One item on its way to a statement.
struct Row {
    /// The row as a JSON object, the table's column names as keys.
    json: String,
    /// The values of the conflict columns: rows of one statement must differ in them.
    key: String,
    done: oneshot::Sender<Result<Written, StepError>>,
}

impl PostgresSink {
    /// Connects, and checks the statement against the table: a table or column that is not there,
    /// or a conflict key without a unique index, stops the unit at start with the database's words.
    pub async fn open(unit: &str, settings: &Settings) -> Result<PostgresSink, SinkError> {
        let refused = |message: String| SinkError::Postgres {
            unit: unit.to_string(),
            message,
        };
        let database = Database::connect(&settings.connection)
            .await
            .map_err(|e| refused(e.to_string()))?;
        let mut columns = Vec::new();
        for (column, expression) in settings.columns.iter().flatten() {
            let filter = JqFilter::compile(expression).map_err(|e| {
                refused(format!(
                    "columns.{column}: the jq expression `{expression}` does not compile: {e}"
                ))
            })?;
            columns.push((column.clone(), filter));
        }
        let table = quoted(&settings.table);
        let present = database
            .columns_when_reachable(&table)
            .await
            .map_err(|e| refused(format!("table {}: {e}", settings.table)))?;
        let absent: Vec<String> = settings
            .written_columns()
            .into_iter()
            .filter(|c| !present.contains(c))
            .collect();
        if !absent.is_empty() {
            return Err(refused(format!(
                "table {} has no column {} (it has {})",
                settings.table,
                absent.join(", "),
                present.join(", ")
            )));
        }
        let statement = statement(settings);
        database
            .prepare_when_reachable(&statement)
            .await
            .map_err(|e| refused(format!("table {}: {e}", settings.table)))?;
        let shared = Arc::new(Shared {
            database,
            statement,
            columns,
            item_id_column: settings.item_id_column.clone(),
            conflict_columns: settings.conflict_columns(),
            action: settings.conflict_action(),
            unit: unit.to_string(),
        });
        let (rows, queue) = mpsc::channel(QUEUE);
        let batch = settings
            .batch
            .unwrap_or(switchyard_crds::postgres::DEFAULT_SINK_BATCH)
            .max(1) as usize;
        tokio::spawn(write_batches(shared.clone(), queue, batch));
        Ok(PostgresSink { rows, shared })
    }
}

impl OpenSink for PostgresSink {
    type Settings = Settings;

    async fn open_with(
        settings: &Settings,
        context: &SinkContext<'_>,
    ) -> Result<PostgresSink, SinkError> {
        PostgresSink::open(context.unit, settings).await
    }
}

impl super::sink::Sink for PostgresSink {
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        Box::pin(async move {
            let (json, key) = self.shared.row(lineage, payload)?;
            let (done, written) = oneshot::channel();
            self.rows
                .send(Row { json, key, done })
                .await
                .map_err(|_| StepError::transient("the sink's writer has stopped"))?;
            written
                .await
                .map_err(|_| StepError::transient("the sink's writer has stopped"))?
        })
    }

    fn write_alone<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        Box::pin(async move {
            let (json, _) = self.shared.row(lineage, payload)?;
            let batch = format!("[{json}]");
            match self.shared.execute(&batch).await {
                Ok(inserted) => Ok(self.shared.written(inserted.contains(&1))),
                Err(e) => Err(e.alone()),
            }
        })
    }
}

impl Shared {
    /// The item as a row: each mapped column's value, and the item's id.
    fn row(&self, lineage: &Lineage, payload: Bytes) -> Result<(String, String), StepError> {
        let mut fields: Vec<(&str, String)> = Vec::with_capacity(self.columns.len() + 1);
        if !self.columns.is_empty() {
            let item = crate::payload::Payload::Bytes(payload)
                .into_json()
                .map_err(|e| StepError::permanent(format!("the item is not JSON: {e}")))?;
            for (column, filter) in &self.columns {
                fields.push((column, one_value(column, filter, item.clone())?));
            }
        }
        if let Some(column) = &self.item_id_column {
            fields.push((column, json_string(&lineage.id)));
        }
        let mut json = String::from("{");
        for (i, (column, value)) in fields.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&json_string(column));
            json.push(':');
            json.push_str(value);
        }
        json.push('}');
        let key = self
            .conflict_columns
            .iter()
            .map(|c| {
                fields
                    .iter()
                    .find(|(name, _)| name == c)
                    .map_or("null", |(_, v)| v.as_str())
            })
            .collect::<Vec<_>>()
            .join("\u{1f}");
        Ok((json, key))
    }

    /// Runs the statement on `batch` (a JSON array of rows); the 1-based positions of the rows it
    /// inserted. A database that cannot be reached is waited for.
    async fn execute(&self, batch: &str) -> Result<HashSet<i64>, pg::Failure> {
        let rows = RawValue::from_string(batch.to_string())
            .map_err(|e| pg::Failure::Row(format!("a row is not JSON: {e}")))?;
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.database.query(&self.statement, &[&Json(&rows)]).await {
                Ok(rows) => {
                    return Ok(rows
                        .iter()
                        .filter_map(|row| row.try_get::<_, i64>(0).ok())
                        .collect())
                }
                Err(pg::Failure::Unreachable(e)) if started.elapsed() < UNREACHABLE_FOR_AT_MOST => {
                    tracing::warn!(unit = %self.unit, "the database cannot be reached ({e}); trying the batch again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn written(&self, inserted: bool) -> Written {
        // An update writes a repeat's values again: it is the item's row either way.
        if inserted || self.action == ConflictAction::Update {
            Written::New
        } else {
            Written::Duplicate
        }
    }
}

/// Takes the rows waiting, up to `batch`, into one statement; while it runs, the next batch gathers.
/// As many statements run at once as the pool has connections.
async fn write_batches(shared: Arc<Shared>, mut queue: mpsc::Receiver<Row>, batch: usize) {
    let running = Arc::new(Semaphore::new(shared.database.pool_size()));
    // Rows whose key a batch already held: they go in the next one.
    let mut later: Vec<Row> = Vec::new();
    loop {
        let Ok(permit) = running.clone().acquire_owned().await else {
            return;
        };
        let mut rows: Vec<Row> = Vec::new();
        let mut keys = HashSet::new();
        let mut held = std::mem::take(&mut later).into_iter();
        for row in held.by_ref() {
            if rows.len() < batch && keys.insert(row.key.clone()) {
                rows.push(row);
            } else {
                later.push(row);
            }
        }
        if rows.is_empty() {
            match queue.recv().await {
                Some(row) => {
                    keys.insert(row.key.clone());
                    rows.push(row);
                }
                None => return,
            }
        }
        while rows.len() < batch {
            match queue.try_recv() {
                Ok(row) if keys.contains(&row.key) => later.push(row),
                Ok(row) => {
                    keys.insert(row.key.clone());
                    rows.push(row);
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            write_batch(&shared, rows).await;
            drop(permit);
        });
    }
}

async fn write_batch(shared: &Shared, rows: Vec<Row>) {
    let mut batch = String::from("[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            batch.push(',');
        }
        batch.push_str(&row.json);
    }
    batch.push(']');
    let alone = rows.len() == 1;
    match shared.execute(&batch).await {
        Ok(inserted) => {
            for (i, row) in rows.into_iter().enumerate() {
                let _ = row
                    .done
                    .send(Ok(shared.written(inserted.contains(&(i as i64 + 1)))));
            }
        }
        Err(e) => {
            let error = if alone { e.alone() } else { e.in_batch() };
            for row in rows {
                let _ = row.done.send(Err(error.clone()));
            }
        }
    }
}

/// The one value a column's expression gives, as JSON text.
fn one_value(column: &str, filter: &JqFilter, item: Val) -> Result<String, StepError> {
    let values = filter
        .run(item)
        .map_err(|e| StepError::permanent(format!("columns.{column}: {e}")))?;
    match values.as_slice() {
        [value] => Ok(value.to_string()),
        [] => Err(StepError::permanent(format!(
            "columns.{column}: the expression gave no value for this item"
        ))),
        more => Err(StepError::permanent(format!(
            "columns.{column}: the expression gave {} values for this item, a column holds one",
            more.len()
        ))),
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The sink's one statement: `$1` is a JSON array of rows; it returns the positions of the rows it
/// inserted (a repeat skipped is not among them).
pub fn statement(settings: &Settings) -> String {
    let table = quoted(&settings.table);
    let columns: Vec<String> = settings
        .written_columns()
        .iter()
        .map(|c| quoted(c))
        .collect();
    let conflict: Vec<String> = settings
        .conflict_columns()
        .iter()
        .map(|c| quoted(c))
        .collect();
    let list = columns.join(", ");
    let key = conflict.join(", ");
    let on_conflict = match settings.conflict_action() {
        ConflictAction::Nothing => "DO NOTHING".to_string(),
        ConflictAction::Update => {
            let set: Vec<String> = columns
                .iter()
                .filter(|c| !conflict.contains(c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            if set.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", set.join(", "))
            }
        }
    };
    format!(
        "WITH input AS (\
           SELECT * FROM json_populate_recordset(NULL::{table}, $1::json) WITH ORDINALITY AS r\
         ), written AS (\
           INSERT INTO {table} ({list}) SELECT {list} FROM input \
           ON CONFLICT ({key}) {on_conflict} RETURNING {key}\
         ) \
         SELECT input.ordinality FROM input JOIN written USING ({key})"
    )
}

impl pg::Failure {
    /// What the writes of a batch that failed get: a row's refusal makes every row a suspect, to be
    /// written again alone; anything else fails them all alike.
    fn in_batch(&self) -> StepError {
        match self {
            pg::Failure::Row(message) => StepError::suspect(message.clone()),
            other => other.alone(),
        }
    }

    /// What a write that failed on its own gets.
    fn alone(&self) -> StepError {
        match self {
            pg::Failure::Row(message) => StepError::permanent(message.clone()),
            pg::Failure::Transient(message) => StepError::transient(message.clone()),
            pg::Failure::Unreachable(message) => StepError::transient(format!(
                "the database could not be reached for {UNREACHABLE_FOR_AT_MOST:?}: {message}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_quotes_every_name_and_returns_the_rows_it_inserted() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "connection": {"url": "postgres://app@db/app"},
            "table": "app.Results",
            "columns": {"value": ".value", "is_odd": ".odd"},
            "itemIdColumn": "item_id",
        }))
        .unwrap();
        let sql = statement(&settings);
        assert!(sql.contains(r#"NULL::"app"."Results""#), "{sql}");
        assert!(
            sql.contains(r#"INSERT INTO "app"."Results" ("is_odd", "value", "item_id")"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"ON CONFLICT ("item_id") DO NOTHING RETURNING "item_id""#),
            "{sql}"
        );
        let update: Settings = serde_json::from_value(serde_json::json!({
            "connection": {"url": "postgres://app@db/app"},
            "table": "numbers",
            "columns": {"value": ".value", "is_odd": ".odd"},
            "conflict": {"columns": ["value"], "action": "update"},
        }))
        .unwrap();
        assert!(statement(&update)
            .contains(r#"ON CONFLICT ("value") DO UPDATE SET "is_odd" = EXCLUDED."is_odd""#));
    }
}
