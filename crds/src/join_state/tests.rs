use super::*;
use serde_json::json;

fn branches() -> Vec<String> {
    vec!["price".into(), "stock".into(), "reviews".into()]
}

fn ancestry() -> Ancestry {
    Ancestry {
        origin: "orders".into(),
        origin_seq: "7".into(),
        path: "orders".into(),
        ..Ancestry::default()
    }
}

fn part(branch: &str, outputs: Vec<Value>) -> Arrival {
    Arrival::Part {
        branch: branch.into(),
        outputs,
    }
}

fn written(decision: Decision) -> Entry {
    match decision {
        Decision::Write(entry) => entry,
        other => panic!("expected a write, got {other:?}"),
    }
}

/// Applies the arrivals in order, as the bucket would keep what each decides.
fn after(arrivals: Vec<Arrival>, now_ms: u64) -> (Found, Decision) {
    let mut found = Found::Nothing;
    let mut last = Decision::Skip(Skipped::Duplicate);
    for arrival in arrivals {
        last = arrive(found.clone(), arrival, &ancestry(), &branches(), now_ms);
        found = match &last {
            Decision::Write(e) | Decision::Fail(e) | Decision::Close(e) => Found::Entry(e.clone()),
            Decision::Complete(_) => Found::Finished,
            Decision::Skip(_) => found,
        };
    }
    (found, last)
}

#[test]
fn the_last_part_completes_the_item_whatever_the_order() {
    let parts = || {
        vec![
            part("reviews", vec![json!(1), json!(2)]),
            part("price", vec![json!({"p": 3})]),
            part("stock", vec![]),
        ]
    };
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let mut all = parts();
        let arrivals: Vec<Arrival> = order
            .iter()
            .map(|&i| std::mem::replace(&mut all[i], part("x", vec![])))
            .collect();
        let (_, decision) = after(arrivals, 5);
        let Decision::Complete(entry) = decision else {
            panic!("not complete: {decision:?}");
        };
        assert_eq!(
            joined(&entry, &branches()),
            json!({"price": [{"p": 3}], "stock": [], "reviews": [1, 2]}),
            "each branch under its name, a filtering branch with nothing, a fanning one with all"
        );
    }
}

#[test]
fn a_part_delivered_again_is_stored_once_and_one_after_the_item_went_on_is_late() {
    let (found, decision) = after(
        vec![part("price", vec![json!(1)]), part("price", vec![json!(1)])],
        5,
    );
    assert_eq!(decision, Decision::Skip(Skipped::Duplicate));
    let Found::Entry(entry) = found else { panic!() };
    assert_eq!(entry.parts.len(), 1);
    assert_eq!(
        arrive(
            Found::Finished,
            part("price", vec![]),
            &ancestry(),
            &branches(),
            9
        ),
        Decision::Skip(Skipped::Late)
    );
}

#[test]
fn a_branch_failure_fails_the_item_at_once_and_later_parts_are_kept_for_its_replay() {
    let (found, decision) = after(
        vec![
            part("price", vec![json!(1)]),
            Arrival::Failure {
                branch: "stock".into(),
                error: "boom".into(),
            },
        ],
        5,
    );
    let Decision::Fail(entry) = decision else {
        panic!("{decision:?}")
    };
    assert_eq!(
        entry.state,
        State::Failed {
            letter_stored: false
        }
    );
    let reason = failure_reason(&entry, "answer", &branches(), 30_000);
    assert!(
        reason.contains("branch `stock` dead-lettered the item (boom)"),
        "{reason}"
    );
    assert!(
        reason.contains("arrived: price; missing: stock, reviews"),
        "{reason}"
    );
    let letter = joined(&entry, &branches());
    assert_eq!(
        letter,
        json!({"price": [1], "_missing": ["stock", "reviews"]})
    );
    // A late part is kept with the failed item, which does not complete by itself...
    let late = written(arrive(
        found,
        part("reviews", vec![json!(2)]),
        &ancestry(),
        &branches(),
        6,
    ));
    assert_eq!(
        late.state,
        State::Failed {
            letter_stored: false
        }
    );
    // ...nor with the failed branch's part, replayed...
    let replayed = written(arrive(
        Found::Entry(late),
        part("stock", vec![json!(3)]),
        &ancestry(),
        &branches(),
        7,
    ));
    // ...until its own letter is replayed: it waits again, and everything is there.
    let decision = arrive(
        Found::Entry(replayed),
        Arrival::Reopen {
            parts: parts_of_letter(&letter, &branches()),
        },
        &ancestry(),
        &branches(),
        8,
    );
    let Decision::Complete(entry) = decision else {
        panic!("{decision:?}")
    };
    assert_eq!(
        joined(&entry, &branches()),
        json!({"price": [1], "stock": [3], "reviews": [2]})
    );
}

#[test]
fn a_replayed_letter_of_an_item_the_bucket_forgot_waits_again_from_its_parts() {
    let letter = json!({"price": [1], "stock": [2], "_missing": ["reviews"]});
    let decision = arrive(
        Found::Nothing,
        Arrival::Reopen {
            parts: parts_of_letter(&letter, &branches()),
        },
        &ancestry(),
        &branches(),
        50,
    );
    let entry = written(decision);
    assert_eq!(entry.state, State::Waiting);
    assert_eq!(entry.since_ms, 50);
    assert_eq!(missing(&entry, &branches()), vec!["reviews"]);
}

#[test]
fn a_wait_times_out_into_a_dead_letter_or_goes_on_with_what_arrived() {
    let (Found::Entry(entry), _) = after(vec![part("stock", vec![json!(1)])], 1_000) else {
        panic!()
    };
    assert_eq!(
        expire(
            entry.clone(),
            &branches(),
            (OnTimeout::DeadLetter, 30_000),
            30_999
        ),
        None
    );
    let Some(Decision::Fail(failed)) = expire(
        entry.clone(),
        &branches(),
        (OnTimeout::DeadLetter, 30_000),
        31_000,
    ) else {
        panic!()
    };
    let reason = failure_reason(&failed, "answer", &branches(), 30_000);
    assert!(
        reason.contains("timed out after 30s waiting for price, reviews; arrived: stock"),
        "{reason}"
    );
    let Some(Decision::Close(closing)) =
        expire(entry, &branches(), (OnTimeout::Continue, 30_000), 31_000)
    else {
        panic!()
    };
    assert_eq!(
        joined(&closing, &branches()),
        json!({"stock": [1], "_missing": ["price", "reviews"]})
    );
    // A part that comes once the item is closing is late: it went on without it.
    assert_eq!(
        arrive(
            Found::Entry(closing.clone()),
            part("price", vec![]),
            &ancestry(),
            &branches(),
            31_001
        ),
        Decision::Skip(Skipped::Late)
    );
    // A replica that died half way: whoever finds the entry finishes the job.
    assert!(matches!(
        expire(closing, &branches(), (OnTimeout::Continue, 30_000), 0),
        Some(Decision::Close(_))
    ));
    assert!(matches!(
        expire(
            failed.clone(),
            &branches(),
            (OnTimeout::DeadLetter, 30_000),
            0
        ),
        Some(Decision::Fail(_))
    ));
    let mut stored = failed;
    stored.state = State::Failed {
        letter_stored: true,
    };
    assert_eq!(
        expire(
            stored,
            &branches(),
            (OnTimeout::DeadLetter, 30_000),
            u64::MAX
        ),
        None
    );
}

#[test]
fn entries_read_back_as_written() {
    let (Found::Entry(entry), _) = after(vec![part("stock", vec![json!({"n": 1})])], 3) else {
        panic!()
    };
    let json = serde_json::to_string(&entry).unwrap();
    assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), entry);
}

#[test]
fn the_part_that_completed_an_item_hands_it_on_again_and_any_other_is_late() {
    let (_, decision) = after(
        vec![
            part("price", vec![json!(1)]),
            part("stock", vec![json!(2)]),
            part("reviews", vec![]),
        ],
        5,
    );
    let Decision::Complete(finished) = decision else {
        panic!("{decision:?}")
    };
    assert_eq!(
        finished.state,
        State::Finished {
            by: "reviews".into()
        }
    );
    let again = arrive(
        Found::Entry(finished.clone()),
        part("reviews", vec![]),
        &ancestry(),
        &branches(),
        6,
    );
    assert_eq!(again, Decision::Complete(finished.clone()));
    assert_eq!(
        arrive(
            Found::Entry(finished.clone()),
            part("price", vec![json!(1)]),
            &ancestry(),
            &branches(),
            6
        ),
        Decision::Skip(Skipped::Late)
    );
    assert_eq!(
        expire(finished, &branches(), (OnTimeout::DeadLetter, 1), u64::MAX),
        None
    );
}

#[test]
fn an_item_that_misses_only_a_branch_an_edit_removed_goes_on_without_waiting_out_its_time() {
    let (Found::Entry(entry), _) = after(
        vec![part("price", vec![json!(1)]), part("stock", vec![json!(2)])],
        5,
    ) else {
        panic!()
    };
    let now: Vec<String> = vec!["price".into(), "stock".into()];
    let Some(Decision::Close(closing)) =
        expire(entry.clone(), &now, (OnTimeout::DeadLetter, 30_000), 6)
    else {
        panic!()
    };
    assert_eq!(joined(&closing, &now), json!({"price": [1], "stock": [2]}));
    assert_eq!(
        expire(entry, &branches(), (OnTimeout::DeadLetter, 30_000), 6),
        None
    );
}
