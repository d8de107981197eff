//! Llama-4 `config.json`, in both spellings users meet:
//!
//! - the hub's release-era files (`rope_theta` + `rope_scaling`, explicit `moe_layers` and
//!   `no_rope_layers` lists, `attn_temperature_tuning: 4` meaning "enabled");
//! - what transformers 5 `save_pretrained` writes (`rope_parameters`, `layer_types`, `dtype`).
//!
//! Both `Llama4ForConditionalGeneration` (`text_config` + `vision_config`) and `Llama4ForCausalLM`
//! (text fields at the top level) are accepted. Unknown fields are ignored; a missing required field
//! or a contradictory value is an error naming the field. Defaults are those of transformers 5.24's
//! `Llama4TextConfig` (see `docs/model.md`), except for the geometry, which is always required:
//! defaulting a missing `hidden_size` to Scout's would load the wrong model silently.
//!
//! Reading is two steps: `raw` deserialises the file with serde into structs of optional fields
//! (type errors carry the field's path, e.g. `text_config.eos_token_id[1]`), then `validate`
//! (`TryFrom<RawModel> for ModelConfig`) fills defaults, derives the per-layer plan and checks
//! that fields agree, naming fields by the same paths.

mod raw;
mod validate;

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which top-level class the checkpoint was saved from; it fixes the weight key prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Text + vision; text weights under `language_model.`.
    ConditionalGeneration,
    /// Text only; weights under `model.` and `lm_head.`.
    CausalLm,
}

impl Architecture {
    /// Prefix of the decoder weights (`embed_tokens`, `layers.N`, `norm`).
    pub fn decoder_prefix(self) -> &'static str {
        match self {
            Architecture::ConditionalGeneration => "language_model.model.",
            Architecture::CausalLm => "model.",
        }
    }

    pub fn lm_head_key(self) -> &'static str {
        match self {
            Architecture::ConditionalGeneration => "language_model.lm_head.weight",
            Architecture::CausalLm => "lm_head.weight",
        }
    }
}

/// llama3 frequency scaling (`_compute_llama3_parameters` in transformers' `modeling_rope_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub llama3: Option<Llama3RopeScaling>,
}

/// What the feed-forward half of a decoder layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardKind {
    /// Routed experts plus the shared expert.
    Moe,
    /// A plain SwiGLU MLP of width `intermediate_size_mlp`.
    Dense,
}

/// The attention flavour of a decoder layer; the two go together in Llama 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// RoPE, L2 qk-norm (if enabled) and attention restricted to the current fixed-size chunk.
    ChunkedRope,
    /// RoPE and qk-norm as above, but full causal attention (only when no chunk size is set).
    FullRope,
    /// No positional encoding, full causal attention, temperature tuning (if enabled).
    FullNope,
}

impl AttentionKind {
    pub fn uses_rope(self) -> bool {
        !matches!(self, AttentionKind::FullNope)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    /// Width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
    /// Width of the dense (non-MoE) layers' MLP.
    pub intermediate_size_mlp: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The longest context the model supports (informational for RoPE; a serving limit).
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub attention_chunk_size: Option<usize>,
    pub use_qk_norm: bool,
    pub attn_temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub attention: Vec<AttentionKind>,
    pub feed_forward: Vec<FeedForwardKind>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.feed_forward.iter().enumerate().filter(|(_, k)| **k == FeedForwardKind::Moe).map(|(i, _)| i)
    }

    pub fn nope_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.attention.iter().enumerate().filter(|(_, k)| !k.uses_rope()).map(|(i, _)| i)
    }

    /// Shape of `feed_forward.experts.gate_up_proj`: `[E, hidden, 2·inter]`, gate first.
    pub fn expert_gate_up_shape(&self) -> [usize; 3] {
        [self.num_local_experts, self.hidden_size, 2 * self.intermediate_size]
    }

    /// Shape of `feed_forward.experts.down_proj`: `[E, inter, hidden]`.
    pub fn expert_down_shape(&self) -> [usize; 3] {
        [self.num_local_experts, self.intermediate_size, self.hidden_size]
    }

    /// Parameters of one routed expert in one layer (gate, up and down).
    pub fn params_per_expert_per_layer(&self) -> usize {
        3 * self.hidden_size * self.intermediate_size
    }

    /// Bytes one routed expert of one layer takes in the given element size (2 for bf16).
    pub fn expert_bytes_per_layer(&self, dtype_bytes: usize) -> usize {
        self.params_per_expert_per_layer() * dtype_bytes
    }

    /// Multiply-adds of the matrix products of one token (every projection, the router, the
    /// shared expert, the `num_experts_per_tok` routed experts of each MoE layer, the dense MLPs and
    /// `lm_head`), the work a decode step does per row whatever its weights' storage. Attention's
    /// own `q·k` and `p·v` are left out: they grow with the context, not with the weights.
    pub fn multiply_adds_per_token(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let attention = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads);
        let feed_forward: usize = self
            .feed_forward
            .iter()
            .map(|kind| match kind {
                FeedForwardKind::Moe => {
                    h * self.num_local_experts + (1 + self.num_experts_per_tok) * self.params_per_expert_per_layer()
                }
                FeedForwardKind::Dense => 3 * h * self.intermediate_size_mlp,
            })
            .sum();
        self.num_hidden_layers * attention + feed_forward + h * self.vocab_size
    }

    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// Vision tower geometry; parsed so that multimodal checkpoints load, used by the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub pixel_shuffle_ratio: f64,
    pub projector_input_dim: usize,
    pub projector_output_dim: usize,
    pub vision_output_dim: usize,
    /// Which encoder layer's output feeds the projector; -1, the last, in every Llama-4 release.
    /// transformers 5 no longer reads it (its vision model always returns the last layer).
    pub vision_feature_layer: i64,
    /// `default` in every Llama-4 release; kept so that the image path can refuse another.
    pub vision_feature_select_strategy: String,
    pub rope_theta: f64,
    /// Written by the hub, but transformers' vision `nn.LayerNorm`s use torch's default eps (1e-5)
    /// whatever it says.
    pub norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub text: TextConfig,
    pub vision: Option<VisionConfig>,
    /// `<|patch|>`: the token whose embedding image features replace.
    pub image_token_index: Option<u32>,
    pub boi_token_index: Option<u32>,
    pub eoi_token_index: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), informational.
    pub stored_dtype: Option<String>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::config("config.json", format!("not valid JSON: {e}")))?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        raw::RawModel::read(value).and_then(ModelConfig::try_from)
    }
}
