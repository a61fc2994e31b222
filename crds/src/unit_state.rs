//! A unit as it runs or is to run, as a migration compares them: its process configuration and
//! what its pods are made of besides. Below `migration.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::topology::{Topology, Unit};
use crate::unit::UnitConfig;

/// A unit as it runs, or is to run: its process configuration, and what its processes are made of
/// besides (image, env, resources, replicas: aspect → value), which the caller knows and the config
/// does not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitState {
    pub config: UnitConfig,
    #[serde(default)]
    pub pod: BTreeMap<String, String>,
}

/// The aspect of `UnitState::pod` that holds a switcher's bounds: changing it rescales, never rolls.
pub const REPLICAS: &str = "replicas";

/// What a unit's pods are made of besides its configuration, as `UnitState::pod` compares them.
pub fn pod_aspects(unit: &Unit) -> BTreeMap<String, String> {
    let json = |value: serde_json::Result<String>| value.unwrap_or_default();
    let mut aspects = BTreeMap::new();
    if let Some(image) = &unit.image {
        aspects.insert("image".to_string(), image.clone());
    }
    if !unit.env.is_empty() {
        aspects.insert("env".to_string(), json(serde_json::to_string(&unit.env)));
    }
    if let Some(resources) = &unit.resources {
        aspects.insert(
            "resources".to_string(),
            json(serde_json::to_string(resources)),
        );
    }
    if let Some(selector) = &unit.node_selector {
        aspects.insert(
            "nodeSelector".to_string(),
            json(serde_json::to_string(selector)),
        );
    }
    if let Some(tolerations) = &unit.tolerations {
        aspects.insert(
            "tolerations".to_string(),
            json(serde_json::to_string(tolerations)),
        );
    }
    if let Some(switcher) = &unit.switcher {
        let mut text = format!(
            "{}..{}, lag {}/replica, utilization {}%",
            switcher.min_replicas,
            switcher.max_replicas,
            switcher.target_lag_per_replica,
            switcher.target_utilization
        );
        if let Some(window) = &switcher.scale_down_stabilization {
            text.push_str(&format!(", scale down after {window}"));
        }
        aspects.insert(REPLICAS.to_string(), text);
    }
    aspects
}

/// The units a topology lays out, as the planner takes them.
pub fn unit_states(topology: &Topology, layout: &Layout) -> Vec<UnitState> {
    topology
        .units
        .iter()
        .zip(&layout.units)
        .map(|(unit, config)| UnitState {
            config: config.clone(),
            pod: pod_aspects(unit),
        })
        .collect()
}
