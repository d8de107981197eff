//! Live expert load balancing on a coordinator that reaches its experts through workers
//! (docs/load-balancing.md, "Live rebalancing"): the [`LoadBalancer`] reports the load (the
//! transport's [`LoadTelemetry`] with the hosts each expert is routed to now) and, on the placement
//! leader (or a statically wired coordinator), applies a new placement to the running cluster
//! without failing a request or making a step wait on a weight load, and decides when to
//! (automatic rebalancing).
//!
//! A change goes in four phases:
//! 1. **stage**: every worker that gains `(layer, expert)` replicas loads them from its memory-mapped
//!    checkpoint (`ExpertPlacementService.Place`), beside its exchanges, and announces them;
//! 2. **flip**: once this coordinator's links confirm every new replica, the placement is written
//!    (fenced compare-and-swap in the registry; with static wiring, this coordinator's own map):
//!    coordinators route by it from their next expert dispatch;
//! 3. **drain**: every coordinator reports (its registry record's `placement_version`) once no
//!    exchange sent by older routes is still in flight;
//! 4. **release**: workers drop the replicas the new placement no longer names.
//!
//! Until the flip nothing routes to a new replica; until the release every old one is still
//! there; an exchange is always sent to a worker that holds its experts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epserve_control::{ControlPlane, Fence, Instance, Kind, LayerPlacement, PlacementMap};
use epserve_eplb::LoadMatrix;
use epserve_proto::metric_names as m;
use epserve_proto::v1::expert_placement_service_client::ExpertPlacementServiceClient;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{ExpertPair, PlaceRequest, StatusRequest};
use tokio::sync::watch;

use crate::load_telemetry::{LoadReport, LoadTelemetry, RebalanceRecord, WINDOWS};
use crate::transport::FixedMembers;
use crate::transport::links::{WorkerSet, record_from_layers};

/// How often the gauges `epserve_expert_load` and `epserve_worker_load_imbalance` are refreshed.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// How long a phase may take before the change is abandoned (stage, confirm) or left incomplete
/// (drain: old replicas are then kept, which costs memory, never a request).
const STAGE_TIMEOUT: Duration = Duration::from_secs(300);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to answer `Status` (the size of its replicas) before planning.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a placement could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    /// The placement is malformed for this cluster: retrying will not help.
    #[error("placement: {0}")]
    Invalid(String),
    /// Another coordinator leads (only the leader changes the placement).
    #[error("this coordinator does not lead the placement election{}", .leader.as_ref().map(|l| format!(" ({l} does)")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
    /// Another change is in progress.
    #[error("another placement change is in progress")]
    Busy,
    /// A worker could not load its new replicas, or a phase timed out: may succeed later.
    #[error("{0}")]
    Failed(String),
}

/// What one change did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub version: u64,
    pub loaded: usize,
    pub released: usize,
    pub seconds: f64,
    /// The old replicas were kept: a coordinator did not report in time that it stopped using them.
    pub release_skipped: bool,
}

/// Automatic rebalancing (`--eplb-interval`, `--eplb-threshold`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoConfig {
    /// How often the imbalance is checked.
    pub interval: Duration,
    /// Rebalance when the measured aggregate imbalance exceeds this...
    pub threshold: f64,
    /// ...and only again once it has fallen below `threshold - hysteresis`; a plan is applied only
    /// when it predicts at least `hysteresis` less than measured.
    pub hysteresis: f64,
    /// At most this many bytes of replicas loaded per change (`None`: no limit).
    pub max_move_bytes: Option<u64>,
    /// Expert slots per worker and MoE layer (`None`: ⌈1.25 · experts / workers⌉, a quarter
    /// redundant).
    pub slots_per_worker: Option<usize>,
    /// Tokens the decision window must hold before it is trusted.
    pub min_tokens: u64,
}

/// The registry side of a coordinator that takes part in elections.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub plane: ControlPlane,
    pub leading: watch::Receiver<Option<Fence>>,
    pub election: String,
}

/// The load balancer of one coordinator: its own telemetry, and, on the placement leader (or a
/// statically wired coordinator), the power to change the placement.
#[derive(Debug)]
pub struct LoadBalancer {
    workers: Arc<WorkerSet>,
    fixed: Option<Arc<FixedMembers>>,
    leadership: Option<Leadership>,
    busy: tokio::sync::Mutex<()>,
    last: parking_lot::Mutex<Option<RebalanceRecord>>,
}

impl LoadBalancer {
    pub(crate) fn new(
        workers: Arc<WorkerSet>,
        fixed: Option<Arc<FixedMembers>>,
        leadership: Option<Leadership>,
    ) -> Arc<Self> {
        tokio::spawn(workers.telemetry.clone().publish_every(PUBLISH_EVERY));
        Arc::new(LoadBalancer {
            workers,
            fixed,
            leadership,
            busy: tokio::sync::Mutex::new(()),
            last: parking_lot::Mutex::new(None),
        })
    }

    pub fn telemetry(&self) -> &Arc<LoadTelemetry> {
        &self.workers.telemetry
    }

    /// The placement version this coordinator routes by and no longer uses older routes for.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.workers.acked.subscribe()
    }

    /// The telemetry's windows with the hosts each expert is routed to now, and the last change.
    pub fn report(&self) -> LoadReport {
        let mut report = self.telemetry().report();
        report.last_rebalance = self.last.lock().clone();
        let routes = self.workers.routes();
        for w in &mut report.windows {
            for l in &mut w.layers {
                l.hosts = routes.host_ids(l.layer as usize);
            }
        }
        report
    }

    /// The placement routed by now: the registry's or this coordinator's own; without either, what
    /// the linked workers host.
    pub async fn current(&self) -> Result<PlacementMap, RebalanceError> {
        if let Some(l) = &self.leadership {
            return l
                .plane
                .placement()
                .await
                .map_err(|e| RebalanceError::Failed(format!("reading the placement: {e}")))?
                .ok_or_else(|| RebalanceError::Failed("the registry holds no placement yet".into()));
        }
        if let Some(fixed) = &self.fixed
            && let Some(map) = fixed.1.borrow().clone()
        {
            return Ok(map);
        }
        let routes = self.workers.routes();
        let layers = self
            .telemetry()
            .moe_layers()
            .iter()
            .map(|&layer| LayerPlacement { layer, hosts: routes.host_ids(layer as usize) })
            .collect();
        Ok(PlacementMap { version: 0, layers })
    }

    fn fence(&self) -> Result<Option<Fence>, RebalanceError> {
        match &self.leadership {
            None => Ok(None),
            Some(l) => match l.leading.borrow().clone() {
                Some(fence) => Ok(Some(fence)),
                None => Err(RebalanceError::NotLeader { leader: None }),
            },
        }
    }

    /// Whether this coordinator may change the placement now.
    pub fn leads(&self) -> bool {
        self.fence().is_ok()
    }

    /// Checks `plan` against the model and the linked workers.
    fn validate(&self, plan: &PlacementMap) -> Result<(), RebalanceError> {
        let invalid = |m: String| Err(RebalanceError::Invalid(m));
        let moe: Vec<u32> = self.telemetry().moe_layers().to_vec();
        let experts = self.telemetry().num_experts();
        let planned: Vec<u32> = plan.layers.iter().map(|l| l.layer).collect();
        let (mut sorted, mut want) = (planned.clone(), moe.clone());
        sorted.sort_unstable();
        want.sort_unstable();
        if sorted != want {
            return invalid(format!("it places layers {planned:?}; the model's MoE layers are {moe:?}"));
        }
        let links = self.workers.links();
        for l in &plan.layers {
            if l.hosts.len() != experts {
                return invalid(format!("layer {} lists {} experts; the model has {experts}", l.layer, l.hosts.len()));
            }
            for (e, hosts) in l.hosts.iter().enumerate() {
                if hosts.is_empty() {
                    return invalid(format!("expert {e} of layer {} has no host", l.layer));
                }
                let distinct: BTreeSet<&String> = hosts.iter().collect();
                if distinct.len() != hosts.len() {
                    return invalid(format!("expert {e} of layer {} lists a host twice", l.layer));
                }
                if let Some(h) = hosts.iter().find(|h| links.get(*h).is_none_or(|link| link.dead().is_some())) {
                    let mut known: Vec<&String> = links.keys().collect();
                    known.sort();
                    return invalid(format!(
                        "expert {e} of layer {} is placed on {h:?}, which is not a live worker (live: {known:?})",
                        l.layer
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies `plan` live: stage, flip, drain, release (module docs). `judged`: the aggregate
    /// imbalance measured before and predicted for `plan` (automatic rebalancing), for the record.
    pub async fn apply(
        &self,
        mut plan: PlacementMap,
        trigger: &'static str,
        judged: Option<(f64, f64)>,
    ) -> Result<Applied, RebalanceError> {
        let result = self.apply_inner(&mut plan).await;
        let outcome = if result.is_ok() { "applied" } else { "failed" };
        metrics::counter!(m::EPLB_REBALANCES_TOTAL, "trigger" => trigger, "result" => outcome).increment(1);
        match &result {
            Ok(a) => {
                let (measured_before, predicted) = judged.unwrap_or((0.0, 0.0));
                *self.last.lock() = Some(RebalanceRecord {
                    version: a.version,
                    trigger: trigger.to_owned(),
                    unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    measured_before,
                    predicted,
                    loaded: a.loaded as u32,
                    released: a.released as u32,
                    seconds: a.seconds,
                });
                metrics::histogram!(m::EPLB_REBALANCE_SECONDS).record(a.seconds);
                tracing::info!(
                    trigger,
                    version = a.version,
                    "placement applied live: {} replicas loaded, {} released, {:.2} s",
                    a.loaded,
                    a.released,
                    a.seconds
                );
            }
            Err(e) => tracing::warn!(trigger, "placement not applied: {e}"),
        }
        result
    }

    async fn apply_inner(&self, plan: &mut PlacementMap) -> Result<Applied, RebalanceError> {
        let _one = self.busy.try_lock().map_err(|_| RebalanceError::Busy)?;
        if let (Err(RebalanceError::NotLeader { .. }), Some(l)) = (self.fence(), &self.leadership) {
            let leader = l.plane.leader(&l.election).await.ok().flatten();
            return Err(RebalanceError::NotLeader { leader });
        }
        self.validate(plan)?;
        let started = Instant::now();
        let links = self.workers.links();
        // Phase 1: stage.
        let mut loads: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        let mut releases: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        for (id, link) in &links {
            let wanted = plan.pairs_of(id);
            let hosted = link.hosted();
            let load: Vec<(u32, u32)> = wanted.difference(&hosted).copied().collect();
            let release: Vec<(u32, u32)> = hosted.difference(&wanted).copied().collect();
            if !load.is_empty() {
                loads.insert(id.clone(), load);
            }
            if !release.is_empty() {
                releases.insert(id.clone(), release);
            }
        }
        let loaded: usize = loads.values().map(Vec::len).sum();
        let staged = self.stage(&loads).await?;
        let staged_ms = started.elapsed().as_millis();
        self.announce_static(&staged);
        self.confirm(plan).await?;
        let confirmed_ms = started.elapsed().as_millis();
        // Phase 2: flip.
        let version = self.flip(plan).await?;
        let flipped_ms = started.elapsed().as_millis();
        // Phase 3: drain.
        let drained = self.drain(version).await;
        tracing::info!(
            version,
            "placement change: staged in {staged_ms} ms, confirmed at {confirmed_ms} ms, flipped at {flipped_ms} ms, \
             drained at {} ms",
            started.elapsed().as_millis()
        );
        // Phase 4: release.
        let (released, release_skipped) = match drained {
            Ok(()) => {
                let done = self.place_all(&releases, false).await?;
                self.announce_static(&done);
                (releases.values().map(Vec::len).sum(), false)
            }
            Err(e) => {
                tracing::warn!("old replicas kept (they cost memory, not correctness): {e}");
                (0, true)
            }
        };
        Ok(Applied { version, loaded, released, seconds: started.elapsed().as_secs_f64(), release_skipped })
    }

    /// Loads the new replicas one `(layer, expert)` pair per `Place` call, one call at a time: a
    /// load reads and converts weights on the worker's CPU, which the steps in flight share, so the
    /// work is spread out rather than done by every worker at once (on a 2-core host, 29 `mini`
    /// replicas loaded at once slowed one step to 2.5× the median), with a pause as long as each
    /// call between calls. Returns each worker's hosted layers after its last call.
    async fn stage(
        &self,
        loads: &BTreeMap<String, Vec<(u32, u32)>>,
    ) -> Result<BTreeMap<String, Vec<epserve_proto::v1::LayerExperts>>, RebalanceError> {
        let mut out = BTreeMap::new();
        for (id, pairs) in loads {
            for &pair in pairs {
                let one = BTreeMap::from([(id.clone(), vec![pair])]);
                let started = Instant::now();
                out.append(&mut self.place_all(&one, true).await?);
                // As long again before the next: at most half of a core's time goes to loading.
                tokio::time::sleep(started.elapsed()).await;
            }
        }
        Ok(out)
    }

    /// `Place` on every worker of `pairs` at once (`load`: load them; else release them). Returns
    /// each worker's hosted layers after the call.
    async fn place_all(
        &self,
        pairs: &BTreeMap<String, Vec<(u32, u32)>>,
        load: bool,
    ) -> Result<BTreeMap<String, Vec<epserve_proto::v1::LayerExperts>>, RebalanceError> {
        let links = self.workers.links();
        let mut calls = tokio::task::JoinSet::new();
        for (id, ps) in pairs {
            let Some(link) = links.get(id) else {
                return Err(RebalanceError::Failed(format!("worker {id} is no longer linked")));
            };
            let request = PlaceRequest {
                load: if load { to_proto(ps) } else { Vec::new() },
                release: if load { Vec::new() } else { to_proto(ps) },
            };
            let (id, channel, addr) = (id.clone(), link.channel.clone(), link.addr.clone());
            calls.spawn(async move {
                let mut client = ExpertPlacementServiceClient::new(channel);
                let answer = tokio::time::timeout(STAGE_TIMEOUT, client.place(request)).await;
                (id, addr, answer)
            });
        }
        let mut out = BTreeMap::new();
        let mut failures = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((id, _, Ok(Ok(answer)))) => {
                    out.insert(id, answer.into_inner().layers);
                }
                Ok((_, addr, Ok(Err(status)))) => failures.push(format!("worker {addr}: {}", status.message())),
                Ok((_, addr, Err(_))) => failures.push(format!("worker {addr}: no answer in {STAGE_TIMEOUT:?}")),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.is_empty() {
            Ok(out)
        } else {
            let what = if load { "loading the new replicas" } else { "releasing the old replicas" };
            Err(RebalanceError::Failed(format!("{what}: {}", failures.join("; "))))
        }
    }

    /// With static wiring there is no registry record to announce what a worker hosts: this
    /// coordinator updates its fixed membership from the workers' answers.
    fn announce_static(&self, hosted: &BTreeMap<String, Vec<epserve_proto::v1::LayerExperts>>) {
        let Some(fixed) = &self.fixed else { return };
        fixed.0.send_modify(|records| {
            for r in records.iter_mut() {
                if let Some(layers) = hosted.get(&r.id) {
                    let fresh = record_from_layers(&r.id, layers, self.workers.model());
                    r.experts = fresh.experts;
                    r.replicas = fresh.replicas;
                }
            }
        });
    }

    /// Waits until this coordinator's links confirm every replica `plan` places.
    async fn confirm(&self, plan: &PlacementMap) -> Result<(), RebalanceError> {
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let mut generation = self.workers.generation.subscribe();
        loop {
            let links = self.workers.links();
            let missing: Vec<String> = plan
                .workers()
                .into_iter()
                .filter(|w| {
                    let hosted = links.get(*w).map(|l| l.hosted()).unwrap_or_default();
                    !plan.pairs_of(w).is_subset(&hosted)
                })
                .map(str::to_owned)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let wait = tokio::time::timeout_at(deadline, generation.changed());
            // Links are re-confirmed on a record change, or at the follower's next pass (1 s).
            if tokio::time::timeout(Duration::from_millis(200), wait).await.is_ok_and(|r| r.is_err()) {
                return Err(RebalanceError::Failed(format!(
                    "workers {missing:?} did not confirm their new replicas within {CONFIRM_TIMEOUT:?}"
                )));
            }
        }
    }

    /// Writes `plan` as the placement; its version.
    async fn flip(&self, plan: &mut PlacementMap) -> Result<u64, RebalanceError> {
        match (&self.leadership, &self.fixed) {
            (Some(l), _) => {
                for _ in 0..10 {
                    let fence = self.fence()?;
                    let current = l
                        .plane
                        .placement()
                        .await
                        .map_err(|e| RebalanceError::Failed(format!("reading the placement: {e}")))?;
                    plan.version = current.map_or(0, |c| c.version);
                    match l.plane.swap_placement(plan, fence.as_ref()).await {
                        Ok(true) => return Ok(plan.version + 1),
                        // Changed concurrently (the controller healed it): read it again.
                        Ok(false) => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(e) => return Err(RebalanceError::Failed(format!("writing the placement: {e}"))),
                    }
                }
                Err(RebalanceError::Failed("the placement kept changing under the compare-and-swap".into()))
            }
            (None, Some(fixed)) => {
                let version = fixed.1.borrow().as_ref().map_or(0, |m| m.version) + 1;
                plan.version = version;
                fixed.1.send_replace(Some(plan.clone()));
                Ok(version)
            }
            (None, None) => Err(RebalanceError::Failed("this coordinator has no placement to change".into())),
        }
    }

    /// Waits until no coordinator routes by a placement older than `version`.
    async fn drain(&self, version: u64) -> Result<(), RebalanceError> {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let mut acked = self.workers.acked.subscribe();
        tokio::time::timeout_at(deadline, acked.wait_for(|&v| v >= version))
            .await
            .map_err(|_| RebalanceError::Failed(format!("this coordinator still routes by version < {version}")))?
            .map_err(|_| RebalanceError::Failed("the routes follower stopped".into()))?;
        let Some(l) = &self.leadership else { return Ok(()) };
        loop {
            let lagging: Vec<String> = match l.plane.list(Kind::Coordinator).await {
                Ok(all) => all
                    .iter()
                    .filter(|c: &&Instance| c.ready && c.placement_version < version)
                    .map(|c| c.id.clone())
                    .collect(),
                Err(e) => vec![format!("(registry: {e})")],
            };
            if lagging.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RebalanceError::Failed(format!(
                    "coordinators {lagging:?} did not report routing by version {version} within {DRAIN_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The expert loads of the window that best fits `interval`, as the planners take them.
    fn loads(&self, interval: Duration) -> (crate::load_telemetry::WindowLoad, LoadMatrix) {
        let secs = WINDOWS.iter().copied().find(|&w| u64::from(w) >= interval.as_secs()).unwrap_or(WINDOWS[2]);
        let window = self.telemetry().window(secs);
        let loads = LoadMatrix {
            layers: window.layers.iter().map(|l| l.layer).collect(),
            loads: window.layers.iter().map(|l| l.expert_tokens.iter().map(|&n| n as f64).collect()).collect(),
        };
        (window, loads)
    }

    /// Bytes of one expert replica as the workers hold it, what each replica a change loads costs:
    /// every live worker's `Status` says how many expert bytes it holds (`resident_bytes`: the
    /// checkpoint's dtype, or the quantized matrices with their scales under `--quantize`) for how
    /// many `(layer, expert)` pairs; the largest quotient over workers is taken (workers of one
    /// cluster normally agree; if one holds wider weights, a move to it costs that much).
    pub async fn replica_bytes(&self) -> Result<u64, RebalanceError> {
        let mut calls = tokio::task::JoinSet::new();
        for link in self.workers.links().into_values().filter(|l| l.dead().is_none()) {
            let (channel, addr) = (link.channel.clone(), link.addr.clone());
            calls.spawn(async move {
                let mut client = ExpertServiceClient::new(channel);
                (addr, tokio::time::timeout(STATUS_TIMEOUT, client.status(StatusRequest {})).await)
            });
        }
        let mut largest: Option<u64> = None;
        let mut failures = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((addr, Ok(Ok(status)))) => {
                    let status = status.into_inner();
                    if let Some(bytes) = bytes_per_pair(status.resident_bytes, &status.layers) {
                        largest = Some(largest.map_or(bytes, |b| b.max(bytes)));
                    } else {
                        tracing::debug!("worker {addr} hosts no expert: no replica size from it");
                    }
                }
                Ok((addr, Ok(Err(status)))) => failures.push(format!("worker {addr}: {}", status.message())),
                Ok((addr, Err(_))) => failures.push(format!("worker {addr}: no status in {STATUS_TIMEOUT:?}")),
                Err(e) => failures.push(e.to_string()),
            }
        }
        largest.ok_or_else(|| {
            RebalanceError::Failed(format!("no live worker reported the size of its experts ({})", failures.join("; ")))
        })
    }

    /// A plan for the current loads: the cost-aware planner's cheapest point within `hysteresis`
    /// of its best, under the byte budget; with its predicted aggregate imbalance.
    pub async fn plan(&self, loads: &LoadMatrix, auto: &AutoConfig) -> Result<(PlacementMap, f64), RebalanceError> {
        let current = self.current().await?;
        let mut workers: Vec<String> =
            self.workers.links().into_iter().filter(|(_, l)| l.dead().is_none()).map(|(id, _)| id).collect();
        workers.sort();
        if workers.is_empty() {
            return Err(RebalanceError::Failed("no live worker".into()));
        }
        let experts = self.telemetry().num_experts();
        let slots = auto.slots_per_worker.unwrap_or_else(|| (experts * 5).div_ceil(4 * workers.len()));
        let bytes = self.replica_bytes().await?;
        let (budget, tolerance, loads) = (auto.max_move_bytes, auto.hysteresis / 2.0, loads.clone());
        // The planner is CPU work (hundreds of milliseconds for `mini` on the 2-core host): on a
        // thread of its own at the lowest priority, so that the steps it shares the cores with do
        // not wait for it (on the normal runtime, the step beside it took 5× the median).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("eplb-planner".into())
            .spawn(move || {
                // Linux: a thread's own nice value. Not fatal if refused: it then plans at normal priority.
                let _ = rustix::process::setpriority_process(None, 19);
                let planned = epserve_eplb::plan::cost_aware(&loads, &workers, slots, &current, &|_, _| bytes, budget)
                    .map_err(|e| RebalanceError::Failed(format!("planning: {e}")))
                    .and_then(|points| {
                        epserve_eplb::plan::choose(&points, None, tolerance)
                            .map(|p| (p.placement.clone(), p.imbalance_aggregate))
                            .ok_or_else(|| RebalanceError::Failed("the planner found no placement".into()))
                    });
                let _ = tx.send(planned);
            })
            .map_err(|e| RebalanceError::Failed(format!("starting the planner thread: {e}")))?;
        rx.await.map_err(|_| RebalanceError::Failed("the planner thread died".into()))?
    }

    /// Automatic rebalancing: every `auto.interval`, while this coordinator may change the
    /// placement, measures the aggregate worker-load imbalance over the fitting window; above the
    /// threshold (and armed), plans and applies when the plan predicts a gain of at least the
    /// hysteresis. Disarmed after a change until the imbalance falls below threshold − hysteresis.
    pub async fn run_auto(self: Arc<Self>, auto: AutoConfig) {
        let mut armed = true;
        loop {
            tokio::time::sleep(auto.interval).await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            if !self.leads() {
                continue;
            }
            let (window, loads) = self.loads(auto.interval);
            let measured = window.aggregate_imbalance();
            let since_change = window.covered_seconds;
            if window.tokens() < auto.min_tokens || since_change < auto.interval.as_secs_f64().min(5.0) {
                continue;
            }
            if measured < auto.threshold - auto.hysteresis {
                armed = true;
            }
            if !armed || measured <= auto.threshold {
                continue;
            }
            let planning = Instant::now();
            let planned = self.plan(&loads, &auto).await;
            tracing::info!("planned in {} ms", planning.elapsed().as_millis());
            match planned {
                Ok((plan, predicted)) if predicted <= measured - auto.hysteresis => {
                    tracing::info!(
                        "worker-load imbalance {measured:.3} over the last {:.0} s is above {}: applying a plan predicted at {predicted:.3}",
                        since_change,
                        auto.threshold
                    );
                    if self.apply(plan, "auto", Some((measured, predicted))).await.is_ok() {
                        armed = false;
                    }
                }
                Ok((_, predicted)) => {
                    tracing::debug!(
                        "imbalance {measured:.3}: the best plan predicts {predicted:.3}, not worth a change"
                    );
                }
                Err(e) => tracing::warn!("automatic rebalancing: {e}"),
            }
        }
    }
}

/// Expert bytes per hosted `(layer, expert)` pair of a worker's `Status` (`None`: it hosts none).
/// Every pair of one worker is held the same way, so the quotient is one replica's size.
fn bytes_per_pair(resident_bytes: u64, layers: &[epserve_proto::v1::LayerExperts]) -> Option<u64> {
    let pairs: u64 = layers.iter().map(|l| l.experts.len() as u64).sum();
    (pairs > 0 && resident_bytes > 0).then(|| resident_bytes.div_ceil(pairs))
}

fn to_proto(pairs: &[(u32, u32)]) -> Vec<ExpertPair> {
    pairs.iter().map(|&(layer, expert)| ExpertPair { layer, expert }).collect()
}

/// Writes the placement version this coordinator has drained to into its registry record, for the
/// placement leader's drain phase. Runs until the balancer is gone.
pub async fn report_acks(mut acked: watch::Receiver<u64>, membership: Arc<epserve_control::Membership>) {
    loop {
        let version = *acked.borrow_and_update();
        if membership.record().placement_version != version {
            membership.update(|i| i.placement_version = version);
        }
        if acked.changed().await.is_err() {
            return;
        }
    }
}
