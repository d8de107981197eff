//! The placement controller, run by the elected coordinator: keeps every expert of every MoE layer
//! on at least one live worker.
//!
//! [`reconcile`] is the whole policy, as a pure function: hosts that left the registry are dropped,
//! what live workers that the map does not name yet report they serve is added, and an expert that *had* hosts and lost them all is
//! assigned to the live worker with the fewest assignments (in every layer where it is orphaned),
//! which loads it from the checkpoint. Experts that never had a host are left alone: that is a
//! deployment still starting (or an incomplete one), which the coordinators report, not something
//! to paper over by loading everything onto the first worker that registered.

use std::collections::{BTreeMap, BTreeSet};

use epserve_proto::metric_names as m;
use tokio::sync::watch;

use crate::plane::ControlPlane;
use crate::registry::Fence;
use crate::types::{Instance, LayerPlacement, PlacementMap};

/// The MoE layers and expert count of the served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub moe_layers: Vec<u32>,
    pub num_experts: u32,
}

/// The map the cluster should have given `current` and the live workers; `None` when `current` is
/// already right. The result keeps `current`'s version (the compare-and-swap token).
pub fn reconcile(layout: &Layout, current: Option<&PlacementMap>, live: &[Instance]) -> Option<PlacementMap> {
    let live_ids: BTreeSet<&str> = live.iter().map(|w| w.id.as_str()).collect();
    let mut layers: Vec<LayerPlacement> = layout
        .moe_layers
        .iter()
        .map(|&layer| LayerPlacement {
            layer,
            hosts: (0..layout.num_experts)
                .map(|e| {
                    current
                        .map(|c| c.hosts(layer, e))
                        .unwrap_or_default()
                        .iter()
                        .filter(|h| live_ids.contains(h.as_str()))
                        .cloned()
                        .collect()
                })
                .collect(),
        })
        .collect();
    // What a worker reports is added only while the map does not name it at all (the first map,
    // a worker that joined or came back): once it is placed, the map is what it serves, and a
    // rebalanced map may have taken experts off it that it still holds until every coordinator
    // has stopped using them (see `crate::types::Instance::placement_version`).
    let placed: BTreeSet<&str> = current.map(PlacementMap::workers).unwrap_or_default();
    for w in live.iter().filter(|w| !placed.contains(w.id.as_str())) {
        for l in &mut layers {
            for e in (0..layout.num_experts).filter(|&e| w.hosts(l.layer, e)) {
                let hosts = &mut l.hosts[e as usize];
                if !hosts.contains(&w.id) {
                    hosts.push(w.id.clone());
                }
            }
        }
    }
    // Orphans: experts that had a host in `current` and have none now.
    let mut load: BTreeMap<&str, usize> = live.iter().map(|w| (w.id.as_str(), 0)).collect();
    for l in &layers {
        for hosts in &l.hosts {
            for h in hosts {
                if let Some(n) = load.get_mut(h.as_str()) {
                    *n += 1;
                }
            }
        }
    }
    for e in 0..layout.num_experts {
        let orphaned: Vec<usize> = layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.hosts[e as usize].is_empty() && current.is_some_and(|c| !c.hosts(l.layer, e).is_empty()))
            .map(|(i, _)| i)
            .collect();
        if orphaned.is_empty() {
            continue;
        }
        let Some((&target, _)) = load.iter().min_by_key(|(id, n)| (**n, **id)) else { break };
        for i in &orphaned {
            layers[*i].hosts[e as usize].push(target.to_owned());
        }
        *load.entry(target).or_default() += orphaned.len();
        tracing::info!(expert = e, worker = target, "expert lost every host: assigned to {target}");
    }
    let next = PlacementMap { version: current.map_or(0, |c| c.version), layers };
    (current != Some(&next)).then_some(next)
}

/// While `leading` says so, keeps the stored placement reconciled with the live workers. Runs until
/// the receivers' senders are gone.
pub async fn run(
    plane: ControlPlane,
    layout: Layout,
    mut leading: watch::Receiver<Option<Fence>>,
    mut workers: watch::Receiver<Vec<Instance>>,
    mut placement: watch::Receiver<Option<PlacementMap>>,
) {
    loop {
        let fence = leading.borrow_and_update().clone();
        if let Some(fence) = fence {
            let live = workers.borrow_and_update().clone();
            metrics::gauge!(m::CONTROL_LIVE_WORKERS).set(live.len() as f64);
            // Read the map from the registry rather than the follower's copy: the compare-and-swap
            // must be against the latest version.
            match plane.placement().await {
                Ok(current) => {
                    if let Some(next) = reconcile(&layout, current.as_ref(), &live) {
                        match plane.swap_placement(&next, Some(&fence)).await {
                            Ok(true) => tracing::info!(version = next.version + 1, "placement updated"),
                            Ok(false) => {
                                // Changed concurrently, or this coordinator no longer leads (the
                                // campaign will say so).
                                tracing::info!(
                                    "placement not written: changed concurrently or leadership lost; reconciling again"
                                );
                                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                continue;
                            }
                            Err(e) => tracing::warn!("writing the placement: {e}"),
                        }
                    }
                }
                Err(e) => tracing::warn!("reading the placement: {e}"),
            }
        }
        tokio::select! {
            r = leading.changed() => if r.is_err() { return },
            r = workers.changed() => if r.is_err() { return },
            r = placement.changed() => if r.is_err() { return },
            // Retry after registry errors without waiting for a change.
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Kind;

    fn worker(id: &str, experts: &[u32]) -> Instance {
        Instance { experts: experts.to_vec(), ..Instance::new(Kind::Worker, id, "x:1") }
    }

    fn layout() -> Layout {
        Layout { moe_layers: vec![0, 2], num_experts: 4 }
    }

    #[test]
    fn first_map_comes_from_what_workers_host() {
        let live = [worker("a", &[0, 1]), worker("b", &[2, 3, 0])];
        let map = reconcile(&layout(), None, &live).expect("a new map");
        assert_eq!(map.version, 0);
        assert_eq!(map.hosts(0, 0), ["a", "b"]);
        assert_eq!(map.hosts(2, 3), ["b"]);
        assert!(reconcile(&layout(), Some(&map), &live).is_none(), "stable once written");
    }

    #[test]
    fn dead_hosts_are_dropped_and_orphans_reassigned_to_the_least_loaded() {
        let all = [worker("a", &[0, 1]), worker("b", &[2]), worker("c", &[3])];
        let mut map = reconcile(&layout(), None, &all).expect("map");
        map.version = 7;
        // `a` dies: experts 0 and 1 lose their only host.
        let live = [worker("b", &[2]), worker("c", &[3])];
        let next = reconcile(&layout(), Some(&map), &live).expect("changed");
        assert_eq!(next.version, 7, "keeps the CAS token");
        let hosts0 = next.hosts(0, 0).to_vec();
        let hosts1 = next.hosts(0, 1).to_vec();
        assert_eq!(hosts0.len(), 1);
        assert_ne!(hosts0, hosts1, "spread over the survivors");
        assert_eq!(next.hosts(2, 0), hosts0.as_slice(), "same worker in every layer");
        assert!(next.layers.iter().all(|l| l.hosts.iter().all(|h| !h.contains(&"a".to_owned()))));
    }

    #[test]
    fn replicas_survive_without_reassignment_and_returning_workers_are_added_back() {
        let all = [worker("a", &[0, 1, 2, 3]), worker("b", &[0, 1, 2, 3])];
        let map = reconcile(&layout(), None, &all).expect("map");
        let next = reconcile(&layout(), Some(&map), &all[1..]).expect("a dropped");
        assert_eq!(next.hosts(0, 0), ["b"]);
        let back = reconcile(&layout(), Some(&next), &all).expect("a back");
        assert_eq!(back.hosts(2, 1), ["b", "a"]);
    }

    #[test]
    fn experts_that_never_had_a_host_are_not_invented() {
        let map = reconcile(&layout(), None, &[worker("a", &[0])]).expect("map");
        assert!(map.hosts(0, 1).is_empty());
        assert!(reconcile(&layout(), Some(&map), &[worker("a", &[0])]).is_none());
    }
}
