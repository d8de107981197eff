//! A batch's input file, read and checked in full before the batch is accepted: one JSON request per
//! line, `{"custom_id", "method": "POST", "url", "body"}`, as OpenAI's Batch API takes it.
//!
//! Each line's `body` goes through the same parsing and validation as a direct request
//! ([`parse_body`] and the `TryFrom` of [`ValidatedChat`] / [`ValidatedCompletion`]), so that a line
//! is refused here exactly when the endpoint would refuse it, with the same message and `param`.
//! Beyond that, a batch line may not ask to stream (there is no connection to stream to), must name
//! the batch's endpoint, and its `custom_id` must be unique in the file.
//!
//! Every bad line is reported (up to [`MAX_REPORTED_ERRORS`]), each naming its 1-based line number,
//! as OpenAI's `errors.data` does; a file with any bad line starts no work.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::errors::ApiError;
use crate::openai::{ChatCompletionRequest, CompletionRequest, ValidatedChat, ValidatedCompletion, parse_body};

/// The largest input file, in bytes: OpenAI's limit (200 MB).
pub const MAX_INPUT_BYTES: usize = 200 * 1000 * 1000;
/// The most requests in one batch: OpenAI's limit.
pub const MAX_INPUT_LINES: usize = 50_000;
/// The most line errors listed for one file; the last entry says how many more there were.
pub const MAX_REPORTED_ERRORS: usize = 1_000;

/// The endpoint a batch's lines call (one per batch, as in OpenAI's API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/completions")]
    Completions,
}

impl Endpoint {
    pub fn from_url(url: &str) -> Option<Self> {
        match url {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// One checked line of the input file.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    /// 1-based line number in the input file.
    pub line: usize,
    pub custom_id: String,
    pub request: LineRequest,
}

/// A line's body, validated as the endpoint validates it.
#[derive(Debug, Clone, PartialEq)]
pub enum LineRequest {
    Chat(Box<ValidatedChat>),
    Completion(Box<ValidatedCompletion>),
}

/// One entry of a batch's `errors.data` (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file; `None` for an error about the file as a whole.
    pub line: Option<usize>,
}

impl LineError {
    fn file(code: &str, message: impl Into<String>) -> Self {
        LineError { code: code.into(), message: message.into(), param: None, line: None }
    }

    fn line(line: usize, code: &str, param: Option<String>, message: impl Into<String>) -> Self {
        LineError { code: code.into(), message: message.into(), param, line: Some(line) }
    }
}

/// The envelope of a line, before its body is read.
#[derive(Deserialize)]
struct Envelope {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    body: Option<serde_json::Value>,
}

/// Reads and checks a whole input file for a batch on `endpoint`: every line, or every error.
pub fn parse_input(content: &[u8], endpoint: Endpoint) -> Result<Vec<BatchLine>, Vec<LineError>> {
    parse_input_with(content, endpoint, &|_| Ok(()))
}

/// [`parse_input`], each valid body also passed to `check` (the gateway's own checks of a request:
/// the served model, its request limits), whose refusal is the line's error.
pub fn parse_input_with(
    content: &[u8],
    endpoint: Endpoint,
    check: &(dyn Fn(&LineRequest) -> Result<(), ApiError> + Sync),
) -> Result<Vec<BatchLine>, Vec<LineError>> {
    if content.len() > MAX_INPUT_BYTES {
        return Err(vec![LineError::file(
            "file_too_large",
            format!("The input file is {} bytes; the limit is {MAX_INPUT_BYTES}.", content.len()),
        )]);
    }
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut more_errors = 0usize;
    let mut seen = HashSet::new();
    let mut requests = 0usize;
    for (index, raw) in content.split(|b| *b == b'\n').enumerate() {
        let number = index + 1;
        // Blank lines (a trailing newline, `\r\n` endings) carry no request.
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        requests += 1;
        match parse_line(raw, number, endpoint, &mut seen, check) {
            Ok(line) => lines.push(line),
            Err(error) if errors.len() < MAX_REPORTED_ERRORS => errors.push(error),
            Err(_) => more_errors += 1,
        }
    }
    if requests == 0 {
        errors.push(LineError::file("empty_file", "The input file contains no requests."));
    }
    if requests > MAX_INPUT_LINES {
        errors.push(LineError::file(
            "too_many_requests",
            format!("The input file has {requests} requests; the limit is {MAX_INPUT_LINES}."),
        ));
    }
    if more_errors > 0 {
        errors.push(LineError::file("too_many_errors", format!("{more_errors} more lines have errors.")));
    }
    if errors.is_empty() { Ok(lines) } else { Err(errors) }
}

fn parse_line(
    raw: &[u8],
    number: usize,
    endpoint: Endpoint,
    seen: &mut HashSet<String>,
    check: &(dyn Fn(&LineRequest) -> Result<(), ApiError> + Sync),
) -> Result<BatchLine, LineError> {
    let envelope: Envelope = serde_json::from_slice(raw).map_err(|e| {
        LineError::line(number, "invalid_json_line", None, format!("Line {number} is not a valid request object: {e}."))
    })?;
    let custom_id = envelope.custom_id.filter(|id| !id.is_empty()).ok_or_else(|| missing(number, "custom_id"))?;
    let method = envelope.method.ok_or_else(|| missing(number, "method"))?;
    if method != "POST" {
        return Err(LineError::line(
            number,
            "invalid_method",
            Some("method".into()),
            format!("Line {number}: method must be POST, not '{method}'."),
        ));
    }
    let url = envelope.url.ok_or_else(|| missing(number, "url"))?;
    if Endpoint::from_url(&url) != Some(endpoint) {
        return Err(LineError::line(
            number,
            "mismatched_url",
            Some("url".into()),
            format!("Line {number}: url '{url}' is not the batch's endpoint {}.", endpoint.as_str()),
        ));
    }
    let body = envelope.body.ok_or_else(|| missing(number, "body"))?;
    let body = serde_json::to_vec(&body).expect("a JSON value serialises");
    let request = validate_body(&body, endpoint).and_then(|r| check(&r).map(|()| r)).map_err(|e| {
        let param = e.param.map(|p| format!("body.{p}"));
        LineError::line(number, "invalid_request", param, format!("Line {number}: {}", e.message))
    })?;
    let streams = match &request {
        LineRequest::Chat(chat) => chat.options.stream,
        LineRequest::Completion(completion) => completion.options.stream,
    };
    if streams {
        return Err(LineError::line(
            number,
            "invalid_request",
            Some("body.stream".into()),
            format!("Line {number}: a batch request cannot stream; remove 'stream' or set it to false."),
        ));
    }
    if !seen.insert(custom_id.clone()) {
        return Err(LineError::line(
            number,
            "duplicate_custom_id",
            Some("custom_id".into()),
            format!("Line {number}: custom_id '{custom_id}' is used by an earlier line; each must be unique."),
        ));
    }
    Ok(BatchLine { line: number, custom_id, request })
}

/// The direct endpoint's own parsing and validation of a body.
fn validate_body(body: &[u8], endpoint: Endpoint) -> Result<LineRequest, ApiError> {
    Ok(match endpoint {
        Endpoint::ChatCompletions => {
            let request: ChatCompletionRequest = parse_body(body)?;
            LineRequest::Chat(Box::new(ValidatedChat::try_from(request)?))
        }
        Endpoint::Completions => {
            let request: CompletionRequest = parse_body(body)?;
            LineRequest::Completion(Box::new(ValidatedCompletion::try_from(request)?))
        }
    })
}

fn missing(number: usize, field: &str) -> LineError {
    LineError::line(number, "missing_field", Some(field.into()), format!("Line {number}: '{field}' is required."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_line(id: &str, extra: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4{extra}}}}}"#
        )
    }

    #[test]
    fn good_file_is_read_in_order_with_line_numbers() {
        let file = format!("{}\n{}\n\n", chat_line("a", ""), chat_line("b", r#","temperature":0"#));
        let lines = parse_input(file.as_bytes(), Endpoint::ChatCompletions).expect("valid");
        assert_eq!(lines.iter().map(|l| (l.line, l.custom_id.as_str())).collect::<Vec<_>>(), [(1, "a"), (2, "b")]);
        let LineRequest::Chat(chat) = &lines[1].request else { panic!("not chat") };
        assert_eq!(chat.options.sampling.max_tokens, Some(4));
    }

    #[test]
    fn every_bad_line_is_named() {
        let file = [
            chat_line("ok", ""),
            "not json".to_owned(),
            chat_line("s", r#","stream":true"#),
            chat_line("ok", ""),
            chat_line("t", r#","temperature":"hot""#),
            r#"{"custom_id":"u","method":"POST","url":"/v1/completions","body":{"model":"m","prompt":"x"}}"#.to_owned(),
            r#"{"custom_id":"g","method":"GET","url":"/v1/chat/completions","body":{}}"#.to_owned(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.to_owned(),
        ]
        .join("\n");
        let errors = parse_input(file.as_bytes(), Endpoint::ChatCompletions).expect_err("refused");
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.code.as_str(), e.param.as_deref())).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line", None),
                (Some(3), "invalid_request", Some("body.stream")),
                (Some(4), "duplicate_custom_id", Some("custom_id")),
                (Some(5), "invalid_request", Some("body.temperature")),
                (Some(6), "mismatched_url", Some("url")),
                (Some(7), "invalid_method", Some("method")),
                (Some(8), "missing_field", Some("custom_id")),
            ]
        );
        assert!(errors.iter().all(|e| e.message.starts_with(&format!("Line {}", e.line.expect("valid")))));
    }

    #[test]
    fn body_errors_are_the_endpoints_own() {
        // The direct endpoint's message for a missing 'messages', prefixed with the line.
        let line = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#;
        let errors = parse_input(line.as_bytes(), Endpoint::ChatCompletions).expect_err("refused");
        let direct = validate_body(br#"{"model":"m"}"#, Endpoint::ChatCompletions).expect_err("refused");
        assert_eq!(errors[0].message, format!("Line 1: {}", direct.message));
        assert_eq!(errors[0].param.as_deref(), Some("body.messages"));
    }

    #[test]
    fn the_gateways_own_checks_name_their_lines_among_the_others() {
        let file = [chat_line("a", ""), "{".to_owned(), chat_line("b", "").replace(r#""model":"m""#, r#""model":"x""#)]
            .join("\n");
        let served = |r: &LineRequest| match r {
            LineRequest::Chat(c) if c.model != "m" => Err(ApiError::model_not_found(&c.model, "m")),
            _ => Ok(()),
        };
        let errors = parse_input_with(file.as_bytes(), Endpoint::ChatCompletions, &served).expect_err("refused");
        let got: Vec<_> = errors.iter().map(|e| (e.line, e.param.as_deref())).collect();
        assert_eq!(got, [(Some(2), None), (Some(3), Some("body.model"))]);
        assert!(errors[1].message.starts_with("Line 3: The model `x`"), "{}", errors[1].message);
        assert!(parse_input_with(chat_line("a", "").as_bytes(), Endpoint::ChatCompletions, &served).is_ok());
    }

    #[test]
    fn empty_and_oversized_files_are_refused() {
        let errors = parse_input(b"\n \n", Endpoint::Completions).expect_err("refused");
        assert_eq!(errors[0].code, "empty_file");
        let line = r#"{"custom_id":"x","method":"POST","url":"/v1/completions","body":{"model":"m","prompt":"x"}}"#;
        let mut file = String::new();
        for i in 0..=MAX_INPUT_LINES {
            file.push_str(&line.replace("\"x\",\"method", &format!("\"{i}\",\"method")));
            file.push('\n');
        }
        let errors = parse_input(file.as_bytes(), Endpoint::Completions).expect_err("refused");
        assert_eq!(errors.last().expect("valid").code, "too_many_requests");
    }
}
