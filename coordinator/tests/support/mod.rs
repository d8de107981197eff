//! What the engine tests share: the tiny fixture with every expert in process, prompts, and the
//! outcome of a request.

#![allow(dead_code)]

use candle_core::{DType, Device};
use epserve_coordinator::ExpertTransport;
use epserve_coordinator::engine::{Event, FinishReason};
use epserve_model::{Checkpoint, ExpertShard, ModelConfig, TextModel, WeightStorage};
use epserve_testkit::fixtures;
use tokio::sync::mpsc::Receiver;

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

/// A prompt of `len` tokens (BOS first), different for each `salt`.
pub fn prompt(len: usize, salt: usize) -> Vec<u32> {
    let mut p = vec![480];
    p.extend((1..len).map(|i| ((i * 37 + salt * 101) % 470) as u32));
    p
}

/// The tokens a request got and why it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub reason: FinishReason,
}

/// Every event of a request until it finishes; an error finish fails the test.
pub fn collect(mut rx: Receiver<Event>) -> Outcome {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine finishes every request") {
            Event::Token(s) => tokens.push(s.token),
            Event::Finished { reason, message, .. } => {
                assert_ne!(reason, FinishReason::Error, "{message:?}");
                return Outcome { tokens, reason };
            }
        }
    }
}
