//! A Pipeline as every day-2 operation sees it, and why an operation could not be done: below
//! every operation.

use switchyard_crds::layout::{Layout, Names};
use switchyard_crds::topology::Topology;

/// A Pipeline as the day-2 commands see it.
pub struct Target {
    pub names: Names,
    pub topology: Topology,
    pub layout: Layout,
    pub js: async_nats::jetstream::Context,
}

impl Target {
    /// The Pipeline's stream.
    pub(crate) async fn stream(&self) -> Result<async_nats::jetstream::stream::Stream, OpsError> {
        self.js
            .get_stream(&self.layout.nats.stream.name)
            .await
            .map_err(OpsError::nats("open the Pipeline's stream"))
    }
}

/// Why an operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot {action}: {source}")]
    Nats {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Usage(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl OpsError {
    pub(crate) fn nats<E: std::error::Error + Send + Sync + 'static>(
        action: impl Into<String>,
    ) -> impl FnOnce(E) -> OpsError {
        let action = action.into();
        move |e| OpsError::Nats {
            action,
            source: Box::new(e),
        }
    }
}
