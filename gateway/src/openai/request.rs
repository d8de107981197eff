//! The bodies of `POST /v1/chat/completions` and `POST /v1/completions` as they arrive, in OpenAI's
//! names and shapes. Deserialising checks JSON types only; ranges and combinations are checked once,
//! in `validation.rs`. Every field is optional here (a JSON `null` is the same as an absent field), so
//! that a missing field is reported by validation with OpenAI's wording rather than serde's. Fields
//! not listed (`logit_bias`, ...) are ignored, as OpenAI ignores unknown ones.

use std::fmt;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::openai::structured::{ResponseFormat, ToolChoice};

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    /// Alternatives per token (0 to 20); only with `logprobs: true`.
    pub top_logprobs: Option<u32>,
    pub n: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM's name).
    pub top_k: Option<u32>,
    /// Extension (vLLM's name).
    pub min_p: Option<f64>,
    pub seed: Option<Seed>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Extension (vLLM's name).
    pub repetition_penalty: Option<f64>,
    /// Extension (vLLM's name).
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Accepted whatever its value, and not used.
    pub user: Option<IgnoredAny>,
    /// Text, any JSON object, or a document of a JSON schema (enforced by a grammar).
    pub response_format: Option<ResponseFormat>,
    /// Function tools, kept as sent: the chat template renders them as the client wrote them.
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
}

/// `POST /v1/completions` (the legacy text API).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u32>,
    /// Legacy format: the number of alternatives per token (0 to 20).
    pub logprobs: Option<u32>,
    /// Refused when true: the prompt is not sent back.
    pub echo: Option<bool>,
    pub n: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub min_p: Option<f64>,
    pub seed: Option<Seed>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Accepted whatever its value, and not used.
    pub user: Option<IgnoredAny>,
    /// Extension: chat's `response_format` on the text API (docs/structured-outputs.md).
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// OpenAI documents the seed as an integer; negative ones are taken as their two's complement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "expected an integer")]
pub enum Seed {
    Unsigned(u64),
    Signed(i64),
}

impl Seed {
    pub fn as_u64(self) -> u64 {
        match self {
            Seed::Unsigned(x) => x,
            Seed::Signed(x) => x as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "expected a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Every shape OpenAI accepts for `prompt`; validation says which ones this gateway serves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a string, an array of strings, an array of token ids or an array of token-id arrays"
)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenBatches(Vec<Vec<u32>>),
}

/// One turn of a conversation. It is handed to the checkpoint's chat template as it came (serialised
/// back with the fields it had), so the template can read what OpenAI clients send beyond role and
/// content (`name`, `tool_call_id`, ...).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Message {
    /// Optional only so that validation can name `messages[i].role` when it is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// An assistant turn's calls, as clients send them back; an assistant turn with tool calls
    /// needs no content. Validation turns `arguments` strings into objects for the template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<AssistantToolCall>>,
    #[serde(flatten)]
    pub other_fields: Map<String, Value>,
}

/// A call in an assistant turn of the conversation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AssistantToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: CalledFunction,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CalledFunction {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Arguments>,
}

/// OpenAI sends a call's arguments as a JSON string; Hugging Face templates (Llama 4's writes them
/// with `tojson`) expect the object, as vLLM gives them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged, expecting = "expected a JSON object or a string holding one")]
pub enum Arguments {
    Object(Map<String, Value>),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
    /// Llama 3's and 4's name for tool results.
    Ipython,
}

impl Role {
    const ALL: [Role; 5] = [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Ipython];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Ipython => "ipython",
        }
    }
}

/// By hand: serde_json reports a derived enum given a number as a syntax error ("expected value"),
/// and an unknown role should list the known ones.
impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Role::ALL.into_iter().find(|r| r.as_str() == name).ok_or_else(|| {
            de::Error::invalid_value(de::Unexpected::Str(&name), &"one of system, user, assistant, tool, ipython")
        })
    }
}

/// A message's `content`: a string, or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Written by hand rather than `#[serde(untagged)]`: an untagged enum reports a bad part as a bad
/// `content`, this names the part (`messages[0].content[2]`).
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageContent, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(MessageContent::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

/// One part of a message's content. Serialised for the chat template, an image part is
/// `{"type": "image"}` (what Hugging Face templates test for; the URL, possibly megabytes of base64,
/// never reaches the template).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    /// Any other `type`: refused by validation.
    #[serde(other)]
    Unsupported,
}

/// `{"url": "data:image/png;base64,..." | "https://...", "detail": "auto" | "low" | "high"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    /// Accepted and checked, not used: the checkpoint's image processor decides the resolution.
    pub detail: Option<String>,
}

impl Serialize for ContentPart {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self {
            ContentPart::Text { text } => {
                map.serialize_entry("type", "text")?;
                map.serialize_entry("text", text)?;
            }
            ContentPart::ImageUrl { .. } => map.serialize_entry("type", "image")?,
            // Refused by validation before any template sees it.
            ContentPart::Unsupported => map.serialize_entry("type", "unsupported")?,
        }
        map.end()
    }
}
