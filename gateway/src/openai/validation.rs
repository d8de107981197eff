//! Validation, once, on receipt: a request as deserialised (`request.rs`) becomes what the gateway
//! acts on, or an OpenAI-style 400 that names the parameter (`param`) and says what is wrong with it.

use std::ops::RangeInclusive;

use crate::errors::ApiError;
use crate::openai::request::{
    Arguments, ChatCompletionRequest, CompletionRequest, ContentPart, ImageUrl, Message, MessageContent, Prompt, Role,
    Seed, Stop, StreamOptions,
};
use crate::openai::structured::{self, Structured};

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

/// How the answer is asked for, beyond its input.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    pub sampling: Sampling,
    /// `response_format` and tools: the grammar the output follows, whether it is read as calls.
    pub structured: Structured,
    pub stream: bool,
    /// A last stream chunk with the token counts (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// A chat completion request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedChat {
    pub model: String,
    /// Non-empty, every one with a known role, and image parts only in user messages.
    pub messages: Vec<Message>,
    pub options: GenerationOptions,
}

/// The prompt of a text completion, in the forms this gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A text completion request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedCompletion {
    pub model: String,
    pub prompt: CompletionPrompt,
    pub options: GenerationOptions,
}

impl TryFrom<ChatCompletionRequest> for ValidatedChat {
    type Error = ApiError;

    fn try_from(request: ChatCompletionRequest) -> Result<Self, ApiError> {
        // Destructured in full, so that a field added to the request cannot be forgotten here.
        let ChatCompletionRequest {
            model,
            messages,
            max_tokens,
            max_completion_tokens,
            logprobs,
            top_logprobs,
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stop,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ignore_eos,
            stream,
            stream_options,
            user: _,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
        } = request;
        let model = required_model(model)?;
        let mut messages =
            messages.ok_or_else(|| ApiError::invalid_param("messages", "You must provide 'messages'."))?;
        check_messages(&mut messages)?;
        let structured = structured::structured(response_format, tools, tool_choice, parallel_tool_calls)?;
        let top_logprobs = integer("top_logprobs", top_logprobs, 0..=20)?;
        let logprobs = match (logprobs.unwrap_or(false), top_logprobs) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' requires 'logprobs' to be true."));
            }
        };
        let max_tokens = integer("max_tokens", max_tokens, 1..=u32::MAX)?;
        let max_completion_tokens = integer("max_completion_tokens", max_completion_tokens, 1..=u32::MAX)?;
        let sampling = SamplingFields {
            max_tokens: max_completion_tokens.or(max_tokens),
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stop,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ignore_eos,
            logprobs,
        }
        .validate()?;
        Ok(ValidatedChat { model, messages, options: options(sampling, structured, stream, stream_options)? })
    }
}

impl TryFrom<CompletionRequest> for ValidatedCompletion {
    type Error = ApiError;

    fn try_from(request: CompletionRequest) -> Result<Self, ApiError> {
        let CompletionRequest {
            model,
            prompt,
            max_tokens,
            logprobs,
            echo,
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stop,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ignore_eos,
            stream,
            stream_options,
            user: _,
            response_format,
        } = request;
        let model = required_model(model)?;
        let structured = Structured { format: structured::output_format(response_format)?, tools: None };
        let prompt = match prompt {
            Some(Prompt::Text(text)) => CompletionPrompt::Text(text),
            Some(Prompt::Texts(texts)) if texts.len() == 1 => {
                CompletionPrompt::Text(texts.into_iter().next().unwrap_or_default())
            }
            Some(Prompt::Tokens(ids)) if !ids.is_empty() => CompletionPrompt::Tokens(ids),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "'prompt' must be a string, a list of one string, or a list of token ids (batches are not supported).",
                ));
            }
            None => return Err(ApiError::invalid_param("prompt", "You must provide a 'prompt'.")),
        };
        if echo == Some(true) {
            return Err(ApiError::invalid_param("echo", "'echo' is not supported."));
        }
        let logprobs = integer("logprobs", logprobs, 0..=20)?;
        let sampling = SamplingFields {
            // The completions API's documented default.
            max_tokens: Some(integer("max_tokens", max_tokens, 1..=u32::MAX)?.unwrap_or(16)),
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stop,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ignore_eos,
            logprobs,
        }
        .validate()?;
        Ok(ValidatedCompletion { model, prompt, options: options(sampling, structured, stream, stream_options)? })
    }
}

fn required_model(model: Option<String>) -> Result<String, ApiError> {
    model.ok_or_else(|| ApiError::invalid_param("model", "You must provide a model parameter."))
}

fn options(
    sampling: Sampling,
    structured: Structured,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
) -> Result<GenerationOptions, ApiError> {
    let stream = stream.unwrap_or(false);
    let include_usage = stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    if include_usage && !stream {
        return Err(ApiError::invalid_param("stream_options", "stream_options is only allowed when 'stream' is true."));
    }
    Ok(GenerationOptions { sampling, structured, stream, include_usage })
}

/// The sampling fields both APIs share, as they came (`max_tokens` and `logprobs` already resolved,
/// since the two APIs spell them differently).
struct SamplingFields {
    max_tokens: Option<u32>,
    n: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    min_p: Option<f64>,
    seed: Option<Seed>,
    stop: Option<Stop>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    ignore_eos: Option<bool>,
    logprobs: Option<u32>,
}

impl SamplingFields {
    fn validate(self) -> Result<Sampling, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid_param("n", format!("Only n = 1 is supported, got {n}.")));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(list)) if list.len() > 4 => {
                return Err(ApiError::invalid_param("stop", format!("At most 4 stop sequences, got {}.", list.len())));
            }
            Some(Stop::Many(list)) => list,
        };
        Ok(Sampling {
            max_tokens: self.max_tokens,
            temperature: number("temperature", self.temperature, 0.0..=2.0)?.unwrap_or(1.0),
            top_p: match number("top_p", self.top_p, 0.0..=1.0)? {
                Some(0.0) => return Err(ApiError::invalid_param("top_p", "'top_p' must be greater than 0.")),
                Some(p) => p,
                None => 1.0,
            },
            top_k: self.top_k.unwrap_or(0),
            min_p: number("min_p", self.min_p, 0.0..=1.0)?.unwrap_or(0.0),
            seed: self.seed.map(Seed::as_u64),
            stop,
            presence_penalty: number("presence_penalty", self.presence_penalty, -2.0..=2.0)?.unwrap_or(0.0),
            frequency_penalty: number("frequency_penalty", self.frequency_penalty, -2.0..=2.0)?.unwrap_or(0.0),
            repetition_penalty: match number("repetition_penalty", self.repetition_penalty, 0.0..=10.0)? {
                Some(0.0) => {
                    return Err(ApiError::invalid_param("repetition_penalty", "'repetition_penalty' must be > 0."));
                }
                Some(r) => r,
                None => 1.0,
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: self.logprobs,
        })
    }
}

/// Checked in f64, as sent, before narrowing: 2.0000001 is out of 0..=2 even though it rounds to 2 in f32.
fn number(param: &str, value: Option<f64>, range: RangeInclusive<f64>) -> Result<Option<f32>, ApiError> {
    match value {
        Some(x) if !range.contains(&x) => Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be between {} and {}, got {x}.", range.start(), range.end()),
        )),
        other => Ok(other.map(|x| x as f32)),
    }
}

fn integer(param: &str, value: Option<u32>, range: RangeInclusive<u32>) -> Result<Option<u32>, ApiError> {
    match value {
        Some(x) if !range.contains(&x) => Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be an integer between {} and {}, got {x}.", range.start(), range.end()),
        )),
        other => Ok(other),
    }
}

fn check_messages(messages: &mut [Message]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "'messages' must not be empty."));
    }
    for (i, m) in messages.iter_mut().enumerate() {
        for (j, call) in m.tool_calls.iter_mut().flatten().enumerate() {
            if let Some(Arguments::Text(text)) = &call.function.arguments {
                let object = serde_json::from_str(text).map_err(|e| {
                    let param = format!("messages[{i}].tool_calls[{j}].function.arguments");
                    ApiError::invalid(Some(param), format!("A call's 'arguments' must be a JSON object: {e}."))
                })?;
                call.function.arguments = Some(Arguments::Object(object));
            }
        }
        if m.role.is_none() {
            return Err(ApiError::invalid(Some(format!("messages[{i}].role")), "Each message needs a 'role'."));
        }
        match &m.content {
            None if m.tool_calls.is_some() => {}
            None => {
                return Err(ApiError::invalid(Some(format!("messages[{i}].content")), "Each message needs 'content'."));
            }
            Some(MessageContent::Text(_)) => {}
            Some(MessageContent::Parts(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let message = match part {
                        ContentPart::Text { .. } => continue,
                        ContentPart::ImageUrl { image_url } => match image_part_problem(m.role, image_url) {
                            None => continue,
                            Some(problem) => problem,
                        },
                        ContentPart::Unsupported => {
                            "Each content part needs a 'type' of 'text' (with a string 'text') \
                                                     or 'image_url' (with an 'image_url' object)."
                                .to_owned()
                        }
                    };
                    return Err(ApiError::invalid(Some(format!("messages[{i}].content[{j}]")), message));
                }
            }
        }
    }
    Ok(())
}

/// What is wrong with an image part before anything is fetched or decoded: images belong in user
/// turns (as in OpenAI's API: a system or assistant image has no meaning to the model's template),
/// and `detail` has OpenAI's three values.
fn image_part_problem(role: Option<Role>, image_url: &ImageUrl) -> Option<String> {
    if let Some(role) = role
        && role != Role::User
    {
        return Some(format!("Image parts are only allowed in user messages, not in a '{}' message.", role.as_str()));
    }
    match image_url.detail.as_deref() {
        None | Some("auto" | "low" | "high") => None,
        Some(other) => Some(format!("'detail' must be 'auto', 'low' or 'high', got '{other}'.")),
    }
}
