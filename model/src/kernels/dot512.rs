//! The dot-product form on AVX-512, for 1 to 8 rows: 16 weights at a time are loaded (widened to
//! f32 from bf16, or dequantised, as they are loaded) and multiplied into `M` rows for `O` output
//! features at once, with `A` accumulators per output and row, so that `O × M × A` independent
//! chains hide the latency of the fused multiply-adds; one horizontal sum per output at the end.
//! Each weight row is read once from memory for all rows.
//!
//! Rows of at most [`super::SHORT_ROWS`] weights are read one at a time (`O` = 1, `A` = 2
//! accumulators per output and row; 4 made int8 and int4 2–3× slower at 1–2 rows): a task's weights are then one sequential stream, which the
//! hardware prefetcher follows, where `O` interleaved rows of 1–2 KB each are streams too short for
//! it to learn (mini's `[2048, 512]` product at one row: 1.3–1.5× faster one row at a time on AMD
//! Zen 4). Longer rows (Scout's) keep `O` rows at once with one accumulator each ([`block`], as
//! before): one row at a time was slower at `k` = 4,096, and so were 2 accumulators each for 8 rows
//! at once (register spills). Every source takes the same path for the same shape, so a quantized
//! matrix still gives its dequantised copy's product bit for bit.

use std::arch::x86_64::*;

use super::source::MatrixSource;

const LANES: usize = 16;

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x` (`[m, k]`, 1 ≤ m ≤ 8).
pub fn features_of<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    assert!(super::outer::available(), "the AVX-512 dot form needs AVX-512");
    // SAFETY: the CPU has AVX-512F (asserted above); every slice bound is asserted inside.
    unsafe {
        match (m, w.k() <= super::SHORT_ROWS) {
            // Short rows: one row at a time, a single sequential stream per task.
            (1, true) => features::<1, 1, 2, S>(x, w, yt),
            (2, true) => features::<1, 2, 2, S>(x, w, yt),
            (3, true) => features::<1, 3, 2, S>(x, w, yt),
            (4, true) => features::<1, 4, 2, S>(x, w, yt),
            (5, true) => features::<1, 5, 2, S>(x, w, yt),
            (6, true) => features::<1, 6, 2, S>(x, w, yt),
            (7, true) => features::<1, 7, 2, S>(x, w, yt),
            (_, true) => features::<1, 8, 2, S>(x, w, yt),
            (1, false) => features::<8, 1, 2, S>(x, w, yt),
            (2, false) => features::<6, 2, 2, S>(x, w, yt),
            (3, false) => features::<4, 3, 2, S>(x, w, yt),
            (4, false) => features::<4, 4, 2, S>(x, w, yt),
            (5, false) => features::<3, 5, 2, S>(x, w, yt),
            (6, false) => features::<3, 6, 2, S>(x, w, yt),
            (7, false) => features::<2, 7, 2, S>(x, w, yt),
            (_, false) => features::<2, 8, 2, S>(x, w, yt),
        }
    }
}

/// Every feature of `w`, `O` at a time: `O` = 1 reads one row at a time with `A` accumulators per
/// row ([`rows_block`]); `O` > 1 interleaves `O` rows with one accumulator each ([`block`], which
/// ignores `A`).
#[target_feature(enable = "avx512f")]
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
        unsafe {
            if O == 1 {
                rows_block::<1, M, A, S>(x, w, o, k, prepared, &mut yt[o * M..(o + 1) * M])
            } else {
                block::<O, M, S>(x, w, o, k, prepared, &mut yt[o * M..(o + O) * M])
            }
        };
        o += O;
    }
    while o < n {
        let prepared = &prepared[o * stride..];
        // SAFETY: as above, one row.
        unsafe {
            if O == 1 {
                rows_block::<1, M, A, S>(x, w, o, k, prepared, &mut yt[o * M..(o + 1) * M])
            } else {
                block::<1, M, S>(x, w, o, k, prepared, &mut yt[o * M..(o + 1) * M])
            }
        };
        o += 1;
    }
}

/// Rows `first..first + O` of `w` (one, as called) against every row of `x`, with `A` (2 or 4)
/// accumulators per output and row: `16 · A` weights of a row a step.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows_block<const O: usize, const M: usize, const A: usize, S: MatrixSource>(
    x: &[f32],
    w: S,
    first: usize,
    k: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let steps = k - k % (LANES * A);
    let pairs = k - k % (2 * LANES);
    let body = k - k % LANES;
    let mut acc = [[[_mm512_setzero_ps(); A]; M]; O];
    let xp = x.as_ptr();
    // 16·A weights a step, loaded 32 at a time (int4 unpacks them with one load), then the 32s
    // left, then a last 16 if `k` has one.
    for i in (0..steps).step_by(LANES * A) {
        // SAFETY: i + 16·A ≤ k and rows first..first+O exist, so every load stays within its row.
        unsafe {
            let wv: [[__m512; A]; O] = std::array::from_fn(|a| {
                let mut v = [_mm512_setzero_ps(); A];
                for h in 0..A / 2 {
                    (v[2 * h], v[2 * h + 1]) = w.load32_prepared(first, a, i + 2 * LANES * h, prepared);
                }
                v
            });
            for r in 0..M {
                let xv: [__m512; A] = std::array::from_fn(|v| _mm512_loadu_ps(xp.add(r * k + i + v * LANES)));
                for (row, wa) in acc.iter_mut().zip(&wv) {
                    for ((sum, w), x) in row[r].iter_mut().zip(wa).zip(&xv) {
                        *sum = _mm512_fmadd_ps(*w, *x, *sum);
                    }
                }
            }
        }
    }
    for i in (steps..pairs).step_by(2 * LANES) {
        // SAFETY: i + 32 ≤ k, as above.
        unsafe {
            for (a, row) in acc.iter_mut().enumerate() {
                let (w0, w1) = w.load32_prepared(first, a, i, prepared);
                for (r, sums) in row.iter_mut().enumerate() {
                    sums[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(r * k + i)), sums[0]);
                    sums[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(r * k + i + LANES)), sums[1]);
                }
            }
        }
    }
    for i in (pairs..body).step_by(LANES) {
        // SAFETY: i + 16 ≤ k, as above.
        unsafe {
            for (a, row) in acc.iter_mut().enumerate() {
                let wa = w.load16_prepared(first, a, i, prepared);
                for (r, sums) in row.iter_mut().enumerate() {
                    sums[0] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(xp.add(r * k + i)), sums[0]);
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, sums) in row.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(sums.iter().fold(_mm512_setzero_ps(), |t, s| _mm512_add_ps(t, *s)));
            for i in body..k {
                sum += w.widen(first + a, i) * x[r * k + i];
            }
            yt[a * M + r] = sum;
        }
    }
}

/// Rows `first..first + O` of `w` against every row of `x`, one accumulator per output and row.
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
