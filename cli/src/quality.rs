//! `epserve quality`: how far a quantized model's next-token distributions are from the
//! unquantized model's over the same prompts (per-position KL divergence, top-1 agreement, largest
//! logit difference: the measures of llama.cpp's `--kl-divergence`). The reference is `--against`
//! (e.g. the bf16 checkpoint a pre-quantized one was made from) or, without it, `--model` itself
//! loaded without `--quantize` (and with f32 activations: `--activations int8` alone measures what
//! int8 activations add on a pre-quantized checkpoint). The two runs are one after the other: the reference's logits are
//! kept in memory (positions × vocabulary f32), then the candidate's are compared as they come.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use epserve_model::quant::quality::Comparison;
use epserve_model::{Activations, LogitsFor, SequenceStep};

use crate::load::{ComputeDtype, ExpertArgs};
use crate::prompt::load_tokenizer;

#[derive(Debug, clap::Args)]
pub struct QualityArgs {
    /// The checkpoint measured (pre-quantized, or quantized at load with `--quantize`).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// The reference checkpoint, loaded without quantization; default: `--model` itself.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Prompts, one a line: text (tokenized with `--model`'s tokenizer, BOS added) or a JSON object
    /// `{"tokens": [ids...]}`. Default: a few built-in English passages.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Longest prompt, in tokens (longer ones are cut).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

/// Used without `--prompts`: varied prose, so that many tokens and experts are exercised.
const BUILT_IN: [&str; 4] = [
    "The committee met on a cold morning in early March to decide whether the bridge should be rebuilt \
     in stone, as the older members wanted, or in steel, which the engineers said would last longer and \
     cost less to maintain over the next hundred years.",
    "To make bread, mix flour, water, salt and yeast, knead the dough until it is smooth and elastic, \
     let it rise in a warm place for about an hour, shape it, let it rise again, and bake it in a hot oven.",
    "In 1969 two astronauts walked on the surface of the Moon while a third orbited above them; the \
     landing was watched on television by hundreds of millions of people around the world.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\
     print([fibonacci(i) for i in range(10)])",
];

fn read_prompts(args: &QualityArgs) -> Result<Vec<Vec<u32>>> {
    let lines: Vec<String> = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => BUILT_IN.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut tokenizer = None;
    let mut prompts = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let mut ids: Vec<u32> = if line.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("prompt {}: not JSON", i + 1))?;
            serde_json::from_value(v["tokens"].clone())
                .with_context(|| format!("prompt {}: no `tokens` list", i + 1))?
        } else {
            if tokenizer.is_none() {
                tokenizer = Some(load_tokenizer(&args.model)?);
            }
            let tok = tokenizer.as_ref().context("tokenizer")?;
            tok.encode(line.as_str(), true).map_err(|e| anyhow::anyhow!("prompt {}: {e}", i + 1))?.get_ids().to_vec()
        };
        ids.truncate(args.max_tokens);
        if ids.is_empty() {
            bail!("prompt {} has no tokens", i + 1);
        }
        prompts.push(ids);
    }
    Ok(prompts)
}

/// Logits of every position of every prompt, from the model in `dir` loaded as `experts` says.
fn run_all(dir: &Path, experts: &ExpertArgs, dtype: ComputeDtype, prompts: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f32>>>> {
    let model = experts.standalone(dir, dtype)?;
    let vocab = model.config.text.vocab_size as u32;
    prompts
        .iter()
        .map(|ids| {
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                bail!("token {bad} is outside the vocabulary of {}", dir.display());
            }
            let mut cache = model.model.new_cache();
            let logits = model.step(&mut [SequenceStep::new(ids, &mut cache)], LogitsFor::All)?;
            Ok(logits.to_vec2::<f32>()?)
        })
        .collect()
}

pub fn run(args: QualityArgs) -> Result<()> {
    let quant = &args.experts.quant;
    if args.against.is_none() && quant.quantize.is_none() && quant.activations == Activations::F32 {
        bail!(
            "nothing to compare: give --quantize (the model against itself unquantized), --activations int8 (against \
             f32 activations) or --against REF_DIR"
        );
    }
    let prompts = read_prompts(&args)?;
    let mut reference_args = args.experts.clone();
    reference_args.quant.quantize = None;
    reference_args.quant.activations = Activations::F32;
    let reference_dir = args.against.clone().unwrap_or_else(|| args.model.clone());
    let reference = run_all(&reference_dir, &reference_args, args.dtype, &prompts)?;
    let candidate = run_all(&args.model, &args.experts, args.dtype, &prompts)?;
    let mut comparison = Comparison::default();
    for (r, c) in reference.iter().zip(&candidate) {
        for (r, c) in r.iter().zip(c) {
            if r.len() != c.len() {
                bail!("the two models have different vocabularies ({} and {})", r.len(), c.len());
            }
            comparison.add(r, c);
        }
    }
    let q = comparison.finish();
    let json = serde_json::json!({
        "model": args.model,
        "reference": reference_dir,
        "quantize": args.experts.quant.quantize.map(|s| s.to_string()),
        "quantize_scope": args.experts.quant.quantize.map(|_| args.experts.quant.quantize_scope.to_string()),
        "activations": args.experts.quant.activations.to_string(),
        "prompts": prompts.len(),
        "quality": q,
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &json)?;
    writeln!(out)?;
    Ok(())
}
