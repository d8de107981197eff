//! `ExpertService` on top of an [`ExpertShard`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use epserve_model::config::FeedForwardKind;
use epserve_model::{ExpertGroup, ExpertShard, TextConfig};
use epserve_proto::exchange::Exchange;
use epserve_proto::metric_names as m;
use epserve_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use epserve_proto::v1::{
    ExchangeRequest, ExchangeResponse, HealthRequest, HealthResponse, LayerExperts, StatusRequest, StatusResponse,
};
use epserve_proto::wire::WireDtype;
use parking_lot::{RwLock, RwLockReadGuard};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// Counters reported by `Status`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub rows_served: AtomicU64,
    pub exchanges_served: AtomicU64,
    /// Exchanges refused: `INVALID_ARGUMENT` (malformed) or `FAILED_PRECONDITION` (for experts not
    /// hosted here: the sender's view of this worker is wrong, another host may serve them).
    pub exchanges_rejected: AtomicU64,
    /// Exchanges received (answered or not yet).
    pub exchanges_received: AtomicU64,
    /// Exchanges received and not answered yet.
    pub exchanges_in_flight: AtomicUsize,
    /// Exchange streams open: one per coordinator that routes here.
    pub streams_open: AtomicUsize,
}

/// How much exchange work a worker takes in at once. Past either limit it stops reading the
/// stream, so HTTP/2 flow control holds the sender back: a flood of frames queues at the sender,
/// not in the worker's memory, and other streams keep their turn (the budget is handed out in
/// arrival order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeLimits {
    /// Exchanges of one stream computing or waiting to be answered.
    pub per_stream: usize,
    /// Request payload bytes in flight over all streams. A frame larger than this runs alone.
    pub bytes: usize,
}

impl Default for ExchangeLimits {
    /// 16 exchanges a stream (a coordinator has one or two in flight per step), 512 MiB of payloads.
    fn default() -> Self {
        ExchangeLimits { per_stream: 16, bytes: 512 << 20 }
    }
}

/// Budget units: KiB, so that a maximal frame's permits fit in `u32`.
const BUDGET_UNIT: usize = 1024;

/// Loads the given `(layer, expert)` pairs from the worker's checkpoint (blocking).
pub type LoadPairs = dyn Fn(&[(usize, u32)]) -> epserve_model::Result<ExpertShard> + Send + Sync;

/// A shared [`LoadPairs`].
#[derive(Clone)]
pub struct ExpertLoader(pub Arc<LoadPairs>);

impl std::fmt::Debug for ExpertLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpertLoader")
    }
}

/// A loaded shard and what the worker needs to check exchanges against its model.
#[derive(Debug)]
pub struct ExpertWorker {
    /// Written only when the placement leader assigns more experts here (a brief swap of slots).
    shard: RwLock<ExpertShard>,
    text: TextConfig,
    model_name: String,
    dtype: DType,
    stats: WorkerStats,
    limits: ExchangeLimits,
    /// Payload bytes in flight, in [`BUDGET_UNIT`]s.
    budget: Arc<Semaphore>,
    /// Loads more experts from the checkpoint (placement changes); `None`: this worker's experts
    /// are fixed.
    pub(crate) loader: Option<ExpertLoader>,
    /// One placement change (load or release) at a time.
    pub(crate) placing: tokio::sync::Mutex<()>,
    /// Bumped whenever the hosted experts change, for whoever announces them (the registry record).
    hosted: watch::Sender<u64>,
    /// Set when the worker starts draining: its own `Health` then answers not serving.
    draining: AtomicBool,
    /// Where coordinators on this host put their shared-memory segments; `None`: every
    /// shared-memory handshake is refused and exchanges go over gRPC.
    shm_dir: Option<PathBuf>,
}

impl ExpertWorker {
    pub fn new(shard: ExpertShard, text: TextConfig, model_name: String, dtype: DType) -> Self {
        metrics::gauge!(m::WORKER_RESIDENT_EXPERT_BYTES).set(shard.resident_bytes() as f64);
        let limits = ExchangeLimits::default();
        ExpertWorker {
            shard: RwLock::new(shard),
            text,
            model_name,
            dtype,
            stats: WorkerStats::default(),
            budget: Arc::new(Semaphore::new(limits.bytes.div_ceil(BUDGET_UNIT))),
            limits,
            loader: None,
            placing: tokio::sync::Mutex::new(()),
            hosted: watch::channel(0).0,
            draining: AtomicBool::new(false),
            shm_dir: Some(epserve_shm::default_dir()),
        }
    }

    /// Marks the worker as draining (leaving the cluster): `ExpertService.Health` answers not serving.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Accepts shared-memory segments from `dir` (`None`: refuses every shared-memory handshake).
    pub fn with_shm_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.shm_dir = dir;
        self
    }

    /// Lets more experts be placed here while serving, loaded with `loader`.
    pub fn with_loader(mut self, loader: ExpertLoader) -> Self {
        self.loader = Some(loader);
        self
    }

    /// Changes whenever the hosted experts change.
    pub fn hosted_changes(&self) -> watch::Receiver<u64> {
        self.hosted.subscribe()
    }

    /// Experts hosted in one MoE layer only (beyond [`Self::experts`]), by layer.
    pub fn replicas(&self) -> BTreeMap<u32, Vec<u32>> {
        let shard = self.shard();
        let everywhere = shard.experts();
        let mut out: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (layer, e) in shard.pairs() {
            if !everywhere.contains(&e) {
                out.entry(layer as u32).or_default().push(e);
            }
        }
        out
    }

    /// Every hosted `(layer, expert)`.
    pub fn pairs(&self) -> Vec<(usize, u32)> {
        self.shard().pairs()
    }

    /// Stops serving the experts of `pairs` (a brief write lock: waits for the computations in
    /// progress); how many were hosted.
    pub fn release(&self, pairs: &[(usize, u32)]) -> usize {
        let mut shard = self.shard.write();
        let released = pairs.iter().filter(|&&(l, e)| shard.remove(l, e)).count();
        metrics::gauge!(m::WORKER_RESIDENT_EXPERT_BYTES).set(shard.resident_bytes() as f64);
        drop(shard);
        if released > 0 {
            metrics::counter!(m::WORKER_EXPERTS_RELEASED_TOTAL).increment(released as u64);
            self.hosted.send_modify(|v| *v += 1);
        }
        released
    }

    pub(crate) fn resident_bytes(&self) -> u64 {
        self.shard().resident_bytes()
    }

    pub(crate) fn layer_experts(&self) -> Vec<LayerExperts> {
        self.status().layers
    }

    /// Takes in at most `limits` of exchange work at once.
    pub fn with_limits(mut self, limits: ExchangeLimits) -> Self {
        let limits = ExchangeLimits { per_stream: limits.per_stream.max(1), bytes: limits.bytes.max(BUDGET_UNIT) };
        self.budget = Arc::new(Semaphore::new(limits.bytes.div_ceil(BUDGET_UNIT)));
        self.limits = limits;
        self
    }

    /// The budget permits a request of `bytes` holds (a frame larger than the budget takes all).
    pub(crate) fn permits(&self, bytes: usize) -> u32 {
        let units = bytes.div_ceil(BUDGET_UNIT).max(1);
        units.min(self.limits.bytes.div_ceil(BUDGET_UNIT)) as u32
    }

    /// The payload budget shared by every stream, in [`BUDGET_UNIT`]s.
    pub(crate) fn budget(&self) -> Arc<Semaphore> {
        self.budget.clone()
    }

    fn shard(&self) -> RwLockReadGuard<'_, ExpertShard> {
        self.shard.read()
    }

    /// The hosted expert ids, ascending.
    pub fn experts(&self) -> Vec<u32> {
        self.shard().experts().to_vec()
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Starts serving the experts of `more` as well (loaded from the same checkpoint).
    pub fn add_experts(&self, more: ExpertShard) -> epserve_model::Result<()> {
        let added = more.experts().len();
        let mut shard = self.shard.write();
        shard.absorb(more)?;
        metrics::gauge!(m::WORKER_RESIDENT_EXPERT_BYTES).set(shard.resident_bytes() as f64);
        metrics::counter!(m::WORKER_EXPERTS_LOADED_TOTAL).increment(added as u64);
        drop(shard);
        self.hosted.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Checks what only this worker knows: the layer exists and is MoE, the row width is the model's,
    /// every expert is hosted here. The code says whose view is wrong: `INVALID_ARGUMENT` for an
    /// exchange no worker of this model would accept, `FAILED_PRECONDITION` for experts another
    /// worker may host.
    fn check(&self, x: &Exchange) -> Result<(), (Code, String)> {
        let layer = x.layer as usize;
        let invalid = |m: String| Err((Code::InvalidArgument, m));
        match self.text.feed_forward.get(layer) {
            None => {
                return invalid(format!(
                    "layer {layer} is out of range (the model has {})",
                    self.text.num_hidden_layers
                ));
            }
            Some(FeedForwardKind::Dense) => return invalid(format!("layer {layer} is dense; it has no experts")),
            Some(FeedForwardKind::Moe) => {}
        }
        if x.hidden != self.text.hidden_size {
            return invalid(format!(
                "rows are {} wide, the model's hidden size is {}",
                x.hidden, self.text.hidden_size
            ));
        }
        let shard = self.shard();
        if let Some(g) = x.groups.iter().find(|g| !shard.hosts(layer, g.expert)) {
            return Err((
                Code::FailedPrecondition,
                format!(
                    "expert {} of layer {layer} is not hosted on this worker (hosts {:?})",
                    g.expert,
                    shard.experts()
                ),
            ));
        }
        Ok(())
    }

    /// Decodes, computes and encodes one exchange; runs on a blocking thread.
    fn compute(&self, x: &Exchange) -> Result<bytes::Bytes, (Code, String)> {
        let internal = |e: candle_core::Error| (Code::Internal, e.to_string());
        let mut values = Vec::new();
        x.dtype.decode_into(&x.payload, x.hidden, &mut values);
        let rows = Tensor::from_vec(values, (x.total_rows(), x.hidden), &Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(internal)?;
        let groups: Vec<ExpertGroup> =
            x.groups.iter().map(|g| ExpertGroup { expert: g.expert, rows: g.rows }).collect();
        let shard = self.shard();
        // Checked again under the guard the computation holds: a release between `check` and here
        // must read as "not hosted" (another host serves it), not as a failed computation.
        if let Some(g) = x.groups.iter().find(|g| !shard.hosts(x.layer as usize, g.expert)) {
            return Err((Code::FailedPrecondition, format!("expert {} of layer {} was released", g.expert, x.layer)));
        }
        let out = shard.compute(x.layer as usize, &groups, &rows).map_err(|e| (Code::Internal, e.to_string()))?;
        drop(shard);
        let out = out.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
        Ok(x.dtype.encode(&out.map_err(internal)?, x.hidden))
    }

    pub(crate) async fn handle(self: Arc<Self>, request: ExchangeRequest) -> ExchangeResponse {
        let exchange = match self.accept(request) {
            Ok(exchange) => exchange,
            Err(rejected) => return rejected,
        };
        let started = Instant::now();
        let worker = self.clone();
        let (id, dtype, rows) = (exchange.id, exchange.dtype, exchange.total_rows() as u64);
        let result = tokio::task::spawn_blocking(move || worker.compute(&exchange)).await.map_err(|e| e.to_string());
        self.answer(id, dtype, rows, result, started.elapsed())
    }

    /// [`ExpertWorker::handle`] on the calling thread (a shared-memory link's reader): no hand-off
    /// to the runtime and a blocking thread, each a thread wake-up per exchange. A panic in the
    /// computation is answered as `Internal`, as the runtime reports a panicked blocking task.
    pub(crate) fn handle_here(&self, request: ExchangeRequest) -> ExchangeResponse {
        let exchange = match self.accept(request) {
            Ok(exchange) => exchange,
            Err(rejected) => return rejected,
        };
        let started = Instant::now();
        let (id, dtype, rows) = (exchange.id, exchange.dtype, exchange.total_rows() as u64);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compute(&exchange))).map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                format!("compute panicked: {}", what.unwrap_or_default())
            });
        self.answer(id, dtype, rows, result, started.elapsed())
    }

    /// The request as an exchange this worker computes, or the answer refusing it.
    fn accept(&self, request: ExchangeRequest) -> Result<Exchange, ExchangeResponse> {
        let id = request.id;
        let reject = |code: Code, message: String| {
            self.stats.exchanges_rejected.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::WORKER_EXCHANGES_TOTAL, "result" => "invalid").increment(1);
            tracing::warn!(exchange = id, "rejected: {message}");
            ExchangeResponse { id, code: code as i32, message, ..Default::default() }
        };
        let exchange = Exchange::try_from(request).map_err(|e| reject(Code::InvalidArgument, e.0))?;
        self.check(&exchange).map_err(|(code, message)| reject(code, message))?;
        Ok(exchange)
    }

    /// The answer to exchange `id` from its computation's result (`Err`: the computation panicked).
    fn answer(
        &self,
        id: u64,
        dtype: WireDtype,
        rows: u64,
        result: Result<Result<bytes::Bytes, (Code, String)>, String>,
        elapsed: Duration,
    ) -> ExchangeResponse {
        match result {
            Ok(Ok(payload)) => {
                self.stats.rows_served.fetch_add(rows, Ordering::Relaxed);
                self.stats.exchanges_served.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::WORKER_EXCHANGES_TOTAL, "result" => "ok").increment(1);
                metrics::counter!(m::WORKER_ROWS_TOTAL).increment(rows);
                metrics::histogram!(m::WORKER_COMPUTE_SECONDS).record(elapsed.as_secs_f64());
                ExchangeResponse {
                    id,
                    code: Code::Ok as i32,
                    message: String::new(),
                    dtype: dtype.to_proto() as i32,
                    payload,
                    compute_micros: elapsed.as_micros() as u64,
                }
            }
            Ok(Err((Code::FailedPrecondition, message))) => {
                self.stats.exchanges_rejected.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::WORKER_EXCHANGES_TOTAL, "result" => "invalid").increment(1);
                tracing::warn!(exchange = id, "rejected: {message}");
                ExchangeResponse { id, code: Code::FailedPrecondition as i32, message, ..Default::default() }
            }
            Ok(Err((code, message))) => {
                tracing::error!(exchange = id, "compute failed: {message}");
                ExchangeResponse { id, code: code as i32, message, ..Default::default() }
            }
            Err(message) => {
                tracing::error!(exchange = id, "compute task failed: {message}");
                ExchangeResponse { id, code: Code::Internal as i32, message, ..Default::default() }
            }
        }
    }

    fn status(&self) -> StatusResponse {
        let shard = self.shard();
        let layers = self
            .text
            .moe_layers()
            .map(|layer| LayerExperts {
                layer: layer as u32,
                experts: (0..self.text.num_local_experts as u32).filter(|&e| shard.hosts(layer, e)).collect(),
            })
            .collect();
        StatusResponse {
            layers,
            resident_bytes: shard.resident_bytes(),
            rows_served: self.stats.rows_served.load(Ordering::Relaxed),
            exchanges_served: self.stats.exchanges_served.load(Ordering::Relaxed),
            hidden: self.text.hidden_size as u32,
            num_layers: self.text.num_hidden_layers as u32,
            num_experts: self.text.num_local_experts as u32,
            model: self.model_name.clone(),
            compute_dtype: format!("{:?}", self.dtype).to_lowercase(),
            weight_format: shard.weight_format().unwrap_or_default(),
        }
    }
}

impl crate::health::Traffic for ExpertWorker {
    fn streams_open(&self) -> usize {
        self.stats.streams_open.load(Ordering::Relaxed)
    }

    fn exchanges_in_flight(&self) -> usize {
        self.stats.exchanges_in_flight.load(Ordering::Relaxed)
    }

    fn exchanges_received(&self) -> u64 {
        self.stats.exchanges_received.load(Ordering::Relaxed)
    }
}

/// One unit of a [`WorkerStats`] gauge, held while it lasts.
pub(crate) struct Counted {
    worker: Arc<ExpertWorker>,
    gauge: fn(&WorkerStats) -> &AtomicUsize,
}

impl Counted {
    pub(crate) fn new(worker: Arc<ExpertWorker>, gauge: fn(&WorkerStats) -> &AtomicUsize) -> Self {
        gauge(&worker.stats).fetch_add(1, Ordering::Relaxed);
        Counted { worker, gauge }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.gauge)(&self.worker.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The tonic service: a shared worker behind `Arc`.
#[derive(Debug, Clone)]
struct Service(Arc<ExpertWorker>);

type ExchangeStream = Pin<Box<dyn Stream<Item = Result<ExchangeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for Service {
    type ExchangeStream = ExchangeStream;

    async fn exchange(&self, request: Request<Streaming<ExchangeRequest>>) -> Result<Response<ExchangeStream>, Status> {
        let peer = request.remote_addr();
        let worker = self.0.clone();
        let (tx, rx) = mpsc::channel::<Result<ExchangeResponse, Status>>(worker.limits.per_stream);
        let slots = Arc::new(Semaphore::new(worker.limits.per_stream));
        // The shared-memory handshake (crate::shm_link): an offer in the request metadata is
        // answered in the response headers; an accepted segment carries this stream's exchanges
        // from now on, and the stream itself only says that both ends are alive.
        let offer = crate::shm_link::offered(request.metadata());
        let mut accepted = offer.map(|offer| crate::shm_link::attach(worker.shm_dir.as_deref(), offer));
        if let Some(Ok(segment)) = &accepted
            && let Err(e) = crate::shm_link::serve(worker.clone(), segment.clone(), slots.clone(), tx.clone())
        {
            segment.close();
            accepted = Some(Err(format!("no thread for the rings: {e}")));
        }
        match &accepted {
            Some(Ok(segment)) => tracing::info!(?peer, segment = %segment.name(), "exchange stream over shared memory"),
            Some(Err(reason)) => tracing::info!(?peer, "exchange stream over gRPC: shared memory refused: {reason}"),
            None => tracing::debug!(?peer, "exchange stream over gRPC"),
        }
        let segment = accepted.as_ref().and_then(|a| a.as_ref().ok()).cloned();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            // Counted until the coordinator closes its side: the drain waits for that.
            let _open = Counted::new(worker.clone(), |s| &s.streams_open);
            loop {
                // Not reading while the stream has its limit in flight is the backpressure: the
                // sender's HTTP/2 window fills and its sends wait. A slot is held until the answer
                // is queued, so a client that stops reading answers stops being read too.
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                match inbound.message().await {
                    Ok(Some(req)) => {
                        worker.stats.exchanges_received.fetch_add(1, Ordering::Relaxed);
                        let in_flight = Counted::new(worker.clone(), |s| &s.exchanges_in_flight);
                        let Ok(budget) =
                            worker.budget.clone().acquire_many_owned(worker.permits(req.payload.len())).await
                        else {
                            break;
                        };
                        // Exchanges of a stream are independent: each computes as soon as it arrives
                        // and answers when done, in any order (matched by id).
                        let tx = tx.clone();
                        let worker = worker.clone();
                        tokio::spawn(async move {
                            let response = worker.handle(req).await;
                            drop(budget);
                            let _ = tx.send(Ok(response)).await;
                            drop(slot);
                            drop(in_flight);
                        });
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(?peer, "exchange stream ended: {status}");
                        break;
                    }
                }
            }
            // The coordinator went away (or closed its side): stop serving its rings; the
            // threads drop the mapping as they end.
            if let Some(segment) = segment {
                segment.close();
            }
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as ExchangeStream);
        if let Some(result) = &accepted {
            crate::shm_link::answer(response.metadata_mut(), result);
        }
        Ok(response)
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { serving: !self.0.draining.load(Ordering::Relaxed) }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

/// Serves `worker` on `listener` until `shutdown` resolves, in plaintext.
pub async fn serve(
    worker: Arc<ExpertWorker>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with_tls(worker, listener, None, None, shutdown).await
}

/// [`serve`] over mutual TLS with `tls` (clients must present a certificate from the cluster CA),
/// in plaintext without; with `health`, the standard `grpc.health.v1.Health` on the same port.
pub async fn serve_with_tls(
    worker: Arc<ExpertWorker>,
    listener: tokio::net::TcpListener,
    tls: Option<epserve_tls::ClusterTls>,
    health: Option<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "expert worker serving");
    let placement = crate::placement::service(worker.clone());
    let service = ExpertServiceServer::new(Service(worker))
        .max_decoding_message_size(epserve_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(epserve_proto::MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .add_service(service)
        .add_service(placement)
        .add_optional_service(health);
    match tls {
        // The TLS listener sets TCP_NODELAY on what it accepts.
        Some(tls) => router.serve_with_incoming_shutdown(epserve_tls::incoming(listener, tls), shutdown).await,
        None => {
            // Nagle's algorithm would hold back responses until the client's delayed ACK (40 ms):
            // the builder's `tcp_nodelay` only applies to sockets tonic binds itself, so set it here.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
}
