//! Rotary position embedding as Llama 4 applies it: complex pairs (dims 2i, 2i+1 — "interleaved",
//! not rotate-half) with llama3 frequency scaling. Tables are computed on the fly for the positions
//! at hand, never for `max_position_embeddings` (10M for Scout).

use candle_core::{DType, Device, Tensor};

use crate::config::{Llama3RopeScaling, RopeConfig};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// θ_i for i in 0..head_dim/2, after llama3 scaling.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        // transformers `_compute_default_rope_parameters`: 1 / base^(arange(0, d, 2) / d) in fp32.
        let half = head_dim / 2;
        let base = cfg.theta as f32;
        let mut inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        if let Some(s) = &cfg.llama3 {
            for f in &mut inv_freq {
                *f = llama3_scale(*f, s);
            }
        }
        Rope { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim / 2]`, in f32 on `device`.
    pub fn cos_sin(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in positions {
            for &f in &self.inv_freq {
                // HF multiplies position and frequency in fp32 (`inv_freq @ position_ids.float()`).
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (n, half), device)?.to_dtype(DType::F32)?, Tensor::from_vec(sin, (n, half), device)?))
    }
}

/// `_compute_llama3_parameters`: keep high frequencies, divide low ones by `factor`, blend the band
/// between. With Scout's 16/1/1 both thresholds coincide and the band is empty; computing it
/// branch-wise avoids HF's 0/0 (which it discards with `where`).
fn llama3_scale(inv_freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old_context = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_context / s.low_freq_factor as f32;
    let high_freq_wavelen = old_context / s.high_freq_factor as f32;
    let factor = s.factor as f32;
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else if wavelen < high_freq_wavelen {
        inv_freq
    } else {
        let smooth =
            (old_context / wavelen - s.low_freq_factor as f32) / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
        (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scout(factor: f64, low: f64, high: f64) -> RopeConfig {
        RopeConfig {
            theta: 500_000.0,
            llama3: Some(Llama3RopeScaling {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: 8192,
            }),
        }
    }

    fn close(a: f32, b: f32) -> bool {
        ((a - b) / b).abs() < 1e-5
    }

    /// Values from the reference (§2.4): the 16/1/1 revision of Scout.
    #[test]
    fn scout_16_1_1_bands() {
        let r = Rope::new(&scout(16.0, 1.0, 1.0), 128);
        let f = r.inv_freq();
        assert_eq!(f[0], 1.0);
        assert!(close(f[1], 0.814_617_2), "{}", f[1]);
        assert!(close(f[34], 9.384_738_5e-4), "{}", f[34]);
        assert!(close(f[35], 4.778_106e-5), "{}", f[35]);
        assert!(close(f[63], 1.534_463e-7), "{}", f[63]);
    }

    /// The 8/4/1 revision has a smoothed band (29..=34) and divides the rest by 8.
    #[test]
    fn scout_8_4_1_bands() {
        let plain = Rope::new(&RopeConfig { theta: 500_000.0, llama3: None }, 128);
        let r = Rope::new(&scout(8.0, 1.0, 4.0), 128);
        assert_eq!(r.inv_freq()[28], plain.inv_freq()[28]);
        for i in 29..=34 {
            let (a, b) = (r.inv_freq()[i], plain.inv_freq()[i]);
            assert!(a < b && a > b / 8.0, "band {i}: {a} vs {b}");
        }
        assert!(close(r.inv_freq()[35], 9.556_212e-5), "{}", r.inv_freq()[35]);
    }
}
