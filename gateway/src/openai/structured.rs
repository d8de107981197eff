//! `response_format`, `tools`, `tool_choice` and `parallel_tool_calls`: their wire shapes and their
//! validation into what the gateway acts on ([`Structured`]): the grammar the output must follow, if
//! any, and whether the output is read back as tool calls. Decisions: docs/structured-outputs.md.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::errors::ApiError;

/// `response_format`, on chat completions and (an extension) on text completions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Value>,
    /// Accepted; every schema is enforced strictly (by the grammar) whatever its value.
    pub strict: Option<bool>,
}

/// One entry of `tools`, as validation reads it (the template gets the entry as it was sent).
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct ToolDefinition {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionDefinition,
}

/// The parts of a function the gateway acts on; `description` reaches the model through the chat
/// template (from the tool as sent), and `strict` is accepted: arguments always follow the schema.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct FunctionDefinition {
    name: String,
    parameters: Option<Map<String, Value>>,
}

/// `tool_choice`: `"none" | "auto" | "required"` or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoice {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NamedFunction {
    pub name: String,
}

/// What the output must be, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// A document of this JSON schema.
    JsonSchema(Value),
}

/// How the model may call the request's tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// Text or calls, the model's choice; the output is read as calls when it parses as calls.
    Auto,
    /// At least one call, enforced by the grammar.
    Required,
    /// One call of this function, enforced by the grammar.
    Named(String),
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    /// Its parameters' JSON schema (`{"type": "object"}` when the tool gives none).
    pub parameters: Value,
}

/// The tools of a request that may call them (`tool_choice` other than `"none"`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    /// `tools` as sent, for the chat template.
    pub definitions: Vec<Value>,
    pub functions: Vec<Function>,
    pub mode: ToolMode,
    /// More than one call in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// The structured-output part of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Structured {
    pub format: OutputFormat,
    pub tools: Option<ToolPlan>,
}

impl Structured {
    pub const TEXT: Structured = Structured { format: OutputFormat::Text, tools: None };
}

/// Most tools a request may define (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// `response_format` alone (text completions).
pub fn output_format(format: Option<ResponseFormat>) -> Result<OutputFormat, ApiError> {
    Ok(match format {
        None | Some(ResponseFormat::Text) => OutputFormat::Text,
        Some(ResponseFormat::JsonObject) => OutputFormat::JsonObject,
        Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
            Some(schema @ (Value::Object(_) | Value::Bool(true))) => OutputFormat::JsonSchema(schema),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "'response_format.json_schema.schema' must be a JSON schema object.",
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "'response_format' of type 'json_schema' needs 'json_schema.schema'.",
                ));
            }
        },
    })
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls` together with `response_format`.
pub fn structured(
    format: Option<ResponseFormat>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<ToolChoice>,
    parallel_tool_calls: Option<bool>,
) -> Result<Structured, ApiError> {
    let format = output_format(format)?;
    let definitions = tools.unwrap_or_default();
    if definitions.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param("tools", format!("At most {MAX_TOOLS} tools, got {}.", definitions.len())));
    }
    let functions = definitions.iter().enumerate().map(|(i, t)| function(i, t)).collect::<Result<Vec<_>, _>>()?;
    for (i, f) in functions.iter().enumerate() {
        if functions[..i].iter().any(|g| g.name == f.name) {
            return Err(ApiError::invalid(
                Some(format!("tools[{i}].function.name")),
                format!("Two tools are named '{}'.", f.name),
            ));
        }
    }
    let mode = match tool_choice {
        None if functions.is_empty() => None,
        None => Some(ToolMode::Auto),
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => None,
            "auto" if functions.is_empty() => None,
            "auto" => Some(ToolMode::Auto),
            "required" => Some(ToolMode::Required),
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("'tool_choice' must be 'none', 'auto', 'required' or a named function, got '{other}'."),
                ));
            }
        },
        Some(ToolChoice::Named(named)) => {
            if named.kind != "function" {
                return Err(ApiError::invalid_param(
                    "tool_choice.type",
                    format!("'tool_choice.type' must be 'function', got '{}'.", named.kind),
                ));
            }
            if !functions.iter().any(|f| f.name == named.function.name) {
                return Err(ApiError::invalid_param(
                    "tool_choice.function.name",
                    format!("'tool_choice' names '{}', which is not among 'tools'.", named.function.name),
                ));
            }
            Some(ToolMode::Named(named.function.name))
        }
    };
    if matches!(mode, Some(ToolMode::Required)) && functions.is_empty() {
        return Err(ApiError::invalid_param("tool_choice", "'tool_choice' is 'required' but no 'tools' are given."));
    }
    let tools =
        mode.map(|mode| ToolPlan { definitions, functions, mode, parallel: parallel_tool_calls.unwrap_or(true) });
    if tools.is_some() && format != OutputFormat::Text {
        return Err(ApiError::invalid_param(
            "response_format",
            "'response_format' other than 'text' cannot be combined with 'tools' unless 'tool_choice' is 'none'.",
        ));
    }
    Ok(Structured { format, tools })
}

/// `tools[i]` read as a function tool; the name follows OpenAI's rule, which also keeps it safe to
/// write into a grammar literal.
fn function(i: usize, tool: &Value) -> Result<Function, ApiError> {
    let param = format!("tools[{i}]");
    let definition: ToolDefinition = serde_json::from_value(tool.clone())
        .map_err(|e| ApiError::invalid(Some(param.clone()), format!("Invalid '{param}': {e}.")))?;
    if definition.kind != "function" {
        return Err(ApiError::invalid(
            Some(format!("{param}.type")),
            format!("Only tools of type 'function' are supported, got '{}'.", definition.kind),
        ));
    }
    let name = definition.function.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(ApiError::invalid(
            Some(format!("{param}.function.name")),
            format!("A function name is 1 to 64 of a-z, A-Z, 0-9, '_' and '-', got '{name}'."),
        ));
    }
    let parameters = match definition.function.parameters {
        Some(p) => Value::Object(p),
        None => serde_json::json!({"type": "object", "properties": {}}),
    };
    Ok(Function { name, parameters })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}),
            json!({"type": "function", "function": {"name": "now"}}),
        ]
    }

    fn param(r: Result<Structured, ApiError>) -> String {
        r.expect_err("invalid").param.unwrap_or_default()
    }

    #[test]
    fn tool_choice_modes() {
        let s = structured(None, Some(tools()), None, None).expect("auto by default");
        let plan = s.tools.expect("tools");
        assert_eq!((plan.mode, plan.parallel), (ToolMode::Auto, true));
        assert_eq!(plan.functions[1].parameters, json!({"type": "object", "properties": {}}));
        let none = structured(None, Some(tools()), Some(ToolChoice::Mode("none".into())), None).expect("none");
        assert!(none.tools.is_none());
        let named = ToolChoice::Named(NamedToolChoice {
            kind: "function".into(),
            function: NamedFunction { name: "now".into() },
        });
        let s = structured(None, Some(tools()), Some(named), Some(false)).expect("named");
        assert_eq!(s.tools.map(|t| (t.mode, t.parallel)), Some((ToolMode::Named("now".into()), false)));
        assert!(structured(None, None, Some(ToolChoice::Mode("auto".into())), None).expect("no tools").tools.is_none());
    }

    #[test]
    fn refusals_name_the_parameter() {
        let required = || Some(ToolChoice::Mode("required".into()));
        assert_eq!(param(structured(None, None, required(), None)), "tool_choice");
        assert_eq!(param(structured(None, Some(tools()), Some(ToolChoice::Mode("maybe".into())), None)), "tool_choice");
        let missing = ToolChoice::Named(NamedToolChoice {
            kind: "function".into(),
            function: NamedFunction { name: "fly".into() },
        });
        assert_eq!(param(structured(None, Some(tools()), Some(missing), None)), "tool_choice.function.name");
        let bad_name = vec![json!({"type": "function", "function": {"name": "a b"}})];
        assert_eq!(param(structured(None, Some(bad_name), None, None)), "tools[0].function.name");
        let twice = vec![tools()[1].clone(), tools()[1].clone()];
        assert_eq!(param(structured(None, Some(twice), None, None)), "tools[1].function.name");
        let other = vec![json!({"type": "retrieval"})];
        assert_eq!(param(structured(None, Some(other), None, None)), "tools[0]");
        let params = vec![json!({"type": "function", "function": {"name": "f", "parameters": 3}})];
        assert_eq!(param(structured(None, Some(params), None, None)), "tools[0]");
        let schema = |s| {
            Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat { name: None, description: None, schema: s, strict: None },
            })
        };
        assert_eq!(param(structured(schema(None), None, None, None)), "response_format.json_schema.schema");
        assert_eq!(param(structured(schema(Some(json!(5))), None, None, None)), "response_format.json_schema.schema");
        assert_eq!(
            param(structured(Some(ResponseFormat::JsonObject), Some(tools()), required(), None)),
            "response_format"
        );
    }
}
