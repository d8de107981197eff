//! The small building blocks shared by the decoder: bias-free linear layers, RMSNorm and the SwiGLU
//! MLP (shared expert and dense layers).

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::error::Result;

/// How weight matrices (linear layers and routed experts) are kept in memory. Embeddings and norms
/// are always in the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// bf16 as the checkpoint stores them when computing in f32 on the CPU, where the kernels
    /// widen them as they read them: the same numbers as converting at load, bit for bit, at half
    /// the memory and half the bytes per decode step. Any other case: the compute dtype.
    #[default]
    AsStored,
    /// Converted to the compute dtype at load.
    Compute,
}

impl WeightStorage {
    /// The dtype a tensor stored as `stored` is kept in, computing in `compute` on `dev`.
    pub fn dtype(self, stored: Option<DType>, compute: DType, dev: &Device) -> DType {
        let widened_by_kernels = compute == DType::F32 && dev.is_cpu() && stored == Some(DType::BF16);
        if self == WeightStorage::AsStored && widened_by_kernels { DType::BF16 } else { compute }
    }
}

/// `y = x·Wᵀ`; the weight is stored `[out, in]` as in `nn.Linear`. Llama 4's text model has no biases.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// Loads `key`, kept as `storage` says (see [`WeightStorage`]).
    pub fn load(
        src: &dyn WeightSource,
        key: &str,
        (out_dim, in_dim): (usize, usize),
        dtype: DType,
        storage: WeightStorage,
        dev: &Device,
    ) -> Result<Self> {
        let kept = storage.dtype(src.stored_dtype(key), dtype, dev);
        Ok(Linear { weight: src.tensor(key, &[out_dim, in_dim], kept, dev)? })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.weight)
    }

    /// Bytes of the weight as kept in memory.
    pub fn bytes(&self) -> u64 {
        (self.weight.elem_count() * self.weight.dtype().size_in_bytes()) as u64
    }
}

/// Up to this many rows, `x·Wᵀ` is computed as `(W·xᵀ)ᵀ`.
const SKINNY_ROWS: usize = 16;

/// `x · Wᵀ` for `x` `[rows, in]` and a weight stored `[out, in]`. candle's CPU gemm streams a large
/// weight faster as the left operand when `x` has few rows: for eight `[2048, 512]` weights, 2.4 ms
/// instead of 3.1 ms at 2 rows, 3.0 vs 3.4 ms at 16, but 8.0 vs 6.1 ms at 32 (docs/benchmarks.md).
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // The plain-Rust kernels up to `max_rows` rows, and at any size for weights kept narrower than
    // the compute dtype (candle cannot mix dtypes; more rows are compute-bound, where its gemm wins).
    if (x.dim(0)? <= crate::kernels::max_rows() || w.dtype() != x.dtype())
        && let Some(y) = crate::kernels::matmul_t(x, w)
    {
        return Ok(y);
    }
    if w.dtype() != x.dtype() {
        return matmul_t(x, &w.to_dtype(x.dtype())?);
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
        (hidden, inter): (usize, usize),
        dtype: DType,
        storage: WeightStorage,
        dev: &Device,
    ) -> Result<Self> {
        let gate = Linear::load(src, &format!("{prefix}gate_proj.weight"), (inter, hidden), dtype, storage, dev)?;
        let up = Linear::load(src, &format!("{prefix}up_proj.weight"), (inter, hidden), dtype, storage, dev)?;
        let down = Linear::load(src, &format!("{prefix}down_proj.weight"), (hidden, inter), dtype, storage, dev)?;
        // Both halves in one dtype (they are stored alike; if not, both in the compute dtype).
        let (gate, up) = if gate.weight.dtype() == up.weight.dtype() {
            (gate.weight, up.weight)
        } else {
            (gate.weight.to_dtype(dtype)?, up.weight.to_dtype(dtype)?)
        };
        Ok(Mlp { gate_up: Linear { weight: Tensor::cat(&[gate, up], 0)? }, down, inter })
    }

    /// Bytes of the three matrices as kept in memory.
    pub fn bytes(&self) -> u64 {
        self.gate_up.bytes() + self.down.bytes()
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
