//! Named model shapes (`tiny`, `mini`, `scout-wire`): their hub-style `config.json` and the list of
//! hub tensor keys a text checkpoint of that shape holds.

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

impl Preset {
    pub fn vocab_size(self) -> usize {
        match self {
            Preset::Tiny | Preset::ScoutWire => 512,
            Preset::Mini => 4096,
        }
    }

    /// The hub-style `config.json` of this shape, with the special token ids of a tokenizer whose
    /// named special tokens start at `first_special`.
    pub fn config_json(self, first_special: u32) -> Value {
        let id = |name: &str| first_special + NAMED_SPECIAL_TOKENS.iter().position(|t| *t == name).unwrap_or(0) as u32;
        let (hidden, layers, heads, kv, head_dim, inter, inter_mlp, chunk, floor) = match self {
            Preset::Tiny => (64, 4, 4, 2, 16, 128, 192, 8, 4),
            Preset::Mini => (512, 8, 8, 2, 64, 1024, 2048, 8192, 8192),
            Preset::ScoutWire => (5120, 1, 2, 1, 128, 8, 16, 8192, 8192),
        };
        let no_rope: Vec<u32> = (0..layers).map(|i: u32| u32::from(!(i + 1).is_multiple_of(4))).collect();
        json!({
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "boi_token_index": id("<|image_start|>"),
            "eoi_token_index": id("<|image_end|>"),
            "image_token_index": id("<|patch|>"),
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "text_config": {
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
            }
        })
    }
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
