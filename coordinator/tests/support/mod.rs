//! What the engine tests share: the tiny fixture with every expert in process.

use candle_core::{DType, Device};
use epserve_coordinator::ExpertTransport;
use epserve_model::{Checkpoint, ExpertShard, ModelConfig, TextModel, WeightStorage};
use epserve_testkit::fixtures;

/// `tiny-llama4`'s config, text model and all 16 experts (local), in f32 with weights as stored.
pub fn load_tiny() -> (ModelConfig, TextModel, ExpertTransport) {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let model =
        TextModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {}).expect("model");
    let all: Vec<u32> = (0..cfg.text.num_local_experts as u32).collect();
    let experts = ExpertShard::load(&cfg, &ckpt, &all, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
        .expect("experts");
    (cfg, model, ExpertTransport::Local(experts))
}
