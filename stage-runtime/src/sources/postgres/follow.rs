//! A table the source must not write, followed: its rows read in the order of a column that only
//! grows (a serial id, an `updated_at` time), then of the key, a batch at a time, each from where the
//! last read stopped. The position (that column's value and the key of the last row stored) is the
//! source's checkpoint, kept as a file source keeps its line (`framer`): a restarted source reads on
//! from it, and what it stores again goes under the same ids, which JetStream drops.
//!
//! An item's id is `<source>:<key>` when the column is the key; otherwise `<source>:<key>@<value>`,
//! so that a row changed later (its `updated_at` moved) is a new item, and the same change is one.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_crds::postgres::{PostgresFollow, PostgresSource as Settings};
use switchyard_crds::postgres::{DEFAULT_POLL, DEFAULT_SOURCE_BATCH};

use super::table::{duration, item_expression, listen, open_table, refused, wait_for_rows};
use crate::postgres::{quoted, Database};
use crate::sources::error::SourceError;
use crate::sources::framer::{self, Framer};
use crate::sources::unit::SourceUnit;

/// The last row stored: its column's value and its key, as JSON text gives them (the same whatever
/// the session's date style).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Position {
    value: String,
    key: String,
}

/// Column types a `delay` can be counted back from.
const TIMES: [&str; 3] = [
    "timestamp with time zone",
    "timestamp without time zone",
    "date",
];

pub(super) async fn run(
    settings: &Settings,
    following: &PostgresFollow,
    unit: &SourceUnit,
) -> Result<(), SourceError> {
    let failed = |e: String| refused(unit, e);
    let column = settings
        .follow_column()
        .unwrap_or(&settings.key)
        .to_string();
    let table = open_table(
        settings,
        unit,
        std::slice::from_ref(&column),
        "postgres.follow.column names the column to follow",
    )
    .await?;
    let key_type = table.column_type(&settings.key).await?;
    let column_type = table.column_type(&column).await?;
    let delay = match &following.delay {
        None => None,
        Some(_) if !TIMES.contains(&column_type.as_str()) => {
            return Err(failed(format!(
                "postgres.follow.delay counts back from a time, and {column} is a column of {column_type}: leave the delay out, or follow a timestamp column"
            )))
        }
        Some(_) => Some(duration(&following.delay, "0s").map_err(failed)?),
    };
    let reads = Reads::new(
        settings,
        &table.name,
        &column,
        &column_type,
        &key_type,
        delay.is_some(),
    );
    table.prepare(&[&reads.first, &reads.next]).await?;
    let follower = Follower {
        settings,
        database: table.database,
        reads,
        same_column: column == settings.key,
        batch: settings.batch.unwrap_or(DEFAULT_SOURCE_BATCH) as i64,
        delay_ms: delay.map(|d| d.as_millis() as i64),
        poll: duration(&settings.poll, DEFAULT_POLL).map_err(failed)?,
    };
    unit.resuming(|| follower.follow(unit)).await
}

/// The two reads: from the start, and after a position.
struct Reads {
    first: String,
    next: String,
}

impl Reads {
    /// `$1` is the batch; after a position, `$2` and `$3` are its value and key (`$2` alone when
    /// the column is the key); the delay in milliseconds comes last.
    fn new(
        settings: &Settings,
        table: &str,
        column: &str,
        column_type: &str,
        key_type: &str,
        delayed: bool,
    ) -> Reads {
        let (c, k) = (quoted(column), quoted(&settings.key));
        let same = column == settings.key;
        let filter = settings
            .filter
            .as_deref()
            .map_or("TRUE".to_string(), |f| format!("({f})"));
        let item = item_expression(settings);
        let order = if same {
            format!("row.{k}")
        } else {
            format!("row.{c}, row.{k}")
        };
        let read = |after: &str, delay_at: usize| {
            let delay = if delayed {
                format!(" AND row.{c} <= now() - ${delay_at}::int8 * interval '1 millisecond'")
            } else {
                String::new()
            };
            format!(
                "SELECT to_jsonb(row.{c}) #>> '{{}}', to_jsonb(row.{k}) #>> '{{}}', {item} \
                 FROM {table} AS row \
                 WHERE row.{c} IS NOT NULL AND {filter}{after}{delay} \
                 ORDER BY {order} LIMIT $1::int8"
            )
        };
        let (after, delay_at) = if same {
            (format!(" AND row.{k} > CAST($2::text AS {key_type})"), 3)
        } else {
            (
                format!(
                    " AND (row.{c}, row.{k}) > (CAST($2::text AS {column_type}), CAST($3::text AS {key_type}))"
                ),
                4,
            )
        };
        Reads {
            first: read("", 2),
            next: read(&after, delay_at),
        }
    }
}

struct Follower<'a> {
    settings: &'a Settings,
    database: Database,
    reads: Reads,
    same_column: bool,
    batch: i64,
    delay_ms: Option<i64>,
    poll: Duration,
}

impl Follower<'_> {
    /// Reads on from the checkpoint until the unit stops, or it has caught up (`endWhenEmpty`).
    async fn follow(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let resumed = framer::resume::<Position>(unit).await?;
        let mut at = resumed.at.clone();
        let mut framer = Framer::new(unit, resumed);
        let mut woken = listen(self.settings, &self.database);
        while !unit.stopping() {
            let rows = self.read_after(at.as_ref()).await?;
            let caught_up = (rows.len() as i64) < self.batch;
            for row in rows {
                let (value, key, item): (String, String, Option<String>) =
                    (row.get(0), row.get(1), row.get(2));
                let name = if self.same_column {
                    key.clone()
                } else {
                    format!("{key}@{value}")
                };
                let position = Position { value, key };
                framer
                    .offer(
                        unit,
                        unit.lineage(name),
                        Bytes::from(item.unwrap_or_else(|| "null".into())),
                        position.clone(),
                    )
                    .await?;
                at = Some(position);
            }
            if caught_up {
                // Nothing else is ready: what is held goes now, and the checkpoint follows it.
                framer.settle(unit).await?;
                if self.settings.end_when_empty {
                    tracing::info!("every row is read: the source ends");
                    break;
                }
                if !wait_for_rows(unit, self.poll, &mut woken).await {
                    break;
                }
            }
        }
        framer.finish(unit).await
    }

    async fn read_after(
        &self,
        at: Option<&Position>,
    ) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&self.batch];
        let statement = match at {
            None => &self.reads.first,
            Some(at) => {
                params.push(&at.value);
                if !self.same_column {
                    params.push(&at.key);
                }
                &self.reads.next
            }
        };
        if let Some(delay) = &self.delay_ms {
            params.push(delay);
        }
        self.database
            .query_until_answered(statement, &params)
            .await
            .map_err(SourceError::Settings)
    }
}
