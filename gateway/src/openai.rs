//! OpenAI request bodies, parsed field by field so that a wrong type or an out-of-range value is
//! answered with the name of the parameter (`param`), as OpenAI does. Unknown fields are ignored.

use serde_json::{Map, Value};

use crate::errors::ApiError;

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub ignore_eos: bool,
    /// Top alternatives per token when logprobs are asked (`Some(0)` = only the chosen token).
    pub logprobs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Value,
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
}

struct Body<'a>(&'a Map<String, Value>);

fn type_error(param: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid_param(param, format!("Invalid type for '{param}': expected {expected}, but got {got}."))
}

impl<'a> Body<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(type_error(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_error(key, "a boolean", v)),
        }
    }

    fn number(&self, key: &str, range: std::ops::RangeInclusive<f64>) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !range.contains(&x) {
                    return Err(ApiError::invalid_param(
                        key,
                        format!("'{key}' must be between {} and {}, got {x}.", range.start(), range.end()),
                    ));
                }
                Ok(Some(x as f32))
            }
            Some(v) => Err(type_error(key, "a number", v)),
        }
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::invalid_param(
                    key,
                    format!("'{key}' must be an integer between {min} and {max}, got {n}."),
                )),
            },
            Some(v) => Err(type_error(key, "an integer", v)),
        }
    }
}

fn object(body: &Value) -> Result<Body<'_>, ApiError> {
    match body {
        Value::Object(map) => Ok(Body(map)),
        _ => Err(ApiError::invalid(None, "The request body must be a JSON object.")),
    }
}

fn model(b: &Body<'_>) -> Result<String, ApiError> {
    b.string("model")?.ok_or_else(|| ApiError::invalid_param("model", "You must provide a model parameter."))
}

fn stream_options(b: &Body<'_>) -> Result<(bool, bool), ApiError> {
    let stream = b.bool("stream")?.unwrap_or(false);
    let include_usage = match b.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(x)) => *x,
            Some(v) => return Err(type_error("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(type_error("stream_options", "an object", v)),
    };
    if include_usage && !stream {
        return Err(ApiError::invalid_param("stream_options", "stream_options is only allowed when 'stream' is true."));
    }
    Ok((stream, include_usage))
}

fn sampling(b: &Body<'_>, max_tokens_key: &[&str], logprobs: Option<u32>) -> Result<Sampling, ApiError> {
    if let Some(n) = b.integer("n", 0, u64::MAX)?
        && n != 1
    {
        return Err(ApiError::invalid_param("n", format!("Only n = 1 is supported, got {n}.")));
    }
    let mut max_tokens = None;
    for key in max_tokens_key {
        if let Some(v) = b.integer(key, 1, u64::from(u32::MAX))? {
            max_tokens = Some(v as u32);
        }
    }
    let stop = match b.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > 4 {
                return Err(ApiError::invalid_param("stop", format!("At most 4 stop sequences, got {}.", items.len())));
            }
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| type_error("stop", "a string or an array of strings", v))
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(type_error("stop", "a string or an array of strings", v)),
    };
    Ok(Sampling {
        max_tokens,
        temperature: b.number("temperature", 0.0..=2.0)?.unwrap_or(1.0),
        top_p: match b.number("top_p", 0.0..=1.0)? {
            Some(0.0) => return Err(ApiError::invalid_param("top_p", "'top_p' must be greater than 0.")),
            Some(p) => p,
            None => 1.0,
        },
        top_k: b.integer("top_k", 0, u64::from(u32::MAX))?.unwrap_or(0) as u32,
        min_p: b.number("min_p", 0.0..=1.0)?.unwrap_or(0.0),
        seed: match b.get("seed") {
            None => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .or_else(|| n.as_i64().map(|x| x as u64))
                    .ok_or_else(|| ApiError::invalid_param("seed", "'seed' must be an integer."))?,
            ),
            Some(v) => return Err(type_error("seed", "an integer", v)),
        },
        stop,
        presence_penalty: b.number("presence_penalty", -2.0..=2.0)?.unwrap_or(0.0),
        frequency_penalty: b.number("frequency_penalty", -2.0..=2.0)?.unwrap_or(0.0),
        repetition_penalty: match b.number("repetition_penalty", 0.0..=10.0)? {
            Some(0.0) => {
                return Err(ApiError::invalid_param("repetition_penalty", "'repetition_penalty' must be > 0."));
            }
            Some(r) => r,
            None => 1.0,
        },
        ignore_eos: b.bool("ignore_eos")?.unwrap_or(false),
        logprobs,
    })
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "ipython"];

fn check_messages(messages: &Value) -> Result<(), ApiError> {
    let list = match messages {
        Value::Array(list) if !list.is_empty() => list,
        Value::Array(_) => return Err(ApiError::invalid_param("messages", "'messages' must not be empty.")),
        v => return Err(type_error("messages", "an array", v)),
    };
    for (i, m) in list.iter().enumerate() {
        let param = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(m) = m else { return Err(type_error(&format!("messages[{i}]"), "an object", m)) };
        match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
            Some(Value::String(r)) => {
                return Err(ApiError::invalid(
                    Some(param("role")),
                    format!("Unsupported role '{r}'; expected one of {ROLES:?}."),
                ));
            }
            Some(v) => return Err(type_error(&param("role"), "a string", v)),
            None => return Err(ApiError::invalid(Some(param("role")), "Each message needs a 'role'.")),
        }
        match m.get("content") {
            None | Some(Value::Null) if m.contains_key("tool_calls") => {}
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") if part.get("text").is_some_and(Value::is_string) => {}
                        Some("image_url") | Some("image") => {
                            return Err(ApiError::invalid(
                                Some(format!("messages[{i}].content[{j}]")),
                                "Image inputs are not supported by this deployment yet.",
                            ));
                        }
                        _ => {
                            return Err(ApiError::invalid(
                                Some(format!("messages[{i}].content[{j}]")),
                                "Each content part needs a 'type' of 'text' with a string 'text'.",
                            ));
                        }
                    }
                }
            }
            Some(v) => return Err(type_error(&param("content"), "a string or an array of content parts", v)),
            None => return Err(ApiError::invalid(Some(param("content")), "Each message needs 'content'.")),
        }
    }
    Ok(())
}

pub fn parse_chat(body: &Value) -> Result<ChatRequest, ApiError> {
    let b = object(body)?;
    let model = model(&b)?;
    let messages =
        b.get("messages").ok_or_else(|| ApiError::invalid_param("messages", "You must provide 'messages'."))?;
    check_messages(messages)?;
    let logprobs = b.bool("logprobs")?.unwrap_or(false);
    let top = b.integer("top_logprobs", 0, 20)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' requires 'logprobs' to be true."));
    }
    let logprobs = logprobs.then(|| top.unwrap_or(0) as u32);
    let sampling = sampling(&b, &["max_tokens", "max_completion_tokens"], logprobs)?;
    let (stream, include_usage) = stream_options(&b)?;
    Ok(ChatRequest { model, messages: messages.clone(), sampling, stream, include_usage })
}

pub fn parse_completion(body: &Value) -> Result<CompletionRequest, ApiError> {
    let b = object(body)?;
    let model = model(&b)?;
    let prompt = match b.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Prompt::Text(items[0].as_str().unwrap_or_default().to_owned())
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            Prompt::Tokens(items.iter().filter_map(Value::as_u64).map(|x| x as u32).collect())
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "'prompt' must be a string, a list of one string, or a list of token ids (batches are not supported).",
            ));
        }
        Some(v) => return Err(type_error("prompt", "a string", v)),
        None => return Err(ApiError::invalid_param("prompt", "You must provide a 'prompt'.")),
    };
    if b.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid_param("echo", "'echo' is not supported."));
    }
    let logprobs = b.integer("logprobs", 0, 20)?.map(|x| x as u32);
    let mut sampling = sampling(&b, &["max_tokens"], logprobs)?;
    // The completions API's documented default.
    sampling.max_tokens.get_or_insert(16);
    let (stream, include_usage) = stream_options(&b)?;
    Ok(CompletionRequest { model, prompt, sampling, stream, include_usage })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err_param(r: Result<ChatRequest, ApiError>) -> Option<String> {
        r.expect_err("invalid").param
    }

    #[test]
    fn chat_fields_and_errors() {
        let ok = parse_chat(&json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
            "temperature": 0, "stop": ["a", "b"], "seed": 3, "logprobs": true, "top_logprobs": 2,
            "stream": true, "stream_options": {"include_usage": true}, "some_future_field": {"x": 1}
        }))
        .expect("valid");
        assert_eq!(ok.sampling.max_tokens, Some(5));
        assert_eq!(ok.sampling.logprobs, Some(2));
        assert!(ok.stream && ok.include_usage);
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            parse_chat(&b)
        };
        assert_eq!(err_param(with("temperature", json!("hot"))).as_deref(), Some("temperature"));
        assert_eq!(err_param(with("temperature", json!(3))).as_deref(), Some("temperature"));
        assert_eq!(err_param(with("n", json!(2))).as_deref(), Some("n"));
        assert_eq!(err_param(with("stop", json!(["a", "b", "c", "d", "e"]))).as_deref(), Some("stop"));
        assert_eq!(err_param(with("top_logprobs", json!(3))).as_deref(), Some("top_logprobs"));
        assert_eq!(err_param(with("max_tokens", json!(0))).as_deref(), Some("max_tokens"));
        assert_eq!(err_param(with("messages", json!([]))).as_deref(), Some("messages"));
        assert_eq!(
            err_param(with("messages", json!([{"role": "wizard", "content": "x"}]))).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(err_param(parse_chat(&json!({"messages": []}))).as_deref(), Some("model"));
    }

    #[test]
    fn completion_prompts() {
        let r = parse_completion(&json!({"model": "m", "prompt": "hello"})).expect("valid");
        assert_eq!(r.prompt, Prompt::Text("hello".into()));
        assert_eq!(r.sampling.max_tokens, Some(16));
        let r = parse_completion(&json!({"model": "m", "prompt": [1, 2, 3]})).expect("tokens");
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert!(parse_completion(&json!({"model": "m", "prompt": ["a", "b"]})).is_err());
    }
}
