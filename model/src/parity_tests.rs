//! Parity with Hugging Face transformers on the checkpoints in `tests/fixtures/` (golden outputs from
//! transformers, fp32 compute on the bf16 weights; see tests/fixtures/README.md), with full forward
//! passes and with incremental KV-cache decoding, and negative controls showing that each Llama-4
//! detail matters. One test also checks an independently made copy of `tiny-llama4` when it is
//! present beside the checkout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use epserve_testkit::fixtures;

use crate::WeightSource;
use crate::checkpoint::{Checkpoint, write_checkpoint};
use crate::config::ModelConfig;
use crate::deviation::Deviation;
use crate::experts::ExpertShard;
use crate::layers::WeightStorage;
use crate::moe::RoutingTrace;
use crate::text_model::{LogitsFor, SequenceStep, TextModel};

/// Logits must match to this absolute error (the reference expects ~1e-5 on values of ~3).
const TOLERANCE: f32 = 1e-3;

/// `tiny-llama4`: text + vision, top-1 routing, every layer MoE, hub-style config.
pub(crate) fn fixture_dir() -> PathBuf {
    fixtures::dir(fixtures::TINY_LLAMA4)
}

/// `tiny-llama4-top2`: text only, top-2 routing, dense layers between MoE layers, no qk-norm,
/// transformers-5 config.
pub(crate) fn top2_fixture_dir() -> PathBuf {
    fixtures::dir(fixtures::TINY_LLAMA4_TOP2)
}

#[derive(Deserialize)]
pub(crate) struct Golden {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub(crate) struct Case {
    pub input_ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    router_topk: std::collections::BTreeMap<String, Vec<Vec<u32>>>,
    pub greedy_tokens: Vec<u32>,
}

fn golden() -> Golden {
    golden_in(&fixture_dir())
}

pub(crate) fn golden_in(dir: &Path) -> Golden {
    let path = dir.join("golden/text.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden/text.json parses")
}

pub(crate) struct Loaded {
    pub model: TextModel,
    pub experts: ExpertShard,
}

fn load_from(dir: &std::path::Path) -> Loaded {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    load_with(&cfg, &ckpt)
}

fn load_with(cfg: &ModelConfig, src: &dyn WeightSource) -> Loaded {
    load_policy(cfg, src, WeightStorage::AsStored.into())
}

/// Every weight of `src`, kept as `policy` says.
pub(crate) fn load_policy(cfg: &ModelConfig, src: &dyn WeightSource, policy: crate::quant::LoadPolicy) -> Loaded {
    let dev = Device::Cpu;
    let all: Vec<u32> = (0..cfg.text.num_local_experts as u32).collect();
    Loaded {
        model: TextModel::load(cfg, src, DType::F32, policy, &dev, &mut |_, _| {}).expect("model loads"),
        experts: ExpertShard::load(cfg, src, &all, DType::F32, policy, &dev, &mut || {}).expect("experts load"),
    }
}

pub(crate) fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("f32 logits")
}

pub(crate) fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "vocab");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

pub(crate) fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).expect("non-empty")
}

/// Topk per layer as the golden file keys it: layer index → per token.
fn trace_by_layer(trace: &RoutingTrace) -> std::collections::BTreeMap<String, Vec<Vec<u32>>> {
    let mut out: std::collections::BTreeMap<String, Vec<Vec<u32>>> = Default::default();
    for (layer, rows) in &trace.layers {
        out.entry(layer.to_string()).or_default().extend(rows.iter().cloned());
    }
    out
}

impl Loaded {
    /// Full forward of `tokens` from an empty cache: logits of every position and the routing.
    pub(crate) fn full(&self, tokens: &[u32]) -> (Vec<Vec<f32>>, RoutingTrace) {
        let mut cache = self.model.new_cache();
        let mut trace = RoutingTrace::default();
        let logits = self
            .model
            .forward(&mut [SequenceStep::new(tokens, &mut cache)], &self.experts, LogitsFor::All, Some(&mut trace))
            .expect("forward");
        (rows(&logits), trace)
    }

    /// Feeds `tokens` in pieces of the given sizes through one cache.
    pub(crate) fn incremental(&self, tokens: &[u32], pieces: &[usize]) -> (Vec<Vec<f32>>, RoutingTrace) {
        let mut cache = self.model.new_cache();
        let mut trace = RoutingTrace::default();
        let mut out = Vec::new();
        let mut at = 0;
        let mut sizes = pieces.iter().copied().chain(std::iter::repeat(1));
        while at < tokens.len() {
            let n = sizes.next().unwrap_or(1).min(tokens.len() - at);
            let logits = self
                .model
                .forward(
                    &mut [SequenceStep::new(&tokens[at..at + n], &mut cache)],
                    &self.experts,
                    LogitsFor::All,
                    Some(&mut trace),
                )
                .expect("forward");
            out.extend(rows(&logits));
            at += n;
        }
        (out, trace)
    }

    /// 16 greedy tokens by repeated full forward passes (how the golden file defines them).
    fn greedy_full(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let (logits, _) = self.full(&seq);
            seq.push(argmax(logits.last().expect("a row")));
        }
        seq[prompt.len()..].to_vec()
    }

    /// Greedy tokens with the KV cache: prefill once, then one token per step.
    fn greedy_cached(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut cache = self.model.new_cache();
        let mut next = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let logits = self
                .model
                .forward(&mut [SequenceStep::new(&next, &mut cache)], &self.experts, LogitsFor::Last, None)
                .expect("forward");
            let t = argmax(&rows(&logits)[0]);
            out.push(t);
            next = vec![t];
        }
        out
    }
}

/// Logits of every position, router choices and greedy tokens of every golden case in `dir`.
fn assert_full_forward_matches(dir: &Path) {
    let m = load_from(dir);
    for case in golden_in(dir).cases {
        let (logits, trace) = m.full(&case.input_ids);
        let diff = max_abs_diff(&logits, &case.logits);
        eprintln!("full T={} diff {diff}", case.input_ids.len());
        assert!(diff < TOLERANCE, "T={}: max |Δlogit| = {diff}", case.input_ids.len());
        assert_eq!(trace_by_layer(&trace), case.router_topk, "router top-k, T={}", case.input_ids.len());
        assert_eq!(m.greedy_full(&case.input_ids, 16), case.greedy_tokens, "greedy, T={}", case.input_ids.len());
    }
}

#[test]
fn full_forward_matches_transformers() {
    assert_full_forward_matches(&fixture_dir());
}

#[test]
fn top2_dense_interleaved_full_forward_matches_transformers() {
    assert_full_forward_matches(&top2_fixture_dir());
}

/// The goldens of an independently made `tiny-llama4` (other weights, other generator, another
/// transformers release), when a copy sits beside the checkout at `../shared/fixtures`.
#[test]
fn independent_fixture_cross_check() {
    match fixtures::independent_copy(fixtures::TINY_LLAMA4) {
        Some(dir) => assert_full_forward_matches(&dir),
        None => eprintln!(
            "skipped: no independent fixture at {} (optional cross-check)",
            fixtures::independent_root().join(fixtures::TINY_LLAMA4).display()
        ),
    }
}

#[test]
fn weights_kept_in_bf16_compute_what_weights_converted_at_load_compute() {
    let dir = fixture_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let all: Vec<u32> = (0..cfg.text.num_local_experts as u32).collect();
    let load = |storage| ExpertShard::load(&cfg, &ckpt, &all, DType::F32, storage, &Device::Cpu, &mut || {});
    let (kept, widened) = (load(WeightStorage::AsStored).expect("bf16"), load(WeightStorage::Compute).expect("f32"));
    assert_eq!(kept.resident_bytes() * 2, widened.resident_bytes(), "bf16 experts take half the memory");
    let model =
        |storage| TextModel::load(&cfg, &ckpt, DType::F32, storage, &Device::Cpu, &mut |_, _| {}).expect("model");
    let kept = Loaded { model: model(WeightStorage::AsStored), experts: kept };
    let widened = Loaded { model: model(WeightStorage::Compute), experts: widened };
    for case in golden().cases {
        // Prefill: more rows than `kernels::max_rows` take candle's gemm for f32 weights.
        let (a, _) = kept.full(&case.input_ids);
        let (b, _) = widened.full(&case.input_ids);
        assert!(max_abs_diff(&a, &b) < 1e-4, "prefill, T={}", case.input_ids.len());
        // Decode steps: the same kernels on the same values, bit for bit.
        let (a, _) = kept.incremental(&case.input_ids, &[1]);
        let (b, _) = widened.incremental(&case.input_ids, &[1]);
        assert_eq!(a, b, "token by token, T={}", case.input_ids.len());
    }
}

#[test]
fn kv_cache_decoding_matches_transformers() {
    assert_kv_cache_decoding_matches(&fixture_dir());
}

#[test]
fn top2_dense_interleaved_kv_cache_decoding_matches_transformers() {
    assert_kv_cache_decoding_matches(&top2_fixture_dir());
}

fn assert_kv_cache_decoding_matches(dir: &Path) {
    let m = load_from(dir);
    for case in golden_in(dir).cases {
        let t = case.input_ids.len();
        // One token per step, and a prefill that ends mid-chunk followed by uneven pieces.
        for pieces in [vec![1], vec![5, 3, 9, 2]] {
            let (logits, trace) = m.incremental(&case.input_ids, &pieces);
            let diff = max_abs_diff(&logits, &case.logits);
            assert!(diff < TOLERANCE, "T={t} pieces {pieces:?}: max |Δlogit| = {diff}");
            assert_eq!(trace_by_layer(&trace), case.router_topk, "router top-k, T={t} pieces {pieces:?}");
        }
        assert_eq!(m.greedy_cached(&case.input_ids, 16), case.greedy_tokens, "cached greedy, T={t}");
    }
}

/// All golden sequences in one step (rows concatenated, each with its own cache) give each
/// sequence's own logits: the batched path the serving engine uses.
#[test]
fn batched_sequences_match_transformers() {
    assert_batched_sequences_match(&fixture_dir());
}

#[test]
fn top2_dense_interleaved_batched_sequences_match_transformers() {
    assert_batched_sequences_match(&top2_fixture_dir());
}

fn assert_batched_sequences_match(dir: &Path) {
    let m = load_from(dir);
    let cases = golden_in(dir).cases;
    let mut caches: Vec<_> = cases.iter().map(|_| m.model.new_cache()).collect();
    let mut steps: Vec<SequenceStep<'_>> =
        cases.iter().zip(caches.iter_mut()).map(|(c, cache)| SequenceStep::new(&c.input_ids, cache)).collect();
    let logits = rows(&m.model.forward(&mut steps, &m.experts, LogitsFor::All, None).expect("forward"));
    let mut at = 0;
    for case in &cases {
        let n = case.input_ids.len();
        let diff = max_abs_diff(&logits[at..at + n], &case.logits);
        assert!(diff < TOLERANCE, "T={n} in a batch: max |Δlogit| = {diff}");
        at += n;
    }
}

/// The same checkpoint split into shards with `model.safetensors.index.json` loads and computes the
/// same logits.
#[test]
fn sharded_checkpoint_loads_identically() {
    let src = fixture_dir();
    let ckpt = Checkpoint::open(&src).expect("checkpoint");
    let cfg = ModelConfig::from_file(&src.join("config.json")).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tensors = Vec::new();
    let mut keys: Vec<&str> = ckpt.keys().collect();
    keys.sort_unstable();
    for key in keys {
        let shape = ckpt.shape(key).expect("shape").to_vec();
        tensors.push((key.to_owned(), ckpt.tensor(key, &shape, DType::BF16, &Device::Cpu).expect("tensor")));
    }
    write_checkpoint(dir.path(), &tensors, Some(64 * 1024)).expect("write shards");
    let shards = std::fs::read_dir(dir.path()).expect("dir").count();
    assert!(shards > 3, "expected several shards, got {shards} files");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy config");
    let sharded = load_from(dir.path());
    let single = load_with(&cfg, &ckpt);
    let case = &golden().cases[2];
    assert_eq!(sharded.full(&case.input_ids).0, single.full(&case.input_ids).0);
}

/// Each deliberate mistake moves the logits far outside the tolerance: the parity test would catch
/// an implementation that got it wrong.
#[test]
fn each_llama4_detail_matters() {
    let cases = golden().cases;
    let longest = cases.iter().max_by_key(|c| c.input_ids.len()).expect("cases");
    for deviation in [
        Deviation::RotateHalfRope,
        Deviation::ScaleExpertOutput,
        Deviation::NoTemperatureTuning,
        Deviation::NoChunkMask,
        Deviation::NoQkNorm,
    ] {
        let mut m = load_from(&fixture_dir());
        m.model = m.model.with_deviation(Some(deviation));
        let (logits, _) = m.full(&longest.input_ids);
        let diff = max_abs_diff(&logits, &longest.logits);
        eprintln!("{deviation:?} {diff}");
        assert!(diff > 50.0 * TOLERANCE, "{deviation:?} changed the logits by only {diff}");
    }
}

/// A tensor whose shape disagrees with the config, and a missing tensor, are errors that name the
/// key (and both shapes).
#[test]
fn checkpoint_errors_name_the_key() {
    let dir = fixture_dir();
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("read")).expect("json");
    value["text_config"]["intermediate_size"] = serde_json::json!(96);
    let cfg = ModelConfig::from_json(&value).expect("config");
    let err = TextModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {})
        .expect_err("shape mismatch");
    let message = err.to_string();
    assert!(
        message.contains("language_model.model.layers.0.feed_forward.shared_expert.gate_proj.weight")
            && message.contains("[128, 64]")
            && message.contains("[96, 64]"),
        "{message}"
    );

    let out = tempfile::tempdir().expect("tempdir");
    let tensors: Vec<(String, Tensor)> = ckpt
        .keys()
        .filter(|k| !k.ends_with("layers.2.self_attn.k_proj.weight"))
        .map(|k| {
            let shape = ckpt.shape(k).expect("shape").to_vec();
            (k.to_owned(), ckpt.tensor(k, &shape, DType::BF16, &Device::Cpu).expect("tensor"))
        })
        .collect();
    write_checkpoint(out.path(), &tensors, None).expect("write");
    let partial = Checkpoint::open(out.path()).expect("open");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let err = TextModel::load(&cfg, &partial, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {})
        .expect_err("missing");
    assert!(err.to_string().contains("language_model.model.layers.2.self_attn.k_proj.weight"), "{err}");
}
