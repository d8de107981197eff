//! Loading a checkpoint for serving, and choosing how its routed experts are reached: in process
//! (no workers given, no control plane), through the listed workers, or through the workers the
//! control plane lists. [`StandaloneModel`] is the same model stepped directly, for the offline
//! commands (`logits`, `generate`, `decode-bench`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use epserve_control::{ControlConnection, Kind};
use epserve_imaging::{ProcessorConfig, Tiles};
use epserve_model::generation_config::eos_token_ids;
use epserve_model::{
    Activations, Checkpoint, ExpertShard, LoadPolicy, LoadProgress, LogitsFor, ModelConfig, RoutingTrace, SequenceStep,
    TextModel, VisionModel,
};

use crate::errors::TransportError;
use crate::images::{ImageSpec, Vision};
use crate::transport::{ExpertTransport, GrpcConfig, GrpcExperts};

/// What to load and where the routed experts run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Checkpoint directory (hub layout).
    pub dir: PathBuf,
    /// Compute dtype.
    pub dtype: DType,
    /// How weight matrices (and the routed experts, when they run in process) are kept in memory:
    /// their dtype, and which are quantized at load.
    pub weights: LoadPolicy,
    /// The workers (`grpc.workers`, when listed) and how exchanges with them go. No workers and no
    /// control plane: the experts run in process.
    pub grpc: GrpcConfig,
    /// With the control plane: how long start-up waits for every expert to have a live worker.
    pub startup_wait: Duration,
}

impl LoadConfig {
    /// Experts in process, default exchange settings.
    pub fn local(dir: impl Into<PathBuf>, dtype: DType) -> Self {
        LoadConfig {
            dir: dir.into(),
            dtype,
            weights: LoadPolicy::default(),
            grpc: GrpcConfig::new(Vec::new()),
            startup_wait: Duration::from_secs(120),
        }
    }
}

/// Why a model could not be loaded or its experts reached.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: epserve_model::Error,
    },
    #[error("loading the checkpoint {}", dir.display())]
    Weights {
        dir: PathBuf,
        #[source]
        source: epserve_model::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("starting the runtime for the worker streams")]
    Runtime(#[source] std::io::Error),
    #[error("the loading task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("reading the image processor settings in {}", dir.display())]
    Processor {
        dir: PathBuf,
        #[source]
        source: epserve_imaging::ImageError,
    },
    #[error("config.json has a vision_config but no image_token_index: the vision tower cannot be used")]
    NoImageToken,
}

/// A loaded model and its routed experts, ready to be stepped.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Where generation stops: `generation_config.json`'s EOS ids, else `config.json`'s.
    pub eos_token_ids: Vec<u32>,
    pub model: TextModel,
    /// The vision tower, for a multimodal checkpoint.
    pub vision: Option<Vision>,
    pub experts: ExpertTransport,
}

/// `config.json` of the checkpoint in `dir`.
pub fn read_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    let path = dir.join("config.json");
    ModelConfig::from_file(&path).map_err(|source| LoadError::Config { path, source })
}

/// Loads the non-expert weights, and reaches the routed experts: from the checkpoint (no workers
/// listed, no `control`), through the listed workers, or through the workers registered in the
/// control plane (waiting up to `startup_wait` for every expert to have one). The worker streams live
/// on the runtime this runs on.
pub async fn load_model(config: &LoadConfig, control: Option<&ControlConnection>) -> Result<LoadedModel, LoadError> {
    let remote = !config.grpc.workers.is_empty() || control.is_some();
    let load = config.clone();
    let (model_config, model, vision, shard) =
        tokio::task::spawn_blocking(move || load_weights(&load, !remote)).await??;
    let experts = match shard {
        Some(shard) => ExpertTransport::Local(shard),
        None => {
            let grpc = match control {
                Some(control) if config.grpc.workers.is_empty() => {
                    let (members, placement) = (control.instances(Kind::Worker), control.watch_placement());
                    tracing::info!("waiting for expert workers in the registry (up to {:?})", config.startup_wait);
                    GrpcExperts::follow(
                        &config.grpc,
                        &model_config.text,
                        config.dtype,
                        members,
                        placement,
                        config.startup_wait,
                    )
                    .await?
                }
                _ => GrpcExperts::connect(&config.grpc, &model_config.text, config.dtype).await?,
            };
            let links: Vec<String> =
                grpc.link_transports().iter().map(|(addr, medium)| format!("{addr} over {medium}")).collect();
            tracing::info!(
                "experts through workers [{}], {} wire, --transport {}",
                links.join(", "),
                config.grpc.wire,
                config.grpc.shm.transport.as_str()
            );
            ExpertTransport::Grpc(grpc)
        }
    };
    let eos_token_ids = eos_token_ids(&config.dir, &model_config.text)
        .map_err(|source| LoadError::Config { path: config.dir.join("generation_config.json"), source })?;
    Ok(LoadedModel { config: model_config, eos_token_ids, model, vision, experts })
}

type LoadedWeights = (ModelConfig, TextModel, Option<Vision>, Option<ExpertShard>);

/// Reads the config and the non-expert weights (the vision tower's too), and every routed expert
/// when `local_experts`. Blocking.
fn load_weights(config: &LoadConfig, local_experts: bool) -> Result<LoadedWeights, LoadError> {
    let model_config = read_config(&config.dir)?;
    let weights = |source| LoadError::Weights { dir: config.dir.clone(), source };
    let ckpt = Checkpoint::open(&config.dir).map_err(weights)?;
    let device = Device::Cpu;
    let mut progress = LoadProgress::new(&ckpt, "weights");
    let (dtype, policy) = (config.dtype, config.weights);
    let model =
        TextModel::load(&model_config, &ckpt, dtype, policy, &device, &mut |_, _| progress.tick()).map_err(weights)?;
    tracing::info!(
        "weight matrices: {:.1} MiB resident (weight storage {:?}, quantization {}, compute {dtype:?})",
        model.matrix_bytes() as f64 / 1048576.0,
        policy.storage,
        match (ckpt.quantization(), policy.quantize) {
            (Some(ct), _) => format!("pre-quantized: {}", ct.description),
            (None, Some(q)) => format!("{} of {}", q.scheme, q.scope),
            (None, None) => "none".into(),
        },
    );
    suggest_bf16_mode(&ckpt, dtype, policy);
    let vision = load_vision(config, &model_config, &ckpt)?;
    let shard = if local_experts {
        let all: Vec<u32> = (0..model_config.text.num_local_experts as u32).collect();
        let shard = ExpertShard::load(&model_config, &ckpt, &all, dtype, policy, &device, &mut || progress.tick())
            .map_err(weights)?;
        tracing::info!("routed experts in process: {:.1} MiB resident", shard.resident_bytes() as f64 / 1048576.0);
        Some(shard)
    } else {
        None
    };
    progress.finish();
    Ok((model_config, model, vision, shard))
}

/// Says so at load where `--activations bf16` is what we recommend for production: exact f32
/// compute over unquantized weights on a CPU whose `vdpbf16ps` does more multiply-adds per second
/// than its f32 FMAs (AMD Zen 4 class; measured once) or that has AMX-BF16 tiles (Intel Xeon 4th
/// generation and later). Its figures and error: docs/model.md, "bf16
/// mode". A checkpoint of f32 weights gains nothing from it (the mode applies to bf16 weights).
fn suggest_bf16_mode(ckpt: &Checkpoint, dtype: DType, policy: LoadPolicy) {
    if policy.activations == Activations::F32
        && dtype == DType::F32
        && policy.quantize.is_none()
        && ckpt.quantization().is_none()
        && epserve_model::kernels::bf16_products_of_many_rows()
    {
        tracing::info!(
            "this CPU multiplies bf16 faster than f32 (AVX512-BF16, or AMX tiles): for a bf16 checkpoint, `--activations bf16` \
             (env EPSERVE_ACTIVATIONS=bf16) is the recommended production setting: on AMD Zen 4, 1.2-1.5x the exact f32 \
             mode's batched decode and 1.6x its prefill (on AMD Zen 5, 1.0-1.1x and 1.6x, and 0.8x at batch 1 unless EPSERVE_BF16_ROWS=batched keeps one-row products exact; \
             on Intel Xeon with AMX tiles, 1.1-1.2x batched decode and 1.6x prefill), logits \
             within 0.09 of the reference on the test checkpoints (docs/model.md, \"bf16 mode\")"
        );
    }
}

/// The vision tower and the image processor settings of a multimodal checkpoint; `None` for text.
fn load_vision(
    config: &LoadConfig,
    model_config: &ModelConfig,
    ckpt: &Checkpoint,
) -> Result<Option<Vision>, LoadError> {
    let weights = |source| LoadError::Weights { dir: config.dir.clone(), source };
    let Some(model) =
        VisionModel::load(model_config, ckpt, config.dtype, config.weights.storage, &Device::Cpu).map_err(weights)?
    else {
        return Ok(None);
    };
    let (Some(vision_config), Some(image_token)) = (&model_config.vision, model_config.image_token_index) else {
        return Err(LoadError::NoImageToken);
    };
    let processor = ProcessorConfig::from_checkpoint(&config.dir)
        .map_err(|source| LoadError::Processor { dir: config.dir.clone(), source })?;
    tracing::info!(
        "vision tower: {} layers, {}×{} tiles, {} features per tile",
        vision_config.num_hidden_layers,
        vision_config.image_size,
        vision_config.image_size,
        model.tokens_per_tile()
    );
    Ok(Some(Vision::new(model, processor, &model_config.text, vision_config, image_token)))
}

/// A model and its experts stepped directly, one forward pass at a time, without the engine's
/// scheduler: the offline commands' model. It keeps a small runtime for the streams of the workers,
/// when there are any.
#[derive(Debug)]
pub struct StandaloneModel {
    pub config: ModelConfig,
    pub model: TextModel,
    /// The vision tower, for a multimodal checkpoint.
    pub vision: Option<Vision>,
    pub experts: ExpertTransport,
    /// Split steps into two overlapped micro-batches.
    pub overlap: bool,
    /// Carries the worker streams.
    _runtime: tokio::runtime::Runtime,
}

impl StandaloneModel {
    /// Loads the model with its experts in process, or reached through `config.grpc.workers`.
    /// Blocks: call it outside any async context.
    pub fn load(config: &LoadConfig, overlap: bool) -> Result<Self, LoadError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("epserve-io")
            .enable_all()
            .build()
            .map_err(LoadError::Runtime)?;
        let LoadedModel { config, model, vision, experts, .. } = runtime.block_on(load_model(config, None))?;
        Ok(StandaloneModel { config, model, vision, experts, overlap, _runtime: runtime })
    }

    /// The placeholder positions of `prompt` and the features of `images` that fill them, in one
    /// batch, for a first step that holds the whole prompt. `None` without images.
    pub fn image_features(&self, prompt: &[u32], images: &[Tiles]) -> Result<Option<(Vec<u32>, Tensor)>, String> {
        if images.is_empty() {
            return Ok(None);
        }
        let spec = self.vision.as_ref().map(|v| v.spec);
        let positions = ImageSpec::placeholders(spec.as_ref(), prompt, images)?;
        let vision = self.vision.as_ref().ok_or("this model has no vision tower")?;
        let features = vision.encode(&images.iter().collect::<Vec<_>>()).map_err(|e| e.to_string())?;
        let features = Tensor::cat(&features, 0).map_err(|e| e.to_string())?;
        Ok(Some((positions, features)))
    }

    pub fn step(&self, seqs: &mut [SequenceStep<'_>], which: LogitsFor) -> epserve_model::Result<Tensor> {
        self.step_traced(seqs, which, None)
    }

    /// A step that records the routing in `trace` (not with overlap, which does not trace).
    pub fn step_traced(
        &self,
        seqs: &mut [SequenceStep<'_>],
        which: LogitsFor,
        trace: Option<&mut RoutingTrace>,
    ) -> epserve_model::Result<Tensor> {
        crate::overlap::forward_step(&self.model, seqs, &self.experts, which, self.overlap, trace)
    }
}
