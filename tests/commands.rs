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
    // Golden case 1 of golden/text.json.
    let out = run_json(&[
        "generate",
        "--model",
        model,
        "--tokens",
        "480,470,468,474,182,82,443",
        "--max-tokens",
        "16",
        "--json",
    ]);
    assert_eq!(
        out["tokens"],
        serde_json::json!([0, 418, 436, 461, 428, 0, 312, 484, 68, 89, 451, 71, 353, 403, 319, 110])
    );
    assert!(out["text"].is_string());
}

#[test]
fn commands_accept_a_gen_model_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    run_ok(&["gen-model", "--preset", "tiny", "--seed", "5", "--out", out, "--shard-mib", "1"]);
    for file in [
        "config.json",
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
}
