//! `epserve generate`: offline generation in one process, greedy or sampled.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use epserve_model::{LogitsFor, SequenceStep};
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::SeedableRng;
use serde_json::{Value, json};

use crate::load::{ComputeDtype, ExpertArgs};
use epserve_gateway::chat_template::ChatTemplate;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (hub layout).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Prompt text, tokenized with the checkpoint's tokenizer.json.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    pub prompt: Option<String>,
    /// Render the checkpoint's chat template around the prompt (one user turn).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the sampler (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print `{"tokens": [...], "text": "..."}`.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

/// End-of-sequence ids: `generation_config.json` when it names them, else the model config's.
fn eos_ids(dir: &Path, config_eos: &[u32]) -> Vec<u32> {
    let from_generation = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| match v.get("eos_token_id")? {
            Value::Array(a) => Some(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect::<Vec<_>>()),
            Value::Number(n) => n.as_u64().map(|x| vec![x as u32]),
            _ => None,
        });
    from_generation.unwrap_or_else(|| config_eos.to_vec())
}

fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0, got {}", args.temperature);
    }
    let tokenizer = if args.prompt.is_some() || args.model.join("tokenizer.json").exists() {
        Some(load_tokenizer(&args.model)?)
    } else {
        None
    };
    let prompt: Vec<u32> = match (&args.prompt, &args.tokens) {
        (Some(text), _) => {
            let tok = tokenizer.as_ref().context("a tokenizer is needed for --prompt")?;
            let (text, add_special) = if args.chat {
                let template = ChatTemplate::from_checkpoint(&args.model)?;
                (template.render(&json!([{ "role": "user", "content": text }]), true)?, false)
            } else {
                (text.clone(), true)
            };
            // The rendered template already starts with BOS: no special tokens added on top.
            tok.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec()
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --tokens"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }

    let standalone = args.experts.standalone(&args.model, args.dtype)?;
    let eos = eos_ids(&args.model, &standalone.config.text.eos_token_ids);
    let mut cache = standalone.model.new_cache();
    let mut rng = SplitMix64::seed_from_u64(args.seed);
    let mut generated = Vec::new();
    let mut next = prompt.clone();
    let mut finish_reason = "length";
    let started = Instant::now();
    let mut first_token_at = None;
    while generated.len() < args.max_tokens {
        let logits = standalone.step(&mut [SequenceStep { tokens: &next, cache: &mut cache }], LogitsFor::Last)?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let token = sample(&row, args.temperature, &mut rng);
        first_token_at.get_or_insert_with(|| started.elapsed());
        if eos.contains(&token) {
            finish_reason = "stop";
            break;
        }
        generated.push(token);
        next = vec![token];
    }
    let elapsed = started.elapsed();
    if let Some(ttft) = first_token_at {
        let decode = elapsed.saturating_sub(ttft).as_secs_f64();
        tracing::info!(
            "prompt {} tokens, first token after {:.1} ms, {} tokens at {:.1} tokens/s",
            prompt.len(),
            ttft.as_secs_f64() * 1e3,
            generated.len(),
            generated.len().saturating_sub(1) as f64 / decode.max(1e-9)
        );
    }

    let text = match &tokenizer {
        Some(tok) => Some(tok.decode(&generated, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?),
        None => None,
    };
    if args.json {
        println!("{}", json!({ "tokens": generated, "text": text, "finish_reason": finish_reason }));
    } else {
        println!("{}", text.unwrap_or_else(|| format!("{generated:?}")));
    }
    Ok(())
}

/// Greedy at temperature 0 (lowest id on ties), else a draw from softmax(logits / T).
pub fn sample(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, v)| if *v > logits[best] { i } else { best }) as u32;
    if temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits.iter().map(|&l| (((l - max) / temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut target = epserve_synthetic::uniform(rng) as f64 * total;
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target < 0.0 {
            return i as u32;
        }
    }
    argmax()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum_and_sampling_is_seeded() {
        let logits = [0.0, 3.0, 3.0, -1.0];
        assert_eq!(sample(&logits, 0.0, &mut SplitMix64::seed_from_u64(1)), 1);
        let draw =
            |seed| (0..32).map(|_| sample(&logits, 1.0, &mut SplitMix64::seed_from_u64(seed))).collect::<Vec<_>>();
        assert_eq!(draw(7), draw(7));
        let mut rng = SplitMix64::seed_from_u64(3);
        let picks: Vec<u32> = (0..2000).map(|_| sample(&logits, 1.0, &mut rng)).collect();
        let ones = picks.iter().filter(|&&t| t == 1).count();
        assert!((800..1200).contains(&ones), "token 1 drawn {ones} times of 2000, expected ~47%");
        assert!(picks.contains(&0) && picks.contains(&2));
    }
}
