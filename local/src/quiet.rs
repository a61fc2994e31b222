//! When a run has nothing left to do: its sources are done and every consumer is empty, and no join
//! waits on an item. A join's items wait with their parts acknowledged, so its consumer can be
//! empty while one waits for its timeout; only a report a join replica sent after the consumers
//! were found empty can say it waits on nothing (one sent before may predate a part it took since).

use std::time::Instant;

use switchyard_crds::unit::UnitConfig;
use switchyard_platform::reports::Reports;

pub struct Quiet {
    /// Since when every consumer has been found empty, in every check without a break.
    empty_since: Option<Instant>,
    /// The join units.
    joins: Vec<String>,
}

impl Quiet {
    pub fn new(units: &[UnitConfig]) -> Quiet {
        Quiet {
            empty_since: None,
            joins: units
                .iter()
                .filter(|u| u.join.is_some())
                .map(|u| u.unit.clone())
                .collect(),
        }
    }

    /// Whether the run is done, given whether everything else is (`empty`: sources done, every
    /// consumer empty, no edit under way).
    pub fn done(&mut self, empty: bool, reports: &Reports) -> bool {
        if !empty {
            self.empty_since = None;
            return false;
        }
        let since = *self.empty_since.get_or_insert_with(Instant::now);
        self.joins.iter().all(|unit| {
            reports.sent_since(unit, since).is_some_and(|replicas| {
                replicas
                    .iter()
                    .all(|r| r.join.is_some_and(|j| j.waiting == 0))
            })
        })
    }
}
