//! `epserve gateway`: the OpenAI-compatible HTTP API in front of the coordinators.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_gateway::GatewayConfig;

use crate::control::JoinArgs;

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
    pub control: JoinArgs,
}

pub fn run(args: GatewayArgs) -> Result<()> {
    if args.max_concurrent_requests == 0 {
        bail!("--max-concurrent-requests must be positive");
    }
    if args.coordinators.is_empty() && args.control.registry().is_none() {
        bail!("give --coordinators ADDR[,ADDR] or --registry etcd://HOST:PORT to find them");
    }
    let control = args.control.connect()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let config = GatewayConfig {
        model: args.model,
        listen: args.listen,
        coordinators: args.coordinators,
        api_keys: args.api_keys.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect(),
        served_model_name: args.served_model_name,
        max_body_bytes: args.max_body_bytes,
        max_concurrent_requests: args.max_concurrent_requests,
        health_interval: Duration::from_millis(args.health_interval_ms),
        metrics: Some(metrics),
        control,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    runtime.block_on(async move {
        let gateway = epserve_gateway::start(config).await?;
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {}", gateway.local_addr());
        Ok(gateway.serve(crate::shutdown_signal()).await?)
    })
}
