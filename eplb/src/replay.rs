//! Replay: the worker loads a placement gives a trace, step by step and summed, and what they cost.
//!
//! Worker loads follow the coordinator's split ([`crate::split_rows`]): a step's rows of a
//! replicated expert are divided between its hosts as evenly as integers allow; summed loads divide
//! exactly. Imbalance is `Σ_layers max_worker / Σ_layers mean_worker` (crate docs) — **aggregate**
//! over loads summed for the whole trace, **per step** over each step's own loads.
//!
//! Cost model ([`CostModel`]): a MoE layer's exchange ends when its slowest worker does, and a
//! worker takes `layer_us + row_us · rows` for its rows, so a step's routed-expert time is
//! `Σ_layers (layer_us + row_us · max_worker rows)`. Attention and everything else the
//! coordinator does is left out: it is the same under every placement.

use epserve_control::PlacementMap;
use serde::Serialize;

use crate::error::ReplayError;
use crate::load::{LoadMatrix, StepLoads};
use crate::split::split_rows;

/// Aggregate imbalance of `placement` under `loads` (tokens of a replicated expert split evenly).
pub fn imbalance(loads: &LoadMatrix, placement: &PlacementMap) -> Result<f64, ReplayError> {
    let experts = loads.loads.first().map_or(0, Vec::len);
    let r = Resolved::new(&loads.layers, experts, placement)?;
    Ok(crate::plan::aggregate_of(&r.aggregate_loads(loads)))
}

/// A placement resolved against a trace's layers: `hosts[i][e]` are worker indices of expert `e` in
/// the trace's `i`-th layer.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub workers: Vec<String>,
    pub hosts: Vec<Vec<Vec<usize>>>,
}

impl Resolved {
    pub fn new(layers: &[u32], experts: usize, placement: &PlacementMap) -> Result<Self, ReplayError> {
        let workers: Vec<String> = placement.workers().into_iter().map(str::to_owned).collect();
        if workers.is_empty() {
            return Err(ReplayError::NoWorkers);
        }
        let mut hosts = Vec::with_capacity(layers.len());
        for &layer in layers {
            let lp = placement.layers.iter().find(|l| l.layer == layer).ok_or(ReplayError::MissingLayer(layer))?;
            if lp.hosts.len() != experts {
                return Err(ReplayError::ExpertCount { layer, placed: lp.hosts.len(), loaded: experts });
            }
            let mut per_expert = Vec::with_capacity(experts);
            for (expert, hs) in lp.hosts.iter().enumerate() {
                if hs.is_empty() {
                    return Err(ReplayError::Unplaced { layer, expert });
                }
                let mut idx: Vec<usize> = hs.iter().filter_map(|h| workers.iter().position(|w| w == h)).collect();
                idx.dedup();
                per_expert.push(idx);
            }
            hosts.push(per_expert);
        }
        Ok(Resolved { workers, hosts })
    }

    /// `[layer][worker]` loads of summed `loads`.
    pub fn aggregate_loads(&self, loads: &LoadMatrix) -> Vec<Vec<f64>> {
        self.hosts
            .iter()
            .zip(&loads.loads)
            .map(|(hosts, row)| {
                let mut w = vec![0.0; self.workers.len()];
                for (h, &l) in hosts.iter().zip(row) {
                    for &i in h {
                        w[i] += l / h.len() as f64;
                    }
                }
                w
            })
            .collect()
    }

    /// `out[layer][worker]`: the rows each worker gets in `step`.
    pub fn step_rows(&self, step: &StepLoads, out: &mut Vec<Vec<u32>>) {
        out.resize(self.hosts.len(), Vec::new());
        for ((hosts, counts), w) in self.hosts.iter().zip(&step.counts).zip(out.iter_mut()) {
            w.clear();
            w.resize(self.workers.len(), 0);
            for (h, &c) in hosts.iter().zip(counts) {
                for (&i, part) in h.iter().zip(split_rows(c, h.len())) {
                    w[i] += part;
                }
            }
        }
    }
}

/// The step-time model of the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostModel {
    /// Fixed cost of one MoE layer's exchange on a worker (dispatch, combine, kernel launches).
    pub layer_us: f64,
    /// Expert compute per routed row on a worker.
    pub row_us: f64,
}

impl Default for CostModel {
    /// The `mini` preset's expert (3 · 512 · 1024 multiply-adds per row) on one core of this
    /// project's 2-core CI host: ~60 µs per row; ~200 µs per exchange over loopback gRPC.
    fn default() -> Self {
        CostModel { layer_us: 200.0, row_us: 60.0 }
    }
}

/// Bins of the worker-load histogram: load ÷ mean load of its (step, layer), 0 to 3 in 0.1 steps,
/// the last bin holding everything above. Only steps of at least `min_step_tokens` tokens are
/// counted, as in the per-step imbalance figures.
pub const HISTOGRAM_BINS: usize = 31;
pub const HISTOGRAM_BIN_WIDTH: f64 = 0.1;

/// Per-step statistics of one placement, fed step by step.
#[derive(Debug, Clone)]
pub struct StepReplay {
    resolved: Resolved,
    cost: CostModel,
    min_step_tokens: u32,
    rows: Vec<Vec<u32>>,
    /// Per-step imbalance of every step with tokens, in trace order (for plots), with its token count.
    pub imbalance: Vec<(u32, f64)>,
    /// Modelled step time of every step with tokens, microseconds.
    pub step_time_us: Vec<f64>,
    /// Counts of (step, layer, worker) loads by load ÷ the (step, layer) mean, over steps of at
    /// least `min_step_tokens` tokens.
    pub histogram: [u64; HISTOGRAM_BINS],
}

impl StepReplay {
    pub fn new(resolved: Resolved, cost: CostModel, min_step_tokens: u32) -> Self {
        StepReplay {
            resolved,
            cost,
            min_step_tokens,
            rows: Vec::new(),
            imbalance: Vec::new(),
            step_time_us: Vec::new(),
            histogram: [0; HISTOGRAM_BINS],
        }
    }

    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    pub fn observe(&mut self, step: &StepLoads) {
        if step.tokens == 0 {
            return;
        }
        self.resolved.step_rows(step, &mut self.rows);
        let (mut max_sum, mut mean_sum, mut time) = (0.0, 0.0, 0.0);
        let counted = step.tokens >= self.min_step_tokens;
        for w in &self.rows {
            let max = f64::from(w.iter().copied().max().unwrap_or(0));
            let mean = f64::from(w.iter().sum::<u32>()) / w.len().max(1) as f64;
            max_sum += max;
            mean_sum += mean;
            time += self.cost.layer_us + self.cost.row_us * max;
            if counted && mean > 0.0 {
                for &r in w {
                    let bin = ((f64::from(r) / mean) / HISTOGRAM_BIN_WIDTH) as usize;
                    self.histogram[bin.min(HISTOGRAM_BINS - 1)] += 1;
                }
            }
        }
        self.step_time_us.push(time);
        if mean_sum > 0.0 {
            self.imbalance.push((step.tokens, max_sum / mean_sum));
        }
    }

    /// Mean, p50 and p99 of the per-step imbalance over steps of at least `min_step_tokens` tokens,
    /// and how many steps that was.
    pub fn step_summary(&self) -> (f64, f64, f64, usize) {
        let mut v: Vec<f64> =
            self.imbalance.iter().filter(|(t, _)| *t >= self.min_step_tokens).map(|(_, i)| *i).collect();
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN, 0);
        }
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (mean, percentile(&v, 50.0), percentile(&v, 99.0), v.len())
    }
}

/// Nearest-rank percentile of sorted `v`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What `epserve eplb replay --json` prints for each placement.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementReport {
    pub name: String,
    pub imbalance_aggregate: f64,
    /// Per layer, in the trace's layer order.
    pub imbalance_aggregate_per_layer: Vec<f64>,
    pub imbalance_step_mean: f64,
    pub imbalance_step_p50: f64,
    pub imbalance_step_p99: f64,
    /// Steps the per-step figures are over (those of at least `min_step_tokens` tokens).
    pub steps_counted: usize,
    pub min_step_tokens: u32,
    pub modelled_step_time_ms: f64,
    /// Bytes loaded to go from the first placement given to this one.
    pub moved_bytes: u64,
}

impl PlacementReport {
    pub fn new(name: String, loads: &LoadMatrix, replay: &StepReplay, moved_bytes: u64) -> Self {
        let agg = replay.resolved.aggregate_loads(loads);
        let (mean, p50, p99, n) = replay.step_summary();
        let times = &replay.step_time_us;
        PlacementReport {
            name,
            imbalance_aggregate: crate::plan::aggregate_of(&agg),
            imbalance_aggregate_per_layer: agg
                .iter()
                .map(|w| crate::plan::aggregate_of(std::slice::from_ref(w)))
                .collect(),
            imbalance_step_mean: mean,
            imbalance_step_p50: p50,
            imbalance_step_p99: p99,
            steps_counted: n,
            min_step_tokens: replay.min_step_tokens,
            modelled_step_time_ms: if times.is_empty() {
                0.0
            } else {
                times.iter().sum::<f64>() / times.len() as f64 / 1e3
            },
            moved_bytes,
        }
    }
}
