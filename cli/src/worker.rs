//! `epserve worker`: one expert worker process.

use std::path::PathBuf;

use anyhow::{Result, bail};
use epserve_expert_worker::{ExchangeLimits, ExpertSelection, WorkerConfig};

use crate::control::JoinArgs;
use crate::load::{ComputeDtype, QuantArgs, WeightStorageArg};

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
    /// How the experts' weights are kept: `as-stored` keeps a bf16 checkpoint's experts in bf16
    /// for f32 compute (widened as they are read: the same results at half the memory);
    /// `compute` converts them to the compute dtype at load.
    #[arg(long, value_enum, default_value = "as-stored", env = "EPSERVE_WEIGHT_STORAGE")]
    pub weight_storage: WeightStorageArg,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Exchanges of one coordinator stream taken in at once; past it the stream is not read (HTTP/2
    /// flow control holds the sender back).
    #[arg(long, default_value_t = 16, env = "EPSERVE_MAX_EXCHANGES_PER_STREAM")]
    pub max_exchanges_per_stream: usize,
    /// Request payload MiB in flight over all streams (a larger frame runs alone).
    #[arg(long, default_value_t = 512, env = "EPSERVE_EXCHANGE_MEMORY_MB")]
    pub exchange_memory_mb: usize,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "EPSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// On SIGTERM/SIGINT: leave the registry, then wait at most this long until no coordinator
    /// routes here (nothing in flight, streams closed or idle for 1 s) before exiting.
    #[arg(long, default_value_t = 30, env = "EPSERVE_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: u64,
    /// Whether coordinators on this host may move their exchanges onto shared memory: `auto` and
    /// `shm` accept their handshake, `grpc` refuses it (every exchange then goes over gRPC). The
    /// coordinator's own `--transport` decides whether it asks.
    #[arg(long, value_enum, default_value = "auto", env = "EPSERVE_TRANSPORT")]
    pub transport: crate::load::TransportArg,
    /// The directory coordinators create their shared-memory segments in (a tmpfs); it must be
    /// the same path as the coordinators'.
    #[arg(long, default_value = "/dev/shm", env = "EPSERVE_SHM_DIR")]
    pub shm_dir: PathBuf,
    #[command(flatten)]
    pub control: JoinArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let selection = match (&args.shard, &args.experts) {
        (Some(s), None) => ExpertSelection::parse_shard(s)?,
        (None, Some(e)) => ExpertSelection::parse_list(e)?,
        // With a registry a worker may start empty: a spare that the placement leader fills.
        (None, None) if args.control.registry().is_some() => ExpertSelection::List(Vec::new()),
        _ => bail!("give --shard I/N or --experts LIST"),
    };
    let metrics_listen = args.metrics_listen;
    let grace = std::time::Duration::from_secs(args.shutdown_grace_seconds);
    let tls = args.tls.load()?;
    let config = WorkerConfig {
        control: args.control.connect()?,
        model: args.model,
        listen: args.listen,
        selection,
        dtype: args.dtype.into(),
        weights: args.quant.policy(args.weight_storage.into()),
        limits: ExchangeLimits { per_stream: args.max_exchanges_per_stream, bytes: args.exchange_memory_mb << 20 },
        shm_dir: (args.transport != crate::load::TransportArg::Grpc).then_some(args.shm_dir),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    runtime.block_on(async move {
        if let Some(addr) = &metrics_listen {
            crate::metrics_endpoint::serve(addr).await?;
        }
        let worker = epserve_expert_worker::start_with_tls(config, tls).await?.with_shutdown_grace(grace);
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {}", worker.local_addr());
        Ok(worker.serve(crate::shutdown_signal()).await?)
    })
}
