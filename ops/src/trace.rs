//! Following one item: the trace events every unit recorded about it, in order, and where it ended.

use async_nats::jetstream::consumer::DeliverPolicy;
use serde::Serialize;
use switchyard_crds::unit::{TraceEvent, TraceOutcome};

use crate::read;
use crate::target::{OpsError, Target};

/// The events of one item, oldest first, and its end.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub origin: String,
    pub seq: String,
    pub events: Vec<TraceEvent>,
}

/// Parses `ORIGIN:SEQ`.
pub fn parse_item(text: &str) -> Result<(String, String), OpsError> {
    match text.rsplit_once(':') {
        Some((origin, seq)) if !origin.is_empty() && !seq.is_empty() => {
            Ok((origin.to_string(), seq.to_string()))
        }
        _ => Err(OpsError::Usage(format!(
            "`{text}` is not an item: give ORIGIN:SEQ, such as `clothes:17` (a dead letter's origin and originSeq, or a message's Switchyard-Origin and Switchyard-Origin-Seq headers)"
        ))),
    }
}

/// Reads the events of item `origin:seq`.
pub async fn read(target: &Target, origin: &str, seq: &str) -> Result<Trace, OpsError> {
    let Some(stream) = target.layout.nats.trace.as_ref() else {
        return Err(OpsError::Usage(
            "the Pipeline traces nothing (spec.tracing.sampleRate is 0)".to_string(),
        ));
    };
    let subject = format!(
        "{}.{}.{}",
        target.names.trace_prefix(),
        switchyard_crds::unit::subject_token(origin),
        switchyard_crds::unit::subject_token(seq)
    );
    let stored = read::stored(
        &target.js,
        &stream.name,
        &[subject],
        DeliverPolicy::All,
        10_000,
    )
    .await?;
    let mut events: Vec<TraceEvent> = stored
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect();
    events.sort_by_key(|e: &TraceEvent| e.at_ms);
    Ok(Trace {
        origin: origin.to_string(),
        seq: seq.to_string(),
        events,
    })
}

/// Pure: the trace as a person reads it.
pub fn render(trace: &Trace, sample_rate: Option<f64>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if trace.events.is_empty() {
        let _ = writeln!(
            out,
            "no trace of {}:{}: it was not sampled{}, its events are older than spec.tracing.retention, or no such item was made",
            trace.origin,
            trace.seq,
            sample_rate.map_or(String::new(), |r| format!(" (spec.tracing.sampleRate is {r})")),
        );
        return out;
    }
    let start = trace.events[0].at_ms;
    let _ = writeln!(out, "{}:{}", trace.origin, trace.seq);
    let width = trace
        .events
        .iter()
        .map(|e| e.unit.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "  {:>9}  {:<width$}  {:>9}  {:>8}  outcome",
        "at", "unit", "took", "attempts"
    );
    for e in &trace.events {
        let outcome = match e.outcome {
            TraceOutcome::Emitted => "emitted".to_string(),
            TraceOutcome::Published => format!("published {}", e.outputs),
            TraceOutcome::Written => "written".to_string(),
            TraceOutcome::Duplicate => "already written (a redelivery)".to_string(),
            TraceOutcome::DeadLettered => format!(
                "dead-lettered at {}: {}",
                e.stage.as_deref().unwrap_or("?"),
                e.error.as_deref().unwrap_or("?")
            ),
            TraceOutcome::Waiting => format!("part stored: {}", note(e)),
            TraceOutcome::Joined => format!("{}: published {}", note(e), e.outputs),
            TraceOutcome::Late => format!("late part: {}", note(e)),
        };
        let again = match (e.deliveries, e.replays) {
            (d, 0) if d > 1 => format!(" (delivery {d})"),
            (_, 0) => String::new(),
            (_, r) => format!(" (replay {r})"),
        };
        let _ = writeln!(
            out,
            "  {:>+8.3}s  {:<width$}  {:>9}  {:>8}  {outcome}{again}",
            (e.at_ms - start) as f64 / 1000.0,
            e.unit,
            took(e.took_us),
            if e.attempts == 0 {
                "-".to_string()
            } else {
                e.attempts.to_string()
            },
        );
    }
    let _ = writeln!(out, "  ended: {}", ending(trace));
    out
}

fn note(e: &TraceEvent) -> &str {
    e.note.as_deref().unwrap_or("?")
}

fn took(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

/// Where the item (and what was made of it) ended up. After a replay, what the latest replay did
/// is where it ended: the dead letter it was replayed from is history.
pub fn ending(trace: &Trace) -> String {
    let latest = trace.events.iter().map(|e| e.replays).max().unwrap_or(0);
    let last: Vec<&TraceEvent> = trace
        .events
        .iter()
        .filter(|e| e.replays == latest || e.outcome == TraceOutcome::Emitted)
        .collect();
    let written: Vec<&str> = last
        .iter()
        .filter(|e| matches!(e.outcome, TraceOutcome::Written | TraceOutcome::Duplicate))
        .map(|e| e.unit.as_str())
        .collect();
    let dead: Vec<String> = last
        .iter()
        .filter(|e| e.outcome == TraceOutcome::DeadLettered)
        .map(|e| {
            format!(
                "the dead-letter queue from {} ({})",
                e.unit,
                e.error.as_deref().unwrap_or("?")
            )
        })
        .collect();
    let mut ends: Vec<String> = Vec::new();
    let mut sinks = written.clone();
    sinks.dedup();
    for sink in sinks {
        let n = written.iter().filter(|w| **w == sink).count();
        ends.push(if n > 1 {
            format!("sink {sink} ({n} items)")
        } else {
            format!("sink {sink}")
        });
    }
    ends.extend(dead);
    // A join that stored a part and has not joined the item since: it waits there.
    let joined = last.iter().any(|e| e.outcome == TraceOutcome::Joined);
    if let Some(waiting) = last
        .iter()
        .rev()
        .find(|e| e.outcome == TraceOutcome::Waiting && !joined)
    {
        ends.push(format!(
            "waiting at join {}: {}",
            waiting.unit,
            note(waiting)
        ));
    }
    if ends.is_empty() {
        "nowhere yet: still on its way, or dropped by a filter".to_string()
    } else {
        ends.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(unit: &str, at_ms: u64, outcome: TraceOutcome) -> TraceEvent {
        TraceEvent {
            unit: unit.into(),
            at_ms,
            outcome,
            took_us: 1500,
            attempts: 1,
            outputs: 1,
            ..TraceEvent::default()
        }
    }

    #[test]
    fn items_are_origin_and_seq() {
        assert_eq!(
            parse_item("clothes:17").unwrap(),
            ("clothes".to_string(), "17".to_string())
        );
        assert_eq!(
            parse_item("orders:file.jsonl:3").unwrap(),
            ("orders:file.jsonl".to_string(), "3".to_string())
        );
        assert!(parse_item("17").is_err());
        assert!(parse_item("clothes:").is_err());
    }

    #[test]
    fn a_trace_shows_the_fork_and_the_join_and_an_item_waiting_there() {
        let waits = |unit: &str, at: u64, note: &str| {
            let mut e = event(unit, at, TraceOutcome::Waiting);
            e.outputs = 0;
            e.note = Some(note.into());
            e
        };
        let mut trace = Trace {
            origin: "orders".into(),
            seq: "7".into(),
            events: vec![
                event("orders", 1_000, TraceOutcome::Emitted),
                event("price", 1_010, TraceOutcome::Published),
                event("stock", 1_011, TraceOutcome::Published),
                waits("answer", 1_020, "waits for stock"),
            ],
        };
        let text = render(&trace, Some(1.0));
        assert!(text.contains("part stored: waits for stock"), "{text}");
        assert_eq!(ending(&trace), "waiting at join answer: waits for stock");
        let mut joined = event("answer", 1_030, TraceOutcome::Joined);
        joined.note = Some("joined price, stock".into());
        trace.events.push(joined);
        trace
            .events
            .push(event("out", 1_040, TraceOutcome::Written));
        let text = render(&trace, Some(1.0));
        assert!(text.contains("joined price, stock: published 1"), "{text}");
        assert_eq!(ending(&trace), "sink out");
    }

    #[test]
    fn a_trace_shows_each_unit_and_where_the_item_ended() {
        let mut dead = event("machines", 1_020, TraceOutcome::DeadLettered);
        dead.error = Some("too hot".into());
        dead.stage = Some("machines > wash".into());
        let trace = Trace {
            origin: "clothes".into(),
            seq: "4".into(),
            events: vec![
                event("clothes", 1_000, TraceOutcome::Emitted),
                event("machines", 1_010, TraceOutcome::Published),
                event("folded", 1_030, TraceOutcome::Written),
                dead,
            ],
        };
        let text = render(&trace, Some(1.0));
        assert!(text.contains("+0.010s  machines"), "{text}");
        assert!(text.contains("1.5ms"), "{text}");
        assert!(
            text.contains("dead-lettered at machines > wash: too hot"),
            "{text}"
        );
        assert_eq!(
            ending(&trace),
            "sink folded; the dead-letter queue from machines (too hot)"
        );
        let mut replayed = trace.clone();
        let mut again = event("machines", 9_000, TraceOutcome::Published);
        again.replays = 1;
        let mut written = event("folded", 9_010, TraceOutcome::Written);
        written.replays = 1;
        replayed.events.retain(|e| e.unit != "folded");
        replayed.events.extend([again, written]);
        assert_eq!(
            ending(&replayed),
            "sink folded",
            "a successful replay ends it"
        );
        let none = Trace {
            events: Vec::new(),
            ..trace
        };
        assert!(render(&none, Some(0.01)).contains("sampleRate is 0.01"));
    }
}
