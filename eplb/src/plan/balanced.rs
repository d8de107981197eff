//! The balanced planner: replicate by load, pack heaviest first, then improve by swaps (module docs
//! of [`crate::plan`]; DeepSeek's `eplb.py`, global policy, with the swap pass added).

use epserve_control::{LayerPlacement, PlacementMap};

use super::check_args;
use super::layer::LayerState;
use crate::error::PlanError;
use crate::load::LoadMatrix;

/// Floating-point slack below which a swap is not an improvement (loads are token counts).
const EPS: f64 = 1e-9;

/// A placement of `loads`' layers over `workers` with `slots_per_worker` slots each that minimises
/// the most loaded worker per layer. Replicas of one expert are always on distinct workers.
pub fn balanced(loads: &LoadMatrix, workers: &[String], slots_per_worker: usize) -> Result<PlacementMap, PlanError> {
    check_args(loads, workers, slots_per_worker)?;
    let layers = loads
        .layers
        .iter()
        .zip(&loads.loads)
        .map(|(&layer, row)| LayerPlacement {
            layer,
            hosts: balance_layer(row, workers.len(), slots_per_worker).hosts(workers),
        })
        .collect();
    Ok(PlacementMap { version: 0, layers })
}

pub(crate) fn balance_layer(load: &[f64], workers: usize, slots: usize) -> LayerState<'_> {
    let replicas = replica_counts(load, workers * slots, workers);
    // Heaviest replica first; an expert's replicas next to each other, lower expert first.
    let mut items: Vec<(u32, f64)> = replicas
        .iter()
        .enumerate()
        .flat_map(|(e, &r)| std::iter::repeat_n((e as u32, load[e] / r as f64), r))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut s = LayerState::empty(load, workers, slots);
    let mut bin_load = vec![0.0f64; workers];
    for (e, weight) in items {
        let target = (0..workers)
            .filter(|&w| s.bins[w].len() < slots && !s.holds(w, e))
            .min_by(|&a, &b| bin_load[a].total_cmp(&bin_load[b]).then(a.cmp(&b)));
        // Only an extra replica can find no worker (every free slot is beside a copy of it, which
        // needs nearly full capacity): it is left out, the expert keeps its other replicas.
        if let Some(w) = target {
            s.add(e, w);
            bin_load[w] += weight;
        }
    }
    improve_by_swaps(&mut s);
    s
}

/// DeepSeek's replication: one replica each, then the redundant slots one at a time to the expert
/// with the highest load per replica, never more replicas than workers, never for a zero load.
fn replica_counts(load: &[f64], slots: usize, workers: usize) -> Vec<usize> {
    let mut r = vec![1usize; load.len()];
    for _ in load.len()..slots {
        let best = (0..load.len())
            .filter(|&e| r[e] < workers)
            .max_by(|&a, &b| (load[a] / r[a] as f64).total_cmp(&(load[b] / r[b] as f64)).then(b.cmp(&a)));
        match best {
            Some(e) if load[e] > 0.0 => r[e] += 1,
            _ => break,
        }
    }
    r
}

/// Moves or swaps a replica off the most loaded worker while that lowers the larger of the two
/// workers' loads. Replica shares do not change (the replica counts are fixed), so every step
/// strictly lowers the sorted load vector and the loop ends.
fn improve_by_swaps(s: &mut LayerState<'_>) {
    let workers = s.bins.len();
    for _ in 0..(16 * s.load.len() * workers).max(64) {
        let loads = s.worker_loads();
        let Some(hot) = (0..workers).max_by(|&a, &b| loads[a].total_cmp(&loads[b]).then(b.cmp(&a))) else { return };
        let mut best: Option<(f64, usize, usize, Option<usize>)> = None;
        for (i, &a) in s.bins[hot].iter().enumerate() {
            let wa = s.share(a);
            for v in (0..workers).filter(|&v| v != hot && !s.holds(v, a)) {
                // Move `a` to a free slot of `v`.
                if s.bins[v].len() < s.slots {
                    let peak = (loads[hot] - wa).max(loads[v] + wa);
                    if peak < loads[hot] - EPS && best.is_none_or(|b| peak < b.0) {
                        best = Some((peak, i, v, None));
                    }
                }
                // Swap `a` with `b` of `v`.
                for (j, &b) in s.bins[v].iter().enumerate() {
                    if s.holds(hot, b) {
                        continue;
                    }
                    let wb = s.share(b);
                    let peak = (loads[hot] - wa + wb).max(loads[v] - wb + wa);
                    if peak < loads[hot] - EPS && best.is_none_or(|x| peak < x.0) {
                        best = Some((peak, i, v, Some(j)));
                    }
                }
            }
        }
        let Some((_, i, v, j)) = best else { return };
        let a = s.bins[hot][i];
        s.remove(a, hot);
        if let Some(j) = j {
            let b = s.bins[v][j];
            s.remove(b, v);
            s.add(b, hot);
        }
        s.add(a, v);
    }
}
