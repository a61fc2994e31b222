//! What both modes of the postgres source need: the table opened and checked, its statements
//! prepared, refusals that name the source, the item as SQL, and waking on a NOTIFY.

use std::time::Duration;

use switchyard_crds::duration::parse_duration;
use switchyard_crds::postgres::PostgresSource as Settings;

use crate::postgres::{quoted, Database};
use crate::sources::error::SourceError;
use crate::sources::unit::SourceUnit;

/// A postgres source's table once checked: its database, its quoted name, and the source its
/// refusals name.
pub(super) struct Table<'a> {
    pub(super) database: Database,
    pub(super) name: String,
    pub(super) settings: &'a Settings,
    pub(super) unit: &'a SourceUnit,
}

/// Connects, and checks that the table has the key, the item's columns and `more`. `hint` says what
/// to do about a missing one of `more`.
pub(super) async fn open_table<'a>(
    settings: &'a Settings,
    unit: &'a SourceUnit,
    more: &[String],
    hint: &str,
) -> Result<Table<'a>, SourceError> {
    let refused = |e: String| refused(unit, e);
    let database = Database::connect(&settings.connection)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let table = Table {
        database,
        name: quoted(&settings.table),
        settings,
        unit,
    };
    let present = table
        .database
        .columns_when_reachable(&table.name)
        .await
        .map_err(|e| table.refused_for_table(e))?;
    let mut needed: Vec<String> = vec![settings.key.clone()];
    needed.extend(settings.item_columns());
    needed.extend(settings.item_column.iter().cloned());
    needed.extend(more.iter().cloned());
    let absent: Vec<&String> = needed.iter().filter(|c| !present.contains(c)).collect();
    if !absent.is_empty() {
        return Err(refused(format!(
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
    Ok(table)
}

impl Table<'_> {
    /// What the database said of the table, with the source and the table named.
    pub(super) fn refused_for_table(&self, problem: impl std::fmt::Display) -> SourceError {
        refused(
            self.unit,
            format!("table {}: {problem}", self.settings.table),
        )
    }

    /// The type of `column`, as SQL writes it (`bigint`, `timestamp with time zone`, …).
    pub(super) async fn column_type(&self, column: &str) -> Result<String, SourceError> {
        self.database
            .column_type_when_reachable(&self.name, column)
            .await
            .map_err(|e| refused(self.unit, e))
    }

    /// Checks each statement against the database, waiting while it cannot be reached.
    pub(super) async fn prepare(&self, statements: &[&str]) -> Result<(), SourceError> {
        for statement in statements {
            self.database
                .prepare_when_reachable(statement)
                .await
                .map_err(|e| self.refused_for_table(e))?;
        }
        Ok(())
    }
}

/// A setting or table the source cannot work with, the source named.
pub(super) fn refused(unit: &SourceUnit, problem: impl std::fmt::Display) -> SourceError {
    SourceError::Settings(format!("postgres source {}: {problem}", unit.name))
}

/// The SQL expression of a row's item as text, the row being `row`: one column, or the chosen
/// columns as a JSON object.
pub(super) fn item_expression(settings: &Settings) -> String {
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

pub(super) fn duration(value: &Option<String>, default: &str) -> Result<Duration, String> {
    let value = value.as_deref().unwrap_or(default);
    parse_duration(value).map_err(|e| e.to_string())
}

/// Listens on the source's `notifyChannel`, when it names one, on a connection of its own.
pub(super) fn listen(
    settings: &Settings,
    database: &Database,
) -> Option<tokio::sync::mpsc::Receiver<()>> {
    settings.notify_channel.clone().map(|channel| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let database = database.clone();
        tokio::spawn(async move { database.listen(channel, tx).await });
        rx
    })
}

/// Waits for the poll, a NOTIFY, or the unit's stop; false on the stop.
pub(super) async fn wait_for_rows(
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
