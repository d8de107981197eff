//! The cost-aware planner: greedy moves from the current placement, best objective gain per byte
//! first, with a Pareto point after each (module docs of [`crate::plan`]).

use epserve_control::{LayerPlacement, PlacementMap};

use super::layer::{LayerState, objective};
use super::{ParetoPoint, align_to, balanced, check_args, moved_bytes};
use crate::error::PlanError;
use crate::load::LoadMatrix;

/// A move must lower its layer's objective by more than this share of the layer's mean worker load
/// (below it, moving weights for a rounding error is not worth a byte).
const MIN_GAIN: f64 = 1e-6;

/// Tolerances over the balanced plan's per-layer peak that the goal-directed runs aim for.
const TOLERANCES: [f64; 12] = [0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.25, 0.5];

#[derive(Debug, Clone, Copy)]
enum Move {
    /// Drop the replica of `e` on worker `w` (another worker keeps one).
    Drop { e: u32, w: usize },
    /// Load `e` into a free slot of `w`.
    Add { e: u32, w: usize },
    /// Move the replica of `e` from `from` to a free slot of `to`.
    Relocate { e: u32, from: usize, to: usize },
    /// Replace the redundant replica of `old` on `w` by a new replica of `e`.
    Replace { e: u32, old: u32, w: usize },
    /// Exchange `a` on `w` with `b` on `v`.
    Swap { a: u32, w: usize, b: u32, v: usize },
}

impl Move {
    fn apply(self, s: &mut LayerState<'_>) {
        match self {
            Move::Drop { e, w } => s.remove(e, w),
            Move::Add { e, w } => s.add(e, w),
            Move::Relocate { e, from, to } => {
                s.remove(e, from);
                s.add(e, to);
            }
            Move::Replace { e, old, w } => {
                s.remove(old, w);
                s.add(e, w);
            }
            Move::Swap { a, w, b, v } => {
                s.remove(a, w);
                s.remove(b, v);
                s.add(a, v);
                s.add(b, w);
            }
        }
    }

    /// Bytes of the weights the move loads.
    fn cost(self, layer: u32, expert_bytes: &dyn Fn(u32, u32) -> u64) -> u64 {
        match self {
            Move::Drop { .. } => 0,
            Move::Add { e, .. } | Move::Relocate { e, .. } | Move::Replace { e, .. } => expert_bytes(layer, e),
            Move::Swap { a, b, .. } => expert_bytes(layer, a) + expert_bytes(layer, b),
        }
    }
}

/// The Pareto points of moving from `current` towards balance, cheapest first, starting with
/// `current` itself (0 bytes). Moves that would take the total past `max_move_bytes` are not taken.
/// The balanced plan, aligned to `current`, is added as a point when it is affordable and not
/// dominated. `expert_bytes(layer, expert)` is what loading one replica costs.
pub fn cost_aware(
    loads: &LoadMatrix,
    workers: &[String],
    slots_per_worker: usize,
    current: &PlacementMap,
    expert_bytes: &dyn Fn(u32, u32) -> u64,
    max_move_bytes: Option<u64>,
) -> Result<Vec<ParetoPoint>, PlanError> {
    check_args(loads, workers, slots_per_worker)?;
    let budget = max_move_bytes.unwrap_or(u64::MAX);
    let mut states = loads
        .layers
        .iter()
        .zip(&loads.loads)
        .map(|(&layer, row)| LayerState::from_placement(row, layer, current, workers, slots_per_worker))
        .collect::<Result<Vec<_>, _>>()?;
    let initial = states.clone();
    let snapshot = |states: &[LayerState<'_>]| PlacementMap {
        version: 0,
        layers: loads
            .layers
            .iter()
            .zip(states)
            .map(|(&layer, s)| LayerPlacement { layer, hosts: s.hosts(workers) })
            .collect(),
    };
    // Reported as the replay computes it (over the workers the placement names), so a point's
    // figure is what `epserve eplb replay` prints for it.
    let aggregate =
        |p: &PlacementMap| crate::replay::imbalance(loads, p).map_err(|e| PlanError::Current(e.to_string()));

    let mut moved = 0u64;
    let start = snapshot(&states);
    let mut points = vec![ParetoPoint { imbalance_aggregate: aggregate(&start)?, placement: start, moved_bytes: 0 }];
    let mut best: Vec<Option<(f64, u64, Move)>> = states
        .iter()
        .enumerate()
        .map(|(i, s)| best_move(s, loads.layers[i], expert_bytes, budget - moved, &objective))
        .collect();
    let cap = 4 * loads.layers.len() * workers.len() * slots_per_worker + 16;
    for _ in 0..cap {
        // Free moves first (largest gain), then the largest gain per byte; ties to the lower layer.
        let pick = best.iter().enumerate().filter_map(|(i, b)| b.map(|(gain, cost, mv)| (i, gain, cost, mv))).max_by(
            |a, b| {
                let key = |(_, gain, cost, _): &(usize, f64, u64, Move)| {
                    if *cost == 0 { (1, *gain) } else { (0, gain / *cost as f64) }
                };
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(b.0.cmp(&a.0))
            },
        );
        let Some((i, _, cost, mv)) = pick else { break };
        mv.apply(&mut states[i]);
        moved += cost;
        let placement = snapshot(&states);
        let imbalance = aggregate(&placement)?;
        let point = ParetoPoint { placement, moved_bytes: moved, imbalance_aggregate: imbalance };
        match points.last_mut() {
            // A free move: same bytes, a placement at least as good.
            Some(last) if cost == 0 && imbalance <= last.imbalance_aggregate => *last = point,
            _ => points.push(point),
        }
        for (j, b) in best.iter_mut().enumerate() {
            if j == i || b.is_some_and(|(_, c, _)| c > budget - moved) {
                *b = best_move(&states[j], loads.layers[j], expert_bytes, budget - moved, &objective);
            }
        }
    }
    // The balanced plan, relabelled to keep what it can in place, as one more candidate.
    let reference = align_to(&balanced(loads, workers, slots_per_worker)?, current, workers, expert_bytes);
    let reference_bytes = moved_bytes(current, &reference, expert_bytes);
    // Goal-directed runs: per layer, the cheapest moves that bring every worker under the balanced
    // plan's most loaded worker plus a tolerance, for a ladder of tolerances. Moves that only help
    // below the target are not paid for, which the greedy path above cannot know.
    let mut options: Vec<Vec<(LayerState<'_>, u64, f64)>> = Vec::with_capacity(initial.len());
    for (i, start) in initial.iter().enumerate() {
        let peak = |s: &LayerState<'_>| s.worker_loads().iter().copied().fold(0.0, f64::max);
        let mut layer_options = vec![(start.clone(), 0u64, peak(start))];
        if let Ok(reference_layer) =
            LayerState::from_placement(start.load, loads.layers[i], &reference, workers, slots_per_worker)
        {
            let reference_peak = peak(&reference_layer);
            for tolerance in TOLERANCES {
                let target = reference_peak * (1.0 + tolerance);
                let (reached, cost) = beam_to_target(start, loads.layers[i], expert_bytes, budget, target);
                let reached_peak = peak(&reached);
                layer_options.push((reached, cost, reached_peak));
            }
        }
        options.push(layer_options);
    }
    // The same tolerance in every layer, one point per rung of the ladder.
    for rung in 1..=TOLERANCES.len() {
        let mut cost = 0u64;
        let run: Vec<LayerState<'_>> = options
            .iter()
            .map(|o| {
                let (state, c, _) = o.get(rung).unwrap_or(&o[0]);
                cost += c;
                state.clone()
            })
            .collect();
        if cost <= budget {
            let placement = snapshot(&run);
            points.push(ParetoPoint { imbalance_aggregate: aggregate(&placement)?, placement, moved_bytes: cost });
        }
    }
    // Layers differ in what balance costs them, and the aggregate imbalance sums the layers' peaks:
    // spend bytes where they lower a peak the most per byte. From every layer as it is, repeatedly
    // take the one layer's option with the best peak reduction per extra byte, a point after each.
    let mut chosen = vec![0usize; options.len()];
    let mut spent = 0u64;
    loop {
        let mut pick: Option<(usize, usize, f64)> = None;
        for (l, o) in options.iter().enumerate() {
            let (_, cost_now, peak_now) = &o[chosen[l]];
            for (k, (_, cost, peak)) in o.iter().enumerate() {
                if *peak >= peak_now - 1e-12 || spent + cost.saturating_sub(*cost_now) > budget {
                    continue;
                }
                let extra = cost.saturating_sub(*cost_now) as f64;
                let ratio = if extra == 0.0 { f64::INFINITY } else { (peak_now - peak) / extra };
                if pick.is_none_or(|(_, _, r)| ratio > r) {
                    pick = Some((l, k, ratio));
                }
            }
        }
        let Some((l, k, _)) = pick else { break };
        spent = spent - options[l][chosen[l]].1 + options[l][k].1;
        chosen[l] = k;
        let run: Vec<LayerState<'_>> = options.iter().zip(&chosen).map(|(o, &k)| o[k].0.clone()).collect();
        let placement = snapshot(&run);
        points.push(ParetoPoint { imbalance_aggregate: aggregate(&placement)?, placement, moved_bytes: spent });
    }
    // The same options combined exactly: the (bytes, Σ peaks) frontier of one option per layer,
    // merged layer by layer (the aggregate imbalance is Σ peaks over a fixed Σ means). The greedy
    // order above spends bytes by ratio and can step past a cheaper mix: on a recorded `mini` trace
    // it reached 1.057 for 26 replicas and 1.048 only for 28.
    let mut frontier: Vec<(u64, f64, Vec<usize>)> = vec![(0, 0.0, Vec::new())];
    for o in &options {
        let mut next: Vec<(u64, f64, Vec<usize>)> = Vec::with_capacity(frontier.len() * o.len());
        for (cost, peaks, picks) in &frontier {
            for (k, (_, c, peak)) in o.iter().enumerate() {
                if cost + c <= budget {
                    let mut picks = picks.clone();
                    picks.push(k);
                    next.push((cost + c, peaks + peak, picks));
                }
            }
        }
        next.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        frontier.clear();
        for x in next {
            if frontier.last().is_none_or(|last| x.1 < last.1 - 1e-12) {
                frontier.push(x);
            }
        }
    }
    for (cost, _, picks) in &frontier {
        let run: Vec<LayerState<'_>> = options.iter().zip(picks).map(|(o, &k)| o[k].0.clone()).collect();
        let placement = snapshot(&run);
        points.push(ParetoPoint { imbalance_aggregate: aggregate(&placement)?, placement, moved_bytes: *cost });
    }
    if reference_bytes <= budget {
        points.push(ParetoPoint {
            imbalance_aggregate: aggregate(&reference)?,
            placement: reference,
            moved_bytes: reference_bytes,
        });
    }
    // What a point costs is what its placement loads that `current` does not hold: a sequence of
    // moves may undo part of itself (a replica relocated back, a replacement replaced), so the sum
    // of the moves' costs, which bounded the search above, can exceed it.
    for p in &mut points {
        p.moved_bytes = moved_bytes(current, &p.placement, expert_bytes);
    }
    Ok(pareto(points))
}

/// The moves of this layer's best gain (per byte, free moves first) that cost at most `budget`.
fn best_move(
    s: &LayerState<'_>,
    layer: u32,
    expert_bytes: &dyn Fn(u32, u32) -> u64,
    budget: u64,
    objective: &dyn Fn(&[f64]) -> f64,
) -> Option<(f64, u64, Move)> {
    let loads = s.worker_loads();
    let before = objective(&loads);
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let min_gain = MIN_GAIN * mean.max(1.0);
    let candidates = candidates(s);
    let mut best: Option<(f64, u64, Move)> = None;
    let mut trial = s.clone();
    for mv in candidates {
        let cost = mv.cost(layer, expert_bytes);
        if cost > budget {
            continue;
        }
        trial.bins.clone_from(&s.bins);
        trial.replicas.clone_from(&s.replicas);
        mv.apply(&mut trial);
        let gain = before - objective(&trial.worker_loads());
        if gain <= min_gain {
            continue;
        }
        let better = match best {
            None => true,
            Some((g, c, _)) => match (cost == 0, c == 0) {
                (true, false) => true,
                (false, true) => false,
                (true, true) => gain > g,
                (false, false) => gain / cost as f64 > g / c as f64,
            },
        };
        if better {
            best = Some((gain, cost, mv));
        }
    }
    best
}

/// The cheapest sequence of moves found that brings every worker of the layer to at most `target`:
/// a beam search over move sequences, one move per depth, keeping the `width` states of least
/// excess over the target (then least objective) at each depth; the first depth that reaches the
/// target wins, its cheapest state. `width` shrinks with the layer's move count, so a large model
/// still plans in seconds. Returns the best state found and the bytes it cost.
fn beam_to_target<'a>(
    start: &LayerState<'a>,
    layer: u32,
    expert_bytes: &dyn Fn(u32, u32) -> u64,
    budget: u64,
    target: f64,
) -> (LayerState<'a>, u64) {
    let score = |s: &LayerState<'_>| {
        let w = s.worker_loads();
        (w.iter().map(|l| (l - target).max(0.0)).sum::<f64>(), objective(&w))
    };
    let better = |a: (f64, f64), b: (f64, f64)| a.0 < b.0 - 1e-9 || (a.0 <= b.0 + 1e-9 && a.1 < b.1 - 1e-9);
    let first = score(start);
    let mut best = (start.clone(), 0u64, first);
    let width = (200_000 / candidates(start).len().max(1)).clamp(1, 24);
    let mut beam = vec![best.clone()];
    let mut seen = std::collections::HashSet::new();
    for _depth in 0..(4 * start.load.len()) {
        if beam.is_empty() || best.2.0 <= 1e-9 {
            break;
        }
        let mut next: Vec<(LayerState<'a>, u64, (f64, f64))> = Vec::new();
        for (state, cost, sc) in &beam {
            for mv in candidates(state) {
                let c = cost + mv.cost(layer, expert_bytes);
                if c > budget {
                    continue;
                }
                let mut t = state.clone();
                mv.apply(&mut t);
                let x = score(&t);
                if !better(x, *sc) {
                    continue;
                }
                let mut key: Vec<Vec<u32>> = t.bins.clone();
                key.iter_mut().for_each(|b| b.sort_unstable());
                if seen.insert(key) {
                    next.push((t, c, x));
                }
            }
        }
        // Reached first, then least excess, least objective, fewest bytes.
        next.sort_by(|a, b| a.2.0.total_cmp(&b.2.0).then(a.1.cmp(&b.1)).then(a.2.1.total_cmp(&b.2.1)));
        next.truncate(width);
        if let Some(top) = next.first()
            && better(top.2, best.2)
        {
            best = top.clone();
        }
        beam = next;
    }
    (best.0, best.1)
}

/// Every move that keeps the layer valid (each expert placed, each worker within its slots, no
/// expert twice on a worker).
fn candidates(s: &LayerState<'_>) -> Vec<Move> {
    let workers = s.bins.len();
    let experts = s.load.len() as u32;
    let mut candidates: Vec<Move> = Vec::new();
    for w in 0..workers {
        for &e in &s.bins[w] {
            if s.replicas[e as usize] > 1 {
                candidates.push(Move::Drop { e, w });
            }
            for to in (0..workers).filter(|&to| to != w && s.bins[to].len() < s.slots && !s.holds(to, e)) {
                candidates.push(Move::Relocate { e, from: w, to });
            }
        }
        for v in w + 1..workers {
            for &a in s.bins[w].iter().filter(|&&a| !s.holds(v, a)) {
                for &b in s.bins[v].iter().filter(|&&b| !s.holds(w, b)) {
                    candidates.push(Move::Swap { a, w, b, v });
                }
            }
        }
        for e in (0..experts).filter(|&e| !s.holds(w, e)) {
            if s.bins[w].len() < s.slots {
                candidates.push(Move::Add { e, w });
            }
            for &old in s.bins[w].iter().filter(|&&old| s.replicas[old as usize] > 1) {
                candidates.push(Move::Replace { e, old, w });
            }
        }
    }
    candidates
}

/// The points no other point beats on both bytes and imbalance, cheapest first.
fn pareto(mut points: Vec<ParetoPoint>) -> Vec<ParetoPoint> {
    points.sort_by(|a, b| {
        a.moved_bytes.cmp(&b.moved_bytes).then(a.imbalance_aggregate.total_cmp(&b.imbalance_aggregate))
    });
    let mut out: Vec<ParetoPoint> = Vec::new();
    for p in points {
        if out.last().is_none_or(|last| p.imbalance_aggregate < last.imbalance_aggregate - 1e-12) {
            out.push(p);
        }
    }
    out
}
