//! The coordinator's side of the expert-parallel tests, in the test process: the attention side of
//! `tiny-llama4` loaded once, its experts in process (as stored, or under any load policy), or
//! behind the gRPC transport to running workers.

use std::time::Duration;

use candle_core::{DType, Device};
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts, ShmConfig, WorkerTransport};
use epserve_model::{
    Checkpoint, ExpertBackend, ExpertShard, LoadPolicy, LogitsFor, ModelConfig, SequenceStep, TextModel, WeightStorage,
};
use epserve_proto::wire::WireDtype;

use super::{Process, tiny_fixture};

pub struct Coordinator {
    pub runtime: tokio::runtime::Runtime,
    pub config: ModelConfig,
    pub model: TextModel,
    /// Every expert in process, as stored.
    pub local: ExpertTransport,
}

impl Coordinator {
    pub fn new() -> Self {
        let dir = tiny_fixture();
        let config = ModelConfig::from_file(&dir.join("config.json")).expect("config");
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        let model = TextModel::load(&config, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {})
            .expect("model");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let local = Self::shard(&config, WeightStorage::AsStored.into());
        Coordinator { runtime, config, model, local }
    }

    /// Every expert of the fixture in process, kept as `policy` says.
    fn shard(config: &ModelConfig, policy: LoadPolicy) -> ExpertTransport {
        let ckpt = Checkpoint::open(&tiny_fixture()).expect("checkpoint");
        let all: Vec<u32> = (0..config.text.num_local_experts as u32).collect();
        let shard =
            ExpertShard::load(config, &ckpt, &all, DType::F32, policy, &Device::Cpu, &mut || {}).expect("experts");
        ExpertTransport::Local(shard)
    }

    /// Every expert in process, kept as `policy` says (e.g. quantized).
    pub fn local_with(&self, policy: LoadPolicy) -> ExpertTransport {
        Self::shard(&self.config, policy)
    }

    /// The workers over gRPC only (shared memory never offered).
    pub fn grpc(&self, workers: &[Process], wire: WireDtype, timeout: Duration) -> Result<GrpcExperts, String> {
        let shm = ShmConfig { transport: WorkerTransport::Grpc, ..ShmConfig::default() };
        self.connect(workers, wire, timeout, shm)
    }

    /// The workers over the worker links with `shm` as their shared-memory settings.
    pub fn connect(
        &self,
        workers: &[Process],
        wire: WireDtype,
        timeout: Duration,
        shm: ShmConfig,
    ) -> Result<GrpcExperts, String> {
        let cfg = GrpcConfig {
            wire,
            exchange_timeout: timeout,
            shm,
            ..GrpcConfig::new(workers.iter().map(|w| w.addr.clone()).collect())
        };
        self.runtime.block_on(GrpcExperts::connect(&cfg, &self.config.text, DType::F32)).map_err(|e| e.to_string())
    }

    /// Logits of every position of `tokens`, from an empty cache.
    pub fn logits(&self, experts: &dyn ExpertBackend, tokens: &[u32]) -> epserve_model::Result<Vec<Vec<f32>>> {
        let mut cache = self.model.new_cache();
        let logits = self.model.forward(&mut [SequenceStep::new(tokens, &mut cache)], experts, LogitsFor::All, None)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    /// `n` greedy tokens after `prompt`, one decode step each.
    pub fn greedy(&self, experts: &dyn ExpertBackend, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut cache = self.model.new_cache();
        let mut next = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let logits = self
                .model
                .forward(&mut [SequenceStep::new(&next, &mut cache)], experts, LogitsFor::Last, None)
                .expect("step");
            let row = logits.to_vec2::<f32>().expect("logits").remove(0);
            let t = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).expect("row");
            out.push(t);
            next = vec![t];
        }
        out
    }
}

/// The largest absolute difference between two runs' logits.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}
