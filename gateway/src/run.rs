//! The gateway's lifecycle: load the tokenizer and chat template, bind, register, follow the
//! coordinators (listed, or the ready ones registered in the control plane) with health and load
//! polls, serve the HTTP API until shutdown, leave.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use epserve_control::{ControlConnection, Instance, Kind, Membership};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::edge::EdgeConfig;
use crate::images::{ImageConfig, ImageInput, Vision};
use crate::routing::CoordinatorPool;
use crate::server::{AppState, router};
use crate::text::TextCodec;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub struct GatewayConfig {
    /// Checkpoint directory: its tokenizer.json and chat template are used (no weights are read).
    pub model: PathBuf,
    /// HTTP address; port 0 picks a free port ([`ReadyGateway::local_addr`]).
    pub listen: String,
    /// Coordinators (`host:port`); empty: the ready ones registered in the control plane.
    pub coordinators: Vec<String>,
    /// Accepted API keys; none: no authentication.
    pub api_keys: Vec<String>,
    /// The model name clients use; `None`: the checkpoint directory's name.
    pub served_model_name: Option<String>,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    /// How often the coordinators' health and load are polled.
    pub health_interval: Duration,
    /// `GET /metrics` renders this recorder (installed by the process).
    pub metrics: Option<PrometheusHandle>,
    /// The control plane to register with and find the coordinators through; `None`: static wiring.
    pub control: Option<ControlConnection>,
    /// Limits on image input and URL fetching (used when the checkpoint has a vision tower).
    pub images: ImageConfig,
    /// Reach the coordinators over mutual TLS with this identity; `None`: plaintext.
    pub tls: Option<epserve_tls::ClusterTls>,
    /// Timeouts and limits of the HTTP edge (connections, per-client limits, request fields, CORS).
    pub edge: EdgeConfig,
}

/// Why a gateway could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("give coordinator addresses or a control plane to find them in")]
    NoCoordinators,
    #[error("loading the tokenizer and chat template of {}", dir.display())]
    Text {
        dir: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("image input for {}", dir.display())]
    Images {
        dir: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("coordinator addresses")]
    Coordinators(#[source] BoxError),
    #[error("binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    #[error("--cors-origin {0:?} is not a valid origin (scheme://host[:port], or *)")]
    CorsOrigin(String),
    #[error("opening the batch data directory {}", dir.display())]
    Batch {
        dir: PathBuf,
        #[source]
        source: crate::batch::OpenError,
    },
}

/// A gateway that is bound and registered; [`Self::serve`] answers HTTP requests.
#[derive(Debug)]
pub struct ReadyGateway {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    control: Option<(ControlConnection, Arc<Membership>)>,
    /// How long the requests in flight may take to finish on shutdown ([`Self::with_shutdown_grace`]).
    grace: Duration,
    /// Whether this gateway runs the batches ([`Self::with_batches`]): always without a control
    /// plane, while it leads the `batch-runner` election with one.
    batch_runner: Option<watch::Receiver<bool>>,
}

/// Starts a gateway and serves it until `shutdown` resolves.
pub async fn run(config: GatewayConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    start(config).await?.serve(shutdown).await
}

/// Everything before serving: the tokenizer, the coordinator pool (and, with the control plane,
/// the follower of the registered coordinators), the listener and the registration.
pub async fn start(config: GatewayConfig) -> Result<ReadyGateway, RunError> {
    let GatewayConfig {
        model,
        listen,
        coordinators,
        api_keys,
        served_model_name,
        max_body_bytes,
        max_concurrent_requests,
        health_interval,
        metrics,
        control,
        images,
        tls,
        edge,
    } = config;
    if coordinators.is_empty() && control.is_none() {
        return Err(RunError::NoCoordinators);
    }
    if let Some(bad) = edge.cors_origins.iter().find(|o| axum::http::HeaderValue::from_str(o).is_err()) {
        return Err(RunError::CorsOrigin(bad.clone()));
    }
    let text =
        TextCodec::from_checkpoint(&model).map_err(|e| RunError::Text { dir: model.clone(), source: e.into() })?;
    let images = Vision::from_checkpoint(&model, |t| text.token_id(t), |id| text.token_text(id))
        .and_then(|vision| ImageInput::new(images, vision))
        .map_err(|e| RunError::Images { dir: model.clone(), source: e.into() })?;
    let name = served_model_name.unwrap_or_else(|| self::served_model_name(&model));
    let pool = CoordinatorPool::with_tls(&coordinators, tls).map_err(|e| RunError::Coordinators(e.into()))?;
    pool.spawn_health_checks(health_interval.max(Duration::from_millis(50)));
    if let Some(control) = &control
        && coordinators.is_empty()
    {
        pool.follow(ready_coordinators(control));
    }
    let auth = !api_keys.is_empty();
    let vision = images.vision().is_some();
    let mut state = AppState::new(text, pool, name.clone())
        .with_limits(api_keys, max_body_bytes, max_concurrent_requests)
        .with_images(images)
        .with_edge(edge);
    if let Some(grammars) = grammar_compiler(&model) {
        state = state.with_grammars(grammars);
    }
    state.metrics = metrics;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| RunError::Bind { addr: listen.clone(), source })?;
    let local_addr = listener.local_addr().map_err(|source| RunError::Bind { addr: listen, source })?;
    let control = control.map(|control| {
        let addr = control.advertised(local_addr);
        let membership = control.register(Instance::new(Kind::Gateway, format!("gateway-{addr}"), addr));
        (control, membership)
    });
    tracing::info!(model = %name, auth, vision, "gateway serving http://{local_addr}/v1");
    Ok(ReadyGateway {
        state: Arc::new(state),
        listener,
        local_addr,
        control,
        batch_runner: None,
        grace: crate::drain::DEFAULT_SHUTDOWN_GRACE,
    })
}

impl ReadyGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves the Files and Batches API from `config.data_dir` and runs the batches there: always
    /// without a control plane; with one, while this gateway leads the `batch-runner` election (the
    /// other gateways mounting the same directory serve the API only).
    pub fn with_batches(mut self, config: crate::batch::BatchConfig) -> Result<Self, RunError> {
        let dir = config.data_dir.clone();
        let batches = crate::batch::Batches::open(config).map_err(|source| RunError::Batch { dir, source })?;
        // Nothing else holds the state before serving starts.
        match Arc::get_mut(&mut self.state) {
            Some(state) => state.batches = Some(batches),
            None => tracing::error!("the gateway's state is shared already: the Batch API stays off"),
        }
        self.batch_runner = Some(match &self.control {
            Some((control, membership)) => batch_runner_election(control, membership),
            None => watch::channel(true).1,
        });
        Ok(self)
    }

    /// Lets the requests in flight finish for at most `grace` on shutdown.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves the HTTP API until `shutdown` resolves, drains ([`crate::drain`]: requests in flight
    /// finish within the grace period), then leaves the control plane.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
        let ReadyGateway { state, listener, control, batch_runner, grace, .. } = self;
        let limits = state.edge.connections.clone();
        // Aborted, its jobs and lines with it, when serving ends: unfinished lines run again at the
        // next start (the journal keeps the finished ones).
        let _runner = match (&state.batches, batch_runner) {
            (Some(batches), Some(leading)) => {
                Some(AbortOnDrop(tokio::spawn(crate::batch::runner::run(state.clone(), batches.clone(), leading))))
            }
            _ => None,
        };
        crate::drain::serve(listener, router(state), &limits, grace, shutdown).await;
        if let Some((control, membership)) = control {
            control.leave(membership).await;
        }
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// The control-plane election whose leader runs the batches.
pub const BATCH_RUNNER_ELECTION: &str = "batch-runner";

/// True while this gateway leads the [`BATCH_RUNNER_ELECTION`] (the coordinators' controller
/// election, reused: a lease-bound leader key in the registry).
fn batch_runner_election(control: &ControlConnection, membership: &Membership) -> watch::Receiver<bool> {
    let mut fence = control.campaign(BATCH_RUNNER_ELECTION, membership);
    let (tx, rx) = watch::channel(false);
    control.spawn(async move {
        loop {
            let leading = fence.borrow_and_update().is_some();
            if tx.send_replace(leading) != leading {
                tracing::info!(leading, "batch-runner election");
            }
            if fence.changed().await.is_err() {
                tx.send_replace(false);
                return;
            }
        }
    });
    rx
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The compiler that checks request grammars against the checkpoint's vocabulary (the coordinator's
/// is built the same way), or `None` with a warning: grammars are then checked by the coordinator only.
fn grammar_compiler(dir: &Path) -> Option<Arc<epserve_grammar::GrammarCompiler>> {
    let built =
        epserve_model::ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string()).and_then(|config| {
            let eos = epserve_model::generation_config::eos_token_ids(dir, &config.text).map_err(|e| e.to_string())?;
            let vocabulary = epserve_grammar::Vocabulary::from_checkpoint(dir, config.text.vocab_size, &eos)
                .map_err(|e| e.to_string())?;
            epserve_grammar::GrammarCompiler::new(vocabulary).map_err(|e| e.to_string())
        });
    match built {
        Ok(compiler) => Some(Arc::new(compiler)),
        Err(e) => {
            tracing::warn!("grammars will be checked by the coordinators only: {e}");
            None
        }
    }
}

/// The name clients use for the model by default: the checkpoint directory's name.
pub fn served_model_name(model: &Path) -> String {
    std::fs::canonicalize(model)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_owned())
}

/// The addresses of the registered coordinators that are ready, kept up to date on the control
/// runtime: a coordinator still waiting for its workers is not sent requests.
pub fn ready_coordinators(control: &ControlConnection) -> watch::Receiver<Vec<String>> {
    let mut instances = control.instances(Kind::Coordinator);
    let (tx, rx) = watch::channel(Vec::new());
    control.spawn(async move {
        loop {
            let addrs: Vec<String> =
                instances.borrow_and_update().iter().filter(|i| i.ready).map(|i| i.addr.clone()).collect();
            tx.send_replace(addrs);
            if instances.changed().await.is_err() {
                return;
            }
        }
    });
    rx
}
