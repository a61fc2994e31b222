//! What the operator observed of a Pipeline: its status, as the API server stores it and
//! `kubectl get` and `switchyard status` show it. Below `pipeline.rs`, which names it the
//! resource's status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// "ready/total" units, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_summary: Option<String>,
    /// Total queue lag over all units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    #[serde(default)]
    pub units: Vec<UnitStatus>,
    /// The epoch each publisher is at after the migrations so far (absent: 0): its messages go to
    /// `data.<unit>_<epoch>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, u32>,
    /// An edit being carried out step by step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The books per edge: the items a unit stored for the next and what that one took in, each
    /// counted once however often it was delivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<EdgeStatus>,
}

/// One edge of a Pipeline's books.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct EdgeStatus {
    /// The unit that stored the items.
    pub from: String,
    /// The subject's epoch (edits move a unit's output to a new one); absent: 0.
    #[serde(default, skip_serializing_if = "is_zero_epoch")]
    pub epoch: u32,
    /// The unit that reads them.
    pub to: String,
    pub stored: u64,
    pub taken_in: u64,
    /// The reader had nothing pending or unacknowledged: stored and taken in must agree.
    #[serde(default)]
    pub settled: bool,
}

fn is_zero_epoch(epoch: &u32) -> bool {
    *epoch == 0
}

/// An edit of a running Pipeline being carried out, step by step; an operator that restarts goes on
/// from the step it was at.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The generation the migration brings the Pipeline to; a later edit waits for it.
    pub generation: i64,
    /// Steps done so far.
    pub done: u32,
    /// Every step, as people read it.
    #[serde(default)]
    pub steps: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// What the operator executes: the target spec, its epochs and the steps.
    #[schemars(schema_with = "opaque_object")]
    pub plan: serde_json::Value,
}

fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default)]
    pub desired_replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub lag: u64,
    /// Inputs finished per second by the unit's live replicas, as they report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(default)]
    pub dead_lettered: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// For a postgres source: where the rows of its table stand, as it last counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<RowCounts>,
    /// For a join: the items it waits on, as its live replicas report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinWaiting>,
}

/// The items a join waits on (some of their branches have given their parts, not all), and how
/// long the oldest has waited.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinWaiting {
    pub waiting: u64,
    pub oldest_wait_seconds: u64,
}

impl JoinWaiting {
    /// One line for a person: `120 waiting, the oldest for 3s`.
    pub fn describe(&self) -> String {
        if self.waiting == 0 {
            return "nothing waiting".to_string();
        }
        format!(
            "{} waiting, the oldest for {}s",
            self.waiting, self.oldest_wait_seconds
        )
    }
}

/// Where the rows of a postgres source's table stand (those its `where` selects), as the source
/// last counted them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RowCounts {
    /// Not finished and not under a running lease: the next claims take them.
    pub waiting: u64,
    /// Under a lease that still runs: on their way through the Pipeline.
    pub claimed: u64,
    /// Finished with success.
    pub succeeded: u64,
    /// Finished as failed (dead-lettered, or given up after their last attempt).
    pub failed: u64,
}

impl RowCounts {
    /// One line for a person: `12 waiting, 30 claimed, 99950 succeeded, 8 failed`.
    pub fn describe(&self) -> String {
        format!(
            "{} waiting, {} claimed, {} succeeded, {} failed",
            self.waiting, self.claimed, self.succeeded, self.failed
        )
    }
}
