//! `epserve generate`: offline generation in one process, greedy or sampled.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use epserve_coordinator::sampling::{Sampler, SamplingParams};
use epserve_model::generation_config::eos_token_ids;
use epserve_model::{ImageRows, LogitsFor, SequenceStep};
use serde_json::json;

use crate::eplb::RecordRoutingArgs;
use crate::load::{ComputeDtype, ExpertArgs};
use crate::prompt::{PromptArgs, load_tokenizer};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (hub layout).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the sampler (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past EOS, to `--max-tokens` (as the API's `ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"tokens": [...], "text": "...", "finish_reason": ...}` (and `"prompt_tokens"` with
    /// `--prompt`).
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
    #[command(flatten)]
    pub routing: RecordRoutingArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0, got {}", args.temperature);
    }
    let tokenizer = if args.prompt.prompt.is_some() || args.model.join("tokenizer.json").exists() {
        Some(load_tokenizer(&args.model)?)
    } else {
        None
    };
    let built = args.prompt.build(&args.model, tokenizer.as_ref())?;
    built.check_not_empty()?;
    let prompt = built.ids.clone();

    let standalone = args.experts.standalone(&args.model, args.dtype)?;
    let recording = args.routing.start(&args.model)?;
    // The server's sampler and stop rule, with the server's EOS ids: same seed, same tokens.
    let eos = eos_token_ids(&args.model, &standalone.config.text)?;
    let params = SamplingParams {
        temperature: args.temperature,
        seed: Some(args.seed),
        max_tokens: u32::try_from(args.max_tokens).unwrap_or(u32::MAX),
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let mut sampler = Sampler::new(params, &prompt);
    let images = standalone.image_features(&prompt, &built.images).map_err(|e| anyhow::anyhow!(e))?;
    let mut cache = standalone.model.new_cache();
    let mut generated = Vec::new();
    let mut next = prompt.clone();
    let mut finish_reason = "length";
    let started = Instant::now();
    let mut first_token_at = None;
    while generated.len() < args.max_tokens {
        // The first step holds the whole prompt, and with it every image placeholder.
        let rows = if generated.is_empty() {
            images.as_ref().map(|(positions, features)| ImageRows { positions, features: features.clone() })
        } else {
            None
        };
        let step = SequenceStep::new(&next, &mut cache).with_images(rows);
        let logits = standalone.step(&mut [step], LogitsFor::Last)?;
        epserve_coordinator::transport::end_recorded_step();
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
    if let Some(recording) = recording {
        recording.stop()?;
    }
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
        let mut out = json!({ "tokens": generated, "text": text, "finish_reason": finish_reason });
        if built.from_text {
            out["prompt_tokens"] = json!(prompt);
        }
        println!("{out}");
    } else {
        println!("{}", text.unwrap_or_else(|| format!("{generated:?}")));
    }
    Ok(())
}
