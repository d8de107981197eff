//! `Llama4VisionAttention` between its projections: the fused `[q | k | v]` rows of a batch of tiles
//! in, the heads' outputs side by side out. Every (tile, head) attends over its tile's tokens with
//! no mask; q and k are rotated by the 2-D RoPE in f32 (`vision_apply_rotary_emb` calls `.float()`)
//! and the softmax runs in f32. `1/√head_dim` is folded into q's rotation tables.
//!
//! For f32 on the CPU, each (tile, head) is one task on rayon's pool: `q·kᵀ` into a scores buffer
//! of that thread (577² floats for Scout, 1.3 MB: it stays in the core's L2), softmax in place, then
//! `p·v` written straight into the output's columns of that head. q, k and v are read where the
//! projection left them (gemm takes strides), so heads are never copied out or back. Other dtypes
//! and devices go through candle's ops.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

use super::Geometry;
use super::rows::{self, RopeTables};
use crate::error::{Error, Result};
use crate::kernels::CpuView;

/// Rows per parallel task of the rotation.
const ROWS_PER_TASK: usize = 32;

/// `Llama4VisionRotaryEmbedding` as cos/sin tables `[tokens, head_dim / 2]` (see
/// `encoder::rope_table`).
#[derive(Debug, Clone)]
pub(super) struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// `cos`, `sin` times `head_dim^-0.5`, for q.
    pub cos_q: Vec<f32>,
    pub sin_q: Vec<f32>,
}

impl RopeTable {
    fn tables(&self) -> RopeTables<'_> {
        RopeTables { cos: &self.cos, sin: &self.sin, cos_q: &self.cos_q, sin_q: &self.sin_q }
    }
}

/// `qkv` `[tiles · tokens, 3·hidden]` (consumed: rotated in place) → `[tiles · tokens, hidden]`.
pub(super) fn attention(qkv: Tensor, g: &Geometry, rope: &RopeTable) -> Result<Tensor> {
    let rows = qkv.dim(0)?;
    if rows % g.tokens != 0 || qkv.dim(1)? != 3 * g.hidden {
        return Err(Error::Input(format!("vision attention over qkv of shape {:?}", qkv.dims())));
    }
    if qkv.dtype() != DType::F32 || !qkv.device().is_cpu() || !qkv.is_contiguous() {
        return attention_candle(&qkv, g, rope);
    }
    qkv.inplace_op1(&Rotate { g, tables: rope.tables() })?;
    let view = CpuView::new(&qkv).ok_or_else(|| Error::Input("vision qkv is not contiguous f32".into()))?;
    let values = view.f32().ok_or_else(|| Error::Input("vision qkv is not f32".into()))?;
    let out = heads_f32(values, rows / g.tokens, g);
    Ok(Tensor::from_vec(out, (rows, g.hidden), qkv.device())?)
}

/// Rotates the q and k parts of every row in place.
struct Rotate<'a> {
    g: &'a Geometry,
    tables: RopeTables<'a>,
}

impl candle_core::InplaceOp1 for Rotate<'_> {
    fn name(&self) -> &'static str {
        "vision-rope-2d"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("vision RoPE wants a contiguous f32 tensor");
        };
        let width = 3 * self.g.hidden;
        values[start..end].par_chunks_mut(width * ROWS_PER_TASK).enumerate().for_each(|(task, rows)| {
            rows::rope_rows(rows, task * ROWS_PER_TASK, self.g, &self.tables);
        });
        Ok(())
    }
}

/// The output pointer shared by the tasks, each of which writes its own (tile, head) block.
#[derive(Clone, Copy)]
struct Output(*mut f32);

// SAFETY: tasks write disjoint blocks of the buffer (see `heads_f32`), which outlives them.
unsafe impl Send for Output {}
// SAFETY: as above.
unsafe impl Sync for Output {}

impl Output {
    /// A method, not a field access, so that closures capture the whole `Output` (which is `Sync`).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Attention of every (tile, head) over rotated `qkv` values `[tiles · tokens, 3·hidden]`.
fn heads_f32(qkv: &[f32], tiles: usize, g: &Geometry) -> Vec<f32> {
    let (t, d, dh) = (g.tokens, g.hidden, g.head_dim);
    assert_eq!(qkv.len(), tiles * t * 3 * d, "qkv length disagrees with the geometry");
    let mut out = vec![0f32; tiles * t * d];
    let output = Output(out.as_mut_ptr());
    let (row, t_i, d_i) = ((3 * d) as isize, t as isize, d as isize);
    (0..tiles * g.heads).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |scores, task| {
            let (tile, head) = (task / g.heads, task % g.heads);
            // q, k and v of this (tile, head): `t` rows `3·d` apart, `dh` values each.
            let first = tile * t * 3 * d + head * dh;
            let (q, k, v) = (&qkv[first..], &qkv[first + d..], &qkv[first + 2 * d..]);
            // SAFETY (both products): the largest index read from q, k or v is
            // `(t-1)·3d + dh - 1 + 2d` past `first`, inside this tile's rows of `qkv` (whose
            // length is asserted above); `scores` is `t × t`; the output block is rows
            // `tile·t..(tile+1)·t`, columns `head·dh..(head+1)·dh` of `out` (`[tiles·t, d]`),
            // written by this task only, while `out` is alive and otherwise untouched.
            unsafe {
                // scores[i][j] = q_i · k_j: q `[t, dh]` (row stride 3d), kᵀ `[dh, t]` (row stride
                // 1, column stride 3d).
                gemm::gemm(
                    t,
                    t,
                    dh,
                    scores.as_mut_ptr(),
                    1,
                    t_i,
                    false,
                    q.as_ptr(),
                    1,
                    row,
                    k.as_ptr(),
                    row,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                rows::softmax_rows(scores, t);
                // out[i][head] = Σ_j p_ij v_j: p `[t, t]`, v `[t, dh]` (row stride 3d).
                gemm::gemm(
                    t,
                    dh,
                    t,
                    output.at(tile * t * d + head * dh),
                    1,
                    d_i,
                    false,
                    scores.as_ptr(),
                    1,
                    t_i,
                    v.as_ptr(),
                    1,
                    row,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// The same computation with candle's ops, for any dtype and device.
pub(super) fn attention_candle(qkv: &Tensor, g: &Geometry, rope: &RopeTable) -> Result<Tensor> {
    let rows = qkv.dim(0)?;
    let tiles = rows / g.tokens;
    let dtype = qkv.dtype();
    let dev = qkv.device();
    let table = |v: &[f32]| Tensor::from_slice(v, (g.tokens, g.head_dim / 2), dev);
    let qkv = qkv.reshape((tiles, g.tokens, 3, g.heads, g.head_dim))?;
    // [tiles, heads, tokens, head_dim] each.
    let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
    let rotate = |x: Tensor, cos: &[f32], sin: &[f32]| -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?, &table(cos)?, &table(sin)?)?.to_dtype(dtype)?)
    };
    let q = rotate(part(0)?, &rope.cos_q, &rope.sin_q)?;
    let k = rotate(part(1)?, &rope.cos, &rope.sin)?;
    let v = part(2)?;
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((rows, g.hidden))?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::vision::encoder::{ClassToken, RopeAxes, rope_table};

    /// The f32 path (strided gemm per head, in-place rotation and softmax) against candle's ops.
    #[test]
    fn the_fast_path_computes_what_candles_ops_compute() {
        let g = Geometry::for_tests();
        let rope = rope_table(&g, 10_000.0, ClassToken::Last, RopeAxes::ColumnFirst);
        let tiles = 3;
        let n = tiles * g.tokens * 3 * g.hidden;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let qkv = Tensor::from_vec(values, (tiles * g.tokens, 3 * g.hidden), &Device::Cpu).expect("qkv");
        let want = attention_candle(&qkv, &g, &rope).and_then(|t| Ok(t.to_vec2::<f32>()?)).expect("candle");
        let got = attention(qkv.copy().expect("copy"), &g, &rope).and_then(|t| Ok(t.to_vec2::<f32>()?)).expect("fast");
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
