//! Deterministic random weights: a [`WeightSource`] that generates every tensor from a seed and the
//! tensor's key, so that a checkpoint never has to be stored to be reproduced.
//!
//! Scales keep activations O(1) through the stack (embeddings ~N(0,1), linear layers ~N(0, 1/fan_in),
//! norms at 1), so outputs are neither constant nor NaN and routing spreads over the experts.

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
        let n: usize = shape.iter().product();
        if key.ends_with("norm.weight") {
            return vec![1.0; n];
        }
        // Fan-in of the product each weight takes part in: nn.Linear stores [out, in]; the fused
        // experts are [E, in, out]; embeddings are looked up, not multiplied.
        let std = if key.ends_with("embed_tokens.weight") {
            1.0
        } else if key.contains("feed_forward.experts.") {
            1.0 / (shape[1] as f32).sqrt()
        } else {
            1.0 / (shape[shape.len() - 1] as f32).sqrt()
        };
        let mut rng = SplitMix64::seed_from_u64(self.seed ^ fnv1a(key.as_bytes()));
        (0..n).map(|_| normal(&mut rng) * std).collect()
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
