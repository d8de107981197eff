//! From the file as written ([`RawModel`]) to the typed [`ModelConfig`]: required fields, defaults,
//! the per-layer plan derived from the lists or their intervals, and every cross-field check. Errors
//! name the field by its path in the file, as type errors do.

use super::raw::{
    Count, FieldPath, Flag, Integer, LayerIndex, List, Name, Number, Object, OneOrMany, RawModel, RawRopeParameters,
    RawTextConfig, RawVisionConfig, TokenId, Truthy, UsesRope,
};
use super::{
    Architecture, AttentionKind, FeedForwardKind, Llama3RopeScaling, ModelConfig, RopeConfig, TextConfig, VisionConfig,
};
use crate::error::{Error, Result};

impl TryFrom<RawModel> for ModelConfig {
    type Error = Error;

    fn try_from(raw: RawModel) -> Result<Self> {
        let RawModel { architecture, top, text, text_at } = raw;
        let vision = match (architecture, top.vision_config) {
            (Architecture::ConditionalGeneration, Some(Object(vision))) => {
                Some(vision_config(vision, &FieldPath::top().child("vision_config"))?)
            }
            _ => None,
        };
        let stored_dtype =
            [top.torch_dtype, top.dtype].into_iter().flatten().find_map(|v| v.as_str().map(str::to_owned));
        Ok(ModelConfig {
            architecture,
            text: text_config(text, &text_at, top.eos_token_id)?,
            vision,
            image_token_index: top.image_token_index.map(|TokenId(id)| id),
            boi_token_index: top.boi_token_index.map(|TokenId(id)| id),
            eoi_token_index: top.eoi_token_index.map(|TokenId(id)| id),
            stored_dtype,
        })
    }
}

fn required<T>(value: Option<T>, at: &FieldPath, key: &str) -> Result<T> {
    value.ok_or_else(|| at.error(key, "is required"))
}

/// Largest size or count of the text config: sizes derived from two of them (an expert's
/// `3 · hidden · intermediate` parameters, in bytes) must fit `usize`; 2²⁴ is far above any Llama 4
/// (Maverick's vocabulary is 202,048). A larger value wrapped those products in release builds
/// (found by fuzz/fuzz_targets/model_config.rs).
const MAX_SIZE: usize = 1 << 24;

/// `top_level_eos` is used when the text config has no `eos_token_id` of its own.
fn text_config(raw: RawTextConfig, at: &FieldPath, top_level_eos: Option<OneOrMany<TokenId>>) -> Result<TextConfig> {
    let Count(hidden_size) = required(raw.hidden_size, at, "hidden_size")?;
    let Count(num_hidden_layers) = required(raw.num_hidden_layers, at, "num_hidden_layers")?;
    let Count(num_attention_heads) = required(raw.num_attention_heads, at, "num_attention_heads")?;
    let Count(num_key_value_heads) = required(raw.num_key_value_heads, at, "num_key_value_heads")?;
    let Count(head_dim) = required(raw.head_dim, at, "head_dim")?;
    let Count(vocab_size) = required(raw.vocab_size, at, "vocab_size")?;
    let Count(intermediate_size) = required(raw.intermediate_size, at, "intermediate_size")?;
    let Count(num_local_experts) = required(raw.num_local_experts, at, "num_local_experts")?;
    for (key, value) in [
        ("hidden_size", hidden_size),
        ("num_hidden_layers", num_hidden_layers),
        ("num_attention_heads", num_attention_heads),
        ("num_key_value_heads", num_key_value_heads),
        ("head_dim", head_dim),
        ("vocab_size", vocab_size),
        ("intermediate_size", intermediate_size),
    ] {
        if value == 0 {
            return Err(at.error(key, "must be positive"));
        }
        if value > MAX_SIZE {
            return Err(at.error(key, format!("{value} is more than {MAX_SIZE}")));
        }
    }
    if num_local_experts > MAX_SIZE {
        return Err(at.error("num_local_experts", format!("{num_local_experts} is more than {MAX_SIZE}")));
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(at.error(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    if head_dim % 2 != 0 {
        return Err(at.error("head_dim", format!("{head_dim} is odd; RoPE rotates pairs")));
    }
    let num_experts_per_tok = raw.num_experts_per_tok.map_or(1, |Count(k)| k);
    if num_local_experts > 0 && (num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts) {
        return Err(at.error(
            "num_experts_per_tok",
            format!("{num_experts_per_tok} is not in 1..={num_local_experts} (num_local_experts)"),
        ));
    }
    if let Some(Name(act)) = &raw.hidden_act
        && act != "silu"
    {
        return Err(at.error("hidden_act", format!("`{act}` is not supported; Llama 4 uses `silu`")));
    }
    if raw.attention_bias.is_some_and(|Flag(bias)| bias) {
        return Err(at.error("attention_bias", "true is not supported; Llama 4 has no attention biases"));
    }
    let attention_chunk_size = match raw.attention_chunk_size {
        None => None,
        Some(Count(0)) => {
            return Err(at.error("attention_chunk_size", "must be positive (or null for no chunking)"));
        }
        Some(Count(chunk)) => Some(chunk),
    };

    let attention = attention_plan(
        raw.no_rope_layers,
        raw.no_rope_layer_interval,
        raw.layer_types,
        attention_chunk_size,
        num_hidden_layers,
        at,
    )?;
    let feed_forward = feed_forward_plan(raw.moe_layers, raw.interleave_moe_layer_step, num_hidden_layers, at)?;
    if feed_forward.contains(&FeedForwardKind::Moe) && num_local_experts == 0 {
        return Err(at.error("num_local_experts", "is 0 but moe_layers is not empty"));
    }
    let intermediate_size_mlp = match raw.intermediate_size_mlp {
        Some(Count(width)) => width,
        None if feed_forward.contains(&FeedForwardKind::Dense) => {
            return Err(at.error("intermediate_size_mlp", "is required: the config has dense (non-MoE) layers"));
        }
        None => 0,
    };
    let eos_token_ids = raw
        .eos_token_id
        .or(top_level_eos)
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|TokenId(id)| id);

    Ok(TextConfig {
        hidden_size,
        intermediate_size,
        intermediate_size_mlp,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: raw.max_position_embeddings.map_or(131_072, |Count(n)| n),
        rms_norm_eps: raw.rms_norm_eps.map_or(1e-5, |Number(eps)| eps),
        rope: rope_config(raw.rope_theta, raw.rope_parameters, raw.rope_scaling, at)?,
        attention_chunk_size,
        use_qk_norm: raw.use_qk_norm.is_none_or(|Flag(on)| on),
        attn_temperature_tuning: raw.attn_temperature_tuning.is_none_or(|Truthy(on)| on),
        floor_scale: raw.floor_scale.map_or(8192.0, |Number(x)| x),
        attn_scale: raw.attn_scale.map_or(0.1, |Number(x)| x),
        num_local_experts,
        num_experts_per_tok,
        attention,
        feed_forward,
        bos_token_id: raw.bos_token_id.map(|TokenId(id)| id),
        eos_token_ids: eos_token_ids.collect(),
        pad_token_id: raw.pad_token_id.map(|TokenId(id)| id),
        tie_word_embeddings: raw.tie_word_embeddings.is_some_and(|Flag(tie)| tie),
    })
}

/// Which layers use RoPE and how far each attends. An absent or empty `no_rope_layers` is derived
/// from the interval, as transformers' `Llama4TextConfig.__post_init__` does; `layer_types`, which
/// transformers 5 writes from the same two fields, must agree when present.
fn attention_plan(
    no_rope_layers: Option<List<UsesRope>>,
    interval: Option<Count>,
    layer_types: Option<List<Name>>,
    chunk: Option<usize>,
    num_layers: usize,
    at: &FieldPath,
) -> Result<Vec<AttentionKind>> {
    let uses_rope: Vec<bool> = match no_rope_layers {
        Some(List(flags)) if !flags.is_empty() => {
            if flags.len() != num_layers {
                return Err(at.error(
                    "no_rope_layers",
                    format!("has {} entries, num_hidden_layers is {num_layers}", flags.len()),
                ));
            }
            flags.into_iter().map(|UsesRope(rope)| rope).collect()
        }
        _ => {
            let Count(interval) = interval.unwrap_or(Count(4));
            if interval == 0 {
                return Err(at.error("no_rope_layer_interval", "must be positive"));
            }
            (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
        }
    };
    let attention: Vec<AttentionKind> = uses_rope
        .into_iter()
        .map(|rope| match (rope, chunk) {
            (false, _) => AttentionKind::FullNope,
            (true, Some(_)) => AttentionKind::ChunkedRope,
            (true, None) => AttentionKind::FullRope,
        })
        .collect();
    if let Some(List(types)) = layer_types {
        if types.len() != num_layers {
            return Err(
                at.error("layer_types", format!("has {} entries, num_hidden_layers is {num_layers}", types.len()))
            );
        }
        for (i, (Name(written), kind)) in types.iter().zip(&attention).enumerate() {
            let expected = match kind {
                AttentionKind::ChunkedRope => "chunked_attention",
                AttentionKind::FullRope | AttentionKind::FullNope => "full_attention",
            };
            if written != expected {
                return Err(at.error(
                    &format!("layer_types[{i}]"),
                    format!("is {written:?} but no_rope_layers / attention_chunk_size make layer {i} `{expected}`"),
                ));
            }
        }
    }
    Ok(attention)
}

/// MoE layers: the explicit list (an explicit empty list means none, as converters of dense models
/// write), else every `interleave_moe_layer_step`-th layer.
fn feed_forward_plan(
    moe_layers: Option<List<LayerIndex>>,
    step: Option<Count>,
    num_layers: usize,
    at: &FieldPath,
) -> Result<Vec<FeedForwardKind>> {
    let moe: Vec<usize> = match moe_layers {
        Some(List(layers)) => layers
            .into_iter()
            .enumerate()
            .map(|(i, LayerIndex(layer))| {
                if layer >= num_layers {
                    return Err(at.error(
                        &format!("moe_layers[{i}]"),
                        format!("layer {layer} does not exist (num_hidden_layers is {num_layers})"),
                    ));
                }
                Ok(layer)
            })
            .collect::<Result<_>>()?,
        None => {
            let Count(step) = step.unwrap_or(Count(1));
            if step == 0 {
                return Err(at.error("interleave_moe_layer_step", "must be positive"));
            }
            (step - 1..num_layers).step_by(step).collect()
        }
    };
    Ok((0..num_layers).map(|i| if moe.contains(&i) { FeedForwardKind::Moe } else { FeedForwardKind::Dense }).collect())
}

/// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (hub); `rope_parameters`
/// wins when a file has both. When both places carry a theta they must agree.
fn rope_config(
    rope_theta: Option<Number>,
    rope_parameters: Option<Object<RawRopeParameters>>,
    rope_scaling: Option<Object<RawRopeParameters>>,
    at: &FieldPath,
) -> Result<RopeConfig> {
    let (params, params_key) = match (rope_parameters, rope_scaling) {
        (Some(Object(params)), _) => (Some(params), "rope_parameters"),
        (None, scaling) => (scaling.map(|Object(s)| s), "rope_scaling"),
    };
    let theta = match (rope_theta, params.as_ref().and_then(|p| p.rope_theta)) {
        (Some(Number(a)), Some(Number(b))) if (a - b).abs() > 1e-6 * a.abs() => {
            return Err(at.error("rope_theta", format!("{a} contradicts {params_key}.rope_theta {b}")));
        }
        (Some(Number(theta)), _) | (None, Some(Number(theta))) => theta,
        (None, None) => 500_000.0,
    };
    if theta <= 0.0 {
        return Err(at.error("rope_theta", format!("{theta} must be positive")));
    }
    let llama3 = match params {
        None => None,
        Some(params) => llama3_scaling(params, &at.child(params_key))?,
    };
    Ok(RopeConfig { theta, llama3 })
}

/// The frequency scaling named by `rope_type` (`type` in older files): none for `default`, the
/// llama3 parameters for `llama3` (`_compute_llama3_parameters` in `modeling_rope_utils.py`).
fn llama3_scaling(params: RawRopeParameters, at: &FieldPath) -> Result<Option<Llama3RopeScaling>> {
    match params.rope_type.or(params.legacy_type) {
        None => Ok(None),
        Some(Name(kind)) if kind == "default" => Ok(None),
        Some(Name(kind)) if kind == "llama3" => {
            let Number(factor) = required(params.factor, at, "factor")?;
            let Number(low_freq_factor) = required(params.low_freq_factor, at, "low_freq_factor")?;
            let Number(high_freq_factor) = required(params.high_freq_factor, at, "high_freq_factor")?;
            let Count(original_max_position_embeddings) =
                required(params.original_max_position_embeddings, at, "original_max_position_embeddings")?;
            if factor <= 0.0 {
                return Err(at.error("factor", format!("{factor} must be positive")));
            }
            if low_freq_factor <= 0.0 {
                return Err(at.error("low_freq_factor", format!("{low_freq_factor} must be positive")));
            }
            if high_freq_factor < low_freq_factor {
                return Err(at.error(
                    "high_freq_factor",
                    format!("{high_freq_factor} is below low_freq_factor {low_freq_factor}"),
                ));
            }
            Ok(Some(Llama3RopeScaling { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }))
        }
        Some(Name(other)) => Err(at.error("rope_type", format!("`{other}` is not supported (default or llama3)"))),
    }
}

/// Defaults are `Llama4VisionConfig`'s except for the geometry, which is required as the text's is.
fn vision_config(raw: RawVisionConfig, at: &FieldPath) -> Result<VisionConfig> {
    let rope_theta =
        raw.rope_theta.or(raw.rope_parameters.and_then(|Object(p)| p.rope_theta)).map_or(10_000.0, |Number(t)| t);
    Ok(VisionConfig {
        hidden_size: required(raw.hidden_size, at, "hidden_size")?.0,
        intermediate_size: required(raw.intermediate_size, at, "intermediate_size")?.0,
        num_hidden_layers: required(raw.num_hidden_layers, at, "num_hidden_layers")?.0,
        num_attention_heads: required(raw.num_attention_heads, at, "num_attention_heads")?.0,
        image_size: required(raw.image_size, at, "image_size")?.0,
        patch_size: required(raw.patch_size, at, "patch_size")?.0,
        num_channels: raw.num_channels.map_or(3, |Count(n)| n),
        pixel_shuffle_ratio: required(raw.pixel_shuffle_ratio, at, "pixel_shuffle_ratio")?.0,
        projector_input_dim: required(raw.projector_input_dim, at, "projector_input_dim")?.0,
        projector_output_dim: required(raw.projector_output_dim, at, "projector_output_dim")?.0,
        vision_output_dim: required(raw.vision_output_dim, at, "vision_output_dim")?.0,
        vision_feature_layer: raw.vision_feature_layer.map_or(-1, |Integer(layer)| layer),
        vision_feature_select_strategy: raw
            .vision_feature_select_strategy
            .map_or_else(|| "default".to_owned(), |Name(strategy)| strategy),
        rope_theta,
        norm_eps: raw.norm_eps.map_or(1e-5, |Number(eps)| eps),
    })
}
