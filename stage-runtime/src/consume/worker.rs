//! The unit that reads: what it is made of, where its results go, and what can stop it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::Subject;
use switchyard_crds::unit::{BatchConfig, RetryConfig};

use crate::crashes::{CrashRecordError, CrashRecords};
use crate::otlp::Spans;
use crate::sinks::Sink;
use crate::stats::Stats;
use crate::steps::Step;
use crate::trace::Tracer;

/// Where a unit's results go.
pub enum Output {
    /// Published to the unit's output subject, for the units downstream.
    Publish(Subject),
    /// Written by a sink, retried per `retry` before being dead-lettered.
    Sink {
        sink: Box<dyn Sink>,
        retry: RetryConfig,
    },
}

/// Why a unit could not read its input or store what it made of it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot open stream {stream}: {source}")]
    Stream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create consumer {durable}: {source}")]
    CreateConsumer {
        durable: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot pull from consumer {durable}: {source}")]
    Pull {
        durable: String,
        source: jetstream::consumer::StreamError,
    },
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        subject: Subject,
        source: jetstream::context::PublishError,
    },
    #[error("a publish was not acknowledged by JetStream: {0}")]
    Unacknowledged(jetstream::context::PublishError),
    #[error(transparent)]
    ConnectionLost(#[from] crate::acks::ConnectionLost),
    #[error(transparent)]
    CrashRecord(#[from] CrashRecordError),
    #[error(transparent)]
    Books(#[from] crate::books::BooksError),
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
    /// Not a failure: the join waits on as many items as it may (backpressure).
    #[error("{0}")]
    Held(String),
}

pub struct Worker {
    pub unit: String,
    pub stream: String,
    pub js: jetstream::Context,
    pub steps: Vec<Step>,
    pub output: Output,
    pub dead_letter_subject: Subject,
    pub stats: Arc<Stats>,
    pub batch: Option<BatchConfig>,
    /// Inputs (for a batch stage: batches) in flight at once.
    pub concurrency: usize,
    /// Messages held longer than this get a progress acknowledgement, so JetStream does not redeliver
    /// them while they are still being worked on.
    pub progress_every: Duration,
    /// The largest message the NATS server takes, headers included.
    pub max_payload: usize,
    /// The most items one output message holds (1: no frames).
    pub frame_items: usize,
    /// Lost connections so far: see `acks`.
    pub disconnects: crate::acks::Disconnects,
    /// Records what becomes of sampled items, when the Pipeline traces.
    pub tracer: Option<Tracer>,
    /// Exports spans over OTLP, when the environment asks for it.
    pub spans: Option<Spans>,
    /// Where a message delivered again is recorded while it runs alone: see `crashes`.
    pub crashes: CrashRecords,
    /// Where what became of each input is recorded before it is acknowledged (see `books`).
    pub books: Option<Arc<crate::books::Ledger>>,
    /// The sources whose jobs are followed to their end, and who reads what this unit stores:
    /// each item of theirs gets an account before its input is acknowledged
    /// (`switchyard_crds::jobs`).
    pub jobs: Option<Jobs>,
    /// A join unit: where it keeps the parts of the items it waits on (`joining`).
    pub join: Option<crate::join::Join>,
    /// A branch of a join: each item's outputs go to it as one part (`branch`).
    pub branch: Option<switchyard_crds::join::BranchConfig>,
}

/// What a unit needs to account for the items of followed jobs.
pub struct Jobs {
    pub config: switchyard_crds::unit::JobsConfig,
    pub readers: Vec<String>,
}

impl Worker {
    pub(super) fn is_sink(&self) -> bool {
        matches!(self.output, Output::Sink { .. })
    }
}
