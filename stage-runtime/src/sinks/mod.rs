//! Where a sink unit puts the messages it reads. One file per kind of sink, each behind [`Sink`]; the
//! file sink's exactly-once ledger is in `ledger.rs`.

mod file;
pub mod http;
mod ledger;
mod log;
mod nats;
mod postgres;
/// The postgres sink's statement, for the benchmark's raw loop of it.
pub use postgres::statement as postgres_statement;

use bytes::Bytes;
use futures::future::BoxFuture;
use switchyard_crds::SinkKind;

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::{GaveUp, Retrying, StepError};
use crate::steps::Failure;
use switchyard_crds::unit::RetryConfig;

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

/// Opens the sink `kind` for `unit`. `instance` names the life of the stream the sink reads (see the
/// ledger).
pub async fn open(
    unit: &str,
    kind: &SinkKind,
    client: &async_nats::Client,
    instance: &str,
) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match kind {
        SinkKind::File(settings) => Box::new(file::FileSink::open(
            std::path::Path::new(&settings.path),
            instance,
        )?),
        SinkKind::Log(_) => Box::new(log::LogSink),
        SinkKind::Nats(settings) => Box::new(nats::NatsSink::new(unit, settings, client)),
        SinkKind::Http(settings) => Box::new(http::HttpSink::new(settings)?),
        SinkKind::Postgres(settings) => {
            Box::new(postgres::PostgresSink::open(unit, settings).await?)
        }
    })
}

/// Writes one message, retrying as `retry` says. A suspect failure does not count until the message
/// is written alone and fails there too.
pub async fn write_with_retry(
    sink: &dyn Sink,
    retry: &RetryConfig,
    unit: &str,
    lineage: &Lineage,
    payload: Bytes,
) -> Result<Written, Failure> {
    let mut retry = Retrying::new(retry, unit);
    loop {
        let error = match sink.write(lineage, payload.clone()).await {
            Ok(written) => return Ok(written),
            Err(e) if e.suspect => match sink.write_alone(lineage, payload.clone()).await {
                Ok(written) => return Ok(written),
                Err(e) => StepError {
                    suspect: false,
                    ..e
                },
            },
            Err(e) => e,
        };
        if let Err(GaveUp { error, attempts }) = retry.after(error).await {
            return Err(Failure {
                item: Payload::Bytes(payload),
                error: error.message,
                attempts,
                deliveries: None,
            });
        }
    }
}
