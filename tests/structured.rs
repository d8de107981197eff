//! Structured outputs and tool calls end to end (issue 15), with the official `openai` Python
//! client and the `jsonschema` package as the independent validator: on a random-weight `mini`
//! checkpoint, whose free text is gibberish, every `json_schema` answer at temperature 1 validates;
//! on the tiny fixture, required and named tool calls validate, streaming reassembles to the whole
//! answer, and a conversation with tool results is the prompt transformers renders.

mod support;

use std::path::Path;
use std::process::Command;

fn python() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has = |module: &str| {
        Command::new(&python).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success())
    };
    assert!(has("openai") && has("jsonschema"), "`pip install openai jsonschema` (scripts/ensure-tools installs them)");
    python
}

fn run_script(script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new(python()).arg(path).args(args).output().expect("python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_schema_answers_of_a_random_model_all_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("mini");
    let model_arg = model.to_str().expect("utf-8");
    support::run_ok(&["gen-model", "--preset", "mini", "--seed", "15", "--out", model_arg, "--no-vision"]);
    let (up, addr) = support::up_model(&model, &[]);
    run_script("openai_structured.py", &[&format!("http://{addr}/v1"), "mini", "100"]);
    support::stop(up);
}

#[test]
fn tool_calls_with_the_openai_client() {
    let (up, addr) = support::up(&[]);
    let golden = epserve_testkit::fixtures::root().join("tool-chat/golden.json");
    run_script("openai_tools.py", &[&format!("http://{addr}/v1"), "tiny-llama4", golden.to_str().expect("utf-8")]);
    support::stop(up);
}
