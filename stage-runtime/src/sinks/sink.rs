//! What a kind of sink is: opened once from its settings as the unit starts, then handed one message
//! at a time. Below every kind's file; `sinks/mod.rs` registers the kinds.

use std::future::Future;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::lineage::Lineage;
use crate::retry::StepError;

/// What became of a message handed to a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    New,
    /// A redelivery of a message this sink already wrote: skipped, so it appears once.
    Duplicate,
}

/// Why a sink cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open the sink file {} or its ledger: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Endpoint(#[from] crate::http::EndpointError),
    #[error("sink {unit}: the postgres sink cannot write: {message}")]
    Postgres { unit: String, message: String },
}

/// One kind of sink. Boxed futures: a sink's write costs far more than the allocation.
pub trait Sink: Send + Sync {
    /// Writes one message; a failure says whether another attempt may succeed.
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>>;

    /// Writes a message whose write failed together with others' (`StepError::suspect`: a
    /// connection a crash of the service broke), with nothing else in flight beside it, so that what
    /// fails here is its own. A sink whose failures are always a message's own just writes it.
    fn write_alone<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        self.write(lineage, payload)
    }

    /// Makes sure everything written has left the process.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// How a kind of sink is made from its settings (what its variant of `SinkKind` holds), once, as
/// the unit starts. Settings it cannot use, or a destination that refuses it, are a `SinkError`
/// that stops the unit with a message naming it.
pub trait OpenSink: Sink + Sized + 'static {
    type Settings;

    fn open_with(
        settings: &Self::Settings,
        context: &SinkContext<'_>,
    ) -> impl Future<Output = Result<Self, SinkError>> + Send;
}

/// What a sink may borrow from its unit when it is opened.
pub struct SinkContext<'a> {
    /// The unit's name, for messages.
    pub unit: &'a str,
    /// The unit's connection to NATS.
    pub client: &'a async_nats::Client,
    /// The life of the stream the sink reads (see the file sink's ledger).
    pub instance: &'a str,
}
