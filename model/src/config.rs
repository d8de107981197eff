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

use std::path::Path;

use serde_json::{Map, Value};

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
    pub rope_theta: f64,
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
        let root = Fields::root(value)?;
        let architectures: Vec<String> = match root.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        };
        let has_text_config = root.get("text_config").is_some();
        let architecture = if architectures.iter().any(|a| a == "Llama4ForConditionalGeneration") || has_text_config {
            Architecture::ConditionalGeneration
        } else if architectures.iter().any(|a| a == "Llama4ForCausalLM")
            || root.get("model_type").and_then(Value::as_str) == Some("llama4_text")
        {
            Architecture::CausalLm
        } else {
            return Err(Error::config(
                "architectures",
                format!(
                    "expected Llama4ForConditionalGeneration or Llama4ForCausalLM, found {architectures:?} (model_type {:?})",
                    root.get("model_type")
                ),
            ));
        };

        let (text, vision) = match architecture {
            Architecture::ConditionalGeneration => {
                let text = root.object("text_config")?;
                let vision = match root.get("vision_config") {
                    Some(Value::Null) | None => None,
                    Some(_) => Some(parse_vision(&root.object("vision_config")?)?),
                };
                (parse_text(&text, &root)?, vision)
            }
            Architecture::CausalLm => (parse_text(&root, &root)?, None),
        };
        Ok(ModelConfig {
            architecture,
            text,
            vision,
            image_token_index: root.opt_u32("image_token_index")?,
            boi_token_index: root.opt_u32("boi_token_index")?,
            eoi_token_index: root.opt_u32("eoi_token_index")?,
            stored_dtype: root
                .get("torch_dtype")
                .or_else(|| root.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
}

fn parse_text(f: &Fields<'_>, root: &Fields<'_>) -> Result<TextConfig> {
    let hidden_size = f.req_usize("hidden_size")?;
    let num_hidden_layers = f.req_usize("num_hidden_layers")?;
    let num_attention_heads = f.req_usize("num_attention_heads")?;
    let num_key_value_heads = f.req_usize("num_key_value_heads")?;
    let head_dim = f.req_usize("head_dim")?;
    let vocab_size = f.req_usize("vocab_size")?;
    let intermediate_size = f.req_usize("intermediate_size")?;
    let num_local_experts = f.req_usize("num_local_experts")?;
    for (name, v) in [
        ("hidden_size", hidden_size),
        ("num_hidden_layers", num_hidden_layers),
        ("num_attention_heads", num_attention_heads),
        ("num_key_value_heads", num_key_value_heads),
        ("head_dim", head_dim),
        ("vocab_size", vocab_size),
        ("intermediate_size", intermediate_size),
    ] {
        if v == 0 {
            return Err(f.err(name, "must be positive"));
        }
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(f.err(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    if head_dim % 2 != 0 {
        return Err(f.err("head_dim", format!("{head_dim} is odd; RoPE rotates pairs")));
    }
    let num_experts_per_tok = f.opt_usize("num_experts_per_tok")?.unwrap_or(1);
    if num_local_experts > 0 && (num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts) {
        return Err(f.err(
            "num_experts_per_tok",
            format!("{num_experts_per_tok} is not in 1..={num_local_experts} (num_local_experts)"),
        ));
    }
    for (name, expected) in [("hidden_act", "silu")] {
        if let Some(v) = f.get(name).and_then(Value::as_str)
            && v != expected
        {
            return Err(f.err(name, format!("`{v}` is not supported; Llama 4 uses `{expected}`")));
        }
    }
    if f.opt_bool("attention_bias")?.unwrap_or(false) {
        return Err(f.err("attention_bias", "true is not supported; Llama 4 has no attention biases"));
    }

    let attention_chunk_size = match f.get("attention_chunk_size") {
        None | Some(Value::Null) => None,
        Some(_) => {
            let c = f.req_usize("attention_chunk_size")?;
            if c == 0 {
                return Err(f.err("attention_chunk_size", "must be positive (or null for no chunking)"));
            }
            Some(c)
        }
    };

    // Which layers use RoPE. `no_rope_layers` is backwards: 1 means the layer USES RoPE. An empty or
    // absent list is derived from the interval (transformers `Llama4TextConfig.__init__`).
    let interval = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
    let uses_rope: Vec<bool> = match f.get("no_rope_layers") {
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() != num_hidden_layers {
                return Err(f.err(
                    "no_rope_layers",
                    format!("has {} entries, num_hidden_layers is {num_hidden_layers}", list.len()),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, v)| match v.as_u64() {
                    Some(0) => Ok(false),
                    Some(1) => Ok(true),
                    _ => Err(f.err(&format!("no_rope_layers[{i}]"), format!("expected 0 or 1, got {v}"))),
                })
                .collect::<Result<_>>()?
        }
        None | Some(Value::Null) | Some(Value::Array(_)) => {
            if interval == 0 {
                return Err(f.err("no_rope_layer_interval", "must be positive"));
            }
            (0..num_hidden_layers).map(|i| (i + 1) % interval != 0).collect()
        }
        Some(other) => return Err(f.err("no_rope_layers", format!("expected a list, got {other}"))),
    };
    let attention: Vec<AttentionKind> = uses_rope
        .iter()
        .map(|&rope| match (rope, attention_chunk_size) {
            (false, _) => AttentionKind::FullNope,
            (true, Some(_)) => AttentionKind::ChunkedRope,
            (true, None) => AttentionKind::FullRope,
        })
        .collect();
    // transformers 5 writes `layer_types` derived from the above; if present it must agree.
    if let Some(types) = f.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().ok_or_else(|| f.err("layer_types", "expected a list"))?;
        if types.len() != num_hidden_layers {
            return Err(
                f.err("layer_types", format!("has {} entries, num_hidden_layers is {num_hidden_layers}", types.len()))
            );
        }
        for (i, (t, kind)) in types.iter().zip(&attention).enumerate() {
            let expected = match kind {
                AttentionKind::ChunkedRope => "chunked_attention",
                AttentionKind::FullRope | AttentionKind::FullNope => "full_attention",
            };
            if t.as_str() != Some(expected) {
                return Err(f.err(
                    &format!("layer_types[{i}]"),
                    format!("is {t} but no_rope_layers / attention_chunk_size make layer {i} `{expected}`"),
                ));
            }
        }
    }

    // MoE layers: explicit list (an explicit empty list means none), else every `step`-th layer.
    let moe: Vec<usize> = match f.get("moe_layers") {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let idx = v
                    .as_u64()
                    .ok_or_else(|| f.err(&format!("moe_layers[{i}]"), format!("expected a layer index, got {v}")))?
                    as usize;
                if idx >= num_hidden_layers {
                    return Err(f.err(
                        &format!("moe_layers[{i}]"),
                        format!("layer {idx} does not exist (num_hidden_layers is {num_hidden_layers})"),
                    ));
                }
                Ok(idx)
            })
            .collect::<Result<_>>()?,
        None | Some(Value::Null) => {
            let step = f.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
            if step == 0 {
                return Err(f.err("interleave_moe_layer_step", "must be positive"));
            }
            (step - 1..num_hidden_layers).step_by(step).collect()
        }
        Some(other) => return Err(f.err("moe_layers", format!("expected a list, got {other}"))),
    };
    let feed_forward: Vec<FeedForwardKind> = (0..num_hidden_layers)
        .map(|i| if moe.contains(&i) { FeedForwardKind::Moe } else { FeedForwardKind::Dense })
        .collect();
    if !moe.is_empty() && num_local_experts == 0 {
        return Err(f.err("num_local_experts", "is 0 but moe_layers is not empty"));
    }
    let intermediate_size_mlp = match f.opt_usize("intermediate_size_mlp")? {
        Some(v) => v,
        None if feed_forward.contains(&FeedForwardKind::Dense) => {
            return Err(f.err("intermediate_size_mlp", "is required: the config has dense (non-MoE) layers"));
        }
        None => 0,
    };

    let eos_token_ids = match f.get("eos_token_id").or_else(|| root.get("eos_token_id")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| f.err("eos_token_id", format!("bad id {v}"))))
            .collect::<Result<_>>()?,
        Some(v) => vec![v.as_u64().ok_or_else(|| f.err("eos_token_id", format!("bad id {v}")))? as u32],
    };

    Ok(TextConfig {
        hidden_size,
        intermediate_size,
        intermediate_size_mlp,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
        rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5),
        rope: parse_rope(f)?,
        attention_chunk_size,
        use_qk_norm: f.opt_bool("use_qk_norm")?.unwrap_or(true),
        attn_temperature_tuning: f.opt_truthy("attn_temperature_tuning")?.unwrap_or(true),
        floor_scale: f.opt_f64("floor_scale")?.unwrap_or(8192.0),
        attn_scale: f.opt_f64("attn_scale")?.unwrap_or(0.1),
        num_local_experts,
        num_experts_per_tok,
        attention,
        feed_forward,
        bos_token_id: f.opt_u32("bos_token_id")?,
        eos_token_ids,
        pad_token_id: f.opt_u32("pad_token_id")?,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
    })
}

/// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (hub). When both carry a theta
/// they must agree.
fn parse_rope(f: &Fields<'_>) -> Result<RopeConfig> {
    let legacy_theta = f.opt_f64("rope_theta")?;
    let (params, params_field) = match f.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(_) => (Some(f.object("rope_parameters")?), "rope_parameters"),
        None => match f.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(_) => (Some(f.object("rope_scaling")?), "rope_scaling"),
            None => (None, "rope_scaling"),
        },
    };
    let params_theta = match &params {
        Some(p) => p.opt_f64("rope_theta")?,
        None => None,
    };
    let theta = match (legacy_theta, params_theta) {
        (Some(a), Some(b)) if (a - b).abs() > 1e-6 * a.abs() => {
            return Err(f.err("rope_theta", format!("{a} contradicts {params_field}.rope_theta {b}")));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => 500_000.0,
    };
    if theta <= 0.0 {
        return Err(f.err("rope_theta", format!("{theta} must be positive")));
    }
    let llama3 = match params {
        None => None,
        Some(p) => {
            let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let s = Llama3RopeScaling {
                        factor: p.req_f64("factor")?,
                        low_freq_factor: p.req_f64("low_freq_factor")?,
                        high_freq_factor: p.req_f64("high_freq_factor")?,
                        original_max_position_embeddings: p.req_usize("original_max_position_embeddings")?,
                    };
                    if s.factor <= 0.0 || s.low_freq_factor <= 0.0 || s.high_freq_factor < s.low_freq_factor {
                        return Err(p.err(
                            "high_freq_factor",
                            format!(
                                "llama3 scaling needs factor > 0 and high_freq_factor ≥ low_freq_factor > 0, got {s:?}"
                            ),
                        ));
                    }
                    Some(s)
                }
                other => {
                    return Err(p.err("rope_type", format!("`{other}` is not supported (default or llama3)")));
                }
            }
        }
    };
    Ok(RopeConfig { theta, llama3 })
}

fn parse_vision(f: &Fields<'_>) -> Result<VisionConfig> {
    let rope_theta = match f.opt_f64("rope_theta")? {
        Some(t) => t,
        None => match f.get("rope_parameters").filter(|v| !v.is_null()) {
            Some(_) => f.object("rope_parameters")?.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            None => 10_000.0,
        },
    };
    Ok(VisionConfig {
        hidden_size: f.req_usize("hidden_size")?,
        intermediate_size: f.req_usize("intermediate_size")?,
        num_hidden_layers: f.req_usize("num_hidden_layers")?,
        num_attention_heads: f.req_usize("num_attention_heads")?,
        image_size: f.req_usize("image_size")?,
        patch_size: f.req_usize("patch_size")?,
        num_channels: f.opt_usize("num_channels")?.unwrap_or(3),
        pixel_shuffle_ratio: f.req_f64("pixel_shuffle_ratio")?,
        projector_input_dim: f.req_usize("projector_input_dim")?,
        projector_output_dim: f.req_usize("projector_output_dim")?,
        vision_output_dim: f.req_usize("vision_output_dim")?,
        rope_theta,
        norm_eps: f.opt_f64("norm_eps")?.unwrap_or(1e-5),
    })
}

/// A JSON object with the dotted path it sits at, so that errors name the full field.
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn root(value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Fields { path: String::new(), map }),
            _ => Err(Error::config("config.json", "expected a JSON object at the top level")),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(self.name(key), reason)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn object(&self, key: &str) -> Result<Fields<'a>> {
        match self.map.get(key) {
            Some(Value::Object(map)) => Ok(Fields { path: self.name(key), map }),
            Some(other) => Err(self.err(key, format!("expected an object, got {other}"))),
            None => Err(self.err(key, "is required")),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x as usize)),
                // Some writers emit integral floats (`8192.0`).
                None => match v.as_f64() {
                    Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
                    _ => Err(self.err(key, format!("expected a non-negative integer, got {v}"))),
                },
            },
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "is required"))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_usize(key)? {
            Some(x) => u32::try_from(x).map(Some).map_err(|_| self.err(key, format!("{x} does not fit a token id"))),
            None => Ok(None),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.err(key, "is required"))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A bool, or an integer where non-zero means true (release-era `attn_temperature_tuning: 4`).
    fn opt_truthy(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match v.as_i64() {
                Some(i) => Ok(Some(i != 0)),
                None => Err(self.err(key, format!("expected a bool or an integer, got {v}"))),
            },
        }
    }
}
