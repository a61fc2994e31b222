//! Why a source stops: below every other room of the sources.

use std::path::PathBuf;

use async_nats::jetstream::{context::PublishError, kv};
use async_nats::Subject;

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the source's checkpoint: {0}")]
    ReadCheckpoint(#[from] kv::EntryError),
    #[error("cannot save the source's checkpoint: {0}")]
    SaveCheckpoint(#[from] kv::PutError),
    #[error("cannot publish to {subject}: {source}")]
    Publish {
        subject: Subject,
        source: PublishError,
    },
    #[error("a publish was not acknowledged: {0}")]
    Unacknowledged(PublishError),
    #[error(transparent)]
    ConnectionLost(#[from] crate::acks::ConnectionLost),
    #[error(transparent)]
    Books(#[from] crate::books::BooksError),
    #[error("the task that waits for a message to be stored and recorded ended: {0}")]
    Task(tokio::task::JoinError),
    /// The input of a file source is missing or unreadable.
    #[error("cannot read {}: {source}{hint}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("cannot listen on port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("http.bearerToken.env names {var}, which is not set (or empty) in this unit's environment: {hint}")]
    MissingToken { var: String, hint: &'static str },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
    /// After a restart, what an earlier run stored could not be read back to compare.
    #[error("cannot read back what the source stored before it restarted: {0}")]
    Recover(String),
    /// The source's settings cannot be used (validation catches these before a unit runs).
    #[error("{0}")]
    Settings(String),
    /// The accounts of the source's jobs cannot be read (`switchyard_crds::jobs`).
    #[error("cannot follow the source's jobs: {0}")]
    Jobs(String),
}

impl SourceError {
    /// A file source's input is not there: trying again will not help.
    pub(super) fn is_missing_input(&self) -> bool {
        matches!(self, SourceError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}
