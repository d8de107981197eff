//! The dot-product form, for up to [`MAX_ROWS`] rows: vectors along `k`, each weight row read once
//! from memory for every input row while it is in L1, one horizontal sum per output. AVX2 when the
//! CPU has it (the same code compiled with 8-wide vectors), else portable. Weights from any
//! [`MatrixSource`], widened to f32 (or dequantised) as they are loaded.

use super::source::MatrixSource;

/// Rows of `x` per pass over a weight row: the accumulators stay in registers.
const ROW_BLOCK: usize = 4;
/// Up to this many rows the dot-product form is used.
pub const MAX_ROWS: usize = 8;

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`) and row `r` of `x` (`[m, k]`).
pub fn features<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { avx2(x, m, w, yt) };
            return;
        }
    }
    dot_block(x, m, w, yt);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    // The same code, compiled with 8-wide vectors.
    dot_block(x, m, w, yt);
}

#[inline(always)]
fn dot_block<S: MatrixSource>(x: &[f32], m: usize, w: S, yt: &mut [f32]) {
    const LANES: usize = 8;
    let (n, k) = (w.n(), w.k());
    let tail = k - k % LANES;
    for o in 0..n {
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(ROW_BLOCK);
            let mut acc = [[0f32; LANES]; ROW_BLOCK];
            for i in (0..tail).step_by(LANES) {
                let mut wv = [0f32; LANES];
                for (l, v) in wv.iter_mut().enumerate() {
                    *v = w.widen(o, i + l);
                }
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
                for (i, xv) in xr.iter().enumerate().skip(tail) {
                    sum += w.widen(o, i) * xv;
                }
                yt[o * m + r0 + r] = sum;
            }
            r0 += rows;
        }
    }
}
