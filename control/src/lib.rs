//! The control plane: where instances find each other and agree on which worker hosts which
//! expert. A [`Registry`] backend (in-memory, or etcd) stores leases and versioned keys; on top of
//! it [`ControlPlane`] offers instance registration under a kept-alive lease, followers of the
//! instance lists and of the placement map, compare-and-swap of the placement, and leader election;
//! [`controller`] is the policy the elected coordinator runs to keep every expert hosted.
//!
//! Boundaries: no model compute and no data-plane traffic — exchanges never pass through here.
//! Key layout (under `/epserve/<cluster>/` in etcd): `instances/<kind>/<id>` (JSON [`Instance`],
//! under the instance's lease), `placement` ([`PlacementMap`], version = the key's version),
//! `leader/<election>` (the leader's id, under its lease).

pub mod address;
mod connection;
pub mod controller;
mod etcd;
mod memory;
mod plane;
mod registry;
mod registry_security;
mod types;

pub use connection::{ConnectError, ControlConnection};
pub use etcd::EtcdRegistry;
pub use memory::MemoryRegistry;
pub use plane::{ControlPlane, MemberState, Membership, connect, connect_with};
pub use registry::{BoxFuture, Changes, Entry, Fence, LeaseId, Registry, RegistryError, Result};
pub use registry_security::RegistrySecurity;
pub use types::{Instance, Kind, LayerPlacement, PLACEMENT_KEY, PlacementMap, instance_key, instances_prefix};
