//! What a Pipeline says about PostgreSQL: how a unit connects, and what the `postgres` sink writes.
//! The checks of these settings are here too, beside what they check; `validate` calls them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::check_duration;
use crate::problem::Problem;
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

/// What is wrong with a `postgres` source's settings.
pub fn check_source(problems: &mut Vec<Problem>, path: &str, source: &PostgresSource) {
    check_connection(problems, path, "postgres.connection", &source.connection);
    if !is_sql_name(&source.table, true) {
        problems.push(Problem::at(path, format!("postgres.table `{}` is not a table's name: letters, digits and `_`, optionally after a schema (`app.jobs`)", source.table)));
    }
    let outcome = source.outcome();
    let mut named: Vec<(&str, &str)> = vec![("key", source.key.as_str())];
    named.extend(source.columns.iter().map(|c| ("columns", c.as_str())));
    named.extend(
        source
            .item_column
            .iter()
            .map(|c| ("itemColumn", c.as_str())),
    );
    match &source.follow {
        None => named.extend(outcome.all().into_iter().map(|c| ("outcome", c))),
        Some(follow) => {
            named.extend(follow.column.iter().map(|c| ("follow.column", c.as_str())));
            check_follow(problems, path, source, follow);
        }
    }
    for (field, column) in &named {
        if !is_sql_name(column, false) {
            problems.push(Problem::at(path, format!("postgres.{field}: `{column}` is not a column's name: letters, digits and `_`, not starting with a digit")));
        }
    }
    let outcome_columns = outcome.all();
    for (i, column) in outcome_columns.iter().enumerate() {
        if source.follow.is_some() {
            break;
        }
        if outcome_columns[..i].contains(column) {
            problems.push(Problem::at(path, format!("postgres.outcome: the column `{column}` is named twice: each outcome needs its own")));
        }
        if *column == source.key {
            problems.push(Problem::at(path, format!("postgres.outcome: `{column}` is the key: the source would overwrite what names the row")));
        }
    }
    if source.item_column.is_some() && !source.columns.is_empty() {
        problems.push(Problem::at(path, "postgres: the item is either `columns` (a JSON object of them) or one `itemColumn`, not both"));
    }
    if source.batch == Some(0) {
        problems.push(Problem::at(path, "postgres.batch must be at least 1"));
    }
    if let Some(channel) = &source.notify_channel {
        if !is_sql_name(channel, false) {
            problems.push(Problem::at(path, format!("postgres.notifyChannel `{channel}` is not a channel's name: letters, digits and `_`, not starting with a digit")));
        }
    }
    if source.max_claimed == Some(0) {
        problems.push(Problem::at(path, "postgres.maxClaimed must be at least 1"));
    }
    if source.max_attempts == Some(0) {
        problems.push(Problem::at(path, "postgres.maxAttempts must be at least 1"));
    }
    for (name, value) in [("lease", &source.lease), ("poll", &source.poll)] {
        if let Some(value) = value {
            check_duration(problems, path, &format!("postgres.{name}"), value);
        }
    }
    if let Some(filter) = &source.filter {
        if filter.trim().is_empty() || filter.contains(';') {
            problems.push(Problem::at(path, format!("postgres.where `{filter}` must be one SQL condition, such as `kind = 'odd'`, without `;`")));
        }
    }
}

/// What a following source refuses: the settings of claims, which it does not make.
fn check_follow(
    problems: &mut Vec<Problem>,
    path: &str,
    source: &PostgresSource,
    follow: &PostgresFollow,
) {
    let claims_only = [
        ("maxClaimed", source.max_claimed.is_some()),
        ("lease", source.lease.is_some()),
        ("maxAttempts", source.max_attempts.is_some()),
        ("completeOn", source.complete_on.is_some()),
        ("outcome", source.outcome.is_some()),
    ];
    for (field, set) in claims_only {
        if set {
            problems.push(Problem::at(path, format!("postgres.{field} belongs to claimed rows, and postgres.follow reads without claiming or writing: leave out one or the other")));
        }
    }
    if let Some(delay) = &follow.delay {
        check_duration(problems, path, "postgres.follow.delay", delay);
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

/// A table's or a column's name as the sink will quote it: letters, digits, `_` and `$`, not
/// starting with a digit (a schema may come first, `app.results`). Names are case-sensitive as
/// written, as they are in quotes in SQL.
pub fn is_sql_name(name: &str, qualified: bool) -> bool {
    let one = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
            && part.len() <= 63
    };
    match name.split_once('.') {
        Some((schema, table)) if qualified => one(schema) && one(table),
        _ => one(name),
    }
}

/// What is wrong with a connection's settings; `field` is where they sit (`postgres.connection`).
pub fn check_connection(
    problems: &mut Vec<Problem>,
    path: &str,
    field: &str,
    c: &PostgresConnection,
) {
    match (&c.url, &c.url_from) {
        (Some(_), Some(_)) => problems.push(Problem::at(
            path,
            format!("{field}: give the database's address once, in url or in urlFrom, not both"),
        )),
        (None, None) => problems.push(Problem::at(
            path,
            format!("{field}: say where the database is: url (postgres://USER@HOST:PORT/DATABASE) or urlFrom.env (the environment variable that holds it)"),
        )),
        (Some(url), None) => check_url(problems, path, &format!("{field}.url"), url),
        (None, Some(from)) => check_secret(problems, path, &format!("{field}.urlFrom"), from),
    }
    if let Some(password) = &c.password {
        check_secret(problems, path, &format!("{field}.password"), password);
    }
    for (name, value) in [
        ("statementTimeout", &c.statement_timeout),
        ("connectTimeout", &c.connect_timeout),
    ] {
        if let Some(value) = value {
            check_duration(problems, path, &format!("{field}.{name}"), value);
        }
    }
    if c.pool_size == Some(0) {
        problems.push(Problem::at(
            path,
            format!("{field}.poolSize must be at least 1"),
        ));
    }
    if let Some(tls) = &c.tls {
        if tls.ca_file.is_some() && tls.mode != TlsMode::VerifyFull {
            problems.push(Problem::at(
                path,
                format!("{field}.tls.caFile is only read with mode verify-full, which checks the server's certificate against it"),
            ));
        }
    }
}

fn check_url(problems: &mut Vec<Problem>, path: &str, field: &str, url: &str) {
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        problems.push(Problem::at(
            path,
            format!(
                "{field} `{}` must start with postgres://, as postgres://USER@HOST:PORT/DATABASE",
                shown_url(url)
            ),
        ));
        return;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if let Some((user_info, _)) = authority.rsplit_once('@') {
        if user_info.contains(':') {
            problems.push(Problem::at(
                path,
                format!("{field} holds a password: a Pipeline is no place for one. Put it in an environment variable and name it in password.env (in a cluster, with password.secretKeyRef)"),
            ));
        }
    }
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() {
        problems.push(Problem::at(
            path,
            format!(
                "{field} `{}` names no host: postgres://USER@HOST:PORT/DATABASE",
                shown_url(url)
            ),
        ));
    }
}

/// A URL as a message may show it: the password, if any, replaced.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

fn check_secret(problems: &mut Vec<Problem>, path: &str, field: &str, secret: &SecretFromEnv) {
    if !crate::secret::is_env_name(&secret.env) {
        problems.push(Problem::at(path, format!("{field}.env `{}` is not an environment variable's name: use letters, digits and `_`, not starting with a digit", secret.env)));
    }
    if let Some(r) = &secret.secret_key_ref {
        if r.name.is_empty() || r.key.is_empty() {
            problems.push(Problem::at(
                path,
                format!(
                    "{field}.secretKeyRef needs the Secret's name and the key that holds the value"
                ),
            ));
        }
    }
}

/// What is wrong with a `postgres` sink's settings.
pub fn check_sink(problems: &mut Vec<Problem>, path: &str, sink: &PostgresSink) {
    check_connection(problems, path, "postgres.connection", &sink.connection);
    if !is_sql_name(&sink.table, true) {
        problems.push(Problem::at(path, format!("postgres.table `{}` is not a table's name: letters, digits and `_`, optionally after a schema (`app.results`)", sink.table)));
    }
    let mut columns = sink.written_columns();
    for column in &columns {
        if !is_sql_name(column, false) {
            problems.push(Problem::at(path, format!("postgres column `{column}` is not a column's name: letters, digits and `_`, not starting with a digit")));
        }
    }
    if let Some(mapped) = &sink.columns {
        for (column, expression) in mapped {
            if let Err(e) = crate::jq::JqFilter::compile(expression) {
                problems.push(Problem::at(
                    path,
                    format!("postgres.columns.{column}: the jq expression `{expression}` does not compile: {e}"),
                ));
            }
        }
        if let Some(id) = &sink.item_id_column {
            if mapped.contains_key(id) {
                problems.push(Problem::at(path, format!("postgres: the column `{id}` is both the itemIdColumn and in columns: it can hold only one of them")));
            }
        }
    }
    if columns.is_empty() {
        problems.push(Problem::at(path, "postgres: nothing to write: map columns (`columns: {value: .value}`) or name an itemIdColumn"));
    }
    let conflict = sink.conflict_columns();
    if conflict.is_empty() {
        problems.push(Problem::at(path, "postgres: say what makes a row a repeat, so that an item delivered again is not written twice: an itemIdColumn (a unique column that gets the item's id) or conflict.columns (a unique key among the written columns)"));
    }
    columns.sort();
    for column in &conflict {
        if columns.binary_search(column).is_err() {
            problems.push(Problem::at(path, format!("postgres.conflict.columns: `{column}` is not written by the sink: a repeat is known by the columns it writes (add it to columns, or name it the itemIdColumn)")));
        }
    }
    if sink.batch == Some(0) {
        problems.push(Problem::at(path, "postgres.batch must be at least 1"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        assert_eq!(
            shown_url("postgres://app:s3cret@db:5432/jobs?sslmode=require"),
            "postgres://app:***@db:5432/jobs?sslmode=require"
        );
        assert_eq!(
            shown_url("postgres://app@db/jobs"),
            "postgres://app@db/jobs"
        );
        assert_eq!(shown_url("postgres://db/jobs"), "postgres://db/jobs");
    }

    #[test]
    fn sql_names_are_plain_words() {
        assert!(is_sql_name("results", true));
        assert!(is_sql_name("app.results", true));
        assert!(!is_sql_name("app.results", false));
        assert!(!is_sql_name("1st", false));
        assert!(!is_sql_name("a\"; drop table x; --", true));
        assert!(!is_sql_name("", false));
    }
}
