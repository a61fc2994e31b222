//! What a Pipeline says about PostgreSQL: how a unit connects, what the `postgres` source claims or
//! reads and what the `postgres` sink writes. Their checks are in `postgres_checks.rs`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::secret::SecretFromEnv;

/// Rows in one statement of the sink, unless `batch` says otherwise.
pub const DEFAULT_SINK_BATCH: u32 = 500;
/// Connections each replica keeps to the database, unless `poolSize` says otherwise.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// How long one statement may run, unless `statementTimeout` says otherwise.
pub const DEFAULT_STATEMENT_TIMEOUT: &str = "30s";
/// How long connecting may take, unless `connectTimeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "10s";

/// How a unit reaches its database. The password never appears in the Pipeline: it comes from the
/// unit's environment (`password.env`, or a URL in `urlFrom.env`), which in a cluster the operator
/// fills from a Secret (`secretKeyRef`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresConnection {
    /// `postgres://USER@HOST:PORT/DATABASE`, without a password (use `password`). Exactly one of
    /// `url` and `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The environment variable that holds the URL, password included, such as `DATABASE_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretFromEnv>,
    /// The environment variable that holds the password, such as `PGPASSWORD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretFromEnv>,
    /// Encryption: `disable` (the default), `require` (encrypted, the server's certificate not
    /// checked) or `verify-full` (the certificate checked against `caFile`, or the system's roots,
    /// and its name against the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PostgresTls>,
    /// Connections each replica keeps (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub pool_size: Option<u32>,
    /// The longest a statement may run before the server cancels it (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_timeout: Option<String>,
    /// The longest connecting may take (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

impl PostgresConnection {
    /// The secrets read from the unit's environment, each with its field under `field`.
    pub fn secrets(&self, field: &str) -> Vec<(String, &SecretFromEnv)> {
        let mut secrets = Vec::new();
        if let Some(from) = &self.url_from {
            secrets.push((format!("{field}.urlFrom"), from));
        }
        if let Some(password) = &self.password {
            secrets.push((format!("{field}.password"), password));
        }
        secrets
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresTls {
    pub mode: TlsMode,
    /// A PEM file of the certificate authorities to trust (`verify-full`); default: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

/// Dispatches the rows of a table as jobs: claims them in key order with a lease, publishes each
/// as an item, and writes its outcome back into the row once the item is finished (or as soon as it
/// is stored, `completeOn: publish`). A row whose lease runs out is claimed again, by the next
/// attempt; one that used `maxAttempts` is finished as failed. Every write-back is fenced by the
/// claim's reservation, so a late replica cannot overwrite a newer claim.
///
/// With `follow`, it writes nothing: it reads the rows in the order of a column that only grows,
/// from where it stopped, as a file source reads new lines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSource {
    pub connection: PostgresConnection,
    /// The table, as `name` or `schema.name`.
    #[schemars(length(min = 1))]
    pub table: String,
    /// The column that names a row and orders the claims: its primary key.
    #[schemars(length(min = 1))]
    pub key: String,
    /// The columns that make the item, as one JSON object (default: the key alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// Rather than `columns`: one column that holds the item (json, jsonb or text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_column: Option<String>,
    /// Only rows for which this SQL condition holds are claimed, such as `kind = 'odd'`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "where")]
    pub filter: Option<String>,
    /// Rows claimed at once (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch: Option<u32>,
    /// Rows claimed and not yet done, at most (default 1,000): beyond them a row waits unclaimed,
    /// its lease not yet running, rather than in a queue downstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_claimed: Option<u32>,
    /// How long a claimed row may take before another attempt may claim it (default `15m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Claims of one row at most; the row whose last lease runs out is finished as failed
    /// (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// When a row is done: `finished` (the default: its item reached every sink it was routed to,
    /// or was dead-lettered, which fails the row), or `publish` (once its item is stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_on: Option<CompleteOn>,
    /// End once no row is left to claim and every claimed row is done, as a file source ends at
    /// the end of its file.
    #[serde(default)]
    pub end_when_empty: bool,
    /// How often to look for new rows once none is left to claim (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<String>,
    /// A channel to `LISTEN` on: a `NOTIFY` there (from a trigger on the table) wakes the source
    /// at once, the poll still backing it. Leave it out behind a connection pooler that cannot hold
    /// a `LISTEN` (transaction pooling): the source then only polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_channel: Option<String>,
    /// The table's own names for the columns the source writes (defaults in [`OutcomeColumns`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeColumns>,
    /// Read the table without writing to it: its rows in the order of a column that only grows,
    /// each once, from where the source stopped (its checkpoint) rather than claimed as jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<PostgresFollow>,
}

/// How a postgres source follows a table it must not write.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresFollow {
    /// A column whose value only grows as rows are added (or changed): a serial id, an
    /// `updated_at` time (default: the key). Rows are read in the order of this column, then of the
    /// key, so rows that share a value are neither skipped nor read twice; an index on
    /// (column, key) serves the reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// For a time column: read only rows at least this old (such as `5s`), so that a transaction that
    /// commits after a later one, with an earlier time, is not passed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum CompleteOn {
    #[default]
    Finished,
    Publish,
}

/// The columns the postgres source writes a row's claims and outcome in. Each has a default; a
/// table names its own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutcomeColumns {
    /// The current claim's token, which every write-back must match (text; default
    /// `reservation_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// When it was claimed (timestamptz; default `reservation_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_at: Option<String>,
    /// Claims so far (integer; default `reservation_times`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<String>,
    /// When the current attempt started (timestamptz; default `start_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it was done (timestamptz; default `end_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Whether it succeeded (boolean; default `success`); empty while it is not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<String>,
    /// Why it failed (text; default `error_description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome columns with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub reservation: String,
    pub reserved_at: String,
    pub attempts: String,
    pub started_at: String,
    pub ended_at: String,
    pub success: String,
    pub error: String,
}

impl OutcomeColumns {
    pub fn resolved(&self) -> Outcome {
        let or = |value: &Option<String>, default: &str| {
            value.clone().unwrap_or_else(|| default.to_string())
        };
        Outcome {
            reservation: or(&self.reservation, "reservation_id"),
            reserved_at: or(&self.reserved_at, "reservation_time"),
            attempts: or(&self.attempts, "reservation_times"),
            started_at: or(&self.started_at, "start_time"),
            ended_at: or(&self.ended_at, "end_time"),
            success: or(&self.success, "success"),
            error: or(&self.error, "error_description"),
        }
    }
}

impl Outcome {
    pub fn all(&self) -> [&str; 7] {
        [
            self.reservation.as_str(),
            self.reserved_at.as_str(),
            self.attempts.as_str(),
            self.started_at.as_str(),
            self.ended_at.as_str(),
            self.success.as_str(),
            self.error.as_str(),
        ]
    }
}

/// Rows a source claims at once, unless `batch` says otherwise.
pub const DEFAULT_SOURCE_BATCH: u32 = 100;
pub const DEFAULT_LEASE: &str = "15m";
pub const DEFAULT_MAX_CLAIMED: u32 = 1000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_POLL: &str = "1s";

impl PostgresSource {
    /// The column a following source reads in the order of, when it follows.
    pub fn follow_column(&self) -> Option<&str> {
        self.follow
            .as_ref()
            .map(|f| f.column.as_deref().unwrap_or(&self.key))
    }

    /// Whether a row is done only once its item is finished downstream, which the source learns
    /// from the units' accounts of its jobs (not when it follows the table, which it never writes).
    pub fn follows_its_jobs(&self) -> bool {
        self.follow.is_none() && self.complete_on.unwrap_or_default() == CompleteOn::Finished
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome.clone().unwrap_or_default().resolved()
    }

    /// The columns of the item: the named ones, or the key alone.
    pub fn item_columns(&self) -> Vec<String> {
        if self.columns.is_empty() {
            vec![self.key.clone()]
        } else {
            self.columns.clone()
        }
    }
}

/// Writes each item as a row of `table`, many rows to a statement, each item once: a repeat of an
/// item (delivered again after a crash) meets its own row and changes nothing (`conflict: nothing`)
/// or writes the same values again (`update`). A row the database refuses (a constraint, a value of
/// the wrong type) is dead-lettered alone, with its SQLSTATE, and its neighbours are written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSink {
    pub connection: PostgresConnection,
    /// The table, as `name` or `schema.name`. It must exist: the sink checks its columns at start.
    #[schemars(length(min = 1))]
    pub table: String,
    /// Each column written, and the jq expression of the item that gives its value, such as
    /// `is_odd: .is_odd`; a JSON value is converted to the column's type by the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<BTreeMap<String, String>>,
    /// A column that gets the item's id: the same on every delivery of the item, so it makes a
    /// repeat known (and the default `conflict.columns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id_column: Option<String>,
    /// What makes a row a repeat: a unique key among the written columns (default: the
    /// `itemIdColumn`), and what a repeat does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Conflict>,
    /// The most rows one statement writes (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conflict {
    /// Columns of a unique index or primary key of the table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// `nothing` (the default: a repeat is skipped) or `update` (the row takes the item's values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ConflictAction>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum ConflictAction {
    #[default]
    Nothing,
    Update,
}

impl PostgresSink {
    /// The columns that make a row a repeat, as the settings give them or by default.
    pub fn conflict_columns(&self) -> Vec<String> {
        match &self.conflict {
            Some(c) if !c.columns.is_empty() => c.columns.clone(),
            _ => self.item_id_column.iter().cloned().collect(),
        }
    }

    pub fn conflict_action(&self) -> ConflictAction {
        self.conflict
            .as_ref()
            .and_then(|c| c.action)
            .unwrap_or_default()
    }

    /// Every column written: the mapped ones, then the item id's.
    pub fn written_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = self
            .columns
            .iter()
            .flat_map(|c| c.keys().cloned())
            .collect();
        columns.extend(self.item_id_column.iter().cloned());
        columns
    }
}
