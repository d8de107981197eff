//! `epserve generate`: offline generation in one process, greedy or sampled.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use epserve_coordinator::sampling::{Sampler, SamplingParams};
use epserve_model::generation_config::eos_token_ids;
use epserve_model::{LogitsFor, SequenceStep};
use serde_json::json;

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
    // The server's sampler and stop rule, with the server's EOS ids: same seed, same tokens.
    let eos = eos_token_ids(&args.model, &standalone.config.text)?;
    let params = SamplingParams {
        temperature: args.temperature,
        seed: Some(args.seed),
        max_tokens: u32::try_from(args.max_tokens).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let mut sampler = Sampler::new(params, &prompt);
    let mut cache = standalone.model.new_cache();
    let mut generated = Vec::new();
    let mut next = prompt.clone();
    let mut finish_reason = "length";
    let started = Instant::now();
    let mut first_token_at = None;
    while generated.len() < args.max_tokens {
        let logits = standalone.step(&mut [SequenceStep::new(&next, &mut cache)], LogitsFor::Last)?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let token = sampler.sample(&row).token;
        first_token_at.get_or_insert_with(|| started.elapsed());
        // Unlike the server's stream, the output leaves the final EOS out.
        if sampler.stops_at(token, &eos) {
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
