//! How a Pipeline maps onto NATS: its stream, subjects and consumers, and the configuration each unit's
//! processes run from. Pure: the same topology always gives the same layout, so `switchyard plan`, the
//! operator and `switchyard run` agree on every name.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::join::{BranchConfig, JoinBranch, JoinConfig, DEFAULT_MAX_WAITING};
use crate::kinds::Kinds;
pub use crate::names::{object_name, Names};
use crate::pipeline::{
    PipelineSpec, DEFAULT_CLUSTER_SAMPLE_RATE, DEFAULT_TRACE_RETENTION, REDELIVER_AFTER_RANGE,
};
use crate::problem::Problem;
use crate::topology::{Step, Topology, Unit, UnitKind};
use crate::unit::{
    BatchConfig, BooksConfig, ConsumerConfig, CrashRecords, RetryConfig, StepConfig, TraceConfig,
    UnitConfig, UnitRole,
};

/// Input messages in flight per replica when a stage does not say. High, because for fast steps
/// most of a message's time in flight is the wait for the stream's acknowledgement, and pulls are
/// this big too: larger pull requests cost the server less per message.
pub const DEFAULT_CONCURRENCY: u32 = 512;
/// JetStream drops a publish whose message id it has stored within this window. It must exceed the
/// longest `spec.nats.redeliverAfter` (`REDELIVER_AFTER_RANGE`), so that a message redelivered after a
/// crash republishes into the window.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
const _: () = assert!(REDELIVER_AFTER_RANGE.end().as_secs() * 2 <= DUPLICATE_WINDOW.as_secs());
/// Key prefix, in the Pipeline's checkpoint bucket, of the crash records of the messages a unit runs
/// alone after they were delivered again: `crashes.<unit>.<stream sequence>`.
pub const CRASH_RECORD_PREFIX: &str = "crashes";
/// A batch that does not fill up is handed on after this long.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Name of the consumer that holds dead letters in the stream until someone deals with them. Unit names
/// are DNS labels, so it can never clash with a unit's consumer.
pub const DEAD_LETTER_CONSUMER: &str = "_dead_letters";
/// Sinks retry a failed write this often before dead-lettering the message.
pub const SINK_RETRY: RetryConfig = RetryConfig {
    max_attempts: 5,
    backoff_ms: 500,
    max_backoff_ms: 10_000,
};

/// Everything a Pipeline needs in NATS.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsLayout {
    pub stream: StreamLayout,
    /// Key-value bucket of source checkpoints.
    pub checkpoint_bucket: String,
    /// One durable pull consumer per unit that reads, and the dead-letter holder.
    pub consumers: Vec<ConsumerConfig>,
    /// The stream of trace events; absent when nothing is traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceStreamLayout>,
    /// The stream of the Pipeline's books (`books.rs`).
    pub books: BooksStreamLayout,
    /// The stream of the accounts units give of the jobs of sources that follow them to their end
    /// (`crate::jobs`); absent when no source does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsStreamLayout>,
    /// The key-value bucket of the Pipeline's joins (`crate::join_state`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_bucket: Option<String>,
}

/// Accounts of jobs are kept until the source that follows the job has written its outcome back
/// and acknowledges them (work-queue retention): what is in the stream is exactly the accounts of
/// jobs still open, which a source that restarts reads again to know where each one stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobsStreamLayout {
    pub name: String,
    /// Each followed source's accounts go to `<prefix>.<source>`.
    pub prefix: String,
}

/// Book records are kept until a roll-up sums them and they are older than the duplicate window
/// (limits retention, no age: a record is data about data, and lost it would unbalance the books);
/// they are deduplicated over the data stream's window, so a message delivered again is recorded once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BooksStreamLayout {
    pub name: String,
    /// Every book subject is `<root>.<unit>.<replica>` (`Names::books_root`), and its roll-up's
    /// that followed by `.sum`.
    pub root: String,
}

impl BooksStreamLayout {
    /// Every book subject of the Pipeline.
    pub fn filter(&self) -> String {
        format!("{}.>", self.root)
    }
}

/// Trace events are kept for `max_age_ms` (limits retention), at most `max_messages` of them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TraceStreamLayout {
    pub name: String,
    pub subjects: Vec<String>,
    pub max_age_ms: u64,
    pub max_messages: i64,
}

/// The most trace events one Pipeline keeps (a few hundred bytes each); the oldest go first. A count,
/// not bytes: JetStream reserves a stream's `max_bytes` on disk up front, and a gigabyte per Pipeline
/// ran a server with a few dozen Pipelines out of storage (the real-API suite's hundred Pipelines).
pub const TRACE_MAX_MESSAGES: i64 = 1_000_000;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamLayout {
    pub name: String,
    pub subjects: Vec<String>,
    /// Interest: a message is kept until every consumer that wants it has acknowledged it, so data does
    /// not pile up and nothing unconsumed is ever dropped for age.
    pub retention: String,
    pub storage: String,
    pub duplicate_window_ms: u64,
    pub replicas: u32,
}

/// The layout of a whole Pipeline: NATS objects, and each unit's process configuration in topology order.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub nats: NatsLayout,
    pub units: Vec<UnitConfig>,
}

impl Layout {
    /// Traces `rate` of the items in every unit (and keeps the trace stream only if any are).
    /// `switchyard run` traces every item when the Pipeline does not say.
    pub fn set_sample_rate(&mut self, rate: f64, names: &Names, retention: Duration) {
        if rate <= 0.0 {
            self.nats.trace = None;
            for unit in &mut self.units {
                unit.trace = None;
            }
            return;
        }
        self.nats.trace = Some(TraceStreamLayout {
            name: names.trace_stream(),
            subjects: vec![format!("{}.>", names.trace_prefix())],
            max_age_ms: millis(retention),
            max_messages: TRACE_MAX_MESSAGES,
        });
        for unit in &mut self.units {
            unit.trace = Some(TraceConfig {
                subject_prefix: names.trace_prefix(),
                sample_rate: rate.min(1.0),
                every_up_to_per_second: None,
            });
        }
    }
}

/// `spec.tracing.retention`, or its default. Validation has checked it.
pub fn trace_retention(spec: &PipelineSpec) -> Duration {
    spec.tracing
        .as_ref()
        .and_then(|t| t.retention.as_deref())
        .and_then(|r| parse_duration(r).ok())
        .unwrap_or(DEFAULT_TRACE_RETENTION)
}

/// Lays out a validated topology. Durations were checked by validation; should one still not parse, the
/// problem names its stage rather than being papered over.
pub fn layout(topology: &Topology, spec: &PipelineSpec) -> Result<Layout, Vec<Problem>> {
    let names = Names::new(&topology.namespace, &topology.pipeline);
    let custom_dead_letter = spec.dead_letter.as_ref().and_then(|d| d.subject.clone());
    let dead_letter_subject = |unit: &str| {
        custom_dead_letter
            .clone()
            .unwrap_or_else(|| names.dead_letter_subject(unit))
    };

    let mut subjects = vec![names.all_data_subjects(), names.all_dead_letter_subjects()];
    let mut dead_letter_filter = vec![names.all_dead_letter_subjects()];
    if let Some(subject) = &custom_dead_letter {
        subjects.push(subject.clone());
        dead_letter_filter = vec![subject.clone()];
    }

    let ack_wait_ms = millis(spec.redeliver_after());
    let crashes = CrashRecords {
        bucket: names.checkpoint_bucket(),
        dead_letter_after: spec.dead_letter_after_crashes(),
    };
    let mut problems = Vec::new();
    let mut units = Vec::new();
    let mut consumers = Vec::new();
    for unit in &topology.units {
        let input = if unit.inputs.is_empty() {
            None
        } else {
            let consumer = consumer_for(&names, topology, unit, ack_wait_ms);
            consumers.push(consumer.clone());
            Some(consumer)
        };
        let role = match role_for(&names, unit) {
            Ok(role) => role,
            Err(mut found) => {
                problems.append(&mut found);
                continue;
            }
        };
        let mut config = unit_config(&names, topology, unit, role, input, &crashes);
        config.dead_letter_subject = dead_letter_subject(&unit.name);
        units.push(config);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    consumers.push(ConsumerConfig {
        durable: DEAD_LETTER_CONSUMER.to_string(),
        filter_subjects: dead_letter_filter,
        ack_wait_ms,
        max_ack_pending: 1000,
        pull_batch: 100,
    });
    let mut layout = Layout {
        nats: nats_layout(&names, spec, subjects, consumers),
        units,
    };
    follow_jobs(&mut layout, spec, &names);
    let rate = spec
        .tracing
        .as_ref()
        .and_then(|t| t.sample_rate)
        .unwrap_or(DEFAULT_CLUSTER_SAMPLE_RATE);
    layout.set_sample_rate(rate, &names, trace_retention(spec));
    Ok(layout)
}

/// One unit's configuration, before jobs and tracing are added (`follow_jobs`,
/// `set_sample_rate`), with the default dead-letter subject.
fn unit_config(
    names: &Names,
    topology: &Topology,
    unit: &Unit,
    role: UnitRole,
    input: Option<ConsumerConfig>,
    crashes: &CrashRecords,
) -> UnitConfig {
    let output_subject = match unit.kind {
        UnitKind::Sink(_) => None,
        _ => Some(names.data_subject(&unit.name)),
    };
    UnitConfig {
        pipeline: topology.pipeline.clone(),
        namespace: topology.namespace.clone(),
        unit: unit.name.clone(),
        stream: names.stream(),
        role,
        crashes: input.is_some().then(|| crashes.clone()),
        input,
        frame_items: if output_subject.is_some() {
            frame_items(topology, unit)
        } else {
            1
        },
        output_subject,
        dead_letter_subject: names.dead_letter_subject(&unit.name),
        stats_subject: names.stats_subject(&unit.name),
        trace: None,
        books: Some(BooksConfig {
            stream: names.books_stream(),
            prefix: names.books_prefix(&unit.name),
        }),
        jobs: None,
        output_readers: Vec::new(),
        join: unit.join.as_ref().map(|join| JoinConfig {
            bucket: names.join_bucket(),
            branches: join
                .of
                .iter()
                .map(|branch| JoinBranch {
                    name: branch.clone(),
                    unit: branch.clone(),
                })
                .collect(),
            timeout_ms: millis(join.timeout()),
            on_timeout: join.on_timeout.unwrap_or_default(),
            max_waiting: join.max_waiting.unwrap_or(DEFAULT_MAX_WAITING),
            finished_kept_ms: millis(DUPLICATE_WINDOW),
        }),
        branch: unit.branch_of.as_ref().map(|join| BranchConfig {
            name: unit.name.clone(),
            join: join.clone(),
        }),
    }
}

/// The Pipeline's stream (on `subjects`), checkpoint bucket, consumers and books stream.
fn nats_layout(
    names: &Names,
    spec: &PipelineSpec,
    subjects: Vec<String>,
    consumers: Vec<ConsumerConfig>,
) -> NatsLayout {
    NatsLayout {
        stream: StreamLayout {
            name: names.stream(),
            subjects,
            retention: "interest".to_string(),
            storage: "file".to_string(),
            duplicate_window_ms: DUPLICATE_WINDOW.as_millis() as u64,
            replicas: spec.nats_replicas(),
        },
        checkpoint_bucket: names.checkpoint_bucket(),
        consumers,
        trace: None,
        books: BooksStreamLayout {
            name: names.books_stream(),
            root: names.books_root(),
        },
        jobs: None,
        join_bucket: spec
            .stages
            .iter()
            .any(|s| s.join.is_some())
            .then(|| names.join_bucket()),
    }
}

/// The most items a frame holds (see `UnitConfig::frame_items`).
pub const MOST_FRAME_ITEMS: u32 = 256;

/// The most items `unit` stores in one message: no more than any unit reading them works on at once,
/// so that a frame is a round of a reader's work and frames spread over a switcher's replicas as
/// single items would; one when a batch stage reads them, whose batches count items exactly.
fn frame_items(topology: &Topology, unit: &Unit) -> u32 {
    topology
        .units
        .iter()
        .filter(|reader| reader.inputs.contains(&unit.name))
        .map(|reader| match reader.batch {
            Some(_) => 1,
            None => reader.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        })
        .min()
        .unwrap_or(MOST_FRAME_ITEMS)
        .clamp(1, MOST_FRAME_ITEMS)
}

/// Messages one replica holds at once: its concurrency (in items), times the batch size for a batch
/// stage, in messages of as many items as the frames of its inputs hold at most. Pulled in messages,
/// frames counted as one each, a replica would fetch hundreds of times what it works on, and what
/// waits in its buffer meanwhile would be delivered again once the acknowledgement deadline passed.
fn messages_in_flight_per_replica(topology: &Topology, unit: &Unit) -> u64 {
    let concurrency = u64::from(unit.concurrency.unwrap_or(DEFAULT_CONCURRENCY));
    let batch = unit.batch.as_ref().map_or(1, |b| u64::from(b.size.max(1)));
    let frame = topology
        .units
        .iter()
        .filter(|u| unit.inputs.contains(&u.name))
        .map(|u| u64::from(frame_items(topology, u)))
        .max()
        .unwrap_or(1)
        .max(1);
    let items = concurrency.saturating_mul(batch);
    if frame == 1 {
        return items;
    }
    // Twice the frames that fill the replica, and never fewer than a few messages: when its inputs
    // come slowly their frames are small or single items, and a pull of two of those would leave the
    // replica waiting on the round trips.
    items
        .div_ceil(frame)
        .saturating_mul(2)
        .max(FEWEST_PULLED_WITH_FRAMES.min(items))
}

/// The fewest messages a replica pulls at once when its inputs come in frames.
const FEWEST_PULLED_WITH_FRAMES: u64 = 16;

fn consumer_for(
    names: &Names,
    topology: &Topology,
    unit: &Unit,
    ack_wait_ms: u64,
) -> ConsumerConfig {
    let per_replica = messages_in_flight_per_replica(topology, unit);
    let replicas = unit.switcher.as_ref().map_or(1, |s| s.max_replicas.max(1));
    // Room for every replica to be full and to have its next pull arriving, and never below JetStream's
    // own default.
    let max_ack_pending = per_replica
        .saturating_mul(u64::from(replicas))
        .saturating_mul(2)
        .clamp(1000, i64::MAX as u64) as i64;
    ConsumerConfig {
        durable: unit.name.clone(),
        filter_subjects: unit.inputs.iter().map(|i| names.data_subject(i)).collect(),
        ack_wait_ms,
        max_ack_pending,
        pull_batch: per_replica.clamp(1, 1000) as usize,
    }
}

fn role_for(names: &Names, unit: &Unit) -> Result<UnitRole, Vec<Problem>> {
    let concurrency = unit.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    match &unit.kind {
        UnitKind::Source(source) => Ok(UnitRole::Source {
            source: the_kind(&source.kind, &unit.spec_path, "source")?,
            checkpoint_bucket: names.checkpoint_bucket(),
        }),
        UnitKind::Sink(sink) => Ok(UnitRole::Sink {
            sink: the_kind(&sink.kind, &unit.spec_path, "sink")?,
            retry: SINK_RETRY,
            concurrency,
        }),
        UnitKind::Process => {
            let mut problems = Vec::new();
            let mut steps = Vec::new();
            for step in &unit.steps {
                match step_config(step) {
                    Ok(config) => steps.push(config),
                    Err(problem) => problems.push(problem),
                }
            }
            let batch = match &unit.batch {
                None => None,
                Some(batch) => {
                    let timeout = match &batch.timeout {
                        None => Ok(DEFAULT_BATCH_TIMEOUT),
                        Some(text) => parse_duration(text),
                    };
                    match timeout {
                        Ok(timeout) => Some(BatchConfig {
                            size: batch.size,
                            timeout_ms: millis(timeout),
                        }),
                        Err(e) => {
                            problems
                                .push(Problem::at(&unit.spec_path, format!("batch.timeout: {e}")));
                            None
                        }
                    }
                }
            };
            if problems.is_empty() {
                Ok(UnitRole::Process {
                    steps,
                    batch,
                    concurrency,
                })
            } else {
                Err(problems)
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn duration_ms(path: &str, field: &str, text: &str) -> Result<u64, Problem> {
    parse_duration(text)
        .map(millis)
        .map_err(|e| Problem::at(path, format!("{field}: {e}")))
}

/// The one kind a source or sink was given; validation has reported any other case.
fn the_kind<K: Clone>(kinds: &Kinds<K>, path: &str, holder: &str) -> Result<K, Vec<Problem>> {
    kinds.one().cloned().ok_or_else(|| {
        vec![Problem::at(
            path,
            format!("the {holder} needs exactly one kind: run `switchyard validate` for details"),
        )]
    })
}

fn step_config(step: &Step) -> Result<StepConfig, Problem> {
    let stage = &step.stage;
    let path = step.spec_path.as_str();
    let kind = stage.step.one().cloned().ok_or_else(|| {
        Problem::at(
            path,
            "the stage needs exactly one step kind: run `switchyard validate` for details",
        )
    })?;
    // Only a child process reads them, but the runtime decides that, not the layout.
    let env = step
        .env
        .iter()
        .filter_map(|e| e.value.as_ref().map(|v| (e.name.clone(), v.clone())))
        .collect();
    let timeout_ms = step
        .timeout
        .as_deref()
        .map(|t| duration_ms(path, "timeout", t))
        .transpose()?;
    let retry = match &step.retry {
        None => RetryConfig::default(),
        Some(retry) => {
            let defaults = RetryConfig::default();
            RetryConfig {
                max_attempts: retry.max_attempts.max(1),
                backoff_ms: match &retry.backoff {
                    Some(b) => duration_ms(path, "retry.backoff", b)?,
                    None => defaults.backoff_ms,
                },
                max_backoff_ms: match &retry.max_backoff {
                    Some(b) => duration_ms(path, "retry.maxBackoff", b)?,
                    None => defaults.max_backoff_ms,
                },
            }
        }
    };
    Ok(StepConfig {
        path: step.path.clone(),
        kind,
        env,
        timeout_ms,
        retry,
    })
}

/// The sources whose jobs are followed to their end (a `postgres` source that completes a row once
/// its item is finished): every unit then says what became of their items, and knows who reads
/// what it stores, whose deliveries make the job's tags.
fn follow_jobs(layout: &mut Layout, spec: &PipelineSpec, names: &Names) {
    let followed: Vec<String> = spec
        .sources
        .iter()
        .filter(|source| {
            matches!(
                source.kind.one(),
                Some(crate::pipeline::SourceKind::Postgres(p)) if p.follows_its_jobs()
            )
        })
        .map(|source| source.name.clone())
        .collect();
    if followed.is_empty() {
        return;
    }
    let jobs = crate::unit::JobsConfig {
        stream: names.jobs_stream(),
        prefix: names.jobs_prefix(),
        sources: followed,
    };
    layout.nats.jobs = Some(JobsStreamLayout {
        name: jobs.stream.clone(),
        prefix: jobs.prefix.clone(),
    });
    let consumers = layout.nats.consumers.clone();
    for unit in &mut layout.units {
        unit.jobs = Some(jobs.clone());
        unit.output_readers = match &unit.output_subject {
            Some(subject) => consumers
                .iter()
                .filter(|c| c.filter_subjects.contains(subject))
                .filter(|c| c.durable != DEAD_LETTER_CONSUMER)
                .map(|c| c.durable.clone())
                .collect(),
            None => Vec::new(),
        };
    }
}
