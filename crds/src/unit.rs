//! The configuration one unit's `switchyard-stage` process runs from.
//!
//! The operator (or `switchyard run`) writes it; the stage runtime reads it. Names are resolved into
//! subjects and the unit's own settings (timeouts, retries, batches) into numbers; a source, step or sink
//! keeps its kind as the Pipeline gives it, already validated, so that a new kind is declared in one
//! place.

use serde::{Deserialize, Serialize};

use crate::pipeline::{SinkKind, SourceKind, StepKind};

/// Header names every message carries; the runtime sets them and `run` reads them.
pub mod headers {
    /// JetStream's de-duplication id: deterministic, so a redelivered input republishes the same ids.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The source that produced the message's ancestor.
    pub const ORIGIN: &str = "Switchyard-Origin";
    /// The ancestor's sequence number at its source.
    pub const ORIGIN_SEQ: &str = "Switchyard-Origin-Seq";
    /// Comma-separated units the message has passed, source first.
    pub const PATH: &str = "Switchyard-Path";
    /// W3C trace context, kept as it came in.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// On dead letters: why, where, after how many attempts.
    pub const ERROR: &str = "Switchyard-Error";
    pub const FAILED_STAGE: &str = "Switchyard-Failed-Stage";
    pub const FAILED_UNIT: &str = "Switchyard-Failed-Unit";
    pub const ATTEMPTS: &str = "Switchyard-Attempts";
    /// On the dead letters of messages that kept crashing their unit's process (see `CrashRecords`):
    /// how often JetStream delivered them (the attempts stay within `retry.maxAttempts`).
    pub const DELIVERIES: &str = "Switchyard-Deliveries";
    /// On dead letters and replayed messages: the step of the failed unit a replay starts at (the
    /// dead letter holds that step's input).
    pub const REPLAY_STEP: &str = "Switchyard-Replay-Step";
    /// On a replayed message: the one unit that takes it. It is put on that unit's input subject,
    /// which other units may read too; they let it pass.
    pub const REPLAY_FOR: &str = "Switchyard-Replay-For";
    /// How often the item was replayed from the dead-letter queue; carried downstream.
    pub const REPLAYS: &str = "Switchyard-Replays";
    /// Whether the item is traced (`1`) or not (`0`), as its source decided; without it, every unit
    /// decides the same way from the item's identity (see `traced`).
    pub const TRACED: &str = "Switchyard-Traced";
    /// On a branch's part for a join, and on the dead letters of a branch or a join: the id of the
    /// item that forked, which the join's bucket keys its parts by (`crate::join`).
    pub const FORK: &str = "Switchyard-Fork";
    /// On a message that holds several items (a frame, `switchyard_platform::frame`): how many.
    pub const FRAME: &str = "Switchyard-Frame";
    /// On a dead letter stored again at the end of its subject, so that the letters around it could
    /// be purged with one request (see `switchyard_ops::dlq::Removal`): when it was first stored, in
    /// milliseconds since the Unix epoch, and the id it had. The copy has no `Nats-Msg-Id`: within the
    /// duplicate window the stream would drop it as the letter itself.
    pub const DEAD_SINCE: &str = "Switchyard-Dead-Since";
    pub const LETTER_ID: &str = "Switchyard-Letter-Id";
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UnitConfig {
    pub pipeline: String,
    pub namespace: String,
    pub unit: String,
    /// The JetStream stream holding every subject of the pipeline.
    pub stream: String,
    pub role: UnitRole,
    /// The durable pull consumer shared by all replicas (absent for sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ConsumerConfig>,
    /// Where a unit that reads records which message it ran alone, to find one that crashes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crashes: Option<CrashRecords>,
    /// Where this unit's outputs are published (absent for sinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_subject: Option<String>,
    /// The most items the unit stores in one message on its output subject (a frame); 1: one item per
    /// message, as a config written before frames says by leaving it out.
    #[serde(default = "one_item")]
    pub frame_items: u32,
    pub dead_letter_subject: String,
    /// Core NATS subject the process reports its counters on.
    pub stats_subject: String,
    /// Where the unit's processes record its books (`books.rs`); absent in a config written before
    /// the books, whose unit keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub books: Option<BooksConfig>,
    /// Where the unit records trace events, and for which items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceConfig>,
    /// Sources whose jobs are followed to their end, and where the unit's accounts of their items
    /// go (`crate::jobs`); absent when no source of the Pipeline follows its jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsConfig>,
    /// The units that read what this one stores (their consumers' names), whose deliveries make the
    /// tags of a followed job; set only when jobs are followed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_readers: Vec<String>,
    /// A join stage's unit: where the parts of the items it waits on are kept, and for how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<crate::join::JoinConfig>,
    /// A branch of a join: each item's outputs go to the join as one part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<crate::join::BranchConfig>,
}

/// Where accounts of followed jobs go: `<prefix>.<source>` in `stream`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobsConfig {
    pub stream: String,
    pub prefix: String,
    /// The sources whose items' ends are followed.
    pub sources: Vec<String>,
}

/// The stream of the Pipeline's books, and the subjects of one unit's: `<prefix>.<replica>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BooksConfig {
    pub stream: String,
    pub prefix: String,
}

/// The items `pending` stored messages of a unit's input hold, going by how many items the messages
/// its replicas finished held (frames hold several): one each until a replica has finished one. The
/// autoscaler, `switchyard run` and `status` count lag in items through this.
pub fn items_pending<'a>(pending: u64, reports: impl IntoIterator<Item = &'a StatsReport>) -> u64 {
    let (items, messages) = reports
        .into_iter()
        .fold((0u64, 0u64), |(i, m), r| (i + r.processed, m + r.messages));
    if messages == 0 || items <= messages {
        return pending;
    }
    (pending as f64 * items as f64 / messages as f64).round() as u64
}

fn one_item() -> u32 {
    1
}

/// Which items a unit traces, and where their events go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceConfig {
    /// Events of item `ORIGIN:SEQ` go to `<prefix>.ORIGIN.SEQ`.
    pub subject_prefix: String,
    /// Share of items traced, 0 to 1; see [`traced`].
    pub sample_rate: f64,
    /// When set, a source traces every item while it makes no more than this many a second, and
    /// `sample_rate` of the rest; it says which in each item's `Switchyard-Traced` header, which the
    /// units downstream follow. `switchyard run`'s default: every item of a slow run, a sample of a
    /// fast one, whose trace events would otherwise outnumber its stored messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_up_to_per_second: Option<u32>,
}

/// Whether the item `origin:seq` is traced at `rate`: a hash of its identity, so every unit of the
/// pipeline (and every replica) traces the same items without telling one another.
pub fn traced(rate: f64, origin: &str, seq: &str) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let hash = spread_hash(origin.bytes().chain([b':']).chain(seq.bytes()));
    (hash as f64) < rate * (u64::MAX as f64)
}

/// A 64-bit hash of `bytes` that every build and platform computes alike (FNV-1a, unlike std's
/// hasher), with its bits spread: FNV leaves the high bits of short, similar keys (`1`, `2`, …)
/// alike, and a final mix (MurmurHash3's) spreads them, so that any share of consecutive items is
/// sampled evenly and tags of similar ids differ everywhere.
pub fn spread_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

/// A subject token for any text: NATS tokens cannot hold `.`, `*`, `>` or white space.
pub fn subject_token(text: &str) -> String {
    let token: String = text
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if token.is_empty() {
        "_".to_string()
    } else {
        token
    }
}

/// One thing a unit did with a traced item, as stored in the trace stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TraceEvent {
    pub unit: String,
    pub replica: String,
    /// The message's id (the item's id, then a suffix per unit it passed).
    pub id: String,
    /// When the unit took the message, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// How long the unit held it, in microseconds.
    pub took_us: u64,
    /// How often JetStream has delivered it to this unit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deliveries: u64,
    /// Attempts of the step (or write) that took the most.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub attempts: u32,
    pub outcome: TraceOutcome,
    /// Messages published downstream (a process unit), or items written (a sink).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub outputs: u64,
    /// Why it was dead-lettered, and at which stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// How often it has been replayed from the dead-letter queue.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub replays: u32,
    /// What a join did with a branch's part: what the item waits for, or which parts it joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TraceOutcome {
    /// A source made it.
    #[default]
    Emitted,
    /// A process unit published its outputs (perhaps none: a filter dropped it).
    Published,
    /// A sink wrote it.
    Written,
    /// A sink had written it before (a redelivery).
    Duplicate,
    /// It (or one of the items made from it) went to the dead-letter queue.
    DeadLettered,
    /// A join stored a branch's part of it; the item waits for the others.
    Waiting,
    /// A join took the last part of it: the joined item went on.
    Joined,
    /// A join was given a part of it after the item went on (or without the branch).
    Late,
}

/// A message JetStream delivers again was held by a process that died (or by one whose acknowledgement
/// was lost). The unit runs such a message alone, with nothing else in flight, after recording in
/// `bucket` that it does; a record that is still there when the message comes once more means it
/// crashed the process, and after `dead_letter_after` such crashes it is dead-lettered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CrashRecords {
    pub bucket: String,
    pub dead_letter_after: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerConfig {
    pub durable: String,
    pub filter_subjects: Vec<String>,
    pub ack_wait_ms: u64,
    pub max_ack_pending: i64,
    /// Messages asked for per pull request; about what one replica can work on at once.
    pub pull_batch: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", tag = "role")]
pub enum UnitRole {
    #[serde(rename_all = "camelCase")]
    Source {
        source: SourceKind,
        /// Key-value bucket where the source records how far it got, so that a restart resumes there.
        checkpoint_bucket: String,
    },
    #[serde(rename_all = "camelCase")]
    Process {
        /// In-process steps, in flow order.
        steps: Vec<StepConfig>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch: Option<BatchConfig>,
        /// Input messages (for a batch stage: batches) in flight per replica.
        concurrency: u32,
    },
    #[serde(rename_all = "camelCase")]
    Sink {
        sink: SinkKind,
        /// How often a failed write is tried before the message goes to the dead-letter subject.
        retry: RetryConfig,
        concurrency: u32,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepConfig {
    /// Where the step is in the Pipeline, for errors and dead-letter headers: `machines > wash`.
    pub path: String,
    /// As the Pipeline gives it; validation has checked it.
    pub kind: StepKind,
    /// Literal environment variables for a child process (the stage's `env` values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub retry: RetryConfig,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    /// Without `retry`, a failing message is dead-lettered at once.
    fn default() -> Self {
        RetryConfig {
            max_attempts: 1,
            backoff_ms: 1000,
            max_backoff_ms: 30_000,
        }
    }
}

impl RetryConfig {
    /// Delay before attempt `attempt + 1` (attempt counts from 1): exponential, capped.
    pub fn delay_after(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        std::time::Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    pub size: u32,
    pub timeout_ms: u64,
}

/// How often a stage process reports: the autoscalers' clock.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the file sink writing `path` keeps its ledger (local mode removes it with a fresh run).
pub fn ledger_path(path: &std::path::Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.sy-ledger"))
}

/// What a stage process reports on its stats subject, about once a second. Counters run from the
/// process's start; a reader sums the latest report of every replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    pub unit: String,
    /// Distinguishes the processes of one unit (pid in local mode, pod name in a cluster).
    pub replica: String,
    /// Input items finished and acknowledged (for a source: items generated and stored).
    pub processed: u64,
    /// Stored input messages finished: frames or single items. With `processed`, how many items a
    /// message of the unit's input holds, which turns its consumer's pending messages into items.
    #[serde(default)]
    pub messages: u64,
    /// Output messages stored downstream (for a sink: messages written).
    pub published: u64,
    /// Messages sent to the dead-letter subject.
    pub dead_lettered: u64,
    /// Redelivered inputs that a sink recognised as already written and skipped.
    #[serde(default)]
    pub duplicates_skipped: u64,
    /// Input messages being worked on right now.
    pub in_flight: u64,
    /// True once a finite source has published everything.
    #[serde(default)]
    pub finished: bool,
    /// The process's final report, sent as it exits.
    #[serde(default)]
    pub last: bool,
    /// Items in the pending and unacknowledged messages of the unit's consumer (see `items_pending`),
    /// as the consumer's leader reported them during the last interval (absent for sources, or when
    /// it could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Inputs finished per second over the last interval.
    #[serde(default)]
    pub rate: f64,
    /// Mean share of its concurrency this replica was busy with over the last interval (0 to 1).
    #[serde(default)]
    pub utilization: f64,
    /// Inputs (for a batch stage: batches) this replica works on at once.
    #[serde(default)]
    pub concurrency: u32,
    /// Where the rows of a postgres source's table stand, as it last counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<crate::pipeline::RowCounts>,
    /// A join replica: the items it waits on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinReport>,
}

/// The items a join replica waits on (their parts stored, not all there yet), and how long the
/// oldest has waited. Summed over a join's replicas (`join_waiting`), its status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JoinReport {
    pub waiting: u64,
    #[serde(default)]
    pub oldest_wait_ms: u64,
}

/// What a join's replicas wait on together; None when none of them is a join's.
pub fn join_waiting<'a>(
    reports: impl IntoIterator<Item = &'a StatsReport>,
) -> Option<crate::status::JoinWaiting> {
    reports.into_iter().filter_map(|r| r.join).fold(
        None,
        |sum: Option<crate::status::JoinWaiting>, r| {
            let sum = sum.unwrap_or_default();
            Some(crate::status::JoinWaiting {
                waiting: sum.waiting + r.waiting,
                oldest_wait_seconds: sum.oldest_wait_seconds.max(r.oldest_wait_ms / 1000),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let r = RetryConfig {
            max_attempts: 6,
            backoff_ms: 100,
            max_backoff_ms: 500,
        };
        let ms: Vec<u128> = (1..=5).map(|a| r.delay_after(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn sampling_traces_about_the_share_asked_and_the_same_items_everywhere() {
        let traced_of = |rate| {
            (1..=10_000)
                .filter(|seq: &u32| traced(rate, "src", &seq.to_string()))
                .count()
        };
        assert_eq!(traced_of(1.0), 10_000);
        assert_eq!(traced_of(0.0), 0);
        let hundredth = traced_of(0.01);
        assert!((60..=140).contains(&hundredth), "{hundredth}");
        let half = traced_of(0.5);
        assert!((4_700..=5_300).contains(&half), "{half}");
        assert_eq!(traced(0.3, "a", "17"), traced(0.3, "a", "17"));
    }

    #[test]
    fn subject_tokens_hold_no_separator_or_wildcard() {
        assert_eq!(subject_token("a.b *>c d"), "a_b___c_d");
        assert_eq!(subject_token(""), "_");
        assert_eq!(subject_token("clothes"), "clothes");
    }

    #[test]
    fn lag_counts_the_items_the_pending_messages_hold() {
        let report = |processed, messages| StatsReport {
            processed,
            messages,
            ..StatsReport::default()
        };
        // Nothing finished yet, or a reporter from before frames: a message each.
        assert_eq!(items_pending(7, &[]), 7);
        assert_eq!(items_pending(7, &[report(500, 0)]), 7);
        // Two replicas that finished 1,000 items in 40 messages: 25 a message.
        let replicas = [report(600, 20), report(400, 20)];
        assert_eq!(items_pending(4, &replicas), 100);
        assert_eq!(items_pending(0, &replicas), 0);
        // Single items: as many as messages.
        assert_eq!(items_pending(9, &[report(30, 30)]), 9);
    }

    #[test]
    fn unit_config_round_trips_through_json() {
        let cfg = UnitConfig {
            pipeline: "p".into(),
            namespace: "default".into(),
            unit: "u".into(),
            stream: "s".into(),
            role: UnitRole::Process {
                steps: vec![StepConfig {
                    path: "u > a".into(),
                    kind: StepKind::Jq(".".into()),
                    env: vec![("A".into(), "1".into())],
                    timeout_ms: Some(5),
                    retry: RetryConfig::default(),
                }],
                batch: None,
                concurrency: 4,
            },
            input: None,
            crashes: Some(CrashRecords {
                bucket: "b".into(),
                dead_letter_after: 3,
            }),
            output_subject: Some("x".into()),
            books: Some(BooksConfig {
                stream: "switchyard_default_p_books".into(),
                prefix: "switchyard.default.p.books.u".into(),
            }),
            frame_items: 16,
            jobs: Some(JobsConfig {
                stream: "switchyard_default_p_jobs".into(),
                prefix: "switchyard.default.p.jobs".into(),
                sources: vec!["rows".into()],
            }),
            output_readers: vec!["next".into()],
            join: None,
            branch: Some(crate::join::BranchConfig {
                name: "u".into(),
                join: "j".into(),
            }),
            dead_letter_subject: "d".into(),
            stats_subject: "st".into(),
            trace: Some(TraceConfig {
                subject_prefix: "t".into(),
                sample_rate: 0.5,
                every_up_to_per_second: Some(100),
            }),
        };
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<UnitConfig>(&text).unwrap(), cfg);
    }
}
