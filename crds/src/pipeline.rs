//! The `Pipeline` custom resource: what a user writes.
//!
//! Every "exactly one of" choice (a source's kind, a stage's step kind, a sink's kind) is one enum,
//! written as its variant's key beside the holder's other fields (`jq: '.x'`, `file: {path: out}`); see
//! [`crate::kinds`] for how a file naming two kinds, or none, still parses so that `validate` can explain
//! the problem with the stage's path.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::kinds::{self, Kinds, KindsSchema};
pub use crate::secret::{SecretFromEnv, SecretKeyRef};
pub use crate::status::{EdgeStatus, MigrationStatus, PipelineStatus, RowCounts, UnitStatus};

/// A declarative data pipeline: sources feed nested stages, whose output reaches sinks.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    shortname = "pl",
    derive = "PartialEq",
    doc = "A declarative data pipeline: sources feed nested stages, whose output reaches sinks. Each top-level stage (and each nested switcher) runs as its own Deployment; stages are connected through NATS JetStream.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Units","type":"string","jsonPath":".status.unitsSummary"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lag"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// Where messages come from. One or more; each has a name and exactly one kind.
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sources: Vec<Source>,
    /// The stages messages flow through.
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub stages: Vec<Stage>,
    /// Where messages end up. One or more; by default a sink reads the last top-level stage.
    #[serde(default)]
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sinks: Vec<Sink>,
    /// The NATS server to use (default: the operator's configured server, or the embedded one in local mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsConfig>,
    /// Default container image for units (in particular those with exec steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where messages that keep failing go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// What happens to the JetStream data when the Pipeline is deleted (default Delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Stops the sources, lets every unit drain, then scales every unit to zero (phase `Paused`).
    /// Set back to false, every unit returns at the replicas it had.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Trace events for `switchyard trace`: which units an item passed, when, and where it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// How an edit of the running Pipeline is carried out: in steps that lose and double nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSpec>,
}

/// How an edit of a running Pipeline is carried out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationSpec {
    /// Wait until a unit that goes away, and each subject nobody publishes to any more, is read to its
    /// end (default true). False drops what is left there, which also needs `allowLoss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<bool>,
    /// Carry out an edit that drops messages (default false: such an edit is refused, with the reason,
    /// and the Pipeline keeps running as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_loss: Option<bool>,
}

/// What the units record about the items they see.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// Share of items traced, from 0 (none) to 1 (every item); every unit traces the same items
    /// (default 0.01 in a cluster, 1 with `switchyard run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_rate: Option<f64>,
    /// How long trace events are kept, as a duration (`30m`, `1h`, `2d`; default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
}

/// Share of items traced in a cluster when `spec.tracing.sampleRate` does not say.
pub const DEFAULT_CLUSTER_SAMPLE_RATE: f64 = 0.01;
/// How long trace events are kept when `spec.tracing.retention` does not say.
pub const DEFAULT_TRACE_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Name of a Secret in the Pipeline's namespace holding the credentials, under any of these keys:
    /// `nats.creds` (a user JWT and nkey seed), `token`, `user` and `password`, `ca.crt` (the CA of
    /// the server's certificate; turns TLS on), `tls.crt` and `tls.key` (a client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Copies of the Pipeline's stream, checkpoint bucket and consumers the NATS cluster keeps: 1, 3 or
    /// 5 (default 1). With 3, the pipeline goes on when one NATS server is lost, with 5 when two are;
    /// the cluster needs at least that many JetStream servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [1, 3, 5]))]
    pub replicas: Option<u32>,
    /// How long JetStream waits before it delivers again a message whose unit's process died while
    /// holding it (or whose acknowledgement was lost with a NATS server): `1s` to `1m`, default
    /// `10s`. Work that takes longer is not redelivered: the runtime reports progress on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redeliver_after: Option<String>,
}

/// How long JetStream waits for an acknowledgement before it delivers a message again, when
/// `spec.nats.redeliverAfter` does not say. This bounds recovery after a crash or a lost NATS server,
/// not processing time: stage processes report progress on messages that take longer.
pub const DEFAULT_REDELIVER_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// The bounds of `spec.nats.redeliverAfter`. The upper one stays well inside the stream's duplicate
/// window (`layout::DUPLICATE_WINDOW`), so that a message redelivered after a crash republishes into it.
pub const REDELIVER_AFTER_RANGE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(60);
/// Crashes of its unit's process after which a message is dead-lettered, when
/// `spec.deadLetter.afterCrashes` does not say.
pub const DEFAULT_AFTER_CRASHES: u32 = 10;

/// Replicas of a Pipeline's NATS objects, when `spec.nats.replicas` does not say.
pub const DEFAULT_NATS_REPLICAS: u32 = 1;

impl PipelineSpec {
    /// `spec.nats.redeliverAfter`, or its default (an unreadable value too: validation reports it).
    pub fn redeliver_after(&self) -> std::time::Duration {
        self.nats
            .as_ref()
            .and_then(|n| n.redeliver_after.as_deref())
            .and_then(|d| crate::duration::parse_duration(d).ok())
            .unwrap_or(DEFAULT_REDELIVER_AFTER)
    }

    /// `spec.deadLetter.afterCrashes`, or its default.
    pub fn dead_letter_after_crashes(&self) -> u32 {
        self.dead_letter
            .as_ref()
            .and_then(|d| d.after_crashes)
            .unwrap_or(DEFAULT_AFTER_CRASHES)
    }

    /// `spec.nats.replicas`, or its default.
    pub fn nats_replicas(&self) -> u32 {
        self.nats
            .as_ref()
            .and_then(|n| n.replicas)
            .unwrap_or(DEFAULT_NATS_REPLICAS)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetter {
    /// Subject dead letters are stored under (default `switchyard.<pipeline>.dlq.<unit>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A message that crashed its unit's process this many times, each time run alone after it was
    /// delivered again, is dead-lettered instead of run once more: 1 to 100, default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub after_crashes: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// A source of messages. Exactly one of the kinds must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "Source", transform = KindsSchema::<SourceKind> { holder: "a source", also: &[], kind: PhantomData })]
pub struct Source {
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Written as its key beside `name`; see [`crate::kinds`].
    #[serde(skip)]
    pub kind: Kinds<SourceKind>,
}

/// The kinds of source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceKind {
    Generator(GeneratorSource),
    Http(HttpSource),
    Timer(TimerSource),
    Cron(CronSource),
    Nats(NatsSource),
    File(FileSource),
    Postgres(Box<crate::postgres::PostgresSource>),
}

impl SourceKind {
    /// The secrets the source reads from its unit's environment, each with the field that names it.
    pub fn secrets(&self) -> Vec<(String, &SecretFromEnv)> {
        match self {
            SourceKind::Http(HttpSource {
                bearer_token: Some(token),
                ..
            }) => vec![("http.bearerToken".to_string(), token)],
            SourceKind::Postgres(p) => p.connection.secrets("postgres.connection"),
            _ => Vec::new(),
        }
    }

    /// A finite source ends by itself; `switchyard run` exits once every source has and all is drained.
    pub fn is_finite(&self) -> bool {
        matches!(
            self,
            SourceKind::Generator(GeneratorSource { count: Some(_), .. }) | SourceKind::File(_)
        ) || matches!(self, SourceKind::Postgres(p) if p.end_when_empty)
    }
}

/// The message a generator, timer or cron source sends when it has no `payload`.
pub const DEFAULT_PAYLOAD: &str = r#"{"seq": {{seq}}}"#;

/// Generates messages: `count` of them (or forever), at `ratePerSecond` (or as fast as possible).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratorSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Message template; `{{seq}}` becomes 1, 2, 3, … Default `{"seq": {{seq}}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

/// A request trigger: the body of every POST to `path` on `port` becomes a message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSource {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Largest request body taken, in bytes (default 1 MiB, and never more than the NATS server takes
    /// in one message); a larger one is answered 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_body_bytes: Option<u32>,
    /// Take only requests with `Authorization: Bearer <token>`; others are answered 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SecretFromEnv>,
}

/// Default of `http.maxBodyBytes`.
pub const DEFAULT_MAX_BODY_BYTES: u32 = 1024 * 1024;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimerSource {
    /// For example `5s`.
    pub interval: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CronSource {
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first; evaluated in
    /// UTC.
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

/// Consume an existing core NATS subject.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSource {
    pub subject: String,
}

/// JSON lines from a file, or from every file of a folder (in name order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSource {
    pub path: String,
}

/// A stage: a step (exactly one of the step kinds below) or a group (`stages`), optionally made its own
/// scalable unit with `switcher`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "Stage", transform = KindsSchema::<StepKind> { holder: "a stage", also: &[("stages", "stages (a group)")], kind: PhantomData })]
pub struct Stage {
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Nested stages, run in order in one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "nested_stages_schema")]
    pub stages: Option<Vec<Stage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switcher: Option<Switcher>,
    /// Written as its key beside the stage's other fields; see [`crate::kinds`].
    #[serde(skip)]
    pub step: Kinds<StepKind>,
    /// Stages or sources this stage reads (top-level stages only). Default: the previous stage, or every
    /// source for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<String>>,
    /// Waits, per item, for the outputs of the branch stages it names, and hands the stage's steps one
    /// item holding them all (top-level stages only; it reads its branches, so no `inputs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<crate::join::Join>,
    /// Time allowed per message and attempt, for example `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Accumulate messages and hand them on as one JSON array (units only: top-level stages and switchers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// Messages in flight per replica (default 512; for a batch stage, batches). Lower it for slow
    /// steps, so that a replica does not take more work than it can start on (and autoscaling sees
    /// busy replicas sooner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

/// A placeholder: a structural schema cannot refer to itself, so `crd::crd()` replaces it with the
/// stage's own schema, level by level, down to `crd::MAX_STAGE_DEPTH`.
fn nested_stages_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Nested stages, run in order in one process (same fields as a stage).",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// Runs many copies of a group and spreads work across them, scaled on queue lag.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not be greater than maxReplicas"
}]))]
pub struct Switcher {
    /// Fewest replicas (default 1; 0 lets an idle switcher scale to zero).
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    /// Most replicas (default 4).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: u32,
    /// Queue lag one replica is expected to carry (default 100). A backlog scales the switcher up at
    /// once, to backlog ÷ this many replicas.
    #[serde(default = "default_target_lag")]
    #[schemars(range(min = 1))]
    pub target_lag_per_replica: u64,
    /// Share of its concurrency a replica should be busy with, in percent (default 80). Under steady
    /// load this keeps enough replicas that the backlog does not come back.
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 1, max = 100))]
    pub target_utilization: u32,
    /// The switcher scales down only to the most replicas it needed during this window (default 30s),
    /// so that a dip in load does not make it flap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_stabilization: Option<String>,
}

impl Default for Switcher {
    fn default() -> Self {
        Switcher {
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_lag_per_replica: default_target_lag(),
            target_utilization: default_target_utilization(),
            scale_down_stabilization: None,
        }
    }
}

/// Default of `switcher.scaleDownStabilization`.
pub const DEFAULT_SCALE_DOWN_STABILIZATION: &str = "30s";

fn default_min_replicas() -> u32 {
    1
}
fn default_max_replicas() -> u32 {
    4
}
fn default_target_lag() -> u64 {
    100
}
fn default_target_utilization() -> u32 {
    80
}

/// The kinds of step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StepKind {
    /// A jq filter over the JSON message: zero, one or many outputs.
    Jq(String),
    Exec(ExecStep),
    Http(HttpStep),
    /// A fixed delay, for example `5ms`.
    Sleep(String),
    Passthrough(Passthrough),
}

/// A long-lived child process speaking the line protocol.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecStep {
    /// The program and its arguments, such as `["python3", "handler.py"]`.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
}

/// POST each message to `url`; the response body is the output.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpStep {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
#[schemars(schema_with = "empty_object")]
pub struct Passthrough {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, the first included (default 3).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// Delay before the second attempt; it doubles on each further attempt, up to `maxBackoff` (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
}

fn default_max_attempts() -> u32 {
    3
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batch {
    /// Messages per batch.
    #[schemars(range(min = 1))]
    pub size: u32,
    /// Hand on a partial batch after this long (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A destination. Exactly one of the kinds must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
#[schemars(rename = "Sink", transform = KindsSchema::<SinkKind> { holder: "a sink", also: &[], kind: PhantomData })]
pub struct Sink {
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Stages (or sources) this sink reads. Default: the last top-level stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<String>>,
    /// Written as its key beside `name`; see [`crate::kinds`].
    #[serde(skip)]
    pub kind: Kinds<SinkKind>,
}

/// The kinds of sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SinkKind {
    File(FileSink),
    Log(LogSink),
    Nats(NatsSink),
    Http(HttpSink),
    Postgres(Box<crate::postgres::PostgresSink>),
}

impl SinkKind {
    /// The secrets the sink reads from its unit's environment, each with the field that names it.
    pub fn secrets(&self) -> Vec<(String, &SecretFromEnv)> {
        match self {
            SinkKind::Postgres(p) => p.connection.secrets("postgres.connection"),
            _ => Vec::new(),
        }
    }
}

/// Serde for the holders of a kind: their own fields through the `remote = "Self"` derive, their kinds
/// through [`crate::kinds`].
macro_rules! holds_kinds {
    ($holder:ident, $field:ident) => {
        impl<'de> Deserialize<'de> for $holder {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let (mut holder, kinds) =
                    kinds::deserialize_sifted(deserializer, |sifted| $holder::deserialize(sifted))?;
                holder.$field = kinds;
                Ok(holder)
            }
        }

        impl Serialize for $holder {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                kinds::serialize_with(
                    serializer,
                    |fields| $holder::serialize(self, fields),
                    &self.$field,
                )
            }
        }
    };
}

holds_kinds!(Source, kind);
holds_kinds!(Stage, step);
holds_kinds!(Sink, kind);

/// Appends one JSON line per message; every message appears exactly once, also across restarts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSink {
    pub path: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
#[schemars(schema_with = "empty_object")]
pub struct LogSink {}

/// `{}`: Kubernetes forbids `additionalProperties: false` in a CRD schema, which serde's
/// `deny_unknown_fields` would otherwise produce here.
fn empty_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object"})
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSink {
    pub subject: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSink {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}
