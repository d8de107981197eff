//! Random-weight Llama-4 checkpoints for demos, tests and benchmarks: named shapes
//! ([`Preset`], each with a vision tower, [`VisionShape`]), weights generated deterministically from
//! a seed ([`RandomWeights`]), a byte-level BPE tokenizer in Llama 4's layout ([`tokenizer`]), and
//! [`write_checkpoint`], which puts them together in hub layout (what `epserve gen-model` and
//! `epserve up`'s demo checkpoint write), optionally with routers skewed towards Zipf popularity
//! ([`RouterSkew`]).
//!
//! Boundaries: nothing here is on a serving path. The servers never depend on this crate (their
//! sampling has its own generator); it depends on `epserve-model` only for the config, the tensor
//! key layout and the safetensors writer.

mod checkpoint;
mod error;
mod preset;
mod skew;
pub mod tokenizer;
mod weights;

pub use checkpoint::{CheckpointOptions, StoredDtype, write_checkpoint};
pub use error::{Error, Result};
pub use preset::{NAMED_SPECIAL_TOKENS, Preset, VisionShape, text_tensor_specs, vision_tensor_specs};
pub use skew::{RouterSkew, SKEW_FILE};
pub use weights::{RandomWeights, normal, uniform};
