//! What the control plane stores: instance records and the versioned expert placement map (JSON
//! values, so that `etcdctl get` shows them readably).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Gateway,
    Coordinator,
    Worker,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Coordinator => "coordinator",
            Kind::Worker => "worker",
        }
    }
}

/// A registered process. The record lives under `instances/<kind>/<id>` as long as the process
/// keeps its lease alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Stable name (`--name`); a restarted process re-registers under the same id.
    pub id: String,
    pub kind: Kind,
    /// Where it serves (gRPC for coordinators and workers, HTTP for gateways).
    pub addr: String,
    /// Changes every time the process starts: tells a restart from a record update.
    pub incarnation: u64,
    /// Workers: the expert ids loaded and served, in every MoE layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<u32>,
    /// Workers: expert ids loaded and served in one MoE layer only (replicas placed by expert load
    /// balancing), beyond `experts`, by layer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<u32, Vec<u32>>,
    /// Coordinators: the placement version this coordinator routes by, once no exchange uses the
    /// routes of an older one (workers' replicas that the placement dropped are released only when
    /// every coordinator reports the version that dropped them). 0: none yet.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub placement_version: u64,
    /// The checkpoint served, for operators.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// False while the instance is starting (registered, e.g. to take part in elections, but not
    /// to be sent requests yet).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Instance {
    pub fn new(kind: Kind, id: impl Into<String>, addr: impl Into<String>) -> Self {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        Instance {
            id: id.into(),
            kind,
            addr: addr.into(),
            incarnation,
            experts: Vec::new(),
            replicas: BTreeMap::new(),
            placement_version: 0,
            model: String::new(),
            ready: true,
        }
    }

    pub fn key(&self) -> String {
        instance_key(self.kind, &self.id)
    }

    /// Whether this worker's record says it serves `expert` of MoE layer `layer`.
    pub fn hosts(&self, layer: u32, expert: u32) -> bool {
        self.experts.contains(&expert) || self.replicas.get(&layer).is_some_and(|r| r.contains(&expert))
    }
}

pub fn instance_key(kind: Kind, id: &str) -> String {
    format!("{}{id}", instances_prefix(kind))
}

pub fn instances_prefix(kind: Kind) -> String {
    format!("instances/{}/", kind.as_str())
}

pub const PLACEMENT_KEY: &str = "placement";

/// For every MoE layer, every expert's hosts (worker ids) in order of preference. `version` is the
/// registry's version of the key (not stored in the value): the compare-and-swap token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMap {
    #[serde(skip)]
    pub version: u64,
    pub layers: Vec<LayerPlacement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlacement {
    pub layer: u32,
    /// `hosts[expert]`: worker ids.
    pub hosts: Vec<Vec<String>>,
}

impl PlacementMap {
    /// The hosts of `(layer, expert)`, preferred first; empty when unknown.
    pub fn hosts(&self, layer: u32, expert: u32) -> &[String] {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .and_then(|l| l.hosts.get(expert as usize))
            .map_or(&[], Vec::as_slice)
    }

    /// The `(layer, expert)` pairs assigned to `worker`.
    pub fn pairs_of(&self, worker: &str) -> BTreeSet<(u32, u32)> {
        let mut out = BTreeSet::new();
        for l in &self.layers {
            for (e, hosts) in l.hosts.iter().enumerate() {
                if hosts.iter().any(|h| h == worker) {
                    out.insert((l.layer, e as u32));
                }
            }
        }
        out
    }

    /// Every worker id named as a host.
    pub fn workers(&self) -> BTreeSet<&str> {
        self.layers.iter().flat_map(|l| l.hosts.iter().flatten().map(String::as_str)).collect()
    }

    /// The expert ids assigned to `worker` in any layer.
    pub fn experts_of(&self, worker: &str) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for l in &self.layers {
            for (e, hosts) in l.hosts.iter().enumerate() {
                if hosts.iter().any(|h| h == worker) {
                    out.insert(e as u32);
                }
            }
        }
        out
    }
}
