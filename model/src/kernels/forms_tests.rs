//! Every kernel form this CPU can run, called directly (whichever form [`super::isa`] picks for the
//! process), against a plain f64 product over the weights as the reference dequantises them: every
//! weight kind, every row count the form takes, ragged sizes.

use super::source::{CodeKind, Dense, Fp8Source, Int4Source, Int8Source, MatrixSource, QuantView, ScalesRef};
use super::*;
use crate::quant::{QuantMatrix, QuantScheme};

#[derive(Debug, Clone, Copy)]
enum Form {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Dot256,
    #[cfg(target_arch = "x86_64")]
    Outer256,
    #[cfg(target_arch = "x86_64")]
    Dot512,
    #[cfg(target_arch = "x86_64")]
    Outer512,
}

impl Form {
    /// The forms this CPU runs, with the rows each takes.
    fn runnable() -> Vec<(Form, std::ops::RangeInclusive<usize>)> {
        let mut forms = vec![(Form::Portable, 1..=dot::MAX_ROWS)];
        #[cfg(target_arch = "x86_64")]
        {
            if dot256::available() {
                forms.push((Form::Dot256, 1..=dot::MAX_ROWS));
                forms.push((Form::Outer256, 1..=outer256::MAX_ROWS));
            } else {
                eprintln!("no AVX2 and FMA here: the AVX2 forms are not tested");
            }
            if outer::available() {
                forms.push((Form::Dot512, 1..=dot::MAX_ROWS));
                forms.push((Form::Outer512, 1..=outer::MAX_ROWS));
            } else {
                eprintln!("no AVX-512 here: the AVX-512 forms are not tested");
            }
        }
        forms
    }

    fn run<S: MatrixSource>(self, x: &[f32], m: usize, w: S, yt: &mut [f32]) {
        let k = w.k();
        match self {
            Form::Portable => dot::features(x, m, w, yt),
            #[cfg(target_arch = "x86_64")]
            Form::Dot256 => dot256::features_of(x, m, w, yt),
            #[cfg(target_arch = "x86_64")]
            Form::Outer256 => outer256::features_of(&transpose_padded(x, m, k, outer256::LANES), m, w, yt),
            #[cfg(target_arch = "x86_64")]
            Form::Dot512 => dot512::features_of(x, m, w, yt),
            #[cfg(target_arch = "x86_64")]
            Form::Outer512 => outer::features_of(&transpose_padded(x, m, k, outer::LANES), m, w, yt),
        }
    }
}

use super::test_values as values;

/// `yt[o][r]` in f64 over `w` given element by element.
fn reference(x: &[f32], m: usize, w: impl Fn(usize, usize) -> f32, n: usize, k: usize) -> Vec<f32> {
    let mut yt = vec![0f32; n * m];
    for o in 0..n {
        for r in 0..m {
            yt[o * m + r] = (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w(o, i))).sum::<f64>() as f32;
        }
    }
    yt
}

fn check<S: MatrixSource>(what: &str, x: &[f32], m: usize, w: S) {
    let (n, k) = (w.n(), w.k());
    let want = reference(x, m, |o, i| w.widen(o, i), n, k);
    let scale: f32 = x.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1.0) * k as f32;
    for (form, rows) in Form::runnable() {
        if !rows.contains(&m) {
            continue;
        }
        let mut got = vec![f32::NAN; n * m];
        form.run(x, m, w, &mut got);
        for (j, (a, b)) in got.iter().zip(&want).enumerate() {
            // Sums of k products in another order: within f32 rounding of the magnitudes summed.
            assert!(
                (a - b).abs() <= 2e-6 * scale * (1.0 + b.abs()),
                "{what} {form:?} m={m} n={n} k={k}, output {}, row {}: {a} vs {b}",
                j / m,
                j % m
            );
        }
    }
}

const SHAPES: [(usize, usize); 7] = [(3, 5), (13, 37), (40, 64), (9, 100), (30, 96), (7, 512), (5, 2100)];
const ROWS: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 47, 64];

#[test]
fn every_form_computes_dense_f32_and_bf16_products() {
    for (n, k) in SHAPES {
        for m in ROWS {
            let x = values(m * k, (m * 31 + k) as u64);
            let w = values(n * k, (n * 17 + k) as u64);
            check("f32", &x, m, Dense { w: &w, k });
            let b: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            check("bf16", &x, m, Dense { w: &b, k });
        }
    }
}

#[test]
fn every_form_computes_int8_int4_and_fp8_products() {
    for (n, k) in SHAPES {
        let w: Vec<half::bf16> = values(n * k, 7).into_iter().map(half::bf16::from_f32).collect();
        let q8 = QuantMatrix::quantize(Weights::Bf16(&w), (n, k), QuantScheme::Int8).expect("int8");
        let q4 = QuantMatrix::quantize(Weights::Bf16(&w), (n, k), QuantScheme::Int4).expect("int4");
        // FP8 codes of every finite value (0x7F and 0xFF are NaN in E4M3), one scale a row.
        let fp8: Vec<u8> =
            (0..n * k).map(|i| ((i * 37) % 255) as u8).map(|c| if c & 0x7F == 0x7F { 0x3C } else { c }).collect();
        let scales: Vec<f32> = (0..n).map(|o| 0.01 + o as f32 * 1e-3).collect();
        let fp8 = QuantView::new(CodeKind::Fp8E4m3, &fp8, ScalesRef::F32(&scales), k, u32::MAX);
        // Groups of 16, each with its own scale (the smallest group a load may take), from codes
        // of every value.
        let scales16: Vec<f32> = values(n * k.div_ceil(16), 9).into_iter().map(|v| 0.5 + v.abs()).collect();
        let codes8: Vec<u8> =
            (0..n * k).map(|i| ((i * 89) % 255) as u8).map(|c| if c == 0x80 { 0x81 } else { c }).collect();
        let codes4: Vec<u8> = (0..n * k.div_ceil(2)).map(|i| ((i * 53) % 256) as u8).collect();
        let int8_g16 = QuantView::new(CodeKind::Int8, &codes8, ScalesRef::F32(&scales16), k, 4);
        let int4_g16 = QuantView::new(CodeKind::Int4, &codes4, ScalesRef::F32(&scales16), k, 4);
        for m in ROWS {
            let x = values(m * k, (m * 7 + k) as u64);
            check("int8", &x, m, Int8Source(q8.view()));
            check("int4", &x, m, Int4Source(q4.view()));
            check("int8, groups of 16", &x, m, Int8Source(int8_g16));
            check("int4, groups of 16", &x, m, Int4Source(int4_g16));
            check("fp8", &x, m, Fp8Source(fp8));
        }
    }
}

/// Within one form, a bf16 matrix gives the product of the same values held as f32, to the bit:
/// widening is exact and the order of the sums is the form's own.
#[test]
fn every_form_reads_bf16_as_its_f32_values_bit_for_bit() {
    let (n, k) = (21, 200);
    let stored: Vec<half::bf16> = values(n * k, 12).into_iter().map(half::bf16::from_f32).collect();
    let widened: Vec<f32> = stored.iter().map(|v| v.to_f32()).collect();
    for (form, rows) in Form::runnable() {
        for m in ROWS.into_iter().filter(|m| rows.contains(m)) {
            let x = values(m * k, 3);
            let (mut a, mut b) = (vec![f32::NAN; n * m], vec![f32::NAN; n * m]);
            form.run(&x, m, Dense { w: &stored, k }, &mut a);
            form.run(&x, m, Dense { w: &widened, k }, &mut b);
            assert_eq!(a, b, "{form:?} m={m}");
        }
    }
}

/// In the outer forms a row's outputs are the same bits whichever rows share its product: each is
/// a chain of fused multiply-adds along `k` in one lane, however the rows are blocked (in
/// registers up to 16 rows on AVX2, in panels beyond).
#[test]
fn outer_forms_give_a_row_the_same_bits_among_any_rows() {
    let (n, k) = (25, 130);
    let w: Vec<half::bf16> = values(n * k, 21).into_iter().map(half::bf16::from_f32).collect();
    let x = values(64 * k, 22);
    for (form, rows) in Form::runnable() {
        #[cfg(target_arch = "x86_64")]
        if !matches!(form, Form::Outer256 | Form::Outer512) {
            continue;
        }
        #[cfg(not(target_arch = "x86_64"))]
        continue;
        let product = |m: usize| {
            let mut yt = vec![f32::NAN; n * m];
            form.run(&x[..m * k], m, Dense { w: &w, k }, &mut yt);
            yt
        };
        let all = product(*rows.end());
        let all_rows = *rows.end();
        for m in [9, 16, 17, 24, 33, 47].into_iter().filter(|m| rows.contains(m)) {
            let some = product(m);
            for o in 0..n {
                assert_eq!(some[o * m..(o + 1) * m], all[o * all_rows..o * all_rows + m], "{form:?} m={m} output {o}");
            }
        }
    }
}

#[test]
fn the_chosen_isa_is_one_this_cpu_runs() {
    let chosen = isa();
    #[cfg(target_arch = "x86_64")]
    match chosen {
        Isa::Avx512 => assert!(outer::available()),
        Isa::Avx2 => assert!(dot256::available()),
        Isa::Portable => {}
    }
    assert_eq!(max_rows() > dot::MAX_ROWS, chosen.outer_lanes().is_some(), "{chosen:?}");
}
