//! The int8-activation mode's products, on AVX512-VNNI: rows of `x` quantized to int8 (one scale
//! per 32 values, as the weights' groups), multiplied against int8 or int4 weight codes with
//! `vpdpbusd` (64 byte products summed into 16 lanes by one instruction), one conversion and one
//! scaled FMA per 64 weights and row. Opt-in (`Activations::Int8`): the weights are read exactly,
//! the activations lose up to half a step of their block's scale each (docs/model.md, "Int8
//! activations", measures what that does to the logits).
//!
//! `vpdpbusd` multiplies unsigned bytes by signed ones, so the weight codes are made unsigned
//! (`u = code + Z`: int8 codes with their sign bit flipped, `Z = 128`; int4 codes are stored as
//! value + 8 already, `Z = 8`) and the activation codes `q` stay signed. Then `Σ w·q = Σ u·q −
//! Z·Σ q`: the second term depends on the activations only, so it is computed once per row (for
//! every 4 values, the lanes `vpdpbusd` sums into) and starts each accumulation, at no cost in
//! the loop.
//!
//! Taken for 1 to 8 rows (decode; the dot form's range) when the row length is a multiple of 64
//! and the weight groups hold 32 values or more; anything else is computed by the exact forms.

use std::arch::x86_64::*;

use super::source::{CodeKind, QuantView};

/// Values per activation scale.
const BLOCK: usize = 32;
/// Values per step of the kernel: one 64-byte vector of codes.
const STEP: usize = 64;

/// Whether this CPU runs the mode's kernels.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vnni")
}

/// Whether a product of `m` rows against `w` is computed here.
pub fn takes(w: &QuantView<'_>, m: usize) -> bool {
    w.int8_activations()
        && matches!(w.kind(), CodeKind::Int8 | CodeKind::Int4)
        && (1..=super::dot::MAX_ROWS).contains(&m)
        && w.k().is_multiple_of(STEP)
        && w.group_shift() >= BLOCK.trailing_zeros()
        && super::isa() == super::Isa::Avx512
        && available()
}

/// The unsigned offset `Z` the weight codes of `kind` are read with (see the module comment).
fn zero_point(kind: CodeKind) -> i32 {
    match kind {
        CodeKind::Int4 => 8,
        _ => 128,
    }
}

/// Rows `[m, k]` quantized for one weight code kind.
#[derive(Debug)]
pub struct Int8Rows {
    m: usize,
    k: usize,
    /// `[m, k]` codes, `round(x / scale)` in −127..=127.
    codes: Vec<i8>,
    /// `[m, k / 64, 16]`: for every step, its two blocks' scales, each in the 8 lanes that sum
    /// that block's products.
    lane_scales: Vec<f32>,
    /// `[m, k / 4]`: `−Z ·` the sum of every 4 consecutive codes (a lane of `vpdpbusd`).
    offsets: Vec<i32>,
}

impl Int8Rows {
    /// `x` (`[m, k]`, `k` a multiple of 64) quantized for weights of `kind`. Each block of 32
    /// values gets the scale `max |x| / 127` and codes rounded to nearest, ties to even; a block
    /// of zeros (or one holding a non-finite value, whose scale is not finite either) keeps it.
    pub fn quantize(x: &[f32], m: usize, k: usize, kind: CodeKind) -> Self {
        assert!(k.is_multiple_of(STEP) && x.len() == m * k, "int8 rows: {} values for [{m}, {k}]", x.len());
        assert!(available(), "the int8-activation mode needs AVX512-VNNI");
        let mut rows =
            Int8Rows { m, k, codes: vec![0; m * k], lane_scales: vec![0.0; m * k / 4], offsets: vec![0; m * k / 4] };
        // SAFETY: the CPU has the features (asserted above); lengths are as allocated.
        unsafe { rows.fill(x, zero_point(kind)) };
        rows
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn fill(&mut self, x: &[f32], zero: i32) {
        let ones = _mm512_set1_epi8(1);
        let neg_zero = _mm512_set1_epi32(-zero);
        for (b, chunk) in x.chunks_exact(BLOCK).enumerate() {
            // SAFETY: `chunk` holds 32 floats; the codes of block `b` are 32 bytes at `b · 32`.
            unsafe {
                let lo = _mm512_loadu_ps(chunk.as_ptr());
                let hi = _mm512_loadu_ps(chunk.as_ptr().add(16));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 && scale.is_finite() { 127.0 / amax } else { 0.0 };
                let inv = _mm512_set1_ps(inv);
                // Rounded to nearest even by the conversion (the default rounding mode); |x · inv|
                // ≤ 127, so the narrowing never saturates.
                let q_lo = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)));
                let q_hi = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
                let q = _mm256_set_m128i(q_hi, q_lo);
                _mm256_storeu_si256(self.codes.as_mut_ptr().add(b * BLOCK).cast(), q);
                // Sums of every 4 codes, times −Z: 8 lanes for this block.
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_castsi256_si512(q));
                let offsets = _mm512_mullo_epi32(sums, neg_zero);
                _mm256_storeu_si256(self.offsets.as_mut_ptr().add(b * 8).cast(), _mm512_castsi512_si256(offsets));
                let lanes = if scale.is_finite() { scale } else { 0.0 };
                _mm256_storeu_ps(self.lane_scales.as_mut_ptr().add(b * 8), _mm256_set1_ps(lanes));
            }
        }
    }
}

/// How a code kind's 64 codes become 64 unsigned bytes `code + Z`, in element order.
trait UnsignedCodes: Copy {
    const KIND: CodeKind;
    /// # Safety
    /// The 64 codes are readable at `p`; the caller has AVX512-BW.
    unsafe fn load64(p: *const u8) -> __m512i;
}

#[derive(Clone, Copy)]
struct Int8Codes;

impl UnsignedCodes for Int8Codes {
    const KIND: CodeKind = CodeKind::Int8;

    #[inline(always)]
    unsafe fn load64(p: *const u8) -> __m512i {
        // SAFETY: 64 bytes are readable at `p` (the caller).
        unsafe { _mm512_xor_si512(_mm512_loadu_si512(p.cast()), _mm512_set1_epi8(i8::MIN)) }
    }
}

#[derive(Clone, Copy)]
struct Int4Codes;

impl UnsignedCodes for Int4Codes {
    const KIND: CodeKind = CodeKind::Int4;

    #[inline(always)]
    unsafe fn load64(p: *const u8) -> __m512i {
        // SAFETY: 32 bytes (64 nibbles) are readable at `p` (the caller).
        unsafe {
            // Two whole chunks of 16 bytes, each holding its first 16 codes in the low nibbles and
            // its last 16 in the high ones (CodeKind::Int4): the low nibbles of both, then the
            // high ones, masked, then the 16-byte lanes put in element order.
            let b = _mm256_loadu_si256(p.cast());
            let halves = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(b), _mm256_srli_epi16::<4>(b));
            let codes = _mm512_and_si512(halves, _mm512_set1_epi8(0x0F));
            // Lanes [chunk 0 low, chunk 1 low, chunk 0 high, chunk 1 high] → [0 low, 0 high, 1 low, 1 high].
            _mm512_shuffle_i64x2::<0b11_01_10_00>(codes, codes)
        }
    }
}

/// `yt[o][r]` for every output feature `o` of `w` and row `r` of `x` (quantized for `w`'s kind).
pub fn features_of(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    assert!(takes(&w, x.m) && x.k == w.k() && yt.len() == w.n() * x.m, "int8-activation product out of its range");
    // SAFETY: the CPU has the features and the shapes agree (asserted above).
    unsafe {
        match w.kind() {
            CodeKind::Int4 => by_rows::<Int4Codes>(x, w, yt),
            _ => by_rows::<Int8Codes>(x, w, yt),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn by_rows<C: UnsignedCodes>(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    debug_assert_eq!(w.kind(), C::KIND);
    // SAFETY: as the caller guarantees.
    unsafe {
        match x.m {
            1 => features::<8, 1, C>(x, w, yt),
            2 => features::<6, 2, C>(x, w, yt),
            3 => features::<4, 3, C>(x, w, yt),
            4 => features::<4, 4, C>(x, w, yt),
            5 => features::<3, 5, C>(x, w, yt),
            6 => features::<3, 6, C>(x, w, yt),
            7 => features::<2, 7, C>(x, w, yt),
            _ => features::<2, 8, C>(x, w, yt),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn features<const O: usize, const M: usize, C: UnsignedCodes>(x: &Int8Rows, w: QuantView<'_>, yt: &mut [f32]) {
    let n = w.n();
    // Every row's scales widened at once, each block reading its rows' part.
    let (mut prepared, stride) = (Vec::new(), w.groups());
    w.widen_scales(0, n, &mut prepared);
    let mut o = 0;
    while o + O <= n {
        let prepared = &prepared[o * stride..];
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the caller).
        unsafe { block::<O, M, C>(x, w, o, prepared, &mut yt[o * M..(o + O) * M]) };
        o += O;
    }
    while o < n {
        let prepared = &prepared[o * stride..];
        // SAFETY: as above, one row.
        unsafe { block::<1, M, C>(x, w, o, prepared, &mut yt[o * M..(o + 1) * M]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const O: usize, const M: usize, C: UnsignedCodes>(
    x: &Int8Rows,
    w: QuantView<'_>,
    first: usize,
    prepared: &[f32],
    yt: &mut [f32],
) {
    let k = x.k;
    let (groups, shift, row_bytes) = (w.groups(), w.group_shift(), w.row_bytes());
    let codes = w.codes().as_ptr();
    let mut acc = [[_mm512_setzero_ps(); M]; O];
    for i in (0..k).step_by(STEP) {
        // SAFETY: i + 64 ≤ k (k is a multiple of 64): the codes, scales and activation lanes of
        // this step exist for every row read.
        unsafe {
            let byte = if C::KIND == CodeKind::Int4 { i / 2 } else { i };
            let u: [__m512i; O] = std::array::from_fn(|a| C::load64(codes.add((first + a) * row_bytes + byte)));
            // The step's two blocks of 32 lie in one weight group or in two consecutive ones.
            let ws: [__m512; O] = std::array::from_fn(|a| {
                let s = prepared.as_ptr().add(a * groups);
                _mm512_mask_blend_ps(
                    0xFF00,
                    _mm512_set1_ps(*s.add(i >> shift)),
                    _mm512_set1_ps(*s.add((i + BLOCK) >> shift)),
                )
            });
            #[allow(clippy::needless_range_loop)] // `r` is a row of `x` and a column of every row of `acc`
            for r in 0..M {
                let q = _mm512_loadu_si512(x.codes.as_ptr().add(r * k + i).cast());
                let start = _mm512_loadu_si512(x.offsets.as_ptr().add((r * k + i) / 4).cast());
                let xs = _mm512_loadu_ps(x.lane_scales.as_ptr().add((r * k + i) / 4));
                for a in 0..O {
                    let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, u[a], q));
                    acc[a][r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(ws[a], xs), acc[a][r]);
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            yt[a * M + r] = _mm512_reduce_add_ps(*v);
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
                    let sx = f64::from(x.lane_scales[(r * k + b * BLOCK) / 4]);
                    sum += f64::from(w.scale_at(o, b * BLOCK)) * sx * dot as f64;
                }
                yt[o * m + r] = sum as f32;
            }
        }
        yt
    }

    #[test]
    fn computes_the_quantized_rows_product_for_both_code_kinds_and_every_row_count() {
        if !available() || crate::kernels::isa() != crate::kernels::Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX512-VNNI, or the kernels run another ISA (EPSERVE_KERNEL_ISA)");
            return;
        }
        for (m, n, k) in [(1, 37, 64), (2, 40, 128), (3, 9, 192), (4, 33, 256), (5, 7, 64), (8, 50, 320)] {
            let x = values(m * k, 31);
            let w: Vec<half::bf16> = values(n * k, 32).into_iter().map(half::bf16::from_f32).collect();
            for scheme in [QuantScheme::Int8, QuantScheme::Int4] {
                let q = QuantMatrix::quantize(super::super::Weights::Bf16(&w), (n, k), scheme).expect("quantize");
                let view = q.view().with_int8_activations(true);
                let rows = Int8Rows::quantize(&x, m, k, view.kind());
                let mut got = vec![f32::NAN; n * m];
                features_of(&rows, view, &mut got);
                for (a, b) in got.iter().zip(reference(&rows, &view)) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{scheme} m={m} n={n} k={k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn activation_codes_round_to_nearest_within_their_block_scale() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI");
            return;
        }
        let (m, k) = (3, 128);
        let mut x = values(m * k, 5);
        x[64..96].fill(0.0); // a block of zeros keeps a zero scale
        let rows = Int8Rows::quantize(&x, m, k, CodeKind::Int8);
        for (i, &v) in x.iter().enumerate() {
            let s = rows.lane_scales[i / 4];
            let q = f32::from(rows.codes[i]);
            assert!((q * s - v).abs() <= 0.5 * s + 1e-7, "value {i}: {v} vs {q} · {s}");
            let block = &rows.codes[i / BLOCK * BLOCK..][..BLOCK];
            assert!(block.iter().all(|c| (-127..=127).contains(c)));
        }
        assert!(rows.lane_scales[16..24].iter().all(|&s| s == 0.0));
        for (lane, &off) in rows.offsets.iter().enumerate() {
            let sum: i32 = rows.codes[lane * 4..lane * 4 + 4].iter().map(|&c| i32::from(c)).sum();
            assert_eq!(off, -128 * sum);
        }
    }
}
