//! Any text as a Pipeline manifest: parsed, checked and planned as `switchyard plan` does, with no
//! panic, and the same plan twice. `scripts/fuzz` runs it with a 1 s limit per input of up to 3 MiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_operator::plan::{plan, render, Only, PlanSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pipeline) = switchyard_crds::validate::parse_pipeline(text) else {
        return;
    };
    let settings = PlanSettings::default();
    let Ok(first) = plan(&pipeline, &settings) else {
        return;
    };
    let again = plan(&pipeline, &settings).expect("a plan that succeeded once succeeds again");
    let rendered = render(&first, Only::All).expect("a plan renders");
    assert_eq!(
        rendered,
        render(&again, Only::All).expect("a plan renders"),
        "the plan is a pure function of the file"
    );
});
