use std::collections::VecDeque;

use super::*;
use crate::layout::layout;
use crate::validate::{analyze, parse_pipeline};

/// The units of a Pipeline `p` in namespace `ns` with this spec.
fn states(spec: &str) -> Vec<UnitState> {
    let text = format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}"
    );
    let pipeline = parse_pipeline(&text).unwrap_or_else(|e| panic!("{e}"));
    let topology = analyze(&pipeline).unwrap_or_else(|e| panic!("{e:?}"));
    let layout = layout(&topology, &pipeline.spec).unwrap_or_else(|e| panic!("{e:?}"));
    unit_states(&topology, &layout)
}

fn data(unit: &str) -> String {
    format!("switchyard.ns.p.data.{unit}")
}

fn consumer(migration: &Migration, unit: &str) -> Vec<String> {
    migration
        .target
        .iter()
        .find(|u| u.config.unit == unit)
        .and_then(|u| u.config.input.as_ref())
        .map(|i| i.filter_subjects.clone())
        .unwrap_or_default()
}

fn printed(migration: &Migration) -> Vec<String> {
    migration.steps.iter().map(|s| s.to_string()).collect()
}

const LINE: &str = "  sources: [{name: gen, generator: {count: 1}}]
  stages:
    - {name: a, jq: '.a = 1'}
    - {name: b, jq: '.b = 1'}
  sinks: [{name: out, log: {}}]
";

const INSERTED: &str = "  sources: [{name: gen, generator: {count: 1}}]
  stages:
    - {name: a, jq: '.a = 1'}
    - {name: ins, jq: '.ins = 1'}
    - {name: b, jq: '.b = 1'}
  sinks: [{name: out, log: {}}]
";

#[test]
fn nothing_changed_is_nothing_to_do() {
    let running = states(LINE);
    let migration = plan(&running, &states(LINE), Policy::default());
    assert!(migration.is_empty(), "{:#?}", migration.steps);
    assert_eq!(migration.target, running);
}

#[test]
fn a_stage_inserted_between_two_gets_its_consumer_before_its_publisher_moves_to_it() {
    let migration = plan(&states(LINE), &states(INSERTED), Policy::default());
    assert_eq!(
        printed(&migration),
        [
            format!("consumer ins reads {}_1", data("a")),
            format!("consumer b reads {}, {}", data("ins"), data("a")),
            "start ins".to_string(),
            format!("roll a (publishes to {}_1 from now on)", data("a")),
            "roll b (its input)".to_string(),
            format!("wait until b have read {} to its end", data("a")),
            format!("consumer b reads {}", data("ins")),
        ]
    );
    assert_eq!(consumer(&migration, "b"), [data("ins")]);
    assert!(migration.discards.is_empty());
}

#[test]
fn a_stage_removed_is_drained_after_its_publisher_moved_and_before_it_goes() {
    let migration = plan(&states(INSERTED), &states(LINE), Policy::default());
    assert_eq!(
        printed(&migration),
        [
            format!("consumer b reads {}_1, {}", data("a"), data("ins")),
            format!("roll a (publishes to {}_1 from now on)", data("a")),
            "roll b (its input)".to_string(),
            "drain ins: wait until its queue is empty".to_string(),
            "remove ins and its consumer".to_string(),
            format!("wait until b have read {} to its end", data("ins")),
            format!("consumer b reads {}_1", data("a")),
        ]
    );
}

#[test]
fn a_rename_is_a_new_unit_and_the_drain_of_the_old_one() {
    let renamed = LINE.replace("name: b,", "name: bee,");
    let migration = plan(&states(LINE), &states(&renamed), Policy::default());
    let steps = printed(&migration);
    assert_eq!(
        steps,
        [
            format!("consumer bee reads {}_1", data("a")),
            format!("consumer out reads {}, {}", data("bee"), data("b")),
            "start bee".to_string(),
            format!("roll a (publishes to {}_1 from now on)", data("a")),
            "roll out (its input)".to_string(),
            "drain b: wait until its queue is empty".to_string(),
            "remove b and its consumer".to_string(),
            format!("wait until out have read {} to its end", data("b")),
            format!("consumer out reads {}", data("bee")),
        ]
    );
}

#[test]
fn changed_steps_roll_the_unit_and_nothing_else() {
    let changed = LINE.replace(".b = 1", ".b = 2");
    let migration = plan(&states(LINE), &states(&changed), Policy::default());
    assert_eq!(printed(&migration), ["roll b (its steps)"]);
    assert!(!migration.is_stepwise(), "applied at once, as any spec");
    let inserted = plan(&states(LINE), &states(INSERTED), Policy::default());
    assert!(inserted.is_stepwise());
}

#[test]
fn pod_settings_roll_and_switcher_bounds_rescale() {
    let before = LINE.replace(
        "{name: b, jq: '.b = 1'}",
        "{name: b, jq: '.b = 1', switcher: {maxReplicas: 4}}",
    );
    let after = LINE.replace(
        "{name: b, jq: '.b = 1'}",
        "{name: b, jq: '.b = 1', switcher: {maxReplicas: 4, minReplicas: 2}, image: 'python:3.13', env: [{name: MODE, value: fast}]}",
    );
    let migration = plan(&states(&before), &states(&after), Policy::default());
    assert_eq!(
        printed(&migration),
        [
            "roll b (its steps; env; image)".to_string(),
            "rescale b (1..4, lag 100/replica, utilization 80% → 2..4, lag 100/replica, utilization 80%)"
                .to_string(),
        ]
    );
    // More replicas at most: the consumer holds more at once; the processes read that limit. (Its
    // input comes in frames of 256 items: two messages fill a replica, and below 250 replicas the
    // limit stays at JetStream's default of 1,000.)
    let wider = before.replace("maxReplicas: 4", "maxReplicas: 400");
    let steps = printed(&plan(&states(&before), &states(&wider), Policy::default()));
    assert_eq!(steps[0], format!("consumer b reads {}", data("a")));
    assert_eq!(steps[1], "roll b (its consumer's limits)");
    assert!(steps[2].starts_with("rescale b (1..4"), "{steps:?}");
    let a_little_wider = before.replace("maxReplicas: 4", "maxReplicas: 8");
    let steps = printed(&plan(
        &states(&before),
        &states(&a_little_wider),
        Policy::default(),
    ));
    assert_eq!(steps.len(), 1, "{steps:?}");
}

#[test]
fn sources_added_and_removed() {
    let fan_in =
        "  sources: [{name: gen, generator: {count: 1}}, {name: more, generator: {count: 1}}]
  stages:
    - {name: a, jq: '.a = 1', inputs: [gen, more]}
    - {name: b, jq: '.b = 1'}
  sinks: [{name: out, log: {}}]
";
    let added = plan(&states(LINE), &states(fan_in), Policy::default());
    assert_eq!(
        printed(&added),
        [
            format!("consumer a reads {}, {}", data("gen"), data("more")),
            "start more".to_string(),
            "roll a (its input)".to_string(),
        ]
    );
    let removed = plan(&states(fan_in), &states(LINE), Policy::default());
    assert_eq!(
        printed(&removed),
        [
            "roll a (its input)".to_string(),
            "remove more and its consumer".to_string(),
            format!("wait until a have read {} to its end", data("more")),
            format!("consumer a reads {}", data("gen")),
        ]
    );
}

#[test]
fn without_drain_the_queues_that_would_be_dropped_are_named() {
    let policy = Policy {
        drain: false,
        allow_loss: false,
    };
    let migration = plan(&states(INSERTED), &states(LINE), policy);
    assert_eq!(
        migration.discards,
        [
            Discard::Queue { unit: "ins".into() },
            Discard::Subject {
                subject: data("ins")
            },
        ]
    );
    assert!(!printed(&migration)
        .iter()
        .any(|s| s.starts_with("drain") || s.starts_with("wait")));
}

#[test]
fn epochs_count_up_over_edits_and_subjects_parse_back() {
    let first = plan(&states(LINE), &states(INSERTED), Policy::default());
    let second = plan(&first.target, &states(LINE), Policy::default());
    let a = |m: &Migration| {
        m.target
            .iter()
            .find(|u| u.config.unit == "a")
            .and_then(|u| u.config.output_subject.clone())
            .unwrap()
    };
    assert_eq!(a(&first), format!("{}_1", data("a")));
    assert_eq!(a(&second), format!("{}_2", data("a")));
    assert_eq!(epoch_of(&a(&second), &data("a")), Some(2));
    assert_eq!(epoch_of(&data("a"), &data("a")), Some(0));
    assert_eq!(epoch_of(&data("ab"), &data("a")), None);
    assert_eq!(epoch_of(&format!("{}_x", data("a")), &data("a")), None);
    // Once migrated, the same spec again is nothing to do.
    assert!(plan(&second.target, &states(LINE), Policy::default()).is_empty());
}

/// A message in a consumer's queue: its subject, the units it passed, and the item it is.
type Queued = (String, Vec<String>, u64);

/// A model of the data path that is honest about what JetStream does with interest retention: a
/// message published to a subject no consumer takes is gone, a consumer that stops reading a subject
/// drops what it still had of it, and a removed consumer drops its queue. Units work a few messages
/// per tick, so queues build up and drains take time.
struct Model {
    units: BTreeMap<String, UnitConfig>,
    /// Each consumer: what it reads, and its queue.
    queues: BTreeMap<String, (Vec<String>, VecDeque<Queued>)>,
    next_item: u64,
    tick: u64,
    sunk: Vec<(String, u64, Vec<String>)>,
    lost: Vec<String>,
    /// Units that work one message every other tick, so that a backlog builds up before them.
    slow: BTreeSet<String>,
}

impl Model {
    fn new(running: &[UnitState]) -> Model {
        let mut model = Model {
            units: BTreeMap::new(),
            queues: BTreeMap::new(),
            next_item: 0,
            tick: 0,
            sunk: Vec::new(),
            lost: Vec::new(),
            slow: BTreeSet::new(),
        };
        for unit in running {
            model.start(&unit.config);
        }
        model
    }

    fn start(&mut self, config: &UnitConfig) {
        if let Some(input) = &config.input {
            self.queues
                .entry(config.unit.clone())
                .or_insert_with(|| (input.filter_subjects.clone(), VecDeque::new()));
        }
        self.units.insert(config.unit.clone(), config.clone());
    }

    fn publish(&mut self, subject: &str, path: Vec<String>, item: u64) {
        let mut taken = false;
        for (filters, queue) in self.queues.values_mut() {
            if filters.iter().any(|f| f == subject) {
                queue.push_back((subject.to_string(), path.clone(), item));
                taken = true;
            }
        }
        if !taken {
            self.lost.push(format!(
                "item {item} published to {subject}, which nobody reads"
            ));
        }
    }

    fn step_time(&mut self, sources_on: bool) {
        self.tick += 1;
        let units: Vec<UnitConfig> = self.units.values().cloned().collect();
        for config in units {
            let subject = config.output_subject.clone();
            if matches!(config.role, UnitRole::Source { .. }) {
                if sources_on {
                    let item = self.next_item;
                    self.next_item += 1;
                    self.publish(&subject.unwrap(), vec![config.unit.clone()], item);
                }
                continue;
            }
            let work = if self.slow.contains(&config.unit) {
                self.tick % 2
            } else {
                (self.tick + config.unit.len() as u64) % 3
            };
            for _ in 0..work {
                let Some((_, queue)) = self.queues.get_mut(&config.unit) else {
                    break;
                };
                let Some((_, mut path, item)) = queue.pop_front() else {
                    break;
                };
                path.push(config.unit.clone());
                match &subject {
                    Some(s) => self.publish(s, path, item),
                    None => self.sunk.push((config.unit.clone(), item, path)),
                }
            }
        }
    }

    fn run(&mut self, migration: &Migration) {
        let target: BTreeMap<&str, &UnitConfig> = migration
            .target
            .iter()
            .map(|u| (u.config.unit.as_str(), &u.config))
            .collect();
        for step in &migration.steps {
            self.step_time(true);
            match step {
                Step::Read { unit, consumer } => {
                    let (filters, queue) = self
                        .queues
                        .entry(unit.clone())
                        .or_insert_with(|| (Vec::new(), VecDeque::new()));
                    *filters = consumer.filter_subjects.clone();
                    let before = queue.len();
                    queue.retain(|(s, _, _)| filters.contains(s));
                    if queue.len() < before {
                        self.lost
                            .push(format!("{step}: dropped {}", before - queue.len()));
                    }
                }
                Step::Start { unit } | Step::Roll { unit, .. } => {
                    self.start(target[unit.as_str()]);
                }
                Step::Rescale { .. } => {}
                Step::Drain { unit } => {
                    let mut ticks = 0;
                    while self.queues.get(unit).is_some_and(|(_, q)| !q.is_empty()) {
                        self.step_time(true);
                        ticks += 1;
                        assert!(
                            ticks < 10_000,
                            "{step} never ends: something still feeds it"
                        );
                    }
                }
                Step::Remove { unit } => {
                    if let Some((_, queue)) = self.queues.remove(unit) {
                        if !queue.is_empty() {
                            self.lost.push(format!("{step}: dropped {}", queue.len()));
                        }
                    }
                    self.units.remove(unit);
                }
                Step::AwaitEmpty { subject, .. } => {
                    let mut ticks = 0;
                    while self
                        .queues
                        .values()
                        .any(|(_, q)| q.iter().any(|(s, _, _)| s == subject))
                    {
                        self.step_time(true);
                        ticks += 1;
                        assert!(ticks < 10_000, "{step} never ends");
                    }
                }
            }
        }
        for unit in &migration.target {
            assert_eq!(self.units.get(&unit.config.unit), Some(&unit.config));
            if let Some(input) = &unit.config.input {
                assert_eq!(
                    self.queues[&unit.config.unit].0, input.filter_subjects,
                    "{} reads what the target says",
                    unit.config.unit
                );
            }
        }
        assert_eq!(self.units.len(), migration.target.len());
    }

    fn finish(&mut self) {
        for _ in 0..50 {
            self.step_time(true);
        }
        let mut ticks = 0;
        while self.queues.values().any(|(_, q)| !q.is_empty()) {
            self.step_time(false);
            ticks += 1;
            assert!(ticks < 10_000);
        }
    }
}

/// Whether each hop of `path` is an edge of some spec, none older than the previous hop's: every unit
/// handled the item by the definition in force when it did.
fn monotone(path: &[String], specs: &[Vec<String>]) -> bool {
    let mut since = 0;
    for hop in path.windows(2) {
        let Some(k) = (since..specs.len()).find(|&k| specs[k].windows(2).any(|edge| edge == hop))
        else {
            return false;
        };
        since = k;
    }
    true
}

/// The paths an item can take through a linear spec: its units in order.
fn path_of(spec: &[UnitState]) -> Vec<String> {
    spec.iter().map(|u| u.config.unit.clone()).collect()
}

#[test]
fn three_edits_while_items_flow_lose_and_double_nothing_and_each_item_takes_one_whole_path() {
    let specs = [
        LINE.to_string(),
        INSERTED.to_string(),
        // Remove a stage.
        INSERTED.replace("    - {name: a, jq: '.a = 1'}\n", ""),
        // Rewire the sink to a new stage.
        INSERTED
            .replace("    - {name: a, jq: '.a = 1'}\n", "")
            .replace(
                "  sinks: [{name: out, log: {}}]",
                "    - {name: c, jq: '.c = 1'}\n  sinks: [{name: out, log: {}}]",
            ),
        // Rename one, change another's steps, back to a line of two.
        LINE.replace("name: b,", "name: bee,")
            .replace(".a = 1", ".a = 2"),
    ];
    let mut running = states(&specs[0]);
    let mut model = Model::new(&running);
    let mut paths = vec![path_of(&running)];
    for _ in 0..20 {
        model.step_time(true);
    }
    for spec in &specs[1..] {
        let desired = states(spec);
        let migration = plan(&running, &desired, Policy::default());
        assert!(!migration.is_empty());
        model.run(&migration);
        running = migration.target;
        paths.push(path_of(&running));
        for _ in 0..60 {
            model.step_time(true);
        }
    }
    model.finish();
    assert_eq!(model.lost, Vec::<String>::new());
    let mut seen = BTreeMap::new();
    for (sink, item, path) in &model.sunk {
        assert_eq!(sink, "out");
        assert!(
            monotone(path, &paths),
            "item {item} took {path:?}: no hop may use an older spec than the hop before it: {paths:?}"
        );
        *seen.entry(*item).or_insert(0) += 1;
    }
    assert_eq!(seen.len() as u64, model.next_item, "every item at the sink");
    assert!(seen.values().all(|&n| n == 1), "no item twice");
    // Every spec in force carried some of them.
    for path in &paths {
        assert!(
            model.sunk.iter().any(|(_, _, p)| p == path),
            "no item took {path:?}"
        );
    }
}

#[test]
fn the_model_notices_a_migration_done_in_the_wrong_order() {
    // Narrowing b to the new stage before its old subject is read to the end drops what was left.
    let mut migration = plan(&states(LINE), &states(INSERTED), Policy::default());
    let narrow = migration.steps.pop().unwrap();
    let wait = migration.steps.pop().unwrap();
    migration.steps.push(narrow);
    migration.steps.push(wait);
    let mut model = Model::new(&states(LINE));
    model.slow.insert("b".into());
    for _ in 0..20 {
        model.step_time(true);
    }
    model.run(&migration);
    assert!(
        model.lost.iter().any(|l| l.starts_with("consumer b reads")),
        "{:?}",
        model.lost
    );
}

#[test]
fn a_layout_made_afresh_takes_the_epochs_a_migration_left() {
    let text = |spec: &str| {
        format!("apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}")
    };
    let pipeline = parse_pipeline(&text(INSERTED)).unwrap();
    let topology = analyze(&pipeline).unwrap();
    let fresh = layout(&topology, &pipeline.spec).unwrap();
    let first = plan(&states(LINE), &states(INSERTED), Policy::default());
    let targets: Vec<UnitConfig> = first.target.iter().map(|u| u.config.clone()).collect();
    assert_eq!(epochs(&targets), BTreeMap::from([("a".to_string(), 1)]));
    let laid_out = with_epochs(fresh, &epochs(&targets));
    assert_eq!(laid_out.units, targets);
    let b = laid_out
        .nats
        .consumers
        .iter()
        .find(|c| c.durable == "ins")
        .unwrap();
    assert_eq!(b.filter_subjects, [format!("{}_1", data("a"))]);
}

#[test]
fn units_read_back_in_any_order_are_put_in_flow_order() {
    let mut shuffled = states(INSERTED);
    shuffled.reverse();
    let names: Vec<String> = in_flow_order(shuffled)
        .into_iter()
        .map(|u| u.config.unit)
        .collect();
    assert_eq!(names, ["gen", "a", "ins", "b", "out"]);
}

#[test]
fn a_sink_added_beside_another_reads_from_now_on_and_one_removed_is_drained() {
    let two_sinks = LINE.replace(
        "sinks: [{name: out, log: {}}]",
        "sinks: [{name: out, log: {}}, {name: audit, log: {}}]",
    );
    // b keeps its reader `out`: nothing moves, the new sink's consumer comes before it starts.
    let added = plan(&states(LINE), &states(&two_sinks), Policy::default());
    assert_eq!(
        printed(&added),
        [
            format!("consumer audit reads {}", data("b")),
            "start audit".to_string(),
        ]
    );
    assert!(!added.is_stepwise());
    // b loses a reader: it moves on, so that the sink going away can be read to its end.
    let removed = plan(&states(&two_sinks), &states(LINE), Policy::default());
    assert_eq!(
        printed(&removed),
        [
            format!("consumer out reads {}_1, {}", data("b"), data("b")),
            format!("roll b (publishes to {}_1 from now on)", data("b")),
            "roll out (its input)".to_string(),
            "drain audit: wait until its queue is empty".to_string(),
            "remove audit and its consumer".to_string(),
            format!("wait until out have read {} to its end", data("b")),
            format!("consumer out reads {}_1", data("b")),
        ]
    );
}

// Each step of `plan` alone, on the edit that inserts `ins` between `a` and `b` (and its reverse).

fn by_name(units: &[UnitState]) -> BTreeMap<&str, &UnitState> {
    units.iter().map(|u| (u.config.unit.as_str(), u)).collect()
}

fn printed_steps(steps: &[Step]) -> Vec<String> {
    steps.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_publisher_that_loses_a_reader_moves_to_its_next_epoch_and_no_other_does() {
    let (running, desired) = (states(LINE), states(INSERTED));
    let epochs = publisher_epochs(&running, &desired, &by_name(&running));
    assert_eq!(epochs.moved, BTreeSet::from(["a"]), "b let go of a");
    assert_eq!(epochs.subject_then["a"], epoch_subject(&data("a"), 1));
    assert_eq!(epochs.subject_then["ins"], data("ins"), "new: plain");
    assert_eq!(epochs.subject_then["gen"], data("gen"), "its reader stays");
    assert_eq!(epochs.plain_publisher[data("a").as_str()], "a");
    let again = publisher_epochs(&running, &running, &by_name(&running));
    assert!(again.moved.is_empty());
}

#[test]
fn readers_of_a_moved_publisher_read_its_new_subject() {
    let (running, desired) = (states(LINE), states(INSERTED));
    let target = retargeted(
        &desired,
        &publisher_epochs(&running, &desired, &by_name(&running)),
    );
    let reads = |unit: &str| {
        target
            .iter()
            .find(|u| u.config.unit == unit)
            .unwrap()
            .config
            .input
            .as_ref()
            .unwrap()
            .filter_subjects
            .clone()
    };
    assert_eq!(reads("ins"), [epoch_subject(&data("a"), 1)]);
    assert_eq!(reads("b"), [data("ins")], "ins is new: plain");
}

#[test]
fn consumers_widen_to_what_they_read_now_and_then_and_narrow_afterwards() {
    let (running, desired) = (states(LINE), states(INSERTED));
    let now = by_name(&running);
    let target = retargeted(&desired, &publisher_epochs(&running, &desired, &now));
    let (steps, widened) = widen_consumers(&now, &target);
    assert_eq!(
        printed_steps(&steps),
        [
            format!("consumer ins reads {}_1", data("a")),
            format!("consumer b reads {}, {}", data("ins"), data("a")),
        ]
    );
    assert_eq!(
        widened["out"].filter_subjects,
        [data("b")],
        "unchanged, kept"
    );
    assert_eq!(
        printed_steps(&narrow_consumers(&target, &widened)),
        [format!("consumer b reads {}", data("ins"))]
    );
    let (same, kept) = widen_consumers(&now, &running);
    assert!(same.is_empty() && narrow_consumers(&running, &kept).is_empty());
}

#[test]
fn new_units_start_readers_first_and_sources_last() {
    let grown =
        "  sources: [{name: gen, generator: {count: 1}}, {name: more, generator: {count: 1}}]
  stages:
    - {name: a, jq: '.a = 1', inputs: [gen, more]}
    - {name: b, jq: '.b = 1'}
    - {name: c, jq: '.c = 1'}
    - {name: d, jq: '.d = 1'}
  sinks: [{name: out, log: {}}]
";
    let running = states(LINE);
    assert_eq!(
        printed_steps(&start_new_units(&by_name(&running), &states(grown))),
        ["start d", "start c", "start more"]
    );
}

#[test]
fn units_that_stay_and_change_roll_and_a_moved_publisher_says_from_now_on() {
    let (running, desired) = (states(LINE), states(INSERTED));
    let now = by_name(&running);
    let epochs = publisher_epochs(&running, &desired, &now);
    let target = retargeted(&desired, &epochs);
    assert_eq!(
        printed_steps(&roll_changed_units(&now, &target, &epochs.moved)),
        [
            format!("roll a (publishes to {}_1 from now on)", data("a")),
            "roll b (its input)".to_string(),
        ],
        "ins is new: started, not rolled"
    );
}

#[test]
fn a_unit_that_goes_is_drained_then_removed_or_without_drain_its_queue_is_named() {
    let (running, desired) = (states(INSERTED), states(LINE));
    let (steps, discards) = remove_gone_units(&running, &desired, Policy::default());
    assert_eq!(
        printed_steps(&steps),
        [
            "drain ins: wait until its queue is empty",
            "remove ins and its consumer"
        ]
    );
    assert!(discards.is_empty());
    let no_drain = Policy {
        drain: false,
        allow_loss: true,
    };
    let (steps, discards) = remove_gone_units(&running, &desired, no_drain);
    assert_eq!(printed_steps(&steps), ["remove ins and its consumer"]);
    assert_eq!(discards, [Discard::Queue { unit: "ins".into() }]);
}

#[test]
fn a_subject_nobody_publishes_to_is_read_to_its_end_by_its_readers_or_named_without_drain() {
    let (running, desired) = (states(INSERTED), states(LINE));
    let now = by_name(&running);
    let target = retargeted(&desired, &publisher_epochs(&running, &desired, &now));
    let (_, widened) = widen_consumers(&now, &target);
    let (steps, discards) =
        await_abandoned_subjects(&running, &target, &widened, Policy::default());
    assert_eq!(
        printed_steps(&steps),
        [format!("wait until b have read {} to its end", data("ins"))]
    );
    assert!(discards.is_empty());
    let no_drain = Policy {
        drain: false,
        allow_loss: true,
    };
    let (steps, discards) = await_abandoned_subjects(&running, &target, &widened, no_drain);
    assert!(steps.is_empty());
    assert_eq!(
        discards,
        [Discard::Subject {
            subject: data("ins")
        }]
    );
}

const JOINED: &str = "  sources: [{name: gen, generator: {count: 1}}]
  stages:
    - {name: a, inputs: [gen], jq: '.a = 1'}
    - {name: b, inputs: [gen], jq: '.b = 1'}
    - {name: c, inputs: [gen], jq: '.c = 1'}
    - {name: j, join: {of: [a, b, c]}, jq: '.'}
  sinks: [{name: out, log: {}}]
";

#[test]
fn a_branch_added_to_a_running_join_is_refused_and_one_removed_is_carried_out() {
    let two = JOINED
        .replace("of: [a, b, c]", "of: [a, b]")
        .replace("    - {name: c, inputs: [gen], jq: '.c = 1'}\n", "");
    let added = plan(&states(&two), &states(JOINED), Policy::default());
    assert_eq!(added.refused.len(), 1, "{:?}", added.refused);
    assert!(
        added.refused[0].contains("join `j` would wait for `c` too"),
        "{:?}",
        added.refused
    );
    let removed = plan(&states(JOINED), &states(&two), Policy::default());
    assert!(removed.refused.is_empty(), "{:?}", removed.refused);
    let steps = printed(&removed);
    assert!(
        steps.iter().any(|s| s.starts_with("roll j")),
        "the join rolls to wait for two: {steps:?}"
    );
    assert!(steps.iter().any(|s| s.starts_with("drain c")), "{steps:?}");
}
