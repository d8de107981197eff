//! `epserve gateway`: the OpenAI-compatible HTTP API in front of the coordinators.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_control::{Instance, Kind};
use epserve_gateway::{AppState, CoordinatorPool, TextCodec};

use crate::control::{Control, ControlArgs};

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Checkpoint directory: its tokenizer.json and chat template are used (no weights are read).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// HTTP address; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8000", env = "EPSERVE_LISTEN")]
    pub listen: String,
    /// Coordinators (`host:port`, comma-separated); with `--registry`, found there instead.
    #[arg(long, value_delimiter = ',', env = "EPSERVE_COORDINATORS")]
    pub coordinators: Vec<String>,
    /// Accepted API keys (repeat the flag or separate with commas); none = no authentication.
    #[arg(long = "api-key", value_delimiter = ',', env = "EPSERVE_API_KEYS", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// The model name clients use; default: the checkpoint directory's name.
    #[arg(long, env = "EPSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 8 << 20, env = "EPSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Requests in flight at most; more are answered 429.
    #[arg(long, default_value_t = 1024, env = "EPSERVE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: usize,
    /// How often coordinators' health and load are polled, in milliseconds.
    #[arg(long, default_value_t = 500, env = "EPSERVE_HEALTH_INTERVAL_MS")]
    pub health_interval_ms: u64,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn served_name(model: &std::path::Path) -> String {
    std::fs::canonicalize(model)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_owned())
}

pub fn run(args: GatewayArgs) -> Result<()> {
    if args.max_concurrent_requests == 0 {
        bail!("--max-concurrent-requests must be positive");
    }
    if args.coordinators.is_empty() && args.control.registry.is_none() {
        bail!("give --coordinators ADDR[,ADDR] or --registry etcd://HOST:PORT to find them");
    }
    let control = args.control.connect()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let text = TextCodec::from_checkpoint(&args.model)?;
    let name = args.served_model_name.clone().unwrap_or_else(|| served_name(&args.model));
    let keys: Vec<String> = args.api_keys.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    // Borrowed, not moved: the control runtime must not be dropped inside the async block.
    let control = &control;
    runtime.block_on(async move {
        let pool = CoordinatorPool::new(&args.coordinators)?;
        pool.spawn_health_checks(Duration::from_millis(args.health_interval_ms.max(50)));
        if let Some(control) = &control
            && args.coordinators.is_empty()
        {
            pool.follow(coordinator_addresses(control));
        }
        let mut state = AppState::new(text, pool, name.clone()).with_limits(
            keys.clone(),
            args.max_body_bytes,
            args.max_concurrent_requests,
        );
        state.metrics = Some(metrics);
        let app = epserve_gateway::router(Arc::new(state));
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let membership = control
            .as_ref()
            .map(|c| c.register(Instance::new(Kind::Gateway, format!("gateway-{addr}"), addr.to_string())));
        tracing::info!(model = %name, auth = !keys.is_empty(), "gateway serving http://{addr}/v1");
        println!("listening on {addr}");
        // Streamed chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds one back
        // until the client's delayed ACK (up to 40 ms), which shows as time to first token.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, app).with_graceful_shutdown(crate::shutdown_signal()).await?;
        if let (Some(control), Some(membership)) = (control, membership) {
            control.runtime.spawn(async move { membership.leave().await }).await.ok();
        }
        tracing::info!("gateway stopped");
        Ok(())
    })
}

/// The registered coordinators' addresses, kept up to date on the control runtime.
fn coordinator_addresses(control: &Control) -> tokio::sync::watch::Receiver<Vec<String>> {
    let _guard = control.runtime.enter();
    let mut instances = control.plane.instances(Kind::Coordinator);
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    control.runtime.spawn(async move {
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
