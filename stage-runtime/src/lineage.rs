//! Where a message comes from and where it has been, carried in headers from unit to unit, and the
//! deterministic message ids that let JetStream (and sinks) drop a message that is published twice.

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::HeaderValue;
use switchyard_crds::unit::headers;

/// Header names as values built at compile time: a `&str` name is validated and copied on every use.
pub mod names {
    use super::{headers, HeaderName};
    pub const MSG_ID: HeaderName = HeaderName::from_static(headers::MSG_ID);
    pub const ORIGIN: HeaderName = HeaderName::from_static(headers::ORIGIN);
    pub const ORIGIN_SEQ: HeaderName = HeaderName::from_static(headers::ORIGIN_SEQ);
    pub const PATH: HeaderName = HeaderName::from_static(headers::PATH);
    pub const TRACEPARENT: HeaderName = HeaderName::from_static(headers::TRACEPARENT);
    pub const TRACESTATE: HeaderName = HeaderName::from_static(headers::TRACESTATE);
    pub const ERROR: HeaderName = HeaderName::from_static(headers::ERROR);
    pub const FAILED_STAGE: HeaderName = HeaderName::from_static(headers::FAILED_STAGE);
    pub const FAILED_UNIT: HeaderName = HeaderName::from_static(headers::FAILED_UNIT);
    pub const ATTEMPTS: HeaderName = HeaderName::from_static(headers::ATTEMPTS);
    pub const DELIVERIES: HeaderName = HeaderName::from_static(headers::DELIVERIES);
    pub const REPLAY_STEP: HeaderName = HeaderName::from_static(headers::REPLAY_STEP);
    pub const REPLAY_FOR: HeaderName = HeaderName::from_static(headers::REPLAY_FOR);
    pub const REPLAYS: HeaderName = HeaderName::from_static(headers::REPLAYS);
    pub const TRACED: HeaderName = HeaderName::from_static(headers::TRACED);
    pub const FORK: HeaderName = HeaderName::from_static(headers::FORK);
}

/// A message put back from the dead-letter queue: which unit takes it, and at which of its steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    pub unit: String,
    pub step: usize,
}

impl Replay {
    /// The replay a stored message is, if it is one.
    pub fn of(headers: Option<&HeaderMap>) -> Option<Replay> {
        let headers = headers?;
        let unit = headers.get(names::REPLAY_FOR)?.as_str().to_string();
        let step = headers
            .get(names::REPLAY_STEP)
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(0);
        Some(Replay { unit, step })
    }
}

/// What one input message says about its ancestry.
#[derive(Clone, Debug, PartialEq)]
pub struct Lineage {
    /// The input's own message id; every id derived from it is unique because it is.
    pub id: String,
    pub origin: String,
    pub origin_seq: String,
    /// Units passed so far, the source first, comma-separated.
    pub path: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// How often the item was replayed from the dead-letter queue.
    pub replays: u32,
    /// Whether its source traces it; None: every unit decides from its identity.
    pub traced: Option<bool>,
    /// On a branch's part and the letters of a branch or a join: the id of the item that forked.
    pub fork: Option<String>,
}

impl Lineage {
    /// The lineage of a message a source creates.
    pub fn at_source(source: &str, origin_seq: String, id: String) -> Lineage {
        Lineage {
            id,
            origin: source.to_string(),
            origin_seq,
            path: source.to_string(),
            traceparent: None,
            tracestate: None,
            replays: 0,
            traced: None,
            fork: None,
        }
    }

    /// Reads the lineage of a stored message. A message someone else put on a subject has no id of
    /// ours: its place in the stream stands in, so that redeliveries still map to the same ids.
    pub fn from_headers(headers: Option<&HeaderMap>, stream: &str, stream_seq: u64) -> Lineage {
        let get = |name: HeaderName| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .filter(|v| !v.is_empty())
        };
        Lineage {
            id: get(names::MSG_ID).unwrap_or_else(|| format!("{stream}:{stream_seq}")),
            origin: get(names::ORIGIN).unwrap_or_else(|| stream.to_string()),
            origin_seq: get(names::ORIGIN_SEQ).unwrap_or_else(|| stream_seq.to_string()),
            path: get(names::PATH).unwrap_or_default(),
            traceparent: get(names::TRACEPARENT),
            tracestate: get(names::TRACESTATE),
            replays: get(names::REPLAYS)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            traced: match get(names::TRACED).as_deref() {
                Some("1") => Some(true),
                Some("0") => Some(false),
                _ => None,
            },
            fork: get(names::FORK),
        }
    }

    /// Id of the `index`-th output `unit` made from this message. Unit names have no '.', so the
    /// suffix cannot be mistaken for part of a name.
    pub fn output_id(&self, unit: &str, index: usize) -> String {
        if index == 0 {
            format!("{}/{unit}", self.id)
        } else {
            format!("{}/{unit}.{index}", self.id)
        }
    }

    /// Id of a dead letter: the `index`-th item that failed at step `step` of `unit`.
    pub fn dead_letter_id(&self, unit: &str, step: usize, index: usize) -> String {
        format!("{}/{unit}!{step}.{index}", self.id)
    }

    /// Headers for messages `unit` publishes: the ancestry with `unit` appended to the path. Built once
    /// per input and cloned for each output.
    pub fn headers_after(&self, unit: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(names::ORIGIN, header_value(&self.origin));
        map.insert(names::ORIGIN_SEQ, header_value(&self.origin_seq));
        let path = if self.path.is_empty() {
            unit.to_string()
        } else {
            format!("{},{unit}", self.path)
        };
        map.insert(names::PATH, owned_header_value(path));
        if let Some(t) = &self.traceparent {
            map.insert(names::TRACEPARENT, header_value(t));
        }
        if let Some(t) = &self.tracestate {
            map.insert(names::TRACESTATE, header_value(t));
        }
        if self.replays > 0 {
            map.insert(names::REPLAYS, HeaderValue::from(self.replays.to_string()));
        }
        self.insert_traced(&mut map);
        if let Some(fork) = &self.fork {
            map.insert(names::FORK, header_value(fork));
        }
        map
    }

    fn insert_traced(&self, map: &mut HeaderMap) {
        if let Some(traced) = self.traced {
            map.insert(names::TRACED, if traced { "1" } else { "0" });
        }
    }

    /// Headers for a message a source creates (its path is just the source).
    pub fn source_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(names::MSG_ID, header_value(&self.id));
        map.insert(names::ORIGIN, header_value(&self.origin));
        map.insert(names::ORIGIN_SEQ, header_value(&self.origin_seq));
        map.insert(names::PATH, header_value(&self.path));
        if let Some(t) = &self.traceparent {
            map.insert(names::TRACEPARENT, header_value(t));
        }
        if let Some(t) = &self.tracestate {
            map.insert(names::TRACESTATE, header_value(t));
        }
        self.insert_traced(&mut map);
        map
    }
}

/// Like `header_value`, without a copy when the text is already fine.
pub fn owned_header_value(text: String) -> HeaderValue {
    if text.contains(['\r', '\n']) {
        HeaderValue::from(text.replace(['\r', '\n'], " "))
    } else {
        HeaderValue::from(text)
    }
}

/// A header value from any text: NATS headers cannot hold line breaks, and an error message from a
/// handler may; they become spaces rather than a panic.
pub fn header_value(text: &str) -> HeaderValue {
    if text.contains(['\r', '\n']) {
        HeaderValue::from(text.replace(['\r', '\n'], " "))
    } else {
        HeaderValue::from(text)
    }
}

/// Headers of a dead letter: the ancestry, why it failed, where, and after how many attempts.
pub fn dead_letter_headers(
    lineage: &Lineage,
    unit: &str,
    stage: &str,
    error: &str,
    (attempts, deliveries): (u32, Option<u64>),
    (id, replay_step): (&str, usize),
) -> HeaderMap {
    let mut map = lineage.headers_after(unit);
    map.insert(names::MSG_ID, header_value(id));
    let error: String = error.chars().take(2000).collect();
    map.insert(names::ERROR, header_value(&error));
    map.insert(names::FAILED_STAGE, header_value(stage));
    map.insert(names::FAILED_UNIT, header_value(unit));
    map.insert(names::ATTEMPTS, HeaderValue::from(attempts.to_string()));
    if let Some(deliveries) = deliveries {
        map.insert(names::DELIVERIES, HeaderValue::from(deliveries.to_string()));
    }
    map.insert(
        names::REPLAY_STEP,
        HeaderValue::from(replay_step.to_string()),
    );
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_per_unit_and_output() {
        let l = Lineage::at_source("clothes", "7".into(), "clothes:7".into());
        assert_eq!(l.output_id("person", 0), "clothes:7/person");
        assert_eq!(l.output_id("person", 2), "clothes:7/person.2");
        assert_eq!(l.dead_letter_id("person", 1, 0), "clothes:7/person!1.0");
        assert_ne!(l.output_id("a", 0), l.output_id("b", 0));
    }

    #[test]
    fn headers_carry_origin_path_and_trace_through_units() {
        let mut first = Lineage::at_source("src", "3".into(), "src:3".into());
        first.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let mut map = first.headers_after("a");
        map.insert(names::MSG_ID, first.output_id("a", 0).as_str());
        let second = Lineage::from_headers(Some(&map), "s", 99);
        assert_eq!(second.id, "src:3/a");
        assert_eq!(second.origin, "src");
        assert_eq!(second.origin_seq, "3");
        assert_eq!(second.path, "src,a");
        assert_eq!(second.traceparent, first.traceparent);
        let third = second.headers_after("b");
        assert_eq!(third.get(headers::PATH).unwrap().as_str(), "src,a,b");
    }

    #[test]
    fn a_sources_decision_to_trace_travels_with_the_item() {
        for decided in [Some(true), Some(false), None] {
            let mut l = Lineage::at_source("src", "3".into(), "src:3".into());
            l.traced = decided;
            let at_source = Lineage::from_headers(Some(&l.source_headers()), "s", 1);
            assert_eq!(at_source.traced, decided);
            let downstream = Lineage::from_headers(Some(&at_source.headers_after("a")), "s", 2);
            assert_eq!(downstream.traced, decided);
        }
    }

    #[test]
    fn foreign_messages_get_ids_from_their_place_in_the_stream() {
        let l = Lineage::from_headers(None, "stream", 42);
        assert_eq!(l.id, "stream:42");
        assert_eq!(l.origin_seq, "42");
    }

    #[test]
    fn line_breaks_in_errors_do_not_panic() {
        let l = Lineage::at_source("s", "1".into(), "s:1".into());
        let map = dead_letter_headers(&l, "u", "u > x", "bad\nthing\r\n", (3, Some(11)), ("id", 2));
        assert_eq!(map.get(headers::ERROR).unwrap().as_str(), "bad thing  ");
        assert_eq!(map.get(headers::ATTEMPTS).unwrap().as_str(), "3");
        assert_eq!(map.get(headers::DELIVERIES).unwrap().as_str(), "11");
        assert_eq!(map.get(headers::REPLAY_STEP).unwrap().as_str(), "2");
    }

    #[test]
    fn a_replay_names_its_unit_and_step_and_its_count_travels_downstream() {
        let mut map = HeaderMap::new();
        map.insert(names::REPLAY_FOR, "wash");
        map.insert(names::REPLAY_STEP, "1");
        map.insert(names::REPLAYS, "2");
        map.insert(names::MSG_ID, "src:3/wash!1.0~2");
        assert_eq!(
            Replay::of(Some(&map)),
            Some(Replay {
                unit: "wash".into(),
                step: 1
            })
        );
        let lineage = Lineage::from_headers(Some(&map), "s", 1);
        assert_eq!(lineage.replays, 2);
        let after = lineage.headers_after("wash");
        assert_eq!(after.get(headers::REPLAYS).unwrap().as_str(), "2");
        assert!(
            after.get(headers::REPLAY_FOR).is_none(),
            "only the replayed unit takes it as a replay"
        );
        assert_eq!(Replay::of(None), None);
    }
}
