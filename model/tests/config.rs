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
    // "17B active": per layer attention 5120·128·(2·40 + 2·8), router 5120·16, shared and one
    // routed expert 2·3·5120·8192; lm_head 5120·202048 (the embedding's 1.03 B are a lookup).
    let per_layer = 5120 * 128 * 96 + 5120 * 16 + 2 * 3 * 5120 * 8192;
    assert_eq!(t.multiply_adds_per_token(), 48 * per_layer + 5120 * 202_048);
    assert_eq!(t.multiply_adds_per_token() / 100_000_000, 161);
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
    v["text_config"]["rope_scaling"].as_object_mut().expect("object").remove("factor");
    cases.push((v, "text_config.rope_scaling.factor: is required"));

    let mut v = base.clone();
    v["text_config"]["rope_scaling"]["high_freq_factor"] = json!(0.5);
    cases.push((v, "text_config.rope_scaling.high_freq_factor: 0.5 is below low_freq_factor 1"));

    let mut v = base.clone();
    v["text_config"]["attention_chunk_size"] = json!(0);
    cases.push((v, "text_config.attention_chunk_size: must be positive"));

    let mut v = base.clone();
    v["vision_config"].as_object_mut().expect("object").remove("pixel_shuffle_ratio");
    cases.push((v, "vision_config.pixel_shuffle_ratio: is required"));

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

/// serde reports a value of the wrong type at its whole path, however deep it sits.
#[test]
fn type_errors_name_the_path() {
    let base = read("tiny-llama4/config.json");
    let mut cases: Vec<(Value, &str)> = Vec::new();

    let mut v = base.clone();
    v["text_config"]["rope_scaling"]["factor"] = json!("8");
    cases.push((v, r#"text_config.rope_scaling.factor: expected a number, got "8""#));

    let mut v = base.clone();
    v["text_config"]["no_rope_layers"][2] = json!(2);
    cases.push((v, "text_config.no_rope_layers[2]: expected 0 or 1, got 2"));

    let mut v = base.clone();
    v["text_config"]["moe_layers"][3] = json!("3");
    cases.push((v, r#"text_config.moe_layers[3]: expected a layer index, got "3""#));

    let mut v = base.clone();
    v["text_config"]["layer_types"] = json!(["chunked_attention", 7]);
    cases.push((v, "text_config.layer_types[1]: expected a string, got 7"));

    let mut v = base.clone();
    v["text_config"]["moe_layers"] = json!(3);
    cases.push((v, "text_config.moe_layers: expected a list, got 3"));

    let mut v = base.clone();
    v["text_config"]["use_qk_norm"] = json!(1);
    cases.push((v, "text_config.use_qk_norm: expected true or false, got 1"));

    let mut v = base.clone();
    v["text_config"]["attn_temperature_tuning"] = json!("yes");
    cases.push((v, r#"text_config.attn_temperature_tuning: expected a bool or an integer, got "yes""#));

    let mut v = base.clone();
    v["text_config"]["rope_scaling"] = json!("llama3");
    cases.push((v, "text_config.rope_scaling: invalid type: string \"llama3\", expected an object"));

    let mut v = base.clone();
    v["vision_config"]["patch_size"] = json!(-14);
    cases.push((v, "vision_config.patch_size: expected a non-negative integer, got -14"));

    let mut v = base.clone();
    v["image_token_index"] = json!(1.5);
    cases.push((v, "image_token_index: expected a non-negative integer, got 1.5"));

    cases.push((json!([1, 2]), "config.json: invalid type"));

    for (value, expected) in cases {
        let message = field_error(&value);
        assert!(message.starts_with(expected), "expected `{expected}…`, got `{message}`");
    }
}

/// Token ids are `u32` everywhere; an id that does not fit is an error at its path, never truncated.
#[test]
fn out_of_range_token_ids_are_rejected_with_their_path() {
    let base = read("tiny-llama4/config.json");
    let too_big = u64::from(u32::MAX) + 1;
    let cases = [
        ("eos_token_id", json!([481, too_big]), "text_config.eos_token_id[1]: 4294967296 does not fit a token id"),
        ("eos_token_id", json!(too_big), "text_config.eos_token_id: 4294967296 does not fit a token id"),
        ("eos_token_id", json!([481, -1]), "text_config.eos_token_id[1]: expected a non-negative integer, got -1"),
        ("bos_token_id", json!(too_big), "text_config.bos_token_id: 4294967296 does not fit a token id"),
    ];
    for (key, id, expected) in cases {
        let mut v = base.clone();
        v["text_config"][key] = id;
        assert_eq!(field_error(&v), expected);
    }
    let mut v = base.clone();
    v["text_config"]["eos_token_id"] = json!(u32::MAX);
    assert_eq!(ModelConfig::from_json(&v).expect("u32::MAX fits").text.eos_token_ids, vec![u32::MAX]);
}

#[test]
fn sizes_are_bounded_so_derived_sizes_fit() {
    // fuzz/corpus/model_config/regression-huge-hidden-size: a hidden size of 1e116 was read as
    // usize::MAX, and an expert's parameter count (3 · hidden · intermediate) overflowed.
    let base = read("tiny-llama4/config.json");
    let cases = [
        ("hidden_size", json!(1e116), "text_config.hidden_size: expected a non-negative integer, got 1e+116"),
        ("hidden_size", json!(1u64 << 62), "text_config.hidden_size: 4611686018427387904 is more than 16777216"),
        ("intermediate_size", json!(16777217), "text_config.intermediate_size: 16777217 is more than 16777216"),
        ("num_local_experts", json!(1u64 << 40), "text_config.num_local_experts: 1099511627776 is more than 16777216"),
    ];
    for (key, value, expected) in cases {
        let mut v = base.clone();
        v["text_config"][key] = value;
        assert_eq!(field_error(&v), expected);
    }
    let mut v = base.clone();
    v["text_config"]["hidden_size"] = json!(64.0);
    assert_eq!(ModelConfig::from_json(&v).expect("an integral float is a count").text.hidden_size, 64);
}

#[test]
fn eos_is_one_id_or_a_list() {
    let base = read("tiny-llama4/config.json");
    let eos = |value: &Value| ModelConfig::from_json(value).expect("parses").text.eos_token_ids;
    assert_eq!(eos(&base), vec![481, 487, 488]);

    let mut v = base.clone();
    v["text_config"]["eos_token_id"] = json!(481);
    assert_eq!(eos(&v), vec![481]);

    // Without ids of its own, the text config takes the top level's.
    let mut v = base.clone();
    v["text_config"].as_object_mut().expect("object").remove("eos_token_id");
    v["eos_token_id"] = json!([481, 488]);
    assert_eq!(eos(&v), vec![481, 488]);
    v.as_object_mut().expect("object").remove("eos_token_id");
    assert_eq!(eos(&v), Vec::<u32>::new());
}

/// The hub's `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters` are one config;
/// `type` is the older name of `rope_type`, and files that carry both names still parse.
#[test]
fn rope_spellings_give_the_same_config() {
    let hub = read("tiny-llama4/config.json");
    let expected = ModelConfig::from_json(&hub).expect("hub");
    assert_eq!(expected.text.rope.theta, 500_000.0);
    assert!(expected.text.rope.llama3.is_some());

    let mut v5 = hub.clone();
    let text = v5["text_config"].as_object_mut().expect("object");
    let mut params = text.remove("rope_scaling").expect("rope_scaling");
    params["rope_theta"] = text.remove("rope_theta").expect("rope_theta");
    text.insert("rope_parameters".into(), params);
    assert_eq!(ModelConfig::from_json(&v5).expect("rope_parameters").text, expected.text);

    let mut legacy = hub.clone();
    let scaling = legacy["text_config"]["rope_scaling"].as_object_mut().expect("object");
    let kind = scaling.remove("rope_type").expect("rope_type");
    scaling.insert("type".into(), kind);
    assert_eq!(ModelConfig::from_json(&legacy).expect("type").text, expected.text);
    legacy["text_config"]["rope_scaling"]["rope_type"] = json!("llama3");
    assert_eq!(ModelConfig::from_json(&legacy).expect("type and rope_type").text, expected.text);

    // Both objects present: `rope_parameters` wins, as in transformers 5.
    let mut both = v5.clone();
    both["text_config"]["rope_scaling"] = json!({"rope_type": "default"});
    assert_eq!(ModelConfig::from_json(&both).expect("both").text, expected.text);
}

#[test]
fn temperature_tuning_is_a_bool_or_an_integer() {
    let base = read("tiny-llama4/config.json");
    for (written, enabled) in [(json!(4), true), (json!(0), false), (json!(true), true), (json!(false), false)] {
        let mut v = base.clone();
        v["text_config"]["attn_temperature_tuning"] = written.clone();
        let cfg = ModelConfig::from_json(&v).expect("parses");
        assert_eq!(cfg.text.attn_temperature_tuning, enabled, "{written}");
    }
}

/// In a text-only config the fields sit at the top level, and so do the paths its errors name.
#[test]
fn causal_lm_errors_name_top_level_fields() {
    let mut text = read("tiny-llama4/config.json")["text_config"].clone();
    text["architectures"] = json!(["Llama4ForCausalLM"]);
    text["eos_token_id"] = json!([481, "eot"]);
    assert_eq!(field_error(&text), r#"eos_token_id[1]: expected a non-negative integer, got "eot""#);
    text.as_object_mut().expect("object").remove("hidden_size");
    text["eos_token_id"] = json!(481);
    assert_eq!(field_error(&text), "hidden_size: is required");
}

#[test]
fn vision_config_has_defaults_and_both_dtype_spellings_parse() {
    let scout = ModelConfig::from_json(&read("scout-config/config.json")).expect("scout");
    let v = scout.vision.expect("vision");
    assert_eq!((v.pixel_shuffle_ratio, v.projector_input_dim, v.vision_output_dim), (0.5, 4096, 4096));
    assert_eq!((v.vision_feature_layer, v.vision_feature_select_strategy.as_str()), (-1, "default"));
    assert_eq!((v.rope_theta, v.norm_eps, v.num_channels), (10_000.0, 1e-5, 3));
    assert_eq!(scout.stored_dtype.as_deref(), Some("bfloat16"));

    // transformers 5 spells the vision theta inside `rope_parameters`, and may write `dtype` beside
    // `torch_dtype` or a per-module dtype map.
    let mut v5 = read("tiny-llama4/config.json");
    let vision = v5["vision_config"].as_object_mut().expect("object");
    vision.remove("rope_theta");
    vision.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 20000.0}));
    v5["dtype"] = json!("float32");
    let cfg = ModelConfig::from_json(&v5).expect("transformers 5");
    assert_eq!(cfg.vision.expect("vision").rope_theta, 20_000.0);
    assert_eq!(cfg.stored_dtype.as_deref(), Some("bfloat16"), "torch_dtype wins");
    v5.as_object_mut().expect("object").remove("torch_dtype");
    v5["dtype"] = json!({"text_config": "bfloat16"});
    assert_eq!(ModelConfig::from_json(&v5).expect("dtype map").stored_dtype, None);
}
