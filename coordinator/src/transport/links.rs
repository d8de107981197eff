//! The `grpc` transport's view of the workers: one [`WorkerLink`] (exchange stream) per live worker
//! and the [`Routes`] from every (layer, expert) to the links hosting it, kept up to date from a
//! membership list — fixed (`--workers`) or followed in the registry. A link whose stream ends is
//! dead at once (a killed process resets its connection); a worker that leaves the list (lease
//! expired, or it stopped) is dead too; one that is listed but not connected is retried every
//! second, so a worker that comes back is used again. A link to a worker on this host carries its
//! exchanges over shared-memory rings when the worker accepts the handshake (`super::shm`); its
//! stream then only carries liveness.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use epserve_control::{Instance, Kind, PlacementMap};
use epserve_model::TextConfig;
use epserve_proto::metric_names as m;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse, StatusRequest};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

use super::shm::{self, LinkMedium, ShmAnswers, ShmConfig, ShmRequests, WorkerTransport};
use crate::errors::TransportError;

pub(super) type Reply = Result<ExchangeResponse, TransportError>;

/// One worker's stream: the sender side of its requests and the exchanges awaiting an answer.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub id: String,
    pub addr: String,
    /// The id as the load telemetry counts it.
    pub key: Arc<str>,
    incarnation: u64,
    /// The `(layer, expert)` pairs the worker's record lists *and* its `Status` confirms; updated
    /// (after asking `Status` again) when the worker announces experts it loaded or released.
    hosted: RwLock<BTreeSet<(u32, u32)>>,
    /// The record's announcement `hosted` was confirmed from.
    announced: RwLock<Announced>,
    /// For asking `Status` again.
    client: ExpertServiceClient<Channel>,
    /// For the placement leader's `ExpertPlacementService` calls.
    pub channel: Channel,
    pub requests: mpsc::Sender<ExchangeRequest>,
    pub pending: Arc<Mutex<Pending>>,
    /// What the exchanges travel over: the request ring when the worker accepted shared memory.
    pub medium: LinkMedium,
    shm: Option<ShmRequests>,
    /// The response ring, read by the threads waiting for answers (with `shm`).
    pub answers: Option<ShmAnswers>,
}

/// What a worker's record says it hosts: in every MoE layer, and per layer beyond that.
type Announced = (Vec<u32>, BTreeMap<u32, Vec<u32>>);

fn announced(w: &Instance) -> Announced {
    (w.experts.clone(), w.replicas.clone())
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set when the link died: why, so that later exchanges fail at once with the reason.
    pub dead: Option<String>,
}

impl WorkerLink {
    pub(super) fn hosts(&self, layer: u32, expert: u32) -> bool {
        self.hosted.read().contains(&(layer, expert))
    }

    /// The confirmed `(layer, expert)` pairs.
    pub fn hosted(&self) -> BTreeSet<(u32, u32)> {
        self.hosted.read().clone()
    }

    pub fn dead(&self) -> Option<String> {
        self.pending.lock().dead.clone()
    }

    /// Marks the link dead and fails every exchange waiting on it. True if it was alive.
    pub fn kill(&self, reason: &str) -> bool {
        let mut p = self.pending.lock();
        if p.dead.is_some() {
            return false;
        }
        p.dead = Some(reason.to_owned());
        for (_, tx) in p.waiting.drain() {
            let _ = tx.send(Err(TransportError::Unavailable { worker: self.addr.clone(), reason: reason.to_owned() }));
        }
        drop(p);
        // Stops the worker serving the rings and wakes a sender waiting for room in them.
        if let Some(shm) = &self.shm {
            shm.close();
        }
        true
    }

    /// Sends `request` over the link's medium (waiting until `deadline` for room in a full
    /// request ring); a request larger than the ring goes over the gRPC stream. `Ok(true)`: it went
    /// over the ring. `Err`: why the link cannot carry it (the caller loses the link).
    pub fn send(&self, request: ExchangeRequest, deadline: Instant) -> Result<bool, String> {
        if let Some(shm) = &self.shm {
            match shm.send(&request, deadline) {
                Ok(()) => return Ok(true),
                Err(epserve_shm::ShmError::TooLarge { .. }) => {
                    metrics::counter!(m::SHM_OVERSIZE_MESSAGES_TOTAL, "direction" => "request").increment(1);
                }
                Err(e) => return Err(format!("shared-memory requests: {e}")),
            }
        }
        self.requests.blocking_send(request).map(|()| false).map_err(|_| "its exchange stream is closed".to_owned())
    }
}

/// `hosts[layer][expert]`: the links the placement names for it, in its order (without a
/// placement: every link that hosts it, by worker id; dense layers: empty). A replicated expert's
/// rows are split over its live hosts. `fallback[layer][expert]`: other links that host it, used
/// only while none of the placed hosts is alive (a worker lost before the placement leader
/// reassigned its experts, or a replica this coordinator has not seen announced yet).
#[derive(Debug, Default)]
pub(crate) struct Routes {
    pub hosts: Vec<Vec<Vec<Arc<WorkerLink>>>>,
    pub fallback: Vec<Vec<Vec<Arc<WorkerLink>>>>,
    /// The placement version these routes follow (0: none).
    pub version: u64,
}

impl Routes {
    /// The live hosts of `(layer, expert)` that `usable` accepts: the placed ones, or the fallback
    /// ones when none of those is (an exchange that already failed on every placed host goes on to
    /// the fallback hosts).
    pub fn live(&self, layer: usize, expert: u32, usable: impl Fn(&WorkerLink) -> bool) -> Vec<&Arc<WorkerLink>> {
        let placed = alive(&self.hosts, layer, expert, &usable);
        if placed.is_empty() { alive(&self.fallback, layer, expert, &usable) } else { placed }
    }

    /// Worker ids of the placed hosts of every expert of `layer`, for status reports.
    pub fn host_ids(&self, layer: usize) -> Vec<Vec<String>> {
        self.hosts
            .get(layer)
            .map(|experts| experts.iter().map(|hosts| hosts.iter().map(|h| h.id.clone()).collect()).collect())
            .unwrap_or_default()
    }

    /// Why each host of `(layer, expert)` is dead, for errors.
    pub fn why_dead(&self, layer: usize, expert: u32) -> Vec<String> {
        self.hosts
            .get(layer)
            .and_then(|l| l.get(expert as usize))
            .map(|hosts| {
                hosts
                    .iter()
                    .chain(self.fallback.get(layer).and_then(|l| l.get(expert as usize)).into_iter().flatten())
                    .filter_map(|h| h.dead().map(|reason| format!("expert worker {} is unavailable: {reason}", h.addr)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every (layer, expert) of an MoE layer without a live host, compactly; `Ok` if none.
    pub fn check_complete(&self, cfg: &TextConfig) -> Result<(), TransportError> {
        crate::placement::check_complete(cfg, |layer, e| !self.live(layer, e, |_| true).is_empty())
    }
}

/// The live links of `table[layer][expert]` that `usable` accepts.
fn alive<'a>(
    table: &'a [Vec<Vec<Arc<WorkerLink>>>],
    layer: usize,
    expert: u32,
    usable: &impl Fn(&WorkerLink) -> bool,
) -> Vec<&'a Arc<WorkerLink>> {
    table
        .get(layer)
        .and_then(|l| l.get(expert as usize))
        .map(|hosts| hosts.iter().filter(|h| h.dead().is_none() && usable(h)).collect())
        .unwrap_or_default()
}

/// How often a coordinator checks whether exchanges sent by an older placement's routes are still
/// in flight.
const ACK_EVERY: Duration = Duration::from_millis(20);

/// How long a worker whose answers showed it at fault (it refused experts it claims to host, or
/// answered malformed data) is left unconnected; a restart (new incarnation) ends it early.
const QUARANTINE: Duration = Duration::from_secs(30);

/// A worker lost, until the first step that finished without it.
#[derive(Debug)]
struct Loss {
    worker: String,
    at: Instant,
    unix_ms: u128,
}

/// The expert workers the transport reaches: a link per worker, the routes to them, the losses not
/// yet recovered from. Shared between the transport (engine thread) and the membership task (IO
/// runtime).
#[derive(Debug)]
pub(crate) struct WorkerSet {
    model: TextConfig,
    connect_timeout: Duration,
    /// The identity worker links are made with (mutual TLS); `None`: plaintext.
    tls: Option<epserve_tls::ClusterTls>,
    shm: ShmConfig,
    /// Worker address → why its last connection attempt failed, for start-up errors.
    connect_errors: Mutex<HashMap<String, String>>,
    links: Mutex<HashMap<String, Arc<WorkerLink>>>,
    routes: RwLock<Arc<Routes>>,
    /// Bumped whenever the routes change; waiting for a host listens to it.
    pub generation: watch::Sender<u64>,
    changed: Notify,
    losses: Mutex<Vec<Loss>>,
    /// Worker id → (incarnation, until when): not reconnected before then.
    quarantined: Mutex<HashMap<String, (u64, Instant)>>,
    /// Tokens routed per expert and sent per worker, over sliding windows.
    pub telemetry: Arc<crate::load_telemetry::LoadTelemetry>,
    /// Routes replaced but perhaps still held by exchanges in flight (each holds the routes it was
    /// sent by until it is answered).
    retired: Mutex<Vec<Weak<Routes>>>,
    /// The placement version such that no exchange in flight was sent by the routes of an older one:
    /// what this coordinator reports to the placement leader, which releases the replicas a new
    /// placement dropped only once every coordinator reports it.
    pub acked: watch::Sender<u64>,
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

impl WorkerSet {
    pub fn new(
        model: &TextConfig,
        connect_timeout: Duration,
        tls: Option<epserve_tls::ClusterTls>,
        shm: ShmConfig,
    ) -> Arc<Self> {
        Arc::new(WorkerSet {
            model: model.clone(),
            connect_timeout,
            tls,
            shm,
            connect_errors: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            routes: RwLock::new(Arc::new(Routes::default())),
            generation: watch::channel(0).0,
            changed: Notify::new(),
            losses: Mutex::new(Vec::new()),
            quarantined: Mutex::new(HashMap::new()),
            telemetry: crate::load_telemetry::LoadTelemetry::new(model),
            retired: Mutex::new(Vec::new()),
            acked: watch::channel(0).0,
        })
    }

    /// Publishes in [`Self::acked`] the oldest placement version an exchange in flight may still be
    /// using (the current one when none uses an older one).
    fn ack_unused(&self) {
        let current = self.routes().version;
        let mut retired = self.retired.lock();
        let mut oldest = current;
        retired.retain(|r| match r.upgrade() {
            Some(routes) => {
                oldest = oldest.min(routes.version);
                true
            }
            None => false,
        });
        drop(retired);
        self.acked.send_if_modified(|acked| {
            let changed = *acked != oldest;
            *acked = oldest;
            changed
        });
    }

    pub fn model(&self) -> &TextConfig {
        &self.model
    }

    /// The linked workers by id.
    pub fn links(&self) -> HashMap<String, Arc<WorkerLink>> {
        self.links.lock().clone()
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().clone()
    }

    pub fn shm_config(&self) -> &ShmConfig {
        &self.shm
    }

    /// Why the last attempt to connect to the worker at `addr` failed, if it did.
    pub fn connect_error(&self, addr: &str) -> Option<String> {
        self.connect_errors.lock().get(addr).cloned()
    }

    /// Addresses of the linked workers, sorted.
    pub fn addresses(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.links.lock().values().map(|l| l.addr.clone()).collect();
        addrs.sort();
        addrs
    }

    /// Stops sending to `link` (its exchanges in flight fail over to replicas) and notes the loss.
    pub fn lose(&self, link: &WorkerLink, reason: &str) {
        if link.kill(reason) {
            tracing::warn!(worker = %link.addr, id = %link.id, "expert worker lost: {reason}");
            metrics::counter!(m::FAILOVERS_TOTAL, "worker" => link.addr.clone()).increment(1);
            self.losses.lock().push(Loss { worker: link.addr.clone(), at: Instant::now(), unix_ms: unix_ms() });
            self.changed.notify_one();
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Loses `link` and leaves its worker unconnected for [`QUARANTINE`] (or until it restarts): its
    /// answers showed that its record or its computation cannot be trusted.
    pub fn quarantine(&self, link: &WorkerLink, reason: &str) {
        self.quarantined.lock().insert(link.id.clone(), (link.incarnation, Instant::now() + QUARANTINE));
        metrics::counter!(m::WORKERS_QUARANTINED_TOTAL, "worker" => link.addr.clone()).increment(1);
        self.lose(link, &format!("{reason} (not used again for {}s)", QUARANTINE.as_secs()));
    }

    fn is_quarantined(&self, w: &Instance) -> bool {
        let mut q = self.quarantined.lock();
        match q.get(&w.id) {
            Some(&(incarnation, until)) if incarnation == w.incarnation && Instant::now() < until => true,
            Some(_) => {
                q.remove(&w.id);
                false
            }
            None => false,
        }
    }

    /// Called after every step that succeeded: reports how long each loss took to get past.
    pub fn step_finished(&self) {
        let mut losses = self.losses.lock();
        for loss in losses.drain(..) {
            let took = loss.at.elapsed();
            metrics::histogram!(m::FAILOVER_RECOVERY_SECONDS).record(took.as_secs_f64());
            tracing::warn!(
                worker = %loss.worker,
                lost_at_unix_ms = loss.unix_ms as u64,
                recovered_at_unix_ms = unix_ms() as u64,
                "failover: first step without worker {} finished {:.1} ms after it was lost",
                loss.worker,
                took.as_secs_f64() * 1e3
            );
        }
    }

    /// Keeps the links in line with `members` (and `placement`'s preference order) until the
    /// membership sender is dropped.
    pub async fn follow(
        self: Arc<Self>,
        mut members: watch::Receiver<Vec<Instance>>,
        mut placement: watch::Receiver<Option<PlacementMap>>,
    ) {
        let acking = Arc::downgrade(&self);
        tokio::spawn(async move {
            while let Some(set) = acking.upgrade() {
                set.ack_unused();
                drop(set);
                tokio::time::sleep(ACK_EVERY).await;
            }
        });
        loop {
            let want = members.borrow_and_update().clone();
            let map = placement.borrow_and_update().clone();
            self.sync(&want, map.as_ref()).await;
            tokio::select! {
                r = members.changed() => if r.is_err() { return },
                _ = placement.changed() => {}
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One pass: connect new or restarted workers, drop departed ones, rebuild the routes.
    pub async fn sync(self: &Arc<Self>, want: &[Instance], placement: Option<&PlacementMap>) {
        let current: HashMap<String, Arc<WorkerLink>> = self.links.lock().clone();
        let mut next: HashMap<String, Arc<WorkerLink>> = HashMap::new();
        for (id, link) in &current {
            if !want.iter().any(|w| &w.id == id) {
                self.lose(link, "it left the registry (lease expired, or it stopped)");
            }
        }
        let mut connecting = tokio::task::JoinSet::new();
        for w in want {
            if let Some(old) = current.get(&w.id) {
                if old.dead().is_none() && old.incarnation == w.incarnation && old.addr == w.addr {
                    if *old.announced.read() != announced(w) {
                        // Believed only as far as the worker's own `Status` confirms it.
                        match self.confirmed_pairs(old.client.clone(), w).await {
                            Ok(pairs) => {
                                tracing::info!(
                                    worker = %w.addr,
                                    "worker now serves experts {:?} in every MoE layer and {} single-layer replicas",
                                    w.experts,
                                    w.replicas.values().map(Vec::len).sum::<usize>()
                                );
                                *old.hosted.write() = pairs;
                                *old.announced.write() = announced(w);
                            }
                            Err(e) => tracing::warn!(worker = %w.addr, "asking for its status again: {e}"),
                        }
                    }
                    next.insert(w.id.clone(), old.clone());
                    continue;
                }
                if old.incarnation != w.incarnation || old.addr != w.addr {
                    self.lose(old, "it restarted");
                }
            }
            if self.is_quarantined(w) {
                if let Some(old) = current.get(&w.id) {
                    next.insert(w.id.clone(), old.clone());
                }
                continue;
            }
            // Still listed: until an attempt succeeds, keep the dead link so that errors can say
            // what happened to it.
            if let Some(old) = current.get(&w.id) {
                next.insert(w.id.clone(), old.clone());
            }
            // Concurrently: one worker that hangs at connect must not hold up the others.
            let (set, w) = (self.clone(), w.clone());
            connecting.spawn(async move {
                let result = set.connect(&w).await;
                (w, result)
            });
        }
        // A worker that reconnects is routed to as soon as its link is made, not when the pass
        // ends: another worker that does not answer (stopped, or gone without closing its
        // connection) takes its connect timeout, and a worker that merely missed a deadline is
        // often the only other host of what is waiting. New workers join at the end of the pass
        // (at start-up, all of them at once).
        while let Some(joined) = connecting.join_next().await {
            let Ok((w, result)) = joined else { continue };
            match result {
                Ok(link) => {
                    tracing::info!(
                        worker = %w.addr,
                        id = %w.id,
                        transport = %link.medium,
                        "connected over {}; serves experts {:?} and single-layer replicas {:?}",
                        link.medium,
                        w.experts,
                        w.replicas
                    );
                    self.connect_errors.lock().remove(&w.addr);
                    next.insert(w.id.clone(), link);
                    if current.contains_key(&w.id) {
                        self.publish(&next, placement);
                    }
                }
                Err(e) => {
                    tracing::debug!(worker = %w.addr, "not connected yet: {e}");
                    self.connect_errors.lock().insert(w.addr.clone(), e.to_string());
                }
            }
        }
        self.publish(&next, placement);
    }

    /// Makes `links` the linked workers and routes by them (and `placement`).
    fn publish(&self, links: &HashMap<String, Arc<WorkerLink>>, placement: Option<&PlacementMap>) {
        let routes = Arc::new(self.build_routes(links, placement));
        let version = routes.version;
        self.telemetry.set_workers(links.values().map(|l| l.key.clone()).collect());
        *self.links.lock() = links.clone();
        let old = std::mem::replace(&mut *self.routes.write(), routes);
        if old.version < version {
            self.retired.lock().push(Arc::downgrade(&old));
        }
        drop(old);
        self.telemetry.placement_changed(version);
        self.generation.send_modify(|g| *g += 1);
    }

    fn build_routes(&self, links: &HashMap<String, Arc<WorkerLink>>, placement: Option<&PlacementMap>) -> Routes {
        let cfg = &self.model;
        let mut ids: Vec<&String> = links.keys().collect();
        ids.sort();
        let mut hosts = vec![vec![Vec::new(); cfg.num_local_experts]; cfg.num_hidden_layers];
        let mut fallback = hosts.clone();
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_local_experts as u32 {
                let placed: &mut Vec<Arc<WorkerLink>> = &mut hosts[layer][e as usize];
                let preferred = placement.map(|p| p.hosts(layer as u32, e)).unwrap_or_default();
                for id in preferred {
                    if let Some(link) = links.get(id)
                        && link.hosts(layer as u32, e)
                        && !placed.iter().any(|l| l.id == link.id)
                    {
                        placed.push(link.clone());
                    }
                }
                // Without a placement every link that hosts the expert is a host; with one, the
                // others are only a fallback.
                let others: Vec<Arc<WorkerLink>> = ids
                    .iter()
                    .filter_map(|id| links.get(*id))
                    .filter(|l| l.hosts(layer as u32, e) && !placed.iter().any(|p| p.id == l.id))
                    .cloned()
                    .collect();
                if placement.is_some() {
                    fallback[layer][e as usize] = others;
                } else {
                    placed.extend(others);
                }
            }
        }
        Routes { hosts, fallback, version: placement.map_or(0, |p| p.version) }
    }

    async fn connect(self: &Arc<Self>, w: &Instance) -> Result<Arc<WorkerLink>, TransportError> {
        let unavailable = |reason: String| TransportError::Unavailable { worker: w.addr.clone(), reason };
        let channel: Channel = tokio::time::timeout(
            self.connect_timeout,
            epserve_tls::connect(endpoint(&w.addr, self.connect_timeout)?, self.tls.as_ref()),
        )
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(format!("{e:?}")))?;
        let client = ExpertServiceClient::new(channel.clone())
            .max_decoding_message_size(epserve_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(epserve_proto::MAX_MESSAGE_BYTES);
        let pairs = self.confirmed_pairs(client.clone(), w).await?;
        open_stream(client, channel, w, pairs, self.clone()).await
    }

    /// The `(layer, expert)` pairs `w`'s record lists that its `Status` confirms it hosts. A record
    /// is written by whoever can write to the registry; the worker's own answer is what exchanges
    /// will meet.
    async fn confirmed_pairs(
        &self,
        mut client: ExpertServiceClient<Channel>,
        w: &Instance,
    ) -> Result<BTreeSet<(u32, u32)>, TransportError> {
        let unavailable = |reason: String| TransportError::Unavailable { worker: w.addr.clone(), reason };
        let status = tokio::time::timeout(self.connect_timeout, client.status(StatusRequest {}))
            .await
            .map_err(|_| unavailable("Status timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?
            .into_inner();
        check_worker_serves(&w.addr, &status, &self.model)?;
        let hosted = pairs_of_layers(&status.layers, &self.model);
        let mut confirmed = BTreeSet::new();
        let mut unconfirmed = Vec::new();
        for layer in self.model.moe_layers().map(|l| l as u32) {
            for e in (0..self.model.num_local_experts as u32).filter(|&e| w.hosts(layer, e)) {
                if hosted.contains(&(layer, e)) {
                    confirmed.insert((layer, e));
                } else {
                    unconfirmed.push((layer, e));
                }
            }
        }
        if !unconfirmed.is_empty() {
            metrics::counter!(m::REGISTRY_RECORD_MISMATCHES_TOTAL, "worker" => w.addr.clone()).increment(1);
            tracing::warn!(
                worker = %w.addr,
                id = %w.id,
                "its registry record lists (layer, expert) pairs {unconfirmed:?} that its Status does not report hosting: not routed there"
            );
        }
        Ok(confirmed)
    }
}

pub(super) fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, TransportError> {
    let uri = epserve_proto::server_uri(addr);
    let unavailable = |reason: String| TransportError::Unavailable { worker: addr.to_owned(), reason };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| unavailable(format!("bad address: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// The `(layer, expert)` pairs of `model`'s MoE layers that `layers` (a `Status` or `Place` answer)
/// reports hosted.
fn pairs_of_layers(layers: &[epserve_proto::v1::LayerExperts], model: &TextConfig) -> BTreeSet<(u32, u32)> {
    layers
        .iter()
        .filter(|l| model.moe_layers().any(|m| m == l.layer as usize))
        .flat_map(|l| l.experts.iter().filter(|&&e| (e as usize) < model.num_local_experts).map(|&e| (l.layer, e)))
        .collect()
}

/// The record a statically wired worker would have, from what it reports hosting (`Status` or a
/// `Place` answer): the experts it hosts in every MoE layer, and the others per layer.
pub(crate) fn record_from_layers(
    addr: &str,
    layers: &[epserve_proto::v1::LayerExperts],
    model: &TextConfig,
) -> Instance {
    let pairs = pairs_of_layers(layers, model);
    let moe: Vec<u32> = model.moe_layers().map(|l| l as u32).collect();
    let experts: Vec<u32> = (0..model.num_local_experts as u32)
        .filter(|&e| !moe.is_empty() && moe.iter().all(|&l| pairs.contains(&(l, e))))
        .collect();
    let mut replicas: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for &(l, e) in pairs.iter().filter(|(_, e)| !experts.contains(e)) {
        replicas.entry(l).or_default().push(e);
    }
    Instance { incarnation: 0, experts, replicas, ..Instance::new(Kind::Worker, addr, addr) }
}

/// A worker must serve a model of the same shape (hidden size, layers, experts), or its answers
/// would be garbage for this one.
pub(super) fn check_worker_serves(
    addr: &str,
    status: &epserve_proto::v1::StatusResponse,
    model: &TextConfig,
) -> Result<(), TransportError> {
    if (status.hidden as usize, status.num_layers as usize, status.num_experts as usize)
        != (model.hidden_size, model.num_hidden_layers, model.num_local_experts)
    {
        return Err(TransportError::Placement(format!(
            "worker {addr} serves a model with hidden {}, {} layers, {} experts; this one has {}, {}, {}",
            status.hidden,
            status.num_layers,
            status.num_experts,
            model.hidden_size,
            model.num_hidden_layers,
            model.num_local_experts
        )));
    }
    Ok(())
}

/// Opens the worker's exchange stream and spawns the task that matches answers to exchanges; when
/// the stream ends the link is lost (and its waiting exchanges fail over).
async fn open_stream(
    client: ExpertServiceClient<Channel>,
    channel: Channel,
    w: &Instance,
    hosted: BTreeSet<(u32, u32)>,
    workers: Arc<WorkerSet>,
) -> Result<Arc<WorkerLink>, TransportError> {
    let unavailable = |reason: String| TransportError::Unavailable { worker: w.addr.clone(), reason };
    let (tx, rx) = mpsc::channel::<ExchangeRequest>(1024);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let config = workers.shm_config();
    let offered = match shm::offer(config, &mut request) {
        Ok(offered) => offered,
        Err(e) if config.transport == WorkerTransport::Shm => {
            return Err(unavailable(format!("--transport shm: no shared-memory segment: {e}")));
        }
        Err(e) => {
            tracing::warn!(worker = %w.addr, "exchanges over gRPC: no shared-memory segment: {e}");
            None
        }
    };
    // Bounded: a worker that stopped after answering `Status` must not hold up the caller.
    let response = tokio::time::timeout(workers.connect_timeout, client.clone().exchange(request))
        .await
        .map_err(|_| unavailable("opening the exchange stream timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    let (medium, shm_ends) = match offered {
        None => (LinkMedium::Grpc, None),
        Some(segment) => {
            // Both sides hold the mapping now (or never will): the name has served its purpose.
            if let Err(e) = segment.unlink() {
                tracing::warn!(worker = %w.addr, "removing the shared-memory file: {e}");
            }
            match shm::accepted(response.metadata()) {
                Ok(()) => (LinkMedium::Shm, Some(segment.ends(epserve_shm::Role::Creator))),
                Err(why) if config.transport == WorkerTransport::Shm => {
                    return Err(unavailable(format!("--transport shm: shared memory not accepted: {why}")));
                }
                Err(why) => {
                    tracing::info!(worker = %w.addr, "exchanges over gRPC: shared memory not accepted: {why}");
                    (LinkMedium::Grpc, None)
                }
            }
        }
    };
    let (requests_ring, responses_ring) = match shm_ends {
        Some((producer, consumer)) => (Some(ShmRequests::new(producer)), Some(consumer)),
        None => (None, None),
    };
    for each in [LinkMedium::Shm, LinkMedium::Grpc] {
        metrics::gauge!(m::WORKER_LINK_TRANSPORT, "worker" => w.addr.clone(), "transport" => each.as_str())
            .set(if each == medium { 1.0 } else { 0.0 });
    }
    let mut inbound = response.into_inner();
    let link = Arc::new(WorkerLink {
        id: w.id.clone(),
        key: w.id.as_str().into(),
        addr: w.addr.clone(),
        incarnation: w.incarnation,
        hosted: RwLock::new(hosted),
        announced: RwLock::new(announced(w)),
        client,
        channel,
        requests: tx,
        pending: Arc::new(Mutex::new(Pending::default())),
        medium,
        shm: requests_ring,
        answers: responses_ring.map(ShmAnswers::new),
    });
    // Weak: once the link is dropped (worker gone), its request sender goes and the stream closes.
    let reader = Arc::downgrade(&link);
    let pending = link.pending.clone();
    tokio::spawn(async move {
        let reason = loop {
            match inbound.message().await {
                Ok(Some(answer)) => {
                    if let Some(tx) = pending.lock().waiting.remove(&answer.id) {
                        let _ = tx.send(Ok(answer));
                    }
                }
                Ok(None) => break "the worker closed its exchange stream".to_owned(),
                Err(status) => break format!("exchange stream failed: {}", status.message()),
            }
        };
        if let Some(link) = reader.upgrade() {
            workers.lose(&link, &reason);
        }
    });
    Ok(link)
}
