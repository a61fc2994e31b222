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
pub mod target;
pub mod text;
pub mod trace;

pub use target::{OpsError, Target};
pub use text::{thousands, when};
