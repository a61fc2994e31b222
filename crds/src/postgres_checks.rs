//! The checks of a Pipeline's PostgreSQL settings (`postgres.rs`): names that are SQL names,
//! durations, a connection given one way, no password in a URL; `validate` calls them.

use crate::duration::check_duration;
use crate::postgres::{PostgresConnection, PostgresFollow, PostgresSink, PostgresSource, TlsMode};
use crate::problem::Problem;
use crate::secret::shown_url;
use crate::secret::SecretFromEnv;

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
    fn sql_names_are_plain_words() {
        assert!(is_sql_name("results", true));
        assert!(is_sql_name("app.results", true));
        assert!(!is_sql_name("app.results", false));
        assert!(!is_sql_name("1st", false));
        assert!(!is_sql_name("a\"; drop table x; --", true));
        assert!(!is_sql_name("", false));
    }
}
