//! Where a sink unit puts the messages it reads. One file per kind of sink, each a [`Sink`] opened
//! by [`OpenSink`] (`sink.rs`) and registered in one line of `open`; the file sink's exactly-once
//! ledger is in `ledger.rs`.

mod file;
pub mod http;
mod ledger;
mod log;
mod nats;
mod postgres;
mod sink;
/// The postgres sink's statement, for the benchmark's raw loop of it.
pub use postgres::statement as postgres_statement;
pub use sink::{OpenSink, Sink, SinkContext, SinkError, Written};

use bytes::Bytes;
use switchyard_crds::SinkKind;

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::{GaveUp, Retrying, StepError};
use crate::steps::Failure;
use switchyard_crds::unit::RetryConfig;

/// Opens the sink `kind` for `unit`: one line a kind, the variant of `SinkKind` and the type that
/// writes it. `instance` names the life of the stream the sink reads (see the ledger).
pub async fn open(
    unit: &str,
    kind: &SinkKind,
    client: &async_nats::Client,
    instance: &str,
) -> Result<Box<dyn Sink>, SinkError> {
    let context = SinkContext {
        unit,
        client,
        instance,
    };
    match kind {
        SinkKind::File(settings) => opened::<file::FileSink>(settings, &context).await,
        SinkKind::Log(settings) => opened::<log::LogSink>(settings, &context).await,
        SinkKind::Nats(settings) => opened::<nats::NatsSink>(settings, &context).await,
        SinkKind::Http(settings) => opened::<http::HttpSink>(settings, &context).await,
        SinkKind::Postgres(settings) => opened::<postgres::PostgresSink>(settings, &context).await,
    }
}

async fn opened<S: OpenSink>(
    settings: &S::Settings,
    context: &SinkContext<'_>,
) -> Result<Box<dyn Sink>, SinkError> {
    Ok(Box::new(S::open_with(settings, context).await?))
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
