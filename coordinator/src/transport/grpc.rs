//! The `grpc` transport: one `ExpertService.Exchange` stream per worker, many exchanges in flight on
//! each, matched by id. An MoE layer's rows are split by the worker hosting their expert (a
//! replicated expert's rows are split over its live hosts in the placement's order by
//! [`epserve_eplb::split_rows`], the rule the replay models), all workers' requests leave before
//! any answer is awaited, and the combine waits for every answer. Every dispatch reads the routes
//! afresh, so a new placement is followed from the next MoE layer sent after it was published.
//!
//! Failover: an exchange whose worker dies (stream reset) or misses the deadline is sent again to
//! another live host of its experts, within the same step; the worker is taken out until it
//! reconnects. A link that failed an exchange is not tried again for it, but its worker is once it
//! has reconnected (a worker slowed down past the deadline, or whose lease lapsed, is often the
//! only other host), at most [`ATTEMPTS_PER_WORKER`] times an exchange. When an expert has no usable
//! live host, the step waits (up to `host_wait`) for one to appear — a worker coming back, or the
//! placement leader assigning the expert to a survivor — and then fails with the list of what is
//! missing and of what failed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use epserve_control::{Instance, PlacementMap};
use epserve_model::{ExpertBatch, ExpertsInFlight, Retry, TextConfig};
use epserve_proto::exchange::{Exchange, RowGroup};
use epserve_proto::metric_names as m;
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::wire::WireDtype;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};

use super::links::{Reply, Routes, WorkerLink, WorkerSet, check_worker_serves, endpoint, record_from_layers};
use super::shm::{LinkMedium, ShmConfig, Waited, WorkerTransport};
use crate::errors::TransportError;

/// How many times one exchange is sent to the same worker (each time over a link that connected
/// after the last one failed) before the worker is left out of it.
const ATTEMPTS_PER_WORKER: usize = 2;

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// `host:port` (or `http://host:port`) of every worker, when they are given statically.
    pub workers: Vec<String>,
    pub wire: WireDtype,
    /// Deadline of every exchange, from send to answer.
    pub exchange_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a step waits for an expert without a live host to get one before failing.
    pub host_wait: Duration,
    /// Connect to the workers over mutual TLS with this identity; `None`: plaintext.
    pub tls: Option<epserve_tls::ClusterTls>,
    /// Whether (and how) exchanges with workers on this host go over shared memory.
    pub shm: ShmConfig,
}

impl GrpcConfig {
    pub fn new(workers: Vec<String>) -> Self {
        GrpcConfig {
            workers,
            wire: WireDtype::Bf16,
            exchange_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            host_wait: Duration::ZERO,
            tls: None,
            shm: ShmConfig::default(),
        }
    }
}

/// The senders of a fixed membership (static `--workers`), kept alive for the follower task. The
/// placement starts as `None` (every worker that hosts an expert is its host); the load balancer
/// publishes its placements here, as the registry would, and the workers' hosted experts after it
/// changed them.
pub(crate) type FixedMembers = (watch::Sender<Vec<Instance>>, watch::Sender<Option<PlacementMap>>);

#[derive(Debug)]
pub struct GrpcExperts {
    workers: Arc<WorkerSet>,
    hidden: usize,
    dtype: DType,
    wire: WireDtype,
    timeout: Duration,
    host_wait: Duration,
    next_id: AtomicU64,
    runtime: Handle,
    /// With static workers: the fixed membership, kept alive for the follower.
    fixed: Option<Arc<FixedMembers>>,
}

impl GrpcExperts {
    /// Static workers: connects to each, learns what it hosts, refuses to start if an expert has no
    /// host or a worker serves another model. Must run inside the runtime that will carry the
    /// streams.
    pub async fn connect(cfg: &GrpcConfig, model: &TextConfig, dtype: DType) -> Result<Self, TransportError> {
        if cfg.workers.is_empty() {
            return Err(TransportError::Placement("no expert worker address given".into()));
        }
        let mut records = Vec::with_capacity(cfg.workers.len());
        for addr in &cfg.workers {
            let unavailable = |reason: String| TransportError::Unavailable { worker: addr.clone(), reason };
            let channel = epserve_tls::connect(endpoint(addr, cfg.connect_timeout)?, cfg.tls.as_ref())
                .await
                .map_err(|e| unavailable(format!("{e:?}")))?;
            let status = ExpertServiceClient::new(channel)
                .status(StatusRequest {})
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .into_inner();
            check_worker_serves(addr, &status, model)?;
            records.push(record_from_layers(addr, &status.layers, model));
        }
        let workers = WorkerSet::new(model, cfg.connect_timeout, cfg.tls.clone(), cfg.shm.clone());
        workers.sync(&records, None).await;
        if cfg.shm.transport == WorkerTransport::Shm {
            // Refused at start, naming the worker, rather than running without it.
            let links = workers.links();
            for addr in &cfg.workers {
                if !links.values().any(|l| &l.addr == addr && l.medium == LinkMedium::Shm) {
                    let reason = workers.connect_error(addr).unwrap_or_else(|| "not connected".to_owned());
                    return Err(TransportError::Unavailable { worker: addr.clone(), reason });
                }
            }
        }
        workers.routes().check_complete(model)?;
        let (members, members_rx) = watch::channel(records);
        let (placement, placement_rx) = watch::channel(None);
        tokio::spawn(workers.clone().follow(members_rx, placement_rx));
        Ok(Self::with(workers, cfg, model, dtype, Some(Arc::new((members, placement)))))
    }

    /// Workers found through the control plane: follows `members` (and `placement`'s preference
    /// order) for as long as they are published, and waits up to `startup_wait` for every expert to
    /// have a live host. Must run inside the runtime that will carry the streams.
    pub async fn follow(
        cfg: &GrpcConfig,
        model: &TextConfig,
        dtype: DType,
        members: watch::Receiver<Vec<Instance>>,
        placement: watch::Receiver<Option<PlacementMap>>,
        startup_wait: Duration,
    ) -> Result<Self, TransportError> {
        let workers = WorkerSet::new(model, cfg.connect_timeout, cfg.tls.clone(), cfg.shm.clone());
        let mut generation = workers.generation.subscribe();
        tokio::spawn(workers.clone().follow(members, placement));
        let deadline = tokio::time::Instant::now() + startup_wait;
        loop {
            match workers.routes().check_complete(model) {
                Ok(()) => break,
                Err(e) => {
                    if tokio::time::timeout_at(deadline, generation.changed()).await.is_err() {
                        return Err(TransportError::Placement(format!("after waiting {startup_wait:?}: {e}")));
                    }
                }
            }
        }
        Ok(Self::with(workers, cfg, model, dtype, None))
    }

    fn with(
        workers: Arc<WorkerSet>,
        cfg: &GrpcConfig,
        model: &TextConfig,
        dtype: DType,
        fixed: Option<Arc<FixedMembers>>,
    ) -> Self {
        GrpcExperts {
            workers,
            hidden: model.hidden_size,
            dtype,
            wire: cfg.wire,
            timeout: cfg.exchange_timeout,
            host_wait: cfg.host_wait,
            next_id: AtomicU64::new(1),
            runtime: Handle::current(),
            fixed,
        }
    }

    pub(crate) fn worker_set(&self) -> &Arc<WorkerSet> {
        &self.workers
    }

    pub(crate) fn fixed(&self) -> Option<&Arc<FixedMembers>> {
        self.fixed.as_ref()
    }

    /// Addresses of the connected workers.
    pub fn workers(&self) -> Vec<String> {
        self.workers.addresses()
    }

    /// Every linked worker's address and what its exchanges travel over, sorted by address.
    pub fn link_transports(&self) -> Vec<(String, LinkMedium)> {
        let mut links: Vec<(String, LinkMedium)> =
            self.workers.links().values().map(|l| (l.addr.clone(), l.medium)).collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        links
    }

    /// After a step succeeded: reports recoveries from lost workers.
    pub fn step_finished(&self) {
        self.workers.step_finished();
    }

    /// Splits the batch by worker and sends every part. Called from a compute thread, never from
    /// inside the runtime.
    pub fn submit(&self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + '_>> {
        let hidden = self.hidden;
        let rows = batch.rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if rows.len() != batch.total_rows() * hidden {
            let reason = format!("{} values for {} rows of {hidden}", rows.len(), batch.total_rows());
            return Err(epserve_model::Error::experts(batch.layer, Retry::Never, reason));
        }
        let mut groups = Vec::with_capacity(batch.groups.len());
        let mut offset = 0;
        for g in &batch.groups {
            let n = g.rows as usize;
            groups.push(Group { expert: g.expert, rows: offset..offset + n });
            offset += n;
        }
        self.workers.telemetry.record_experts(batch.layer, batch.groups.iter().map(|g| (g.expert, g.rows)));
        let mut in_flight = GrpcInFlight {
            experts: self,
            layer: batch.layer,
            total_rows: offset,
            rows,
            groups,
            parts: VecDeque::new(),
            failures: Failures::default(),
            routes_used: Vec::new(),
        };
        let all: Vec<usize> = (0..in_flight.groups.len()).collect();
        in_flight.dispatch(&all).map_err(|e| e.at_layer(batch.layer))?;
        Ok(Box::new(in_flight))
    }

    /// The live hosts of `(layer, expert)` that `failures` leaves usable, in the placement's order,
    /// waiting up to `host_wait` for one; and the routes they come from (held by the exchange until
    /// it is answered: that tells the placement leader when no exchange uses an older placement).
    fn hosts(
        &self,
        layer: usize,
        expert: u32,
        failures: &Failures,
    ) -> Result<(Vec<Arc<WorkerLink>>, Arc<Routes>), TransportError> {
        let started = Instant::now();
        let mut generation = self.workers.generation.subscribe();
        loop {
            let routes = self.workers.routes();
            let live: Vec<Arc<WorkerLink>> =
                routes.live(layer, expert, |l| failures.usable(l)).into_iter().cloned().collect();
            if !live.is_empty() {
                return Ok((live, routes));
            }
            let waited = started.elapsed();
            if waited >= self.host_wait {
                let mut why = failures.of_hosts(layer as u32, expert);
                for reason in routes.why_dead(layer, expert) {
                    if !why.contains(&reason) {
                        why.push(reason);
                    }
                }
                return Err(TransportError::NoHost { layer, expert, waited, why });
            }
            let deadline = tokio::time::Instant::from_std(started + self.host_wait);
            let _ = self.runtime.block_on(async { tokio::time::timeout_at(deadline, generation.changed()).await });
        }
    }

    fn fail(&self, worker: &str, e: TransportError) -> TransportError {
        metrics::counter!(m::EXCHANGE_ERRORS_TOTAL, "worker" => worker.to_owned(), "kind" => e.kind()).increment(1);
        e
    }
}

/// One expert's rows in the batch.
#[derive(Debug)]
struct Group {
    expert: u32,
    rows: std::ops::Range<usize>,
}

struct Part {
    link: Arc<WorkerLink>,
    id: u64,
    /// Indices into the in-flight's groups.
    groups: Vec<usize>,
    reply: oneshot::Receiver<Reply>,
    /// Whether the request went over the link's shared-memory ring (its answer is read there).
    over_ring: bool,
    sent: Instant,
    deadline: Instant,
}

struct GrpcInFlight<'a> {
    experts: &'a GrpcExperts,
    layer: usize,
    total_rows: usize,
    rows: Vec<f32>,
    groups: Vec<Group>,
    parts: VecDeque<Part>,
    /// The links that failed this exchange.
    failures: Failures,
    /// The routes the parts were sent by, held until the exchange is done.
    routes_used: Vec<Arc<Routes>>,
}

impl GrpcInFlight<'_> {
    /// Sends `groups` to their hosts, one exchange per worker. The rows of an expert with several
    /// live hosts are split over them as evenly as integers allow, in the placement's host order
    /// ([`epserve_eplb::split_rows`]), so that replicas share its load; each share after the first
    /// becomes a group of its own (the combine puts every group's rows back where they came from).
    fn dispatch(&mut self, groups: &[usize]) -> Result<(), TransportError> {
        let x = self.experts;
        let mut by_worker: Vec<(Arc<WorkerLink>, Vec<usize>)> = Vec::new();
        for &g in groups {
            let (expert, rows) = (self.groups[g].expert, self.groups[g].rows.clone());
            let (hosts, routes) = x.hosts(self.layer, expert, &self.failures)?;
            if !self.routes_used.iter().any(|r| Arc::ptr_eq(r, &routes)) {
                self.routes_used.push(routes);
            }
            let shares = epserve_eplb::split_rows(rows.len() as u32, hosts.len());
            let mut start = rows.start;
            let mut first = true;
            for (link, n) in hosts.into_iter().zip(shares) {
                if n == 0 {
                    continue;
                }
                let share = start..start + n as usize;
                start = share.end;
                let index = if first {
                    first = false;
                    self.groups[g].rows = share;
                    g
                } else {
                    self.groups.push(Group { expert, rows: share });
                    self.groups.len() - 1
                };
                match by_worker.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &link)) {
                    Some((_, gs)) => gs.push(index),
                    None => by_worker.push((link, vec![index])),
                }
            }
        }
        for (link, gs) in by_worker {
            let part = self.send(link, gs);
            self.parts.push_back(part);
        }
        Ok(())
    }

    fn send(&self, link: Arc<WorkerLink>, groups: Vec<usize>) -> Part {
        let x = self.experts;
        let hidden = x.hidden;
        let id = x.next_id.fetch_add(1, Ordering::Relaxed);
        let mut values = Vec::with_capacity(groups.iter().map(|&g| self.groups[g].rows.len()).sum::<usize>() * hidden);
        let mut wire_groups = Vec::with_capacity(groups.len());
        for &g in &groups {
            let r = &self.groups[g].rows;
            values.extend_from_slice(&self.rows[r.start * hidden..r.end * hidden]);
            wire_groups.push(RowGroup { expert: self.groups[g].expert, rows: r.len() as u32 });
        }
        x.workers.telemetry.record_worker(self.layer, &link.key, values.len() / hidden.max(1));
        let payload = x.wire.encode(&values, hidden);
        metrics::counter!(m::EXCHANGE_SENT_BYTES_TOTAL, "worker" => link.addr.clone()).increment(payload.len() as u64);
        let request = Exchange {
            id,
            step: 0,
            layer: self.layer as u32,
            micro_batch: 0,
            groups: wire_groups,
            dtype: x.wire,
            hidden,
            payload,
        }
        .into_proto();
        let (tx, rx) = oneshot::channel();
        let dead = {
            let mut pending = link.pending.lock();
            match &pending.dead {
                Some(reason) => Some((tx, reason.clone())),
                None => {
                    pending.waiting.insert(id, tx);
                    None
                }
            }
        };
        let mut over_ring = false;
        match dead {
            Some((tx, reason)) => {
                let _ = tx.send(Err(TransportError::Unavailable { worker: link.addr.clone(), reason }));
            }
            None => match link.send(request, Instant::now() + x.timeout) {
                Ok(ring) => over_ring = ring,
                Err(reason) => x.workers.lose(&link, &reason),
            },
        }
        let now = Instant::now();
        Part { link, id, groups, reply: rx, over_ring, sent: now, deadline: now + x.timeout }
    }

    /// The answer to `part`, or why there is none.
    fn answer(&self, part: &mut Part) -> Result<Vec<f32>, TransportError> {
        let x = self.experts;
        let link = &part.link;
        // The step's keepers stop spinning meanwhile: on a shared host the worker needs the cores.
        let waited = epserve_model::kernels::idle(|| match &link.answers {
            Some(ring) if part.over_ring => ring.wait_for(&mut part.reply, &link.pending, part.deadline),
            _ => {
                // The timer must be created inside the runtime: this thread is not one of its workers.
                let deadline = tokio::time::Instant::from_std(part.deadline);
                match x.runtime.block_on(async { tokio::time::timeout_at(deadline, &mut part.reply).await }) {
                    Err(_) => Waited::TimedOut,
                    Ok(Err(_)) => Waited::Closed,
                    Ok(Ok(reply)) => Waited::Answer(reply),
                }
            }
        });
        let answer = match waited {
            Waited::TimedOut => {
                link.pending.lock().waiting.remove(&part.id);
                let e = TransportError::Deadline {
                    worker: link.addr.clone(),
                    exchange: part.id,
                    layer: self.layer,
                    deadline: x.timeout,
                };
                // A worker that stops answering is taken out until it reconnects.
                x.workers.lose(link, &e.to_string());
                return Err(e);
            }
            Waited::Closed => {
                let reason = "the answer channel closed".to_owned();
                return Err(TransportError::Unavailable { worker: link.addr.clone(), reason });
            }
            Waited::Lost(reason) => {
                x.workers.lose(link, &reason);
                return Err(TransportError::Unavailable { worker: link.addr.clone(), reason });
            }
            Waited::Answer(reply) => reply?,
        };
        metrics::histogram!(m::EXCHANGE_LATENCY_SECONDS, "worker" => link.addr.clone())
            .record(part.sent.elapsed().as_secs_f64());
        metrics::counter!(m::EXCHANGE_RECEIVED_BYTES_TOTAL, "worker" => link.addr.clone())
            .increment(answer.payload.len() as u64);
        let rejected =
            |code, message| TransportError::Rejected { worker: link.addr.clone(), exchange: part.id, code, message };
        if answer.code != tonic::Code::Ok as i32 {
            return Err(rejected(tonic::Code::from_i32(answer.code), answer.message));
        }
        let rows: usize = part.groups.iter().map(|&g| self.groups[g].rows.len()).sum();
        let wire = WireDtype::from_proto(answer.dtype).unwrap_or(x.wire);
        if answer.payload.len() != wire.payload_bytes(rows, x.hidden) {
            let message = format!("answered {} bytes for {rows} rows", answer.payload.len());
            return Err(rejected(tonic::Code::DataLoss, message));
        }
        let mut decoded = Vec::new();
        wire.decode_into(&answer.payload, x.hidden, &mut decoded);
        Ok(decoded)
    }
}

impl ExpertsInFlight for GrpcInFlight<'_> {
    fn wait(mut self: Box<Self>) -> epserve_model::Result<Tensor> {
        let hidden = self.experts.hidden;
        let mut out = vec![0f32; self.total_rows * hidden];
        while let Some(mut part) = self.parts.pop_front() {
            let decoded = match self.answer(&mut part) {
                Ok(decoded) => decoded,
                Err(e) => {
                    let e = self.experts.fail(&part.link.addr, e);
                    if e.retry() != Retry::Now {
                        return Err(e.at_layer(self.layer));
                    }
                    if e.worker_at_fault() {
                        self.experts.workers.quarantine(&part.link, &e.to_string());
                    }
                    // Send the same rows again, to other hosts of their experts.
                    metrics::counter!(m::EXCHANGE_RETRIES_TOTAL, "reason" => e.kind()).increment(1);
                    tracing::info!(layer = self.layer, "re-sending exchange {} to replicas: {e}", part.id);
                    self.failures.add(part.link, &e);
                    self.dispatch(&part.groups).map_err(|e| e.at_layer(self.layer))?;
                    continue;
                }
            };
            let mut at = 0;
            for &g in &part.groups {
                let r = &self.groups[g].rows;
                let n = r.len() * hidden;
                out[r.start * hidden..r.end * hidden].copy_from_slice(&decoded[at..at + n]);
                at += n;
            }
        }
        Ok(Tensor::from_vec(out, (self.total_rows, hidden), &Device::Cpu)?.to_dtype(self.experts.dtype)?)
    }
}

/// The links that failed one exchange, and why. A failed link is not tried again for it; its worker
/// is, over a link that connected after the failure, until it has failed [`ATTEMPTS_PER_WORKER`]
/// times.
#[derive(Default)]
struct Failures(Vec<(Arc<WorkerLink>, String)>);

impl Failures {
    fn add(&mut self, link: Arc<WorkerLink>, e: &TransportError) {
        self.0.push((link, e.to_string()));
    }

    /// Whether `link` may be sent this exchange: it has not failed it, and its worker has failed it
    /// over fewer than [`ATTEMPTS_PER_WORKER`] links (a link counts once however many of the
    /// exchange's parts failed on it: parts sent together fail together when their link dies).
    fn usable(&self, link: &WorkerLink) -> bool {
        let failed = self.0.iter().map(|(l, _)| (Arc::as_ptr(l).addr(), l.id.as_str()));
        may_try(failed, (std::ptr::from_ref(link).addr(), &link.id))
    }

    /// Why the links hosting `(layer, expert)` failed, oldest first, each reason once.
    fn of_hosts(&self, layer: u32, expert: u32) -> Vec<String> {
        let mut why: Vec<String> = Vec::new();
        for (link, reason) in &self.0 {
            if link.hosts(layer, expert) && !why.contains(reason) {
                why.push(reason.clone());
            }
        }
        why
    }
}

/// Whether an exchange may be sent over the link `candidate` (the link's address in memory, its
/// worker's id), given the links that failed it (each once per failure).
fn may_try<'a>(failed: impl Iterator<Item = (usize, &'a str)>, candidate: (usize, &str)) -> bool {
    let mut links_of_worker: Vec<usize> = Vec::new();
    for (link, worker) in failed {
        if link == candidate.0 {
            return false;
        }
        if worker == candidate.1 && !links_of_worker.contains(&link) {
            links_of_worker.push(link);
        }
    }
    links_of_worker.len() < ATTEMPTS_PER_WORKER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_tried_again_over_a_new_link_until_it_failed_on_two_links() {
        // Link 1 of worker a failed two parts of the exchange (they were sent together and its
        // stream died): one attempt. Worker a reconnected as link 2.
        let failed = [(1, "a"), (1, "a"), (5, "b")];
        assert!(!may_try(failed.into_iter(), (1, "a")), "a failed link is not tried again");
        assert!(may_try(failed.into_iter(), (2, "a")), "its worker is, over a new link");
        assert!(may_try(failed.into_iter(), (7, "c")), "other workers are untouched");
        let failed = [(1, "a"), (2, "a")];
        assert!(!may_try(failed.into_iter(), (3, "a")), "two links of the worker failed it");
    }
}
