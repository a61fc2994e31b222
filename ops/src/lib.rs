//! Day-2 operations on a Pipeline: what its NATS holds, read and changed without disturbing the units.
//!
//! Every operation takes a JetStream context and the Pipeline's layout; where the NATS is (a local
//! run's state, `--nats-url`, a port-forward into a cluster) is the caller's business. Reading never
//! acknowledges: it goes through ordered consumers of its own that the server forgets afterwards.

pub mod books;
pub mod dlq;
pub mod graph;
pub mod read;
pub mod status;
pub mod tap;
pub mod trace;

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

/// A time as people read it, in UTC to the millisecond.
pub fn when(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| unix_ms.to_string())
}

/// 12345 → "12,345".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
