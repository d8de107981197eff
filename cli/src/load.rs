//! Loading a checkpoint directory for the commands, with progress on the log, and choosing how the
//! routed experts are reached (`--workers`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;
use epserve_control::Kind;
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts};
use epserve_model::{
    Checkpoint, ExpertShard, LogitsFor, ModelConfig, RoutingTrace, SequenceStep, TextModel, WeightSource, WeightStorage,
};
use epserve_proto::wire::WireDtype;

use crate::control::Control;

/// Compute dtype on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl From<ComputeDtype> for DType {
    fn from(d: ComputeDtype) -> Self {
        match d {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

/// How weight matrices are kept in memory, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightStorageArg {
    /// bf16 checkpoints' experts stay bf16 for f32 compute, widened as they are read.
    AsStored,
    /// Converted to the compute dtype at load.
    Compute,
}

impl From<WeightStorageArg> for WeightStorage {
    fn from(w: WeightStorageArg) -> Self {
        match w {
            WeightStorageArg::AsStored => WeightStorage::AsStored,
            WeightStorageArg::Compute => WeightStorage::Compute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireArg {
    Bf16,
    F32,
}

impl From<WireArg> for WireDtype {
    fn from(w: WireArg) -> Self {
        match w {
            WireArg::Bf16 => WireDtype::Bf16,
            WireArg::F32 => WireDtype::F32,
        }
    }
}

/// Where the routed experts run.
#[derive(Debug, Clone, clap::Args)]
pub struct ExpertArgs {
    /// Expert workers (`host:port`, comma-separated) to run the experts through, instead of in
    /// process. Together they must host every expert of every MoE layer.
    #[arg(long, value_delimiter = ',', env = "EPSERVE_WORKERS")]
    pub workers: Vec<String>,
    /// Dtype of the activations exchanged with the workers.
    #[arg(long, value_enum, default_value = "bf16", env = "EPSERVE_WIRE_DTYPE")]
    pub wire_dtype: WireArg,
    /// Deadline of every exchange with a worker, in milliseconds.
    #[arg(long, default_value_t = 10_000, env = "EPSERVE_EXCHANGE_TIMEOUT_MS")]
    pub exchange_timeout_ms: u64,
    /// How long a step waits, when an expert has no live worker, for one to appear (a worker coming
    /// back, or the placement leader reassigning the expert) before its requests fail with 503.
    #[arg(long, default_value_t = 30_000, env = "EPSERVE_HOST_WAIT_MS")]
    pub host_wait_ms: u64,
    /// With `--registry`: how long start-up waits for every expert to have a live worker.
    #[arg(long, default_value_t = 120_000, env = "EPSERVE_STARTUP_WAIT_MS")]
    pub startup_wait_ms: u64,
    /// Split each step into two micro-batches whose attention and expert phases overlap.
    #[arg(long, env = "EPSERVE_OVERLAP")]
    pub overlap: bool,
    /// How weight matrices (linear layers, and the routed experts when they run in this process)
    /// are kept: `as-stored` keeps a bf16 checkpoint's matrices in bf16 for f32 compute (widened as
    /// they are read: the same results, half the memory and half the bytes a decode step reads);
    /// `compute` converts them to the compute dtype at load.
    #[arg(long, value_enum, default_value = "as-stored", env = "EPSERVE_WEIGHT_STORAGE")]
    pub weight_storage: WeightStorageArg,
}

/// A model ready to run steps, with its experts (and the runtime carrying the worker streams).
pub struct Engine {
    pub config: ModelConfig,
    pub model: TextModel,
    pub experts: ExpertTransport,
    pub overlap: bool,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Engine {
    pub fn step(&self, seqs: &mut [SequenceStep<'_>], which: LogitsFor) -> Result<candle_core::Tensor> {
        self.step_traced(seqs, which, None)
    }

    /// A step that records the routing in `trace` (not with overlap, which does not trace).
    pub fn step_traced(
        &self,
        seqs: &mut [SequenceStep<'_>],
        which: LogitsFor,
        trace: Option<&mut RoutingTrace>,
    ) -> Result<candle_core::Tensor> {
        Ok(if self.overlap {
            epserve_coordinator::overlap::forward_overlapped(&self.model, seqs, &self.experts, which)?
        } else {
            self.model.forward(seqs, &self.experts, which, trace)?
        })
    }
}

/// Logs every 10% of the bytes read, with the rate at the end.
pub struct LoadProgress<'a> {
    src: &'a dyn WeightSource,
    what: &'static str,
    total: u64,
    last_decile: u64,
    started: Instant,
}

impl<'a> LoadProgress<'a> {
    pub fn new(src: &'a dyn WeightSource, what: &'static str) -> Self {
        LoadProgress { src, what, total: src.total_bytes().unwrap_or(0), last_decile: 0, started: Instant::now() }
    }

    pub fn tick(&mut self) {
        // Small checkpoints load in milliseconds: only the final line is worth printing.
        if self.total < 256 << 20 {
            return;
        }
        let read = self.src.bytes_read();
        let decile = read * 10 / self.total;
        if decile > self.last_decile {
            self.last_decile = decile;
            tracing::info!(
                "loading {}: {:.1} of {:.1} MiB read ({}%)",
                self.what,
                read as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                read * 100 / self.total
            );
        }
    }

    pub fn finish(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        let read = self.src.bytes_read() as f64 / 1048576.0;
        tracing::info!("loaded {}: {read:.1} MiB in {secs:.2} s ({:.0} MiB/s)", self.what, read / secs.max(1e-9));
    }
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    ModelConfig::from_file(&path).with_context(|| format!("reading {}", path.display()))
}

/// Loads the non-expert weights, and the experts either from the checkpoint (no `--workers`, no
/// registry) or through the workers — listed, or found in the control plane — whose streams live on
/// `runtime`.
pub fn engine_parts(
    dir: &Path,
    dtype: ComputeDtype,
    experts: &ExpertArgs,
    runtime: Option<&tokio::runtime::Runtime>,
    control: Option<&Control>,
) -> Result<(ModelConfig, TextModel, ExpertTransport)> {
    let config = read_config(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let device = Device::Cpu;
    let mut progress = LoadProgress::new(&ckpt, "weights");
    let storage = experts.weight_storage.into();
    let model = TextModel::load(&config, &ckpt, dtype.into(), storage, &device, &mut |_, _| progress.tick())?;
    tracing::info!(
        "weight matrices: {:.1} MiB resident (--weight-storage {}, compute {:?})",
        model.matrix_bytes() as f64 / 1048576.0,
        experts.weight_storage.to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned()),
        DType::from(dtype)
    );
    let transport = match runtime {
        None => {
            let all: Vec<u32> = (0..config.text.num_local_experts as u32).collect();
            let shard =
                ExpertShard::load(&config, &ckpt, &all, dtype.into(), storage, &device, &mut || progress.tick())?;
            tracing::info!("routed experts in process: {:.1} MiB resident", shard.resident_bytes() as f64 / 1048576.0);
            ExpertTransport::Local(shard)
        }
        Some(runtime) => {
            let cfg = GrpcConfig {
                wire: experts.wire_dtype.into(),
                exchange_timeout: Duration::from_millis(experts.exchange_timeout_ms),
                host_wait: Duration::from_millis(experts.host_wait_ms),
                ..GrpcConfig::new(experts.workers.clone())
            };
            let grpc = match control {
                Some(control) if experts.workers.is_empty() => {
                    let (members, placement) = {
                        let _guard = control.runtime.enter();
                        (control.plane.instances(Kind::Worker), control.plane.watch_placement())
                    };
                    let wait = Duration::from_millis(experts.startup_wait_ms);
                    tracing::info!("waiting for expert workers in the registry (up to {wait:?})");
                    runtime.block_on(GrpcExperts::follow(&cfg, &config.text, dtype.into(), members, placement, wait))?
                }
                _ => runtime.block_on(GrpcExperts::connect(&cfg, &config.text, dtype.into()))?,
            };
            tracing::info!("experts through workers {:?}, {} wire", grpc.workers(), cfg.wire);
            ExpertTransport::Grpc(grpc)
        }
    };
    progress.finish();
    Ok((config, model, transport))
}

/// A one-process engine for the offline commands; with `--workers` it starts a small runtime for
/// the worker streams.
pub fn engine(dir: &Path, dtype: ComputeDtype, experts: &ExpertArgs) -> Result<Engine> {
    let runtime = if experts.workers.is_empty() {
        None
    } else {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("epserve-io")
                .enable_all()
                .build()?,
        )
    };
    let (config, model, experts_transport) = engine_parts(dir, dtype, experts, runtime.as_ref(), None)?;
    Ok(Engine { config, model, experts: experts_transport, overlap: experts.overlap, _runtime: runtime })
}
