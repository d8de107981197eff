//! `epserve worker`: one expert worker process.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use epserve_expert_worker::{ExpertSelection, ExpertWorker};
use epserve_model::{Checkpoint, ExpertShard};

use crate::load::{ComputeDtype, LoadProgress, read_config};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Checkpoint directory (hub layout); only the hosted experts' slices are read.
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:50061", env = "EPSERVE_LISTEN")]
    pub listen: String,
    /// Host the I-th of N contiguous shards of the experts (0-based), e.g. `1/4`.
    #[arg(long, conflicts_with = "experts", env = "EPSERVE_SHARD")]
    pub shard: Option<String>,
    /// Host these experts: ids and inclusive ranges, e.g. `0-3,9`.
    #[arg(long, env = "EPSERVE_EXPERTS")]
    pub experts: Option<String>,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "EPSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let selection = match (&args.shard, &args.experts) {
        (Some(s), None) => ExpertSelection::parse_shard(s)?,
        (None, Some(e)) => ExpertSelection::parse_list(e)?,
        _ => bail!("give --shard I/N or --experts LIST"),
    };
    let config = read_config(&args.model)?;
    let experts = selection.resolve(config.text.num_local_experts)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let mut progress = LoadProgress::new(&ckpt, "experts");
    let shard = ExpertShard::load(&config, &ckpt, &experts, args.dtype.into(), &Device::Cpu, &mut || progress.tick())?;
    progress.finish();
    let total_expert_bytes = config.text.expert_bytes_per_layer(candle_core::DType::from(args.dtype).size_in_bytes())
        * config.text.moe_layers().count()
        * config.text.num_local_experts;
    tracing::info!(
        "hosting experts {experts:?} of {} MoE layers: {:.1} MiB resident, {:.1}% of all expert weights",
        config.text.moe_layers().count(),
        shard.resident_bytes() as f64 / 1048576.0,
        100.0 * shard.resident_bytes() as f64 / total_expert_bytes.max(1) as f64
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    runtime.block_on(async move {
        if let Some(addr) = &args.metrics_listen {
            crate::metrics_http::serve(addr).await?;
        }
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr()?;
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {local}");
        let model_name = args.model.display().to_string();
        let worker = Arc::new(ExpertWorker::new(shard, config.text.clone(), model_name, args.dtype.into()));
        epserve_expert_worker::serve(worker, listener, crate::shutdown_signal()).await?;
        tracing::info!("expert worker stopped");
        Ok(())
    })
}
