//! What every unit is doing now, read off NATS: its consumer's lag, its replicas and rate from their
//! reports, and its dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use switchyard_crds::topology::UnitKind;
use switchyard_crds::unit::StatsReport;

use crate::dlq;
use crate::target::{OpsError, Target};

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatus {
    pub unit: String,
    pub kind: String,
    /// Replicas that reported within the listening time.
    pub replicas: usize,
    /// Pending plus unacknowledged messages of its consumer (none for a source).
    pub lag: Option<u64>,
    /// Inputs per second, summed over its replicas.
    pub rate: f64,
    pub dead_letters: u64,
    /// For a postgres source: where its table's rows stand, as it last counted them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<switchyard_crds::RowCounts>,
    /// For a join: the items it waits on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<switchyard_crds::status::JoinWaiting>,
}

/// Reads every unit's status, listening `listen` for the replicas' reports (they come every second).
pub async fn read(target: &Target, listen: Duration) -> Result<Vec<UnitStatus>, OpsError> {
    let client = target.js.client();
    let mut reports = client
        .subscribe(target.names.all_stats_subjects())
        .await
        .map_err(OpsError::nats("listen to the units' reports"))?;
    let mut latest: BTreeMap<(String, String), StatsReport> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + listen;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, reports.next()).await {
        if let Ok(report) = serde_json::from_slice::<StatsReport>(&message.payload) {
            if report.last {
                latest.remove(&(report.unit.clone(), report.replica.clone()));
            } else {
                latest.insert((report.unit.clone(), report.replica.clone()), report);
            }
        }
    }
    let stream = target.stream().await?;
    let dead_letters = dlq::count_by_unit(target, &stream).await?;
    let mut out = Vec::new();
    for unit in &target.topology.units {
        let config = target.layout.units.iter().find(|c| c.unit == unit.name);
        let lag = match config.and_then(|c| c.input.as_ref()) {
            Some(input) => match stream.consumer_info(&input.durable).await {
                Ok(info) => Some(info.num_pending + info.num_ack_pending as u64),
                Err(e) => {
                    tracing::debug!("cannot read consumer {}: {e}", input.durable);
                    None
                }
            },
            None => None,
        };
        let mine: Vec<&StatsReport> = latest
            .iter()
            .filter(|((u, _), _)| *u == unit.name)
            .map(|(_, r)| r)
            .collect();
        // The consumer counts messages; a frame holds several items.
        let lag =
            lag.map(|pending| switchyard_crds::unit::items_pending(pending, mine.iter().copied()));
        out.push(UnitStatus {
            unit: unit.name.clone(),
            kind: match unit.kind {
                UnitKind::Source(_) => "source",
                UnitKind::Sink(_) => "sink",
                UnitKind::Process if unit.join.is_some() => "join",
                UnitKind::Process if unit.switcher.is_some() => "switcher",
                UnitKind::Process => "group",
            }
            .to_string(),
            replicas: mine.len(),
            lag,
            rate: mine.iter().fold(0.0, |sum, r| sum + r.rate),
            dead_letters: dead_letters.get(&unit.name).copied().unwrap_or(0),
            rows: mine.iter().find_map(|r| r.rows),
            join: switchyard_crds::unit::join_waiting(mine.iter().copied()),
        });
    }
    Ok(out)
}

/// The rows of the postgres sources among `units` (name, counts), as `switchyard status` shows them
/// below the units' table; nothing when there are none.
pub fn render_rows<'a>(
    units: impl IntoIterator<Item = (&'a str, Option<switchyard_crds::RowCounts>)>,
) -> String {
    let lines = units
        .into_iter()
        .filter_map(|(unit, rows)| rows.map(|rows| (unit, rows.describe())));
    below_the_table("rows of the postgres sources' tables", lines)
}

/// The items each join among `units` waits on (name, waiting), as `switchyard status` shows them
/// below the units' table; nothing when there is no join.
pub fn render_joins<'a>(
    units: impl IntoIterator<Item = (&'a str, Option<switchyard_crds::status::JoinWaiting>)>,
) -> String {
    let lines = units
        .into_iter()
        .filter_map(|(unit, join)| join.map(|j| (unit, j.describe())));
    below_the_table("items the joins wait on", lines)
}

/// A section under `title`, a line per unit; nothing without one.
fn below_the_table<'a>(title: &str, lines: impl Iterator<Item = (&'a str, String)>) -> String {
    let lines: Vec<String> = lines
        .map(|(unit, what)| format!("  {unit}: {what}\n"))
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!("\n  {title}:\n{}", lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_crds::RowCounts;

    #[test]
    fn only_joins_are_listed_with_what_they_wait_on() {
        use switchyard_crds::status::JoinWaiting;
        let waiting = JoinWaiting {
            waiting: 120,
            oldest_wait_seconds: 3,
        };
        assert_eq!(render_joins([("price", None)]), "");
        assert_eq!(
            render_joins([("answer", Some(waiting)), ("idle", Some(JoinWaiting::default()))]),
            "\n  items the joins wait on:\n  answer: 120 waiting, the oldest for 3s\n  idle: nothing waiting\n"
        );
    }

    #[test]
    fn only_sources_that_counted_rows_are_listed() {
        let rows = RowCounts {
            waiting: 12,
            claimed: 30,
            succeeded: 99_950,
            failed: 8,
        };
        assert_eq!(render_rows([("work", None), ("decide", None)]), "");
        assert_eq!(
            render_rows([("jobs", Some(rows)), ("work", None)]),
            "\n  rows of the postgres sources' tables:\n  jobs: 12 waiting, 30 claimed, 99950 succeeded, 8 failed\n"
        );
    }
}
