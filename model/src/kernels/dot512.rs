//! The dot-product form on AVX-512, for 1 to 8 rows: 16 weights at a time are loaded (widened to
//! f32 from bf16, or dequantised, as they are loaded) and multiplied into `M` rows for `O` output
//! features at once, so that `O × M` independent accumulators hide the latency of the fused
//! multiply-adds; one horizontal sum per output at the end. Each weight row is read once from
//! memory for all rows.

use std::arch::x86_64::*;

use super::source::MatrixSource;

const LANES: usize = 16;

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x` (`[m, k]`, 1 ≤ m ≤ 8).
pub fn features_of<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    assert!(super::outer::available(), "the AVX-512 dot form needs AVX-512");
    // SAFETY: the CPU has AVX-512F (asserted above); every slice bound is asserted inside.
    unsafe {
        match m {
            1 => features::<8, 1, S>(x, w, yt),
            2 => features::<6, 2, S>(x, w, yt),
            3 => features::<4, 3, S>(x, w, yt),
            4 => features::<4, 4, S>(x, w, yt),
            5 => features::<3, 5, S>(x, w, yt),
            6 => features::<3, 6, S>(x, w, yt),
            7 => features::<2, 7, S>(x, w, yt),
            _ => features::<2, 8, S>(x, w, yt),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn features<const O: usize, const M: usize, S: MatrixSource>(x: &[f32], w: S, yt: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    assert!(x.len() == M * k && yt.len() == n * M);
    let mut prepared = Vec::new();
    let mut o = 0;
    while o + O <= n {
        w.prepare(o, O, &mut prepared);
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { block::<O, M, S>(x, w, o, k, &prepared, &mut yt[o * M..(o + O) * M]) };
        o += O;
    }
    while o < n {
        w.prepare(o, 1, &mut prepared);
        // SAFETY: as above, one row.
        unsafe { block::<1, M, S>(x, w, o, k, &prepared, &mut yt[o * M..(o + 1) * M]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<const O: usize, const M: usize, S: MatrixSource>(
    x: &[f32],
    w: S,
    first: usize,
    k: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let body = k - k % LANES;
    let pairs = k - k % (2 * LANES);
    let mut acc = [[_mm512_setzero_ps(); M]; O];
    let xp = x.as_ptr();
    // 32 weights a step (int4 unpacks them with one load), then a last 16 if `k` has one.
    for i in (0..pairs).step_by(2 * LANES) {
        // SAFETY: i + 32 ≤ k and rows first..first+O exist, so every load stays within its row.
        unsafe {
            let wv: [(__m512, __m512); O] = std::array::from_fn(|a| w.load32_prepared(first, a, i, prepared));
            let x0: [__m512; M] = std::array::from_fn(|r| _mm512_loadu_ps(xp.add(r * k + i)));
            let x1: [__m512; M] = std::array::from_fn(|r| _mm512_loadu_ps(xp.add(r * k + i + LANES)));
            for (row, (w0, w1)) in acc.iter_mut().zip(&wv) {
                for ((sum, a), b) in row.iter_mut().zip(&x0).zip(&x1) {
                    *sum = _mm512_fmadd_ps(*w1, *b, _mm512_fmadd_ps(*w0, *a, *sum));
                }
            }
        }
    }
    for i in (pairs..body).step_by(LANES) {
        // SAFETY: i + 16 ≤ k and rows first..first+O exist, so every load stays within its row.
        unsafe {
            let wv: [__m512; O] = std::array::from_fn(|a| w.load16_prepared(first, a, i, prepared));
            let xv: [__m512; M] = std::array::from_fn(|r| _mm512_loadu_ps(xp.add(r * k + i)));
            for (row, w) in acc.iter_mut().zip(&wv) {
                for (sum, x) in row.iter_mut().zip(&xv) {
                    *sum = _mm512_fmadd_ps(*w, *x, *sum);
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(*v);
            for i in body..k {
                sum += w.widen(first + a, i) * x[r * k + i];
            }
            yt[a * M + r] = sum;
        }
    }
}
