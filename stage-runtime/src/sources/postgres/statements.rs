//! The claims source's statements, built once from its settings and the table's names, and
//! whether the table's indexes let a claim start at the first unfinished row.

use switchyard_crds::postgres::{Outcome, PostgresSource as Settings};

use super::table::item_expression;
use crate::postgres::quoted;

/// The statements, built once from the settings.
pub(super) struct Statements {
    pub(super) claim: String,
    pub(super) give_up: String,
    pub(super) finish: String,
    pub(super) take_back: String,
    pub(super) count: String,
}

/// A table this big (in bytes, about 10,000 narrow rows) is worth a word about its index.
pub(super) const BIG_TABLE: i64 = 1 << 20;

/// Whether a partial index with one of `predicates` (as the database writes them back) leaves the
/// finished rows out, so that a claim in key order starts at the first unfinished row: one that
/// holds `<success> IS NULL`, alone or among other conditions joined by AND.
pub(super) fn claims_read_unfinished_rows_only(predicates: &[String], success: &str) -> bool {
    let wanted = [
        format!("{success} IS NULL"),
        format!("{} IS NULL", quoted(success)),
    ];
    predicates.iter().any(|predicate| {
        !predicate.contains(" OR ")
            && predicate
                .split(" AND ")
                .map(|part| part.trim_matches(|c| c == '(' || c == ')' || c == ' '))
                .any(|part| wanted.iter().any(|w| part == w))
    })
}

/// `%` and `_` taken literally in a LIKE pattern.
pub(super) fn like_escaped(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

pub(super) fn statements(settings: &Settings, outcome: &Outcome, key_type: &str) -> Statements {
    let t = quoted(&settings.table);
    let k = quoted(&settings.key);
    let q = |c: &str| quoted(c);
    let (reservation, reserved_at, attempts, started_at, ended_at, success, error) = (
        q(&outcome.reservation),
        q(&outcome.reserved_at),
        q(&outcome.attempts),
        q(&outcome.started_at),
        q(&outcome.ended_at),
        q(&outcome.success),
        q(&outcome.error),
    );
    let filter = settings
        .filter
        .as_deref()
        .map_or("TRUE".to_string(), |f| format!("({f})"));
    let item = item_expression(settings);
    let claim = format!(
        "WITH claimable AS (\
           SELECT {k} FROM {t} \
           WHERE {success} IS NULL \
             AND ({reservation} IS NULL OR {reserved_at} < now() - $3::int8 * interval '1 millisecond') \
             AND coalesce({attempts}, 0) < $4::int4 \
             AND {filter} \
           ORDER BY {k} LIMIT $2::int8 FOR UPDATE SKIP LOCKED\
         ), claimed AS (\
           UPDATE {t} AS row SET {reservation} = $1::text, {reserved_at} = now(), \
             {attempts} = coalesce(row.{attempts}, 0) + 1, {started_at} = now(), {ended_at} = NULL \
           FROM claimable WHERE row.{k} = claimable.{k} \
           RETURNING row.{k} AS sort_key, row.{k}::text AS key, row.{attempts}::int4 AS attempt, {item} AS item\
         ) \
         SELECT key, attempt, item FROM claimed ORDER BY sort_key"
    );
    let give_up = format!(
        "UPDATE {t} SET {success} = false, {ended_at} = now(), \
           {error} = format('gave up after %s attempts: the last lease ran out', {attempts}) \
         WHERE {success} IS NULL AND {reservation} IS NOT NULL \
           AND {reserved_at} < now() - $2::int8 * interval '1 millisecond' \
           AND coalesce({attempts}, 0) >= $1::int4 AND {filter} \
         RETURNING {k}::text"
    );
    let finish = format!(
        "UPDATE {t} AS row SET {success} = done.success, {ended_at} = now(), {error} = done.error \
         FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[]) AS done(key, reservation, success, error) \
         WHERE row.{k} = CAST(done.key AS {key_type}) AND row.{reservation} = done.reservation \
           AND row.{success} IS NULL \
         RETURNING row.{k}::text"
    );
    // The lease starts again: the rows are this source's again from now.
    let take_back = format!(
        "WITH taken AS (\
           UPDATE {t} AS row SET {reserved_at} = now() \
           WHERE row.{reservation} LIKE $1::text AND row.{success} IS NULL \
           RETURNING row.{k} AS sort_key, row.{k}::text AS key, row.{attempts}::int4 AS attempt, {item} AS item, row.{reservation} AS reservation\
         ) \
         SELECT key, attempt, item, reservation FROM taken ORDER BY sort_key"
    );
    // A row is claimed while its lease runs; unfinished and not claimed, it waits.
    let leased = format!(
        "{reservation} IS NOT NULL AND coalesce({reserved_at} >= now() - $1::int8 * interval '1 millisecond', false)"
    );
    let count = format!(
        "SELECT count(*) FILTER (WHERE {success} IS NULL AND NOT ({leased})), \
           count(*) FILTER (WHERE {success} IS NULL AND {leased}), \
           count(*) FILTER (WHERE {success}), \
           count(*) FILTER (WHERE NOT {success}) \
         FROM {t} WHERE {filter}"
    );
    Statements {
        claim,
        give_up,
        finish,
        take_back,
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::claims_read_unfinished_rows_only as unfinished_only;

    fn texts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_index_of_the_unfinished_rows_is_known_by_its_predicate() {
        assert!(unfinished_only(&texts(&["(success IS NULL)"]), "success"));
        assert!(unfinished_only(
            &texts(&["((success IS NULL) AND (kind = 'a'::text))"]),
            "success"
        ));
        assert!(unfinished_only(&texts(&["(\"Done\" IS NULL)"]), "Done"));
        assert!(!unfinished_only(&texts(&[]), "success"));
        assert!(!unfinished_only(
            &texts(&["(success IS NOT NULL)"]),
            "success"
        ));
        assert!(!unfinished_only(&texts(&["(ok IS NULL)"]), "success"));
        assert!(!unfinished_only(
            &texts(&["((success IS NULL) OR (kind = 'a'::text))"]),
            "success"
        ));
    }
}
