//! `epserve coordinator`: the serving engine behind the `CoordinatorService` gRPC API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use epserve_coordinator::engine::{self, EngineConfig};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::server::{self, Coordinator};

use epserve_control::controller::{self, Layout};
use epserve_control::{Instance, Kind, Membership};
use epserve_model::ModelConfig;
use epserve_model::generation_config::eos_token_ids;

use crate::control::{Control, ControlArgs};
use crate::load::{ComputeDtype, ExpertArgs, engine_parts};

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:50051", env = "EPSERVE_LISTEN")]
    pub listen: String,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
    /// KV cache size as tokens of context in every layer.
    #[arg(long, default_value_t = 32_768, env = "EPSERVE_KV_CAPACITY_TOKENS", conflicts_with = "kv_capacity_mib")]
    pub kv_capacity_tokens: usize,
    /// KV cache size in MiB (instead of tokens).
    #[arg(long, env = "EPSERVE_KV_CAPACITY_MIB")]
    pub kv_capacity_mib: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, env = "EPSERVE_KV_BLOCK_SIZE")]
    pub kv_block_size: usize,
    /// Tokens computed per step at most (decodes plus prompt chunks).
    #[arg(long, default_value_t = 512, env = "EPSERVE_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 256, env = "EPSERVE_MAX_RUNNING")]
    pub max_running: usize,
    /// Longest sequence (prompt + output); default: the model's limit, capped by the KV capacity.
    #[arg(long, env = "EPSERVE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "EPSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    if args.kv_block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 {
        bail!("--kv-block-size, --max-batch-tokens and --max-running must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    if let Some(addr) = &args.metrics_listen {
        runtime.block_on(crate::metrics_http::serve(addr))?;
    }
    let control = args.control.connect()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&args.listen))
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Registered (not ready) before waiting for the workers, so that this coordinator can be elected
    // and heal the placement that it may itself be waiting on.
    let membership = match &control {
        Some(control) => Some(join(control, &local.to_string(), &args.model, &crate::load::read_config(&args.model)?)),
        None => None,
    };
    let remote = (!args.experts.workers.is_empty() || control.is_some()).then_some(&runtime);
    let (config, model, experts) = engine_parts(&args.model, args.dtype, &args.experts, remote, control.as_ref())?;
    let capacity = match args.kv_capacity_mib {
        Some(mib) => KvCapacity::Bytes(mib << 20),
        None => KvCapacity::Tokens(args.kv_capacity_tokens),
    };
    let pool = KvPool::new(&config.text, capacity, args.kv_block_size, model.dtype(), &Device::Cpu)?;
    let model_limit = config.text.max_position_embeddings;
    let max_model_len = args.max_model_len.unwrap_or(model_limit).min(model_limit).min(pool.capacity_tokens());
    tracing::info!(
        "KV cache: {} blocks of {} tokens, {:.1} MiB, {} tokens of full context; max model len {max_model_len}",
        pool.total_blocks(),
        pool.block_size(),
        pool.capacity_bytes() as f64 / 1048576.0,
        pool.capacity_tokens()
    );
    let engine = engine::start(
        model,
        experts,
        pool,
        EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            overlap: args.experts.overlap,
            ..EngineConfig::new(max_model_len, eos_token_ids(&args.model, &config.text)?)
        },
    );
    // Borrowed, not moved: the control runtime must not be dropped inside the async block.
    let control = &control;
    runtime.block_on(async move {
        if let Some(m) = &membership {
            m.update(|i| i.ready = true);
        }
        println!("listening on {local}");
        server::serve(Coordinator::new(engine.clone()), listener, crate::shutdown_signal()).await?;
        if let (Some(control), Some(membership)) = (control, membership) {
            control.runtime.spawn(async move { membership.leave().await }).await.ok();
        }
        engine.stop();
        tracing::info!("coordinator stopped");
        Ok(())
    })
}

/// Registers the coordinator, and campaigns to be the one that runs the placement controller.
fn join(control: &Control, addr: &str, model: &Path, config: &ModelConfig) -> Arc<Membership> {
    let record = Instance {
        model: model.display().to_string(),
        ready: false,
        ..Instance::new(Kind::Coordinator, format!("coordinator-{addr}"), addr.to_owned())
    };
    let membership = Arc::new(control.register(record));
    let _guard = control.runtime.enter();
    let leading = control.plane.campaign("placement", &membership);
    let layout = Layout {
        moe_layers: config.text.moe_layers().map(|l| l as u32).collect(),
        num_experts: config.text.num_local_experts as u32,
    };
    let (workers, placement) = (control.plane.instances(Kind::Worker), control.plane.watch_placement());
    control.runtime.spawn(controller::run(control.plane.clone(), layout, leading, workers, placement));
    membership
}
