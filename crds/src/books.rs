//! A Pipeline's books: what each unit took in from each unit before it, and what became of it.
//!
//! Counters a process keeps cannot say whether an item was lost: a process that dies loses its last
//! counts, and a message delivered again counts twice. The books are records in a stream of their
//! own instead (`Names::books_stream`), one per stored input message, with an id taken from that
//! message's, so JetStream keeps one record per message however often it is delivered
//! (`stage-runtime/src/books.rs` writes them). Summed, they say how many items each edge carried:
//! what a unit stored on its output must be what each unit reading it took in, and what a unit took in
//! must be what it passed on, filtered out and dead-lettered. Pure: `check` decides, the callers read.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::topology::{Topology, UnitKind};

/// The key of what a source made itself (unit names are DNS labels: no `_`).
pub const FROM_SOURCE: &str = "_source";
/// The key of what `switchyard dlq replay` put back on a unit's input.
pub const FROM_REPLAY: &str = "_replay";
/// Header of a book message that sums the records of its subject before it (a roll-up).
pub const ROLLUP_HEADER: &str = "Switchyard-Books-Rollup";

/// What became of the items of one input (or, summed, of many).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Items taken in (none for what a source makes).
    #[serde(rename = "in", default, skip_serializing_if = "is_zero")]
    pub received: u64,
    /// Inputs that made at least one output and no dead letter (a sink's: written).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub passed: u64,
    /// Inputs the steps dropped: no output, no failure.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub filtered: u64,
    /// Inputs that left at least one dead letter.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dead_lettered: u64,
    /// Items stored on the unit's output subject (a source's: the items it stored; a sink's: the
    /// items it wrote that were not written before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub out: u64,
    /// A sink's items found already written (by a delivery before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicates: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.received += other.received;
        self.passed += other.passed;
        self.filtered += other.filtered;
        self.dead_lettered += other.dead_lettered;
        self.out += other.out;
        self.duplicates += other.duplicates;
    }

    /// What became of the items taken in: each input is passed, filtered or dead-lettered.
    pub fn accounted(&self) -> u64 {
        self.passed + self.filtered + self.dead_lettered
    }
}

/// One book message: counts by where the inputs came from (a unit's name, `FROM_SOURCE`,
/// `FROM_REPLAY`). A record holds one entry; a roll-up sums a replica's records.
pub type Record = BTreeMap<String, Counts>;

/// A Pipeline's books: by unit, by where its inputs came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Books {
    pub units: BTreeMap<String, Record>,
}

impl Books {
    pub fn add(&mut self, unit: &str, record: &Record) {
        let mine = self.units.entry(unit.to_string()).or_default();
        for (from, counts) in record {
            mine.entry(from.clone()).or_default().add(counts);
        }
    }

    /// Everything `unit` did, whatever its inputs.
    pub fn total(&self, unit: &str) -> Counts {
        let mut total = Counts::default();
        for counts in self.units.get(unit).into_iter().flat_map(|r| r.values()) {
            total.add(counts);
        }
        total
    }

    /// What `unit` took in from `from`.
    pub fn received(&self, unit: &str, from: &str) -> u64 {
        self.units
            .get(unit)
            .and_then(|r| r.get(from))
            .map_or(0, |c| c.received)
    }

    /// Every edge of the topology with its two ends' counts, in topology order.
    pub fn edges(&self, topology: &Topology) -> Vec<Edge> {
        let mut edges = Vec::new();
        for reader in &topology.units {
            for writer in &reader.inputs {
                edges.push(Edge {
                    from: writer.clone(),
                    to: reader.name.clone(),
                    out: self.total(writer).out,
                    received: self.received(&reader.name, writer),
                });
            }
        }
        edges
    }
}

/// Items one unit stored on its output, and what one unit reading it took in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub out: u64,
    pub received: u64,
}

/// Where the books do not balance once nothing is on its way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Imbalance {
    /// `from` stored `out` items for `to`, which took in `received`.
    Edge(Edge),
    /// `unit` took in `received` items and accounts for `accounted` of them.
    Unit {
        unit: String,
        received: u64,
        accounted: u64,
    },
}

impl fmt::Display for Imbalance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Imbalance::Edge(Edge {
                from,
                to,
                out,
                received,
            }) if out > received => write!(
                f,
                "{from} → {to}: {from} stored {out} items, {to} took in {received}: {} lost on the way",
                out - received
            ),
            Imbalance::Edge(Edge {
                from,
                to,
                out,
                received,
            }) => write!(
                f,
                "{from} → {to}: {from} stored {out} items, {to} took in {received}: {} taken in twice",
                received - out
            ),
            Imbalance::Unit {
                unit,
                received,
                accounted,
            } => write!(
                f,
                "{unit}: took in {received} items and passed on, filtered or dead-lettered {accounted}: {} unaccounted for",
                received.abs_diff(*accounted)
            ),
        }
    }
}

/// Where the books do not balance, for a Pipeline with nothing on its way (a run that finished, or
/// edges whose reader has nothing pending; see `ops::books`). Sources take nothing in; what a unit
/// took in from a replay has no writer to balance against.
pub fn check(topology: &Topology, books: &Books) -> Vec<Imbalance> {
    let mut found: Vec<Imbalance> = books
        .edges(topology)
        .into_iter()
        .filter(|e| e.out != e.received)
        .map(Imbalance::Edge)
        .collect();
    for unit in &topology.units {
        if matches!(unit.kind, UnitKind::Source(_)) {
            continue;
        }
        let total = books.total(&unit.name);
        if total.received != total.accounted() {
            found.push(Imbalance::Unit {
                unit: unit.name.clone(),
                received: total.received,
                accounted: total.accounted(),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Unit;

    fn unit(name: &str, kind: UnitKind, inputs: &[&str]) -> Unit {
        Unit {
            name: name.into(),
            kind,
            spec_path: name.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            steps: Vec::new(),
            switcher: None,
            batch: None,
            concurrency: None,
            image: None,
            env: Vec::new(),
            resources: None,
            node_selector: None,
            tolerations: None,
        }
    }

    fn laundry() -> Topology {
        Topology {
            pipeline: "laundry".into(),
            namespace: "default".into(),
            units: vec![
                unit("baskets", UnitKind::Source(Default::default()), &[]),
                unit("wash", UnitKind::Process, &["baskets"]),
                unit("fold", UnitKind::Sink(Default::default()), &["wash"]),
            ],
        }
    }

    fn record(from: &str, counts: Counts) -> Record {
        Record::from([(from.to_string(), counts)])
    }

    fn balanced() -> Books {
        let mut books = Books::default();
        books.add(
            "baskets",
            &record(
                FROM_SOURCE,
                Counts {
                    out: 100,
                    ..Counts::default()
                },
            ),
        );
        for (received, passed, filtered, dead) in [(60, 50, 8, 2), (40, 40, 0, 0)] {
            books.add(
                "wash",
                &record(
                    "baskets",
                    Counts {
                        received,
                        passed,
                        filtered,
                        dead_lettered: dead,
                        out: passed,
                        ..Counts::default()
                    },
                ),
            );
        }
        books.add(
            "fold",
            &record(
                "wash",
                Counts {
                    received: 90,
                    passed: 90,
                    out: 85,
                    duplicates: 5,
                    ..Counts::default()
                },
            ),
        );
        books
    }

    #[test]
    fn books_that_balance_have_nothing_to_say() {
        let books = balanced();
        assert_eq!(check(&laundry(), &books), Vec::new());
        assert_eq!(books.total("wash").received, 100);
        assert_eq!(books.edges(&laundry()).len(), 2);
    }

    #[test]
    fn items_lost_on_an_edge_are_named_with_the_edge_and_how_many() {
        let mut books = balanced();
        // The source stored twelve items more than wash ever took in.
        books.add(
            "baskets",
            &record(
                FROM_SOURCE,
                Counts {
                    out: 12,
                    ..Counts::default()
                },
            ),
        );
        let found = check(&laundry(), &books);
        assert_eq!(
            found,
            vec![Imbalance::Edge(Edge {
                from: "baskets".into(),
                to: "wash".into(),
                out: 112,
                received: 100
            })]
        );
        assert_eq!(
            found[0].to_string(),
            "baskets → wash: baskets stored 112 items, wash took in 100: 12 lost on the way"
        );
    }

    #[test]
    fn an_item_taken_in_twice_or_unaccounted_for_is_named() {
        let mut books = balanced();
        books.add(
            "fold",
            &record(
                "wash",
                Counts {
                    received: 1,
                    ..Counts::default()
                },
            ),
        );
        let found: Vec<String> = check(&laundry(), &books)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            vec![
                "wash → fold: wash stored 90 items, fold took in 91: 1 taken in twice".to_string(),
                "fold: took in 91 items and passed on, filtered or dead-lettered 90: 1 unaccounted for"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn replays_are_counted_apart_and_do_not_unbalance_an_edge() {
        let mut books = balanced();
        books.add(
            "wash",
            &record(
                FROM_REPLAY,
                Counts {
                    received: 2,
                    passed: 2,
                    out: 2,
                    ..Counts::default()
                },
            ),
        );
        // What wash stored is now 92: fold must take in the two replayed items too.
        books.add(
            "fold",
            &record(
                "wash",
                Counts {
                    received: 2,
                    passed: 2,
                    out: 2,
                    ..Counts::default()
                },
            ),
        );
        assert_eq!(check(&laundry(), &books), Vec::new());
        assert_eq!(books.received("wash", FROM_REPLAY), 2);
    }

    #[test]
    fn records_read_back_as_written() {
        let r = record(
            "wash",
            Counts {
                received: 3,
                passed: 2,
                filtered: 1,
                out: 2,
                ..Counts::default()
            },
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"wash":{"in":3,"passed":2,"filtered":1,"out":2}}"#);
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
