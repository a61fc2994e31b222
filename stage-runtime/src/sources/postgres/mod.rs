//! The postgres source, in two modes: the rows of a table dispatched as jobs, claimed with leases
//! and their outcomes written back (`claims`), or a table it must not write followed by a column
//! that only grows, as a file source follows new lines (`follow`). What both need is in `table`;
//! the claims' statements are in `statements`, and the jobs they follow to their end in `tracker`.

mod claims;
mod follow;
mod statements;
mod table;
mod tracker;

use switchyard_crds::postgres::PostgresSource as Settings;

use super::error::SourceError;
use super::unit::{Source, SourceUnit};

pub struct PostgresSource<'a>(pub &'a Settings);

impl Source for PostgresSource<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        match &self.0.follow {
            Some(following) => follow::run(self.0, following, unit).await,
            None => claims::run(self.0, unit).await,
        }
    }
}
