//! The small building blocks shared by the decoder: bias-free linear layers, RMSNorm and the SwiGLU
//! MLP (shared expert and dense layers).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::error::{Error, Result};
use crate::kernels::CpuView;
use crate::quant::{Activations, LoadPolicy, MatrixRole, QuantMatrix, QuantScheme};

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

/// A weight matrix `[out, in]` as kept in memory: a tensor (f32 or bf16), or quantized.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Tensor),
    /// A bf16 CPU tensor multiplied with its rows rounded to bf16 (`--activations bf16`).
    Bf16Products(Tensor),
    Quant(Arc<QuantMatrix>),
}

impl Matrix {
    /// The matrix whose `nn.Linear`-style weight is `key` (`….weight`), `[out, in]`: pre-quantized
    /// when the checkpoint stores it so, else quantized with the scheme `policy` gives `role`, else
    /// kept as `policy.storage` says.
    pub fn load(
        src: &dyn WeightSource,
        key: &str,
        shape: (usize, usize),
        (dtype, policy, role): (DType, LoadPolicy, MatrixRole),
        dev: &Device,
    ) -> Result<Self> {
        if let Some(q) = src.quantized(key, shape)? {
            return Matrix::from_quant(q, policy.activations, dev);
        }
        let Some(scheme) = policy.scheme_for(role) else {
            let kept = policy.storage.dtype(src.stored_dtype(key), dtype, dev);
            return Ok(
                Matrix::Dense(src.tensor(key, &[shape.0, shape.1], kept, dev)?).with_activations(policy.activations)
            );
        };
        // Read as stored when that is bf16 or f32 (no wider copy is made), else as f32.
        let read = src.stored_dtype(key).filter(|d| matches!(d, DType::BF16 | DType::F32)).unwrap_or(DType::F32);
        let t = src.tensor(key, &[shape.0, shape.1], read, &Device::Cpu)?;
        Matrix::from_tensor(t, Some((scheme, policy.activations)), dtype, dev)
    }

    /// `t` (`[out, in]`, on the CPU when quantizing) quantized with the scheme given and multiplied
    /// with the activations given, or kept.
    pub fn from_tensor(
        t: Tensor,
        quantize: Option<(QuantScheme, Activations)>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let Some((scheme, activations)) = quantize else {
            return Ok(Matrix::Dense(if t.device().same_device(dev) { t } else { t.to_device(dev)? }));
        };
        let &[n, k] = t.dims() else {
            return Err(Error::Input(format!("only matrices are quantized, not shape {:?}", t.dims())));
        };
        let t = if matches!(t.dtype(), DType::BF16 | DType::F32) { t } else { t.to_dtype(dtype)? };
        let view =
            CpuView::new(&t).ok_or_else(|| Error::Input("a quantized matrix is made from CPU weights".into()))?;
        Matrix::from_quant(QuantMatrix::quantize(view.weights(), (n, k), scheme)?, activations, dev)
    }

    /// A quantized matrix, on `dev` (only the CPU computes them), multiplied with `activations`.
    pub(crate) fn from_quant(q: QuantMatrix, activations: Activations, dev: &Device) -> Result<Self> {
        if !dev.is_cpu() {
            return Err(Error::Input("quantized weights are computed on the CPU only".into()));
        }
        Ok(Matrix::Quant(Arc::new(q.with_activations(activations))))
    }

    /// A dense bf16 CPU matrix multiplied with `activations` from now on: with bf16 products for
    /// [`Activations::Bf16`]; anything else is kept as it is.
    pub fn with_activations(self, activations: Activations) -> Self {
        match self {
            Matrix::Dense(t) if activations == Activations::Bf16 && t.dtype() == DType::BF16 && t.device().is_cpu() => {
                // Which products the mode takes is decided once, here at load rather than in the
                // first step (the decision measures the CPU).
                crate::kernels::bf16_products_of_many_rows();
                Matrix::Bf16Products(t)
            }
            other => other,
        }
    }

    /// The tensor of a dense matrix, whatever its products.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Matrix::Dense(t) | Matrix::Bf16Products(t) => Some(t),
            Matrix::Quant(_) => None,
        }
    }

    /// Bytes as kept in memory.
    pub fn bytes(&self) -> u64 {
        match self {
            Matrix::Dense(t) | Matrix::Bf16Products(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// `x · Wᵀ`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Dense(w) => matmul_t(x, w),
            Matrix::Bf16Products(w) => {
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                let view =
                    CpuView::new(w).ok_or_else(|| Error::Input("bf16 products need a contiguous CPU weight".into()))?;
                let crate::kernels::Weights::Bf16(values) = view.weights() else {
                    return Err(Error::Input("bf16 products need bf16 weights".into()));
                };
                let y = crate::kernels::matmul_t_weights(&xf, crate::kernels::Weights::Bf16Products(values), w.dim(0)?)
                    .ok_or_else(|| Error::Input("bf16 products need f32 rows on the CPU".into()))?;
                Ok(y.to_dtype(x.dtype())?)
            }
            Matrix::Quant(q) => {
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                let y = crate::kernels::matmul_t_weights(&xf, crate::kernels::Weights::Quant(q.view()), q.shape().0)
                    .ok_or_else(|| Error::Input("quantized weights need f32 rows on the CPU".into()))?;
                Ok(y.to_dtype(x.dtype())?)
            }
        }
    }

    /// `self`'s rows then `other`'s, both kept alike (if not, both in `dtype`).
    pub fn concat_rows(self, other: Matrix, dtype: DType) -> Result<Matrix> {
        match (self, other) {
            (Matrix::Quant(a), Matrix::Quant(b)) => {
                let (a, b) = (Arc::unwrap_or_clone(a), Arc::unwrap_or_clone(b));
                Ok(Matrix::Quant(Arc::new(QuantMatrix::concat_rows(a, b)?)))
            }
            (Matrix::Dense(a), Matrix::Dense(b)) => {
                let (a, b) = if a.dtype() == b.dtype() { (a, b) } else { (a.to_dtype(dtype)?, b.to_dtype(dtype)?) };
                Ok(Matrix::Dense(Tensor::cat(&[a, b], 0)?))
            }
            (Matrix::Bf16Products(a), Matrix::Bf16Products(b)) => Ok(Matrix::Bf16Products(Tensor::cat(&[a, b], 0)?)),
            _ => Err(Error::Input("cannot fuse matrices kept or multiplied differently".into())),
        }
    }
}

/// A [`Matrix`] borrowed as the kernels read it.
pub(crate) enum MatrixView<'a> {
    Cpu(CpuView<'a>),
    /// bf16 values multiplied with bf16 products.
    Bf16Products(CpuView<'a>),
    Quant(crate::kernels::QuantView<'a>),
}

impl MatrixView<'_> {
    pub fn weights(&self) -> crate::kernels::Weights<'_> {
        match self {
            MatrixView::Cpu(v) => v.weights(),
            MatrixView::Bf16Products(v) => match v.weights() {
                crate::kernels::Weights::Bf16(w) => crate::kernels::Weights::Bf16Products(w),
                other => other,
            },
            MatrixView::Quant(q) => crate::kernels::Weights::Quant(*q),
        }
    }
}

impl Matrix {
    /// The matrix as the kernels read it; `None` for a tensor the kernels cannot (not on the CPU,
    /// or in neither f32 nor bf16).
    pub(crate) fn view(&self) -> Option<MatrixView<'_>> {
        match self {
            Matrix::Dense(t) => CpuView::new(t).map(MatrixView::Cpu),
            Matrix::Bf16Products(t) => CpuView::new(t).map(MatrixView::Bf16Products),
            Matrix::Quant(q) => Some(MatrixView::Quant(q.view())),
        }
    }

    /// How the matrix is held, e.g. `bf16` or `int4 (group 32, f16 scales)`.
    pub fn describe(&self) -> String {
        match self {
            Matrix::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Matrix::Bf16Products(_) => "bf16 (bf16 products)".to_owned(),
            Matrix::Quant(q) => q.describe(),
        }
    }

    /// The dtype of a dense matrix (`None` when quantized).
    pub fn dense_dtype(&self) -> Option<DType> {
        match self {
            Matrix::Dense(t) | Matrix::Bf16Products(t) => Some(t.dtype()),
            Matrix::Quant(_) => None,
        }
    }
}

/// `y = x·Wᵀ`; the weight is stored `[out, in]` as in `nn.Linear`. Llama 4's text model has no biases.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
}

impl Linear {
    /// Loads `key`, kept as `policy` says for a matrix of `role` (see [`Matrix::load`]).
    pub fn load(
        src: &dyn WeightSource,
        key: &str,
        shape: (usize, usize),
        (dtype, policy, role): (DType, LoadPolicy, MatrixRole),
        dev: &Device,
    ) -> Result<Self> {
        Ok(Linear { weight: Matrix::load(src, key, shape, (dtype, policy, role), dev)? })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear { weight: Matrix::Dense(weight) }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward(x)
    }

    /// Bytes of the weight as kept in memory.
    pub fn bytes(&self) -> u64 {
        self.weight.bytes()
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
    /// Loads `{prefix}gate_proj.weight`, `{prefix}up_proj.weight`, `{prefix}down_proj.weight`
    /// (or their pre-quantized forms), kept as `policy` says for matrices of `role`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        (hidden, inter): (usize, usize),
        how: (DType, LoadPolicy, MatrixRole),
        dev: &Device,
    ) -> Result<Self> {
        let gate = Matrix::load(src, &format!("{prefix}gate_proj.weight"), (inter, hidden), how, dev)?;
        let up = Matrix::load(src, &format!("{prefix}up_proj.weight"), (inter, hidden), how, dev)?;
        let down = Linear::load(src, &format!("{prefix}down_proj.weight"), (hidden, inter), how, dev)?;
        Ok(Mlp { gate_up: Linear { weight: gate.concat_rows(up, how.0)? }, down, inter })
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
