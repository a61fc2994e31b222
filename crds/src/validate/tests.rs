use super::*;

fn check(text: &str) -> Result<Topology, Vec<Problem>> {
    let pipeline = parse_pipeline(text).map_err(|p| vec![p])?;
    analyze(&pipeline)
}

fn problems(text: &str) -> Vec<String> {
    match check(text) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
    }
}

pub(super) fn assert_has(problems: &[String], path: &str, words: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(path) && p.contains(words)),
        "expected a problem at `{path}` saying `{words}`, got:\n{}",
        problems.join("\n")
    );
}

const HEAD: &str = "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\n";

fn spec(body: &str) -> String {
    format!("{HEAD}spec:\n{body}")
}

const SOURCE_AND_SINK: &str =
    "  sources: [{name: src, generator: {count: 3}}]\n  sinks: [{name: out, log: {}}]\n";

#[test]
fn every_example_is_valid() {
    for (name, text) in [
        ("laundry", include_str!("../../../examples/laundry.yaml")),
        (
            "quadratic",
            include_str!("../../../examples/quadratic.yaml"),
        ),
        (
            "exec-python",
            include_str!("../../../examples/exec-python.yaml"),
        ),
        (
            "exec-ruby",
            include_str!("../../../examples/exec-ruby.yaml"),
        ),
        (
            "odd-numbers",
            include_str!("../../../examples/odd-numbers.yaml"),
        ),
        (
            "fan-out-join",
            include_str!("../../../examples/fan-out-join.yaml"),
        ),
    ] {
        if let Err(problems) = check(text) {
            panic!("{name}: {problems:?}");
        }
    }
}

#[test]
fn laundry_has_one_unit_per_top_level_stage() {
    let topology = check(include_str!("../../../examples/laundry.yaml")).unwrap();
    let units: Vec<(&str, Vec<&str>)> = topology
        .units
        .iter()
        .map(|u| {
            (
                u.name.as_str(),
                u.steps.iter().map(|s| s.path.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        units,
        vec![
            ("clothes", vec![]),
            (
                "person",
                vec!["person > wear", "person > check-pockets", "person > basket"]
            ),
            ("machines", vec!["machines > wash", "machines > dry"]),
            (
                "another-person",
                vec!["another-person > fold", "another-person > store"]
            ),
            ("closet", vec![]),
        ]
    );
    let inputs = |name: &str| topology.unit(name).unwrap().inputs.clone();
    assert_eq!(inputs("person"), vec!["clothes"]);
    assert_eq!(inputs("machines"), vec!["person"]);
    assert_eq!(inputs("closet"), vec!["another-person"]);
    assert!(topology.unit("machines").unwrap().switcher.is_some());
    // Settings of a step reach it from the step itself.
    let wash = &topology.unit("machines").unwrap().steps[0];
    assert_eq!(wash.timeout.as_deref(), Some("30s"));
    assert_eq!(wash.retry.as_ref().map(|r| r.max_attempts), Some(5));
}

#[test]
fn a_nested_switcher_splits_its_group() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: g\n      timeout: 2s\n      stages:\n        - {{name: a, passthrough: {{}}}}\n        - name: s\n          switcher: {{maxReplicas: 3}}\n          stages:\n            - {{name: b, sleep: 1ms}}\n        - {{name: c, jq: '.'}}\n"
    ));
    let topology = check(&text).unwrap();
    let names: Vec<&str> = topology.units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, vec!["src", "g", "g-s", "g-after-s", "out"]);
    assert_eq!(topology.unit("g-s").unwrap().inputs, vec!["g"]);
    assert_eq!(topology.unit("g-after-s").unwrap().inputs, vec!["g-s"]);
    assert_eq!(topology.unit("out").unwrap().inputs, vec!["g-after-s"]);
    assert_eq!(topology.unit("g-s").unwrap().steps[0].path, "g > s > b");
    // The group's timeout is inherited by steps in every unit it was split into.
    assert_eq!(
        topology.unit("g-after-s").unwrap().steps[0]
            .timeout
            .as_deref(),
        Some("2s")
    );
    assert_eq!(
        topology
            .unit("g-s")
            .unwrap()
            .switcher
            .as_ref()
            .map(|s| s.max_replicas),
        Some(3)
    );
}

#[test]
fn fan_out_and_fan_in_resolve_to_units() {
    let text = spec(
        "  sources: [{name: a, generator: {count: 1}}, {name: b, generator: {count: 1}}]\n  stages:\n    - {name: both, passthrough: {}}\n    - {name: left, inputs: [both], jq: '.'}\n    - {name: right, inputs: [both], jq: '.'}\n    - {name: join, inputs: [left, right], passthrough: {}}\n  sinks: [{name: out, log: {}}, {name: raw, inputs: [a], log: {}}]\n",
    );
    let topology = check(&text).unwrap();
    let inputs = |name: &str| topology.unit(name).unwrap().inputs.clone();
    assert_eq!(inputs("both"), vec!["a", "b"]);
    assert_eq!(inputs("left"), vec!["both"]);
    assert_eq!(inputs("right"), vec!["both"]);
    assert_eq!(inputs("join"), vec!["left", "right"]);
    assert_eq!(inputs("out"), vec!["join"]);
    assert_eq!(inputs("raw"), vec!["a"]);
    let order: Vec<&str> = topology
        .topological_order()
        .iter()
        .map(|u| u.name.as_str())
        .collect();
    assert!(order.iter().position(|n| *n == "join") > order.iter().position(|n| *n == "right"));
}

#[test]
fn yaml_syntax_errors_give_the_line() {
    let err = parse_pipeline(&format!("{HEAD}spec:\n  sources: [\n  stages: {{")).unwrap_err();
    assert!(err.line.is_some(), "{err:?}");
}

#[test]
fn type_errors_give_the_line() {
    let text = spec("  sources:\n    - name: src\n      generator: {count: many}\n  stages: []\n");
    let err = parse_pipeline(&text).unwrap_err();
    assert_eq!(err.line, Some(7), "{err}");
    assert!(err.message.contains("invalid type"), "{err}");
}

#[test]
fn unknown_fields_are_errors_with_the_line() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: a\n      passthrough: {{}}\n      retires: 3\n"
    ));
    let err = parse_pipeline(&text).unwrap_err();
    assert_eq!(err.line, Some(10), "{err}");
    assert!(err.message.contains("retires"), "{err}");
}

#[test]
fn wrong_kind_is_explained() {
    let err = parse_pipeline("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err();
    assert!(err.message.contains("kind: Pipeline"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once_with_its_stage_path() {
    let text = spec(
        "  sources: [{name: src, generator: {count: 3}}]
  sinks: [{name: out, log: {}}]
  stages:
    - name: a
      stages:
        - {name: ok, passthrough: {}}
        - {name: nothing}
        - {name: two, jq: '.', sleep: 5ms}
        - {name: badjq, jq: '. + {'}
        - {name: noexec, exec: {command: []}}
        - {name: slow, sleep: five}
        - {name: late, passthrough: {}, timeout: soon}
    - name: machines
      switcher: {minReplicas: 5, maxReplicas: 2}
      stages:
        - {name: wash, passthrough: {}}
    - name: zero
      switcher: {minReplicas: 0, maxReplicas: 0}
      batch: {size: 0}
      passthrough: {}
    - name: Bad_Name
      passthrough: {}
    - name: a
      passthrough: {}
    - name: lost
      inputs: [nowhere]
      passthrough: {}
",
    );
    let found = problems(&text);
    assert_has(&found, "stages[0] a > stages[1] nothing", "no kind");
    assert_has(&found, "stages[0] a > stages[2] two", "`jq` and `sleep`");
    assert_has(&found, "stages[0] a > stages[3] badjq", "does not compile");
    assert_has(
        &found,
        "stages[0] a > stages[4] noexec",
        "exec.command is empty",
    );
    assert_has(&found, "stages[0] a > stages[5] slow", "not a duration");
    assert_has(&found, "stages[0] a > stages[6] late", "timeout");
    assert_has(
        &found,
        "stages[1] machines",
        "minReplicas (5) is greater than maxReplicas (2)",
    );
    assert_has(&found, "stages[2] zero", "maxReplicas must be at least 1");
    assert_has(&found, "stages[2] zero", "batch.size must be at least 1");
    assert_has(&found, "stages[3] Bad_Name", "not a valid name");
    assert_has(&found, "stages[4] a", "already used by stages[0] a");
    assert_has(
        &found,
        "stages[5] lost",
        "`nowhere`, which is no source or top-level stage",
    );
    assert!(found.len() >= 12, "{found:#?}");
}

#[test]
fn duplicate_names_inside_a_group_are_found() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: g\n      stages:\n        - {{name: x, passthrough: {{}}}}\n        - {{name: x, passthrough: {{}}}}\n"
    ));
    assert_has(
        &problems(&text),
        "stages[0] g > stages[1] x",
        "already named `x`",
    );
}

#[test]
fn cycles_are_found_and_named() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - {{name: a, inputs: [c], passthrough: {{}}}}\n    - {{name: b, inputs: [a], passthrough: {{}}}}\n    - {{name: c, inputs: [b], passthrough: {{}}}}\n"
    ));
    let found = problems(&text);
    assert_has(&found, "stages[0] a", "cycle: a -> c -> b -> a");
    assert_eq!(
        found.iter().filter(|p| p.contains("cycle")).count(),
        1,
        "{found:?}"
    );
}

#[test]
fn a_stage_reading_itself_is_a_problem() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - {{name: a, inputs: [a], passthrough: {{}}}}\n"
    ));
    assert_has(&problems(&text), "stages[0] a", "names itself");
}

#[test]
fn object_names_longer_than_kubernetes_allows_are_found() {
    let long = "a".repeat(40);
    let text = format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {long}}}\nspec:\n{SOURCE_AND_SINK}  stages:\n    - {{name: {long}, passthrough: {{}}}}\n"
    );
    assert_has(
        &problems(&text),
        &format!("stages[0] {long}"),
        "Kubernetes allows 63",
    );
}

#[test]
fn units_made_by_splitting_must_not_clash_with_stages() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: g\n      stages:\n        - name: s\n          switcher: {{}}\n          passthrough: {{}}\n    - {{name: g-s, passthrough: {{}}}}\n"
    ));
    assert_has(&problems(&text), "stages[1] g-s", "unit named `g-s`");
}

#[test]
fn sources_and_sinks_are_checked() {
    let text = spec(
        "  sources:\n    - {name: none}\n    - {name: t, timer: {interval: often}}\n    - {name: c, cron: {schedule: 'every day'}}\n  stages: [{name: a, passthrough: {}}]\n  sinks:\n    - {name: n, nats: {subject: 'a.*'}}\n    - {name: h, http: {url: 'ftp://x'}}\n    - {name: two, log: {}, file: {path: x}}\n",
    );
    let found = problems(&text);
    assert_has(&found, "sources[0] none", "no kind");
    assert_has(&found, "sources[1] t", "timer.interval");
    assert_has(&found, "sources[2] c", "not a cron schedule");
    assert_has(&found, "sinks[0] n", "not a subject");
    assert_has(&found, "sinks[1] h", "http:// or https://");
    assert_has(&found, "sinks[2] two", "`file` and `log`");
}

#[test]
fn postgres_sinks_are_checked_before_anything_runs() {
    let text = spec(
        "  sources: [{name: src, generator: {count: 3}}]\n  stages: [{name: a, passthrough: {}}]\n  sinks:\n    - {name: secret, postgres: {connection: {url: 'postgres://app:hunter2@db/app'}, table: t, itemIdColumn: id}}\n    - {name: twice, postgres: {connection: {url: 'postgres://app@db/app', urlFrom: {env: DATABASE_URL}}, table: t, itemIdColumn: id}}\n    - {name: nokey, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: t, columns: {v: .v}}}\n    - {name: unwritten, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: 'x; drop', columns: {v: '.v |'}, conflict: {columns: [k]}}}\n    - {name: env, postgres: {connection: {url: 'postgres://app@db/app', password: {env: 'PG-PASS'}, statementTimeout: soon}, table: t, itemIdColumn: id}}\n    - {name: fine, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: app.results, columns: {value: .value, is_odd: .odd}, conflict: {columns: [value], action: update}}}\n",
    );
    let found = problems(&text);
    assert_has(&found, "sinks[0] secret", "holds a password");
    assert!(
        !found.iter().any(|p| p.contains("hunter2")),
        "a password in a problem: {found:?}"
    );
    assert_has(&found, "sinks[1] twice", "not both");
    assert_has(&found, "sinks[2] nokey", "what makes a row a repeat");
    assert_has(&found, "sinks[3] unwritten", "not a table's name");
    assert_has(&found, "sinks[3] unwritten", "does not compile");
    assert_has(
        &found,
        "sinks[3] unwritten",
        "`k` is not written by the sink",
    );
    assert_has(&found, "sinks[4] env", "password.env `PG-PASS`");
    assert_has(&found, "sinks[4] env", "statementTimeout");
    assert!(
        !found.iter().any(|p| p.starts_with("sinks[5]")),
        "{found:?}"
    );
}

#[test]
fn batch_and_concurrency_belong_to_units() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: g\n      stages:\n        - {{name: inner, passthrough: {{}}, batch: {{size: 3}}, concurrency: 2}}\n"
    ));
    let found = problems(&text);
    assert_has(
        &found,
        "stages[0] g > stages[0] inner",
        "batch works on a unit",
    );
    assert_has(
        &found,
        "stages[0] g > stages[0] inner",
        "concurrency applies to a unit",
    );
}

#[test]
fn problems_print_with_line_then_path() {
    let p = Problem {
        path: "stages[0] a".into(),
        message: "broken".into(),
        line: Some(4),
    };
    assert_eq!(p.to_string(), "line 4: stages[0] a: broken");
}

#[test]
fn stages_nest_no_deeper_and_no_wider_than_the_crd_holds() {
    // Level 4 may hold only steps: a group there would be cut off by the API server.
    let deep = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: a\n      stages:\n        - name: b\n          stages:\n            - name: c\n              stages:\n                - name: d\n                  stages: [{{name: e, passthrough: {{}}}}]\n"
    ));
    assert_has(
        &problems(&deep),
        "stages[0] a > stages[0] b > stages[0] c > stages[0] d",
        "stages nest at most 4 levels deep",
    );
    let steps: Vec<String> = (0..=crate::crd::MAX_STAGES_PER_GROUP)
        .map(|i| format!("{{name: s{i}, passthrough: {{}}}}"))
        .collect();
    let wide = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: a\n      stages:\n        - name: b\n          stages: [{}]\n",
        steps.join(", ")
    ));
    assert_has(
        &problems(&wide),
        "stages[0] a > stages[0] b",
        "a nested group holds at most 16",
    );
    let fine = spec(&format!(
        "{SOURCE_AND_SINK}  stages:\n    - name: a\n      stages:\n        - name: b\n          stages:\n            - name: c\n              stages: [{{name: d, passthrough: {{}}}}]\n"
    ));
    assert_eq!(problems(&fine), Vec::<String>::new());
}

#[test]
fn deep_nesting_is_refused_before_parsing_and_fast() {
    // 60,000 nested stages in flow style (1.3 MB): the YAML reader takes minutes over this (its cost grows with
    // the square of the depth); the check before it answers at once.
    let levels = 60_000;
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  stages: {}[{{name: b, passthrough: {{}}}}]{}\n",
        "[{name: a, stages: ".repeat(levels),
        "}]".repeat(levels)
    ));
    let started = std::time::Instant::now();
    let err = parse_pipeline(&text).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert!(err.message.contains("nest more than 128"), "{err}");
    assert_eq!(err.line, Some(7));
}

#[test]
fn brackets_in_quotes_and_comments_are_not_nesting() {
    let deep = "[".repeat(200);
    let text = spec(&format!(
        "{SOURCE_AND_SINK}  # {deep}\n  stages: [{{name: a, jq: '.x | \"{deep}\"'}}]\n"
    ));
    let problem = parse_pipeline(&text).err();
    assert!(problem.is_none(), "{problem:?}");
}

#[test]
fn a_manifest_over_the_object_limit_is_refused() {
    let text = spec(&format!(
        "{SOURCE_AND_SINK}# {}\n",
        "x".repeat(MAX_MANIFEST_BYTES)
    ));
    let err = parse_pipeline(&text).unwrap_err();
    assert!(err.message.contains("at most"), "{err}");
}

#[test]
fn redelivery_and_crash_limits_are_checked_and_reach_every_unit_that_reads() {
    let found = problems(&spec(&format!(
        "{SOURCE_AND_SINK}  nats: {{redeliverAfter: 300ms}}\n  deadLetter: {{afterCrashes: 0}}\n  stages: [{{name: a, passthrough: {{}}}}]\n"
    )));
    assert_has(&found, "nats.redeliverAfter", "out of range: give 1s to 1m");
    assert_has(&found, "deadLetter.afterCrashes", "give 1 to 100 crashes");
    let found = problems(&spec(&format!(
        "{SOURCE_AND_SINK}  nats: {{redeliverAfter: soon}}\n  stages: [{{name: a, passthrough: {{}}}}]\n"
    )));
    assert_has(&found, "nats.redeliverAfter", "soon");

    let text = spec(&format!(
        "{SOURCE_AND_SINK}  nats: {{redeliverAfter: 2s}}\n  deadLetter: {{afterCrashes: 3}}\n  stages: [{{name: a, passthrough: {{}}}}]\n"
    ));
    let pipeline = parse_pipeline(&text).unwrap();
    let topology = analyze(&pipeline).unwrap();
    let laid = crate::layout::layout(&topology, &pipeline.spec).unwrap();
    for unit in &laid.units {
        match &unit.input {
            Some(input) => {
                assert_eq!(input.ack_wait_ms, 2000, "{}", unit.unit);
                let crashes = unit
                    .crashes
                    .as_ref()
                    .expect("a unit that reads records crashes");
                assert_eq!(crashes.dead_letter_after, 3);
                assert_eq!(crashes.bucket, laid.nats.checkpoint_bucket);
            }
            None => assert_eq!(unit.crashes, None, "{}", unit.unit),
        }
    }
    assert!(laid.nats.consumers.iter().all(|c| c.ack_wait_ms == 2000));

    let defaults = parse_pipeline(&spec(&format!(
        "{SOURCE_AND_SINK}  stages: [{{name: a, passthrough: {{}}}}]\n"
    )))
    .unwrap();
    let laid = crate::layout::layout(&analyze(&defaults).unwrap(), &defaults.spec).unwrap();
    let reader = laid.units.iter().find(|u| u.input.is_some()).unwrap();
    assert_eq!(reader.input.as_ref().unwrap().ack_wait_ms, 10_000);
    assert_eq!(reader.crashes.as_ref().unwrap().dead_letter_after, 10);
}

#[test]
fn a_source_that_follows_its_jobs_makes_every_unit_account_for_them_and_know_its_readers() {
    let text = spec(
        "  sources:\n    - {name: rows, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: numbers, key: value, endWhenEmpty: true}}\n    - {name: ticks, generator: {count: 3}}\n  stages:\n    - {name: work, inputs: [rows, ticks], passthrough: {}}\n  sinks:\n    - {name: db, inputs: [work], log: {}}\n    - {name: audit, inputs: [work], log: {}}\n",
    );
    let pipeline = parse_pipeline(&text).unwrap();
    let laid = crate::layout::layout(&analyze(&pipeline).unwrap(), &pipeline.spec).unwrap();
    let jobs = laid.nats.jobs.as_ref().expect("a jobs stream");
    assert_eq!(jobs.name, "switchyard_default_p_jobs");
    let unit = |name: &str| laid.units.iter().find(|u| u.unit == name).unwrap();
    for u in &laid.units {
        assert_eq!(
            u.jobs.as_ref().unwrap().sources,
            vec!["rows".to_string()],
            "{}",
            u.unit
        );
    }
    assert_eq!(unit("rows").output_readers, vec!["work".to_string()]);
    let mut readers = unit("work").output_readers.clone();
    readers.sort();
    assert_eq!(readers, vec!["audit".to_string(), "db".to_string()]);
    assert!(unit("db").output_readers.is_empty());

    // Rows completed once stored: nobody follows them, nothing changes for anyone.
    let published = parse_pipeline(&text.replace(
        "endWhenEmpty: true",
        "endWhenEmpty: true, completeOn: publish",
    ))
    .unwrap();
    let laid = crate::layout::layout(&analyze(&published).unwrap(), &published.spec).unwrap();
    assert!(laid.nats.jobs.is_none());
    assert!(laid
        .units
        .iter()
        .all(|u| u.jobs.is_none() && u.output_readers.is_empty()));
}

#[test]
fn postgres_sources_are_checked_before_anything_runs() {
    let text = spec(
        "  sources:\n    - {name: both, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: t, key: id, columns: [a], itemColumn: body}}\n    - {name: outcome, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: t, key: success, outcome: {error: reservation_id}, lease: never, maxAttempts: 0}}\n    - {name: filter, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: 't;', key: id, where: 'true; drop table t', notifyChannel: 'new-rows'}}\n    - {name: fine, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: jobs, key: id, columns: [id, payload], where: \"kind = 'odd'\", lease: 5m, completeOn: publish, endWhenEmpty: true}}\n  stages: [{name: a, passthrough: {}}]\n  sinks: [{name: out, log: {}}]\n",
    );
    let found = problems(&text);
    assert_has(&found, "sources[0] both", "not both");
    assert_has(&found, "sources[1] outcome", "`success` is the key");
    assert_has(
        &found,
        "sources[1] outcome",
        "`reservation_id` is named twice",
    );
    assert_has(&found, "sources[1] outcome", "postgres.lease");
    assert_has(
        &found,
        "sources[1] outcome",
        "maxAttempts must be at least 1",
    );
    assert_has(&found, "sources[2] filter", "not a table's name");
    assert_has(&found, "sources[2] filter", "without `;`");
    assert_has(&found, "sources[2] filter", "notifyChannel `new-rows`");
    assert!(
        !found.iter().any(|p| p.starts_with("sources[3]")),
        "{found:?}"
    );
}

#[test]
fn a_following_source_refuses_the_settings_of_claims_and_needs_no_outcome_columns() {
    let text = spec(
        "  sources:\n    - {name: claims, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: t, key: id, follow: {column: 'updated at', delay: soon}, lease: 5m, completeOn: publish, outcome: {success: done}}}\n    - {name: fine, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: events, key: success, follow: {column: updated_at, delay: 5s}, endWhenEmpty: true}}\n  stages: [{name: a, passthrough: {}}]\n  sinks: [{name: out, log: {}}]\n",
    );
    let found = problems(&text);
    for field in ["postgres.lease", "postgres.completeOn", "postgres.outcome"] {
        assert_has(
            &found,
            "sources[0] claims",
            &format!("{field} belongs to claimed rows"),
        );
    }
    assert_has(&found, "sources[0] claims", "follow.column: `updated at`");
    assert_has(&found, "sources[0] claims", "postgres.follow.delay");
    // `success` may be a following source's key: it writes no outcome.
    assert!(
        !found.iter().any(|p| p.starts_with("sources[1]")),
        "{found:?}"
    );
    // And nobody accounts for its items.
    let fine = parse_pipeline(&spec(
        "  sources:\n    - {name: fine, postgres: {connection: {urlFrom: {env: DATABASE_URL}}, table: events, key: id, follow: {}}}\n  stages: [{name: a, passthrough: {}}]\n  sinks: [{name: out, log: {}}]\n",
    ))
    .unwrap();
    let laid = crate::layout::layout(&analyze(&fine).unwrap(), &fine.spec).unwrap();
    assert!(laid.nats.jobs.is_none());
}
