//! Skewed routers (`epserve gen-model --router-skew zipf:S[,seed]`): random routers send tokens to
//! every expert about equally, so nothing about load balancing can be learned from them. A skewed
//! checkpoint's MoE layers prefer their experts as Zipf(S) does, each layer under its own
//! permutation of the experts (docs/load-balancing.md, "Skewed test models").
//!
//! How, since Llama 4's router has no bias term: hidden dimension 0 ([`BIAS_DIM`]) is made a
//! constant. Every token embedding holds [`BIAS_LEVEL`] there, and no layer writes into it (row 0
//! of `o_proj`, of the shared expert's and dense MLPs' `down_proj`, and column 0 of the routed
//! experts' `down_proj` are zero), so the residual stream carries exactly that constant at every
//! layer and each router input (the normed residual) a positive `x₀ = BIAS_LEVEL / rms(h)`. Router
//! column 0 is then a per-expert bias `b_e · x₀` on the logits. `lm_head`'s column 0 is zeroed too,
//! so the constant shifts no token's logit. The biases are calibrated on the model itself, layer by
//! layer (a layer's router inputs depend on the routing of the layers before it): the router inputs
//! of calibration tokens are captured, and `b` is fitted until the top-k shares on them match the
//! Zipf shares. The result is written to `router_skew.json` beside the weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use epserve_model::kernels::on_pool;
use epserve_model::{
    ExpertBackend, ExpertBatch, ExpertShard, ExpertsInFlight, ModelConfig, SequenceStep, TextModel, WeightSource,
    WeightStorage,
};
use parking_lot::Mutex;
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::tokenizer::{SyntheticTokenizer, corpus_ids};

/// The hidden dimension that carries the router bias.
pub const BIAS_DIM: usize = 0;
/// The constant every token's residual stream holds in [`BIAS_DIM`] (token embeddings are N(0, 1)).
pub const BIAS_LEVEL: f32 = 2.0;
/// Where a skewed checkpoint records its skew.
pub const SKEW_FILE: &str = "router_skew.json";

/// Calibration traffic: sequences of every length from 8 to 256 tokens (the router input's `x₀`
/// depends on the residual's RMS, which depends on how many tokens attention averages over), two of
/// each length taken from the embedded English text (as the checkpoint's tokenizer encodes it) and
/// one of random ordinary tokens, so that the fit holds for short and long prompts, text and
/// synthetic benchmark prompts alike: 2,184 tokens.
const CALIBRATION_LENGTHS: [usize; 6] = [8, 24, 48, 96, 176, 376];
const FIT_ITERATIONS: usize = 400;

/// Expert popularity that every MoE layer's router is biased towards: the expert of rank `r`
/// (1-based) gets a share ∝ `r^-exponent` of the routed rows; which expert has which rank is a
/// per-layer permutation drawn from `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSkew {
    pub exponent: f64,
    pub seed: u64,
}

impl RouterSkew {
    /// `none` (no skew), `zipf:S` or `zipf:S,SEED` (S > 0, finite; SEED defaults to 0).
    pub fn parse(text: &str) -> Result<Option<RouterSkew>> {
        let bad = |why: &str| {
            Err(Error::Skew(format!("--router-skew {text:?}: {why} (expected none, zipf:S or zipf:S,SEED)")))
        };
        let text_trimmed = text.trim();
        if text_trimmed == "none" {
            return Ok(None);
        }
        let Some(rest) = text_trimmed.strip_prefix("zipf:") else { return bad("unknown distribution") };
        let (s, seed) = match rest.split_once(',') {
            Some((s, seed)) => (s, Some(seed)),
            None => (rest, None),
        };
        let Ok(exponent) = s.trim().parse::<f64>() else { return bad("the exponent is not a number") };
        if !exponent.is_finite() || exponent <= 0.0 {
            return bad("the exponent must be finite and > 0");
        }
        let seed = match seed.map(|s| s.trim().parse::<u64>()) {
            None => 0,
            Some(Ok(seed)) => seed,
            Some(Err(_)) => return bad("the seed is not an unsigned integer"),
        };
        Ok(Some(RouterSkew { exponent, seed }))
    }

    /// Zipf shares by rank (rank 1 first), summing to 1.
    pub fn rank_shares(&self, experts: usize) -> Vec<f64> {
        let w: Vec<f64> = (1..=experts).map(|r| (r as f64).powf(-self.exponent)).collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// The expert ids of `layer` from the most to the least popular (a Fisher-Yates shuffle seeded
    /// by the seed and the layer).
    pub fn experts_by_rank(&self, layer: usize, experts: usize) -> Vec<u32> {
        let mut rng = SplitMix64::seed_from_u64(self.seed ^ (layer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut p: Vec<u32> = (0..experts as u32).collect();
        for i in (1..p.len()).rev() {
            p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        p
    }

    /// The share of routed rows each expert of `layer` should receive, by expert id.
    pub fn expert_shares(&self, layer: usize, experts: usize) -> Vec<f64> {
        let mut shares = vec![0.0; experts];
        for (share, e) in self.rank_shares(experts).into_iter().zip(self.experts_by_rank(layer, experts)) {
            shares[e as usize] = share;
        }
        shares
    }
}

/// What `router_skew.json` records.
#[derive(Debug, Serialize)]
struct SkewRecord {
    distribution: &'static str,
    exponent: f64,
    seed: u64,
    bias_dim: usize,
    bias_level: f32,
    calibration_tokens: usize,
    layers: Vec<LayerRecord>,
}

#[derive(Debug, Serialize)]
struct LayerRecord {
    layer: usize,
    /// Expert ids from the most to the least popular.
    experts_by_rank: Vec<u32>,
    /// Target share of each rank.
    target_shares: Vec<f64>,
    /// Share of each rank on the calibration tokens after fitting.
    calibrated_shares: Vec<f64>,
}

/// Makes [`BIAS_DIM`] a constant of the residual stream (see the module comment) in the generated
/// text tensors, before calibration.
pub(crate) fn carve_bias_dim(cfg: &ModelConfig, tensors: &mut [(String, Tensor)]) -> Result<()> {
    let h = cfg.text.hidden_size;
    let keep = |t: &Tensor, shape: &[usize]| -> Result<Tensor> {
        // 1 everywhere but at BIAS_DIM, shaped to broadcast over `t` along its hidden axis.
        let mut mask = vec![1f32; h];
        mask[BIAS_DIM] = 0.0;
        Ok(t.broadcast_mul(&Tensor::from_vec(mask, shape, t.device())?.to_dtype(t.dtype())?)?)
    };
    let lm_head = cfg.architecture.lm_head_key();
    let decoder = cfg.architecture.decoder_prefix();
    // The vision tower's own `o_proj`s are left alone: only the decoder's residual stream matters.
    for (key, t) in tensors.iter_mut().filter(|(key, _)| key.starts_with(decoder) || key == lm_head) {
        if key.ends_with("embed_tokens.weight") {
            let mut level = vec![0f32; h];
            level[BIAS_DIM] = BIAS_LEVEL;
            let level = Tensor::from_vec(level, (1, h), t.device())?.to_dtype(t.dtype())?;
            *t = keep(t, &[1, h])?.broadcast_add(&level)?;
        } else if key == lm_head {
            *t = keep(t, &[1, h])?;
        } else if key.ends_with("self_attn.o_proj.weight") || key.ends_with("down_proj.weight") {
            // `[hidden, in]`: the row that writes into BIAS_DIM (shared expert and dense MLP alike).
            *t = keep(t, &[h, 1])?;
        } else if key.ends_with("experts.down_proj") {
            // `[E, inter, hidden]`.
            *t = keep(t, &[1, 1, h])?;
        }
    }
    Ok(())
}

/// Fits every MoE layer's router bias column to `skew` on the model in `tensors` (already carved),
/// replaces the routers in `tensors`, and writes `router_skew.json` into `out`.
pub(crate) fn calibrate(
    cfg: &ModelConfig,
    skew: RouterSkew,
    tensors: &mut [(String, Tensor)],
    tokenizer: &SyntheticTokenizer,
    out: &Path,
) -> Result<()> {
    let t = &cfg.text;
    let (experts, top_k) = (t.num_local_experts, t.num_experts_per_tok);
    let max_share = skew.rank_shares(experts).first().copied().unwrap_or(0.0);
    if max_share * top_k as f64 > 1.0 {
        return Err(Error::Skew(format!(
            "zipf:{} gives the hottest expert {:.0} % of the rows, more than top-{top_k} routing can send it",
            skew.exponent,
            max_share * 100.0
        )));
    }
    let dev = Device::Cpu;
    let index: HashMap<String, usize> = tensors.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
    let moe_layers: Vec<usize> = t.moe_layers().collect();
    let all_experts: Vec<u32> = (0..experts as u32).collect();
    let shard = {
        let src = InMemory { tensors, index: &index };
        ExpertShard::load(cfg, &src, &all_experts, DType::F32, WeightStorage::AsStored, &dev, &mut || {})?
    };
    let mut rng = SplitMix64::seed_from_u64(skew.seed ^ 0x5eed_ca1b);
    let ordinary = tokenizer.first_special.max(1);
    let text = corpus_ids(tokenizer);
    let sequences: Vec<Vec<u32>> = CALIBRATION_LENGTHS
        .iter()
        .flat_map(|&len| [len, len, len].into_iter().enumerate())
        .map(|(i, len)| {
            if i < 2 && !text.is_empty() {
                let start = (rng.next_u64() % text.len() as u64) as usize;
                (0..len).map(|j| text[(start + j) % text.len()]).collect()
            } else {
                (0..len).map(|_| (rng.next_u64() % u64::from(ordinary)) as u32).collect()
            }
        })
        .collect();
    let prefix = cfg.architecture.decoder_prefix();
    let mut layers = Vec::with_capacity(moe_layers.len());
    for &layer in &moe_layers {
        let model = {
            let src = InMemory { tensors, index: &index };
            TextModel::load(cfg, &src, DType::F32, WeightStorage::AsStored, &dev, &mut |_, _| {})?
        };
        let inputs = capture_router_inputs(&model, &shard, &sequences, layer)?;
        let key = format!("{prefix}layers.{layer}.feed_forward.router.weight");
        let Some(&i) = index.get(&key) else {
            return Err(Error::Skew(format!("the checkpoint has no {key}")));
        };
        let router = &tensors[i].1;
        let weights = router.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let target = skew.expert_shares(layer, experts);
        let (bias, achieved) = fit_bias(&weights, &inputs, &target, top_k);
        let mut fitted = weights;
        for (row, b) in fitted.iter_mut().zip(&bias) {
            row[BIAS_DIM] = *b;
        }
        let flat: Vec<f32> = fitted.into_iter().flatten().collect();
        tensors[i].1 = Tensor::from_vec(flat, router.dims(), &dev)?.to_dtype(router.dtype())?;
        let by_rank = skew.experts_by_rank(layer, experts);
        let calibrated: Vec<f64> = by_rank.iter().map(|&e| achieved[e as usize]).collect();
        tracing::info!(
            "router skew: layer {layer} fitted, hottest expert {} at {:.1} % (target {:.1} %)",
            by_rank[0],
            calibrated[0] * 100.0,
            skew.rank_shares(experts)[0] * 100.0
        );
        layers.push(LayerRecord {
            layer,
            experts_by_rank: by_rank,
            target_shares: skew.rank_shares(experts),
            calibrated_shares: calibrated,
        });
    }
    let record = SkewRecord {
        distribution: "zipf",
        exponent: skew.exponent,
        seed: skew.seed,
        bias_dim: BIAS_DIM,
        bias_level: BIAS_LEVEL,
        calibration_tokens: 3 * CALIBRATION_LENGTHS.iter().sum::<usize>(),
        layers,
    };
    let path = out.join(SKEW_FILE);
    let text = serde_json::to_string_pretty(&record).map_err(|source| Error::Json { path: path.clone(), source })?;
    std::fs::write(&path, text).map_err(Error::io(&path))
}

/// The router inputs (post-attention-normed hidden rows) of every calibration token at `layer`.
///
/// They are taken from the rows the MoE block hands to its experts: a routed row is the router
/// input scaled by its (positive) sigmoid score, and a router input has an RMS of 1 (RMSNorm with
/// unit weights, as generated), so dividing a row by its RMS gives the input back. Under top-k > 1
/// every token is seen k times, which weights all tokens alike.
fn capture_router_inputs(
    model: &TextModel,
    shard: &ExpertShard,
    sequences: &[Vec<u32>],
    layer: usize,
) -> Result<Vec<Vec<f32>>> {
    let capture = Capture { shard, layer, rows: Mutex::new(Vec::new()) };
    let mut caches: Vec<_> = sequences.iter().map(|_| model.new_cache()).collect();
    on_pool(|| -> Result<()> {
        let mut seqs: Vec<SequenceStep<'_>> =
            sequences.iter().zip(caches.iter_mut()).map(|(s, c)| SequenceStep::new(s, c)).collect();
        let mut step = model.begin_step(&mut seqs)?;
        for l in 0..=layer {
            model.run_layer(&mut step, l, &capture, None)?;
        }
        Ok(())
    })?;
    let rows = capture.rows.into_inner();
    Ok(rows
        .into_iter()
        .map(|mut row| {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32).sqrt();
            if rms > 0.0 {
                row.iter_mut().for_each(|v| *v /= rms);
            }
            row
        })
        .collect())
}

/// Passes every batch to the shard, keeping the rows of `layer`.
struct Capture<'a> {
    shard: &'a ExpertShard,
    layer: usize,
    rows: Mutex<Vec<Vec<f32>>>,
}

impl ExpertBackend for Capture<'_> {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + 'a>> {
        if batch.layer == self.layer {
            let rows = batch.rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            self.rows.lock().extend(rows);
        }
        self.shard.submit(batch)
    }
}

/// Per-expert biases `b` (router column [`BIAS_DIM`]) whose top-k shares on `inputs` come closest
/// to `target`; returns them with the shares they give. Each iteration moves every expert's bias by
/// the log ratio of its target share to its share now (in logit units: divided by the mean `x₀`),
/// which raises an expert's share exactly when it is below target; the best iterate (least total
/// variation distance) is kept.
fn fit_bias(weights: &[Vec<f32>], inputs: &[Vec<f32>], target: &[f64], top_k: usize) -> (Vec<f32>, Vec<f64>) {
    let experts = weights.len();
    // Logits without the bias column, and each input's x₀.
    let base: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| {
            weights
                .iter()
                .map(|w| w.iter().zip(x).enumerate().filter(|(d, _)| *d != BIAS_DIM).map(|(_, (a, b))| a * b).sum())
                .collect()
        })
        .collect();
    let x0: Vec<f32> = inputs.iter().map(|x| x.get(BIAS_DIM).copied().unwrap_or(0.0)).collect();
    let mean_x0 = (x0.iter().sum::<f32>() / x0.len().max(1) as f32).max(1e-3);
    let n = inputs.len().max(1) as f64;
    let shares = |bias: &[f32]| -> Vec<f64> {
        let mut counts = vec![0u32; experts];
        let mut logits = vec![(0f32, 0u32); experts];
        for (row, &x0) in base.iter().zip(&x0) {
            for (e, l) in logits.iter_mut().enumerate() {
                *l = (row[e] + bias[e] * x0, e as u32);
            }
            logits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, e) in logits.iter().take(top_k) {
                counts[e as usize] += 1;
            }
        }
        counts.iter().map(|&c| f64::from(c) / (n * top_k as f64)).collect()
    };
    let mut bias = vec![0f32; experts];
    let mut best = (f64::INFINITY, bias.clone(), vec![0.0; experts]);
    for it in 0..FIT_ITERATIONS {
        let now = shares(&bias);
        let distance: f64 = now.iter().zip(target).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        if distance < best.0 {
            best = (distance, bias.clone(), now.clone());
        }
        // Smaller steps later, so the fit settles instead of oscillating between neighbours.
        let rate = if it < FIT_ITERATIONS / 2 { 0.5 } else { 0.15 };
        let floor = 0.5 / n;
        for e in 0..experts {
            let ratio = (target[e].max(floor) / now[e].max(floor)).ln();
            bias[e] += (rate * ratio) as f32 / mean_x0;
        }
    }
    (best.1, best.2)
}

/// The generated tensors as a weight source (for calibration).
struct InMemory<'a> {
    tensors: &'a [(String, Tensor)],
    index: &'a HashMap<String, usize>,
}

impl InMemory<'_> {
    fn get(&self, key: &str, shape: &[usize]) -> epserve_model::Result<&Tensor> {
        let t = self.index.get(key).map(|&i| &self.tensors[i].1);
        match t {
            Some(t) if t.dims() == shape => Ok(t),
            Some(t) => Err(epserve_model::Error::Input(format!("{key}: shape {:?}, expected {shape:?}", t.dims()))),
            None => Err(epserve_model::Error::Input(format!("{key} was not generated"))),
        }
    }
}

impl WeightSource for InMemory<'_> {
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> epserve_model::Result<Tensor> {
        Ok(self.get(key, shape)?.to_dtype(dtype)?.to_device(device)?)
    }

    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> epserve_model::Result<Tensor> {
        Ok(self.get(key, shape)?.narrow(0, start, len)?.to_dtype(dtype)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_none_zipf_and_seed_and_names_bad_input() {
        assert_eq!(RouterSkew::parse("none").expect("none"), None);
        assert_eq!(RouterSkew::parse("zipf:1.2").expect("zipf"), Some(RouterSkew { exponent: 1.2, seed: 0 }));
        assert_eq!(RouterSkew::parse("zipf:0.8,7").expect("seed"), Some(RouterSkew { exponent: 0.8, seed: 7 }));
        for bad in ["zipf", "zipf:", "zipf:x", "zipf:-1", "zipf:0", "zipf:inf", "zipf:1.2,-3", "uniform:1", ""] {
            let err = RouterSkew::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("--router-skew"), "{bad}: {err}");
        }
    }

    #[test]
    fn zipf_shares_and_permutations() {
        let skew = RouterSkew { exponent: 1.2, seed: 0 };
        let shares = skew.rank_shares(16);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Σ_{r≤16} r^-1.2 ≈ 2.737: the hottest expert's share is ~36.5 %.
        assert!((shares[0] - 0.365).abs() < 0.002, "{}", shares[0]);
        assert!(shares.windows(2).all(|w| w[0] > w[1]));
        let (a, b) = (skew.experts_by_rank(0, 16), skew.experts_by_rank(1, 16));
        assert_ne!(a, b, "layers have their own permutations");
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<u32>>());
        assert_eq!(a, skew.experts_by_rank(0, 16), "deterministic");
        assert_ne!(a, RouterSkew { seed: 1, ..skew }.experts_by_rank(0, 16));
        let by_expert = skew.expert_shares(0, 16);
        assert_eq!(by_expert[a[0] as usize], shares[0]);
    }

    #[test]
    fn fitted_biases_reach_the_target_shares_on_random_logits() {
        // 2000 inputs with x₀ = 0.5 and standard normal logits over 8 experts.
        let mut rng = SplitMix64::seed_from_u64(3);
        let dims = 33;
        let weights: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..dims).map(|_| crate::weights::normal(&mut rng) / (dims as f32).sqrt()).collect())
            .collect();
        let inputs: Vec<Vec<f32>> = (0..2000)
            .map(|_| {
                let mut x: Vec<f32> = (0..dims).map(|_| crate::weights::normal(&mut rng)).collect();
                x[BIAS_DIM] = 0.5;
                x
            })
            .collect();
        let skew = RouterSkew { exponent: 1.0, seed: 5 };
        let target = skew.expert_shares(0, 8);
        for top_k in [1, 2] {
            let (_, shares) = fit_bias(&weights, &inputs, &target, top_k);
            let distance: f64 = shares.iter().zip(&target).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
            assert!(distance < 0.03, "top-{top_k}: {shares:?} against {target:?}");
        }
    }
}
