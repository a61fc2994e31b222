//! Frames: several items in one stored JetStream message.
//!
//! The server's cost is per message (store, acknowledgement, redelivery bookkeeping), not per byte, so
//! a unit that has several items waiting stores them together. Each item keeps its own headers (its
//! id, origin, path, trace context), which is what every per-item feature reads; the message itself
//! carries only its own de-duplication id and `Switchyard-Frame: <items>`. A message without that
//! header is one item, as every message was before frames: both are read everywhere.
//!
//! A frame's message id names what it holds: `[<items>:<first item's id>..<last item's id>:<digest>]`,
//! the digest a 64-bit FNV-1a of every item's id, so that two frames of the same length and ends but
//! other items between (a unit's outputs when a step answered otherwise on a redelivery) differ too. JetStream
//! drops a message whose id it has already stored, so an id must never stand for other contents than
//! the ones stored under it. A frame once took its first item's id, which is also the id of that item
//! published alone: after a NATS failover a stream can hold an item alone that a resumed source then
//! put first in a frame, and the frame was dropped with every item after the first (issue 38). The
//! brackets start no item's id (item ids start with a unit's or a stream's name), so a frame and a
//! lone item never share one, and two frames share one only when they hold the same items.
//!
//! The payload of a frame is a format byte, then per item: the number of headers, each header's name
//! and value, then the item's payload, every length an unsigned LEB128 number.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use switchyard_crds::unit::headers;

/// The header that marks a frame and counts its items.
pub const FRAME_HEADER: HeaderName = HeaderName::from_static(headers::FRAME);

/// A frame holds at most this many items, and this many bytes (less when the server takes less in one
/// message): beyond a few hundred items the server's cost per item is already small, and a frame is
/// what a redelivery repeats.
pub const MOST_ITEMS: usize = switchyard_crds::layout::MOST_FRAME_ITEMS as usize;
pub const MOST_BYTES: usize = 256 * 1024;
/// Room left for a message's own headers when its payload is measured against the server's limit
/// (`max_payload` counts headers and payload together).
pub const HEADERS_ROOM: usize = 4096;

/// The only format so far; a reader meeting another says so instead of guessing.
const FORMAT: u8 = 1;

/// One item of a frame: its own headers and payload.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameItem {
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Why a stored message that says it is a frame cannot be read as one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("its Switchyard-Frame header is {0:?}, not a number of items")]
    Count(String),
    #[error("it is in frame format {0}, which this version does not read (it reads format {FORMAT}): run the same Switchyard version in every unit")]
    Format(u8),
    #[error("it ends inside item {0} of {1}")]
    Truncated(usize, usize),
    #[error("item {0} has a header name or value that is not one line of text")]
    NotText(usize),
    #[error("it holds {0} bytes after its last item")]
    Trailing(usize),
}

/// The number of items a stored message holds when it is a frame; None for a single item.
pub fn frame_count(message_headers: Option<&HeaderMap>) -> Option<Result<usize, FrameError>> {
    let value = message_headers?.get(FRAME_HEADER)?.as_str();
    Some(
        value
            .parse::<usize>()
            .map_err(|_| FrameError::Count(value.to_string())),
    )
}

/// The items a stored message holds, when it is a frame (None when it is a single item).
pub fn items(
    message_headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Option<Result<Vec<FrameItem>, FrameError>> {
    let count = match frame_count(message_headers)? {
        Ok(count) => count,
        Err(e) => return Some(Err(e)),
    };
    Some(decode(payload, count))
}

/// Reads the `count` items of a frame's payload.
pub fn decode(payload: &Bytes, count: usize) -> Result<Vec<FrameItem>, FrameError> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
    };
    let truncated = |index| FrameError::Truncated(index + 1, count);
    match reader.byte() {
        Some(FORMAT) => {}
        Some(other) => return Err(FrameError::Format(other)),
        None => return Err(truncated(0)),
    }
    // Every item takes at least two bytes: a frame cannot claim more items than that allows.
    let mut items = Vec::with_capacity(count.min(payload.len() / 2));
    for index in 0..count {
        let header_count = reader.number().ok_or_else(|| truncated(index))?;
        let mut headers = HeaderMap::new();
        for _ in 0..header_count {
            let name = reader.field().ok_or_else(|| truncated(index))?;
            let value = reader.field().ok_or_else(|| truncated(index))?;
            let name = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.parse::<HeaderName>().ok())
                .ok_or(FrameError::NotText(index + 1))?;
            // A header value cannot hold a line break (the client would refuse to build it).
            let value = std::str::from_utf8(&value)
                .ok()
                .filter(|v| !v.contains(['\r', '\n']))
                .ok_or(FrameError::NotText(index + 1))?;
            headers.append(name, HeaderValue::from(value));
        }
        let payload = reader.field().ok_or_else(|| truncated(index))?;
        items.push(FrameItem { headers, payload });
    }
    match payload.len() - reader.at {
        0 => Ok(items),
        rest => Err(FrameError::Trailing(rest)),
    }
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn number(&mut self) -> Option<usize> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value).ok();
            }
        }
        None
    }

    /// A length-prefixed run of bytes, shared with the frame rather than copied.
    fn field(&mut self) -> Option<Bytes> {
        let len = self.number()?;
        let end = self
            .at
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())?;
        let field = self.bytes.slice(self.at..end);
        self.at = end;
        Some(field)
    }
}

/// Builds one frame's payload item by item.
#[derive(Debug)]
pub struct FrameWriter {
    buf: Vec<u8>,
    count: usize,
    /// The ids of the first and the last item so far (the last one's buffer is reused), and the
    /// digest of all of them.
    first_id: String,
    last_id: String,
    ids_digest: u64,
}

impl Default for FrameWriter {
    fn default() -> Self {
        FrameWriter::new()
    }
}

impl FrameWriter {
    pub fn new() -> FrameWriter {
        FrameWriter {
            buf: vec![FORMAT],
            count: 0,
            first_id: String::new(),
            last_id: String::new(),
            ids_digest: FNV_OFFSET,
        }
    }

    /// Items so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The payload's size so far.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    /// What an item adds to a frame's size.
    pub fn encoded_size(item_headers: &HeaderMap, payload: &[u8]) -> usize {
        let mut size = number_size(item_headers.len()) + field_size(payload.len());
        for (name, values) in item_headers.iter() {
            for value in values {
                size += field_size(AsRef::<[u8]>::as_ref(name).len())
                    + field_size(value.as_str().len());
            }
        }
        size
    }

    pub fn push(&mut self, item_headers: &HeaderMap, payload: &[u8]) {
        let pairs: usize = item_headers.iter().map(|(_, values)| values.len()).sum();
        write_number(&mut self.buf, pairs);
        for (name, values) in item_headers.iter() {
            for value in values {
                write_field(&mut self.buf, AsRef::<[u8]>::as_ref(name));
                write_field(&mut self.buf, value.as_str().as_bytes());
            }
        }
        write_field(&mut self.buf, payload);
        let id = item_headers.get(headers::MSG_ID).map_or("", |v| v.as_str());
        if self.count == 0 {
            self.first_id.push_str(id);
        }
        self.last_id.clear();
        self.last_id.push_str(id);
        // Each id and a separator no id holds (ids are header values: one line of text).
        for byte in id.bytes().chain([b'\n']) {
            self.ids_digest = (self.ids_digest ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.count += 1;
    }

    /// The frame's payload and its message's headers: the item count and the frame's id.
    pub fn finish(self) -> (HeaderMap, Bytes) {
        let mut map = HeaderMap::new();
        map.insert(FRAME_HEADER, HeaderValue::from(self.count.to_string()));
        map.insert(
            headers::MSG_ID,
            HeaderValue::from(frame_id(
                self.count,
                &self.first_id,
                &self.last_id,
                self.ids_digest,
            )),
        );
        (map, Bytes::from(self.buf))
    }
}

/// FNV-1a, 64 bits: the digest of a frame's item ids. Stable across versions and machines, which
/// std's hasher is not promised to be; not a defence against anyone, only a name.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// The message id of a frame of `items` items from `first` to `last` (item ids, in frame order)
/// whose ids digest to `digest`: see the module's comment.
fn frame_id(items: usize, first: &str, last: &str, digest: u64) -> String {
    format!("[{items}:{first}..{last}:{digest:016x}]")
}

fn number_size(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

fn field_size(len: usize) -> usize {
    number_size(len) + len
}

fn write_number(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

fn write_field(out: &mut Vec<u8>, bytes: &[u8]) {
    write_number(out, bytes.len());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, payload: &str) -> (HeaderMap, Bytes) {
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, id);
        map.insert(headers::ORIGIN, "src");
        map.insert(headers::PATH, "src,a");
        (map, Bytes::from(payload.to_string()))
    }

    fn frame_of(items: &[(HeaderMap, Bytes)]) -> (HeaderMap, Bytes) {
        let mut writer = FrameWriter::new();
        for (h, p) in items {
            let before = writer.size();
            writer.push(h, p);
            assert_eq!(writer.size() - before, FrameWriter::encoded_size(h, p));
        }
        writer.finish()
    }

    #[test]
    fn items_come_back_with_their_own_headers_and_payloads() {
        let big = "x".repeat(300);
        let written = vec![
            item("src:1", "{\"a\":1}"),
            item("src:2", ""),
            item("src:3", &big),
        ];
        let (map, payload) = frame_of(&written);
        assert_eq!(map.get(FRAME_HEADER).unwrap().as_str(), "3");
        let read = items(Some(&map), &payload).unwrap().unwrap();
        assert_eq!(read.len(), 3);
        for (got, (h, p)) in read.iter().zip(&written) {
            assert_eq!(&got.payload, p);
            for name in [headers::MSG_ID, headers::ORIGIN, headers::PATH] {
                assert_eq!(got.headers.get(name), h.get(name));
            }
        }
    }

    /// Its id names what it holds: never an item's own id, nor that of a frame with other items.
    #[test]
    fn a_frame_is_named_by_its_items() {
        let id = |written: &[(HeaderMap, Bytes)]| {
            let (map, _) = frame_of(written);
            map.get(headers::MSG_ID).unwrap().as_str().to_string()
        };
        let three = id(&[
            item("src:12", "a"),
            item("src:13", "b"),
            item("src:14", "c"),
        ]);
        assert!(three.starts_with("[3:src:12..src:14:"), "{three}");
        let two = id(&[item("src:12", "a"), item("src:13", "b")]);
        assert_ne!(two, three);
        assert_ne!(two, "src:12");
        // Same length and ends, another item between.
        let other = id(&[
            item("src:12", "a"),
            item("src:15", "b"),
            item("src:14", "c"),
        ]);
        assert_ne!(other, three);
        assert_eq!(
            two,
            id(&[item("src:12", "a again"), item("src:13", "b again")]),
            "the same items make the same id, so a redelivery's frame is dropped as a duplicate"
        );
    }

    #[test]
    fn a_message_without_the_header_is_one_item() {
        assert!(items(None, &Bytes::from_static(b"plain")).is_none());
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, "x");
        assert!(items(Some(&map), &Bytes::from_static(b"plain")).is_none());
    }

    #[test]
    fn a_damaged_frame_is_an_error_that_says_what_is_wrong() {
        let (map, payload) = frame_of(&[item("a", "one"), item("b", "two")]);
        for cut in 0..payload.len() {
            let err = decode(&payload.slice(..cut), 2).unwrap_err();
            assert!(matches!(err, FrameError::Truncated(_, 2)), "{cut}: {err}");
        }
        assert_eq!(
            decode(&payload, 1).unwrap_err(),
            FrameError::Trailing(
                payload.len() - 1 - FrameWriter::encoded_size(&item("a", "one").0, b"one")
            )
        );
        let mut other = payload.to_vec();
        other[0] = 9;
        assert_eq!(
            decode(&Bytes::from(other), 2).unwrap_err(),
            FrameError::Format(9)
        );
        let mut bad_count = map.clone();
        bad_count.insert(FRAME_HEADER, "two");
        assert_eq!(
            items(Some(&bad_count), &payload).unwrap().unwrap_err(),
            FrameError::Count("two".into())
        );
        // A huge claimed count is refused when the bytes run out, not allocated.
        assert!(decode(&payload, usize::MAX).is_err());
        // A header value with a line break (found by fuzzing: it panicked in the NATS client).
        let broken = Bytes::from_static(&[1, 1, 1, b'a', 2, b'x', b'\n', 0]);
        assert_eq!(decode(&broken, 1).unwrap_err(), FrameError::NotText(1));
    }

    #[test]
    fn lengths_take_as_many_bytes_as_they_need() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 40] {
            let mut out = Vec::new();
            write_number(&mut out, n);
            assert_eq!(out.len(), number_size(n), "{n}");
            let bytes = Bytes::from(out);
            let mut reader = Reader {
                bytes: &bytes,
                at: 0,
            };
            assert_eq!(reader.number(), Some(n));
        }
    }
}
