//! Llama 4 as pure computation on candle tensors: config parsing (hub and transformers-5
//! spellings), memory-mapped safetensors checkpoints in hub layout, the text decoder with every
//! Llama-4 detail (interleaved RoPE with llama3 scaling, NoPE layers, chunked attention, L2 qk-norm,
//! attention temperature tuning, sigmoid top-k router scaling the expert input, shared expert), and
//! the vision tower and projector whose outputs replace the prompt's `<|patch|>` embeddings.
//!
//! Boundaries: no networking, no async runtime, no I/O beyond reading (and, for `gen-model` and
//! tests, writing) checkpoints. Routed experts are reached only through [`ExpertBackend`], so that
//! the coordinator can put them in other processes without touching the layer code.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod experts;
pub mod generation_config;
pub mod kernels;
pub mod kv_cache;
pub mod load_progress;
pub mod moe;
pub mod quant;
pub mod rope;
pub mod text_model;
pub mod vision;

mod attend;
mod attention;
mod deviation;
mod layers;

#[cfg(test)]
mod bf16_mode_tests;
#[cfg(test)]
mod parity_tests;

pub use checkpoint::{Checkpoint, WeightSource};
pub use config::{ModelConfig, TextConfig};
#[cfg(any(test, feature = "testing"))]
pub use deviation::Deviation;
pub use error::{Error, ExpertsError, Result, Retry};
pub use experts::ExpertShard;
pub use kv_cache::{KvCache, KvSlots, KvStore};
pub use layers::WeightStorage;
pub use load_progress::LoadProgress;
pub use moe::{ExpertBackend, ExpertBatch, ExpertGroup, ExpertsInFlight, RoutingTrace};
pub use quant::{Activations, LoadPolicy, QuantScheme, QuantScope, Quantize};
pub use text_model::{ImageRows, LayerInFlight, LogitsFor, SequenceStep, Step, TextModel};
pub use vision::VisionModel;
