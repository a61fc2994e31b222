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

use crate::unit::{UnitConfig, UnitRole};

/// The key of what a source made itself (unit names are DNS labels: no `_`).
pub const FROM_SOURCE: &str = "_source";
/// The key of what `switchyard dlq replay` put back on a unit's input.
pub const FROM_REPLAY: &str = "_replay";
/// Header of a roll-up: the stream sequence of the last record it sums. A roll-up of the records on
/// `<root>.<unit>.<replica>` is stored on that subject followed by `.sum` (`sum_subject`).
pub const THROUGH_HEADER: &str = "Switchyard-Books-Through";

/// The subject of the roll-ups of the records on `records`.
pub fn sum_subject(records: &str) -> String {
    format!("{records}.sum")
}

/// The records subject a roll-up on `subject` sums, if `subject` is a roll-up's.
pub fn records_of_sum(subject: &str) -> Option<&str> {
    subject.strip_suffix(".sum")
}

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

/// The key of a record's entry: the subject its inputs came on and the one its outputs went to, by
/// their last tokens (`src>copy`; `wash_2>dry` after edits moved `wash` to epoch 2; `copy>` for a
/// sink; `_source>src` for what a source made). Unit names are DNS labels: `>` and `_` never occur
/// in them.
pub fn route(from: &str, to: &str) -> String {
    format!("{from}>{to}")
}

/// A route's two tokens.
pub fn parse_route(key: &str) -> (&str, &str) {
    key.split_once('>').unwrap_or((key, ""))
}

/// The unit and epoch a subject token names (`wash_2`: `wash`, 2), if a unit's.
pub fn writer_of(token: &str) -> Option<(&str, u32)> {
    if token.is_empty() || token.starts_with('_') {
        return None;
    }
    match token.rsplit_once('_') {
        Some((unit, epoch)) => epoch.parse().ok().map(|e| (unit, e)),
        None => Some((token, 0)),
    }
}

/// One book message: counts by route (`route`). A record holds one entry; a roll-up sums a
/// replica's records.
pub type Record = BTreeMap<String, Counts>;

/// One replica's books as read in stream order: its latest roll-up, and the records stored after the
/// last one that roll-up sums.
///
/// A roll-up never removes the records it sums at once: the stream's duplicate window is rebuilt,
/// when its server restarts, from the messages it still holds, and a record removed early would be
/// forgotten there, so the same input recorded again would count twice. They go once they are older
/// than the window; until then a reader skips them by their sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    rolled: Record,
    through: u64,
    after: BTreeMap<u64, Record>,
}

impl Tally {
    /// The record stored at `sequence`; nothing if a roll-up read before sums it already.
    pub fn record(&mut self, sequence: u64, record: Record) {
        if sequence > self.through {
            self.after.insert(sequence, record);
        }
    }

    /// A roll-up that sums every record up to `through`; nothing if a later one was read before.
    pub fn rolled_up(&mut self, through: u64, sum: Record) {
        if through < self.through {
            return;
        }
        self.rolled = sum;
        self.through = through;
        self.after = self.after.split_off(&(through + 1));
    }

    /// The sequence of the last record the roll-up sums (0 without one).
    pub fn through(&self) -> u64 {
        self.through
    }

    /// Records after the roll-up.
    pub fn records_after(&self) -> usize {
        self.after.len()
    }

    /// The sequence of the last record read.
    pub fn last(&self) -> u64 {
        self.after
            .last_key_value()
            .map_or(self.through, |(sequence, _)| *sequence)
    }

    /// Everything the replica recorded: its roll-up and the records after it.
    pub fn total(&self) -> Record {
        let mut total = self.rolled.clone();
        for record in self.after.values() {
            for (route, counts) in record {
                total.entry(route.clone()).or_default().add(counts);
            }
        }
        total
    }
}

/// A Pipeline's books: by unit, by route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Books {
    pub units: BTreeMap<String, Record>,
}

impl Books {
    pub fn add(&mut self, unit: &str, record: &Record) {
        let mine = self.units.entry(unit.to_string()).or_default();
        for (key, counts) in record {
            mine.entry(key.clone()).or_default().add(counts);
        }
    }

    /// Everything `unit` did, whatever its routes.
    pub fn total(&self, unit: &str) -> Counts {
        let mut total = Counts::default();
        for counts in self.units.get(unit).into_iter().flat_map(|r| r.values()) {
            total.add(counts);
        }
        total
    }

    /// Items stored on the subject of `token`, by whoever stored them.
    pub fn stored_on(&self, token: &str) -> u64 {
        self.entries()
            .filter(|(_, (_, to), _)| *to == token)
            .map(|(_, _, c)| c.out)
            .sum()
    }

    /// Items `unit` took in from the subject of `token`.
    pub fn taken_from(&self, unit: &str, token: &str) -> u64 {
        self.entries()
            .filter(|(u, (from, _), _)| *u == unit && *from == token)
            .map(|(_, _, c)| c.received)
            .sum()
    }

    fn entries(&self) -> impl Iterator<Item = (&str, (&str, &str), &Counts)> {
        self.units.iter().flat_map(|(unit, record)| {
            record
                .iter()
                .map(move |(key, counts)| (unit.as_str(), parse_route(key), counts))
        })
    }

    /// Every edge with its two ends' counts: each unit's inputs as it reads them now (a subject
    /// of each writer's epoch), then the subjects of earlier epochs that someone took from. After an
    /// edit a unit writes to a subject of a new epoch that its new readers read; the readers of an
    /// old one drained it.
    pub fn edges(&self, wiring: &[Wired]) -> Vec<Edge> {
        let mut pairs: Vec<(String, String)> = wiring
            .iter()
            .flat_map(|w| w.reads.iter().map(|t| (t.clone(), w.unit.clone())))
            .collect();
        let mut earlier: Vec<(String, String)> = self
            .entries()
            .filter(|(_, (from, _), _)| writer_of(from).is_some())
            .map(|(unit, (from, _), _)| (from.to_string(), unit.to_string()))
            .filter(|pair| !pairs.contains(pair))
            .collect();
        earlier.sort();
        earlier.dedup();
        pairs.extend(earlier);
        pairs
            .into_iter()
            .filter_map(|(token, reader)| {
                let (writer, epoch) = writer_of(&token)?;
                Some(Edge {
                    from: writer.to_string(),
                    epoch,
                    to: reader.clone(),
                    out: self.stored_on(&token),
                    received: self.taken_from(&reader, &token),
                })
            })
            .collect()
    }
}

/// A unit as the books see it: the subjects it reads now, by their last tokens (`wash_2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wired {
    pub unit: String,
    pub reads: Vec<String>,
    pub source: bool,
}

/// How the units read each other, from the configs they run with (a migrated Pipeline's read
/// subjects of later epochs).
pub fn wiring(units: &[UnitConfig]) -> Vec<Wired> {
    units
        .iter()
        .map(|config| Wired {
            unit: config.unit.clone(),
            reads: config
                .input
                .iter()
                .flat_map(|i| &i.filter_subjects)
                .filter_map(|s| s.rsplit('.').next())
                .map(str::to_string)
                .collect(),
            source: matches!(config.role, UnitRole::Source { .. }),
        })
        .collect()
}

/// Items one unit stored on its output subject of one epoch, and what one unit reading it took in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: String,
    /// 0 until an edit moved the writer to a subject of a new epoch.
    pub epoch: u32,
    pub to: String,
    pub out: u64,
    pub received: u64,
}

impl Edge {
    /// `wash → dry`, or `wash (epoch 2) → dry`.
    pub fn name(&self) -> String {
        match self.epoch {
            0 => format!("{} → {}", self.from, self.to),
            n => format!("{} (epoch {n}) → {}", self.from, self.to),
        }
    }
}

impl From<&crate::EdgeStatus> for Edge {
    fn from(e: &crate::EdgeStatus) -> Edge {
        Edge {
            from: e.from.clone(),
            epoch: e.epoch,
            to: e.to.clone(),
            out: e.stored,
            received: e.taken_in,
        }
    }
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
            Imbalance::Edge(edge) => {
                let (from, to, out, received) = (&edge.from, &edge.to, edge.out, edge.received);
                let what = if out > received {
                    format!("{} lost on the way", out - received)
                } else {
                    format!("{} taken in twice", received - out)
                };
                write!(
                    f,
                    "{}: {from} stored {out} items, {to} took in {received}: {what}",
                    edge.name()
                )
            }
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
pub fn check(wiring: &[Wired], books: &Books) -> Vec<Imbalance> {
    let mut found: Vec<Imbalance> = books
        .edges(wiring)
        .into_iter()
        .filter(|e| e.out != e.received)
        .map(Imbalance::Edge)
        .collect();
    for unit in wiring.iter().filter(|w| !w.source) {
        let total = books.total(&unit.unit);
        if total.received != total.accounted() {
            found.push(Imbalance::Unit {
                unit: unit.unit.clone(),
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

    fn wired(unit: &str, reads: &[&str]) -> Wired {
        Wired {
            unit: unit.into(),
            reads: reads.iter().map(|s| s.to_string()).collect(),
            source: reads.is_empty(),
        }
    }

    fn laundry() -> Vec<Wired> {
        vec![
            wired("baskets", &[]),
            wired("wash", &["baskets"]),
            wired("fold", &["wash"]),
        ]
    }

    fn record(from: &str, to: &str, counts: Counts) -> Record {
        Record::from([(route(from, to), counts)])
    }

    fn made(out: u64) -> Counts {
        Counts {
            out,
            ..Counts::default()
        }
    }

    fn passed(n: u64) -> Counts {
        Counts {
            received: n,
            passed: n,
            out: n,
            ..Counts::default()
        }
    }

    fn balanced() -> Books {
        let mut books = Books::default();
        books.add("baskets", &record(FROM_SOURCE, "baskets", made(100)));
        for (received, passed, filtered, dead) in [(60, 50, 8, 2), (40, 40, 0, 0)] {
            books.add(
                "wash",
                &record(
                    "baskets",
                    "wash",
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
                "",
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
        books.add("baskets", &record(FROM_SOURCE, "baskets", made(12)));
        let found = check(&laundry(), &books);
        assert_eq!(
            found,
            vec![Imbalance::Edge(Edge {
                from: "baskets".into(),
                epoch: 0,
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
                "",
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
        books.add("wash", &record(FROM_REPLAY, "wash", passed(2)));
        // What wash stored is now 92: fold must take in the two replayed items too.
        books.add("fold", &record("wash", "", passed(2)));
        assert_eq!(check(&laundry(), &books), Vec::new());
        assert_eq!(books.taken_from("wash", FROM_REPLAY), 2);
    }

    #[test]
    fn each_epoch_of_a_writer_balances_with_the_readers_that_took_from_it() {
        // wash wrote 90 items for fold; an edit put `rinse` between them: wash (epoch 1) writes
        // for rinse, which writes for fold.
        let wiring = vec![
            wired("baskets", &[]),
            wired("wash", &["baskets"]),
            wired("rinse", &["wash_1"]),
            wired("fold", &["rinse"]),
        ];
        let mut books = balanced();
        books.add("wash", &record("baskets", "wash_1", passed(30)));
        books.add("baskets", &record(FROM_SOURCE, "baskets", made(30)));
        books.add("rinse", &record("wash_1", "rinse", passed(30)));
        books.add("fold", &record("rinse", "", passed(30)));
        assert_eq!(check(&wiring, &books), Vec::new());
        let names: Vec<String> = books.edges(&wiring).iter().map(Edge::name).collect();
        assert_eq!(
            names,
            [
                "baskets → wash",
                "wash (epoch 1) → rinse",
                "rinse → fold",
                "wash → fold"
            ]
        );
        // A reader of the old epoch that missed some of it is named with that epoch.
        books.add("wash", &record("baskets", "wash", made(3)));
        books.add("baskets", &record(FROM_SOURCE, "baskets", made(3)));
        books.add(
            "wash",
            &record(
                "baskets",
                "wash_1",
                Counts {
                    received: 3,
                    passed: 3,
                    ..Counts::default()
                },
            ),
        );
        assert_eq!(
            check(&wiring, &books)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["wash → fold: wash stored 93 items, fold took in 90: 3 lost on the way"]
        );
        // A reader of an epoch nothing was stored in yet: nothing either way.
        let later = vec![wired("dry", &["wash_2"])];
        let edge = &books.edges(&later)[0];
        assert_eq!((edge.epoch, edge.out, edge.received), (2, 0, 0));
    }

    #[test]
    fn the_wiring_is_read_off_the_configs() {
        let yaml = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: w}\nspec:\n  sources: [{name: src, generator: {count: 1}}]\n  stages:\n    - {name: copy, passthrough: {}}\n  sinks: [{name: out, log: {}}]\n";
        let pipeline = crate::validate::parse_pipeline(yaml).unwrap();
        let topology = crate::validate::analyze(&pipeline).unwrap();
        let layout = crate::layout::layout(&topology, &pipeline.spec).unwrap();
        assert_eq!(
            wiring(&layout.units),
            vec![
                wired("src", &[]),
                wired("copy", &["src"]),
                wired("out", &["copy"])
            ]
        );
    }

    #[test]
    fn routes_and_tokens_read_back() {
        assert_eq!(parse_route(&route("wash_2", "dry")), ("wash_2", "dry"));
        assert_eq!(parse_route(&route("wash", "")), ("wash", ""));
        assert_eq!(writer_of("wash_2"), Some(("wash", 2)));
        assert_eq!(writer_of("wash"), Some(("wash", 0)));
        assert_eq!(writer_of(FROM_SOURCE), None);
        assert_eq!(writer_of("wash_x"), None);
    }

    #[test]
    fn records_read_back_as_written() {
        let r = record(
            "src",
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
        assert_eq!(
            text,
            r#"{"src>wash":{"in":3,"passed":2,"filtered":1,"out":2}}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }

    #[test]
    fn a_tally_counts_each_record_once_whatever_order_its_roll_ups_come_in() {
        let took = |n| record("src", "wash", received(n));
        let mut tally = Tally::default();
        tally.record(3, took(1));
        tally.record(5, took(2));
        tally.record(8, took(4));
        assert_eq!(tally.total(), took(7));
        assert_eq!(tally.last(), 8);
        // A roll-up through 5 sums the first two records: they are counted once, from it.
        tally.rolled_up(5, took(3));
        assert_eq!(tally.total(), took(7));
        assert_eq!((tally.through(), tally.records_after()), (5, 1));
        // A record it sums, still stored beside it, and an older roll-up read late change nothing.
        tally.record(5, took(2));
        tally.rolled_up(3, took(1));
        assert_eq!(tally.total(), took(7));
        tally.rolled_up(8, took(7));
        tally.record(9, took(10));
        assert_eq!(tally.total(), took(17));
        assert_eq!(tally.last(), 9);
    }

    fn received(n: u64) -> Counts {
        Counts {
            received: n,
            ..Counts::default()
        }
    }
}
