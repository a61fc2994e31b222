//! After a run: the summary (exact counts where they can be read off), the dead letters saved beside the
//! Pipeline file, and the run's NATS state and sink ledgers cleaned up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use switchyard_crds::layout::{Names, DEAD_LETTER_CONSUMER};
use switchyard_crds::topology::{type_of, UnitType};
use switchyard_crds::unit::{headers, UnitConfig, UnitRole};
use switchyard_crds::{FileSink, GeneratorSource, SinkKind, SourceKind};
use switchyard_ops::read;
use switchyard_platform::reports::Reports;

use crate::args::RunArgs;
use crate::error::RunError;
use crate::prepare::Prepared;
use crate::session::{totals, Ending, Session};
use crate::state::UnitCounts;
use crate::summary::{Summary, UnitSummary};
use crate::supervisor::Supervisor;
use crate::{plot, RunNats};

/// Writes what the run asked for (summary JSON, plot), cleans up, and prints the summary.
pub async fn finish(
    args: &RunArgs,
    prepared: &Prepared,
    nats: &RunNats,
    mut session: Session,
    ending: Ending,
    wall: Duration,
    sink_files: Vec<String>,
) -> Result<ExitCode, RunError> {
    let completed = ending == Ending::Completed;
    let dead_letter_file = if nats.connected() {
        save_dead_letters(&nats.js, prepared).await?
    } else {
        eprintln!(
            "NATS at {} is unreachable: dead letters, if any, stay in its stream {}",
            nats.url, prepared.layout.nats.stream.name
        );
        None
    };
    let end = RunEnd {
        completed,
        wall,
        sink_files,
        dead_letter_file,
        append: args.append,
    };
    let mut summary = summarize(prepared, &session.supervisor, &session.reports, end);
    if nats.connected() {
        read_books(prepared, nats, &mut summary).await;
    }
    summary.switchers = session.scaler.settings();
    summary.scale_events = std::mem::take(&mut session.scaler.events);
    summary.timeline = std::mem::take(&mut session.scaler.timeline);
    write_asked_for(args, &summary)?;
    // The stream stays (in the local state, or on the given server) for `dlq`, `trace` and `--resume`;
    // so do the sinks' ledgers, which keep a resumed run from writing an item twice.
    if let Some((state, _)) = &nats.state {
        let mut kept = state.kept();
        kept.counts = counts_to_keep(&kept.counts, &summary.units, nats.resumed);
        state.save_kept(&kept)?;
    }
    print!("{}", summary.render());
    if summary.dead_lettered > 0 {
        println!(
            "  inspect them: switchyard dlq list {file}; once the cause is fixed, `switchyard dlq replay {file}` and `switchyard run {file} --resume`",
            file = args.file.display()
        );
    }
    let unbalanced = summary
        .books
        .as_ref()
        .is_some_and(|b| !b.problems().is_empty());
    Ok(match ending {
        Ending::Interrupted => ExitCode::from(130),
        Ending::Completed if unbalanced => ExitCode::from(crate::error::BOOKS_DO_NOT_BALANCE),
        Ending::Completed => ExitCode::SUCCESS,
    })
}

/// The books as the run leaves them, into its summary; a word if they cannot be read.
async fn read_books(prepared: &Prepared, nats: &RunNats, summary: &mut Summary) {
    let target = switchyard_ops::Target {
        names: Names::new(&prepared.topology.namespace, &prepared.name),
        topology: prepared.topology.clone(),
        layout: prepared.layout.clone(),
        js: nats.js.clone(),
    };
    match switchyard_ops::books::now(&target).await {
        Ok(books) => summary.take_books(books),
        Err(e) => {
            eprintln!("The books cannot be read, so whether every item arrived is not known: {e}")
        }
    }
}

/// The summary as JSON and the plot, where the run was asked to write them.
fn write_asked_for(args: &RunArgs, summary: &Summary) -> Result<(), RunError> {
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(summary)?;
        std::fs::write(path, text).map_err(RunError::io(format!("write {}", path.display())))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::render(summary))
            .map_err(RunError::io(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// Each unit's counts to keep for a resumed run: a resumed run goes on with the one `before`, so
/// what this one counted adds to it, unless the count is a total read off a finished source or a
/// sink's file.
fn counts_to_keep(
    before: &BTreeMap<String, UnitCounts>,
    units: &[UnitSummary],
    resumed: bool,
) -> BTreeMap<String, UnitCounts> {
    units
        .iter()
        .map(|u| {
            let mut counts = UnitCounts {
                processed: u.processed,
                published: u.published,
                dead_lettered: u.dead_lettered,
            };
            if let Some(earlier) = before.get(&u.name).filter(|_| resumed && !u.exact) {
                counts.processed += earlier.processed;
                counts.published += earlier.published;
                counts.dead_lettered += earlier.dead_lettered;
            }
            (u.name.clone(), counts)
        })
        .collect()
}

/// How a run ended, for its summary.
struct RunEnd {
    completed: bool,
    wall: Duration,
    sink_files: Vec<String>,
    dead_letter_file: Option<PathBuf>,
    append: bool,
}

fn summarize(
    prepared: &Prepared,
    supervisor: &Supervisor,
    stats: &Reports,
    end: RunEnd,
) -> Summary {
    let RunEnd {
        completed,
        wall,
        sink_files,
        dead_letter_file,
        append,
    } = end;
    let mut units = Vec::new();
    let (mut from_sources, mut at_sinks, mut dead) = (0, 0, 0);
    for config in &prepared.layout.units {
        let mut t = totals(stats, &config.unit);
        // A process killed mid-run takes its last second of counts with it, and its successor counts
        // again what it publishes anew from its checkpoint. Where the truth can be read off (a
        // generator that finished, a file a sink started afresh), it replaces both.
        let exact = exact_count(prepared, supervisor, config, append);
        if let Some(exact) = exact {
            t.processed = exact;
            t.published = exact;
        }
        let kind = prepared.topology.unit(&config.unit).map(type_of);
        match kind {
            Some(UnitType::Source) => from_sources += t.processed,
            Some(UnitType::Sink) => at_sinks += t.published,
            Some(UnitType::Group | UnitType::Switcher) | None => {}
        }
        dead += t.dead_lettered;
        let processes = supervisor.units.iter().find(|u| u.unit == config.unit);
        units.push(UnitSummary {
            name: config.unit.clone(),
            kind,
            most_replicas: processes.map_or(0, |p| p.most_replicas),
            processed: t.processed,
            published: t.published,
            filtered: None,
            dead_lettered: t.dead_lettered,
            duplicates_skipped: t.duplicates_skipped,
            restarts: processes.map_or(0, |p| p.restarts),
            exact: exact.is_some(),
        });
    }
    let seconds = wall.as_secs_f64().max(0.001);
    Summary {
        pipeline: prepared.name.clone(),
        completed,
        wall_seconds: seconds,
        from_sources,
        at_sinks,
        dead_lettered: dead,
        throughput: from_sources as f64 / seconds,
        units,
        sink_files,
        dead_letter_file: dead_letter_file.map(|p| p.display().to_string()),
        switchers: BTreeMap::new(),
        scale_events: Vec::new(),
        timeline: BTreeMap::new(),
        books: None,
    }
}

/// How many messages a unit handled, when that can be known exactly rather than from its reports.
fn exact_count(
    prepared: &Prepared,
    supervisor: &Supervisor,
    config: &UnitConfig,
    append: bool,
) -> Option<u64> {
    match &config.role {
        UnitRole::Source {
            source:
                SourceKind::Generator(GeneratorSource {
                    count: Some(count), ..
                }),
            ..
        } => supervisor
            .units
            .iter()
            .any(|u| u.unit == config.unit && u.finished)
            .then_some(*count),
        UnitRole::Sink {
            sink: SinkKind::File(FileSink { path }),
            ..
        } if !append => std::fs::read(prepared.base_dir.join(path))
            .ok()
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count() as u64),
        _ => None,
    }
}

/// Dead letters live in the run's stream, which a private server takes with it: save them beside the
/// Pipeline file, one JSON line each with its error and origin.
async fn save_dead_letters(
    js: &jetstream::Context,
    prepared: &Prepared,
) -> Result<Option<PathBuf>, RunError> {
    let stream = js
        .get_stream(&prepared.layout.nats.stream.name)
        .await
        .map_err(RunError::nats("open the run's stream"))?;
    let consumer: PullConsumer =
        stream
            .get_consumer(DEAD_LETTER_CONSUMER)
            .await
            .map_err(|source| RunError::Nats {
                action: "open the dead-letter consumer".to_string(),
                source,
            })?;
    let info = stream
        .consumer_info(DEAD_LETTER_CONSUMER)
        .await
        .map_err(RunError::nats("read the dead-letter consumer"))?;
    if info.num_pending == 0 {
        return Ok(None);
    }
    let path = prepared
        .base_dir
        .join(format!("{}.dead-letters.jsonl", prepared.name));
    let mut lines = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .map_err(RunError::nats("fetch dead letters"))?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| RunError::Nats {
                action: "fetch dead letters".to_string(),
                source: e,
            })?;
            got += 1;
            let get = |name: &str| read::header(&message, name);
            let data = read::data(&message.payload);
            let line = serde_json::json!({
                "unit": get(headers::FAILED_UNIT),
                "stage": get(headers::FAILED_STAGE),
                "error": get(headers::ERROR),
                "attempts": get(headers::ATTEMPTS).parse::<u64>().unwrap_or(0),
                "deliveries": get(headers::DELIVERIES).parse::<u64>().ok(),
                "origin": get(headers::ORIGIN),
                "originSeq": get(headers::ORIGIN_SEQ),
                "data": data,
            });
            lines.push(line.to_string());
        }
        if got == 0 || lines.len() as u64 >= info.num_pending {
            break;
        }
    }
    lines.push(String::new());
    std::fs::write(&path, lines.join("\n"))
        .map_err(RunError::io(format!("write {}", path.display())))?;
    Ok(Some(path))
}
