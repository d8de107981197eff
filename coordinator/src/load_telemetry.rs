//! Live expert-load telemetry: routed tokens per (MoE layer, expert) and tokens sent to each worker
//! per MoE layer, kept in one-second buckets for the last ten minutes and summed over sliding
//! windows of 10 s, 60 s and 600 s. The load balancer plans from the expert loads and judges a
//! placement by the worker loads' imbalance (max over mean per layer, the figure the slowest worker
//! sets every step to). Worker loads count only from the second after the placement last changed,
//! so a window never mixes two placements; expert loads do not depend on the placement and use the
//! whole window. Exposed as the gauges `epserve_expert_load` and `epserve_worker_load_imbalance`
//! (the latter also with `layer="all"`: the aggregate over layers, Σ max / Σ mean, as the replay
//! computes it) and as `LoadBalancingService.ExpertLoad` (docs/load-balancing.md, "Live load
//! telemetry").

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use epserve_model::TextConfig;
use epserve_proto::metric_names as m;
use epserve_proto::v1 as pb;
use parking_lot::Mutex;

/// The windows reported, in seconds.
pub const WINDOWS: [u32; 3] = [10, 60, 600];
/// Buckets kept: one per second of the longest window.
const BUCKETS: usize = 600;

/// One second of traffic.
#[derive(Debug)]
struct Bucket {
    /// Seconds since the telemetry started.
    second: u64,
    /// `experts[moe_index * num_experts + expert]`: routed tokens.
    experts: Vec<u64>,
    /// Tokens sent to each worker, per MoE layer index.
    workers: BTreeMap<Arc<str>, Vec<u64>>,
}

#[derive(Debug)]
struct Inner {
    buckets: VecDeque<Bucket>,
    /// The workers a layer's load is spread over (the linked workers), for the mean.
    workers: Vec<Arc<str>>,
    /// The placement routed by, and the second (since start) it took effect.
    placement_version: u64,
    placement_since: Option<u64>,
    placement_changed_unix_ms: u64,
}

/// Tokens per expert and per worker over the sliding windows. Shared by the transport (records on
/// the engine thread: one short lock per MoE layer and step), the status service and the balancer.
#[derive(Debug)]
pub struct LoadTelemetry {
    moe_layers: Vec<u32>,
    /// Layer id → index into `moe_layers`.
    layer_index: Vec<Option<usize>>,
    num_experts: usize,
    started: Instant,
    inner: Mutex<Inner>,
}

/// One layer over one window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerLoad {
    pub layer: u32,
    /// Routed tokens per expert id.
    pub expert_tokens: Vec<u64>,
    /// Tokens sent to each worker (since the placement last changed, within the window).
    pub worker_tokens: BTreeMap<String, u64>,
    /// Max over mean of `worker_tokens` over all linked workers; 1 with no tokens.
    pub imbalance: f64,
    /// Hosts each expert is routed to now (filled in by the transport).
    #[serde(default)]
    pub hosts: Vec<Vec<String>>,
}

/// Every MoE layer over one window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowLoad {
    pub seconds: u32,
    /// How much of the window holds data for the worker loads (since start or the last placement
    /// change).
    pub covered_seconds: f64,
    pub layers: Vec<LayerLoad>,
}

impl WindowLoad {
    /// The imbalance over all layers, as the replay aggregates it: Σ over layers of the most loaded
    /// worker's tokens over Σ of the mean worker's (each MoE layer waits on its slowest worker); 1
    /// with no tokens.
    pub fn aggregate_imbalance(&self) -> f64 {
        let (mut max, mut mean) = (0.0, 0.0);
        for l in &self.layers {
            let n = l.worker_tokens.len();
            let total: u64 = l.worker_tokens.values().sum();
            if n == 0 || total == 0 {
                continue;
            }
            max += l.worker_tokens.values().copied().max().unwrap_or(0) as f64;
            mean += total as f64 / n as f64;
        }
        if mean == 0.0 { 1.0 } else { max / mean }
    }

    /// Routed tokens in the window, all layers.
    pub fn tokens(&self) -> u64 {
        self.layers.iter().flat_map(|l| &l.expert_tokens).sum()
    }
}

/// The last live placement change a coordinator made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RebalanceRecord {
    pub version: u64,
    /// `apply` or `auto`.
    pub trigger: String,
    pub unix_ms: u64,
    /// Aggregate worker-load imbalance measured before the change (automatic rebalancing; 0 when
    /// applied by hand).
    pub measured_before: f64,
    /// Predicted for the new placement by the replay's model on the expert loads planned from (0
    /// when applied by hand).
    pub predicted: f64,
    pub loaded: u32,
    pub released: u32,
    pub seconds: f64,
}

/// The status report: every window, and the placement routed by.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub placement_version: u64,
    pub placement_changed_unix_ms: u64,
    pub windows: Vec<WindowLoad>,
    #[serde(default)]
    pub last_rebalance: Option<RebalanceRecord>,
}

/// Max over mean of `loads` (1 when they sum to 0 or are empty).
pub fn imbalance(loads: impl IntoIterator<Item = u64>) -> f64 {
    let loads: Vec<u64> = loads.into_iter().collect();
    let total: u64 = loads.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let max = loads.iter().copied().max().unwrap_or(0);
    max as f64 * loads.len() as f64 / total as f64
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl LoadTelemetry {
    pub fn new(model: &TextConfig) -> Arc<Self> {
        let moe_layers: Vec<u32> = model.moe_layers().map(|l| l as u32).collect();
        let mut layer_index = vec![None; model.num_hidden_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            layer_index[l as usize] = Some(i);
        }
        Arc::new(LoadTelemetry {
            moe_layers,
            layer_index,
            num_experts: model.num_local_experts,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                buckets: VecDeque::with_capacity(BUCKETS),
                workers: Vec::new(),
                placement_version: 0,
                placement_since: None,
                placement_changed_unix_ms: 0,
            }),
        })
    }

    pub fn moe_layers(&self) -> &[u32] {
        &self.moe_layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    fn now_second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The bucket of the current second.
    fn bucket<'a>(&self, inner: &'a mut Inner) -> &'a mut Bucket {
        let second = self.now_second();
        if inner.buckets.back().is_none_or(|b| b.second != second) {
            while inner.buckets.front().is_some_and(|b| b.second + BUCKETS as u64 <= second) {
                inner.buckets.pop_front();
            }
            inner.buckets.push_back(Bucket {
                second,
                experts: vec![0; self.moe_layers.len() * self.num_experts],
                workers: BTreeMap::new(),
            });
        }
        // Just pushed or already there.
        let last = inner.buckets.len() - 1;
        &mut inner.buckets[last]
    }

    /// Counts `rows` routed tokens of each `(expert, rows)` of MoE layer `layer`.
    pub fn record_experts(&self, layer: usize, groups: impl IntoIterator<Item = (u32, u32)>) {
        let Some(Some(i)) = self.layer_index.get(layer).copied() else { return };
        let mut inner = self.inner.lock();
        let bucket = self.bucket(&mut inner);
        for (e, rows) in groups {
            if let Some(n) = bucket.experts.get_mut(i * self.num_experts + e as usize) {
                *n += u64::from(rows);
            }
        }
    }

    /// Counts `rows` tokens sent to `worker` for MoE layer `layer`.
    pub fn record_worker(&self, layer: usize, worker: &Arc<str>, rows: usize) {
        let Some(Some(i)) = self.layer_index.get(layer).copied() else { return };
        let layers = self.moe_layers.len();
        let mut inner = self.inner.lock();
        let bucket = self.bucket(&mut inner);
        let loads = bucket.workers.entry(worker.clone()).or_insert_with(|| vec![0; layers]);
        loads[i] += rows as u64;
    }

    /// The workers a layer's load is spread over (every linked worker).
    pub fn set_workers(&self, mut workers: Vec<Arc<str>>) {
        workers.sort();
        self.inner.lock().workers = workers;
    }

    /// The placement routed by changed to `version`: worker loads count afresh from the next second.
    pub fn placement_changed(&self, version: u64) {
        let second = self.now_second();
        let mut inner = self.inner.lock();
        if inner.placement_version != version {
            inner.placement_version = version;
            inner.placement_since = Some(second);
            inner.placement_changed_unix_ms = unix_ms();
        }
    }

    pub fn placement_version(&self) -> u64 {
        self.inner.lock().placement_version
    }

    /// The last `seconds` (the current, partial second included).
    pub fn window(&self, seconds: u32) -> WindowLoad {
        let now = self.now_second();
        let inner = self.inner.lock();
        let from = (now + 1).saturating_sub(u64::from(seconds));
        // Worker loads: only whole seconds after the placement changed.
        let workers_from = inner.placement_since.map_or(from, |s| from.max(s + 1));
        let (layers, experts) = (self.moe_layers.len(), self.num_experts);
        let mut expert_tokens = vec![0u64; layers * experts];
        let mut worker_tokens: BTreeMap<Arc<str>, Vec<u64>> =
            inner.workers.iter().map(|w| (w.clone(), vec![0; layers])).collect();
        for b in inner.buckets.iter().filter(|b| b.second >= from) {
            for (sum, n) in expert_tokens.iter_mut().zip(&b.experts) {
                *sum += n;
            }
            if b.second >= workers_from {
                for (w, loads) in &b.workers {
                    let sums = worker_tokens.entry(w.clone()).or_insert_with(|| vec![0; layers]);
                    for (sum, n) in sums.iter_mut().zip(loads) {
                        *sum += n;
                    }
                }
            }
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let covered_from = workers_from as f64;
        let covered_seconds = (elapsed - covered_from).clamp(0.0, f64::from(seconds));
        let layers = self
            .moe_layers
            .iter()
            .enumerate()
            .map(|(i, &layer)| {
                let worker_tokens: BTreeMap<String, u64> =
                    worker_tokens.iter().map(|(w, loads)| (w.to_string(), loads[i])).collect();
                LayerLoad {
                    layer,
                    expert_tokens: expert_tokens[i * experts..(i + 1) * experts].to_vec(),
                    imbalance: imbalance(worker_tokens.values().copied()),
                    worker_tokens,
                    hosts: Vec::new(),
                }
            })
            .collect();
        WindowLoad { seconds, covered_seconds, layers }
    }

    /// Every window.
    pub fn report(&self) -> LoadReport {
        let (placement_version, placement_changed_unix_ms) = {
            let inner = self.inner.lock();
            (inner.placement_version, inner.placement_changed_unix_ms)
        };
        LoadReport {
            placement_version,
            placement_changed_unix_ms,
            windows: WINDOWS.map(|s| self.window(s)).to_vec(),
            last_rebalance: None,
        }
    }

    /// Sets the gauges from the current windows.
    pub fn publish(&self) {
        for w in WINDOWS {
            let window = self.window(w);
            let label = format!("{w}s");
            metrics::gauge!(m::WORKER_LOAD_IMBALANCE, "layer" => "all", "window" => label.clone())
                .set(window.aggregate_imbalance());
            for l in &window.layers {
                let layer = l.layer.to_string();
                metrics::gauge!(m::WORKER_LOAD_IMBALANCE, "layer" => layer.clone(), "window" => label.clone())
                    .set(l.imbalance);
                for (e, &n) in l.expert_tokens.iter().enumerate() {
                    metrics::gauge!(m::EXPERT_LOAD, "layer" => layer.clone(), "expert" => e.to_string(), "window" => label.clone())
                        .set(n as f64);
                }
            }
        }
    }

    /// Publishes the gauges every `every` until the telemetry is the task's alone.
    pub async fn publish_every(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            self.publish();
        }
    }
}

impl From<LoadReport> for pb::ExpertLoadResponse {
    fn from(r: LoadReport) -> Self {
        pb::ExpertLoadResponse {
            last_rebalance: r.last_rebalance.map(|l| pb::Rebalance {
                version: l.version,
                trigger: l.trigger,
                unix_ms: l.unix_ms,
                measured_before: l.measured_before,
                predicted: l.predicted,
                loaded: l.loaded,
                released: l.released,
                seconds: l.seconds,
            }),
            placement_version: r.placement_version,
            placement_changed_unix_ms: r.placement_changed_unix_ms,
            windows: r
                .windows
                .into_iter()
                .map(|w| pb::WindowLoad {
                    seconds: w.seconds,
                    covered_seconds: w.covered_seconds,
                    layers: w
                        .layers
                        .into_iter()
                        .map(|l| pb::LayerLoad {
                            layer: l.layer,
                            expert_tokens: l.expert_tokens,
                            workers: l.worker_tokens.keys().cloned().collect(),
                            worker_tokens: l.worker_tokens.values().copied().collect(),
                            imbalance: l.imbalance,
                            hosts: l.hosts.into_iter().map(|workers| pb::HostList { workers }).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<pb::ExpertLoadResponse> for LoadReport {
    /// As received (a client's view): mismatched worker lists are cut to the shorter.
    fn from(r: pb::ExpertLoadResponse) -> Self {
        LoadReport {
            last_rebalance: r.last_rebalance.map(|l| RebalanceRecord {
                version: l.version,
                trigger: l.trigger,
                unix_ms: l.unix_ms,
                measured_before: l.measured_before,
                predicted: l.predicted,
                loaded: l.loaded,
                released: l.released,
                seconds: l.seconds,
            }),
            placement_version: r.placement_version,
            placement_changed_unix_ms: r.placement_changed_unix_ms,
            windows: r
                .windows
                .into_iter()
                .map(|w| WindowLoad {
                    seconds: w.seconds,
                    covered_seconds: w.covered_seconds,
                    layers: w
                        .layers
                        .into_iter()
                        .map(|l| LayerLoad {
                            layer: l.layer,
                            expert_tokens: l.expert_tokens,
                            worker_tokens: l.workers.into_iter().zip(l.worker_tokens).collect(),
                            imbalance: l.imbalance,
                            hosts: l.hosts.into_iter().map(|h| h.workers).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> TextConfig {
        let json = epserve_synthetic::Preset::Tiny.config_json(480);
        epserve_model::ModelConfig::from_json(&json).expect("tiny").text
    }

    #[test]
    fn windows_sum_tokens_and_imbalance_is_max_over_mean() {
        let t = LoadTelemetry::new(&model());
        let layer = t.moe_layers()[0] as usize;
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        t.set_workers(vec![a.clone(), b.clone(), "c".into()]);
        t.record_experts(layer, [(0, 5), (3, 1)]);
        t.record_experts(layer, [(0, 2)]);
        t.record_worker(layer, &a, 6);
        t.record_worker(layer, &b, 2);
        let w = t.window(10);
        let l = &w.layers[0];
        assert_eq!(l.expert_tokens[0], 7);
        assert_eq!(l.expert_tokens[3], 1);
        assert_eq!(l.worker_tokens["a"], 6);
        assert_eq!(l.worker_tokens["c"], 0, "idle workers count in the mean");
        assert!((l.imbalance - 6.0 * 3.0 / 8.0).abs() < 1e-9, "{}", l.imbalance);
        assert_eq!(w.layers[1].imbalance, 1.0, "no tokens: balanced");
        // A placement change restarts the worker loads, not the expert loads.
        t.placement_changed(2);
        let w = t.window(10);
        assert_eq!(w.layers[0].worker_tokens["a"], 0);
        assert_eq!(w.layers[0].expert_tokens[0], 7);
        assert_eq!(t.report().placement_version, 2);
        // Dense layers and unknown experts are ignored.
        t.record_experts(10_000, [(0, 1)]);
        t.record_experts(layer, [(999, 1)]);
    }

    #[test]
    fn reports_survive_the_proto_round_trip() {
        let t = LoadTelemetry::new(&model());
        let layer = t.moe_layers()[0] as usize;
        t.set_workers(vec!["a".into()]);
        t.record_experts(layer, [(1, 4)]);
        t.record_worker(layer, &"a".into(), 4);
        let mut report = t.report();
        report.last_rebalance = Some(RebalanceRecord {
            version: 3,
            trigger: "auto".into(),
            unix_ms: 1,
            measured_before: 1.9,
            predicted: 1.1,
            loaded: 4,
            released: 2,
            seconds: 0.5,
        });
        let back = LoadReport::from(pb::ExpertLoadResponse::from(report.clone()));
        assert_eq!(back, report);
    }

    #[test]
    fn imbalance_of_nothing_is_one() {
        assert_eq!(imbalance([]), 1.0);
        assert_eq!(imbalance([0, 0]), 1.0);
        assert_eq!(imbalance([2, 2]), 1.0);
        assert_eq!(imbalance([3, 1]), 1.5);
    }
}
