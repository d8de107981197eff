//! Per-request sampling: penalties, temperature, top-k, top-p, min-p, a seeded generator, and
//! logprobs, and the stop rule. Each request owns its [`Sampler`] (and its random state), so a
//! seeded request draws the same tokens alone or batched with others, and across preemption. The
//! server's engine and `epserve generate` both sample here: same seed, same tokens.

use epserve_grammar::TokenMask;
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Same seed, same tokens. `None`: drawn from the clock.
    pub seed: Option<u64>,
    /// HF-style: logits of tokens already in the prompt or output are divided (if positive) or
    /// multiplied (if negative) by this (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI-style, on output tokens: `logit -= frequency_penalty × count`.
    pub frequency_penalty: f32,
    /// OpenAI-style, on output tokens: `logit -= presence_penalty` if the token appeared.
    pub presence_penalty: f32,
    pub max_tokens: u32,
    /// Generation ends after any of these (in addition to the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Return the chosen token's logprob and this many top alternatives.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Most alternatives a request may ask logprobs for (OpenAI's limit is 20).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS` is the same): dividing scores by
/// a temperature such as 1e-40 overflows f32, and the infinities and NaN that follow would pick an
/// unlikely token instead of the likeliest one such a temperature asks for.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;

impl SamplingParams {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite =
            |name: &str, v: f32| if v.is_finite() { Ok(()) } else { Err(format!("{name} must be a finite number")) };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"));
        }
        Ok(())
    }
}

/// One sampled token, with logprobs when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log-softmax of the model's logits (before penalties and temperature) at `token`.
    pub logprob: Option<f32>,
    /// The most likely tokens and their logprobs, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Output token counts, for the frequency and presence penalties.
    output_counts: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt and output, for the repetition penalty.
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        Sampler {
            rng: SplitMix64::seed_from_u64(seed),
            seen: prompt.iter().copied().collect(),
            output_counts: Default::default(),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether generation ends after `token`: one of the request's stop tokens, or one of the
    /// model's `eos_token_ids` unless the request ignores EOS. (The length limits are the caller's.)
    pub fn stops_at(&self, token: u32, eos_token_ids: &[u32]) -> bool {
        self.params.stop_token_ids.contains(&token) || (!self.params.ignore_eos && eos_token_ids.contains(&token))
    }

    /// Picks the next token from one row of logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_masked(logits, None)
    }

    /// [`Self::sample`] among the tokens a grammar allows only: the others' scores are −∞ after the
    /// penalties, so greedy and every filter see the constrained distribution. Logprobs stay the
    /// model's (before the mask, as before penalties and temperature).
    pub fn sample_masked(&mut self, logits: &[f32], mask: Option<&TokenMask>) -> Sampled {
        let p = &self.params;
        let (logprob_of, top) = match p.logprobs {
            Some(n) => {
                let lp = log_softmax(logits);
                let mut order: Vec<u32> = (0..lp.len() as u32).collect();
                let n = (n as usize).min(order.len());
                let nth = n.saturating_sub(1).min(order.len() - 1);
                order.select_nth_unstable_by(nth, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
                let mut top: Vec<(u32, f32)> = order[..n].iter().map(|&t| (t, lp[t as usize])).collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };

        let mut scores = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s > 0.0 { *s / p.repetition_penalty } else { *s * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        if let Some(mask) = mask {
            mask.apply(&mut scores);
        }
        let token = if p.temperature < GREEDY_BELOW_TEMPERATURE { argmax(&scores) } else { self.draw(&scores) };
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
        Sampled { token, logprob: logprob_of.map(|lp| lp[token as usize]), top }
    }

    fn draw(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut cands: Vec<(u32, f32)> =
            scores.iter().enumerate().map(|(i, &s)| (i as u32, s / p.temperature)).collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cands.truncate(p.top_k as usize);
        }
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        // Tokens a grammar masked (and any whose probability underflowed) sit at the end with
        // probability 0: never let the rounding fallback below land on one.
        let mut keep = probs.iter().take_while(|&&q| q > 0.0).count().max(1);
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for q in &probs[..keep] {
                acc += q;
                n += 1;
                if acc >= f64::from(p.top_p) {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut target = f64::from(uniform(&mut self.rng)) * total;
        for (i, q) in probs[..keep].iter().enumerate() {
            target -= q;
            if target < 0.0 {
                return cands[i].0;
            }
        }
        cands[keep - 1].0
    }
}

/// Uniform in [0, 1) from the top 24 bits of a draw: exactly representable in f32.
fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// Greedy choice; ties go to the lowest id.
pub fn argmax(scores: &[f32]) -> u32 {
    scores.iter().enumerate().fold(0, |best, (i, v)| if *v > scores[best] { i } else { best }) as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { seed: Some(7), ..Default::default() }
    }

    /// The generator is SplitMix64 (Steele et al. 2014) as in `splitmix64.c`: the values the
    /// in-house copy used before gave, so seeded requests keep their tokens.
    #[test]
    fn the_generator_is_reference_splitmix64() {
        let first = |seed: u64| {
            let mut rng = SplitMix64::seed_from_u64(seed);
            [rng.next_u64(), rng.next_u64(), rng.next_u64()]
        };
        assert_eq!(first(0), [0xe220_a839_7b1d_cdaf, 0x6e78_9e6a_a1b9_65f4, 0x06c4_5d18_8009_454f]);
        assert_eq!(first(7), [0x63cb_e1e4_5932_0dd7, 0x044c_3cd7_f43c_661c, 0xe698_4080_bab1_2a02]);
        assert_eq!(
            first(1_477_776_061_723_855_037),
            [0x1b8c_fae9_2bc8_29e2, 0x2958_83a2_0d7e_72f3, 0xbb82_3b1f_6575_a666]
        );
        // And the same as the step-by-step definition for a few more seeds and draws.
        for seed in [1, 42, 0x9e37_79b9_7f4a_7c15, u64::MAX] {
            let mut rng = SplitMix64::seed_from_u64(seed);
            let mut state = seed;
            for _ in 0..100 {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                assert_eq!(rng.next_u64(), z ^ (z >> 31), "seed {seed}");
            }
        }
        let mut rng = SplitMix64::seed_from_u64(0);
        assert_eq!(uniform(&mut rng), 0xe220a8 as f32 / (1u64 << 24) as f32);
    }

    #[test]
    fn stop_tokens_and_eos_end_generation() {
        let eos = [9, 10];
        let s = Sampler::new(SamplingParams { stop_token_ids: vec![3], ..params() }, &[]);
        assert!(s.stops_at(3, &eos) && s.stops_at(10, &eos) && !s.stops_at(4, &eos));
        let s = Sampler::new(SamplingParams { stop_token_ids: vec![3], ignore_eos: true, ..params() }, &[]);
        assert!(s.stops_at(3, &eos) && !s.stops_at(10, &eos));
    }

    #[test]
    fn greedy_and_penalties() {
        let logits = [1.0, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..params() }, &[]);
        assert_eq!(s.sample(&logits).token, 1);
        // Presence penalty pushes the already-emitted token below the runner-up.
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, presence_penalty: 0.5, ..params() }, &[]);
        assert_eq!(s.sample(&logits).token, 1);
        assert_eq!(s.sample(&logits).token, 2);
        // Repetition penalty counts prompt tokens too.
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..params() }, &[1]);
        assert_eq!(s.sample(&logits).token, 2);
    }

    /// A vanishing temperature asks for the likeliest token; dividing by it would overflow.
    #[test]
    fn tiny_temperatures_sample_greedily() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 50) as f32 / 3.0).collect();
        let best = argmax(&logits);
        for temperature in [1e-40, 1e-30, 1e-6] {
            let mut s = Sampler::new(SamplingParams { temperature, ..params() }, &[]);
            assert!((0..20).all(|_| s.sample(&logits).token == best), "temperature {temperature}");
        }
    }

    #[test]
    fn seeded_draws_repeat_and_filters_apply() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32) / 10.0).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p, &[]);
            (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(params()), draw(params()));
        assert_ne!(draw(params()), draw(SamplingParams { seed: Some(8), ..params() }));
        assert!(draw(SamplingParams { top_k: 3, ..params() }).iter().all(|&t| t >= 47));
        assert!(draw(SamplingParams { top_p: 0.05, ..params() }).iter().all(|&t| t == 49));
        assert!(draw(SamplingParams { min_p: 0.8, ..params() }).iter().all(|&t| t >= 47));
    }

    #[test]
    fn draws_follow_the_softmax() {
        let logits = [0.0, 3.0, 3.0, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, ..params() }, &[]);
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&logits).token).collect();
        let ones = picks.iter().filter(|&&t| t == 1).count();
        assert!((800..1200).contains(&ones), "token 1 drawn {ones} times of 2000, expected ~47%");
        assert!(picks.contains(&0) && picks.contains(&2));
    }

    #[test]
    fn logprobs_are_log_softmax_of_the_raw_logits() {
        let logits = [0.0, 1.0, 2.0];
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, logprobs: Some(2), ..params() }, &[]);
        let out = s.sample(&logits);
        let z = (0f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        assert!((out.logprob.expect("asked") - (2.0 - z)).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            SamplingParams { temperature: -1.0, ..params() },
            SamplingParams { top_p: 0.0, ..params() },
            SamplingParams { min_p: 2.0, ..params() },
            SamplingParams { frequency_penalty: 3.0, ..params() },
            SamplingParams { max_tokens: 0, ..params() },
            SamplingParams { logprobs: Some(21), ..params() },
        ];
        let fields = ["temperature", "top_p", "min_p", "frequency_penalty", "max_tokens", "top_logprobs"];
        for (p, field) in bad.iter().zip(fields) {
            assert!(p.validate().expect_err("invalid").contains(field), "{field}");
        }
        params().validate().expect("defaults are valid");
    }
}
