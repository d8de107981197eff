//! Deterministic random weights: a [`WeightSource`] that generates every tensor from a seed and the
//! tensor's key, so that a checkpoint never has to be stored to be reproduced.
//!
//! Scales keep activations O(1) through the stack (embeddings ~N(0,1), linear layers ~N(0, 1/fan_in),
//! norms at 1), so outputs are neither constant nor NaN and routing spreads over the experts. The
//! vision tower follows the same rule, with small random biases, transformers' `hidden^-0.5` scale
//! for the class and position embeddings, and Kaiming's √2 gain where a GELU follows, so that image
//! features come out at the token embeddings' scale (rms ≈ 0.8–1 against 1).
//!
//! Each tensor comes from its own stream, seeded by the seed and the tensor's key: adding the vision
//! tower changed no text tensor, and a text-only checkpoint (`model.` keys) holds the same numbers as
//! the multimodal one (`language_model.model.` keys), because both spellings are drawn under the
//! multimodal name.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use epserve_model::WeightSource;
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

/// Deterministic random weights: the same seed and key always give the same tensor.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed }
    }

    fn generate(&self, key: &str, shape: &[usize]) -> Vec<f32> {
        let key = stream_key(key);
        let n: usize = shape.iter().product();
        let std = match init(&key, shape) {
            Init::Ones => return vec![1.0; n],
            Init::Normal { std } => std,
        };
        let mut rng = SplitMix64::seed_from_u64(self.seed ^ fnv1a(key.as_bytes()));
        (0..n).map(|_| normal(&mut rng) * std).collect()
    }
}

/// How a tensor is initialised.
enum Init {
    Ones,
    Normal { std: f32 },
}

fn init(key: &str, shape: &[usize]) -> Init {
    let fan_in = |dim: usize| Init::Normal { std: 1.0 / (shape[dim] as f32).sqrt() };
    if key.starts_with("vision_model.") || key.starts_with("multi_modal_projector.") {
        // `layernorm_pre`, `layernorm_post` and the blocks' `*_layernorm`.
        if key.ends_with(".weight") && key.rsplit('.').nth(1).is_some_and(|module| module.contains("layernorm")) {
            Init::Ones
        } else if key.ends_with(".bias") {
            // Non-zero, so that a loader that drops a bias is seen, and small beside the O(1) signal.
            Init::Normal { std: 0.02 }
        } else if key.ends_with("class_embedding") || key.ends_with("positional_embedding_vlm") {
            // transformers' `Llama4VisionModel.__init__`: `scale * torch.randn(...)`, scale = hidden^-0.5.
            let hidden = shape[shape.len() - 1] as f32;
            Init::Normal { std: hidden.powf(-0.5) }
        } else if key.ends_with("mlp.fc1.weight") || key.ends_with("vision_adapter.mlp.fc2.weight") {
            // The layers a GELU follows (both of the adapter's): Kaiming's gain √2 for a rectifier
            // (He et al. 2015), or the adapter's two GELUs leave the image features at a third of the
            // token embeddings' scale.
            let fan_in = shape[shape.len() - 1] as f32;
            Init::Normal { std: (2.0 / fan_in).sqrt() }
        } else {
            // nn.Linear's [out, in].
            fan_in(shape.len() - 1)
        }
    } else if key.ends_with("norm.weight") {
        Init::Ones
    } else if key.ends_with("embed_tokens.weight") {
        // Looked up, not multiplied.
        Init::Normal { std: 1.0 }
    } else if key.contains("feed_forward.experts.") {
        // The fused experts are [E, in, out].
        fan_in(1)
    } else {
        // nn.Linear's [out, in].
        fan_in(shape.len() - 1)
    }
}

/// The name a tensor's random stream is seeded with: the multimodal hub name, also for a text-only
/// (`Llama4ForCausalLM`) checkpoint's `model.` / `lm_head.` keys.
fn stream_key(key: &str) -> Cow<'_, str> {
    if key.starts_with("model.") || key.starts_with("lm_head.") {
        Cow::Owned(format!("language_model.{key}"))
    } else {
        Cow::Borrowed(key)
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> epserve_model::Result<Tensor> {
        Ok(Tensor::from_vec(self.generate(key, shape), shape, device)?.to_dtype(dtype)?)
    }

    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> epserve_model::Result<Tensor> {
        // Only the requested rows become a tensor: a view into the whole generated tensor would keep
        // all of it alive.
        let row: usize = shape[1..].iter().product();
        let all = self.generate(key, shape);
        let mut sub_shape = shape.to_vec();
        sub_shape[0] = len;
        Ok(Tensor::from_slice(&all[start * row..(start + len) * row], sub_shape, device)?.to_dtype(dtype)?)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Uniform in [0, 1), from the top 24 bits of one draw.
pub fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// Standard normal (Box-Muller).
pub fn normal(rng: &mut SplitMix64) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
