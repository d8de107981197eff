//! Plain-Rust f32 kernels for the products candle's CPU gemm handles poorly: a weight streamed once
//! against a handful of rows, as in decode-time expert products (a batch of 32 tokens gives each of
//! 16 experts about two rows). candle packs both operands and pays a fixed cost per op, which at
//! that shape halves the bandwidth the weight streams at (docs/benchmarks.md); here each weight row
//! is read once from memory and multiplied against every input row while it is in L1.

use rayon::prelude::*;

/// Rows of `x` per pass over a weight row: the accumulators stay in registers.
const ROW_BLOCK: usize = 4;
/// Output features per parallel task.
const TASK_FEATURES: usize = 128;

/// `yᵀ[o][r] = Σ_i x[r][i] · w[o][i]` for `x` `[m, k]` and `w` `[n, k]`, both row-major; writes
/// `yt` `[n, m]` (transposed: each task owns a contiguous range of output features). Runs on
/// rayon's pool, split by output features.
pub fn rows_times_weight_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, yt: &mut [f32]) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(yt.len(), n * m);
    if m == 0 || n == 0 {
        return;
    }
    yt.par_chunks_mut(TASK_FEATURES * m).enumerate().for_each(|(task, out)| {
        let first = task * TASK_FEATURES;
        let features = out.len() / m;
        dot_block_dispatch(x, m, &w[first * k..(first + features) * k], features, k, out);
    });
}

fn dot_block_dispatch(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { dot_block_avx2(x, m, w, n, k, yt) };
            return;
        }
    }
    dot_block(x, m, w, n, k, yt);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, yt: &mut [f32]) {
    // The same code, compiled with 8-wide vectors.
    dot_block(x, m, w, n, k, yt);
}

#[inline(always)]
fn dot_block(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, yt: &mut [f32]) {
    const LANES: usize = 8;
    let tail = k - k % LANES;
    for o in 0..n {
        let row = &w[o * k..(o + 1) * k];
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(ROW_BLOCK);
            let mut acc = [[0f32; LANES]; ROW_BLOCK];
            for i in (0..tail).step_by(LANES) {
                let wv = &row[i..i + LANES];
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let xs = &x[(r0 + r) * k + i..(r0 + r) * k + i + LANES];
                    for l in 0..LANES {
                        a[l] += wv[l] * xs[l];
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                let mut sum: f32 = a.iter().sum();
                for i in tail..k {
                    sum += row[i] * xr[i];
                }
                yt[o * m + r0 + r] = sum;
            }
            r0 += rows;
        }
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor; `None` for any other tensor.
pub(crate) fn with_f32<T>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> T) -> Option<T> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return None };
    let data = cpu.as_slice::<f32>().ok()?;
    let start = layout.start_offset();
    Some(f(data.get(start..start + t.elem_count())?))
}

/// `x · Wᵀ` for f32 `x` `[m, k]` and `w` `[n, k]` on the CPU, `m` ≤ [`SKINNY_ROWS`]; `None` when the
/// tensors are not that (the caller uses candle).
pub(crate) fn skinny_matmul_t(x: &candle_core::Tensor, w: &candle_core::Tensor) -> Option<candle_core::Tensor> {
    let (&[m, k], &[n, k2]) = (x.dims(), w.dims()) else { return None };
    if m > SKINNY_ROWS || k != k2 || x.dtype() != candle_core::DType::F32 || !x.device().is_cpu() {
        return None;
    }
    let mut yt = vec![0f32; n * m];
    with_f32(x, |xs| with_f32(w, |ws| rows_times_weight_t(xs, m, ws, n, k, &mut yt)))??;
    let mut y = vec![0f32; m * n];
    for o in 0..n {
        for r in 0..m {
            y[r * n + o] = yt[o * m + r];
        }
    }
    candle_core::Tensor::from_vec(y, (m, n), x.device()).ok()
}

/// Rows up to which [`skinny_matmul_t`] beats candle's gemm (decode); more rows are compute-bound.
pub const SKINNY_ROWS: usize = 8;

/// One SwiGLU expert on `m` rows, f32: `down(silu(gate(x)) ⊙ up(x))` with `gate_up` `[2·inter, k]`
/// (gate rows first) and `down` `[k_out, inter]`; `out` `[m, k_out]` row-major.
pub fn swiglu_expert(x: &[f32], m: usize, gate_up: &[f32], down: &[f32], inter: usize, out: &mut [f32]) {
    let k = x.len() / m.max(1);
    let k_out = out.len() / m.max(1);
    let mut gu_t = vec![0f32; 2 * inter * m];
    rows_times_weight_t(x, m, gate_up, 2 * inter, k, &mut gu_t);
    // h[r][j] = silu(gate[j][r]) · up[j][r], row-major for the next product.
    let mut h = vec![0f32; m * inter];
    for j in 0..inter {
        for r in 0..m {
            let g = gu_t[j * m + r];
            let u = gu_t[(inter + j) * m + r];
            h[r * inter + j] = g / (1.0 + (-g).exp()) * u;
        }
    }
    let mut y_t = vec![0f32; k_out * m];
    rows_times_weight_t(&h, m, down, k_out, inter, &mut y_t);
    for o in 0..k_out {
        for r in 0..m {
            out[r * k_out + o] = y_t[o * m + r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut yt = vec![0f32; n * m];
        for o in 0..n {
            for r in 0..m {
                yt[o * m + r] = (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w[o * k + i])).sum::<f64>() as f32;
            }
        }
        yt
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::synthetic::SplitMix64::new(seed);
        (0..n).map(|_| (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_a_plain_dot_product_for_every_row_count_and_ragged_sizes() {
        for (m, n, k) in [(1, 3, 5), (2, 257, 64), (3, 130, 37), (4, 128, 512), (5, 300, 24), (9, 16, 100)] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let mut yt = vec![f32::NAN; n * m];
            rows_times_weight_t(&x, m, &w, n, k, &mut yt);
            for (a, b) in yt.iter().zip(reference(&x, m, &w, n, k)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "m={m} n={n} k={k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn swiglu_expert_matches_its_definition() {
        let (m, k, inter) = (3, 40, 24);
        let (x, gu, down) = (values(m * k, 3), values(2 * inter * k, 4), values(k * inter, 5));
        let mut out = vec![0f32; m * k];
        swiglu_expert(&x, m, &gu, &down, inter, &mut out);
        for r in 0..m {
            let proj = |o: usize| (0..k).map(|i| x[r * k + i] * gu[o * k + i]).sum::<f32>();
            let h: Vec<f32> = (0..inter).map(|j| proj(j) / (1.0 + (-proj(j)).exp()) * proj(inter + j)).collect();
            for o in 0..k {
                let want: f32 = (0..inter).map(|j| h[j] * down[o * inter + j]).sum();
                assert!((out[r * k + o] - want).abs() <= 1e-4 * (1.0 + want.abs()), "{r},{o}");
            }
        }
    }
}
