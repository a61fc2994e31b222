//! The operator: reconciles each Pipeline into its NATS stream, bucket and consumers, a ConfigMap and a
//! Deployment per unit (server-side apply, one field manager, owner references), prunes units that left
//! the spec, cleans NATS up on deletion, reports status conditions and Events, and scales switchers.
//!
//! | file | step |
//! |---|---|
//! | `reconcile.rs` | the steps in order, the finalizer, and where failures become conditions |
//! | `resolve.rs` | references: the NATS server and the credentials Secret |
//! | `migrate.rs` | an edit that needs steps, carried out one step at a time instead of the apply |
//! | `apply.rs` | NATS objects, then ConfigMaps and Deployments (only when changed), pruning |
//! | `observe.rs` | rollout state of each Deployment, lag and dead letters from NATS |
//! | `status.rs` | the status, computed purely from what was observed |
//! | `cleanup.rs` | deletion, bounded so that it never strands a namespace |
//! | `errors.rs` | the error of each step, its condition reason and metric label |
//! | `runner.rs` | watches, caches, leader election, the process |
//! | `autoscaler.rs` | switchers' replicas from lag and reports |
//! | `context.rs` | what they all share: the `Context`, the operator's names and intervals, Events |
//! | `memory.rs` | what the operator remembers between reconciles (claims, resyncs, credentials, scaling) |
//! | `keys.rs` | how the maps above name a Pipeline and a unit |

pub mod apply;
pub mod autoscaler;
pub mod caches;
pub mod cleanup;
pub mod context;
pub mod errors;
pub mod keys;
pub mod memory;
pub mod migrate;
pub mod nats;
pub mod observe;
pub mod reconcile;
pub mod resolve;
pub mod runner;
pub mod status;

pub use context::{
    Context, FIELD_MANAGER, FINALIZER, REFRESH, REFRESH_SWITCHERS, SCALE_FIELD_MANAGER,
};
pub use errors::Error;
pub use reconcile::{error_policy, reconcile, retry_delay};
pub use runner::{run, run_with, OperatorOptions};
