//! The outer-product form for 9 to 64 rows, AVX-512: `x` is transposed once to `xt` `[k, 16·V]`
//! (rows padded to whole vectors), then a block of `O` weight rows is streamed element by element,
//! each element broadcast and multiplied into `V` vectors of rows held in `O × V` accumulators. Per
//! `k` step: `O` broadcasts and `V` loads for `O · V` fused multiply-adds, with `xt` in L1/L2.

use std::arch::x86_64::*;

use super::source::MatrixSource;

/// Rows of `x` up to which a block of `x` stays in L2 (64 rows of 4,096 floats: 1 MiB).
pub const MAX_ROWS: usize = 64;
pub const LANES: usize = 16;

pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x`, given as
/// [`super::transpose_padded`]`(x, m, k, LANES)` left it.
pub fn features_of<S: MatrixSource>(xt: &[f32], m: usize, w: S, yt: &mut [f32]) {
    assert!(available(), "the outer-product form needs AVX-512");
    // SAFETY: the CPU has AVX-512F (asserted above); every slice bound is asserted inside.
    unsafe {
        match m.div_ceil(LANES) {
            1 => features::<12, 1, S>(xt, w, m, yt),
            2 => features::<8, 2, S>(xt, w, m, yt),
            3 => features::<6, 3, S>(xt, w, m, yt),
            _ => features::<5, 4, S>(xt, w, m, yt),
        }
    }
}

/// Every output feature of `w` (`[n, k]`) in blocks of `O`, the remainder one at a time.
#[target_feature(enable = "avx512f")]
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
#[target_feature(enable = "avx512f")]
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
    let mut acc = [[_mm512_setzero_ps(); V]; O];
    let xp = xt.as_ptr();
    // Weights are widened 16 at a time into a buffer the broadcasts read from: a bf16 or quantized
    // weight then costs one vector conversion per 16, not a scalar conversion per use.
    let body = k - k % LANES;
    let mut widened = [[0f32; LANES]; O];
    for i0 in (0..body).step_by(LANES) {
        for (a, buf) in widened.iter_mut().enumerate() {
            // SAFETY: i0 + 16 ≤ k: 16 weights of row `first + a` are readable; `buf` holds 16 floats.
            unsafe { _mm512_storeu_ps(buf.as_mut_ptr(), w.load16_prepared(first, a, i0, prepared)) };
        }
        #[allow(clippy::needless_range_loop)] // `j` is a column of every row of `widened`
        for j in 0..LANES {
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
            let dst = &mut yt[a * m + first..a * m + first + lanes];
            // SAFETY: `dst` has `lanes` elements and the mask writes exactly that many.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), (1u32 << lanes).wrapping_sub(1) as u16, *sum) };
        }
    }
}

/// One step of `k`: every accumulator gets its output's weight times its vector of rows.
///
/// # Safety
/// `V` vectors of 16 floats must be readable from `xrow`; the caller is compiled with AVX-512F
/// (this is inlined into it).
#[inline(always)]
unsafe fn step<const O: usize, const V: usize>(acc: &mut [[__m512; V]; O], xrow: *const f32, weights: [f32; O]) {
    // SAFETY: as the caller guarantees.
    unsafe {
        let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(xrow.add(v * LANES)));
        for (row, weight) in acc.iter_mut().zip(weights) {
            let wb = _mm512_set1_ps(weight);
            for (sum, x) in row.iter_mut().zip(&xv) {
                *sum = _mm512_fmadd_ps(wb, *x, *sum);
            }
        }
    }
}
