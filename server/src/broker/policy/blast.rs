//! The blast radius: how much a request could touch, as one number that
//! policy reads (`context.blast_radius`) and the broker compares with its
//! approval threshold.
//!
//! `blast_radius = breadth × sensitivity × action weight`, where
//! - breadth is the number of distinct targets (1 when there are none: the
//!   tool itself), a target ending in `*` counting `wildcard_breadth`;
//! - sensitivity is the highest of the tool's and the targets' sensitivity
//!   in the resources file (`default_sensitivity` for one it does not name);
//! - the action weight is the highest weight of the requested actions
//!   (`default_action` for an action the weights do not name).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::resources::Resources;
use super::types::AccessRequest;

/// The weights of the blast-radius formula (`[broker.blast_radius]` in
/// the server's TOML; every field may be left out).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlastWeights {
    /// Weight per action name. A table in the TOML adds to (or overrides
    /// entries of) the defaults: read=1, list=1, write=3, create=3,
    /// update=3, delete=5, transfer=5.
    #[serde(deserialize_with = "merge_actions")]
    pub actions: BTreeMap<String, i64>,
    /// The weight of an action not in `actions` (2).
    pub default_action: i64,
    /// What a target ending in `*` counts towards breadth (10).
    pub wildcard_breadth: i64,
    /// The sensitivity of a resource the resources file does not name (1).
    pub default_sensitivity: i64,
}

impl Default for BlastWeights {
    fn default() -> Self {
        Self {
            actions: default_actions(),
            default_action: 2,
            wildcard_breadth: 10,
            default_sensitivity: 1,
        }
    }
}

fn default_actions() -> BTreeMap<String, i64> {
    [
        ("read", 1),
        ("list", 1),
        ("write", 3),
        ("create", 3),
        ("update", 3),
        ("delete", 5),
        ("transfer", 5),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The defaults with the file's entries laid over them.
fn merge_actions<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, i64>, D::Error> {
    let mut actions = default_actions();
    actions.extend(BTreeMap::<String, i64>::deserialize(d)?);
    Ok(actions)
}

/// The formula's three factors and their product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Blast {
    pub breadth: i64,
    pub sensitivity: i64,
    pub weight: i64,
    pub radius: i64,
}

impl Blast {
    /// The blast radius of `req` given the weights and the resources file.
    pub fn of(req: &AccessRequest, weights: &BlastWeights, resources: &Resources) -> Self {
        let sensitivity_of =
            |id: &str| resources.get(id).map_or(weights.default_sensitivity, |r| r.sensitivity);
        let mut targets: Vec<&str> = req.targets.iter().map(String::as_str).collect();
        targets.sort_unstable();
        targets.dedup();
        let breadth = if targets.is_empty() {
            1
        } else {
            targets
                .iter()
                .map(|t| if t.ends_with('*') { weights.wildcard_breadth } else { 1 })
                .fold(0i64, i64::saturating_add)
        };
        let sensitivity = targets
            .iter()
            .map(|t| sensitivity_of(t))
            .chain(std::iter::once(sensitivity_of(&req.tool)))
            .max()
            .unwrap_or(weights.default_sensitivity);
        let weight = req
            .actions
            .iter()
            .map(|a| weights.actions.get(a).copied().unwrap_or(weights.default_action))
            .max()
            .unwrap_or(weights.default_action);
        let radius = breadth.saturating_mul(sensitivity).saturating_mul(weight);
        Self { breadth, sensitivity, weight, radius }
    }
}
