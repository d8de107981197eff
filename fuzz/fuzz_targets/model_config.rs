//! A checkpoint's `config.json` as `ModelConfig::from_json_str` reads it (hub and transformers-5
//! spellings, then validation), and the derived sizes every loader computes from it.
#![no_main]

use epserve_model::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| {
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(config) = ModelConfig::from_json_str(text) else { return };
    let t = &config.text;
    // What a coordinator and a worker compute from a validated config before loading anything.
    let _ = t.moe_layers().count();
    let _ = t.nope_layers().count();
    let _ = t.expert_gate_up_shape();
    let _ = t.expert_down_shape();
    let _ = t.params_per_expert_per_layer();
    let _ = t.expert_bytes_per_layer(2);
    let _ = t.kv_group_size();
});
