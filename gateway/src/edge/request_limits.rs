//! Limits on a request's fields, checked right after validation and before any tokenizing or
//! templating: the body limit bounds the whole request, these bound the parts whose cost grows
//! faster than their bytes (a prompt is tokenized and templated; every stop string is matched
//! against the output as it streams).

use crate::errors::ApiError;
use crate::openai::request::{ContentPart, MessageContent};
use crate::openai::{CompletionPrompt, ValidatedChat, ValidatedCompletion};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Characters of prompt text: a completion's `prompt`, or the text of all chat messages together.
    pub max_prompt_chars: usize,
    /// Messages in one chat request.
    pub max_messages: usize,
    /// Characters in one stop string (there are at most 4, OpenAI's limit).
    pub max_stop_chars: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { max_prompt_chars: 1 << 20, max_messages: 2048, max_stop_chars: 1024 }
    }
}

impl RequestLimits {
    pub fn check_chat(&self, r: &ValidatedChat) -> Result<(), ApiError> {
        if r.messages.len() > self.max_messages {
            return Err(ApiError::invalid_param(
                "messages",
                format!("At most {} messages, got {}.", self.max_messages, r.messages.len()),
            ));
        }
        let mut chars = 0;
        for m in &r.messages {
            chars += match &m.content {
                None => 0,
                Some(MessageContent::Text(text)) => text.chars().count(),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => text.chars().count(),
                        _ => 0,
                    })
                    .sum(),
            };
            if chars > self.max_prompt_chars {
                return Err(self.prompt_too_long("messages"));
            }
        }
        self.check_stop(&r.options.sampling.stop)
    }

    pub fn check_completion(&self, r: &ValidatedCompletion) -> Result<(), ApiError> {
        if let CompletionPrompt::Text(text) = &r.prompt
            && text.chars().count() > self.max_prompt_chars
        {
            return Err(self.prompt_too_long("prompt"));
        }
        self.check_stop(&r.options.sampling.stop)
    }

    fn prompt_too_long(&self, param: &str) -> ApiError {
        ApiError::invalid_param(
            param,
            format!("The prompt is longer than this server's limit of {} characters.", self.max_prompt_chars),
        )
    }

    fn check_stop(&self, stop: &[String]) -> Result<(), ApiError> {
        match stop.iter().find(|s| s.chars().count() > self.max_stop_chars) {
            Some(s) => Err(ApiError::invalid_param(
                "stop",
                format!(
                    "Each stop sequence may be at most {} characters; one has {}.",
                    self.max_stop_chars,
                    s.chars().count()
                ),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::openai::{ChatCompletionRequest, CompletionRequest, parse_body};

    const LIMITS: RequestLimits = RequestLimits { max_prompt_chars: 10, max_messages: 2, max_stop_chars: 3 };

    fn chat(body: Value) -> Result<(), ApiError> {
        let r = parse_body::<ChatCompletionRequest>(body.to_string().as_bytes()).expect("parses");
        LIMITS.check_chat(&ValidatedChat::try_from(r).expect("valid"))
    }

    fn completion(body: Value) -> Result<(), ApiError> {
        let r = parse_body::<CompletionRequest>(body.to_string().as_bytes()).expect("parses");
        LIMITS.check_completion(&ValidatedCompletion::try_from(r).expect("valid"))
    }

    fn param(r: Result<(), ApiError>) -> Option<String> {
        r.expect_err("over a limit").param
    }

    #[test]
    fn each_limit_names_its_parameter() {
        let user = |text: &str| json!({"role": "user", "content": text});
        assert!(chat(json!({"model": "m", "messages": [user("0123456789")], "stop": "abc"})).is_ok());
        // Characters, not bytes: ten two-byte characters are ten.
        assert!(chat(json!({"model": "m", "messages": [user("éééééééééé")]})).is_ok());
        let over = json!({"model": "m", "messages": [user("01234"), user("567890")]});
        assert_eq!(param(chat(over)).as_deref(), Some("messages"));
        let parts = json!([{"type": "text", "text": "012345"}, {"type": "text", "text": "67890"}]);
        let over = json!({"model": "m", "messages": [{"role": "user", "content": parts}]});
        assert_eq!(param(chat(over)).as_deref(), Some("messages"));
        let many = json!({"model": "m", "messages": [user("a"), user("b"), user("c")]});
        assert_eq!(param(chat(many)).as_deref(), Some("messages"));
        let stop = json!({"model": "m", "messages": [user("a")], "stop": ["ab", "abcd"]});
        assert_eq!(param(chat(stop)).as_deref(), Some("stop"));

        assert!(completion(json!({"model": "m", "prompt": "0123456789"})).is_ok());
        assert_eq!(param(completion(json!({"model": "m", "prompt": "0123456789a"}))).as_deref(), Some("prompt"));
        assert_eq!(param(completion(json!({"model": "m", "prompt": "a", "stop": "abcd"}))).as_deref(), Some("stop"));
        // Token ids are bounded by the context length instead.
        assert!(completion(json!({"model": "m", "prompt": (0..100).collect::<Vec<u32>>()})).is_ok());
    }
}
