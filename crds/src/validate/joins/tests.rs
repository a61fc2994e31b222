use crate::validate::tests::assert_has;
use crate::validate::{analyze, parse_pipeline};

const HEAD: &str = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  sources: [{name: orders, generator: {count: 3}}, {name: other, generator: {count: 3}}]\n  sinks: [{name: out, log: {}}]\n";

fn problems(stages: &str) -> Vec<String> {
    let text = format!("{HEAD}  stages:\n{stages}");
    let pipeline = parse_pipeline(&text).unwrap_or_else(|p| panic!("{p}"));
    match analyze(&pipeline) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
    }
}

const BRANCHES: &str = "    - {name: price, inputs: [orders], jq: '.'}\n    - {name: stock, inputs: [orders], jq: '.'}\n";

#[test]
fn a_join_of_branches_of_one_fork_is_wired_to_them_and_they_to_it() {
    let text = format!("{HEAD}  stages:\n{BRANCHES}    - {{name: answer, join: {{of: [price, stock], timeout: 5s}}, jq: '.'}}\n");
    let pipeline = parse_pipeline(&text).unwrap();
    let topology = analyze(&pipeline).unwrap_or_else(|p| panic!("{p:?}"));
    let answer = topology.unit("answer").unwrap();
    assert_eq!(answer.inputs, vec!["price", "stock"]);
    assert!(answer.join.is_some());
    for branch in ["price", "stock"] {
        assert_eq!(
            topology.unit(branch).unwrap().branch_of.as_deref(),
            Some("answer")
        );
    }
    let layout = crate::layout::layout(&topology, &pipeline.spec).unwrap();
    let config = layout.units.iter().find(|u| u.unit == "answer").unwrap();
    let join = config.join.as_ref().unwrap();
    assert_eq!(join.timeout_ms, 5000);
    assert_eq!(join.branches.len(), 2);
    assert_eq!(
        layout.nats.join_bucket.as_deref(),
        Some("switchyard_default_p_joins")
    );
    let price = layout.units.iter().find(|u| u.unit == "price").unwrap();
    assert_eq!(
        price.branch.as_ref().map(|b| b.join.as_str()),
        Some("answer")
    );
}

#[test]
fn what_a_join_names_is_checked_by_stage_path() {
    let found = problems(&format!(
        "{BRANCHES}    - {{name: answer, inputs: [price], join: {{of: [price, answer, nothing, orders, price], timeout: soon}}, jq: '.'}}\n"
    ));
    let at = "stages[2] answer";
    assert_has(&found, at, "remove `inputs`");
    assert_has(&found, at, "the join names itself");
    assert_has(&found, at, "`nothing`, which is no top-level stage");
    assert_has(&found, at, "`orders` is a source");
    assert_has(&found, at, "names `price` twice");
    assert_has(&found, at, "join.timeout");
    let found = problems(&format!(
        "{BRANCHES}    - {{name: answer, join: {{of: [price, stock]}}, switcher: {{minReplicas: 0}}, jq: '.'}}\n"
    ));
    assert_has(&found, "stages[2] answer", "minReplicas to at least 1");
    let found = problems(
        "    - {name: price, jq: '.'}\n    - {name: answer, join: {of: [price]}, jq: '.'}\n",
    );
    assert_has(&found, "stages[1] answer", "at least two branches");
}

#[test]
fn branches_must_fork_from_the_same_items() {
    let found = problems(
        "    - {name: price, inputs: [orders], jq: '.'}\n    - {name: stock, inputs: [other], jq: '.'}\n    - {name: answer, join: {of: [price, stock]}, jq: '.'}\n",
    );
    assert_has(&found, "stages[2] answer", "must read the same inputs");
    assert_has(&found, "stages[2] answer", "`stock` reads other");
}

#[test]
fn a_join_cannot_wait_for_its_own_output() {
    let found = problems(
        "    - {name: price, inputs: [orders, answer], jq: '.'}\n    - {name: stock, inputs: [orders, answer], jq: '.'}\n    - {name: answer, join: {of: [price, stock]}, jq: '.'}\n",
    );
    assert_has(&found, "stages[", "inputs form a cycle");
}

#[test]
fn only_the_join_reads_a_branch_which_runs_as_one_unit() {
    // `stock` without inputs would read `price`, the stage before it.
    let found = problems(
        "    - {name: price, inputs: [orders], jq: '.'}\n    - {name: stock, jq: '.'}\n    - {name: answer, join: {of: [price, stock]}, jq: '.'}\n",
    );
    assert_has(&found, "stages[2] answer", "`stock` reads price");
    // A sink without inputs reads the last stage.
    let found = problems(BRANCHES);
    assert!(found.is_empty(), "{found:?}");
    let found = problems(&format!(
        "    - {{name: answer, join: {{of: [price, stock]}}, jq: '.'}}\n{BRANCHES}"
    ));
    assert_has(
        &found,
        "sinks[0] out",
        "reads `stock`, a branch of join `answer`",
    );
    let found = problems(&format!(
        "{BRANCHES}    - {{name: answer, join: {{of: [price, stock]}}, jq: '.'}}\n    - {{name: tap, inputs: [stock], jq: '.'}}\n"
    ));
    assert_has(
        &found,
        "stages[3] tap",
        "reads `stock`, a branch of join `answer`",
    );
    let found = problems(
        "    - {name: price, inputs: [orders], stages: [{name: a, jq: '.'}, {name: slow, switcher: {}, jq: '.'}]}\n    - {name: stock, inputs: [orders], jq: '.'}\n    - {name: answer, join: {of: [price, stock]}, jq: '.'}\n",
    );
    assert_has(
        &found,
        "stages[2] answer",
        "branch `price` runs as several units",
    );
}

#[test]
fn a_join_is_a_top_level_stage_and_no_branch_of_another() {
    let found = problems(&format!(
        "{BRANCHES}    - {{name: answer, join: {{of: [price, stock]}}, stages: [{{name: inner, join: {{of: [price, stock]}}, jq: '.'}}]}}\n    - {{name: again, join: {{of: [price, answer]}}, jq: '.'}}\n"
    ));
    assert_has(
        &found,
        "stages[2] answer > stages[0] inner",
        "join works on a top-level stage",
    );
    assert_has(
        &found,
        "stages[3] again",
        "`price` is already a branch of join `answer`",
    );
    assert_has(&found, "stages[3] again", "`answer` is a join itself");
}

#[test]
fn a_join_does_not_account_for_rows_followed_to_their_end_yet() {
    let text = format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  sources: [{{name: orders, postgres: {{connection: {{urlFrom: {{env: DB}}}}, table: jobs, key: id}}}}]\n  sinks: [{{name: out, log: {{}}}}]\n  stages:\n{BRANCHES}    - {{name: answer, join: {{of: [price, stock]}}, jq: '.'}}\n"
    );
    let pipeline = parse_pipeline(&text).unwrap_or_else(|p| panic!("{p}"));
    let found: Vec<String> = match analyze(&pipeline) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
    };
    assert_has(&found, "stages[2] answer", "completeOn: publish");
}
