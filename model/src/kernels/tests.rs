//! The kernels' products against plain references, and the transposes.

use super::*;

fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut yt = vec![0f32; n * m];
    for o in 0..n {
        for r in 0..m {
            yt[o * m + r] = (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w[o * k + i])).sum::<f64>() as f32;
        }
    }
    yt
}

use super::test_values as values;

#[test]
fn matches_a_plain_dot_product_for_every_row_count_and_ragged_sizes() {
    for (m, n, k) in [
        (1, 3, 5),
        (2, 257, 64),
        (3, 130, 37),
        (4, 128, 512),
        (5, 300, 24),
        (9, 16, 100),
        (16, 250, 64),
        (17, 13, 33),
        (32, 500, 512),
        (47, 7, 5),
        (64, 241, 96),
    ] {
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let mut yt = vec![f32::NAN; n * m];
        rows_times_weight_t(&x, m, Weights::F32(&w), n, k, &mut yt);
        // And the same product as one of a batch, beside another.
        let mut other = vec![f32::NAN; 5 * m];
        let mut batched = vec![f32::NAN; n * m];
        products(vec![
            Product { x: &x, m, w: Weights::F32(&w[..5.min(n) * k]), k, yt: &mut other[..5.min(n) * m] },
            Product { x: &x, m, w: Weights::F32(&w), k, yt: &mut batched },
        ]);
        assert_eq!(yt, batched);
        // The portable/AVX2 dot form, which this CPU may not pick, on its own.
        if m <= dot::MAX_ROWS {
            let mut portable = vec![f32::NAN; n * m];
            dot::features(&x, m, Dense { w: &w, k }, &mut portable);
            for (a, b) in portable.iter().zip(reference(&x, m, &w, n, k)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "dot form m={m} n={n} k={k}: {a} vs {b}");
            }
        }
        for (a, b) in yt.iter().zip(reference(&x, m, &w, n, k)) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "m={m} n={n} k={k}: {a} vs {b}");
        }
    }
}

/// The portable/AVX2 dot form (what CPUs without AVX-512 run) over quantized weights computes
/// the dequantised weights' product.
#[test]
fn portable_dot_form_reads_quantized_weights() {
    use crate::quant::{QuantMatrix, QuantScheme};
    for (m, n, k) in [(1, 40, 64), (3, 17, 37), (8, 33, 96)] {
        let x = values(m * k, 21);
        let w: Vec<half::bf16> = values(n * k, 22).into_iter().map(half::bf16::from_f32).collect();
        for scheme in [QuantScheme::Int8, QuantScheme::Int4] {
            let q = QuantMatrix::quantize(Weights::Bf16(&w), (n, k), scheme).expect("quantize");
            let mut got = vec![f32::NAN; n * m];
            match scheme {
                QuantScheme::Int8 => dot::features(&x, m, Int8Source(q.view()), &mut got),
                QuantScheme::Int4 => dot::features(&x, m, Int4Source(q.view()), &mut got),
            }
            for (a, b) in got.iter().zip(reference(&x, m, &q.dequantize(), n, k)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{scheme} m={m} n={n} k={k}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn bf16_weights_give_the_f32_product_of_the_same_values_bit_for_bit() {
    for (m, n, k) in [(1, 130, 37), (4, 128, 512), (7, 33, 64), (16, 250, 64), (40, 17, 100), (64, 130, 40)] {
        let x = values(m * k, 11);
        let stored: Vec<half::bf16> = values(n * k, 12).into_iter().map(half::bf16::from_f32).collect();
        let widened: Vec<f32> = stored.iter().map(|v| v.to_f32()).collect();
        let (mut from_bf16, mut from_f32) = (vec![f32::NAN; n * m], vec![f32::NAN; n * m]);
        rows_times_weight_t(&x, m, Weights::Bf16(&stored), n, k, &mut from_bf16);
        rows_times_weight_t(&x, m, Weights::F32(&widened), n, k, &mut from_f32);
        assert_eq!(from_bf16, from_f32, "m={m} n={n} k={k}");
    }
}

#[test]
fn swiglu_experts_match_their_definition_for_every_row_count_and_weight_type() {
    let (k, inter) = (40, 24);
    let counts = [3, 1, 9, 33];
    let rows: usize = counts.iter().sum();
    let x = values(rows * k, 3);
    // Weights rounded to bf16 values, so that both stored types hold the same numbers.
    let round = |v: Vec<f32>| -> Vec<half::bf16> { v.into_iter().map(half::bf16::from_f32).collect() };
    let stored: Vec<(Vec<half::bf16>, Vec<half::bf16>)> = (0..counts.len() as u64)
        .map(|e| (round(values(2 * inter * k, 4 + e)), round(values(k * inter, 40 + e))))
        .collect();
    let widened: Vec<(Vec<f32>, Vec<f32>)> = stored
        .iter()
        .map(|(gu, d)| (gu.iter().map(|v| v.to_f32()).collect(), d.iter().map(|v| v.to_f32()).collect()))
        .collect();
    let mut experts = Vec::new();
    let mut offset = 0;
    for (e, &m) in counts.iter().enumerate() {
        let x = &x[offset * k..(offset + m) * k];
        // Alternate the stored type between experts of one call.
        experts.push(if e % 2 == 0 {
            ExpertRows { x, m, gate_up: Weights::F32(&widened[e].0), down: Weights::F32(&widened[e].1) }
        } else {
            ExpertRows { x, m, gate_up: Weights::Bf16(&stored[e].0), down: Weights::Bf16(&stored[e].1) }
        });
        offset += m;
    }
    let mut out = vec![0f32; rows * k];
    swiglu_experts(&experts, inter, &mut out);
    let mut r = 0;
    for (e, expert) in experts.iter().enumerate() {
        let (gu, down) = &widened[e];
        for local in 0..expert.m {
            let xr = &expert.x[local * k..(local + 1) * k];
            let proj = |o: usize| (0..k).map(|i| xr[i] * gu[o * k + i]).sum::<f32>();
            let h: Vec<f32> = (0..inter).map(|j| proj(j) / (1.0 + (-proj(j)).exp()) * proj(inter + j)).collect();
            for o in 0..k {
                let want: f32 = (0..inter).map(|j| h[j] * down[o * inter + j]).sum();
                assert!((out[r * k + o] - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {r}, feature {o}");
            }
            r += 1;
        }
    }
}

#[test]
fn exp_is_within_two_ulp_and_keeps_its_edges() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = f64::from(x).exp();
        let got = f64::from(exp(x));
        // One ulp of the f32 nearest the exact value.
        let ulp = f64::from(f32::from_bits((want as f32).to_bits() + 1) - want as f32);
        worst = worst.max((got - want).abs() / ulp);
        x += 0.000_731;
    }
    assert!(worst <= 2.0, "worst error {worst} ulp");
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(f32::NAN).is_nan());
    assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
}

#[test]
fn transpose_of_ragged_shapes() {
    for (rows, cols) in [(1, 1), (3, 17), (8, 8), (16, 16), (33, 5), (32, 48), (40, 70), (64, 2048)] {
        let a = values(rows * cols, 9);
        let mut b = vec![0f32; rows * cols];
        transpose(&a, rows, cols, &mut b);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(b[c * rows + r], a[r * cols + c]);
            }
        }
    }
}
