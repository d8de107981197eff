//! The flags of every command that loads a model: the compute dtype, how weights are kept, and
//! where the routed experts run (`--workers`, the exchange settings).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use candle_core::DType;
use epserve_coordinator::{GrpcConfig, LoadConfig, ShmConfig, StandaloneModel, WorkerTransport};
use epserve_model::{Activations, LoadPolicy, QuantScheme, QuantScope, Quantize, WeightStorage};
use epserve_proto::wire::WireDtype;

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

/// On-the-fly quantization of weight matrices at load (docs/model.md, "Quantized weights").
#[derive(Debug, Clone, clap::Args)]
pub struct QuantArgs {
    /// Quantize weight matrices at load: `int8` (8.5 bits a weight) or `int4` (4.5 bits a weight),
    /// with one f16 scale per 32 weights. Pre-quantized checkpoints are read as stored without it.
    #[arg(long, value_parser = clap::value_parser!(QuantScheme), env = "EPSERVE_QUANTIZE")]
    pub quantize: Option<QuantScheme>,
    /// Which matrices `--quantize` applies to besides the routed experts (always): a comma list of
    /// `shared`, `attention`, `dense`, `lm-head`, or `all`. The router, norms, embeddings and the
    /// vision tower are never quantized.
    #[arg(long, default_value = "routed,shared", value_parser = clap::value_parser!(QuantScope), env = "EPSERVE_QUANTIZE_SCOPE")]
    pub quantize_scope: QuantScope,
    /// What rows are multiplied as: `f32` computes exactly what the (dequantised) weights give;
    /// `int8`, against int8 and int4 weights, quantizes them per 32 values and uses integer dot
    /// products (AVX512-VNNI or AVX2) for products of up to 8 rows; `bf16`, against bf16 weights,
    /// rounds them to bf16 and uses `vdpbf16ps` (AVX512-BF16). Both are faster and less exact
    /// (their error: docs/model.md, "Int8 activations", "bf16 mode").
    #[arg(long, default_value = "f32", value_parser = clap::value_parser!(Activations), env = "EPSERVE_ACTIVATIONS")]
    pub activations: Activations,
}

impl QuantArgs {
    /// The same settings as flags, for a component `epserve up` starts.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = vec!["--activations".to_owned(), self.activations.to_string()];
        if let Some(scheme) = self.quantize {
            flags.extend([
                "--quantize".into(),
                scheme.to_string(),
                "--quantize-scope".into(),
                self.quantize_scope.to_string(),
            ]);
        }
        flags
    }

    /// The load policy for matrices kept as `storage` says.
    pub fn policy(&self, storage: WeightStorage) -> LoadPolicy {
        LoadPolicy {
            storage,
            quantize: self.quantize.map(|scheme| Quantize { scheme, scope: self.quantize_scope }),
            activations: self.activations,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireArg {
    Bf16,
    F32,
    /// 8-bit with one f32 scale per row: about half of bf16's bytes.
    Int8,
}

impl From<WireArg> for WireDtype {
    fn from(w: WireArg) -> Self {
        match w {
            WireArg::Bf16 => WireDtype::Bf16,
            WireArg::F32 => WireDtype::F32,
            WireArg::Int8 => WireDtype::Int8,
        }
    }
}

/// How a coordinator reaches its workers (docs/operations.md, "Expert transport").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// Shared memory with every worker that accepts the handshake (same host), gRPC with the others.
    Auto,
    /// Shared memory with every worker; start-up fails naming a worker that cannot use it.
    Shm,
    /// gRPC only, shared memory never tried.
    Grpc,
}

impl From<TransportArg> for WorkerTransport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => WorkerTransport::Auto,
            TransportArg::Shm => WorkerTransport::Shm,
            TransportArg::Grpc => WorkerTransport::Grpc,
        }
    }
}

impl std::fmt::Display for TransportArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(WorkerTransport::from(*self).as_str())
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
    /// How exchanges reach the workers: `auto` uses shared-memory rings with every worker on this
    /// host that accepts the handshake and gRPC with the others, `shm` requires shared memory with
    /// every worker (start-up fails naming one that cannot), `grpc` never tries shared memory.
    #[arg(long, value_enum, default_value = "auto", env = "EPSERVE_TRANSPORT")]
    pub transport: TransportArg,
    /// The directory (a tmpfs) where shared-memory segments are created; workers must use the same.
    #[arg(long, default_value = "/dev/shm", env = "EPSERVE_SHM_DIR")]
    pub shm_dir: PathBuf,
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
    #[command(flatten)]
    pub quant: QuantArgs,
    /// The identity worker links are made with (and, for a coordinator, the one it serves with).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

impl ExpertArgs {
    /// What to load from `dir` and how to reach the experts.
    pub fn load_config(&self, dir: &Path, dtype: ComputeDtype) -> Result<LoadConfig> {
        Ok(LoadConfig {
            dir: dir.to_path_buf(),
            dtype: dtype.into(),
            weights: self.quant.policy(self.weight_storage.into()),
            grpc: GrpcConfig {
                wire: self.wire_dtype.into(),
                exchange_timeout: Duration::from_millis(self.exchange_timeout_ms),
                host_wait: Duration::from_millis(self.host_wait_ms),
                tls: self.tls.load()?,
                shm: ShmConfig { transport: self.transport.into(), dir: self.shm_dir.clone(), ..ShmConfig::default() },
                ..GrpcConfig::new(self.workers.clone())
            },
            startup_wait: Duration::from_millis(self.startup_wait_ms),
        })
    }

    /// The model in `dir`, stepped directly by an offline command.
    pub fn standalone(&self, dir: &Path, dtype: ComputeDtype) -> Result<StandaloneModel> {
        Ok(StandaloneModel::load(&self.load_config(dir, dtype)?, self.overlap)?)
    }
}
