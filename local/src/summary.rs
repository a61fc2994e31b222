//! What a local run did, printed at the end.

use std::fmt::Write as _;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::progress::thousands;
use crate::scaling::{Point, ScaleEvent, SwitcherSettings};
use switchyard_crds::topology::UnitType;
use switchyard_ops::books::BooksNow;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub pipeline: String,
    /// Finished by itself (false: stopped by Ctrl-C).
    pub completed: bool,
    pub wall_seconds: f64,
    /// Messages the sources stored.
    pub from_sources: u64,
    /// Messages the sinks wrote (duplicates skipped do not count).
    pub at_sinks: u64,
    pub dead_lettered: u64,
    /// Messages from the sources per second of wall time.
    pub throughput: f64,
    pub units: Vec<UnitSummary>,
    /// Where the files of file sinks are.
    pub sink_files: Vec<String>,
    /// Where the dead letters were saved, with their errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_file: Option<String>,
    /// Each switcher's scaling settings.
    pub switchers: BTreeMap<String, SwitcherSettings>,
    /// Every scaling change, in order.
    pub scale_events: Vec<ScaleEvent>,
    /// Every unit's lag and replicas, once a second.
    pub timeline: BTreeMap<String, Vec<Point>>,
    /// The Pipeline's books (exact: every delivery counted once) and its edges, when they could
    /// be read; the units' counts come from them then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub books: Option<BooksNow>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitSummary {
    pub name: String,
    pub kind: Option<UnitType>,
    pub most_replicas: usize,
    pub processed: u64,
    pub published: u64,
    /// Inputs the steps dropped (known from the books only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filtered: Option<u64>,
    pub dead_lettered: u64,
    pub duplicates_skipped: u64,
    pub restarts: u32,
    /// The counts are totals read off the source or the sink's file, not this run's reports.
    #[serde(skip)]
    pub exact: bool,
}

impl Summary {
    /// Takes the units' counts from the books, which count every delivery once, whatever process
    /// died or how often a message came. They are the Pipeline's since its stream began (a resumed
    /// run's with the runs before). What a finished generator made and a file sink holds stay as
    /// counted there: an item a failover made its source store twice went through the books twice,
    /// and into the file once.
    pub fn take_books(&mut self, books: BooksNow) {
        let (mut from_sources, mut at_sinks, mut dead) = (0, 0, 0);
        for unit in &mut self.units {
            let total = books.books.total(&unit.name);
            let source = unit.kind == Some(UnitType::Source);
            let sink = unit.kind == Some(UnitType::Sink);
            // What a finished generator made and what a file sink holds, counted there, stay.
            let counted_there = (source || sink) && unit.exact;
            if !counted_there {
                unit.processed = if source { total.out } else { total.received };
                unit.published = total.out;
            } else if sink {
                unit.processed = total.received;
            }
            unit.filtered = (!source).then_some(total.filtered);
            unit.dead_lettered = total.dead_lettered;
            unit.duplicates_skipped = total.duplicates;
            unit.exact = true;
            match unit.kind {
                Some(UnitType::Source) => from_sources += unit.processed,
                Some(UnitType::Sink) => at_sinks += unit.published,
                _ => {}
            }
            dead += total.dead_lettered;
        }
        self.from_sources = from_sources;
        self.at_sinks = at_sinks;
        self.dead_lettered = dead;
        self.throughput = from_sources as f64 / self.wall_seconds.max(0.001);
        self.books = Some(books);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let how = if self.completed {
            "finished"
        } else {
            "stopped"
        };
        let _ = writeln!(
            out,
            "{} {how} in {:.1}s: {} from sources, {} at sinks, {} dead-lettered ({} msg/s)",
            self.pipeline,
            self.wall_seconds,
            thousands(self.from_sources),
            thousands(self.at_sinks),
            thousands(self.dead_lettered),
            thousands(self.throughput.round() as u64),
        );
        let width = self
            .units
            .iter()
            .map(|u| u.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "\n  {:<width$}  {:<8} {:>8} {:>10} {:>10} {:>9} {:>13} {:>8}",
            "unit", "kind", "replicas", "in", "out", "filtered", "dead-lettered", "restarts"
        );
        for u in &self.units {
            let source = u.kind == Some(UnitType::Source);
            let input = if source {
                "-".to_string()
            } else {
                thousands(u.processed)
            };
            let output = if source {
                thousands(u.processed)
            } else {
                thousands(u.published)
            };
            let _ = writeln!(
                out,
                "  {:<width$}  {:<8} {:>8} {:>10} {:>10} {:>9} {:>13} {:>8}",
                u.name,
                u.kind.map_or("-", UnitType::as_str),
                u.most_replicas,
                input,
                output,
                u.filtered.map_or("-".to_string(), thousands),
                thousands(u.dead_lettered),
                u.restarts,
            );
        }
        if let Some(books) = &self.books {
            let _ = write!(out, "\n{}", switchyard_ops::books::render(books));
        } else if self.units.iter().any(|u| u.restarts > 0) {
            let _ = writeln!(
                out,
                "\n  Counts of a restarted unit miss what its dead process did after its last report (up\n  to a second); the messages themselves were delivered again and reached the sinks once."
            );
        }
        if !self.sink_files.is_empty() {
            out.push('\n');
        }
        for file in &self.sink_files {
            let _ = writeln!(out, "  wrote {file}");
        }
        if let Some(file) = &self.dead_letter_file {
            let _ = writeln!(out, "  dead letters, with their errors: {file}");
        }
        out
    }
}
