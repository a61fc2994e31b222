//! Switchyard's API: the `Pipeline` custom resource, what it means (its units and their wiring), its
//! validation, how it maps onto NATS, and the per-unit configuration that the operator hands to the stage
//! runtime.

pub mod autoscale;
pub mod books;
pub mod crd;
pub mod duration;
pub mod epochs;
pub mod jobs;
pub mod join;
pub mod join_state;
pub mod jq;
pub mod kinds;
pub mod layout;
pub mod load;
pub mod migration;
pub mod names;
pub mod pipeline;
pub mod postgres;
pub mod postgres_checks;
pub mod problem;
pub mod secret;
pub mod status;
pub mod topology;
pub mod unit;
pub mod unit_state;
pub mod validate;

pub use crd::crd_yaml;
pub use pipeline::*;
