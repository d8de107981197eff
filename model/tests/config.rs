//! Config parsing on the fixture files and on transformers-5 spellings, and the shapes derived for
//! Llama 4 Scout.

use epserve_model::Error;
use epserve_model::config::{Architecture, AttentionKind, FeedForwardKind, ModelConfig};
use epserve_testkit::fixtures;
use serde_json::{Value, json};

fn read(path: &str) -> Value {
    let text = std::fs::read_to_string(fixtures::root().join(path)).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn field_error(value: &Value) -> String {
    match ModelConfig::from_json(value) {
        Err(Error::Config { field, reason }) => format!("{field}: {reason}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn scout_config_derives_the_real_shapes() {
    let cfg = ModelConfig::from_json(&read("scout-config/config.json")).expect("scout parses");
    let t = &cfg.text;
    assert_eq!(cfg.architecture, Architecture::ConditionalGeneration);
    assert_eq!(t.moe_layers().count(), 48);
    let nope: Vec<usize> = t.nope_layers().collect();
    assert_eq!(nope, (3..48).step_by(4).collect::<Vec<_>>());
    assert_eq!(t.attention.iter().filter(|k| **k == AttentionKind::ChunkedRope).count(), 36);
    assert_eq!(t.expert_gate_up_shape(), [16, 5120, 16384]);
    assert_eq!(t.expert_down_shape(), [16, 8192, 5120]);
    // 3 · 5120 · 8192 parameters in bf16: 240 MiB per expert per layer, 11.25 GiB per expert.
    assert_eq!(t.expert_bytes_per_layer(2), 251_658_240);
    assert_eq!(t.expert_bytes_per_layer(2) * 48, 12_079_595_520);
    assert!(t.attn_temperature_tuning, "the integer 4 means enabled");
    assert_eq!(t.attention_chunk_size, Some(8192));
    assert_eq!(t.eos_token_ids, vec![200001, 200007, 200008]);
    assert_eq!(cfg.image_token_index, Some(200092));
    let rope = t.rope.llama3.expect("llama3 scaling is read from the file");
    assert_eq!((rope.factor, rope.low_freq_factor, rope.high_freq_factor), (8.0, 1.0, 4.0));
    let v = cfg.vision.expect("vision config");
    assert_eq!((v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size), (1408, 34, 336, 14));
}

#[test]
fn tiny_fixture_parses() {
    let cfg = ModelConfig::from_json(&read("tiny-llama4/config.json")).expect("tiny parses");
    assert_eq!(cfg.text.nope_layers().collect::<Vec<_>>(), vec![3]);
    assert_eq!(cfg.text.attention_chunk_size, Some(8));
    assert_eq!(cfg.text.floor_scale, 4.0);
    assert!(cfg.text.feed_forward.iter().all(|k| *k == FeedForwardKind::Moe));
}

/// The same model as transformers 5 `save_pretrained` writes it: `rope_parameters`, `layer_types`,
/// a bool temperature flag, `dtype`, and the lists left for the parser to derive.
#[test]
fn transformers5_spelling_gives_the_same_config() {
    let hub = read("scout-config/config.json");
    let mut v5 = hub.clone();
    let text = v5["text_config"].as_object_mut().expect("object");
    let scaling = text.remove("rope_scaling").expect("rope_scaling");
    let theta = text.remove("rope_theta").expect("rope_theta");
    let mut params = scaling.as_object().expect("object").clone();
    params.insert("rope_theta".into(), theta);
    text.insert("rope_parameters".into(), Value::Object(params));
    text.remove("moe_layers");
    text.insert("no_rope_layers".into(), json!([]));
    text.insert("attn_temperature_tuning".into(), json!(true));
    let layer_types: Vec<&str> =
        (0..48).map(|i| if (i + 1) % 4 == 0 { "full_attention" } else { "chunked_attention" }).collect();
    text.insert("layer_types".into(), json!(layer_types));
    let root = v5.as_object_mut().expect("object");
    root.remove("torch_dtype");
    root.insert("dtype".into(), json!("bfloat16"));

    let a = ModelConfig::from_json(&hub).expect("hub");
    let b = ModelConfig::from_json(&v5).expect("transformers-5");
    assert_eq!(a.text, b.text);
}

#[test]
fn causal_lm_config_is_text_only() {
    let hub = read("tiny-llama4/config.json");
    let mut text = hub["text_config"].clone();
    text["architectures"] = json!(["Llama4ForCausalLM"]);
    let cfg = ModelConfig::from_json(&text).expect("causal lm");
    assert_eq!(cfg.architecture, Architecture::CausalLm);
    assert!(cfg.vision.is_none());
    assert_eq!(cfg.architecture.lm_head_key(), "lm_head.weight");
}

#[test]
fn dense_layers_follow_interleave_step() {
    let mut v = read("tiny-llama4/config.json");
    v["text_config"].as_object_mut().expect("object").remove("moe_layers");
    v["text_config"]["interleave_moe_layer_step"] = json!(2);
    let cfg = ModelConfig::from_json(&v).expect("parses");
    assert_eq!(cfg.text.moe_layers().collect::<Vec<_>>(), vec![1, 3]);
    // An explicit empty list means no MoE layer at all (what the converter writes for dense models).
    v["text_config"]["moe_layers"] = json!([]);
    let cfg = ModelConfig::from_json(&v).expect("parses");
    assert_eq!(cfg.text.moe_layers().count(), 0);
}

#[test]
fn errors_name_the_field() {
    let base = read("tiny-llama4/config.json");
    let mut cases: Vec<(Value, &str)> = Vec::new();

    let mut v = base.clone();
    v["text_config"].as_object_mut().expect("object").remove("hidden_size");
    cases.push((v, "text_config.hidden_size: is required"));

    let mut v = base.clone();
    v["text_config"]["num_key_value_heads"] = json!(3);
    cases.push((v, "text_config.num_key_value_heads"));

    let mut v = base.clone();
    v["text_config"]["moe_layers"] = json!([0, 7]);
    cases.push((v, "text_config.moe_layers[1]"));

    let mut v = base.clone();
    v["text_config"]["no_rope_layers"] = json!([1, 1, 0]);
    cases.push((v, "text_config.no_rope_layers"));

    let mut v = base.clone();
    v["text_config"]["layer_types"] =
        json!(["chunked_attention", "full_attention", "chunked_attention", "full_attention"]);
    cases.push((v, "text_config.layer_types[1]"));

    let mut v = base.clone();
    v["text_config"]["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
    cases.push((v, "text_config.rope_theta"));

    let mut v = base.clone();
    v["text_config"]["hidden_size"] = json!("64");
    cases.push((v, "text_config.hidden_size: expected a non-negative integer"));

    let mut v = base.clone();
    v["text_config"]["num_experts_per_tok"] = json!(17);
    cases.push((v, "text_config.num_experts_per_tok"));

    let mut v = base.clone();
    v["text_config"]["rope_scaling"]["rope_type"] = json!("yarn");
    cases.push((v, "text_config.rope_scaling.rope_type"));

    let mut v = base.clone();
    v["architectures"] = json!(["MistralForCausalLM"]);
    v.as_object_mut().expect("object").remove("text_config");
    cases.push((v, "architectures"));

    for (value, expected) in cases {
        let message = field_error(&value);
        assert!(message.starts_with(expected), "expected `{expected}…`, got `{message}`");
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let mut v = read("tiny-llama4/config.json");
    v["text_config"]["some_future_field"] = json!({"nested": [1, 2, 3]});
    v["quantization_config"] = json!({"quant_method": "none"});
    ModelConfig::from_json(&v).expect("unknown fields are fine");
}
