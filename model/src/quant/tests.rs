//! Quantized weights: the kernels compute exactly what the dequantised weights give, compressed-tensors
//! schemes are accepted or refused by name, and on the dev fixture int8 and int4 stay within the
//! issue's bounds of the bf16 golden (top-1 agreement, KL) while the model computes exactly what a
//! model holding the dequantised weights computes.

use candle_core::{DType, Device, Tensor};

use super::compressed::{CompressedTensors, Format};
use super::quality::{Comparison, Quality};
use super::*;
use crate::checkpoint::{Checkpoint, WeightSource};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{self, CodeKind, Weights, source::fp8_e4m3};
use crate::parity_tests::{fixture_dir, golden_in, load_policy, max_abs_diff};

fn values(n: usize, seed: u64) -> Vec<f32> {
    use rand_xoshiro::rand_core::{Rng, SeedableRng};
    let mut rng = rand_xoshiro::SplitMix64::seed_from_u64(seed);
    (0..n).map(|_| ((rng.next_u64() % 20001) as f32 / 10000.0 - 1.0) * 0.05).collect()
}

fn product(x: &[f32], m: usize, w: Weights<'_>, n: usize, k: usize) -> Vec<f32> {
    let mut yt = vec![f32::NAN; n * m];
    kernels::rows_times_weight_t(x, m, w, n, k, &mut yt);
    yt
}

fn fp8_matrix(n: usize, k: usize, seed: u64) -> QuantMatrix {
    // Every finite code (0x7F and 0xFF are NaN in E4M3).
    let codes: Vec<u8> = (0..n * k)
        .map(|i| ((i as u64 * 37 + seed) % 256) as u8)
        .map(|c| if c & 0x7F == 0x7F { 0 } else { c })
        .collect();
    let scales = values(n, seed).iter().map(|v| half::bf16::from_f32(v.abs() + 0.01)).collect();
    QuantMatrix::from_parts(CodeKind::Fp8E4m3, (n, k), Group::Row, codes, Scales::Bf16(scales)).expect("fp8 matrix")
}

#[test]
fn quantized_products_equal_the_products_of_the_dequantised_weights_bit_for_bit() {
    for (m, n, k) in [
        (1, 130, 64),
        (2, 33, 37),
        (3, 48, 100),
        (5, 17, 32),
        (8, 40, 48),
        (9, 30, 64),
        (17, 25, 40),
        (33, 12, 96),
        (64, 20, 130),
    ] {
        let x = values(m * k, 1);
        let bf16: Vec<half::bf16> = values(n * k, 2).into_iter().map(half::bf16::from_f32).collect();
        let mut matrices: Vec<(String, QuantMatrix)> = [QuantScheme::Int8, QuantScheme::Int4]
            .into_iter()
            .map(|s| (format!("{s:?}"), QuantMatrix::quantize(Weights::Bf16(&bf16), (n, k), s).expect("quantize")))
            .collect();
        matrices.push(("fp8".into(), fp8_matrix(n, k, 3)));
        for (name, q) in &matrices {
            let reference = q.dequantize();
            let got = product(&x, m, Weights::Quant(q.view()), n, k);
            let want = product(&x, m, Weights::F32(&reference), n, k);
            assert_eq!(got, want, "{name} m={m} n={n} k={k}");
        }
    }
}

/// int4 codes packed in order (as compressed-tensors stores them) and rewritten in the chunk order
/// read back, weight by weight, as the codes they were, for rows of whole chunks, ragged tails and
/// odd lengths; and the quantizer writes the same order.
#[test]
fn int4_codes_are_where_int4_position_says_in_both_packings() {
    use crate::kernels::source::{QuantView, ScalesRef, int4_from_sequential, int4_position};
    for k in [1, 5, 16, 31, 32, 33, 48, 64, 100, 129] {
        let code = |i: usize| ((i * 7 + k) % 16) as u8;
        let bytes = k.div_ceil(2);
        let mut sequential = vec![0u8; bytes];
        for i in 0..k {
            sequential[i / 2] |= code(i) << (4 * (i % 2));
        }
        let mut chunked = vec![0u8; bytes];
        int4_from_sequential(&sequential, k, &mut chunked);
        let ones = vec![1f32; k.div_ceil(16)];
        let view = QuantView::new(CodeKind::Int4, &chunked, ScalesRef::F32(&ones), k, 4);
        let mut seen = vec![0u8; bytes];
        for i in 0..k {
            let (byte, shift) = int4_position(k, i);
            assert_eq!((chunked[byte] >> shift) & 0x0F, code(i), "k={k}, weight {i}");
            assert_eq!(view.dequantize(0, i), f32::from(code(i)) - 8.0, "k={k}, weight {i}");
            seen[byte] |= 0x0F << shift;
        }
        // Every nibble of the row is some weight's (one left over for odd k).
        let unused = if k % 2 == 1 { 0xF0 } else { 0 };
        assert!(seen[..bytes - 1].iter().all(|&b| b == 0xFF) && seen[bytes - 1] | unused == 0xFF, "k={k}");
    }
    // The quantizer: every group holds −8 … 7, which come back exactly (a tail of 16 past the
    // chunks of each row).
    let (n, k) = (2, 80);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 16) as f32 - 8.0).collect();
    let q = QuantMatrix::quantize(Weights::F32(&w), (n, k), QuantScheme::Int4).expect("int4");
    let dq = q.dequantize();
    for (i, (a, b)) in w.iter().zip(&dq).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "weight {i}: {a} vs {b}");
    }
}

#[test]
fn quantization_errors_stay_within_half_a_step_and_bytes_shrink_as_designed() {
    let (n, k) = (64, 256);
    let w = values(n * k, 7);
    for (scheme, steps, ratio) in [(QuantScheme::Int8, 127.0, 34.0 / 64.0), (QuantScheme::Int4, 6.5, 18.0 / 64.0)] {
        let q = QuantMatrix::quantize(Weights::F32(&w), (n, k), scheme).expect("quantize");
        let dq = q.dequantize();
        for (g, (orig, back)) in w.chunks(32).zip(dq.chunks(32)).enumerate() {
            let amax = orig.iter().fold(0f32, |a, v| a.max(v.abs()));
            // int8: half a step, plus the f16 rounding of the scale; int4: a whole step of the
            // widest scale tried (the value opposite the extreme may be clipped at +7).
            let bound =
                if scheme == QuantScheme::Int8 { amax / steps * 0.5 * 1.01 } else { amax / steps } + amax * 1e-3;
            let worst = orig.iter().zip(back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= bound, "{scheme:?} group {g}: error {worst} > {bound}");
        }
        let bf16_bytes = (n * k * 2) as f64;
        assert_eq!(q.bytes() as f64 / bf16_bytes, ratio, "{scheme:?}");
    }
}

#[test]
fn fp8_codes_decode_as_e4m3() {
    assert_eq!(fp8_e4m3(0x38), 1.0);
    assert_eq!(fp8_e4m3(0xB8), -1.0);
    assert_eq!(fp8_e4m3(0x7E), 448.0);
    assert_eq!(fp8_e4m3(0x01), 2f32.powi(-9));
    assert_eq!(fp8_e4m3(0x08), 2f32.powi(-6));
    assert_eq!(fp8_e4m3(0x0F), 15.0 * 2f32.powi(-9));
    assert_eq!(fp8_e4m3(0x3C), 1.5);
}

fn ct_config(format: &str, weights: serde_json::Value, inputs: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
        "ignore": ["lm_head"],
    })
}

#[test]
fn compressed_tensors_schemes_are_read_or_refused_by_name() {
    let w4 =
        serde_json::json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 128});
    let ok =
        CompressedTensors::parse(&ct_config("pack-quantized", w4.clone(), serde_json::Value::Null)).expect("W4A16");
    assert_eq!(ok.format, Format::PackQuantized { bits: 4, group: Group::Elements(128) });
    let fp8 = serde_json::json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel"});
    let dynamic = serde_json::json!({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true});
    assert_eq!(
        CompressedTensors::parse(&ct_config("float-quantized", fp8, dynamic)).expect("FP8").format,
        Format::FloatQuantized
    );

    let w8 = serde_json::json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"});
    let a8 = serde_json::json!({"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true});
    let refused = [
        (ct_config("int-quantized", w8.clone(), a8.clone()), "int-quantized"),
        (ct_config("pack-quantized", w8, a8), "input activations quantized to int8"),
        (ct_config("marlin-24", w4.clone(), serde_json::Value::Null), "marlin-24"),
        (
            ct_config(
                "pack-quantized",
                serde_json::json!({"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group", "group_size": 128}),
                serde_json::Value::Null,
            ),
            "asymmetric",
        ),
        (serde_json::json!({"quant_method": "gptq", "bits": 4}), "quant_method `gptq`"),
    ];
    for (config, named) in refused {
        let err = CompressedTensors::parse(&config).expect_err("refused");
        assert!(err.contains(named), "`{err}` should name `{named}`");
    }
}

/// A checkpoint whose matrices are served as the dequantised values of `policy`'s quantization:
/// loaded without quantization, it is the reference the quantized model must compute exactly.
struct Dequantized<'a> {
    inner: &'a Checkpoint,
    policy: LoadPolicy,
}

fn role_of(key: &str) -> Option<MatrixRole> {
    Some(if key.contains(".router.") {
        MatrixRole::Router
    } else if key.contains("shared_expert.") {
        MatrixRole::SharedExpert
    } else if key.contains("self_attn.") {
        MatrixRole::Attention
    } else if key.contains("feed_forward.experts.") {
        MatrixRole::RoutedExpert
    } else if key.contains("feed_forward.") {
        MatrixRole::DenseMlp
    } else if key.contains("lm_head") {
        MatrixRole::LmHead
    } else {
        return None;
    })
}

/// `t` (`[n, k]`) quantized with `scheme` and back, in f32.
fn round_trip(t: &Tensor, scheme: QuantScheme) -> Result<Tensor> {
    let (n, k) = t.dims2()?;
    let values: Vec<half::bf16> = t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
    let q = QuantMatrix::quantize(Weights::Bf16(&values), (n, k), scheme)?;
    Ok(Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?)
}

impl WeightSource for Dequantized<'_> {
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.inner.tensor(key, shape, DType::BF16, device)?;
        match role_of(key).and_then(|r| self.policy.scheme_for(r)) {
            Some(scheme) if shape.len() == 2 => Ok(round_trip(&t, scheme)?.to_dtype(dtype)?),
            _ => Ok(t.to_dtype(dtype)?),
        }
    }

    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.inner.rows(key, shape, start, len, DType::BF16, device)?;
        let Some(scheme) = role_of(key).and_then(|r| self.policy.scheme_for(r)) else { return Ok(t.to_dtype(dtype)?) };
        // Fused experts are stored `[E, in, out]` and quantized as `[out, in]`.
        let experts = (0..len)
            .map(|e| Ok(round_trip(&t.get(e)?.t()?.contiguous()?, scheme)?.t()?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&experts, 0)?.to_dtype(dtype)?)
    }
}

fn quality_against_golden(dir: &std::path::Path, policy: LoadPolicy) -> (Quality, f32) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    let quantized = load_policy(&cfg, &ckpt, policy);
    let reference = load_policy(&cfg, &Dequantized { inner: &ckpt, policy }, crate::WeightStorage::AsStored.into());
    let mut comparison = Comparison::default();
    let mut exact = 0f32;
    for case in golden_in(dir).cases {
        let (logits, _) = quantized.full(&case.input_ids);
        for (golden, got) in case.logits.iter().zip(&logits) {
            comparison.add(golden, got);
        }
        exact = exact.max(max_abs_diff(&logits, &reference.full(&case.input_ids).0));
    }
    (comparison.finish(), exact)
}

/// Quantizes the model in `dir` with every `(scheme, scope)` of `bounds` and checks top-1
/// agreement and mean KL against its bf16 golden, and that the logits equal (to 1e-4) those of a
/// model holding the dequantised weights.
fn assert_quality(dir: &std::path::Path, bounds: &[(QuantScheme, QuantScope, f64, f64)]) {
    assert_quality_with(dir, Activations::F32, bounds);
}

/// [`assert_quality`] with products multiplied with `activations`; with int8 activations the
/// logits are not the dequantised weights' exactly, and are only compared with the golden.
fn assert_quality_with(
    dir: &std::path::Path,
    activations: Activations,
    bounds: &[(QuantScheme, QuantScope, f64, f64)],
) {
    let mut failures = Vec::new();
    for &(scheme, scope, min_top1, max_kl) in bounds {
        let policy =
            LoadPolicy { storage: Default::default(), quantize: Some(Quantize { scheme, scope }), activations };
        let (q, exact) = quality_against_golden(dir, policy);
        eprintln!(
            "{}: {scheme} of {scope}, {activations} activations: {} positions, top-1 agreement {:.3}, mean KL {:.4}, p99 KL {:.4}, \
             max |Δlogit| {:.3}; against the dequantised weights {exact:e}",
            dir.display(),
            q.positions,
            q.top1_agreement,
            q.mean_kl,
            q.p99_kl,
            q.max_abs_logit_diff
        );
        assert!(q.positions > 60, "every position of every case");
        let exact_ok = activations == Activations::Int8 || exact <= 1e-4;
        if q.top1_agreement < min_top1 || q.mean_kl > max_kl || !exact_ok {
            failures.push(format!("{scheme} of {scope}: {q:?}, {exact} from the dequantised weights' logits"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The bounds, on the dev fixture it names (`../shared/fixtures/tiny-llama4`, the copy
/// beside the checkout), for the default scope and for the routed experts alone. Quantizing every
/// matrix moves more: on random weights more positions flip an expert choice, and those bounds only
/// catch a broken scheme (docs/model.md has the figures).
#[test]
fn int8_and_int4_of_the_dev_fixture_stay_within_the_bounds_and_compute_their_dequantised_weights_exactly() {
    let Some(dir) = epserve_testkit::fixtures::independent_copy(epserve_testkit::fixtures::TINY_LLAMA4) else {
        eprintln!(
            "skipped: no dev fixture at {} (the committed one is checked below)",
            epserve_testkit::fixtures::independent_root().display()
        );
        return;
    };
    assert_quality(
        &dir,
        &[
            (QuantScheme::Int8, QuantScope::default(), 0.97, 0.01),
            (QuantScheme::Int4, QuantScope::default(), 0.75, 0.3),
            (QuantScheme::Int8, QuantScope::ROUTED, 0.97, 0.01),
            (QuantScheme::Int4, QuantScope::ROUTED, 0.75, 0.3),
            (QuantScheme::Int8, QuantScope::ALL, 0.9, 0.05),
            (QuantScheme::Int4, QuantScope::ALL, 0.45, 0.8),
        ],
    );
}

/// The committed `tiny-llama4` has larger weights (RMS 0.12 in the experts) and is more chaotic: one
/// flipped expert changes every later position. The bounds are the for int8 and looser for
/// int4 (docs/model.md has the figures); exactness is the same.
#[test]
fn int8_and_int4_of_the_committed_fixture_stay_close_and_compute_their_dequantised_weights_exactly() {
    assert_quality(
        &fixture_dir(),
        &[
            (QuantScheme::Int8, QuantScope::default(), 0.97, 0.01),
            (QuantScheme::Int4, QuantScope::default(), 0.65, 0.4),
            (QuantScheme::Int8, QuantScope::ALL, 0.85, 0.05),
            (QuantScheme::Int4, QuantScope::ALL, 0.45, 0.8),
        ],
    );
}

/// Int8 activations (opt-in) on top of int8 and int4 weights, default scope and every matrix: the
/// error they add, measured against the same goldens (docs/model.md, "Int8 activations", has the
/// figures; the bounds are a little below them). On CPUs without AVX512-VNNI the products stay
/// exact and this checks those instead.
#[test]
fn int8_activations_stay_close_to_the_golden() {
    assert_quality_with(
        &fixture_dir(),
        Activations::Int8,
        &[
            (QuantScheme::Int8, QuantScope::default(), 0.93, 0.04),
            (QuantScheme::Int4, QuantScope::default(), 0.65, 0.4),
            (QuantScheme::Int8, QuantScope::ALL, 0.85, 0.08),
            (QuantScheme::Int4, QuantScope::ALL, 0.45, 0.8),
        ],
    );
    if let Some(dir) = epserve_testkit::fixtures::independent_copy(epserve_testkit::fixtures::TINY_LLAMA4) {
        assert_quality_with(
            &dir,
            Activations::Int8,
            &[
                (QuantScheme::Int8, QuantScope::default(), 0.97, 0.01),
                (QuantScheme::Int4, QuantScope::default(), 0.75, 0.3),
                (QuantScheme::Int8, QuantScope::ALL, 0.9, 0.08),
                (QuantScheme::Int4, QuantScope::ALL, 0.45, 0.8),
            ],
        );
    }
}

/// The compressed-tensors fixtures load as published (per-expert packed int4 or FP8 tensors, bf16
/// scales, the ignore list's matrices in bf16) and compute their goldens, which transformers
/// computed from the dequantised weights.
#[test]
fn compressed_tensors_checkpoints_load_as_published_and_match_their_goldens() {
    use epserve_testkit::fixtures;
    for (name, kind) in [(fixtures::TINY_LLAMA4_W4A16, CodeKind::Int4), (fixtures::TINY_LLAMA4_FP8, CodeKind::Fp8E4m3)]
    {
        let dir = fixtures::dir(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        assert!(ckpt.quantization().is_some(), "{name}: the scheme is read from config.json");
        let expert = ckpt
            .quantized("language_model.model.layers.1.feed_forward.experts.5.down_proj.weight", (64, 128))
            .expect("readable")
            .expect("stored quantized");
        assert_eq!(expert.kind(), kind);
        let attention =
            ckpt.quantized("language_model.model.layers.1.self_attn.q_proj.weight", (64, 64)).expect("readable");
        assert!(attention.is_none(), "{name}: attention is on the ignore list, stored in bf16");
        let m = load_policy(&cfg, &ckpt, crate::WeightStorage::AsStored.into());
        for case in golden_in(&dir).cases {
            let (logits, _) = m.full(&case.input_ids);
            let diff = max_abs_diff(&logits, &case.logits);
            eprintln!("{name} T={}: max |Δlogit| {diff:e}", case.input_ids.len());
            assert!(diff < 1e-3, "{name} T={}: max |Δlogit| = {diff}", case.input_ids.len());
        }
    }
}

/// A checkpoint whose `quantization_config` names a scheme this loader does not read is refused
/// when it is opened, with a message naming the scheme.
#[test]
fn unsupported_pre_quantized_schemes_are_refused_by_name() {
    let src = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4_W4A16);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    let w8a8 = serde_json::json!({
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "token", "dynamic": true},
        }},
    });
    let awq = serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128});
    for (quantization, named) in [(w8a8, "int-quantized"), (awq, "awq")] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).expect("copy");
        let mut config = config.clone();
        config["quantization_config"] = quantization;
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
        let err = Checkpoint::open(dir.path()).expect_err("refused").to_string();
        assert!(err.contains(named) && err.contains("not supported"), "`{err}` should name `{named}`");
    }
}

#[test]
fn f16_scales_widen_exactly() {
    for bits in (0u16..=0xFFFF).filter(|b| b & 0x7C00 != 0x7C00) {
        let v = half::f16::from_bits(bits);
        assert_eq!(crate::kernels::source::f16_to_f32(v).to_bits(), v.to_f32().to_bits(), "{bits:#06x}");
    }
}
