//! The vision encoder (`Llama4VisionModel` up to `layernorm_post`, transformers 5.24
//! `modeling_llama4.py`): the patch embedding as an unfold followed by a linear layer, the class
//! token appended after the patches, learned positions, and pre-LayerNorm transformer blocks with
//! biases whose attention is non-causal within each tile and rotates q and k by a 2-D RoPE.
//!
//! Rows are `[tiles · tokens, hidden]`, tile after tile; a tile's tokens are its patches in
//! row-major order, then the class token (reference §4).

use candle_core::{DType, Device, Tensor};

use super::Geometry;
use super::attention::{RopeTable, attention};
use super::ops::{LayerNorm, Linear, Scratch};
use crate::checkpoint::WeightSource;
use crate::error::Result;
use crate::layers::WeightStorage;

/// Where a tile's class token sits among its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClassToken {
    /// After the patches (Llama 4).
    Last,
    /// Before them, as CLIP does (a negative control only).
    #[cfg(any(test, feature = "testing"))]
    First,
}

/// Which patch coordinate the first half of each head's rotary pairs turns with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RopeAxes {
    /// The column (x) first, then the row (y): Llama 4.
    ColumnFirst,
    /// The row first (a negative control only).
    #[cfg(any(test, feature = "testing"))]
    RowFirst,
}

/// `Llama4VisionRotaryEmbedding` as cos/sin tables `[tokens, head_dim / 2]` for an interleaved
/// rotation: pair `m < head_dim/4` of patch `(x, y)` turns by `(x+1)·f_m`, pair `head_dim/4 + m` by
/// `(y+1)·f_m`, `f_m = θ^(-4m/head_dim)`; the class token does not turn. The tables for q carry the
/// attention scale `head_dim^-0.5` as well, which spares a pass over q.
pub(super) fn rope_table(g: &Geometry, theta: f64, class: ClassToken, axes: RopeAxes) -> RopeTable {
    let pairs = g.head_dim / 2;
    let per_axis = pairs / 2;
    // transformers: 1 / theta ** (arange(0, freq_dim, 2)[: freq_dim // 2] / freq_dim) in f32,
    // freq_dim = head_dim / 2.
    let freq_dim = pairs as f32;
    let freqs: Vec<f32> = (0..per_axis).map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / freq_dim)).collect();
    let mut angles = vec![0f32; g.tokens * pairs];
    for k in 0..g.patches {
        let token = match class {
            ClassToken::Last => k,
            #[cfg(any(test, feature = "testing"))]
            ClassToken::First => k + 1,
        };
        // 1-based coordinates (transformers adds 1 to `img_idx % idx` and `img_idx // idx`), the
        // product in f32 as transformers computes it.
        let (x, y) = ((k % g.grid + 1) as f32, (k / g.grid + 1) as f32);
        let (first, second) = match axes {
            RopeAxes::ColumnFirst => (x, y),
            #[cfg(any(test, feature = "testing"))]
            RopeAxes::RowFirst => (y, x),
        };
        let row = &mut angles[token * pairs..(token + 1) * pairs];
        for (m, &f) in freqs.iter().enumerate() {
            row[m] = first * f;
            row[per_axis + m] = second * f;
        }
    }
    let scale = (g.head_dim as f32).powf(-0.5);
    let map = |f: &dyn Fn(f32) -> f32| angles.iter().map(|&a| f(a)).collect::<Vec<f32>>();
    RopeTable {
        cos: map(&|a| a.cos()),
        sin: map(&|a| a.sin()),
        cos_q: map(&|a| a.cos() * scale),
        sin_q: map(&|a| a.sin() * scale),
    }
}

/// `Llama4VisionEncoderLayer`: `x += o(attn(LN1(x)))`, `x += fc2(gelu(fc1(LN2(x))))`.
#[derive(Debug)]
pub(super) struct EncoderLayer {
    input_layernorm: LayerNorm,
    /// q, k and v projections side by side: `[3·hidden, hidden]`.
    qkv: Linear,
    o_proj: Linear,
    post_attention_layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    /// Loads `vision_model.model.layers.{layer}.*`.
    pub fn load(
        g: &Geometry,
        layer: usize,
        src: &dyn WeightSource,
        (dtype, storage): (DType, WeightStorage),
        dev: &Device,
    ) -> Result<Self> {
        let p = format!("vision_model.model.layers.{layer}.");
        let d = g.hidden;
        let linear = |name: &str, shape| Linear::load(src, &format!("{p}{name}"), shape, true, (dtype, storage), dev);
        let qkv = Linear::concat(&[
            linear("self_attn.q_proj", (d, d))?,
            linear("self_attn.k_proj", (d, d))?,
            linear("self_attn.v_proj", (d, d))?,
        ])?;
        Ok(EncoderLayer {
            input_layernorm: LayerNorm::load(src, &format!("{p}input_layernorm"), d, dtype, dev)?,
            qkv,
            o_proj: linear("self_attn.o_proj", (d, d))?,
            post_attention_layernorm: LayerNorm::load(src, &format!("{p}post_attention_layernorm"), d, dtype, dev)?,
            fc1: linear("mlp.fc1", (g.intermediate, d))?,
            fc2: linear("mlp.fc2", (d, g.intermediate))?,
        })
    }

    pub fn linears(&self) -> [&Linear; 4] {
        [&self.qkv, &self.o_proj, &self.fc1, &self.fc2]
    }

    /// One block over `x` `[tiles · tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, g: &Geometry, rope: &RopeTable, scratch: &Scratch) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let attended = attention(self.qkv.forward(&h, scratch)?, g, rope)?;
        let x = (x + self.o_proj.forward(&attended, scratch)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let h = self.fc1.forward_gelu(&h, scratch)?;
        Ok((x + self.fc2.forward(&h, scratch)?)?)
    }
}

/// `Llama4UnfoldConvolution`'s unfold: `[tiles, C, S, S]` → `[tiles · patches, C·p·p]`, patches in
/// row-major order, each patch's features ordered (channel, row in patch, column in patch).
pub(super) fn unfold(pixels: &Tensor, g: &Geometry) -> Result<Tensor> {
    let tiles = pixels.dim(0)?;
    let (c, grid, p) = (g.channels, g.grid, g.patch_size);
    Ok(pixels
        .reshape(vec![tiles, c, grid, p, grid, p])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .contiguous()?
        .reshape((tiles * g.patches, c * p * p))?)
}
