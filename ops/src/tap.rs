//! What is on an edge right now: the messages going into (or out of) a unit, as JSON lines with their
//! headers. The tap reads with an ordered consumer of its own, acknowledging nothing: the units' own
//! consumers, and so the pipeline's counts, pace and retention, are untouched.

use std::io::Write;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use switchyard_crds::jq::{parse_json, JqFilter};
use switchyard_crds::unit::UnitRole;

use crate::read::{self, stored_at_ms};
use crate::target::{OpsError, Target};

/// Which edge of a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    Input,
    Output,
}

pub struct TapOptions {
    pub unit: String,
    pub edge: Edge,
    /// Stop after this many (printed) messages; `None`: until stopped.
    pub count: Option<u64>,
    /// Also what is stored on the edge already, not only what comes from now on.
    pub from_start: bool,
    /// A jq filter over each record (`{subject, seq, time, headers, data}`); its outputs are printed.
    pub filter: Option<String>,
}

/// The subjects of an edge, or why the unit has no such edge.
pub fn edge_subjects(target: &Target, unit: &str, edge: Edge) -> Result<Vec<String>, OpsError> {
    let config = target
        .layout
        .units
        .iter()
        .find(|u| u.unit == unit)
        .ok_or_else(|| {
            let names: Vec<&str> = target
                .layout
                .units
                .iter()
                .map(|u| u.unit.as_str())
                .collect();
            OpsError::Usage(format!(
                "the Pipeline has no unit `{unit}`: its units are {}",
                names.join(", ")
            ))
        })?;
    match edge {
        Edge::Input => match &config.input {
            Some(input) => Ok(input.filter_subjects.clone()),
            None => Err(OpsError::Usage(format!(
                "`{unit}` is a source: it has no input; tap its output with --output"
            ))),
        },
        Edge::Output => match (&config.output_subject, &config.role) {
            (Some(subject), _) => Ok(vec![subject.clone()]),
            (None, UnitRole::Sink { .. }) => Err(OpsError::Usage(format!(
                "`{unit}` is a sink: what it writes leaves NATS; tap its input instead"
            ))),
            (None, _) => Err(OpsError::Usage(format!("`{unit}` publishes nothing"))),
        },
    }
}

/// One message as a tap prints it: a JSON object with `subject`, `seq`, `time`, `headers` and `data`,
/// in that order (where it was, then what it is). A frame (several items in one stored message) is
/// a record per item, each with its own headers and data and its place in the frame as `item`.
pub fn records(message: &jetstream::Message) -> Vec<String> {
    let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    let time = crate::text::when(stored_at_ms(message));
    match switchyard_platform::frame::items(message.headers.as_ref(), &message.payload) {
        Some(Ok(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                one_record(
                    message.subject.as_str(),
                    seq,
                    Some(index),
                    &time,
                    Some(&item.headers),
                    &item.payload,
                )
            })
            .collect(),
        unreadable_or_single => {
            if let Some(Err(e)) = unreadable_or_single {
                tracing::warn!(
                    "message {seq} says it is a frame but cannot be read as one ({e}); shown as it is"
                );
            }
            vec![one_record(
                message.subject.as_str(),
                seq,
                None,
                &time,
                message.headers.as_ref(),
                &message.payload,
            )]
        }
    }
}

fn one_record(
    subject: &str,
    seq: u64,
    item: Option<usize>,
    time: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> String {
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, values)| {
            let value = values.first().map(|v| v.as_str()).unwrap_or_default();
            (
                name.to_string(),
                serde_json::Value::String(value.to_string()),
            )
        })
        .collect();
    let text = |v: serde_json::Value| v.to_string();
    let item = item.map(|i| format!(",\"item\":{i}")).unwrap_or_default();
    format!(
        "{{\"subject\":{},\"seq\":{seq}{item},\"time\":{},\"headers\":{},\"data\":{}}}",
        text(subject.into()),
        text(time.into()),
        text(headers.into()),
        text(read::data(payload)),
    )
}

/// Prints the edge's messages to `out` until `count` were printed (or for ever); returns how many.
/// `opened` is called with the edge's subjects once the tap's consumer exists: from then on nothing
/// published to the edge is missed (a person who starts a tap and then a replay sees the replay).
pub async fn tap(
    target: &Target,
    options: &TapOptions,
    out: &mut dyn Write,
    opened: impl FnOnce(&[String]),
) -> Result<u64, OpsError> {
    let subjects = edge_subjects(target, &options.unit, options.edge)?;
    let filter = match &options.filter {
        Some(code) => Some(
            JqFilter::compile(code)
                .map_err(|e| OpsError::Usage(format!("--filter does not compile: {e}")))?,
        ),
        None => None,
    };
    let start = if options.from_start {
        DeliverPolicy::All
    } else {
        DeliverPolicy::New
    };
    let mut messages = read::open(
        &target.js,
        &target.layout.nats.stream.name,
        &subjects,
        start,
    )
    .await?
    .messages;
    opened(&subjects);
    let mut printed = 0;
    while options.count.is_none_or(|n| printed < n) {
        let message = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(OpsError::nats("tap the edge")(e)),
            None => break,
        };
        let mut lines = Vec::new();
        for record in records(&message) {
            match &filter {
                None => lines.push(record),
                Some(filter) => {
                    let value = parse_json(record.as_bytes())
                        .map_err(|e| OpsError::Usage(e.to_string()))?;
                    match filter.run(value) {
                        Ok(outputs) => lines.extend(outputs.iter().map(|v| v.to_string())),
                        Err(e) => tracing::debug!("--filter failed on a message: {e}"),
                    }
                }
            }
        }
        for line in lines {
            if options.count.is_some_and(|n| printed >= n) {
                break;
            }
            writeln!(out, "{line}")?;
            printed += 1;
        }
        out.flush()?;
    }
    Ok(printed)
}
