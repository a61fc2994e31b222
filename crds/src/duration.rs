//! Durations as a Pipeline writes them (`500ms`, `30s`, `2m`), read by the spec types, the layout and
//! validation alike.

use std::fmt;
use std::time::Duration;

/// A duration that does not parse, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError {
    value: String,
    reason: String,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a duration ({}): write a number and a unit, such as 500ms, 30s or 2m",
            self.value, self.reason
        )
    }
}

impl std::error::Error for DurationError {}

/// Parses a duration such as `5ms`, `30s`, `1m`.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(value.trim()).map_err(|e| DurationError {
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// A problem at `path` when `value` of `field` is no duration, or zero.
pub fn check_duration(
    problems: &mut Vec<crate::problem::Problem>,
    path: &str,
    field: &str,
    value: &str,
) {
    match parse_duration(value) {
        Ok(d) if d.is_zero() => problems.push(crate::problem::Problem::at(
            path,
            format!("{field} `{value}` must be longer than zero"),
        )),
        Ok(_) => {}
        Err(e) => problems.push(crate::problem::Problem::at(path, format!("{field}: {e}"))),
    }
}

/// A duration as a Pipeline would write it: `2m`, `30s`, `1500ms`.
pub fn human(d: Duration) -> String {
    if d.as_secs() >= 60 && d.as_secs().is_multiple_of(60) {
        format!("{}m", d.as_secs() / 60)
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
