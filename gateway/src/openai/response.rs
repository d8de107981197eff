//! The bodies the gateway answers with, in OpenAI's shapes: whole completions, stream chunks (one
//! serialised per event, borrowing its text), usage, both logprob formats and the model list.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::openai::request::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model's end of sequence, or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The answer is one or more tool calls.
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A generated token with its log-probability and the likeliest alternatives: what both logprob
/// formats are made from.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    /// `None` when the coordinator did not compute it; sent as `null`.
    pub logprob: Option<f32>,
    pub top: Vec<(String, f32)>,
}

/// `POST /v1/chat/completions` without streaming.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

impl<'a> ChatCompletion<'a> {
    pub fn new(id: &'a str, created: u64, model: &'a str, choice: ChatChoice, usage: Usage) -> Self {
        ChatCompletion { id, object: "chat.completion", created, model, choices: vec![choice], usage }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: Role,
    /// `null` when the answer is tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call of one of the request's functions, as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments, a JSON object as a string.
    pub arguments: String,
}

/// A stream's piece of a tool call: the first names it (`id`, `type`, `function.name`), the next
/// ones add to `function.arguments`; `index` says which call.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

/// One event of a streamed chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// One choice; none in the last chunk, which carries the usage.
    pub choices: Vec<ChatChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl<'a> ChatCompletionChunk<'a> {
    pub fn new(id: &'a str, created: u64, model: &'a str, choice: ChatChunkChoice<'a>) -> Self {
        ChatCompletionChunk { id, object: "chat.completion.chunk", created, model, choices: vec![choice], usage: None }
    }

    pub fn usage(id: &'a str, created: u64, model: &'a str, usage: Usage) -> Self {
        ChatCompletionChunk {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            choices: Vec::new(),
            usage: Some(usage),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice<'a> {
    pub index: u32,
    pub delta: ChatDelta<'a>,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to the assistant's message; empty in the chunk that gives the finish reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

/// Chat logprobs: one entry per generated token.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: Option<f32>,
    /// The token's text as UTF-8 bytes (a token can end inside a character).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl From<Vec<TokenLogprob>> for ChatLogprobs {
    fn from(tokens: Vec<TokenLogprob>) -> Self {
        let content = tokens
            .into_iter()
            .map(|t| ChatTokenLogprob {
                bytes: t.token.as_bytes().to_vec(),
                token: t.token,
                logprob: t.logprob,
                top_logprobs: t
                    .top
                    .into_iter()
                    .map(|(token, logprob)| ChatTopLogprob { bytes: token.as_bytes().to_vec(), token, logprob })
                    .collect(),
            })
            .collect();
        ChatLogprobs { content }
    }
}

/// `POST /v1/completions`, whole or one stream event (the legacy API uses one shape for both).
#[derive(Debug, Clone, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// One choice; none in the stream's last chunk, which carries the usage.
    pub choices: Vec<CompletionChoice<'a>>,
    /// Always in a whole completion; in a stream, only in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl<'a> Completion<'a> {
    pub fn new(id: &'a str, created: u64, model: &'a str, choice: CompletionChoice<'a>, usage: Option<Usage>) -> Self {
        Completion { id, object: "text_completion", created, model, choices: vec![choice], usage }
    }

    pub fn usage(id: &'a str, created: u64, model: &'a str, usage: Usage) -> Self {
        Completion { id, object: "text_completion", created, model, choices: Vec::new(), usage: Some(usage) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// The legacy logprobs format: parallel lists, alternatives as `{token: logprob}` maps.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
}

impl From<Vec<TokenLogprob>> for CompletionLogprobs {
    fn from(tokens: Vec<TokenLogprob>) -> Self {
        let mut out = CompletionLogprobs {
            tokens: Vec::with_capacity(tokens.len()),
            token_logprobs: Vec::with_capacity(tokens.len()),
            top_logprobs: Vec::with_capacity(tokens.len()),
        };
        for t in tokens {
            out.tokens.push(t.token);
            out.token_logprobs.push(t.logprob);
            out.top_logprobs.push(t.top.into_iter().collect());
        }
        out
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

impl<'a> ModelList<'a> {
    /// The one model a gateway serves.
    pub fn single(id: &'a str, created: u64) -> Self {
        ModelList { object: "list", data: vec![ModelCard { id, object: "model", created, owned_by: "epserve" }] }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn logprobs() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob {
                token: "é".into(), logprob: Some(-0.5), top: vec![("é".into(), -0.5), ("a".into(), -1.0)]
            },
            TokenLogprob { token: "b".into(), logprob: None, top: Vec::new() },
        ]
    }

    #[test]
    fn chat_shapes() {
        let choice = ChatChoice {
            index: 0,
            message: AssistantMessage { role: Role::Assistant, content: Some("hi".into()), tool_calls: None },
            logprobs: Some(logprobs().into()),
            finish_reason: FinishReason::Length,
        };
        let whole = ChatCompletion::new("chatcmpl-1", 7, "m", choice, Usage::new(3, 2));
        assert_eq!(
            serde_json::to_value(&whole).expect("json"),
            json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length",
                    "logprobs": {"content": [
                        {"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [
                            {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                            {"token": "a", "logprob": -1.0, "bytes": [97]},
                        ]},
                        {"token": "b", "logprob": null, "bytes": [98], "top_logprobs": []},
                    ]},
                }],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            })
        );

        let first = ChatDelta { role: Some(Role::Assistant), content: Some(""), tool_calls: None };
        let chunk = |delta, finish_reason| {
            let choice = ChatChunkChoice { index: 0, delta, logprobs: None, finish_reason };
            serde_json::to_string(&ChatCompletionChunk::new("c", 7, "m", choice)).expect("json")
        };
        assert_eq!(
            chunk(first, None),
            r#"{"id":"c","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        assert!(
            chunk(ChatDelta::default(), Some(FinishReason::Stop))
                .contains(r#""delta":{},"logprobs":null,"finish_reason":"stop"}]}"#)
        );
        assert_eq!(
            serde_json::to_value(ChatCompletionChunk::usage("c", 7, "m", Usage::new(1, 1))).expect("json")["choices"],
            json!([])
        );
    }

    #[test]
    fn tool_call_shapes() {
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function",
            function: FunctionCall { name: "f".into(), arguments: "{\"x\": 1}".into() },
        };
        let message = AssistantMessage { role: Role::Assistant, content: None, tool_calls: Some(vec![call]) };
        assert_eq!(
            serde_json::to_value(&message).expect("json"),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
            ]})
        );
        assert_eq!(serde_json::to_value(FinishReason::ToolCalls).expect("json"), json!("tool_calls"));
        let delta = ChatDelta {
            role: None,
            content: None,
            tool_calls: Some(vec![ToolCallDelta {
                index: 0,
                id: None,
                kind: None,
                function: FunctionCallDelta { name: None, arguments: "{}" },
            }]),
        };
        assert_eq!(
            serde_json::to_value(&delta).expect("json"),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
        );
    }

    #[test]
    fn completion_shapes() {
        let choice = CompletionChoice {
            index: 0,
            text: "ab",
            logprobs: Some(logprobs().into()),
            finish_reason: Some(FinishReason::Stop),
        };
        let whole = Completion::new("cmpl-1", 7, "m", choice, Some(Usage::new(1, 2)));
        assert_eq!(
            serde_json::to_value(&whole).expect("json"),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{
                    "index": 0, "text": "ab", "finish_reason": "stop",
                    "logprobs": {
                        "tokens": ["é", "b"], "token_logprobs": [-0.5, null],
                        "top_logprobs": [{"é": -0.5, "a": -1.0}, {}],
                    },
                }],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            })
        );
        let chunk = Completion::new(
            "cmpl-1",
            7,
            "m",
            CompletionChoice { index: 0, text: "a", logprobs: None, finish_reason: None },
            None,
        );
        let chunk = serde_json::to_value(&chunk).expect("json");
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"][0]["finish_reason"], json!(null));
    }

    #[test]
    fn model_list_shape() {
        assert_eq!(
            serde_json::to_value(ModelList::single("tiny", 5)).expect("json"),
            json!({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 5, "owned_by": "epserve"}]})
        );
    }
}
