//! The vision tower's layers over the hundreds of rows a tile brings: `nn.Linear` with an optional
//! bias (and an optional exact GELU after it), and torch's `nn.LayerNorm`.
//!
//! Products are compute-bound here (577 rows per tile), so they go to the gemm crate's packed
//! kernels — the ones candle calls, with AVX-512 on CPUs that have it — with f32 operands. Weights
//! are kept as [`WeightStorage`] says: for f32 compute on the CPU that is bf16 as the checkpoint
//! stores it, widened to f32 (exactly) for each product, which costs a read and a write of the
//! weight, a few percent of a product over a tile's rows (docs/model.md, "Vision encoder"). The
//! project's own kernels (`crate::kernels`) read bf16 directly but are made for few rows.
//!
//! f32 on the CPU runs here, rows in parallel on rayon's pool; any other dtype or device goes
//! through candle's ops.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::rows;
use crate::checkpoint::WeightSource;
use crate::error::{Error, Result};
use crate::kernels::{CpuView, Weights};
use crate::layers::WeightStorage;

/// `nn.LayerNorm`'s default eps. transformers builds the vision LayerNorms without an eps argument,
/// so this, not `vision_config.norm_eps`, is what the checkpoint was trained and tested with.
pub(super) const LAYER_NORM_EPS: f32 = 1e-5;

/// Rows per parallel task of the row-wise steps.
const ROWS_PER_TASK: usize = 16;

/// Elements per parallel task when widening a weight.
const WIDEN_PER_TASK: usize = 1 << 16;

/// Where products widen bf16 weights, reused from product to product: a fresh allocation of a
/// weight's size costs as many page faults as the widening costs work (at one tile, the two were
/// a fifth of the forward pass). It grows to the largest weight (Scout: the adapter's fc1, 92 MB in
/// f32) and is held by the model; a product holds it until done, so concurrent forward passes of
/// one model take turns product by product (each product already uses every core).
#[derive(Debug, Default)]
pub(super) struct Scratch(std::sync::Mutex<Vec<f32>>);

/// `y = x·Wᵀ + b`, the weight stored `[out, in]` as in `nn.Linear`.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{key}.weight` (and `{key}.bias` when `bias`).
    pub fn load(
        src: &dyn WeightSource,
        key: &str,
        (out_dim, in_dim): (usize, usize),
        bias: bool,
        (dtype, storage): (DType, WeightStorage),
        dev: &Device,
    ) -> Result<Self> {
        let w_key = format!("{key}.weight");
        let kept = storage.dtype(src.stored_dtype(&w_key), dtype, dev);
        let weight = src.tensor(&w_key, &[out_dim, in_dim], kept, dev)?;
        let bias = bias.then(|| src.tensor(&format!("{key}.bias"), &[out_dim], dtype, dev)).transpose()?;
        Ok(Linear { weight, bias })
    }

    /// One layer computing all of `parts` side by side (outputs concatenated in order), e.g. the q,
    /// k and v projections as one product. The parts all have a bias or none has.
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let dtype = parts.first().map(|p| p.weight.dtype());
        let weights = if parts.iter().all(|p| Some(p.weight.dtype()) == dtype) {
            Tensor::cat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0)?
        } else {
            // Stored in different dtypes (no released checkpoint is): all in f32 then.
            let wide = parts.iter().map(|p| p.weight.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&wide, 0)?
        };
        let bias = match parts.iter().map(|p| p.bias.as_ref()).collect::<Option<Vec<_>>>() {
            Some(biases) => Some(Tensor::cat(&biases, 0)?),
            None if parts.iter().all(|p| p.bias.is_none()) => None,
            None => return Err(Error::Input("cannot fuse linear layers with and without a bias".into())),
        };
        Ok(Linear { weight: weights, bias })
    }

    /// Bytes of the weight and bias as kept in memory.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        size(&self.weight) + self.bias.as_ref().map_or(0, size)
    }

    pub fn params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, Tensor::elem_count)
    }

    /// `x·Wᵀ + b` for `x` `[rows, in]`.
    pub fn forward(&self, x: &Tensor, scratch: &Scratch) -> Result<Tensor> {
        self.forward_then(x, false, scratch)
    }

    /// `gelu(x·Wᵀ + b)`, exact GELU.
    pub fn forward_gelu(&self, x: &Tensor, scratch: &Scratch) -> Result<Tensor> {
        self.forward_then(x, true, scratch)
    }

    fn forward_then(&self, x: &Tensor, gelu: bool, scratch: &Scratch) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            let x = x.contiguous()?;
            let bias = self.bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?;
            let bias_view = bias.as_ref().map(|b| CpuView::new(b).ok_or_else(|| Error::Input("vision bias".into())));
            let bias_view = bias_view.transpose()?;
            let bias = bias_view.as_ref().map(|b| b.f32().ok_or_else(|| Error::Input("vision bias".into())));
            let mut y = product_f32(&x, &self.weight, bias.transpose()?, scratch)?;
            if gelu {
                let width = self.weight.dim(0)?;
                y.par_chunks_mut(width * ROWS_PER_TASK).for_each(|rows| rows::bias_gelu_rows(rows, width, None, true));
            }
            return Ok(Tensor::from_vec(y, (x.dim(0)?, self.weight.dim(0)?), x.device())?);
        }
        let y = x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        Ok(if gelu { y.gelu_erf()? } else { y })
    }
}

/// `x · Wᵀ` for an f32 CPU `x` `[rows, in]` and a weight `[out, in]` stored f32 or bf16: the
/// product every linear layer of the vision tower makes (what `epserve vision-bench` measures the
/// machine's peak with). Other dtypes and devices go through candle.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        let x = x.contiguous()?;
        let y = product_f32(&x, w, None, &Scratch::default())?;
        return Ok(Tensor::from_vec(y, (x.dim(0)?, w.dim(0)?), x.device())?);
    }
    Ok(x.matmul(&w.to_dtype(x.dtype())?.t()?)?)
}

/// `x · Wᵀ (+ bias)` for a contiguous f32 CPU `x` `[m, k]` and `w` `[n, k]`, row-major `[m, n]`.
fn product_f32(x: &Tensor, w: &Tensor, bias: Option<&[f32]>, scratch: &Scratch) -> Result<Vec<f32>> {
    let (&[m, k], &[n, k2]) = (x.dims(), w.dims()) else {
        return Err(Error::Input(format!("vision product of shapes {:?} and {:?}", x.dims(), w.dims())));
    };
    if k != k2 || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::Input(format!(
            "vision product of shapes [{m}, {k}] and [{n}, {k2}] with a bias of {}",
            bias.map_or(0, <[f32]>::len)
        )));
    }
    let x_view = CpuView::new(x).ok_or_else(|| Error::Input("vision product: x is not contiguous f32".into()))?;
    let xs = x_view.f32().ok_or_else(|| Error::Input("vision product: x is not f32".into()))?;
    let w = w.contiguous()?;
    let w_view = CpuView::new(&w);
    match w_view.as_ref().map(CpuView::weights) {
        Some(Weights::F32(ws)) => Ok(gemm_xwt(xs, ws, (m, k, n), bias)),
        Some(Weights::Bf16(values) | Weights::Bf16Products(values)) => {
            // A poisoned lock only means a product panicked mid-way: the buffer is rewritten anyway.
            let mut wide = scratch.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if wide.len() < values.len() {
                wide.resize(values.len(), 0.0);
            }
            let wide = &mut wide[..values.len()];
            wide.par_chunks_mut(WIDEN_PER_TASK)
                .zip(values.par_chunks(WIDEN_PER_TASK))
                .for_each(|(out, src)| rows::widen(src, out));
            Ok(gemm_xwt(xs, wide, (m, k, n), bias))
        }
        // A tensor view is never quantized (the vision tower is not).
        None | Some(Weights::Quant(_)) => {
            let ws = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(gemm_xwt(xs, &ws, (m, k, n), bias))
        }
    }
}

/// `x · wᵀ (+ bias)` through the gemm crate on every thread of rayon's pool.
fn gemm_xwt(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k, "gemm_xwt: lengths disagree with the shape");
    // The bias, one copy per row, is the destination's starting value: no pass to add it.
    let mut y = match bias {
        Some(b) => {
            let mut y = vec![0f32; m * n];
            y.par_chunks_mut(n * ROWS_PER_TASK)
                .for_each(|rows| rows.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b)));
            y
        }
        None => vec![0f32; m * n],
    };
    if m == 0 || n == 0 {
        return y;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: `y` is `[m, n]` row-major (column stride 1, row stride n), `x` `[m, k]` row-major, and
    // `w` `[n, k]` row-major read as `wᵀ` `[k, n]` (row stride 1, column stride k): every index the
    // product touches is inside its slice, as the assert above checks; `y` is not aliased.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    y
}

/// `nn.LayerNorm(dim)` with weight and bias, eps [`LAYER_NORM_EPS`].
#[derive(Debug, Clone)]
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// Loads `{key}.weight` and `{key}.bias`.
    pub fn load(src: &dyn WeightSource, key: &str, dim: usize, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(LayerNorm {
            weight: src.tensor(&format!("{key}.weight"), &[dim], dtype, dev)?,
            bias: src.tensor(&format!("{key}.bias"), &[dim], dtype, dev)?,
        })
    }

    /// Normalises each row of `x` (`[rows, dim]`) over its last dimension, in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let views = (CpuView::new(x), CpuView::new(&self.weight), CpuView::new(&self.bias));
        if let (Some(x_view), Some(w), Some(b)) = &views
            && let (Some(xs), Some(w), Some(b)) = (x_view.f32(), w.f32(), b.f32())
        {
            let dim = w.len();
            if dim == 0 || xs.len() % dim != 0 || b.len() != dim {
                return Err(Error::Input(format!("layer norm of width {dim} over {} values", xs.len())));
            }
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(dim * ROWS_PER_TASK)
                .zip(xs.par_chunks(dim * ROWS_PER_TASK))
                .for_each(|(out, xs)| rows::layer_norm_rows(xs, w, b, LAYER_NORM_EPS, out));
            return Ok(Tensor::from_vec(out, x.dims(), x.device())?);
        }
        // torch normalises in f32 for f32 and half inputs alike.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let centred = xf.broadcast_sub(&xf.mean_keepdim(candle_core::D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = centred.broadcast_div(&(var + f64::from(LAYER_NORM_EPS))?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with a mean far from 0 against their spread: a one-pass variance (`E[x²] − mean²`, as
    /// candle's layer norm computes it) cancels to noise in f32; torch's two passes do not.
    #[test]
    fn layer_norm_is_torchs_with_a_large_mean() {
        let dim = 40;
        let x: Vec<f32> = (0..3 * dim).map(|i| 300.0 + ((i * 37) % 11) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..dim).map(|i| i as f32 * -0.02).collect();
        let dev = Device::Cpu;
        let ln = LayerNorm {
            weight: Tensor::from_slice(&w, dim, &dev).expect("w"),
            bias: Tensor::from_slice(&b, dim, &dev).expect("b"),
        };
        let x = Tensor::from_slice(&x, (3, dim), &dev).expect("x");
        let fast = ln.forward(&x).and_then(|t| Ok(t.to_vec2::<f32>()?)).expect("f32 path");
        // The path for other dtypes (f64 here) computes the same in f32.
        let other = ln
            .forward(&x.to_dtype(DType::F64).expect("f64"))
            .and_then(|t| Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?))
            .expect("candle path");
        let rows = x.to_vec2::<f32>().expect("rows");
        for (r, row) in rows.iter().enumerate() {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / dim as f64;
            for c in 0..dim {
                let want = (f64::from(row[c]) - mean) / (var + 1e-5).sqrt() * f64::from(w[c]) + f64::from(b[c]);
                for (path, got) in [("f32", fast[r][c]), ("other", other[r][c])] {
                    assert!((f64::from(got) - want).abs() < 1e-2, "{path}: row {r} col {c}: {got} vs {want}");
                }
            }
        }
    }

    /// The gemm path (bias as the starting value, bf16 weights widened) against candle's matmul.
    #[test]
    fn linear_matches_candle_for_both_storages() {
        let dev = Device::Cpu;
        let (m, k, n) = (37, 29, 45);
        let x = Tensor::from_vec((0..m * k).map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8).collect(), (m, k), &dev)
            .expect("x");
        let w32 = Tensor::from_vec((0..n * k).map(|i| ((i * 13) % 23) as f32 * 0.05 - 0.5).collect(), (n, k), &dev)
            .and_then(|w| w.to_dtype(DType::BF16)?.to_dtype(DType::F32))
            .expect("w");
        let b = Tensor::from_vec((0..n).map(|i| i as f32 * 0.01).collect(), n, &dev).expect("b");
        let want = x
            .matmul(&w32.t().expect("t"))
            .and_then(|y| y.broadcast_add(&b))
            .and_then(|y| y.gelu_erf())
            .and_then(|y| y.to_vec2::<f32>())
            .expect("candle");
        for weight in [w32.clone(), w32.to_dtype(DType::BF16).expect("bf16")] {
            let layer = Linear { weight, bias: Some(b.clone()) };
            let got =
                layer.forward_gelu(&x, &Scratch::default()).and_then(|y| Ok(y.to_vec2::<f32>()?)).expect("forward");
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }
}
