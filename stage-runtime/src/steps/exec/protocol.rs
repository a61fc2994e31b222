//! The line protocol (pure): the request line the runtime writes for an item, and what one line
//! of a handler's stdout is.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

/// What a reply line looks like, for the errors that say a line was not one.
pub const REPLY_FORM: &str =
    r#"a reply is one JSON line, {"id": …, "outputs": […]} or {"id": …, "error": "…"}"#;

pub(super) fn request_line(id: u64, item: &Payload, lineage: &Lineage) -> Vec<u8> {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"id\":\"");
    line.extend_from_slice(id.to_string().as_bytes());
    line.extend_from_slice(b"\",\"data\":");
    item.write_as_json(&mut line);
    line.extend_from_slice(b",\"headers\":{");
    let mut first = true;
    let mut field = |name: &str, value: &str| {
        if !first {
            line.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut line, name);
        line.push(b':');
        let _ = serde_json::to_writer(&mut line, value);
    };
    use switchyard_crds::unit::headers;
    field(headers::MSG_ID, &lineage.id);
    field(headers::ORIGIN, &lineage.origin);
    field(headers::ORIGIN_SEQ, &lineage.origin_seq);
    field(headers::PATH, &lineage.path);
    if let Some(t) = &lineage.traceparent {
        field(headers::TRACEPARENT, t);
    }
    if let Some(t) = &lineage.tracestate {
        field(headers::TRACESTATE, t);
    }
    line.extend_from_slice(b"}}\n");
    line
}

#[derive(Deserialize)]
pub(super) struct ReplyLine<'a> {
    #[serde(borrow)]
    pub(super) id: IdField<'a>,
    #[serde(default, borrow)]
    pub(super) outputs: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    pub(super) error: Option<serde_json::Value>,
}

/// Handlers echo the id they were given; accept it back as a string or as a number.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum IdField<'a> {
    Text(&'a str),
    Owned(String),
    Number(u64),
}

impl IdField<'_> {
    pub(super) fn number(&self) -> Option<u64> {
        match self {
            IdField::Text(t) => t.parse().ok(),
            IdField::Owned(t) => t.parse().ok(),
            IdField::Number(n) => Some(*n),
        }
    }
}

/// What one line on a handler's stdout is.
#[derive(Debug)]
pub enum ReplyOf {
    /// An empty line: nothing.
    Blank,
    /// The answer for the request `id`: its outputs, or the handler's error.
    Answer {
        id: u64,
        result: Result<Vec<Payload>, StepError>,
    },
    /// A reply to the request `id` that says nothing usable, and why.
    Malformed { id: u64, why: &'static str },
    /// Not a reply that can be matched to a request, and why.
    NotAReply(String),
}

/// Parses one line of a handler's stdout (pure: the fuzz target `exec_reply` drives it).
pub fn parse_reply(line: &[u8]) -> ReplyOf {
    let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
    if trimmed.iter().all(u8::is_ascii_whitespace) {
        return ReplyOf::Blank;
    }
    let reply: ReplyLine = match serde_json::from_slice(trimmed) {
        Ok(r) => r,
        Err(e) => return ReplyOf::NotAReply(e.to_string()),
    };
    let Some(id) = reply.id.number() else {
        return ReplyOf::NotAReply("its id is not one the runtime sent".to_string());
    };
    let result = match (reply.outputs, reply.error) {
        (_, Some(error)) => Err(StepError::transient(match error {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })),
        (Some(outputs), None) => Ok(outputs
            .into_iter()
            .map(|raw| Payload::Bytes(Bytes::copy_from_slice(raw.get().as_bytes())))
            .collect()),
        (None, None) => {
            return ReplyOf::Malformed {
                id,
                why: "it has neither `outputs` nor `error`",
            }
        }
    };
    ReplyOf::Answer { id, result }
}

/// The first 200 characters of a line, for messages.
pub fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(line).chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lineage::Lineage;

    #[test]
    fn request_lines_embed_json_and_quote_the_rest() {
        let l = Lineage::at_source("s", "1".into(), "s:1".into());
        let line = request_line(7, &Payload::Bytes(r#"{"a":1}"#.into()), &l);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["id"], "7");
        assert_eq!(parsed["data"]["a"], 1);
        assert_eq!(parsed["headers"]["Switchyard-Origin"], "s");
        assert!(line.ends_with(b"}\n"));
        let line = request_line(8, &Payload::Bytes("plain text".into()), &l);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["data"], "plain text");
    }

    #[test]
    fn reply_lines_are_answers_errors_or_explained() {
        let answer = |line: &str| match parse_reply(line.as_bytes()) {
            ReplyOf::Answer { id, result } => (id, result.map(|o| o.len()).map_err(|e| e.message)),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            answer(r#"{"id": "7", "outputs": [1, {"a": 2}]}"#),
            (7, Ok(2))
        );
        assert_eq!(answer("{\"id\": 8, \"outputs\": []}\r"), (8, Ok(0)));
        assert_eq!(
            answer(r#"{"id": "9", "error": "no"}"#),
            (9, Err("no".into()))
        );
        assert_eq!(
            answer(r#"{"id": "9", "error": {"code": 3}}"#),
            (9, Err(r#"{"code":3}"#.into()))
        );
        assert!(matches!(parse_reply(b"  \r"), ReplyOf::Blank));
        assert!(matches!(
            parse_reply(br#"{"id": "5"}"#),
            ReplyOf::Malformed { id: 5, .. }
        ));
        for line in [
            "this is not json",
            r#"{"id": "x1", "outputs": []}"#,
            "[1,2]",
            "{\"id\": -1}",
        ] {
            assert!(
                matches!(parse_reply(line.as_bytes()), ReplyOf::NotAReply(_)),
                "{line}"
            );
        }
        assert_eq!(shown("é".repeat(300).as_bytes()).chars().count(), 200);
    }
}
