//! Where a sink unit puts the messages it reads. One file per kind of sink, each behind [`Sink`]; the
//! file sink's exactly-once ledger is in `ledger.rs`.

mod file;
mod http;
mod ledger;
mod log;
mod nats;

use bytes::Bytes;
use futures::future::BoxFuture;
use switchyard_crds::SinkKind;

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
}

/// One kind of sink. Boxed futures: a sink's write costs far more than the allocation.
pub trait Sink: Send + Sync {
    /// Writes one message; a failure says whether another attempt may succeed.
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>>;

    /// Makes sure everything written has left the process.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Opens the sink `kind` for `unit`. `instance` names the life of the stream the sink reads (see the
/// ledger).
pub fn open(
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
    })
}
