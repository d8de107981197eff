//! Placement planners. Both plan each MoE layer on its own (every layer is its own exchange, so its
//! slowest worker is what the step waits on) over the same workers and slot count:
//!
//! - [`balanced`]: DeepSeek's EPLB, global variant — give one more replica at a time to the expert
//!   with the highest load per replica until the redundant slots (`workers·slots − experts`) are
//!   used, pack the replicas heaviest first onto the least-loaded worker with a free slot that does
//!   not already hold that expert, then improve by swapping replicas off the most loaded worker.
//!   It ignores where experts are now; [`align_to`] relabels its workers per layer to keep as many
//!   replicas where they are as it can.
//! - [`cost_aware`]: starts from the current placement and takes one move at a time (drop a
//!   redundant replica, add a replica in a free slot, move a replica, replace a redundant replica),
//!   always the one that lowers the layer's objective most per byte moved, recording a
//!   [`ParetoPoint`] at each step: bytes moved against aggregate imbalance.
//!
//! Everything is deterministic: ties go to the lower expert id, then the lower worker index.

mod balanced;
mod cost_aware;
mod layer;

use std::collections::BTreeSet;

use epserve_control::{LayerPlacement, PlacementMap};
use serde::Serialize;

use crate::error::PlanError;
use crate::load::LoadMatrix;

pub use balanced::balanced;
pub use cost_aware::cost_aware;

/// One placement of a cost-aware plan's trade-off: no other point moves fewer bytes for a lower
/// imbalance.
#[derive(Debug, Clone, Serialize)]
pub struct ParetoPoint {
    pub placement: PlacementMap,
    pub moved_bytes: u64,
    pub imbalance_aggregate: f64,
}

/// Contiguous sharding, what `--experts A..B` ranges give: worker `i` of `n` holds experts
/// `⌊i·E/n⌋ .. ⌊(i+1)·E/n⌋` in every layer, no replicas.
pub fn contiguous(layers: &[u32], experts: usize, workers: &[String]) -> Result<PlacementMap, PlanError> {
    check_workers(workers)?;
    let n = workers.len();
    let hosts: Vec<Vec<String>> = (0..experts).map(|e| vec![workers[e * n / experts.max(1)].clone()]).collect();
    Ok(PlacementMap {
        version: 0,
        layers: layers.iter().map(|&layer| LayerPlacement { layer, hosts: hosts.clone() }).collect(),
    })
}

/// Bytes that moving from `from` to `to` loads onto workers: every replica `to` places on a worker
/// that `from` did not place it on costs its expert's bytes. Dropping replicas costs nothing.
pub fn moved_bytes(from: &PlacementMap, to: &PlacementMap, expert_bytes: &dyn Fn(u32, u32) -> u64) -> u64 {
    let mut total = 0;
    for l in &to.layers {
        for (e, hosts) in l.hosts.iter().enumerate() {
            let before = from.hosts(l.layer, e as u32);
            for h in hosts {
                if !before.contains(h) {
                    total += expert_bytes(l.layer, e as u32);
                }
            }
        }
    }
    total
}

/// `plan` with its workers relabelled in each layer (a layer's packing does not care which worker
/// gets which bin) so that as many replicas as possible stay where `current` has them: bytes kept
/// are maximised by a greedy matching of bins to workers, improved by pairwise exchanges.
/// `workers` are the plan's workers (a worker the plan leaves empty receives an empty bin).
pub fn align_to(
    plan: &PlacementMap,
    current: &PlacementMap,
    workers: &[String],
    expert_bytes: &dyn Fn(u32, u32) -> u64,
) -> PlacementMap {
    let n = workers.len();
    let mut out = plan.clone();
    for l in &mut out.layers {
        let bins: Vec<BTreeSet<u32>> = workers
            .iter()
            .map(|w| (0..l.hosts.len() as u32).filter(|&e| l.hosts[e as usize].contains(w)).collect())
            .collect();
        // kept[a][b]: bytes kept when bin a (the plan's worker a) goes to worker b.
        let kept: Vec<Vec<u64>> = bins
            .iter()
            .map(|bin| {
                workers
                    .iter()
                    .map(|w| {
                        bin.iter()
                            .filter(|&&e| current.hosts(l.layer, e).contains(w))
                            .map(|&e| expert_bytes(l.layer, e))
                            .sum()
                    })
                    .collect()
            })
            .collect();
        let perm = best_matching(&kept, n);
        let mut hosts: Vec<Vec<String>> = vec![Vec::new(); l.hosts.len()];
        for b in 0..n {
            for &e in &bins[perm[b]] {
                hosts[e as usize].push(workers[b].clone());
            }
        }
        for h in &mut hosts {
            h.sort_by_key(|w| workers.iter().position(|x| x == w));
        }
        l.hosts = hosts;
    }
    out
}

/// `perm[b]`: the bin worker `b` receives, greedily by largest `kept`, then improved by swaps.
fn best_matching(kept: &[Vec<u64>], n: usize) -> Vec<usize> {
    let mut perm = vec![usize::MAX; n];
    let mut bin_used = vec![false; n];
    let mut pairs: Vec<(u64, usize, usize)> =
        (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).map(|(a, b)| (kept[a][b], a, b)).collect();
    pairs.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    for (_, a, b) in pairs {
        if !bin_used[a] && perm[b] == usize::MAX {
            bin_used[a] = true;
            perm[b] = a;
        }
    }
    let score = |p: &[usize]| -> u64 { (0..n).map(|b| kept[p[b]][b]).sum() };
    let mut best = score(&perm);
    let mut improved = true;
    while improved {
        improved = false;
        for i in 0..n {
            for j in i + 1..n {
                perm.swap(i, j);
                let s = score(&perm);
                if s > best {
                    best = s;
                    improved = true;
                } else {
                    perm.swap(i, j);
                }
            }
        }
    }
    perm
}

/// The cheapest point whose imbalance is within `tolerance` of `reference` (the balanced plan's
/// imbalance, what issue 17 measures the cost-aware plan against), or of the best point when that
/// is worse than `reference` or there is none (a byte budget that does not reach the balanced
/// plan). `None` for no points.
///
/// Why the balanced plan and not the best point: the cost-aware points go on past the balanced
/// plan's balance when bytes allow (on a recorded `mini` trace, 1.004 for 59 replicas against the
/// balanced plan's 1.007 for 93), and "within 0.05 of the best" then asks for more than "within
/// 0.05 of balanced": there it cost 28 replicas (30.1 % of the balanced plan's bytes) where 27
/// (29.0 %, imbalance 1.054) were within 0.05 of balanced.
pub fn choose(points: &[ParetoPoint], reference: Option<f64>, tolerance: f64) -> Option<&ParetoPoint> {
    let best = points.iter().map(|p| p.imbalance_aggregate).min_by(f64::total_cmp)?;
    let base = reference.map_or(best, |r| r.max(best));
    points
        .iter()
        .filter(|p| p.imbalance_aggregate <= base + tolerance)
        .min_by(|a, b| a.moved_bytes.cmp(&b.moved_bytes).then(a.imbalance_aggregate.total_cmp(&b.imbalance_aggregate)))
}

pub(crate) fn check_workers(workers: &[String]) -> Result<(), PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let mut seen = BTreeSet::new();
    for w in workers {
        if !seen.insert(w.as_str()) {
            return Err(PlanError::DuplicateWorker(w.clone()));
        }
    }
    Ok(())
}

pub(crate) fn check_args(loads: &LoadMatrix, workers: &[String], slots_per_worker: usize) -> Result<(), PlanError> {
    loads.validate()?;
    check_workers(workers)?;
    if slots_per_worker == 0 {
        return Err(PlanError::NoSlots);
    }
    let slots = workers.len() * slots_per_worker;
    for (&layer, row) in loads.layers.iter().zip(&loads.loads) {
        if row.len() > slots {
            return Err(PlanError::TooFewSlots {
                layer,
                experts: row.len(),
                slots,
                workers: workers.len(),
                per_worker: slots_per_worker,
            });
        }
    }
    Ok(())
}

/// Σ_layers max worker load / Σ_layers mean worker load (crate docs), of per-layer worker loads.
pub(crate) fn aggregate_of(worker_loads: &[Vec<f64>]) -> f64 {
    let (mut max, mut mean) = (0.0, 0.0);
    for w in worker_loads {
        max += w.iter().copied().fold(0.0, f64::max);
        mean += w.iter().sum::<f64>() / w.len().max(1) as f64;
    }
    if mean > 0.0 { max / mean } else { 1.0 }
}

#[cfg(test)]
mod tests;
