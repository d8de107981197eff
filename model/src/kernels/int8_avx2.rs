//! The int8-activation mode's products on AVX2 (CPUs without AVX512-VNNI): as [`super::vnni`],
//! rows of `x` quantized to int8 with one scale per 32 values, multiplied against int8 or int4
//! weight codes in integers, one conversion and one scaled FMA per 32 weights and row.
//!
//! AVX2 has no `vpdpbusd`; `vpmaddubsw` multiplies unsigned bytes by signed ones and adds pairs
//! into 16-bit lanes, then `vpmaddwd` against ones adds pairs of those into 32-bit lanes (each lane
//! the sum of 4 consecutive products, as `vpdpbusd`'s). The weights are made unsigned by taking
//! their magnitude and moving their sign onto the activations (`|w| · (q · sign w)`, `vpsignb`):
//! `|w| ≤ 128` and `|q| ≤ 127`, so a pair sums to at most 32,512 and the 16-bit lanes never
//! saturate. The integer sums are exact, as on VNNI; only the order in which the scaled block sums
//! are added differs.
//!
//! Taken for 1 to 8 rows when the row length is a multiple of 32 and the weight groups hold 32
//! values or more; anything else is computed by the exact forms.

use std::arch::x86_64::*;

use super::source::{CodeKind, QuantView};

/// Values per activation scale, and per step of the kernel (one 32-byte vector of codes).
const BLOCK: usize = 32;

/// Whether this CPU runs the mode's kernels.
pub fn available() -> bool {
    super::dot256::available()
}

/// Whether a product of `m` rows against `w` is computed here.
pub fn takes(w: &QuantView<'_>, m: usize) -> bool {
    w.int8_activations()
        && matches!(w.kind(), CodeKind::Int8 | CodeKind::Int4)
        && (1..=super::dot::MAX_ROWS).contains(&m)
        && w.k().is_multiple_of(BLOCK)
        && w.group_shift() >= BLOCK.trailing_zeros()
        && super::isa() == super::Isa::Avx2
}

/// Rows `[m, k]` quantized to int8.
#[derive(Debug)]
pub struct Int8Rows {
    m: usize,
    k: usize,
    /// `[m, k]` codes, `round(x / scale)` in −127..=127.
    codes: Vec<i8>,
    /// `[m, k / 32]`: each block's scale, `max |x| / 127`.
    scales: Vec<f32>,
}

impl Int8Rows {
    /// `x` (`[m, k]`, `k` a multiple of 32) quantized as [`super::vnni::Int8Rows::quantize`] does:
    /// per block of 32, the scale `max |x| / 127` and codes rounded to nearest, ties to even; a
    /// block of zeros (or one holding a non-finite value) gets the scale 0.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && x.len() == m * k, "int8 rows: {} values for [{m}, {k}]", x.len());
        let mut codes = vec![0i8; m * k];
        let mut scales = vec![0f32; m * k / BLOCK];
        for ((block, out), scale) in x.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(BLOCK)).zip(&mut scales) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = amax / 127.0;
            if s > 0.0 && s.is_finite() {
                let inv = 127.0 / amax;
                for (c, v) in out.iter_mut().zip(block) {
                    // |v · inv| ≤ 127: the conversion never saturates.
                    *c = (v * inv).round_ties_even() as i8;
                }
                *scale = s;
            }
        }
        Int8Rows { m, k, codes, scales }
    }
}

/// How a code kind's 32 codes become 32 signed bytes, the weights' values, in element order.
trait SignedCodes: Copy {
    const KIND: CodeKind;
    /// # Safety
    /// The 32 codes are readable at `p`; the caller has AVX2.
    unsafe fn load32(p: *const u8) -> __m256i;
}

#[derive(Clone, Copy)]
struct Int8Codes;

impl SignedCodes for Int8Codes {
    const KIND: CodeKind = CodeKind::Int8;

    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        // SAFETY: 32 bytes are readable at `p` (the caller).
        unsafe { _mm256_loadu_si256(p.cast()) }
    }
}

#[derive(Clone, Copy)]
struct Int4Codes;

impl SignedCodes for Int4Codes {
    const KIND: CodeKind = CodeKind::Int4;

    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        // SAFETY: 16 bytes (32 nibbles) are readable at `p` (the caller).
        unsafe {
            // A whole chunk (CodeKind::Int4): its first 16 codes in the low nibbles, its last 16
            // in the high ones, then the stored value + 8 made the value.
            let b = _mm_loadu_si128(p.cast());
            let mask = _mm_set1_epi8(0x0F);
            let codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(b), mask), _mm_and_si128(b, mask));
            _mm256_sub_epi8(codes, _mm256_set1_epi8(8))
        }
    }
}

/// `yt[o][r]` for every output feature `o` of `w` and row `r` of `x`.
pub fn features_of(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    assert!(
        available()
            && matches!(w.kind(), CodeKind::Int8 | CodeKind::Int4)
            && (1..=super::dot::MAX_ROWS).contains(&x.m)
            && w.group_shift() >= BLOCK.trailing_zeros()
            && x.k == w.k()
            && yt.len() == w.n() * x.m,
        "int8-activation product out of its range"
    );
    // SAFETY: the CPU has AVX2 and FMA and the shapes agree (asserted above).
    unsafe {
        match w.kind() {
            CodeKind::Int4 => by_rows::<Int4Codes>(x, w, yt),
            _ => by_rows::<Int8Codes>(x, w, yt),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn by_rows<C: SignedCodes>(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    debug_assert_eq!(w.kind(), C::KIND);
    // SAFETY: as the caller guarantees.
    unsafe {
        match x.m {
            1 => features::<4, 1, C>(x, w, yt),
            2 => features::<4, 2, C>(x, w, yt),
            3 => features::<3, 3, C>(x, w, yt),
            4 => features::<2, 4, C>(x, w, yt),
            5 | 6 => features::<2, 6, C>(x, w, yt),
            _ => features::<1, 8, C>(x, w, yt),
        }
    }
}

/// `M` is the most rows a block holds (`x.m ≤ M`); rows past `x.m` are skipped.
#[target_feature(enable = "avx2,fma")]
unsafe fn features<const O: usize, const M: usize, C: SignedCodes>(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    let (n, m) = (w.n(), x.m);
    // Every row's scales widened at once, each block reading its rows' part.
    let (mut prepared, stride) = (Vec::new(), w.groups());
    w.widen_scales(0, n, &mut prepared);
    let mut o = 0;
    while o + O <= n {
        let prepared = &prepared[o * stride..];
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the caller).
        unsafe { block::<O, M, C>(x, w, o, prepared, &mut yt[o * m..(o + O) * m]) };
        o += O;
    }
    while o < n {
        let prepared = &prepared[o * stride..];
        // SAFETY: as above, one row.
        unsafe { block::<1, M, C>(x, w, o, prepared, &mut yt[o * m..(o + 1) * m]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const O: usize, const M: usize, C: SignedCodes>(
    x: &Int8Rows,
    w: QuantView<'_>,
    first: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let (k, m) = (x.k, x.m);
    let (groups, shift, row_bytes) = (w.groups(), w.group_shift(), w.row_bytes());
    let codes = w.codes().as_ptr();
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); M]; O];
    for i in (0..k).step_by(BLOCK) {
        // SAFETY: i + 32 ≤ k (k is a multiple of 32): the codes and scales of this step exist for
        // every row read; a block of 32 lies in one weight group (groups hold 32 or more, aligned).
        unsafe {
            let byte = if C::KIND == CodeKind::Int4 { i / 2 } else { i };
            let values: [__m256i; O] = std::array::from_fn(|a| C::load32(codes.add((first + a) * row_bytes + byte)));
            let magnitudes: [__m256i; O] = std::array::from_fn(|a| _mm256_sign_epi8(values[a], values[a]));
            let ws: [f32; O] = std::array::from_fn(|a| *prepared.get_unchecked(a * groups + (i >> shift)));
            #[allow(clippy::needless_range_loop)] // `r` is a row of `x` and a column of every row of `acc`
            for r in 0..m.min(M) {
                let q = _mm256_loadu_si256(x.codes.as_ptr().add(r * k + i).cast());
                let xs = *x.scales.get_unchecked((r * k + i) / BLOCK);
                for a in 0..O {
                    let pairs = _mm256_maddubs_epi16(magnitudes[a], _mm256_sign_epi8(q, values[a]));
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    acc[a][r] = _mm256_fmadd_ps(sums, _mm256_set1_ps(ws[a] * xs), acc[a][r]);
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate().take(m) {
            yt[a * m + r] = super::dot256::reduce(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantMatrix, QuantScheme};

    use super::super::test_values as values;

    /// The same integer arithmetic, in scalars and f64: `Σ_blocks sw · sx · Σ w_code · q`.
    fn reference(x: &Int8Rows, w: &QuantView<'_>) -> Vec<f32> {
        let (m, k, n) = (x.m, x.k, w.n());
        let mut yt = vec![0f32; n * m];
        for o in 0..n {
            for r in 0..m {
                let mut sum = 0f64;
                for b in 0..k / BLOCK {
                    let dot: i64 = (b * BLOCK..(b + 1) * BLOCK)
                        .map(|i| {
                            let code = (w.dequantize(o, i) / w.scale_at(o, i)).round() as i64;
                            code * i64::from(x.codes[r * k + i])
                        })
                        .sum();
                    sum += f64::from(w.scale_at(o, b * BLOCK)) * f64::from(x.scales[r * k / BLOCK + b]) * dot as f64;
                }
                yt[o * m + r] = sum as f32;
            }
        }
        yt
    }

    #[test]
    fn computes_the_quantized_rows_product_for_both_code_kinds_and_every_row_count() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        for (m, n, k) in
            [(1, 37, 64), (2, 40, 128), (3, 9, 96), (4, 33, 256), (5, 7, 32), (6, 11, 64), (7, 5, 160), (8, 50, 320)]
        {
            let x = values(m * k, 31);
            let w: Vec<half::bf16> = values(n * k, 32).into_iter().map(half::bf16::from_f32).collect();
            for scheme in [QuantScheme::Int8, QuantScheme::Int4] {
                let q = QuantMatrix::quantize(super::super::Weights::Bf16(&w), (n, k), scheme).expect("quantize");
                let view = q.view().with_int8_activations(true);
                let rows = Int8Rows::quantize(&x, m, k);
                let mut got = vec![f32::NAN; n * m];
                features_of(&rows, view, &mut got);
                for (a, b) in got.iter().zip(reference(&rows, &view)) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{scheme} m={m} n={n} k={k}: {a} vs {b}");
                }
            }
        }
    }

    /// The largest magnitudes either side can hold: −128 is not an int8 weight code, but a pair
    /// of 127 · 127 products must not saturate the 16-bit lanes.
    #[test]
    fn extreme_codes_do_not_saturate() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let (n, k) = (2, 64);
        let codes: Vec<u8> = (0..n * k).map(|i| if i < k { 127u8 } else { (-127i8) as u8 }).collect();
        let scales = vec![1.0f32; n * k / 32];
        let view = QuantView::new(CodeKind::Int8, &codes, super::super::ScalesRef::F32(&scales), k, 5)
            .with_int8_activations(true);
        let x: Vec<f32> = (0..k).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let rows = Int8Rows::quantize(&x, 1, k);
        let mut got = vec![f32::NAN; n];
        features_of(&rows, view, &mut got);
        for (a, b) in got.iter().zip(reference(&rows, &view)) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
        }
        let want = 127.0 * x.iter().sum::<f32>() * rows.scales[0] * 127.0;
        assert!((got[0] - want).abs() <= 1e-3 * want.abs(), "{} vs {want}", got[0]);
    }

    #[test]
    fn activation_codes_round_to_nearest_within_their_block_scale() {
        let (m, k) = (3, 128);
        let mut x = values(m * k, 5);
        x[64..96].fill(0.0); // a block of zeros keeps a zero scale
        let rows = Int8Rows::quantize(&x, m, k);
        for (i, &v) in x.iter().enumerate() {
            let s = rows.scales[i / BLOCK];
            let q = f32::from(rows.codes[i]);
            assert!((q * s - v).abs() <= 0.5 * s + 1e-7, "value {i}: {v} vs {q} · {s}");
            assert!((-127..=127).contains(&rows.codes[i]));
        }
        assert_eq!(rows.scales[2], 0.0);
    }
}
