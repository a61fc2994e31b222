//! Source units: they create messages and store them in the pipeline's stream. One file per kind of
//! source, each a [`Source`] registered in one line of `run`; what they share is below them:
//! `unit.rs` (what a source is given: checkpoints, stopping, publishing), `publish.rs` (sending in a
//! window, acknowledgements, book records), `framer.rs` (frames cut alike after a restart),
//! `template.rs`, `error.rs`.
//!
//! Every message gets an id derived from what it is (the generator's sequence number, the file and line,
//! the timer tick), so a source restarted from its last checkpoint republishes what was not yet
//! checkpointed and JetStream drops what it already has.

mod cron;
mod error;
mod file;
mod framer;
mod generator;
mod http;
mod nats;
mod postgres;
mod publish;
mod template;
mod timer;
mod unit;

use switchyard_crds::SourceKind;

pub use error::SourceError;
pub use unit::{Source, SourceUnit};

/// Runs the source `kind` as `unit`.
pub async fn run(kind: &SourceKind, unit: &SourceUnit) -> Result<(), SourceError> {
    match kind {
        SourceKind::Generator(settings) => generator::Generator(settings).run(unit).await,
        SourceKind::File(settings) => file::FileSource(settings).run(unit).await,
        SourceKind::Timer(settings) => timer::Timer(settings).run(unit).await,
        SourceKind::Cron(settings) => cron::Cron(settings).run(unit).await,
        SourceKind::Http(settings) => http::HttpSource(settings).run(unit).await,
        SourceKind::Nats(settings) => nats::NatsSource(settings).run(unit).await,
        SourceKind::Postgres(settings) => postgres::PostgresSource(settings).run(unit).await,
    }
}
