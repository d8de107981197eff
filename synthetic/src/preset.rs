//! Named model shapes (`tiny`, `mini`, `scout-wire`): their hub-style `config.json` (multimodal, or
//! text-only), the `preprocessor_config.json` of their vision tower, and the list of hub tensor keys
//! a checkpoint of that shape holds.

use epserve_model::ModelConfig;
use epserve_model::config::FeedForwardKind;
use serde_json::{Value, json};

/// Number of named special tokens (`<|begin_of_text|>` … `<|image|>`), in Llama 4's order.
pub const NAMED_SPECIAL_TOKENS: [&str; 19] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|image|>",
];

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The fixture's geometry: hidden 64, 4 layers, chunk 8, floor_scale 4 (exercises chunking and
    /// temperature tuning with short sequences).
    Tiny,
    /// The benchmark shape: hidden 512, 8 layers, 8 heads / 2 KV heads, head_dim 64, 16 experts
    /// top-1, expert intermediate 1024, vocab 4096.
    Mini,
    /// Scout's row width (hidden 5120) on one MoE layer with tiny experts (intermediate 8) and two
    /// attention heads: for measuring the expert exchange at Scout's payload size, not compute.
    ScoutWire,
}

/// A preset's vision tower. Every Llama-4 release fixes `patch_size` 14 and `pixel_shuffle_ratio`
/// 0.5 (transformers' `Llama4Processor` hard-codes both when it expands the prompt), so only the
/// widths, the depth and the tile vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionShape {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The tile side (`image_size` in `vision_config`, `size` in `preprocessor_config.json`).
    pub tile_size: usize,
    /// Width of the adapter and of the projector's input (`projector_input_dim` =
    /// `projector_output_dim` = `vision_output_dim`, as in every release).
    pub output_dim: usize,
    /// The most local tiles one image is split into (`max_patches` of the image processor).
    pub max_patches: usize,
}

impl VisionShape {
    pub const PATCH_SIZE: usize = 14;
    pub const PIXEL_SHUFFLE_RATIO: f64 = 0.5;

    /// The encoder MLP width. It must equal the pixel-shuffled width (`hidden / ratio²`), because
    /// the adapter's `fc1` reads `intermediate_size` columns (transformers' `Llama4VisionMLP2`).
    pub fn intermediate_size(&self) -> usize {
        4 * self.hidden_size
    }

    /// Patches per tile side.
    pub fn grid(&self) -> usize {
        self.tile_size / Self::PATCH_SIZE
    }

    /// `<|patch|>` tokens (projector rows) per tile: the patch grid after the 0.5 pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        self.grid() * self.grid() / 4
    }
}

impl Preset {
    pub fn vocab_size(self) -> usize {
        match self {
            Preset::Tiny | Preset::ScoutWire => 512,
            Preset::Mini => 4096,
        }
    }

    /// The vision tower: `tiny` has the fixture's (56-pixel tiles, 4 tokens a tile); `mini` has
    /// Scout's tile geometry (336-pixel tiles, 144 tokens a tile) on a small encoder (~5.5 GFLOP a
    /// tile against Scout's ~1 TFLOP); `scout-wire` has Scout's tile geometry on a one-layer encoder,
    /// since it measures payloads, not compute.
    pub fn vision_shape(self) -> VisionShape {
        match self {
            Preset::Tiny => VisionShape {
                hidden_size: 32,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                tile_size: 56,
                output_dim: 64,
                max_patches: 4,
            },
            Preset::Mini => VisionShape {
                hidden_size: 256,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                tile_size: 336,
                output_dim: 512,
                max_patches: 4,
            },
            Preset::ScoutWire => VisionShape {
                hidden_size: 64,
                num_hidden_layers: 1,
                num_attention_heads: 1,
                tile_size: 336,
                output_dim: 64,
                max_patches: 16,
            },
        }
    }

    /// The hub-style `config.json` of this shape as `Llama4ForConditionalGeneration` (text under
    /// `text_config`, the vision tower under `vision_config`), with the special token ids of a
    /// tokenizer whose named special tokens start at `first_special`.
    pub fn config_json(self, first_special: u32) -> Value {
        let id = special_id(first_special);
        let v = self.vision_shape();
        json!({
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "boi_token_index": id("<|image_start|>"),
            "eoi_token_index": id("<|image_end|>"),
            "image_token_index": id("<|patch|>"),
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "text_config": self.text_config_json(first_special),
            "vision_config": {
                "model_type": "llama4_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size(),
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_channels": 3,
                "image_size": v.tile_size,
                "patch_size": VisionShape::PATCH_SIZE,
                "pixel_shuffle_ratio": VisionShape::PIXEL_SHUFFLE_RATIO,
                "projector_input_dim": v.output_dim,
                "projector_output_dim": v.output_dim,
                "vision_output_dim": v.output_dim,
                "multi_modal_projector_bias": false,
                "vision_feature_layer": -1,
                "vision_feature_select_strategy": "default",
                "hidden_act": "gelu",
                "norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "attention_dropout": 0.0,
                "projector_dropout": 0.0,
                "initializer_range": 0.02
            }
        })
    }

    /// The same text model as `Llama4ForCausalLM` (what a text-only `save_pretrained` writes): the
    /// text fields at the top level, no vision tower, weights under `model.` and `lm_head.`.
    pub fn text_only_config_json(self, first_special: u32) -> Value {
        let mut config = self.text_config_json(first_special);
        if let Value::Object(fields) = &mut config {
            fields.insert("architectures".to_owned(), json!(["Llama4ForCausalLM"]));
            fields.insert("torch_dtype".to_owned(), json!("bfloat16"));
        }
        config
    }

    /// `preprocessor_config.json` of the vision tower: `Llama4ImageProcessor` with the tile size and
    /// `max_patches` of [`Preset::vision_shape`], and the release's resampling and normalisation.
    pub fn preprocessor_config_json(self) -> Value {
        let v = self.vision_shape();
        json!({
            "image_processor_type": "Llama4ImageProcessor",
            "do_convert_rgb": true,
            "do_resize": true,
            "do_rescale": true,
            "do_normalize": true,
            "size": { "height": v.tile_size, "width": v.tile_size },
            "max_patches": v.max_patches,
            "resize_to_max_canvas": false,
            "resample": 2,
            "rescale_factor": 1.0 / 255.0,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]
        })
    }

    /// `Llama4TextConfig` of this shape.
    fn text_config_json(self, first_special: u32) -> Value {
        let id = special_id(first_special);
        let (hidden, layers, heads, kv, head_dim, inter, inter_mlp, chunk, floor) = match self {
            Preset::Tiny => (64, 4, 4, 2, 16, 128, 192, 8, 4),
            Preset::Mini => (512, 8, 8, 2, 64, 1024, 2048, 8192, 8192),
            Preset::ScoutWire => (5120, 1, 2, 1, 128, 8, 16, 8192, 8192),
        };
        let no_rope: Vec<u32> = (0..layers).map(|i: u32| u32::from(!(i + 1).is_multiple_of(4))).collect();
        json!({
            "model_type": "llama4_text",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "intermediate_size_mlp": inter_mlp,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "vocab_size": self.vocab_size(),
            "num_local_experts": 16,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
            "moe_layers": (0..layers).collect::<Vec<u32>>(),
            "no_rope_layers": no_rope,
            "attention_chunk_size": chunk,
            "attn_temperature_tuning": true,
            "floor_scale": floor,
            "attn_scale": 0.1,
            "use_qk_norm": true,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192
            },
            "max_position_embeddings": 10485760,
            "hidden_act": "silu",
            "attention_bias": false,
            "bos_token_id": id("<|begin_of_text|>"),
            "eos_token_id": [id("<|end_of_text|>"), id("<|eom|>"), id("<|eot|>")],
            "pad_token_id": id("<|finetune_right_pad|>"),
            "tie_word_embeddings": false
        })
    }
}

/// The id of a named special token in a tokenizer whose named specials start at `first_special`.
pub(crate) fn special_id(first_special: u32) -> impl Fn(&str) -> u32 {
    move |name| first_special + NAMED_SPECIAL_TOKENS.iter().position(|t| *t == name).unwrap_or(0) as u32
}

/// Every tensor of the text model with its hub key and shape.
pub fn text_tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let t = &cfg.text;
    let p = cfg.architecture.decoder_prefix();
    let (h, nh, nkv, d) = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim);
    let mut specs = vec![(format!("{p}embed_tokens.weight"), vec![t.vocab_size, h])];
    for i in 0..t.num_hidden_layers {
        let l = format!("{p}layers.{i}.");
        specs.push((format!("{l}input_layernorm.weight"), vec![h]));
        specs.push((format!("{l}post_attention_layernorm.weight"), vec![h]));
        specs.push((format!("{l}self_attn.q_proj.weight"), vec![nh * d, h]));
        specs.push((format!("{l}self_attn.k_proj.weight"), vec![nkv * d, h]));
        specs.push((format!("{l}self_attn.v_proj.weight"), vec![nkv * d, h]));
        specs.push((format!("{l}self_attn.o_proj.weight"), vec![h, nh * d]));
        match t.feed_forward[i] {
            FeedForwardKind::Moe => {
                let f = format!("{l}feed_forward.");
                specs.push((format!("{f}router.weight"), vec![t.num_local_experts, h]));
                specs.push((format!("{f}experts.gate_up_proj"), t.expert_gate_up_shape().to_vec()));
                specs.push((format!("{f}experts.down_proj"), t.expert_down_shape().to_vec()));
                for proj in ["gate_proj", "up_proj"] {
                    specs.push((format!("{f}shared_expert.{proj}.weight"), vec![t.intermediate_size, h]));
                }
                specs.push((format!("{f}shared_expert.down_proj.weight"), vec![h, t.intermediate_size]));
            }
            FeedForwardKind::Dense => {
                let f = format!("{l}feed_forward.");
                specs.push((format!("{f}gate_proj.weight"), vec![t.intermediate_size_mlp, h]));
                specs.push((format!("{f}up_proj.weight"), vec![t.intermediate_size_mlp, h]));
                specs.push((format!("{f}down_proj.weight"), vec![h, t.intermediate_size_mlp]));
            }
        }
    }
    specs.push((format!("{p}norm.weight"), vec![h]));
    if !t.tie_word_embeddings {
        specs.push((cfg.architecture.lm_head_key().to_owned(), vec![t.vocab_size, h]));
    }
    specs
}

/// Every tensor of the vision tower and the projector with its hub key and shape (the keys and
/// shapes of the hub's Scout checkpoint and of the fixture, `docs/llama4-reference.md` §3.1).
pub fn vision_tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let Some(v) = &cfg.vision else { return Vec::new() };
    let (h, inter) = (v.hidden_size, v.intermediate_size);
    let grid = v.image_size / v.patch_size;
    let mut specs = vec![
        (
            "vision_model.patch_embedding.linear.weight".to_owned(),
            vec![h, v.num_channels * v.patch_size * v.patch_size],
        ),
        ("vision_model.class_embedding".to_owned(), vec![h]),
        ("vision_model.positional_embedding_vlm".to_owned(), vec![grid * grid + 1, h]),
    ];
    for ln in ["layernorm_pre", "layernorm_post"] {
        for part in ["weight", "bias"] {
            specs.push((format!("vision_model.{ln}.{part}"), vec![h]));
        }
    }
    for i in 0..v.num_hidden_layers {
        let l = format!("vision_model.model.layers.{i}.");
        for part in ["weight", "bias"] {
            specs.push((format!("{l}input_layernorm.{part}"), vec![h]));
            specs.push((format!("{l}post_attention_layernorm.{part}"), vec![h]));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            specs.push((format!("{l}self_attn.{proj}.weight"), vec![h, h]));
            specs.push((format!("{l}self_attn.{proj}.bias"), vec![h]));
        }
        specs.push((format!("{l}mlp.fc1.weight"), vec![inter, h]));
        specs.push((format!("{l}mlp.fc1.bias"), vec![inter]));
        specs.push((format!("{l}mlp.fc2.weight"), vec![h, inter]));
        specs.push((format!("{l}mlp.fc2.bias"), vec![h]));
    }
    specs.push(("vision_model.vision_adapter.mlp.fc1.weight".to_owned(), vec![v.projector_input_dim, inter]));
    specs.push((
        "vision_model.vision_adapter.mlp.fc2.weight".to_owned(),
        vec![v.projector_output_dim, v.projector_output_dim],
    ));
    specs.push(("multi_modal_projector.linear_1.weight".to_owned(), vec![cfg.text.hidden_size, v.vision_output_dim]));
    specs
}

#[cfg(test)]
mod tests {
    use epserve_model::config::Architecture;

    use super::*;

    const PRESETS: [Preset; 3] = [Preset::Tiny, Preset::Mini, Preset::ScoutWire];

    #[test]
    fn every_preset_has_a_vision_tower_of_whole_tiles() {
        for preset in PRESETS {
            let cfg = ModelConfig::from_json(&preset.config_json(480)).expect("config parses");
            assert_eq!(cfg.architecture, Architecture::ConditionalGeneration);
            let v = cfg.vision.as_ref().unwrap_or_else(|| panic!("{preset:?} has a vision_config"));
            let shape = preset.vision_shape();
            assert_eq!((v.image_size, v.patch_size, v.hidden_size), (shape.tile_size, 14, shape.hidden_size));
            // Whole patches per tile, and a patch grid the 0.5 pixel shuffle halves exactly: the
            // tokens per tile, grid² · ratio², is a whole number.
            assert_eq!(v.image_size % v.patch_size, 0, "{preset:?}: whole patches");
            let grid = v.image_size / v.patch_size;
            let tokens = (grid * grid) as f64 * v.pixel_shuffle_ratio * v.pixel_shuffle_ratio;
            assert_eq!(tokens.fract(), 0.0, "{preset:?}: {tokens} tokens per tile");
            assert_eq!(grid % 2, 0, "{preset:?}: the pixel shuffle pairs rows and columns");
            assert_eq!(tokens as usize, shape.tokens_per_tile());
            // The adapter reads the pixel-shuffled width as `intermediate_size`, and its two layers
            // and the projector chain `projector_input_dim` → `projector_output_dim` → text hidden.
            assert_eq!(
                v.intermediate_size as f64,
                v.hidden_size as f64 / (v.pixel_shuffle_ratio * v.pixel_shuffle_ratio)
            );
            assert_eq!(v.projector_input_dim, v.projector_output_dim);
            assert_eq!(v.projector_output_dim, v.vision_output_dim);
            // 2-D RoPE gives half of each head's complex pairs to columns, half to rows.
            assert_eq!(v.hidden_size % v.num_attention_heads, 0);
            assert_eq!((v.hidden_size / v.num_attention_heads) % 4, 0, "{preset:?}: head_dim divisible by 4");
            let id = special_id(480);
            assert_eq!(cfg.image_token_index, Some(id("<|patch|>")));
            assert_eq!(cfg.boi_token_index, Some(id("<|image_start|>")));
            assert_eq!(cfg.eoi_token_index, Some(id("<|image_end|>")));

            let processor = preset.preprocessor_config_json();
            assert_eq!(processor["size"]["height"], shape.tile_size);
            assert_eq!(processor["size"]["width"], shape.tile_size);
            assert_eq!(processor["max_patches"], shape.max_patches);

            let specs = vision_tensor_specs(&cfg);
            let find = |key: &str| specs.iter().find(|(k, _)| k == key).map(|(_, s)| s.clone());
            assert_eq!(find("vision_model.positional_embedding_vlm"), Some(vec![grid * grid + 1, v.hidden_size]));
            assert_eq!(
                find("multi_modal_projector.linear_1.weight"),
                Some(vec![cfg.text.hidden_size, v.vision_output_dim])
            );
            assert_eq!(specs.len(), 10 + 16 * v.num_hidden_layers, "{preset:?}: every vision tensor");
        }
    }

    #[test]
    fn text_only_config_is_the_same_text_model_without_vision() {
        for preset in PRESETS {
            let multimodal = ModelConfig::from_json(&preset.config_json(480)).expect("parses");
            let text_only = ModelConfig::from_json(&preset.text_only_config_json(480)).expect("parses");
            assert_eq!(text_only.architecture, Architecture::CausalLm);
            assert_eq!(text_only.vision, None);
            assert_eq!(text_only.text, multimodal.text, "{preset:?}");
            assert!(vision_tensor_specs(&text_only).is_empty());
            let keys = |cfg: &ModelConfig| {
                text_tensor_specs(cfg).into_iter().map(|(k, s)| (k.replacen("language_model.", "", 1), s))
            };
            assert!(keys(&text_only).eq(keys(&multimodal)), "{preset:?}: the same tensors under the text-only names");
        }
    }

    /// The key list against the hub's Scout checkpoint (`docs/llama4-reference.md` §3.1).
    #[test]
    fn vision_specs_of_scouts_config_are_the_hub_checkpoints() {
        let scout = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::SCOUT_CONFIG).join("config.json");
        let cfg = ModelConfig::from_file(&scout).expect("Scout's config parses");
        let specs = vision_tensor_specs(&cfg);
        assert_eq!(specs.len(), 3 + 4 + 34 * 16 + 3);
        let find = |key: &str| specs.iter().find(|(k, _)| k == key).map(|(_, s)| s.clone());
        for (key, shape) in [
            ("vision_model.patch_embedding.linear.weight", vec![1408, 588]),
            ("vision_model.class_embedding", vec![1408]),
            ("vision_model.positional_embedding_vlm", vec![577, 1408]),
            ("vision_model.layernorm_post.bias", vec![1408]),
            ("vision_model.model.layers.33.self_attn.o_proj.weight", vec![1408, 1408]),
            ("vision_model.model.layers.33.self_attn.k_proj.bias", vec![1408]),
            ("vision_model.model.layers.0.mlp.fc1.weight", vec![5632, 1408]),
            ("vision_model.model.layers.0.mlp.fc2.bias", vec![1408]),
            ("vision_model.model.layers.12.post_attention_layernorm.weight", vec![1408]),
            ("vision_model.vision_adapter.mlp.fc1.weight", vec![4096, 5632]),
            ("vision_model.vision_adapter.mlp.fc2.weight", vec![4096, 4096]),
            ("multi_modal_projector.linear_1.weight", vec![5120, 4096]),
        ] {
            assert_eq!(find(key), Some(shape), "{key}");
        }
    }
}
