//! The coordinator's lifecycle: bind, join the control plane (registered not ready, campaigning to
//! run the placement controller), load the model and reach its experts, size the KV cache, start the
//! engine, become ready, serve `CoordinatorService` until shutdown, drain, leave. The standard gRPC
//! health service answers from the bind on ([`crate::health`]: ready once every expert has a live
//! host).
//!
//! Registration comes before the wait for the workers, so that this coordinator can be elected and
//! heal the placement that it may itself be waiting on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use epserve_control::controller::{self, Layout};
use epserve_control::{ControlConnection, Fence, Instance, Kind, Membership};
use tokio::sync::watch;

use crate::engine::{self, EngineConfig, EngineHandle};
use crate::health::{EarlyHealth, Health, follow_readiness};
use crate::kv_pool::{KvCapacity, KvPool};
use crate::loading::{LoadConfig, LoadError, LoadedModel, load_model, read_config};
use crate::rebalance::LoadBalancer;
use crate::server::{self, Coordinator};
use epserve_grammar::{GrammarCompiler, Vocabulary};

/// The election whose leader runs the placement controller.
pub const PLACEMENT_ELECTION: &str = "placement";

/// How big the engine's batches and KV cache are.
#[derive(Debug, Clone)]
pub struct EngineSizing {
    pub kv_capacity: KvCapacity,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Tokens computed per step at most (decodes plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Requests accepted and not yet running at most.
    pub max_waiting: usize,
    /// Longest sequence (prompt + output); `None`: the model's limit. Capped by both the model's
    /// limit and the KV capacity.
    pub max_model_len: Option<usize>,
}

impl EngineSizing {
    /// A KV cache of `kv_capacity` in 16-token blocks, with the engine's default batch limits (512
    /// tokens a step, 256 running sequences) and the model's own length limit.
    pub fn new(kv_capacity: KvCapacity) -> Self {
        EngineSizing {
            kv_capacity,
            kv_block_size: 16,
            max_batch_tokens: 512,
            max_running: 256,
            max_waiting: 1024,
            max_model_len: None,
        }
    }
}

#[derive(Debug)]
pub struct CoordinatorConfig {
    pub load: LoadConfig,
    /// Address to serve gRPC on; port 0 picks a free port ([`ReadyCoordinator::local_addr`]).
    pub listen: String,
    pub sizing: EngineSizing,
    /// Split steps into two overlapped micro-batches.
    pub overlap: bool,
    /// The control plane to register with and find the workers through; `None`: static wiring.
    pub control: Option<ControlConnection>,
}

/// Why a coordinator could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("sizing the KV cache")]
    KvCache(#[source] epserve_model::Error),
    #[error("serving gRPC")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}; this coordinator stopped serving and left the cluster (restart it)")]
    EngineDied(String),
}

/// A coordinator that is bound, has its engine running and is registered ready; [`Self::serve`]
/// answers requests.
#[derive(Debug)]
pub struct ReadyCoordinator {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    engine: EngineHandle,
    grammars: Result<Arc<GrammarCompiler>, String>,
    control: Option<(ControlConnection, Arc<Membership>)>,
    /// Serve over mutual TLS with this identity ([`Self::with_tls`]); `None`: plaintext.
    tls: Option<epserve_tls::ClusterTls>,
    health: Health,
    /// Keeps `health`'s readiness up to date while serving.
    readiness: tokio::task::JoinHandle<()>,
    /// How long the running requests may take to finish on shutdown ([`Self::with_shutdown_grace`]).
    grace: Duration,
    /// Expert load telemetry and balancing over the workers (`None` with in-process experts).
    balancer: Option<Arc<LoadBalancer>>,
}

/// How long a coordinator lets its running requests finish on shutdown by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Starts a coordinator and serves it until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    start(config).await?.serve(shutdown).await
}

/// Everything before serving: binds, joins the control plane, loads the model and reaches its
/// experts (with the control plane, waiting for every expert to have a live worker), starts the
/// engine and marks this coordinator ready. In plaintext; [`start_with_tls`] for mutual TLS.
pub async fn start(config: CoordinatorConfig) -> Result<ReadyCoordinator, RunError> {
    start_with_tls(config, None).await
}

/// [`start`], serving over mutual TLS with `tls` from the moment the port is bound (the health
/// service answers, not ready, while the model loads and the workers are awaited).
pub async fn start_with_tls(
    config: CoordinatorConfig,
    tls: Option<epserve_tls::ClusterTls>,
) -> Result<ReadyCoordinator, RunError> {
    let CoordinatorConfig { load, listen, sizing, overlap, control } = config;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    let local_addr = listener.local_addr().map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    let health = Health::new(crate::health::COORDINATOR_SERVICE).await;
    let (listener, early) =
        EarlyHealth::start(listener, &health, tls.clone()).map_err(|source| RunError::Bind { addr: listen, source })?;
    let (membership, leading) = match &control {
        Some(control) => {
            let (membership, leading) = join(control, &control.advertised(local_addr), &load)?;
            (Some(membership), Some(leading))
        }
        None => (None, None),
    };
    let loaded = load_model(&load, control.as_ref()).await;
    early.stop().await;
    let loaded = loaded?;
    let layout = Layout {
        moe_layers: loaded.config.text.moe_layers().map(|l| l as u32).collect(),
        num_experts: loaded.config.text.num_local_experts as u32,
    };
    let grammars = grammar_compiler(&load.dir, loaded.config.text.vocab_size, &loaded.eos_token_ids);
    let leadership = control.as_ref().zip(leading).map(|(c, leading)| crate::rebalance::Leadership {
        plane: c.plane().clone(),
        leading,
        election: PLACEMENT_ELECTION.to_owned(),
    });
    let balancer = loaded.experts.load_balancer(leadership);
    if let (Some(control), Some(m), Some(b)) = (&control, &membership, &balancer) {
        control.spawn(crate::rebalance::report_acks(b.acked(), m.clone()));
    }
    let engine = start_engine(loaded, &sizing, overlap)?;
    let workers = control.as_ref().map(|c| c.instances(Kind::Worker));
    let readiness = follow_readiness(health.clone(), engine.clone(), workers, layout);
    if let Some(m) = &membership {
        m.update(|i| i.ready = true);
    }
    Ok(ReadyCoordinator {
        listener,
        local_addr,
        engine,
        grammars,
        control: control.zip(membership),
        tls,
        health,
        readiness,
        grace: DEFAULT_SHUTDOWN_GRACE,
        balancer,
    })
}

impl ReadyCoordinator {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Expert load telemetry and balancing (`None` with in-process experts).
    pub fn balancer(&self) -> Option<&Arc<LoadBalancer>> {
        self.balancer.as_ref()
    }

    /// Rebalances automatically as `auto` says (`None`: only when asked, `epserve eplb apply`); the
    /// balancer acts only while this coordinator leads the placement election (or is statically
    /// wired). Must be called inside the serving runtime.
    pub fn with_auto_rebalancing(self, auto: Option<crate::rebalance::AutoConfig>) -> Self {
        if let (Some(auto), Some(b)) = (auto, &self.balancer) {
            tracing::info!(
                "automatic rebalancing: every {:?}, above aggregate imbalance {} (hysteresis {})",
                auto.interval,
                auto.threshold,
                auto.hysteresis
            );
            tokio::spawn(b.clone().run_auto(auto));
        }
        self
    }

    /// Serves over mutual TLS with `tls` (every client must present a certificate from its CA);
    /// `None` keeps plaintext. The worker links take their identity from `GrpcConfig::tls`.
    pub fn with_tls(mut self, tls: Option<epserve_tls::ClusterTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Lets the running requests finish for at most `grace` on shutdown.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves `CoordinatorService` and `grpc.health.v1` until `shutdown` resolves, drains
    /// ([`server::serve_draining`]), then leaves the control plane and stops the engine.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let ReadyCoordinator { listener, engine, grammars, control, tls, health, readiness, grace, balancer, .. } =
            self;
        let drain = server::Drain { health: &health, membership: control.as_ref().map(|(_, m)| &**m), grace };
        let coordinator = Coordinator::new(engine.clone(), grammars).with_balancing(balancer);
        let served = server::serve_draining(coordinator, listener, tls, drain, shutdown).await;
        readiness.abort();
        // Deregistered at once (not a lease TTL later), also when the engine died: routers must
        // stop sending requests here.
        if let Some((control, membership)) = control {
            control.leave(membership).await;
        }
        engine.stop();
        if let Some(why) = engine.died() {
            return Err(RunError::EngineDied(why));
        }
        tracing::info!("coordinator stopped");
        Ok(served?)
    }
}

/// Creates the KV pool and starts the engine thread with `loaded`. The longest sequence is the
/// smallest of the asked length, the model's limit and what the KV cache holds.
pub fn start_engine(loaded: LoadedModel, sizing: &EngineSizing, overlap: bool) -> Result<EngineHandle, RunError> {
    let LoadedModel { config, eos_token_ids, model, vision, experts } = loaded;
    let pool = KvPool::new(&config.text, sizing.kv_capacity, sizing.kv_block_size, model.dtype(), &Device::Cpu)
        .map_err(RunError::KvCache)?;
    let model_limit = config.text.max_position_embeddings;
    let max_model_len = sizing.max_model_len.unwrap_or(model_limit).min(model_limit).min(pool.capacity_tokens());
    tracing::info!(
        "KV cache: {} blocks of {} tokens, {:.1} MiB, {} tokens of full context; max model len {max_model_len}",
        pool.total_blocks(),
        pool.block_size(),
        pool.capacity_bytes() as f64 / 1048576.0,
        pool.capacity_tokens()
    );
    Ok(engine::start(
        model,
        vision,
        experts,
        pool,
        EngineConfig {
            max_batch_tokens: sizing.max_batch_tokens,
            max_running: sizing.max_running,
            max_waiting: sizing.max_waiting,
            overlap,
            ..EngineConfig::new(max_model_len, eos_token_ids)
        },
    ))
}

/// The compiler of request grammars over the checkpoint's `tokenizer.json`, or why there is none:
/// a checkpoint without a tokenizer is still served, only its constrained requests are refused.
pub fn grammar_compiler(
    dir: &std::path::Path,
    vocab_size: usize,
    eos_token_ids: &[u32],
) -> Result<Arc<GrammarCompiler>, String> {
    let compiler = Vocabulary::from_checkpoint(dir, vocab_size, eos_token_ids).and_then(GrammarCompiler::new);
    compiler.map(Arc::new).map_err(|e| {
        tracing::warn!("constrained decoding is off: {e}");
        e.to_string()
    })
}

/// Registers the coordinator (not ready), and campaigns to be the one that runs the placement
/// controller, which then runs on the control runtime for as long as the connection lives. Returns
/// the membership and the leadership (the load balancer changes the placement only while leading).
fn join(
    control: &ControlConnection,
    addr: &str,
    load: &LoadConfig,
) -> Result<(Arc<Membership>, watch::Receiver<Option<Fence>>), LoadError> {
    let config = read_config(&load.dir)?;
    let record = Instance {
        model: load.dir.display().to_string(),
        ready: false,
        ..Instance::new(Kind::Coordinator, format!("coordinator-{addr}"), addr.to_owned())
    };
    let membership = control.register(record);
    let leading = control.campaign(PLACEMENT_ELECTION, &membership);
    let layout = Layout {
        moe_layers: config.text.moe_layers().map(|l| l as u32).collect(),
        num_experts: config.text.num_local_experts as u32,
    };
    let (workers, placement) = (control.instances(Kind::Worker), control.watch_placement());
    control.spawn(controller::run(control.plane().clone(), layout, leading.clone(), workers, placement));
    Ok((membership, leading))
}
