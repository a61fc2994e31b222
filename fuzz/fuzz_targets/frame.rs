//! Any payload a message that says it is a frame may carry (anyone who may publish to a Pipeline's
//! subjects can write one): its items, or an error that says what is wrong (never a panic, never an
//! allocation the bytes do not pay for), and items read back as they were written.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_platform::frame::{decode, FrameWriter};

fuzz_target!(|data: &[u8]| {
    // The first two bytes are the count the frame's header claims; the rest is its payload.
    let Some((count, payload)) = data.split_first_chunk::<2>() else {
        return;
    };
    let count = usize::from(u16::from_le_bytes(*count));
    let Ok(items) = decode(&Bytes::copy_from_slice(payload), count) else {
        return;
    };
    assert_eq!(items.len(), count);
    let mut writer = FrameWriter::new();
    for item in &items {
        writer.push(&item.headers, &item.payload);
    }
    let (_, again) = writer.finish();
    assert_eq!(decode(&again, count).unwrap(), items);
});
