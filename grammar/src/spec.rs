//! What a request asks its output to follow, as it travels from the gateway to the coordinator:
//! a JSON schema or a lark grammar, both as text (the cache key is that text).

use llguidance::api::TopLevelGrammar;
use serde_json::{Map, Value};

use crate::errors::GrammarError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrammarKind {
    /// A JSON schema; `{"type": "object"}` for "any JSON object".
    JsonSchema,
    /// A grammar in llguidance's lark dialect, which may embed JSON schemas (`%json {...}`).
    Lark,
}

impl GrammarKind {
    /// Label value for `epserve_constrained_requests_total` (a closed set).
    pub fn label(self) -> &'static str {
        match self {
            GrammarKind::JsonSchema => "json_schema",
            GrammarKind::Lark => "lark",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrammarSpec {
    pub kind: GrammarKind,
    pub text: String,
}

impl GrammarSpec {
    pub fn json_schema(text: impl Into<String>) -> Self {
        GrammarSpec { kind: GrammarKind::JsonSchema, text: text.into() }
    }

    pub fn lark(text: impl Into<String>) -> Self {
        GrammarSpec { kind: GrammarKind::Lark, text: text.into() }
    }

    /// llguidance's form of the grammar. A JSON schema gets the output layout of
    /// [`json_schema_for_lark`].
    pub(crate) fn to_llguidance(&self) -> Result<TopLevelGrammar, GrammarError> {
        match self.kind {
            GrammarKind::JsonSchema => {
                let schema: Value = serde_json::from_str(&self.text)
                    .map_err(|e| GrammarError::Invalid(format!("the schema is not JSON: {e}")))?;
                Ok(TopLevelGrammar::from_json_schema(with_layout(schema)?))
            }
            GrammarKind::Lark => Ok(TopLevelGrammar::from_lark(self.text.clone())),
        }
    }
}

/// `schema` with the layout every JSON output of epserve has, for embedding in a lark grammar as
/// `%json <this>`: no free whitespace (a model that may emit any amount of it can emit it forever,
/// and a random-weight one does), items separated by `", "` and keys by `": "` — the layout of
/// Python's `json.dumps`, which is how Llama 4's chat template writes tool calls back.
pub fn json_schema_for_lark(schema: Value) -> Result<String, GrammarError> {
    Ok(with_layout(schema)?.to_string())
}

/// Sets llguidance's layout options (its `x-guidance` key) on a schema, replacing any the schema had:
/// the layout is the server's choice, not the client's.
fn with_layout(schema: Value) -> Result<Value, GrammarError> {
    let mut schema = match schema {
        Value::Object(map) => map,
        // `true` is the schema that accepts anything; `false` accepts nothing.
        Value::Bool(true) => Map::new(),
        other => {
            return Err(GrammarError::Invalid(format!("a JSON schema must be an object, got {other}")));
        }
    };
    let mut layout = Map::new();
    layout.insert("whitespace_flexible".into(), Value::Bool(false));
    layout.insert("item_separator".into(), Value::String(", ".into()));
    layout.insert("key_separator".into(), Value::String(": ".into()));
    schema.insert("x-guidance".into(), Value::Object(layout));
    Ok(Value::Object(schema))
}
