//! `epserve coordinator`: the serving engine behind the `CoordinatorService` gRPC API.

use std::path::PathBuf;

use anyhow::{Result, bail};
use epserve_coordinator::kv_pool::KvCapacity;
use epserve_coordinator::{CoordinatorConfig, EngineSizing};

use crate::control::JoinArgs;
use crate::load::{ComputeDtype, ExpertArgs};

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
    /// Requests accepted and not yet running at most; past it `Generate` answers
    /// `RESOURCE_EXHAUSTED` (the gateway tries another coordinator, then answers 429).
    #[arg(long, default_value_t = 1024, env = "EPSERVE_MAX_WAITING")]
    pub max_waiting: usize,
    /// Longest sequence (prompt + output); default: the model's limit, capped by the KV capacity.
    #[arg(long, env = "EPSERVE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "EPSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// On SIGTERM/SIGINT: refuse new requests and let the running ones finish for at most this long.
    #[arg(long, default_value_t = 30, env = "EPSERVE_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: u64,
    #[command(flatten)]
    pub control: JoinArgs,
    #[command(flatten)]
    pub routing: crate::eplb::RecordRoutingArgs,
    #[command(flatten)]
    pub eplb: crate::eplb_live::EplbArgs,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    if args.kv_block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 || args.max_waiting == 0 {
        bail!("--kv-block-size, --max-batch-tokens, --max-running and --max-waiting must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    let expert_load = crate::metrics_endpoint::ExpertLoadSlot::default();
    if let Some(addr) = &args.metrics_listen {
        runtime.block_on(crate::metrics_endpoint::serve_with(addr, Some(expert_load.clone())))?;
    }
    let auto = args.eplb.auto()?;
    let load = args.experts.load_config(&args.model, args.dtype)?;
    let recording = args.routing.start(&args.model)?;
    // One identity for both ends: serving the gateways and connecting to the workers.
    let server_tls = load.grpc.tls.clone();
    let grace = std::time::Duration::from_secs(args.shutdown_grace_seconds);
    let config = CoordinatorConfig {
        load,
        listen: args.listen,
        sizing: EngineSizing {
            kv_capacity: match args.kv_capacity_mib {
                Some(mib) => KvCapacity::Bytes(mib << 20),
                None => KvCapacity::Tokens(args.kv_capacity_tokens),
            },
            kv_block_size: args.kv_block_size,
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            max_waiting: args.max_waiting,
            max_model_len: args.max_model_len,
        },
        overlap: args.experts.overlap,
        control: args.control.connect()?,
    };
    let served = runtime.block_on(async move {
        let coordinator = epserve_coordinator::start_with_tls(config, server_tls)
            .await?
            .with_shutdown_grace(grace)
            .with_auto_rebalancing(auto);
        if let Some(balancer) = coordinator.balancer() {
            let _ = expert_load.set(balancer.clone());
        }
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {}", coordinator.local_addr());
        Ok(coordinator.serve(crate::shutdown_signal()).await?)
    });
    if let Some(recording) = recording {
        recording.stop()?;
    }
    served
}
