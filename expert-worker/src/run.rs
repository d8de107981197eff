//! The expert worker's lifecycle: bind (answering `grpc.health.v1` at once: live, not ready), load
//! the selected experts, register (with the experts it hosts), become ready, follow the placement
//! (loading and announcing the experts the leader assigns here), serve `ExpertService` until
//! shutdown, then drain: not ready, leave the registry (coordinators move its rows to replicas), wait
//! until no coordinator routes here (bounded by the shutdown grace), stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use epserve_control::{ControlConnection, Instance, Kind, Membership};
use epserve_model::{Checkpoint, ExpertShard, LoadPolicy, LoadProgress, ModelConfig};

use crate::health::{EarlyHealth, Health, wait_unrouted};
use crate::selection::{ExpertSelection, SelectionError};
use crate::service::{ExchangeLimits, ExpertLoader, ExpertWorker, serve_with_tls};

#[derive(Debug)]
pub struct WorkerConfig {
    /// Checkpoint directory (hub layout); only the hosted experts' slices are read.
    pub model: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port ([`ReadyWorker::local_addr`]).
    pub listen: String,
    /// The experts hosted from the start (an empty list: a spare that the placement leader fills).
    pub selection: ExpertSelection,
    pub dtype: DType,
    /// How expert matrices are kept: their dtype, and whether they are quantized at load.
    pub weights: LoadPolicy,
    /// The control plane to register with; `None`: static wiring.
    pub control: Option<ControlConnection>,
    /// How much exchange work is taken in at once.
    pub limits: ExchangeLimits,
    /// Where coordinators on this host create their shared-memory segments (`/dev/shm` by
    /// default); `None`: the worker refuses shared memory and every exchange goes over gRPC.
    pub shm_dir: Option<PathBuf>,
}

/// Why a worker could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: epserve_model::Error,
    },
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error("loading experts from {}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: epserve_model::Error,
    },
    #[error("binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the loading task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("serving gRPC")]
    Serve(#[from] tonic::transport::Error),
}

/// A worker with its experts loaded, bound, and registered; [`Self::serve`] answers exchanges.
#[derive(Debug)]
pub struct ReadyWorker {
    worker: Arc<ExpertWorker>,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    control: Option<(ControlConnection, Arc<Membership>)>,
    /// Serve over mutual TLS with this identity ([`Self::with_tls`]); `None`: plaintext.
    tls: Option<epserve_tls::ClusterTls>,
    health: Health,
    /// How long the drain on shutdown may take at most ([`Self::with_shutdown_grace`]).
    grace: Duration,
}

/// How long a worker drains at most on shutdown by default: ample for the coordinators to see it
/// leave the registry (milliseconds) and finish the exchanges they sent it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// After the drain, how long the server may take to close its connections gracefully.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Starts a worker and serves it until `shutdown` resolves.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    start(config).await?.serve(shutdown).await
}

/// Everything before serving: binds, loads the selected experts, registers and starts following
/// the placement. In plaintext; [`start_with_tls`] for mutual TLS.
pub async fn start(config: WorkerConfig) -> Result<ReadyWorker, RunError> {
    start_with_tls(config, None).await
}

/// [`start`], serving over mutual TLS with `tls` from the moment the port is bound (the health
/// service answers while the experts load).
pub async fn start_with_tls(
    config: WorkerConfig,
    tls: Option<epserve_tls::ClusterTls>,
) -> Result<ReadyWorker, RunError> {
    let WorkerConfig { model, listen, selection, dtype, weights, control, limits, shm_dir } = config;
    let path = model.join("config.json");
    let model_config = ModelConfig::from_file(&path).map_err(|source| RunError::Config { path, source })?;
    let experts = selection.resolve(model_config.text.num_local_experts)?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    let local_addr = listener.local_addr().map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    // Live but not ready while loading: orchestrators tell a slow start from a dead process.
    let health = Health::new(crate::health::EXPERT_SERVICE).await;
    let (listener, early) =
        EarlyHealth::start(listener, &health, tls.clone()).map_err(|source| RunError::Bind { addr: listen, source })?;
    let load = LoadSpec { dir: model.clone(), config: model_config.clone(), dtype, weights };
    let dir = model.clone();
    let loaded = tokio::task::spawn_blocking(move || load.shard(&experts, true)).await;
    early.stop().await;
    let shard = loaded?.map_err(|source| RunError::Load { dir, source })?;
    let model_name = model.display().to_string();
    let loader = LoadSpec { dir: model, config: model_config.clone(), dtype, weights };
    let loader = ExpertLoader(Arc::new(move |pairs: &[(usize, u32)]| loader.pairs(pairs)));
    let worker = Arc::new(
        ExpertWorker::new(shard, model_config.text.clone(), model_name.clone(), dtype)
            .with_limits(limits)
            .with_shm_dir(shm_dir)
            .with_loader(loader),
    );
    let control = control.map(|control| {
        let addr = control.advertised(local_addr);
        let record = Instance {
            experts: worker.experts(),
            replicas: worker.replicas(),
            model: model_name,
            ..Instance::new(Kind::Worker, format!("worker-{addr}"), addr)
        };
        let membership = control.register(record);
        follow_assignments(&control, membership.clone(), worker.clone());
        (control, membership)
    });
    health.set_ready(true).await;
    Ok(ReadyWorker { worker, listener, local_addr, control, tls, health, grace: DEFAULT_SHUTDOWN_GRACE })
}

impl ReadyWorker {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn worker(&self) -> &Arc<ExpertWorker> {
        &self.worker
    }

    /// Serves over mutual TLS with `tls` (every client must present a certificate from its CA);
    /// `None` keeps plaintext.
    pub fn with_tls(mut self, tls: Option<epserve_tls::ClusterTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Drains for at most `grace` on shutdown, then stops anyway.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves `ExpertService` and `grpc.health.v1.Health` until `shutdown` resolves, then drains
    /// (see [`Self::drain`]) and stops. A drain cut short by the grace is logged, not an error: what
    /// was still in flight is sent again to replicas by the coordinators.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let ReadyWorker { worker, listener, control, tls, health, grace, .. } = self;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Some(health.service());
        let mut server = tokio::spawn(serve_with_tls(worker.clone(), listener, tls, service, async {
            let _ = stopped.await;
        }));
        tokio::select! {
            () = shutdown => {}
            // Ended by itself: a transport error.
            result = &mut server => {
                if let Some((control, membership)) = control {
                    control.leave(membership).await;
                }
                return Ok(result??);
            }
        }
        let deadline = Instant::now() + grace;
        let unrouted = drain(&worker, &health, control, deadline).await;
        let _ = stop.send(());
        // Graceful: GOAWAY, then the streams still open (idle ones of a coordinator that has not
        // noticed yet) get a moment to close before the connections are dropped.
        let close =
            if unrouted { CLOSE_GRACE.min(deadline.saturating_duration_since(Instant::now())) } else { Duration::ZERO };
        let served = match tokio::time::timeout(close, &mut server).await {
            Ok(result) => result?,
            Err(_) => {
                server.abort();
                Ok(())
            }
        };
        tracing::info!("expert worker stopped");
        Ok(served?)
    }
}

/// The worker's half of a rolling restart without a failed request: not ready, out of the registry
/// (the lease is revoked: the record disappears at once and every coordinator sends what it had in
/// flight here to replicas and stops routing here), then waits until no coordinator routes here (see
/// [`wait_unrouted`]) or `deadline`. True if it drained before the deadline.
async fn drain(
    worker: &ExpertWorker,
    health: &Health,
    control: Option<(ControlConnection, Arc<Membership>)>,
    deadline: Instant,
) -> bool {
    let started = Instant::now();
    tracing::info!("draining: leaving the registry, then waiting until no coordinator routes here");
    worker.set_draining();
    health.set_ready(false).await;
    if let Some((control, membership)) = control {
        control.leave(membership).await;
    }
    let unrouted = wait_unrouted(worker, deadline).await;
    let took = started.elapsed();
    metrics::histogram!(epserve_proto::metric_names::DRAIN_SECONDS, "component" => "worker").record(took.as_secs_f64());
    if unrouted {
        tracing::info!("drained in {:.2} s", took.as_secs_f64());
    } else {
        tracing::warn!(
            "shutdown grace ({:.0} s) over with exchanges still arriving: closing the streams still open",
            took.as_secs_f64()
        );
    }
    unrouted
}

/// What loading experts from the checkpoint needs.
#[derive(Debug, Clone)]
struct LoadSpec {
    dir: PathBuf,
    config: ModelConfig,
    dtype: DType,
    weights: LoadPolicy,
}

impl LoadSpec {
    /// Loads the experts of `pairs` (blocking).
    fn pairs(&self, pairs: &[(usize, u32)]) -> epserve_model::Result<ExpertShard> {
        let ckpt = Checkpoint::open(&self.dir)?;
        ExpertShard::load_pairs(&self.config, &ckpt, pairs, self.dtype, self.weights, &Device::Cpu)
    }

    /// Loads `experts` of every MoE layer (blocking); with `progress`, on the log as it goes.
    fn shard(&self, experts: &[u32], progress: bool) -> epserve_model::Result<ExpertShard> {
        let ckpt = Checkpoint::open(&self.dir)?;
        let mut logged = progress.then(|| LoadProgress::new(&ckpt, "experts"));
        let shard =
            ExpertShard::load(&self.config, &ckpt, experts, self.dtype, self.weights, &Device::Cpu, &mut || {
                if let Some(logged) = logged.as_mut() {
                    logged.tick();
                }
            })?;
        if let Some(logged) = &logged {
            logged.finish();
            tracing::info!(
                "hosting {} of {} experts {experts:?} of {} MoE layers: {:.1} MiB resident ({})",
                experts.len(),
                self.config.text.num_local_experts,
                self.config.text.moe_layers().count(),
                shard.resident_bytes() as f64 / 1048576.0,
                match (ckpt.quantization(), self.weights.quantize) {
                    (Some(ct), _) => format!("pre-quantized: {}", ct.description),
                    (None, Some(q)) => format!("quantized at load to {} ({})", q.scheme, q.scope),
                    (None, None) => format!("{:?}", self.weights.storage),
                },
            );
        }
        Ok(shard)
    }
}

/// Loads the `(layer, expert)` pairs the placement assigns to this worker and not hosted yet (the
/// placement leader's orphan assignments), and announces what it hosts in its record whenever that
/// changes (coordinators route to a worker only for the experts its record lists).
fn follow_assignments(control: &ControlConnection, membership: Arc<Membership>, worker: Arc<ExpertWorker>) {
    let mut placement = control.watch_placement();
    let mut hosted = worker.hosted_changes();
    control.spawn(async move {
        loop {
            let assigned: Vec<(usize, u32)> = placement
                .borrow_and_update()
                .as_ref()
                .map(|map| map.pairs_of(&membership.id()).into_iter().map(|(l, e)| (l as usize, e)).collect())
                .unwrap_or_default();
            if let Err(e) = worker.load_pairs(&assigned).await {
                tracing::error!("loading the experts the placement assigns here: {e}");
            }
            hosted.borrow_and_update();
            let (experts, replicas) = (worker.experts(), worker.replicas());
            let record = membership.record();
            if record.experts != experts || record.replicas != replicas {
                membership.update(|i| {
                    i.experts = experts;
                    i.replicas = replicas;
                });
            }
            tokio::select! {
                r = placement.changed() => if r.is_err() { return },
                r = hosted.changed() => if r.is_err() { return },
            }
        }
    });
}
