//! The grammar a request's output must follow, decided here and checked here: `response_format`
//! becomes a JSON schema, `tool_choice: "required"` or a named function a lark grammar of Llama 4
//! tool calls whose parameters are the tools' schemas. Each is compiled against the checkpoint's
//! vocabulary before the request leaves (a cache makes that once per distinct grammar), so that a
//! schema the engine cannot follow is a 400 that names the parameter, and never reaches a
//! coordinator. The coordinator compiles it again (from its own cache) and enforces it.

use std::sync::Arc;

use epserve_grammar::{GrammarCompiler, GrammarError, GrammarSpec, json_schema_for_lark};
use epserve_proto::metric_names as m;
use epserve_proto::v1 as pb;
use serde_json::Value;

use crate::errors::ApiError;
use crate::openai::structured::{Function, OutputFormat, Structured, ToolMode};

/// Most calls one answer may make under `tool_choice: "required"` with parallel calls: a bound on
/// the grammar (each call is a branch of it) and on a model that would call forever.
pub const MAX_PARALLEL_CALLS: usize = 8;

/// The grammar for `structured`, compiled once to check it (when the gateway has a compiler), in
/// the form the coordinator takes.
pub async fn constraint(
    compiler: Option<&Arc<GrammarCompiler>>,
    structured: &Structured,
) -> Result<Option<pb::Constraint>, ApiError> {
    let (spec, param) = match (&structured.tools, &structured.format) {
        (Some(plan), _) if plan.mode != ToolMode::Auto => {
            let called: Vec<(usize, &Function)> = match &plan.mode {
                ToolMode::Named(name) => plan.functions.iter().enumerate().filter(|(_, f)| &f.name == name).collect(),
                _ => plan.functions.iter().enumerate().collect(),
            };
            let mut schemas = Vec::with_capacity(called.len());
            for &(i, f) in &called {
                let param = format!("tools[{i}].function.parameters");
                let schema = json_schema_for_lark(f.parameters.clone()).map_err(|e| schema_error(&param, &e))?;
                if let Some(compiler) = compiler {
                    compile(compiler, GrammarSpec::json_schema(f.parameters.to_string()), &param).await?;
                }
                schemas.push((f.name.as_str(), schema));
            }
            let calls = if plan.parallel && plan.mode == ToolMode::Required { MAX_PARALLEL_CALLS } else { 1 };
            (GrammarSpec::lark(tool_call_grammar(&schemas, calls)), "tools".to_owned())
        }
        (Some(_), _) | (None, OutputFormat::Text) => return Ok(None),
        (None, OutputFormat::JsonObject) => {
            (GrammarSpec::json_schema(r#"{"type": "object"}"#), "response_format".to_owned())
        }
        (None, OutputFormat::JsonSchema(schema)) => {
            (GrammarSpec::json_schema(schema.to_string()), "response_format.json_schema.schema".to_owned())
        }
    };
    if let Some(compiler) = compiler {
        compile(compiler, spec.clone(), &param).await?;
    }
    Ok(Some(pb::Constraint {
        grammar: Some(match spec.kind {
            epserve_grammar::GrammarKind::JsonSchema => pb::constraint::Grammar::JsonSchema(spec.text),
            epserve_grammar::GrammarKind::Lark => pb::constraint::Grammar::Lark(spec.text),
        }),
    }))
}

/// Compiles on the blocking pool (compiling is CPU work, up to tens of milliseconds for a large
/// schema); a failure is the client's: a 400 naming `param`.
async fn compile(compiler: &Arc<GrammarCompiler>, spec: GrammarSpec, param: &str) -> Result<(), ApiError> {
    let compiler = compiler.clone();
    let compiled = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let cached = compiler.cached();
        let compiled = compiler.compile(&spec).map(drop);
        if compiler.cached() != cached {
            metrics::histogram!(m::GRAMMAR_COMPILE_SECONDS).record(started.elapsed().as_secs_f64());
        }
        compiled
    })
    .await
    .map_err(|e| ApiError::internal(format!("compiling the grammar: {e}")))?;
    compiled.map_err(|e| schema_error(param, &e))
}

fn schema_error(param: &str, e: &GrammarError) -> ApiError {
    ApiError::invalid_param(param, format!("Invalid '{param}': this schema cannot be enforced: {e}"))
}

/// Llama 4 tool calls as a lark grammar: `{"name": "NAME", "parameters": ARGS}` with ARGS a
/// document of that function's schema, one to `calls` of them back to back (how the chat template
/// writes several calls back into the conversation).
fn tool_call_grammar(functions: &[(&str, String)], calls: usize) -> String {
    let mut lark = String::from("start: ");
    // `call (call (call)?)?`: up to `calls` calls, at least one.
    lark.push_str(&"call (".repeat(calls - 1));
    lark.push_str("call");
    lark.push_str(&")?".repeat(calls - 1));
    lark.push('\n');
    let branches: Vec<String> = (0..functions.len()).map(|i| format!("call_{i}")).collect();
    lark.push_str(&format!("call: {}\n", branches.join(" | ")));
    for (i, (name, schema)) in functions.iter().enumerate() {
        // Names are checked to be [A-Za-z0-9_-]: JSON quoting is all the literal needs.
        let head = Value::String(format!("{{\"name\": \"{name}\", \"parameters\": ")).to_string();
        lark.push_str(&format!("call_{i}: {head} params_{i} \"}}\"\nparams_{i}: %json {schema}\n"));
    }
    lark
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_grammar_shape() {
        let g = tool_call_grammar(&[("f", "{}".into()), ("g_2", "{\"type\": \"object\"}".into())], 3);
        assert_eq!(
            g,
            "start: call (call (call)?)?\ncall: call_0 | call_1\n\
             call_0: \"{\\\"name\\\": \\\"f\\\", \\\"parameters\\\": \" params_0 \"}\"\nparams_0: %json {}\n\
             call_1: \"{\\\"name\\\": \\\"g_2\\\", \\\"parameters\\\": \" params_1 \"}\"\nparams_1: %json {\"type\": \"object\"}\n"
        );
        assert!(tool_call_grammar(&[("f", "{}".into())], 1).starts_with("start: call\n"));
    }
}
