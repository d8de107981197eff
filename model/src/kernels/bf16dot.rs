//! bf16 products (`--activations bf16`) on AVX512-BF16: a product's activation rows are rounded to
//! bf16 once (round to nearest even), then multiplied with bf16 weights by `vdpbf16ps`, which sums
//! the products of two adjacent `k` into each f32 lane: 32 multiply-adds an instruction against 16
//! for an f32 FMA, and no widening of the weights. Sums stay f32.
//!
//! Two forms, as for f32: the dot form for 1 to 8 rows (`O` outputs × `M` rows × `A` accumulators,
//! `32 · A` weights of a row a step, one horizontal sum per output; short rows one at a time, as in
//! the f32 dot form) and an outer form for 9 to 64 rows (rows
//! laid out as pairs of `k` — `[⌈k/2⌉, rows padded to 16]` of two bf16 each — so that a vector holds
//! 16 rows; each weight pair is broadcast into `O × V` accumulators).
//!
//! Which products take them depends on the CPU's rate for the instruction, measured once
//! ([`full_rate`]): where `vdpbf16ps` does at least 1.25× the multiply-adds per second of f32 FMAs
//! (AMD Zen 4: about 2.2×), every product of up to 64 rows (prefill in blocks of 64); where it does
//! not (the Intel Xeon measured retires one every two cycles: 0.5×), one-row products only, where the
//! widening the instruction saves is what bounds the product (docs/benchmarks.md, "bf16 mode") —
//! unless the CPU has AMX-BF16: then products of 16 rows and more run on AMX tiles ([`super::amx`],
//! from the outer form's staged rows) and every product of up to 64 rows is in the mode.

use std::arch::x86_64::*;

use half::bf16;

use super::source::{Dense, MatrixSource, prefetch_ahead};

/// Rows up to which the dot form is used.
const DOT_ROWS: usize = 8;
/// Rows up to which the outer form is used (larger products come in blocks of this many).
pub const MAX_ROWS: usize = 64;
const LANES: usize = 16;
/// How much faster than f32 FMAs `vdpbf16ps` must multiply for the forms to take several rows.
const FULL_RATE: f64 = 1.25;

/// Whether this CPU runs the bf16 forms: AVX-512 kernels chosen ([`super::isa`]), AVX512-BF16 and
/// AVX512-BW (every CPU with the first has the second).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        super::isa() == super::Isa::Avx512
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw")
    })
}

/// Which products the forms take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// One-row products only.
    One,
    /// Products of 1 to [`MAX_ROWS`] rows.
    Many,
    /// Products of 2 to [`MAX_ROWS`] rows; one-row products are the exact f32 ones (on AMD Zen 5
    /// the exact dot form streams one row faster: docs/benchmarks.md, "AMD Zen 5").
    Batched,
}

/// `EPSERVE_BF16_ROWS=many|one|batched` where set (for a fleet that must compute alike, to
/// measure, or `batched` for a latency-bound deployment on a CPU whose exact one-row form is the
/// faster), else `Many` where `vdpbf16ps` runs at least [`FULL_RATE`] times the multiply-adds per
/// second of f32 FMAs on this CPU (measured once, in about 20 ms; logged) or where AMX tiles take
/// the products of 16 rows and more ([`super::amx`]), else `One`. With tiles, the products of 2-15
/// rows take `vdpbf16ps` too even where it is slow: every product of a prompt is then in the mode,
/// as when it is decoded a token at a time, so a prompt's logits do not depend on how it was fed
/// (a mix of exact and rounded products flipped a near-tied route of the test checkpoint).
fn taken() -> Taken {
    static TAKEN: std::sync::OnceLock<Taken> = std::sync::OnceLock::new();
    *TAKEN.get_or_init(|| {
        let asked = std::env::var("EPSERVE_BF16_ROWS").ok();
        let taken = match asked.as_deref().map(named) {
            Some(Some(taken)) => taken,
            named => {
                if let (Some(None), Some(other)) = (named, &asked) {
                    tracing::warn!("EPSERVE_BF16_ROWS is {other:?}, not many, one or batched; measuring instead");
                }
                let ratio = super::peak::bf16_dot_speedup().unwrap_or(0.0);
                tracing::info!("bf16 mode: vdpbf16ps runs {ratio:.2}x the multiply-adds/s of f32 FMAs here");
                if ratio >= FULL_RATE || super::amx::available() { Taken::Many } else { Taken::One }
            }
        };
        tracing::info!(
            "bf16 mode: vdpbf16ps multiplies {}",
            match taken {
                Taken::Many => "products of up to 64 rows",
                Taken::One => "one-row products only",
                Taken::Batched => "products of 2 to 64 rows (one-row products exact)",
            }
        );
        taken
    })
}

/// Whether the forms take products of several rows.
pub fn full_rate() -> bool {
    taken() != Taken::One
}

/// The choice an `EPSERVE_BF16_ROWS` value names (`None`: not one of them).
fn named(value: &str) -> Option<Taken> {
    match value {
        "many" => Some(Taken::Many),
        "one" => Some(Taken::One),
        "batched" => Some(Taken::Batched),
        _ => None,
    }
}

/// Whether the bf16 forms take a product of `m` rows on this CPU.
pub fn takes(m: usize) -> bool {
    available() && takes_under(taken(), m)
}

fn takes_under(taken: Taken, m: usize) -> bool {
    match taken {
        Taken::One => m == 1,
        Taken::Many => (1..=MAX_ROWS).contains(&m),
        Taken::Batched => (2..=MAX_ROWS).contains(&m),
    }
}

/// A product's rows rounded to bf16, laid out for its form.
pub struct Bf16Rows {
    m: usize,
    k: usize,
    layout: Layout,
}

enum Layout {
    /// `[m, k]`, for the dot form.
    Rows(Vec<bf16>),
    /// `[⌈k/2⌉, padded]`: element `(p, r)` holds row `r`'s `k = 2p` (low half) and `2p + 1` (high
    /// half, 0 past the end), for the outer form.
    Pairs { data: Vec<u32>, padded: usize },
}

impl Bf16Rows {
    /// `x` (`[m, k]`) rounded to bf16.
    pub fn stage(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "bf16 rows: length disagrees with the shape");
        let layout = if m <= DOT_ROWS {
            let mut rows = vec![bf16::ZERO; m * k];
            for (row, out) in x.chunks_exact(k.max(1)).zip(rows.chunks_exact_mut(k.max(1))) {
                round_row(row, out);
            }
            Layout::Rows(rows)
        } else {
            // Each row's pairs as 32-bit words (the row rounded, zero-padded to an even length),
            // then those `[m, ⌈k/2⌉]` words transposed (as bits, through the f32 transpose) into
            // `[⌈k/2⌉, padded]`.
            let (padded, pairs) = (m.div_ceil(LANES) * LANES, k.div_ceil(2));
            let mut words = vec![0f32; m * pairs];
            let mut rounded = vec![bf16::ZERO; 2 * pairs];
            for (row, out) in x.chunks_exact(k.max(1)).zip(words.chunks_exact_mut(pairs.max(1))) {
                round_row(row, &mut rounded[..k]);
                for (word, pair) in out.iter_mut().zip(rounded.chunks_exact(2)) {
                    *word = f32::from_bits(u32::from(pair[0].to_bits()) | u32::from(pair[1].to_bits()) << 16);
                }
            }
            let mut data = vec![0f32; pairs * padded];
            super::transpose_strided(&words, m, pairs, &mut data, padded);
            Layout::Pairs { data: data.into_iter().map(f32::to_bits).collect(), padded }
        };
        Bf16Rows { m, k, layout }
    }

    /// Whether the outer form reads these rows (its tasks are larger).
    pub fn outer(&self) -> bool {
        matches!(self.layout, Layout::Pairs { .. })
    }

    /// Whether AMX tiles multiply these rows ([`super::amx`]).
    pub fn tiles(&self) -> bool {
        self.outer() && super::amx::takes(self.m, self.k)
    }

    /// The outer form's pairs and its padded row count, when staged for it.
    #[cfg(test)]
    pub fn pairs(&self) -> Option<(&[u32], usize)> {
        match &self.layout {
            Layout::Pairs { data, padded } => Some((data, *padded)),
            Layout::Rows(_) => None,
        }
    }
}

/// `row` rounded to bf16 into `out` (same length) by `vcvtne2ps2bf16`, 32 values an instruction:
/// round to nearest even, as `bf16::from_f32`, except that the instruction flushes subnormal inputs
/// (below 1.2e-38 in magnitude) to zero. Both forms stage their rows here, so they agree.
fn round_row(row: &[f32], out: &mut [bf16]) {
    assert!(available() && row.len() == out.len(), "bf16 rounding: needs AVX512-BF16 and equal lengths");
    // SAFETY: the CPU has AVX-512F and AVX512-BF16 (asserted above), and the lengths agree.
    unsafe { round_row_bf16(row, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row_bf16(row: &[f32], out: &mut [bf16]) {
    let mut i = 0;
    while i < row.len() {
        let n = (row.len() - i).min(32);
        // Lanes past the end read as zero and are not stored.
        let (lo_mask, hi_mask) = ((1u32 << n.min(16)).wrapping_sub(1) as u16, (1u64 << n).wrapping_sub(1) >> 16);
        // SAFETY: the masks read and write only elements i..i + n, inside both slices.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(lo_mask, row.as_ptr().add(i));
            let hi = _mm512_maskz_loadu_ps(hi_mask as u16, row.as_ptr().add(i + 16.min(n)));
            let rounded = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            let mask = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
            _mm512_mask_storeu_epi16(out.as_mut_ptr().add(i).cast(), mask, rounded);
        }
        i += n;
    }
}

/// `yt[o][r]` for every feature `o` of `w` (`[n, k]`, bf16) and row `r` of `x`.
pub fn features_of(x: &Bf16Rows, w: &[bf16], yt: &mut [f32]) {
    assert!(available(), "the bf16 forms need AVX-512 and AVX512-BF16");
    let (m, k) = (x.m, x.k);
    let n = w.len().checked_div(k).unwrap_or(0);
    assert!(w.len() == n * k && yt.len() == n * m, "bf16 product: lengths disagree with the shapes");
    // SAFETY: the CPU has AVX-512F and AVX512-BF16 (asserted above); the lengths are checked, and
    // each form checks the rest.
    unsafe {
        match &x.layout {
            // Short rows one at a time, as in the f32 dot form (super::dot512).
            Layout::Rows(rows) => match (m, k <= super::SHORT_ROWS) {
                (1, true) => dot::<1, 1, 4>(rows, w, k, yt),
                (2, true) => dot::<1, 2, 2>(rows, w, k, yt),
                (3, true) => dot::<1, 3, 2>(rows, w, k, yt),
                (4, true) => dot::<1, 4, 1>(rows, w, k, yt),
                (5, true) => dot::<1, 5, 1>(rows, w, k, yt),
                (6, true) => dot::<1, 6, 1>(rows, w, k, yt),
                (7, true) => dot::<1, 7, 1>(rows, w, k, yt),
                (_, true) => dot::<1, 8, 1>(rows, w, k, yt),
                (1, false) => dot::<8, 1, 1>(rows, w, k, yt),
                (2, false) => dot::<6, 2, 1>(rows, w, k, yt),
                (3, false) => dot::<4, 3, 1>(rows, w, k, yt),
                (4, false) => dot::<4, 4, 1>(rows, w, k, yt),
                (5, false) => dot::<3, 5, 1>(rows, w, k, yt),
                (6, false) => dot::<3, 6, 1>(rows, w, k, yt),
                (7, false) => dot::<2, 7, 1>(rows, w, k, yt),
                (_, false) => dot::<2, 8, 1>(rows, w, k, yt),
            },
            Layout::Pairs { data, padded } => {
                // AMX tiles take whole blocks of 32 features; the rest is the outer form's.
                let done = if x.tiles() { super::amx::features_of(data, *padded, w, k, m, yt) } else { 0 };
                let (w, yt) = (&w[done * k..], &mut yt[done * m..]);
                match padded / LANES {
                    1 => outer::<12, 1>(data, w, k, m, yt),
                    2 => outer::<8, 2>(data, w, k, m, yt),
                    3 => outer::<6, 3>(data, w, k, m, yt),
                    _ => outer::<6, 4>(data, w, k, m, yt),
                }
            }
        }
    }
}

/// 32 bf16 from `p` as the instruction's operand type.
#[inline(always)]
unsafe fn load32(p: *const bf16) -> __m512bh {
    // SAFETY: the caller guarantees 32 readable elements; the two types are 64 bytes of bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot<const O: usize, const M: usize, const A: usize>(x: &[bf16], w: &[bf16], k: usize, yt: &mut [f32]) {
    let n = w.len() / k.max(1);
    assert!(x.len() == M * k && yt.len() == n * M);
    let mut o = 0;
    while o + O <= n {
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { dot_block::<O, M, A>(x, w, o, k, &mut yt[o * M..(o + O) * M]) };
        o += O;
    }
    while o < n {
        // SAFETY: as above, one row.
        unsafe { dot_block::<1, M, A>(x, w, o, k, &mut yt[o * M..(o + 1) * M]) };
        o += 1;
    }
}

/// Rows `first..first + O` of `w` against every row of `x`: `A` accumulators per output and row
/// (`32 · A` weights of a row a step), so that few rows still have independent chains.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_block<const O: usize, const M: usize, const A: usize>(
    x: &[bf16],
    w: &[bf16],
    first: usize,
    k: usize,
    yt: &mut [f32],
) {
    let steps = k - k % (32 * A);
    let body = k - k % 32;
    let mut acc = [[[_mm512_setzero_ps(); A]; M]; O];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let (ahead, rows) = (prefetch_ahead(O, k), Dense { w, k });
    for i in (0..steps).step_by(32 * A) {
        // SAFETY: i + 32·A ≤ k: rows first..first+O of `w` and every row of `x` hold these elements.
        unsafe {
            let wv: [[__m512bh; A]; O] = std::array::from_fn(|a| {
                if O > 1 {
                    rows.prefetch(first + a, i + ahead);
                }
                std::array::from_fn(|v| load32(wp.add((first + a) * k + i + 32 * v)))
            });
            for r in 0..M {
                let xv: [__m512bh; A] = std::array::from_fn(|v| load32(xp.add(r * k + i + 32 * v)));
                for (row, wa) in acc.iter_mut().zip(&wv) {
                    for ((sum, wv), xv) in row[r].iter_mut().zip(wa).zip(&xv) {
                        *sum = _mm512_dpbf16_ps(*sum, *wv, *xv);
                    }
                }
            }
        }
    }
    // The whole 32s left after the steps, into the first accumulators.
    for i in (steps..body).step_by(32) {
        // SAFETY: i + 32 ≤ k, as above.
        unsafe {
            for (a, row) in acc.iter_mut().enumerate() {
                let wa = load32(wp.add((first + a) * k + i));
                for (r, sums) in row.iter_mut().enumerate() {
                    sums[0] = _mm512_dpbf16_ps(sums[0], wa, load32(xp.add(r * k + i)));
                }
            }
        }
    }
    for (a, row) in acc.iter().enumerate() {
        for (r, sums) in row.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(sums.iter().fold(_mm512_setzero_ps(), |t, s| _mm512_add_ps(t, *s)));
            for i in body..k {
                sum += w[(first + a) * k + i].to_f32() * x[r * k + i].to_f32();
            }
            yt[a * M + r] = sum;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn outer<const O: usize, const V: usize>(xt: &[u32], w: &[bf16], k: usize, m: usize, yt: &mut [f32]) {
    let n = w.len() / k.max(1);
    let padded = V * LANES;
    assert!(xt.len() == k.div_ceil(2) * padded && yt.len() == n * m && m <= padded);
    let mut o = 0;
    while o + O <= n {
        // SAFETY: rows o..o+O of `w` and of `yt` exist (checked by the loop and the assert).
        unsafe { outer_block::<O, V>(xt, w, o, k, m, &mut yt[o * m..(o + O) * m]) };
        o += O;
    }
    while o < n {
        // SAFETY: as above, one row.
        unsafe { outer_block::<1, V>(xt, w, o, k, m, &mut yt[o * m..(o + 1) * m]) };
        o += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn outer_block<const O: usize, const V: usize>(
    xt: &[u32],
    w: &[bf16],
    first: usize,
    k: usize,
    m: usize,
    yt: &mut [f32],
) {
    let padded = V * LANES;
    let whole = k / 2;
    let mut acc = [[_mm512_setzero_ps(); V]; O];
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    // Weights `2p` and `2p + 1` of a row as one 32-bit lane, low half first (as `x`'s pairs are).
    let pair = |row: usize, p: usize| -> i32 {
        // SAFETY: 2p + 1 < k for p < whole: both elements are inside row `row`.
        unsafe { std::ptr::read_unaligned(wp.add(row * k + 2 * p).cast::<u32>()) as i32 }
    };
    for p in 0..whole {
        // SAFETY: p < ⌈k/2⌉, so `V` vectors of 16 lanes are readable at xt[p · padded..].
        unsafe {
            let xv: [__m512bh; V] = std::array::from_fn(|v| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(xp.add(p * padded + v * LANES).cast()))
            });
            for (a, row) in acc.iter_mut().enumerate() {
                let wb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair(first + a, p)));
                for (sum, xv) in row.iter_mut().zip(&xv) {
                    *sum = _mm512_dpbf16_ps(*sum, wb, *xv);
                }
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for (a, row) in acc.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            // SAFETY: `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *sum) };
            for (j, &value) in lanes.iter().enumerate().take(m.saturating_sub(v * LANES)) {
                let r = v * LANES + j;
                // An odd `k`: its last weight against each row's last value (the low half).
                let tail = if k % 2 == 1 {
                    let x_last = bf16::from_bits(xt[whole * padded + r] as u16).to_f32();
                    w[(first + a) * k + k - 1].to_f32() * x_last
                } else {
                    0.0
                };
                yt[a * m + r] = value + tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count of both forms, with `k` a multiple of 32, even but not, and odd, against the
    /// f64 product of the bf16-rounded rows and the bf16 weights.
    #[test]
    fn bf16_forms_match_the_product_of_rounded_rows() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (or EPSERVE_KERNEL_ISA chose a lesser set)");
            return;
        }
        let n = 37;
        for k in [64, 100, 67, 300, 2090] {
            let w: Vec<bf16> = crate::kernels::test_values(n * k, 7).into_iter().map(bf16::from_f32).collect();
            for m in (1..=18).chain([31, 32, 33, 48, 63, 64]) {
                let x = crate::kernels::test_values(m * k, m as u64);
                let rows = Bf16Rows::stage(&x, m, k);
                let mut yt = vec![0f32; n * m];
                features_of(&rows, &w, &mut yt);
                crate::kernels::assert_rounded_product(&w, &x, k, m, &yt, &format!("k {k} m {m}"));
            }
        }
    }

    /// The vector rounding equals `bf16::from_f32` for normal values, ties included, over every
    /// tail length.
    #[test]
    fn rows_round_as_bf16_from_f32_does() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (or EPSERVE_KERNEL_ISA chose a lesser set)");
            return;
        }
        let mut values = crate::kernels::test_values(101, 3);
        // Exact ties between two bf16 values (lower half 0x8000), both parities, and ±0.
        values.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), 0.0, -0.0, -1.5e30, 3.0e-38]);
        for len in 0..values.len() {
            let mut out = vec![bf16::ZERO; len];
            round_row(&values[..len], &mut out);
            let want: Vec<bf16> = values[..len].iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(
                out.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|b| b.to_bits()).collect::<Vec<_>>(),
                "length {len}"
            );
        }
    }
}

#[cfg(test)]
mod choice_tests {
    use super::{MAX_ROWS, Taken, named, takes_under};

    #[test]
    fn each_choice_takes_its_row_counts() {
        assert_eq!(named("batched"), Some(Taken::Batched));
        assert_eq!(named("many"), Some(Taken::Many));
        assert_eq!(named("one"), Some(Taken::One));
        assert_eq!(named("Many"), None);
        let taken = |t| (1..=MAX_ROWS + 1).filter(|&m| takes_under(t, m)).collect::<Vec<_>>();
        assert_eq!(taken(Taken::One), vec![1]);
        assert_eq!(taken(Taken::Many), (1..=MAX_ROWS).collect::<Vec<_>>());
        assert_eq!(taken(Taken::Batched), (2..=MAX_ROWS).collect::<Vec<_>>());
    }
}
