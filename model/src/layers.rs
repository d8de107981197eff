//! The small building blocks shared by the decoder: bias-free linear layers, RMSNorm and the SwiGLU
//! MLP (shared expert and dense layers).

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::error::Result;

/// `y = x·Wᵀ`; the weight is stored `[out, in]` as in `nn.Linear`. Llama 4's text model has no biases.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn load(
        src: &dyn WeightSource,
        key: &str,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Linear { weight: src.tensor(key, &[out_dim, in_dim], dtype, dev)? })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.weight)
    }
}

/// Up to this many rows, `x·Wᵀ` is computed as `(W·xᵀ)ᵀ`.
const SKINNY_ROWS: usize = 16;

/// `x · Wᵀ` for `x` `[rows, in]` and a weight stored `[out, in]`. candle's CPU gemm streams a large
/// weight faster as the left operand when `x` has few rows: for eight `[2048, 512]` weights, 2.4 ms
/// instead of 3.1 ms at 2 rows, 3.0 vs 3.4 ms at 16, but 8.0 vs 6.1 ms at 32 (docs/benchmarks.md).
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::kernels::skinny_matmul_t(x, w) {
        return Ok(y);
    }
    if x.dim(0)? <= SKINNY_ROWS && x.device().is_cpu() {
        Ok(w.matmul(&x.t()?.contiguous()?)?.t()?.contiguous()?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

/// `Llama4TextRMSNorm`: `x · rsqrt(mean(x²) + eps) · weight`, no `+1` offset on the weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn WeightSource, key: &str, dim: usize, eps: f64, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(RmsNorm { weight: src.tensor(key, &[dim], dtype, dev)?, eps: eps as f32 })
    }

    /// The weight-less variant (`Llama4TextL2Norm`, used on q and k): RMS-style, not unit-L2.
    pub fn unit(dim: usize, eps: f64, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(RmsNorm { weight: Tensor::ones(dim, dtype, dev)?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// SwiGLU MLP with nn.Linear weights: `down(silu(gate(x)) ⊙ up(x))`. Gate and up are fused into one
/// `[2·inter, hidden]` matrix at load time so that a step makes one product for both.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    inter: usize,
}

impl Mlp {
    /// Loads `{prefix}gate_proj.weight`, `{prefix}up_proj.weight`, `{prefix}down_proj.weight`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let gate = src.tensor(&format!("{prefix}gate_proj.weight"), &[inter, hidden], dtype, dev)?;
        let up = src.tensor(&format!("{prefix}up_proj.weight"), &[inter, hidden], dtype, dev)?;
        let down = Linear::load(src, &format!("{prefix}down_proj.weight"), hidden, inter, dtype, dev)?;
        Ok(Mlp { gate_up: Linear { weight: Tensor::cat(&[gate, up], 0)? }, down, inter })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        swiglu_down(&gu, self.inter, |h| self.down.forward(h))
    }
}

/// `silu(gate) ⊙ up` over a fused `[rows, 2·inter]` product (gate first), then `down`.
pub(crate) fn swiglu_down(
    gate_up: &Tensor,
    inter: usize,
    down: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let gate = gate_up.narrow(1, 0, inter)?;
    let up = gate_up.narrow(1, inter, inter)?;
    down(&(gate.silu()? * up)?)
}
