//! Reading the model's answer back as tool calls. Llama 4 calls a function by writing
//! `{"name": NAME, "parameters": {...}}` (its chat template's instruction, and how the template
//! writes calls back into the conversation, one after another); several calls are several such
//! objects, separated by nothing, whitespace or `;`. Under `tool_choice: "required"` or a named
//! function the grammar makes the answer exactly that; under `"auto"` the model may write text
//! instead, and the answer is calls only if all of it parses as calls of the request's functions.
//!
//! Streaming: an answer that may be calls is held back until it ends (a call is only known to be a
//! call once it parses whole), then sent as OpenAI's tool-call deltas; under `"auto"` an answer
//! whose first visible character is not `{` is text and streams as it comes.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::openai::response::{FunctionCall, ToolCall};
use crate::openai::structured::{Function, ToolMode, ToolPlan};

/// One call as Llama 4 writes it. `arguments` is accepted too (the OpenAI spelling).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LlamaToolCall {
    name: String,
    #[serde(alias = "arguments")]
    parameters: Map<String, Value>,
}

/// `text` as calls of `functions`, or `None` if any of it is not such a call.
pub fn parse(text: &str, functions: &[Function]) -> Option<Vec<(String, String)>> {
    let mut calls = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            break;
        }
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<LlamaToolCall>();
        let call = values.next()?.ok()?;
        rest = &rest[values.byte_offset()..];
        if !functions.iter().any(|f| f.name == call.name) {
            return None;
        }
        // Arguments as compact JSON text: OpenAI's `function.arguments` is a string.
        let arguments = Value::Object(call.parameters).to_string();
        calls.push((call.name, arguments));
    }
    (!calls.is_empty()).then_some(calls)
}

/// The answer's calls with ids; `None`: the answer is text.
pub fn tool_calls(text: &str, plan: &ToolPlan, response_id: &str) -> Option<Vec<ToolCall>> {
    let mut calls = parse(text, &plan.functions)?;
    if !plan.parallel {
        // Under `parallel_tool_calls: false` the grammar allows one call; an `auto` answer that
        // wrote several keeps the first.
        calls.truncate(1);
    }
    let suffix = response_id.rsplit('-').next().unwrap_or(response_id);
    Some(
        calls
            .into_iter()
            .enumerate()
            .map(|(i, (name, arguments))| ToolCall {
                id: format!("call_{suffix}{i}"),
                kind: "function",
                function: FunctionCall { name, arguments },
            })
            .collect(),
    )
}

/// Decides, as a stream's text arrives, what to send now and what to hold back as possible calls.
#[derive(Debug)]
pub struct ToolCallStream {
    /// Whether the answer is held back: `None` until its first visible character under `auto`.
    holding: Option<bool>,
    held: String,
}

impl ToolCallStream {
    pub fn new(plan: &ToolPlan) -> Self {
        let holding = match plan.mode {
            ToolMode::Auto => None,
            ToolMode::Required | ToolMode::Named(_) => Some(true),
        };
        ToolCallStream { holding, held: String::new() }
    }

    /// Text to send as content now.
    pub fn push(&mut self, text: &str) -> String {
        match self.holding {
            Some(true) => {
                self.held.push_str(text);
                String::new()
            }
            Some(false) => text.to_owned(),
            None => {
                self.held.push_str(text);
                match self.held.trim_start().chars().next() {
                    None => String::new(),
                    Some(first) => {
                        let calls = first == '{';
                        self.holding = Some(calls);
                        if calls { String::new() } else { std::mem::take(&mut self.held) }
                    }
                }
            }
        }
    }

    /// At the end: the calls, or the held-back text to send as content.
    pub fn finish(self, plan: &ToolPlan, response_id: &str) -> Result<Vec<ToolCall>, String> {
        match tool_calls(&self.held, plan, response_id) {
            Some(calls) => Ok(calls),
            None => Err(self.held),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan(mode: ToolMode, parallel: bool) -> ToolPlan {
        ToolPlan {
            definitions: Vec::new(),
            functions: vec![
                Function { name: "get_weather".into(), parameters: json!({"type": "object"}) },
                Function { name: "now".into(), parameters: json!({"type": "object"}) },
            ],
            mode,
            parallel,
        }
    }

    #[test]
    fn parses_llama_calls() {
        let p = plan(ToolMode::Auto, true);
        let calls =
            tool_calls(r#"{"name": "get_weather", "parameters": {"city": "Paris", "n": [1, 2]}}"#, &p, "chatcmpl-ab")
                .expect("a call");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris","n":[1,2]}"#);
        assert_eq!(calls[0].id, "call_ab0");
        let two = r#" {"name": "now", "parameters": {}}; {"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        assert_eq!(tool_calls(two, &p, "x").expect("two").len(), 2);
        assert_eq!(tool_calls(two, &plan(ToolMode::Auto, false), "x").expect("first only").len(), 1);
        let concatenated = r#"{"name": "now", "parameters": {}}{"name": "now", "parameters": {}}"#;
        assert_eq!(parse(concatenated, &p.functions).expect("two").len(), 2);
        for text in [
            "Hello",
            r#"{"name": "fly", "parameters": {}}"#,
            r#"{"name": "now", "parameters": {}} and more"#,
            r#"{"name": "now", "parameters": "x"}"#,
            r#"{"name": "now", "parameters": {}, "extra": 1}"#,
            r#"{"name": "now", "parameters": {"#,
            "",
        ] {
            assert!(parse(text, &p.functions).is_none(), "{text}");
        }
    }

    #[test]
    fn streams_text_and_holds_calls() {
        let auto = plan(ToolMode::Auto, true);
        let mut s = ToolCallStream::new(&auto);
        assert_eq!(s.push("  "), "");
        assert_eq!(s.push("Hi"), "  Hi");
        assert_eq!(s.push(" there"), " there");
        assert_eq!(s.finish(&auto, "x").expect_err("text"), "");

        let mut s = ToolCallStream::new(&auto);
        for piece in [" {\"na", "me\": \"now\", \"parameters\": {}", "}"] {
            assert_eq!(s.push(piece), "");
        }
        assert_eq!(s.finish(&auto, "x").expect("a call")[0].function.name, "now");

        // Under `auto`, text that starts like a call but is not one comes out as text at the end.
        let mut s = ToolCallStream::new(&auto);
        assert_eq!(s.push("{not a call}"), "");
        assert_eq!(s.finish(&auto, "x").expect_err("text"), "{not a call}");

        let required = plan(ToolMode::Required, true);
        let mut s = ToolCallStream::new(&required);
        assert_eq!(s.push("Hello"), "");
        assert_eq!(s.finish(&required, "x").expect_err("not a call"), "Hello");
    }
}
