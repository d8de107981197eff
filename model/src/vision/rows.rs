//! Row-wise f32 kernels of the vision tower: bias + exact GELU, softmax, LayerNorm, the 2-D RoPE
//! rotation, bf16 widening. Each is written once as plain loops and compiled three times: for
//! AVX-512 and for AVX2 (chosen at run time as the kernels are, [`crate::kernels::isa`], so that
//! the loops vectorize 16 or 8 wide; the workspace builds for baseline x86-64, whose SSE2 gives
//! these loops 4 lanes) and as the crate is built. Callers split the work into parallel tasks; each call here is one task.

use half::bf16;

use super::Geometry;

/// Defines `fn $name` over one `#[inline(always)]` body compiled for AVX-512, for AVX2 and as built.
macro_rules! with_avx512 {
    ($(#[$meta:meta])* pub(super) fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub(super) fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn wide8($($arg: $ty),*) {
                    body($($arg),*)
                }
                match crate::kernels::isa() {
                    // SAFETY: the CPU has AVX-512F, the only feature `wide` is compiled with
                    // (`isa` picks only what the CPU has).
                    crate::kernels::Isa::Avx512 => return unsafe { wide($($arg),*) },
                    // SAFETY: the CPU has AVX2, the only feature `wide8` is compiled with.
                    crate::kernels::Isa::Avx2 => return unsafe { wide8($($arg),*) },
                    crate::kernels::Isa::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}

with_avx512! {
    /// Adds `bias` to each row of `rows` (`width` values each), then applies exact GELU if `gelu`.
    pub(super) fn bias_gelu_rows(rows: &mut [f32], width: usize, bias: Option<&[f32]>, gelu: bool) {
        match bias {
            Some(b) => {
                for row in rows.chunks_exact_mut(width) {
                    if gelu {
                        row.iter_mut().zip(b).for_each(|(v, &b)| *v = gelu_exact(*v + b));
                    } else {
                        row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
                    }
                }
            }
            None if gelu => rows.iter_mut().for_each(|v| *v = gelu_exact(*v)),
            None => {}
        }
    }
}

/// Past this `|x|/√2` (|x| ≈ 12.7) the normal tail, under 1e-37, is taken as 0: computing it would
/// bring subnormal floats, which cost x86 cores a microcode assist each.
const TAIL_END: f32 = 9.0;

/// `nn.GELU()` (approximate="none"): `x·Φ(x)`, Φ the standard normal CDF through erfc.
#[inline(always)]
pub(super) fn gelu_exact(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let tail = if z < TAIL_END { 0.5 * erfc(z.min(TAIL_END)) } else { 0.0 };
    x * if x >= 0.0 { 1.0 - tail } else { tail }
}

/// `erfc(z)` for `z ≥ 0` with a relative error under 1.2e-7 over the whole range (so that GELU keeps
/// its relative accuracy far into the negative tail, where `1 + erf` would cancel): the Chebyshev
/// fit of Press et al., *Numerical Recipes* (2nd ed., §6.2, `erfcc`). Branch-free, so that loops
/// over it vectorize; `exp` is the project's polynomial one.
#[inline(always)]
#[allow(clippy::excessive_precision)] // The coefficients as published, rounded to f32 by the compiler.
fn erfc(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77_f32;
    for c in [-0.822_152_23, 1.488_515_87, -1.135_203_98, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96] {
        p = p * t + c;
    }
    p = p * t + 1.000_023_68;
    p = p * t - 1.265_512_23;
    t * crate::kernels::exp(p - z * z)
}

with_avx512! {
    /// Softmax of each row of `rows` (`width` values each), in place. Weights under e⁻⁸⁰ become 0:
    /// kept, they would be subnormal after the normalisation, and each subnormal operand costs the
    /// next product a microcode assist.
    pub(super) fn softmax_rows(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width) {
            let max = lane_max(row);
            row.iter_mut().for_each(|v| {
                let d = *v - max;
                *v = if d > -80.0 { crate::kernels::exp(d) } else { 0.0 };
            });
            let inv = 1.0 / lane_sum(row, |v| v);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

with_avx512! {
    /// `nn.LayerNorm` of each row of `x` into `out`: mean, then the variance of the centred values
    /// (two passes, as torch: no cancellation when the mean is large against the spread), then
    /// the affine map with `weight` and `bias`.
    pub(super) fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        let width = weight.len();
        let n = width as f32;
        for (x, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let mean = lane_sum(x, |v| v) / n;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

/// The 2-D RoPE as cos/sin tables `[tokens, head_dim / 2]`, for k and (scaled) for q.
#[derive(Debug, Clone, Copy)]
pub(super) struct RopeTables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub cos_q: &'a [f32],
    pub sin_q: &'a [f32],
}

with_avx512! {
    /// Rotates the q and k parts of rows of a fused `[q | k | v]` projection (each `g.hidden` wide,
    /// heads of `g.head_dim` adjacent pairs) in place. Row `i` of `rows` is token
    /// `(first_token + i) % g.tokens` of its tile, whose angles are that row of the tables.
    pub(super) fn rope_rows(rows: &mut [f32], first_token: usize, g: &Geometry, tables: &RopeTables<'_>) {
        let (hidden, head_dim) = (g.hidden, g.head_dim);
        let half = head_dim / 2;
        for (i, row) in rows.chunks_exact_mut(3 * hidden).enumerate() {
            let t = (first_token + i) % g.tokens;
            let at = t * half..(t + 1) * half;
            let (q, k) = row.split_at_mut(hidden);
            let parts = [
                (q, &tables.cos_q[at.clone()], &tables.sin_q[at.clone()]),
                (&mut k[..hidden], &tables.cos[at.clone()], &tables.sin[at]),
            ];
            for (part, cos, sin) in parts {
                for head in part.chunks_exact_mut(head_dim) {
                    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c - b * s;
                        pair[1] = a * s + b * c;
                    }
                }
            }
        }
    }
}

with_avx512! {
    /// `out[i] = f32(src[i])`: exact (a bf16 is the top half of an f32).
    pub(super) fn widen(src: &[bf16], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(src) {
            *o = f32::from_bits(u32::from(v.to_bits()) << 16);
        }
    }
}

/// The sum of `f` over `x` in 16 independent accumulators (vectorizable), then across them.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let blocks = x.chunks_exact(16);
    let rest: f32 = blocks.remainder().iter().map(|&v| f(v)).sum();
    for block in blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest value of `x` (−∞ when empty) in 16 lanes.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let blocks = x.chunks_exact(16);
    let rest = blocks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for block in blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(rest, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn gelu_matches_candles_exact_gelu_far_into_both_tails() {
        // From -6.5: below, candle's f64 `1 + erf` cancels and is the less accurate of the two.
        let xs: Vec<f32> = (-2600..=4000).map(|i| i as f32 * 0.0025).chain([9.0, 30.0]).collect();
        let reference = Tensor::new(xs.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("candle gelu_erf");
        // Through the dispatched kernel, as the tower computes it.
        let mut got = xs.clone();
        bias_gelu_rows(&mut got, xs.len(), None, true);
        // Relative error: in the negative tail GELU is ~1e-9 at x = -6.5, and stays accurate there.
        let worst = got
            .iter()
            .zip(&reference)
            .filter(|&(_, &want)| want != 0.0)
            .map(|(&g, &want)| ((f64::from(g) - want) / want).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "worst relative error {worst:e}");
        assert_eq!(gelu_exact(0.0), 0.0);
        assert!(gelu_exact(-12.0) < 0.0 && gelu_exact(-12.0) > -1e-30 && gelu_exact(-200.0) == 0.0);
        // The tanh approximation (what "exact" rules out) is far off in comparison.
        let tanh_gelu =
            |x: f32| 0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044_715 * x.powi(3))).tanh());
        assert!((tanh_gelu(-2.5) - gelu_exact(-2.5)).abs() > 1e-5);
    }

    #[test]
    fn softmax_matches_candle() {
        let width = 577;
        let x: Vec<f32> = (0..5 * width).map(|i| ((i * 7919) % 200) as f32 * 0.1 - 10.0).collect();
        let want = Tensor::from_slice(&x, (5, width), &Device::Cpu)
            .and_then(|t| candle_nn::ops::softmax_last_dim(&t))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("candle softmax");
        let mut got = x;
        softmax_rows(&mut got, width);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn widening_is_exact() {
        let values: Vec<bf16> = (0..1000).map(|i| bf16::from_f32((i as f32 - 500.0) * 0.37)).collect();
        let mut out = vec![0f32; values.len()];
        widen(&values, &mut out);
        assert!(values.iter().zip(&out).all(|(v, &o)| v.to_f32() == o));
    }
}
