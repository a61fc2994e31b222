//! A message body on its way through a unit's steps. It stays in the form the last step produced, so
//! that two jq steps in a row parse the JSON once and serialize it once.

use bytes::Bytes;
use serde::de::IgnoredAny;
use switchyard_crds::jq::{parse_json, JqError, Val};

#[derive(Clone, Debug)]
pub enum Payload {
    Bytes(Bytes),
    Json(Val),
}

impl Payload {
    /// The JSON value, parsing the bytes if needed.
    pub fn into_json(self) -> Result<Val, JqError> {
        match self {
            Payload::Json(v) => Ok(v),
            Payload::Bytes(b) => parse_json(&b),
        }
    }

    /// Its size in bytes; a JSON value is measured as it will be written.
    pub fn size(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Json(v) => v.to_string().len(),
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Bytes(b) => b,
            Payload::Json(v) => Bytes::from(v.to_string()),
        }
    }

    /// Appends the message as one JSON value: as it is when it is JSON, as a JSON string otherwise.
    /// That is how the exec protocol and batches present a message.
    pub fn write_as_json(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Json(v) => out.extend_from_slice(v.to_string().as_bytes()),
            Payload::Bytes(b) => write_bytes_as_json(b, out),
        }
    }
}

/// True when `bytes` hold exactly one JSON value.
pub fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(bytes).is_ok()
}

/// Appends `bytes` as one JSON value: as they are when they are JSON on one line, re-encoded when
/// they are JSON over several lines, and as a JSON string otherwise.
pub fn write_bytes_as_json(bytes: &[u8], out: &mut Vec<u8>) {
    if !bytes.contains(&b'\n') && is_json(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if serde_json::to_writer(&mut *out, &value).is_ok() {
            return;
        }
    }
    let text = String::from_utf8_lossy(bytes);
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_json(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        write_bytes_as_json(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_stays_as_it_is() {
        assert_eq!(as_json(br#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(as_json(b"17"), "17");
    }

    #[test]
    fn multi_line_json_becomes_one_line() {
        assert_eq!(as_json(b"{\n \"a\": [1,\n 2]\n}"), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn other_bytes_become_a_string() {
        assert_eq!(as_json(b"hello \"you\"\n"), r#""hello \"you\"\n""#);
        assert_eq!(as_json(b"{broken"), r#""{broken""#);
    }

    #[test]
    fn json_values_round_trip_through_bytes() {
        let p = Payload::Bytes(Bytes::from_static(br#"{"x":[1,2]}"#));
        let v = p.into_json().unwrap();
        assert_eq!(
            Payload::Json(v).into_bytes(),
            Bytes::from_static(br#"{"x":[1,2]}"#)
        );
    }
}
