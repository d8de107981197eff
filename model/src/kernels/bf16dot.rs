//! bf16 products (`--activations bf16`) on AVX512-BF16, for products of one row (a decode step's
//! every product at batch 1, and most expert products at small batches): the row is rounded to
//! bf16 once (round to nearest even), then multiplied with bf16 weights by `vdpbf16ps`, which sums
//! the products of two adjacent `k` into each f32 lane, using the weights as stored (no widening).
//! Sums stay f32. `O` outputs of accumulators, 32 weights a step, one horizontal sum per output.
//!
//! Why only one row: on the Intel Xeon this was measured on, `vdpbf16ps` retires one every two
//! cycles (32 multiply-adds) where two f32 FMAs (32 multiply-adds) retire every cycle, so the
//! instruction only wins where the widening it saves is the bottleneck: a one-row product (batch 1:
//! +11 % tokens/s), not several rows, whose f32 forms share one widening among all rows (an outer
//! form over pairs of `k` for 9–64 rows was built and measured 8–14 % slower at batch 32/64; see
//! docs/benchmarks.md, "bf16 mode").

use std::arch::x86_64::*;

use half::bf16;

/// The rows of a product the bf16 form takes.
pub const MAX_ROWS: usize = 1;

/// Whether this CPU runs the bf16 form: AVX-512 kernels chosen ([`super::isa`]) and AVX512-BF16.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| super::isa() == super::Isa::Avx512 && std::is_x86_feature_detected!("avx512bf16"))
}

/// Whether the bf16 form takes a product of `m` rows on this CPU.
pub fn takes(m: usize) -> bool {
    m <= MAX_ROWS && available()
}

/// A product's row rounded to bf16.
pub struct Bf16Rows {
    k: usize,
    row: Vec<bf16>,
}

impl Bf16Rows {
    /// `x` (`[1, k]`) rounded to bf16.
    pub fn stage(x: &[f32], k: usize) -> Self {
        assert_eq!(x.len(), k, "bf16 row: length disagrees with the shape");
        Bf16Rows { k, row: x.iter().map(|&v| bf16::from_f32(v)).collect() }
    }
}

/// `yt[o]` for every feature `o` of `w` (`[n, k]`, bf16) and the row `x`.
pub fn features_of(x: &Bf16Rows, w: &[bf16], yt: &mut [f32]) {
    assert!(available(), "the bf16 form needs AVX-512 and AVX512-BF16");
    let k = x.k;
    let n = w.len().checked_div(k).unwrap_or(0);
    assert!(w.len() == n * k && yt.len() == n, "bf16 product: lengths disagree with the shapes");
    // SAFETY: the CPU has AVX-512F and AVX512-BF16 (asserted above); the lengths are checked.
    unsafe { dot::<8, 1>(&x.row, w, k, yt) }
}

/// 32 bf16 from `p` as the instruction's operand type.
#[inline(always)]
unsafe fn load32(p: *const bf16) -> __m512bh {
    // SAFETY: the caller guarantees 32 readable elements; the two types are 64 bytes of bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot<const O: usize, const M: usize>(x: &[bf16], w: &[bf16], k: usize, yt: &mut [f32]) {
    let n = w.len() / k.max(1);
    assert!(x.len() == M * k && yt.len() == n * M);
    let mut o = 0;
    while o + O <= n {
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { dot_block::<O, M>(x, w, o, k, &mut yt[o * M..(o + O) * M]) };
        o += O;
    }
    while o < n {
        // SAFETY: as above, one row.
        unsafe { dot_block::<1, M>(x, w, o, k, &mut yt[o * M..(o + 1) * M]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_block<const O: usize, const M: usize>(x: &[bf16], w: &[bf16], first: usize, k: usize, yt: &mut [f32]) {
    let body = k - k % 32;
    let mut acc = [[_mm512_setzero_ps(); M]; O];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for i in (0..body).step_by(32) {
        // SAFETY: i + 32 ≤ k: rows first..first+O of `w` and every row of `x` hold 32 elements here.
        unsafe {
            let wv: [__m512bh; O] = std::array::from_fn(|a| load32(wp.add((first + a) * k + i)));
            let xv: [__m512bh; M] = std::array::from_fn(|r| load32(xp.add(r * k + i)));
            for (row, wa) in acc.iter_mut().zip(&wv) {
                for (sum, xr) in row.iter_mut().zip(&xv) {
                    *sum = _mm512_dpbf16_ps(*sum, *wa, *xr);
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(*v);
            for i in body..k {
                sum += w[(first + a) * k + i].to_f32() * x[r * k + i].to_f32();
            }
            yt[a * M + r] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row, with `k` a multiple of 32, even but not, and odd, against the f64 product of the
    /// bf16-rounded row and the bf16 weights; the staging only takes one row.
    #[test]
    fn the_bf16_form_matches_the_product_of_the_rounded_row() {
        assert!(!takes(2), "products of several rows stay on the f32 forms");
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (or EPSERVE_KERNEL_ISA chose a lesser set)");
            return;
        }
        let n = 37;
        for k in [64, 100, 67] {
            let w: Vec<bf16> = crate::kernels::test_values(n * k, 7).into_iter().map(bf16::from_f32).collect();
            let x = crate::kernels::test_values(k, 1);
            let mut yt = vec![0f32; n];
            features_of(&Bf16Rows::stage(&x, k), &w, &mut yt);
            for o in 0..n {
                let want: f64 =
                    (0..k).map(|i| f64::from(w[o * k + i].to_f32()) * f64::from(bf16::from_f32(x[i]).to_f32())).sum();
                let got = f64::from(yt[o]);
                assert!((got - want).abs() < 1e-4, "k {k} o {o}: {got} vs {want}");
            }
        }
    }
}
