//! The dead-letter queue: what failed, where, why and how often; replayed into the unit that failed
//! it, or purged.
//!
//! Dead letters are messages of the Pipeline's stream on its dead-letter subjects, held there by the
//! `_dead_letters` consumer, which nobody acknowledges. Listing reads them with a consumer of its own;
//! replaying and purging remove them by subject purges and deletes (see `Removal`), a replayed one
//! only once its copy is stored.
//!
//! `read` lists and groups them, `removal` decides and carries out how they leave the queue,
//! `replay` puts them back (or purges them).

mod read;
mod removal;
mod replay;
#[cfg(test)]
mod tests;

pub use read::*;
pub use removal::*;
pub use replay::*;
