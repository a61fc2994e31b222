//! The Switchyard operator and the `switchyard` command's machinery: the plan (what a Pipeline becomes),
//! the controller that applies it in a cluster, and local mode (`switchyard run`).

pub mod autoscale;
pub mod bench;
pub mod controller;
pub mod load;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod reports;
