//! The outer-product form for 9 to 64 rows on AVX2 (CPUs without AVX-512): as [`super::outer`],
//! with 8-wide vectors. `x` is transposed once to `xt` `[k, 8·V]` (rows padded to whole vectors),
//! then a block of `O` weight rows is widened 16 weights at a time into a buffer and streamed
//! element by element, each element broadcast and multiplied into `V` vectors of rows held in
//! `O × V` accumulators (at most 12 of AVX2's 16 registers). Per `k` step: `O` broadcasts and `V`
//! loads for `O · V` fused multiply-adds, with `xt` in L1/L2.

use std::arch::x86_64::*;

use super::source::MatrixSource;

/// Rows of `x` up to which a block of `x` stays in L2 (64 rows of 4,096 floats: 1 MiB).
pub const MAX_ROWS: usize = 64;
pub const LANES: usize = 8;
/// Weights widened at a time into the broadcast buffer.
const WIDEN: usize = 16;

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x`, given as
/// [`super::transpose_padded`]`(x, m, k, LANES)` left it.
pub fn features_of<S: MatrixSource>(xt: &[f32], m: usize, w: S, yt: &mut [f32]) {
    assert!(super::dot256::available(), "the AVX2 outer-product form needs AVX2 and FMA");
    // SAFETY: the CPU has AVX2 and FMA (asserted above); every slice bound is asserted inside.
    unsafe {
        match m.div_ceil(LANES) {
            1 => features::<8, 1, S>(xt, w, m, yt),
            2 => features::<6, 2, S>(xt, w, m, yt),
            3 => features::<4, 3, S>(xt, w, m, yt),
            4 => features::<3, 4, S>(xt, w, m, yt),
            5 => features::<2, 5, S>(xt, w, m, yt),
            6 => features::<2, 6, S>(xt, w, m, yt),
            7 => features::<1, 7, S>(xt, w, m, yt),
            _ => features::<1, 8, S>(xt, w, m, yt),
        }
    }
}

/// Every output feature of `w` (`[n, k]`) in blocks of `O`, the remainder one at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn features<const O: usize, const V: usize, S: MatrixSource>(xt: &[f32], w: S, m: usize, yt: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    assert!(xt.len() >= k * V * LANES && yt.len() == n * m && m <= V * LANES);
    let mut prepared = Vec::new();
    let mut o = 0;
    while o + O <= n {
        w.prepare(o, O, &mut prepared);
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { block::<O, V, S>(xt, w, o, k, m, &prepared, &mut yt[o * m..(o + O) * m]) };
        o += O;
    }
    while o < n {
        w.prepare(o, 1, &mut prepared);
        // SAFETY: as above, one row.
        unsafe { block::<1, V, S>(xt, w, o, k, m, &prepared, &mut yt[o * m..(o + 1) * m]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const O: usize, const V: usize, S: MatrixSource>(
    xt: &[f32],
    w: S,
    first: usize,
    k: usize,
    m: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let stride = V * LANES;
    let mut acc = [[_mm256_setzero_ps(); V]; O];
    let xp = xt.as_ptr();
    let body = k - k % WIDEN;
    let mut widened = [[0f32; WIDEN]; O];
    for i0 in (0..body).step_by(WIDEN) {
        for (a, buf) in widened.iter_mut().enumerate() {
            // SAFETY: i0 + 16 ≤ k: 16 weights of row `first + a` are readable; `buf` holds 16 floats.
            unsafe {
                let [lo, hi] = w.load16_avx2(first, a, i0, prepared);
                _mm256_storeu_ps(buf.as_mut_ptr(), lo);
                _mm256_storeu_ps(buf.as_mut_ptr().add(LANES), hi);
            }
        }
        #[allow(clippy::needless_range_loop)] // `j` is a column of every row of `widened`
        for j in 0..WIDEN {
            // SAFETY: i0 + j < k.
            unsafe { step(&mut acc, xp.add((i0 + j) * stride), std::array::from_fn(|a| widened[a][j])) };
        }
    }
    for i in body..k {
        // SAFETY: i < k.
        unsafe { step(&mut acc, xp.add(i * stride), std::array::from_fn(|a| w.widen(first + a, i))) };
    }
    for (a, row) in acc.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            let first = v * LANES;
            let lanes = (m - first).min(LANES);
            let mut lane_values = [0f32; LANES];
            // SAFETY: `lane_values` holds 8 floats.
            unsafe { _mm256_storeu_ps(lane_values.as_mut_ptr(), *sum) };
            yt[a * m + first..a * m + first + lanes].copy_from_slice(&lane_values[..lanes]);
        }
    }
}

/// One step of `k`: every accumulator gets its output's weight times its vector of rows.
///
/// # Safety
/// `V` vectors of 8 floats must be readable from `xrow`; the caller is compiled with AVX2 and FMA
/// (this is inlined into it).
#[inline(always)]
unsafe fn step<const O: usize, const V: usize>(acc: &mut [[__m256; V]; O], xrow: *const f32, weights: [f32; O]) {
    // SAFETY: as the caller guarantees.
    unsafe {
        let xv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(xrow.add(v * LANES)));
        for (row, weight) in acc.iter_mut().zip(weights) {
            let wb = _mm256_set1_ps(weight);
            for (sum, x) in row.iter_mut().zip(&xv) {
                *sum = _mm256_fmadd_ps(wb, *x, *sum);
            }
        }
    }
}
