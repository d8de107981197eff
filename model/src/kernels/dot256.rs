//! The dot-product form on AVX2, for 1 to 8 rows, on CPUs without AVX-512: 32 weights at a time
//! are loaded (widened to f32 from bf16, or dequantised, in registers) as four 8-wide vectors and
//! multiplied into `M` rows for `O` output features at once. With few rows each accumulator is
//! split in `A` (even and odd vectors), so that at least eight independent chains of fused
//! multiply-adds hide their latency within AVX2's sixteen registers; one horizontal sum per output
//! at the end. Each weight row is read once from memory for all rows.

use std::arch::x86_64::*;

use super::source::{MatrixSource, prefetch_ahead};

const LANES: usize = 8;
/// Weights per step: four vectors.
const STEP: usize = 4 * LANES;

pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x` (`[m, k]`, 1 ≤ m ≤ 8).
pub fn features_of<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    assert!(available(), "the AVX2 dot form needs AVX2 and FMA");
    // SAFETY: the CPU has AVX2 and FMA (asserted above); every slice bound is asserted inside.
    unsafe {
        match m {
            1 => features::<4, 1, 2, S>(x, w, yt),
            2 => features::<2, 2, 2, S>(x, w, yt),
            3 => features::<3, 3, 1, S>(x, w, yt),
            4 => features::<2, 4, 1, S>(x, w, yt),
            5 => features::<2, 5, 1, S>(x, w, yt),
            6 => features::<2, 6, 1, S>(x, w, yt),
            7 => features::<1, 7, 1, S>(x, w, yt),
            _ => features::<1, 8, 1, S>(x, w, yt),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn features<const O: usize, const M: usize, const A: usize, S: MatrixSource>(x: &[f32], w: S, yt: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    assert!(x.len() == M * k && yt.len() == n * M);
    // Every row's prepared state at once (quantized: the task's scales widened in one loop), each
    // block reading its rows' part.
    let (mut prepared, stride) = (Vec::new(), w.prepared_stride());
    w.prepare(0, n, &mut prepared);
    let mut o = 0;
    while o + O <= n {
        let prepared = &prepared[o * stride..];
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { block::<O, M, A, S>(x, w, o, k, prepared, &mut yt[o * M..(o + O) * M]) };
        o += O;
    }
    while o < n {
        let prepared = &prepared[o * stride..];
        // SAFETY: as above, one row.
        unsafe { block::<1, M, 2, S>(x, w, o, k, prepared, &mut yt[o * M..(o + 1) * M]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const O: usize, const M: usize, const A: usize, S: MatrixSource>(
    x: &[f32],
    w: S,
    first: usize,
    k: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let steps = k - k % STEP;
    let body = k - k % (2 * LANES);
    let mut acc = [[[_mm256_setzero_ps(); A]; M]; O];
    let xp = x.as_ptr();
    let ahead = prefetch_ahead(O, k);
    for i in (0..steps).step_by(STEP) {
        // SAFETY: i + 32 ≤ k and rows first..first+O exist, so every load stays within its row.
        unsafe {
            let xv: [[__m256; 4]; M] =
                std::array::from_fn(|r| std::array::from_fn(|v| _mm256_loadu_ps(xp.add(r * k + i + v * LANES))));
            for (a, row) in acc.iter_mut().enumerate() {
                w.prefetch(first + a, i + ahead);
                let wv = w.load32_avx2(first, a, i, prepared);
                for (sums, xs) in row.iter_mut().zip(&xv) {
                    for v in 0..4 {
                        sums[v % A] = _mm256_fmadd_ps(wv[v], xs[v], sums[v % A]);
                    }
                }
            }
        }
    }
    // A last 16 if `k` has one.
    for i in (steps..body).step_by(2 * LANES) {
        // SAFETY: i + 16 ≤ k and rows first..first+O exist, so every load stays within its row.
        unsafe {
            for (a, row) in acc.iter_mut().enumerate() {
                let wv = w.load16_avx2(first, a, i, prepared);
                for (r, sums) in row.iter_mut().enumerate() {
                    for (v, wv) in wv.iter().enumerate() {
                        sums[v % A] = _mm256_fmadd_ps(*wv, _mm256_loadu_ps(xp.add(r * k + i + v * LANES)), sums[v % A]);
                    }
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, sums) in row.iter().enumerate() {
            let mut sum = reduce(sums.iter().fold(_mm256_setzero_ps(), |t, s| _mm256_add_ps(t, *s)));
            for i in body..k {
                sum += w.widen(first + a, i) * x[r * k + i];
            }
            yt[a * M + r] = sum;
        }
    }
}

/// The sum of the eight lanes of `v`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn reduce(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}
