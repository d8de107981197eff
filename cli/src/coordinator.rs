//! `epserve coordinator`: the serving engine behind the `CoordinatorService` gRPC API.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use epserve_coordinator::engine::{self, EngineConfig};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::server::{self, Coordinator};

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
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    if args.kv_block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 {
        bail!("--kv-block-size, --max-batch-tokens and --max-running must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    if let Some(addr) = &args.metrics_listen {
        runtime.block_on(crate::metrics_http::serve(addr))?;
    }
    let remote = (!args.experts.workers.is_empty()).then_some(&runtime);
    let (config, model, experts) = engine_parts(&args.model, args.dtype, &args.experts, remote)?;
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
            ..EngineConfig::new(&config.text, max_model_len)
        },
    );
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        println!("listening on {}", listener.local_addr()?);
        server::serve(Coordinator::new(engine.clone()), listener, crate::shutdown_signal()).await?;
        engine.stop();
        tracing::info!("coordinator stopped");
        Ok(())
    })
}
