//! `epserve gen-model`: a random-weight Llama-4 checkpoint in hub layout, for demos, tests and
//! benchmarks: `config.json`, safetensors (bf16 unless told otherwise), `tokenizer.json`,
//! `tokenizer_config.json` with the Llama-4 chat template, and `generation_config.json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use epserve_model::checkpoint::write_checkpoint;
use epserve_model::synthetic::{NAMED_SPECIAL_TOKENS, Preset, RandomWeights, text_tensor_specs};
use epserve_model::{ModelConfig, WeightSource};
use serde_json::json;

use crate::synthetic_tokenizer;

const CHAT_TEMPLATE: &str = include_str!("assets/llama4_chat_template.jinja");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredDtype {
    Bf16,
    F32,
}

/// Model shape on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PresetArg {
    /// The fixture's geometry.
    Tiny,
    /// The benchmark shape.
    Mini,
    /// Scout's hidden size with tiny experts, for exchange benchmarks.
    ScoutWire,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Mini => Preset::Mini,
            PresetArg::ScoutWire => Preset::ScoutWire,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GenModelArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value = "mini")]
    pub preset: PresetArg,
    /// Seed of the weights (same seed, same checkpoint).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created; must not already hold a checkpoint unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype the weights are stored in.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: StoredDtype,
    /// Overwrite an existing checkpoint in --out.
    #[arg(long)]
    pub force: bool,
    /// Split the weights into shards of about this many MiB, with model.safetensors.index.json.
    #[arg(long)]
    pub shard_mib: Option<usize>,
}

pub fn run(args: GenModelArgs) -> Result<()> {
    write(args.preset.into(), args.seed, &args.out, args.dtype, args.force, args.shard_mib)?;
    println!("{}", args.out.display());
    Ok(())
}

pub fn write(
    preset: Preset,
    seed: u64,
    out: &Path,
    dtype: StoredDtype,
    force: bool,
    shard_mib: Option<usize>,
) -> Result<()> {
    if out.join("config.json").exists() && !force {
        bail!("{} already holds a checkpoint (use --force to overwrite)", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (max_merges, vocab) = match preset {
        Preset::Tiny | Preset::ScoutWire => (224, preset.vocab_size()),
        Preset::Mini => (1500, preset.vocab_size()),
    };
    let tokenizer = synthetic_tokenizer::build(vocab, max_merges);
    let config_json = preset.config_json(tokenizer.first_special);
    let config = ModelConfig::from_json(&config_json)?;
    let special =
        |name: &str| tokenizer.first_special + NAMED_SPECIAL_TOKENS.iter().position(|t| *t == name).unwrap_or(0) as u32;

    let first_reserved = (tokenizer.first_special as usize + NAMED_SPECIAL_TOKENS.len()).min(vocab);
    let source = RandomWeights::new(seed);
    let dtype = match dtype {
        StoredDtype::Bf16 => DType::BF16,
        StoredDtype::F32 => DType::F32,
    };
    let tensors = text_tensor_specs(&config)
        .into_iter()
        .map(|(key, shape)| {
            let mut t = source.tensor(&key, &shape, dtype, &Device::Cpu)?;
            if key == config.architecture.lm_head_key() {
                t = silence_reserved_tokens(&t, first_reserved)?;
            }
            Ok((key, t))
        })
        .collect::<Result<Vec<_>>>()?;
    // Remove what an earlier, differently sharded run left behind.
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            std::fs::remove_file(&path)?;
        }
    }
    write_checkpoint(out, &tensors, shard_mib.map(|m| m * 1024 * 1024))?;

    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value)?).with_context(|| format!("{}", path.display()))
    };
    write_json("config.json", &config_json)?;
    write_json("tokenizer.json", &tokenizer.json)?;
    write_json(
        "tokenizer_config.json",
        &json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot|>",
            "pad_token": "<|finetune_right_pad|>",
            "add_bos_token": true,
            "model_max_length": 10485760,
            "chat_template": CHAT_TEMPLATE,
            "tokenizer_class": "PreTrainedTokenizerFast"
        }),
    )?;
    write_json(
        "generation_config.json",
        &json!({
            "bos_token_id": special("<|begin_of_text|>"),
            "eos_token_id": [special("<|end_of_text|>"), special("<|eom|>"), special("<|eot|>")],
            "pad_token_id": special("<|finetune_right_pad|>"),
        }),
    )?;
    tracing::info!("wrote a {preset:?} checkpoint (seed {seed}) to {}", out.display());
    Ok(())
}

/// Zeroes the lm_head rows of the reserved special tokens. Their logit is then exactly 0 while real
/// tokens' logits spread around it, so that a random model writes text, as trained models (which
/// never see reserved tokens) do, instead of invisible reserved tokens most of the time.
fn silence_reserved_tokens(lm_head: &candle_core::Tensor, first_reserved: usize) -> Result<candle_core::Tensor> {
    let (vocab, hidden) = lm_head.dims2()?;
    if first_reserved >= vocab {
        return Ok(lm_head.clone());
    }
    let kept = lm_head.narrow(0, 0, first_reserved)?;
    let zeros = candle_core::Tensor::zeros((vocab - first_reserved, hidden), lm_head.dtype(), lm_head.device())?;
    Ok(candle_core::Tensor::cat(&[kept, zeros], 0)?)
}
