//! A whole random-weight checkpoint in hub layout: `config.json`, safetensors (optionally sharded,
//! with `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` with the Llama-4
//! chat template, `generation_config.json`, and for the vision tower `preprocessor_config.json`.
//!
//! By default the checkpoint is what the hub ships, `Llama4ForConditionalGeneration` with its
//! vision tower; without it ([`CheckpointOptions::vision`] false) it is what a text-only
//! `Llama4ForCausalLM.save_pretrained` writes. Both hold the same text weights for one seed.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use epserve_model::checkpoint::write_checkpoint as write_safetensors;
use epserve_model::{ModelConfig, WeightSource};
use serde_json::json;

use crate::error::{Error, Result};
use crate::preset::{NAMED_SPECIAL_TOKENS, Preset, special_id, text_tensor_specs, vision_tensor_specs};
use crate::skew::{self, RouterSkew, SKEW_FILE};
use crate::tokenizer;
use crate::weights::RandomWeights;

const CHAT_TEMPLATE: &str = include_str!("../assets/llama4_chat_template.jinja");

/// The image processor's settings, where transformers' `AutoImageProcessor` looks for them.
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// The dtype the weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    Bf16,
    F32,
}

/// How [`write_checkpoint`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointOptions {
    pub dtype: StoredDtype,
    /// `Llama4ForConditionalGeneration` with the preset's vision tower and `preprocessor_config.json`
    /// (true), or a text-only `Llama4ForCausalLM` (false).
    pub vision: bool,
    /// Overwrite a checkpoint already in the output directory.
    pub force: bool,
    /// Split the weights into shards of about this many MiB, with `model.safetensors.index.json`.
    pub shard_mib: Option<usize>,
    /// Bias every MoE layer's router towards this popularity (and write `router_skew.json`);
    /// `None` leaves the random routers as they are.
    pub router_skew: Option<RouterSkew>,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions { dtype: StoredDtype::Bf16, vision: true, force: false, shard_mib: None, router_skew: None }
    }
}

/// Writes a `preset`-shaped checkpoint with weights from `seed` into `out` (created). An existing
/// checkpoint there is an error unless `options.force`.
pub fn write_checkpoint(preset: Preset, seed: u64, out: &Path, options: &CheckpointOptions) -> Result<()> {
    if out.join("config.json").exists() && !options.force {
        return Err(Error::AlreadyExists(out.to_path_buf()));
    }
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let (max_merges, vocab) = match preset {
        Preset::Tiny | Preset::ScoutWire => (224, preset.vocab_size()),
        Preset::Mini => (1500, preset.vocab_size()),
    };
    let tokenizer = tokenizer::build(vocab, max_merges);
    let config_json = if options.vision {
        preset.config_json(tokenizer.first_special)
    } else {
        preset.text_only_config_json(tokenizer.first_special)
    };
    let config = ModelConfig::from_json(&config_json)?;
    let special = special_id(tokenizer.first_special);

    let first_reserved = (tokenizer.first_special as usize + NAMED_SPECIAL_TOKENS.len()).min(vocab);
    let source = RandomWeights::new(seed);
    let dtype = match options.dtype {
        StoredDtype::Bf16 => DType::BF16,
        StoredDtype::F32 => DType::F32,
    };
    // The text tensors first, then the vision tower's: each is drawn from its own stream (seeded by
    // its key), so the order changes no number; it keeps the text tensors' shard layout as it was.
    let mut tensors = text_tensor_specs(&config)
        .into_iter()
        .chain(vision_tensor_specs(&config))
        .map(|(key, shape)| {
            let mut t = source.tensor(&key, &shape, dtype, &Device::Cpu)?;
            if key == config.architecture.lm_head_key() {
                t = silence_reserved_tokens(&t, first_reserved)?;
            }
            Ok((key, t))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(router_skew) = options.router_skew {
        skew::carve_bias_dim(&config, &mut tensors)?;
        skew::calibrate(&config, router_skew, &mut tensors, &tokenizer, out)?;
    }
    // Remove what an earlier, differently sharded run left behind.
    for entry in std::fs::read_dir(out).map_err(Error::io(out))? {
        let path = entry.map_err(Error::io(out))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // Also an image processor config and a router skew record (written again when they apply).
        let stale_skew = name == SKEW_FILE && options.router_skew.is_none();
        if name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == PREPROCESSOR_CONFIG
            || stale_skew
        {
            std::fs::remove_file(&path).map_err(Error::io(&path))?;
        }
    }
    write_safetensors(out, &tensors, options.shard_mib.map(|m| m * 1024 * 1024))?;

    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json { path: path.clone(), source })?;
        std::fs::write(&path, text).map_err(Error::io(&path))
    };
    write_json("config.json", &config_json)?;
    if options.vision {
        write_json(PREPROCESSOR_CONFIG, &preset.preprocessor_config_json())?;
    }
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
    let tower = if options.vision { "with its vision tower" } else { "text only" };
    tracing::info!("wrote a {preset:?} checkpoint ({tower}, seed {seed}) to {}", out.display());
    Ok(())
}

/// Zeroes the lm_head rows of the reserved special tokens. Their logit is then exactly 0 while real
/// tokens' logits spread around it, so that a random model writes text, as trained models (which
/// never see reserved tokens) do, instead of invisible reserved tokens most of the time.
fn silence_reserved_tokens(lm_head: &Tensor, first_reserved: usize) -> Result<Tensor> {
    let (vocab, hidden) = lm_head.dims2()?;
    if first_reserved >= vocab {
        return Ok(lm_head.clone());
    }
    let kept = lm_head.narrow(0, 0, first_reserved)?;
    let zeros = Tensor::zeros((vocab - first_reserved, hidden), lm_head.dtype(), lm_head.device())?;
    Ok(Tensor::cat(&[kept, zeros], 0)?)
}
