//! The expert worker's lifecycle: load the selected experts, bind, register (with the experts it
//! hosts), follow the placement (loading and announcing the experts the leader assigns here), serve
//! `ExpertService` until shutdown, leave.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use epserve_control::{ControlConnection, Instance, Kind, Membership};
use epserve_model::{Checkpoint, ExpertShard, LoadPolicy, LoadProgress, ModelConfig};

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
}

/// Starts a worker and serves it until `shutdown` resolves.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    start(config).await?.serve(shutdown).await
}

/// Everything before serving: loads the selected experts, binds, registers and starts following
/// the placement.
pub async fn start(config: WorkerConfig) -> Result<ReadyWorker, RunError> {
    let WorkerConfig { model, listen, selection, dtype, weights, control, limits } = config;
    let path = model.join("config.json");
    let model_config = ModelConfig::from_file(&path).map_err(|source| RunError::Config { path, source })?;
    let experts = selection.resolve(model_config.text.num_local_experts)?;
    let load = LoadSpec { dir: model.clone(), config: model_config.clone(), dtype, weights };
    let dir = model.clone();
    let shard = tokio::task::spawn_blocking(move || load.shard(&experts, true))
        .await?
        .map_err(|source| RunError::Load { dir, source })?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    let local_addr = listener.local_addr().map_err(|source| RunError::Bind { addr: listen, source })?;
    let model_name = model.display().to_string();
    let loader = LoadSpec { dir: model, config: model_config.clone(), dtype, weights };
    let loader = ExpertLoader(Arc::new(move |pairs: &[(usize, u32)]| loader.pairs(pairs)));
    let worker = Arc::new(
        ExpertWorker::new(shard, model_config.text.clone(), model_name.clone(), dtype)
            .with_limits(limits)
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
    Ok(ReadyWorker { worker, listener, local_addr, control, tls: None })
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

    /// Serves `ExpertService` until `shutdown` resolves, then leaves the control plane: the lease is
    /// revoked, so coordinators stop sending here now, not a TTL later.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let ReadyWorker { worker, listener, control, tls, .. } = self;
        let served = serve_with_tls(worker, listener, tls, shutdown).await;
        if let Some((control, membership)) = control {
            control.leave(membership).await;
        }
        tracing::info!("expert worker stopped");
        Ok(served?)
    }
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
