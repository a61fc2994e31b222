//! The Switchyard operator: the plan (what a Pipeline becomes in a cluster) and the controller that
//! applies it. What it decides alike with local mode (unit types and replicas, the autoscaling
//! decision) is in `switchyard-crds`; the units' reports are read by `switchyard-platform`.

pub mod controller;
pub mod metrics;
pub mod pause;
pub mod plan;
pub mod uninstall;
