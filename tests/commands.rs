//! The offline commands on the fixture and on a `gen-model` checkpoint.

mod support;

use support::{run_json, run_ok, tiny_fixture};

#[test]
fn logits_and_generate_on_the_fixture() {
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let all = run_json(&["logits", "--model", model, "--tokens", "480,12,7"]);
    let rows = all["logits"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].as_array().expect("row").len(), 512);
    let last = run_json(&["logits", "--model", model, "--tokens", "480,12,7", "--last"]);
    assert_eq!(last["logits"].as_array().expect("rows").len(), 1);
    let a: Vec<f32> = serde_json::from_value(last["logits"][0].clone()).expect("row");
    let b: Vec<f32> = serde_json::from_value(rows[2].clone()).expect("row");
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-4, "--last differs from the last row of the full output by {diff}");
    // Golden case 1 of golden/text.json: transformers' greedy continuation.
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_fixture().join("golden/text.json")).expect("golden/text.json"),
    )
    .expect("json");
    let case = &golden["cases"][1];
    let prompt: Vec<u64> = serde_json::from_value(case["input_ids"].clone()).expect("input_ids");
    let prompt = prompt.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = run_json(&["generate", "--model", model, "--tokens", &prompt, "--max-tokens", "16", "--json"]);
    let greedy: Vec<u64> = serde_json::from_value(case["greedy_tokens"].clone()).expect("greedy_tokens");
    assert_eq!(out["tokens"], serde_json::json!(support::until_eos(&tiny_fixture(), &greedy)));
    assert!(out["text"].is_string());
}

#[test]
fn commands_accept_a_gen_model_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    run_ok(&["gen-model", "--preset", "tiny", "--seed", "5", "--out", out, "--shard-mib", "1"]);
    for file in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    let logits = run_json(&["logits", "--model", out, "--tokens", "480,100,200", "--last"]);
    let row: Vec<f32> = serde_json::from_value(logits["logits"][0].clone()).expect("row");
    assert_eq!(row.len(), 512);
    let spread = row.iter().cloned().fold(f32::MIN, f32::max) - row.iter().cloned().fold(f32::MAX, f32::min);
    assert!(row.iter().all(|v| v.is_finite()) && spread > 1.0, "degenerate logits (spread {spread})");
    let chat =
        run_json(&["generate", "--model", out, "--prompt", "Hello there", "--chat", "--max-tokens", "12", "--json"]);
    let tokens = chat["tokens"].as_array().expect("tokens");
    assert!(!tokens.is_empty() && tokens.len() <= 12);
    assert!(chat["text"].as_str().is_some_and(|t| !t.is_empty()), "{chat}");
    // Same seed, same checkpoint.
    let again = tempfile::tempdir().expect("tempdir");
    run_ok(&["gen-model", "--preset", "tiny", "--seed", "5", "--out", again.path().to_str().expect("utf-8")]);
    let logits_again =
        run_json(&["logits", "--model", again.path().to_str().expect("utf-8"), "--tokens", "480,100,200", "--last"]);
    assert!(logits == logits_again, "a sharded and a single-file copy of the same seed agree");
    // The text-only checkpoint of that seed is the same text model.
    let text_only = tempfile::tempdir().expect("tempdir");
    let text_only = text_only.path().to_str().expect("utf-8");
    run_ok(&["gen-model", "--preset", "tiny", "--seed", "5", "--out", text_only, "--no-vision"]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(text_only).join("config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(config["architectures"], serde_json::json!(["Llama4ForCausalLM"]));
    assert!(!std::path::Path::new(text_only).join("preprocessor_config.json").exists());
    let logits_text_only = run_json(&["logits", "--model", text_only, "--tokens", "480,100,200", "--last"]);
    assert!(logits == logits_text_only, "--no-vision holds the same text model");
}

/// `decode-bench` counts the weight bytes a step reads — every matrix once, plus one copy of each
/// expert routed to, per MoE layer — as kept in memory (bf16 as the fixture stores them, f32 with
/// `--weight-storage compute`), and puts them against the probed bandwidth.
#[test]
fn decode_bench_counts_the_bytes_a_step_reads() {
    let dir = tiny_fixture();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json");
    let t = &config["text_config"];
    let get = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("{k} in the fixture's config")) as f64;
    let (h, inter, layers) = (get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"));
    let (q, kv) = (get("num_attention_heads") * get("head_dim"), get("num_key_value_heads") * get("head_dim"));
    assert_eq!(t["moe_layers"].as_array().map(Vec::len), Some(layers as usize), "every fixture layer is MoE");
    // Per layer: q, k, v, o; the router; the shared expert (gate, up, down). Then lm_head.
    let per_layer = 2.0 * q * h + 2.0 * kv * h + get("num_local_experts") * h + 3.0 * h * inter;
    let matrices = layers * per_layer + get("vocab_size") * h;
    let expert = 3.0 * h * inter;
    let model = dir.to_str().expect("utf-8");
    for (storage, bytes) in [("as-stored", 2.0), ("compute", 4.0)] {
        let args = ["decode-bench", "--model", model, "--batch", "1,8", "--steps", "3", "--prompt-len", "4"];
        let rows = run_json(&[&args[..], &["--weight-storage", storage, "--probe-bandwidth"]].concat());
        let rows = rows.as_array().expect("rows");
        let (one, eight, probe) = (&rows[0], &rows[1], &rows[2]);
        let f = |row: &serde_json::Value, k: &str| row[k].as_f64().unwrap_or_else(|| panic!("{k} in {row}"));
        assert_eq!(f(one, "experts_per_moe_layer"), 1.0, "one row, top-1: one expert per layer");
        assert_eq!(f(one, "weight_bytes_per_step"), (matrices + layers * expert) * bytes, "{storage}");
        let touched = f(eight, "experts_per_moe_layer");
        assert!((1.0..=8.0).contains(&touched), "8 rows reach 1 to 8 experts, not {touched}");
        let want = (matrices + touched * layers * expert) * bytes;
        assert!((f(eight, "weight_bytes_per_step") - want).abs() < 1e-6 * want, "{storage}: {eight}");
        let bandwidth = f(probe, "memory_read_gb_per_s") * 1e9;
        assert!(bandwidth > 1e8, "a machine reads more than 0.1 GB/s: {probe}");
        for (row, batch) in [(one, 1.0), (eight, 8.0)] {
            let bound = batch * bandwidth / f(row, "weight_bytes_per_step");
            assert!((f(row, "bound_tokens_per_s") - bound).abs() < 1e-6 * bound, "{row}");
            assert!(f(row, "fraction_of_bound") > 0.0, "{row}");
        }
    }
}
