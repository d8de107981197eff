//! The outer-product form for 9 to 64 rows, AVX-512: `x` is transposed once to `xt` `[k, 16·V]`
//! (rows padded to whole vectors), then a block of `O` weight rows is streamed element by element,
//! each element broadcast and multiplied into `V` vectors of rows held in `O × V` accumulators. Per
//! `k` step: `O` broadcasts and `V` loads for `O · V` fused multiply-adds, with `xt` in L1/L2.

use std::arch::x86_64::*;

use super::Weight;

/// Rows of `x` up to which a block of `x` stays in L2 (64 rows of 4,096 floats: 1 MiB).
pub const MAX_ROWS: usize = 64;
const LANES: usize = 16;

pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// `x` (`[m, k]`) transposed to `[k, 16·V]`, rows padded with zeros to whole vectors.
pub fn transpose_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let padded = m.div_ceil(LANES) * LANES;
    let mut xt = vec![0f32; k * padded];
    for r in 0..m {
        for (i, v) in x[r * k..(r + 1) * k].iter().enumerate() {
            xt[i * padded + r] = *v;
        }
    }
    xt
}

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x`, given as
/// [`transpose_rows`] left it.
pub fn features_of<W: Weight>(xt: &[f32], m: usize, w: &[W], k: usize, yt: &mut [f32]) {
    assert!(available(), "the outer-product form needs AVX-512");
    // SAFETY: the CPU has AVX-512F (asserted above); every slice bound is asserted inside.
    unsafe {
        match m.div_ceil(LANES) {
            1 => features::<12, 1, W>(xt, w, k, m, yt),
            2 => features::<8, 2, W>(xt, w, k, m, yt),
            3 => features::<6, 3, W>(xt, w, k, m, yt),
            _ => features::<5, 4, W>(xt, w, k, m, yt),
        }
    }
}

/// Every output feature of `w` (`[n, k]`) in blocks of `O`, the remainder one at a time.
#[target_feature(enable = "avx512f")]
unsafe fn features<const O: usize, const V: usize, W: Weight>(xt: &[f32], w: &[W], k: usize, m: usize, yt: &mut [f32]) {
    let n = w.len() / k;
    assert!(xt.len() >= k * V * LANES && yt.len() == n * m && m <= V * LANES);
    let mut o = 0;
    while o + O <= n {
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { block::<O, V, W>(xt, &w[o * k..(o + O) * k], k, m, &mut yt[o * m..(o + O) * m]) };
        o += O;
    }
    while o < n {
        // SAFETY: as above, one row.
        unsafe { block::<1, V, W>(xt, &w[o * k..(o + 1) * k], k, m, &mut yt[o * m..(o + 1) * m]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<const O: usize, const V: usize, W: Weight>(xt: &[f32], w: &[W], k: usize, m: usize, yt: &mut [f32]) {
    let stride = V * LANES;
    let mut acc = [[_mm512_setzero_ps(); V]; O];
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    for i in 0..k {
        // SAFETY: i < k, so `xt[i·stride .. (i+1)·stride]` and `w[a·k + i]` are in bounds.
        unsafe {
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xp.add(i * stride + v * LANES));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_ps((*wp.add(a * k + i)).widen());
                for (v, x) in xv.iter().enumerate() {
                    row[v] = _mm512_fmadd_ps(wb, *x, row[v]);
                }
            }
        }
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
