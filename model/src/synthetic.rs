//! Random-weight Llama-4 models for benchmarks, demos and tests: named shapes (`tiny`, `mini`), the
//! list of hub tensor keys a text checkpoint holds, and a [`WeightSource`] that generates every
//! tensor deterministically from a seed and the tensor's key.
//!
//! Scales keep activations O(1) through the stack (embeddings ~N(0,1), linear layers ~N(0, 1/fan_in),
//! norms at 1), so outputs are neither constant nor NaN and routing spreads over the experts.

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::checkpoint::WeightSource;
use crate::config::{FeedForwardKind, ModelConfig};
use crate::error::{Error, Result};

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
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Preset::Tiny),
            "mini" => Ok(Preset::Mini),
            "scout-wire" => Ok(Preset::ScoutWire),
            other => Err(Error::Input(format!("unknown preset `{other}` (tiny, mini, scout-wire)"))),
        }
    }

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

/// Deterministic random weights: the same seed and key always give the same tensor.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed }
    }

    fn generate(&self, key: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if key.ends_with("norm.weight") {
            return vec![1.0; n];
        }
        // Fan-in of the product each weight takes part in: nn.Linear stores [out, in]; the fused
        // experts are [E, in, out]; embeddings are looked up, not multiplied.
        let std = if key.ends_with("embed_tokens.weight") {
            1.0
        } else if key.contains("feed_forward.experts.") {
            1.0 / (shape[1] as f32).sqrt()
        } else {
            1.0 / (shape[shape.len() - 1] as f32).sqrt()
        };
        let mut rng = SplitMix64::new(self.seed ^ fnv1a(key.as_bytes()));
        (0..n).map(|_| rng.normal() * std).collect()
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.generate(key, shape), shape, device)?.to_dtype(dtype)?)
    }

    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        // Only the requested rows become a tensor: a view into the whole generated tensor would keep
        // all of it alive.
        let row: usize = shape[1..].iter().product();
        let all = self.generate(key, shape);
        let mut sub_shape = shape.to_vec();
        sub_shape[0] = len;
        Ok(Tensor::from_slice(&all[start * row..(start + len) * row], sub_shape, device)?.to_dtype(dtype)?)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64 (Steele et al. 2014): tiny, fast and identical on every platform and crate version.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
