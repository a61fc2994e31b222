//! The postgres source, in two modes: the rows of a table dispatched as jobs, claimed with leases
//! and their outcomes written back (`claims`), or a table it must not write followed by a column
//! that only grows, as a file source follows new lines (`follow`). What both need is here.

mod claims;
mod follow;

use std::time::Duration;

use switchyard_crds::duration::parse_duration;
use switchyard_crds::postgres::PostgresSource as Settings;

use super::{Source, SourceError, SourceUnit};
use crate::postgres::{quoted, Database};

pub struct PostgresSource<'a>(pub &'a Settings);

impl Source for PostgresSource<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        match &self.0.follow {
            Some(following) => follow::run(self.0, following, unit).await,
            None => claims::run(self.0, unit).await,
        }
    }
}

/// Connects, and checks that the table has the key, the item's columns and `more`; the database
/// and the table's quoted name. `hint` says what to do about a missing one of `more`.
async fn open_table(
    settings: &Settings,
    unit: &SourceUnit,
    more: &[String],
    hint: &str,
) -> Result<(Database, String), SourceError> {
    let failed = |e: String| SourceError::Settings(format!("postgres source {}: {e}", unit.name));
    let database = Database::connect(&settings.connection)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let table = quoted(&settings.table);
    let present = database
        .columns_when_reachable(&table)
        .await
        .map_err(|e| failed(format!("table {}: {e}", settings.table)))?;
    let mut needed: Vec<String> = vec![settings.key.clone()];
    needed.extend(settings.item_columns());
    needed.extend(settings.item_column.iter().cloned());
    needed.extend(more.iter().cloned());
    let absent: Vec<&String> = needed.iter().filter(|c| !present.contains(c)).collect();
    if !absent.is_empty() {
        return Err(failed(format!(
            "table {} has no column {} (it has {}); {hint}",
            settings.table,
            absent
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            present.join(", ")
        )));
    }
    Ok((database, table))
}

/// The SQL expression of a row's item as text, the row being `row`: one column, or the chosen
/// columns as a JSON object.
fn item_expression(settings: &Settings) -> String {
    match &settings.item_column {
        Some(column) => format!("row.{}::text", quoted(column)),
        None => {
            let fields: Vec<String> = settings
                .item_columns()
                .iter()
                .map(|c| format!("'{c}', row.{}", quoted(c)))
                .collect();
            format!("json_build_object({})::text", fields.join(", "))
        }
    }
}

fn duration(value: &Option<String>, default: &str) -> Result<Duration, String> {
    let value = value.as_deref().unwrap_or(default);
    parse_duration(value).map_err(|e| e.to_string())
}

/// Listens on the source's `notifyChannel`, when it names one, on a connection of its own.
fn listen(settings: &Settings, database: &Database) -> Option<tokio::sync::mpsc::Receiver<()>> {
    settings.notify_channel.clone().map(|channel| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let database = database.clone();
        tokio::spawn(async move { database.listen(channel, tx).await });
        rx
    })
}

/// Waits for the poll, a NOTIFY, or the unit's stop; false on the stop.
async fn wait_for_rows(
    unit: &SourceUnit,
    poll: Duration,
    woken: &mut Option<tokio::sync::mpsc::Receiver<()>>,
) -> bool {
    let Some(notified) = woken else {
        return unit.sleep_or_stop(poll).await;
    };
    let mut shutdown = unit.shutdown.clone();
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(poll) => true,
        wake = notified.recv() => {
            if wake.is_none() {
                // The listener is gone: the poll alone from now on.
                *woken = None;
            }
            true
        }
        _ = shutdown.changed() => false,
    }
}
