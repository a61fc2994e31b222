//! Any line on an exec handler's stdout: a reply, a blank, or a line that is explained (never a
//! panic), and what a person is shown of it is at most 200 characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_stage::steps::{parse_reply, shown, ReplyOf};

fuzz_target!(|line: &[u8]| {
    match parse_reply(line) {
        ReplyOf::Blank => assert!(line.iter().all(u8::is_ascii_whitespace)),
        ReplyOf::Answer {
            result: Ok(outputs),
            ..
        } => {
            for output in outputs {
                // Each output is a JSON value as the handler wrote it.
                let bytes = output.into_bytes();
                assert!(switchyard_stage::payload::is_json(&bytes), "{bytes:?}");
            }
        }
        ReplyOf::Answer { result: Err(_), .. } | ReplyOf::Malformed { .. } => {}
        ReplyOf::NotAReply(why) => assert!(!why.is_empty()),
    }
    assert!(shown(line).chars().count() <= 200);
});
