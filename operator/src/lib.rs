//! The Switchyard operator: the plan (what a Pipeline becomes in a cluster), the controller that applies
//! it, and the autoscaling decision that both the controller and local mode (`switchyard-local`) take.

pub mod autoscale;
pub mod controller;
pub mod metrics;
pub mod pause;
pub mod plan;
pub mod reports;
pub mod uninstall;
