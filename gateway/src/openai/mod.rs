//! The OpenAI wire format: request bodies (`request`), their validation into what the gateway acts
//! on (`validation`), and response bodies and stream chunks (`response`), all serde types.
//!
//! A body is read with `parse_body`, which keeps the path of the field that failed to deserialise, so
//! that a wrong type is a 400 naming the parameter (`"param": "messages[0].role"`), as OpenAI answers.

pub mod request;
pub mod response;
pub mod structured;
pub mod validation;

use serde::de::{DeserializeOwned, IgnoredAny};

use crate::errors::ApiError;

pub use request::{ChatCompletionRequest, CompletionRequest, Message};
pub use validation::{CompletionPrompt, GenerationOptions, Sampling, ValidatedChat, ValidatedCompletion};

/// Deserialises a request body, or answers with the 400 OpenAI gives for it.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde reads a struct from an array too (fields by position): only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(not_an_object(body));
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize(&mut json) {
        Ok(request) => {
            json.end().map_err(|e| not_json(&e))?;
            Ok(request)
        }
        Err(e) => Err(field_error(body, e)),
    }
}

fn field_error(body: &[u8], e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    // Whether the body is JSON at all is only known by reading it to the end; and serde_json reports
    // some type errors (an enum given a number) as syntax errors, so its category cannot tell.
    if let Err(syntax) = serde_json::from_slice::<IgnoredAny>(body) {
        return not_json(&syntax);
    }
    let param = e.path().to_string();
    let e = e.into_inner();
    // The position is the body's, useless next to the parameter's name.
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let reason = text.strip_suffix(&position).unwrap_or(&text);
    ApiError::invalid(Some(param.clone()), format!("Invalid '{param}': {reason}."))
}

fn not_an_object(body: &[u8]) -> ApiError {
    match serde_json::from_slice::<IgnoredAny>(body) {
        Ok(_) => ApiError::invalid(None, "The request body must be a JSON object."),
        Err(e) => not_json(&e),
    }
}

fn not_json(e: &serde_json::Error) -> ApiError {
    ApiError::invalid(None, format!("The body is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::request::{ContentPart, MessageContent, Prompt, Role, Stop};
    use super::*;

    fn chat(body: Value) -> Result<ValidatedChat, ApiError> {
        ValidatedChat::try_from(parse_body::<ChatCompletionRequest>(body.to_string().as_bytes())?)
    }

    fn completion(body: Value) -> Result<ValidatedCompletion, ApiError> {
        ValidatedCompletion::try_from(parse_body::<CompletionRequest>(body.to_string().as_bytes())?)
    }

    fn param<T: std::fmt::Debug>(r: Result<T, ApiError>) -> Option<String> {
        let e = r.expect_err("invalid");
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{e:?}");
        assert_eq!(e.error_type, "invalid_request_error");
        e.param
    }

    fn chat_with(field: &str, value: Value) -> Result<ValidatedChat, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body[field] = value;
        chat(body)
    }

    #[test]
    fn chat_fields_and_errors() {
        let ok = chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
            "max_tokens": 9, "temperature": 0, "stop": ["a", "b"], "seed": 3, "logprobs": true,
            "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true},
            "some_future_field": {"x": 1}, "user": 7, "tools": [], "top_p": null
        }))
        .expect("valid");
        let sampling = &ok.options.sampling;
        assert_eq!(sampling.max_tokens, Some(5), "max_completion_tokens wins over max_tokens");
        assert_eq!(sampling.logprobs, Some(2));
        assert_eq!(sampling.temperature, 0.0);
        assert_eq!(sampling.top_p, 1.0, "null is the default");
        assert_eq!(sampling.seed, Some(3));
        assert!(ok.options.stream && ok.options.include_usage);
        assert_eq!(chat_with("seed", json!(-1)).expect("negative seed").options.sampling.seed, Some(u64::MAX));
        assert_eq!(chat_with("logprobs", json!(true)).expect("logprobs").options.sampling.logprobs, Some(0));

        assert_eq!(param(chat_with("temperature", json!("hot"))).as_deref(), Some("temperature"));
        assert_eq!(param(chat_with("temperature", json!(3))).as_deref(), Some("temperature"));
        assert_eq!(param(chat_with("temperature", json!(2.0000001))).as_deref(), Some("temperature"));
        assert_eq!(param(chat_with("top_p", json!(0))).as_deref(), Some("top_p"));
        assert_eq!(param(chat_with("n", json!(2))).as_deref(), Some("n"));
        assert_eq!(param(chat_with("stop", json!(["a", "b", "c", "d", "e"]))).as_deref(), Some("stop"));
        assert_eq!(param(chat_with("top_logprobs", json!(3))).as_deref(), Some("top_logprobs"));
        assert_eq!(param(chat_with("max_tokens", json!(0))).as_deref(), Some("max_tokens"));
        assert_eq!(param(chat_with("max_tokens", json!(1u64 << 33))).as_deref(), Some("max_tokens"));
        assert_eq!(param(chat_with("seed", json!(1.5))).as_deref(), Some("seed"));
        assert_eq!(param(chat_with("stream", json!("yes"))).as_deref(), Some("stream"));
        assert_eq!(
            param(chat_with("stream_options", json!({"include_usage": true}))).as_deref(),
            Some("stream_options")
        );
        assert_eq!(
            param(chat_with("stream_options", json!({"include_usage": 1}))).as_deref(),
            Some("stream_options.include_usage")
        );
        assert_eq!(param(chat_with("messages", json!([]))).as_deref(), Some("messages"));
        assert_eq!(param(chat_with("messages", json!("hi"))).as_deref(), Some("messages"));
        assert_eq!(param(chat(json!({"messages": []}))).as_deref(), Some("model"));
        assert_eq!(param(chat(json!({"model": 3, "messages": []}))).as_deref(), Some("model"));
        assert_eq!(param(chat(json!({"model": "m"}))).as_deref(), Some("messages"));
    }

    /// A type error's message names the parameter and what was expected, without the body's position.
    #[test]
    fn type_errors_read_well() {
        let e = chat_with("top_p", json!("high")).expect_err("string top_p");
        assert_eq!(e.message, "Invalid 'top_p': invalid type: string \"high\", expected f64.");
        let e = chat_with("stop", json!(5)).expect_err("number stop");
        assert_eq!(e.message, "Invalid 'stop': expected a string or an array of strings.");
        let e = chat_with("messages", json!([{"role": "wizard", "content": "x"}])).expect_err("role");
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert_eq!(
            e.message,
            "Invalid 'messages[0].role': invalid value: string \"wizard\", expected one of system, user, assistant, tool, ipython."
        );

        for not_object in [&b"[1, 2]"[..], b" [\"m\", [], 5]", b"\"m\"", b"null"] {
            let e = parse_body::<ChatCompletionRequest>(not_object).expect_err("not an object");
            assert_eq!((e.param, e.message.as_str()), (None, "The request body must be a JSON object."));
        }
        for bad in [&b"{not json"[..], b"", b"[1", b"{\"model\": \"m\"} trailing", b"{\"model\": 5,"] {
            let e = parse_body::<ChatCompletionRequest>(bad).expect_err("not JSON");
            assert!(e.param.is_none() && e.message.starts_with("The body is not valid JSON"), "{e:?}");
        }
    }

    #[test]
    fn stop_as_string_or_list() {
        assert_eq!(chat_with("stop", json!("END")).expect("string").options.sampling.stop, ["END"]);
        assert_eq!(chat_with("stop", json!(["a", "b"])).expect("list").options.sampling.stop, ["a", "b"]);
        assert!(chat_with("stop", json!(null)).expect("null").options.sampling.stop.is_empty());
        assert_eq!(param(chat_with("stop", json!(["a", 1]))).as_deref(), Some("stop"));
        let parsed: Stop = serde_json::from_value(json!([])).expect("empty list");
        assert_eq!(parsed, Stop::Many(Vec::new()));
    }

    #[test]
    fn messages_roles_and_content_parts() {
        let ok = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "extra": 1}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "ipython", "content": "43"},
        ]}))
        .expect("valid");
        let roles: Vec<_> = ok.messages.iter().map(|m| m.role).collect();
        let expected = [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Ipython];
        assert_eq!(roles, expected.map(Some));
        assert_eq!(
            ok.messages[1].content,
            Some(MessageContent::Parts(vec![
                ContentPart::Text { text: "a".into() },
                ContentPart::Text { text: "b".into() }
            ]))
        );
        // The chat template sees each message with the fields it came with.
        assert_eq!(
            serde_json::to_value(&ok.messages[3]).expect("serialise"),
            json!({"role": "tool", "content": "42", "tool_call_id": "c1"})
        );
        assert_eq!(
            serde_json::to_value(&ok.messages[1]).expect("serialise")["content"],
            json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
        );

        let one = |message: Value| chat_with("messages", json!([{"role": "user", "content": "x"}, message]));
        let image = |role: &str, detail: Value| {
            json!({"role": role, "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": detail}},
            ]})
        };
        let ok = one(image("user", json!("high"))).expect("an image in a user message");
        let Some(MessageContent::Parts(parts)) = &ok.messages[1].content else { panic!("parts") };
        assert!(
            matches!(&parts[1], ContentPart::ImageUrl { image_url } if image_url.detail.as_deref() == Some("high"))
        );
        // The template sees an image part as `{"type": "image"}`, never its URL.
        assert_eq!(
            serde_json::to_value(&ok.messages[1]).expect("serialise")["content"],
            json!([{"type": "text", "text": "a"}, {"type": "image"}])
        );
        assert!(one(image("user", Value::Null)).is_ok());
        for role in ["system", "assistant"] {
            let e = one(image(role, Value::Null)).expect_err("an image outside a user message");
            assert_eq!(e.param.as_deref(), Some("messages[1].content[1]"));
            assert!(e.message.contains("only allowed in user messages"), "{}", e.message);
        }
        let e = one(image("user", json!("ultra"))).expect_err("detail");
        assert_eq!((e.param.as_deref(), e.message.contains("'detail'")), (Some("messages[1].content[1]"), true));
        for bad_part in [json!({"type": "image_url"}), json!({"type": "image_url", "image_url": {"url": 5}})] {
            let e = one(json!({"role": "user", "content": [bad_part]})).expect_err("malformed image part");
            assert!(e.param.as_deref().is_some_and(|p| p.starts_with("messages[1].content[0]")), "{e:?}");
        }
        assert_eq!(
            param(one(json!({"role": "user", "content": [{"type": "image"}]}))).as_deref(),
            Some("messages[1].content[0]")
        );
        assert_eq!(
            param(one(json!({"role": "user", "content": [{"type": "audio", "x": 1}]}))).as_deref(),
            Some("messages[1].content[0]")
        );
        assert_eq!(
            param(one(json!({"role": "user", "content": [{"type": "text", "text": 5}]}))).as_deref(),
            Some("messages[1].content[0]")
        );
        assert_eq!(param(one(json!({"role": "user", "content": ["text"]}))).as_deref(), Some("messages[1].content[0]"));
        assert_eq!(param(one(json!({"role": "user", "content": 5}))).as_deref(), Some("messages[1].content"));
        assert_eq!(param(one(json!({"role": "user"}))).as_deref(), Some("messages[1].content"));
        assert_eq!(param(one(json!({"role": "assistant", "content": null}))).as_deref(), Some("messages[1].content"));
        assert_eq!(param(one(json!({"content": "x"}))).as_deref(), Some("messages[1].role"));
        assert_eq!(param(one(json!({"role": 1, "content": "x"}))).as_deref(), Some("messages[1].role"));
        assert_eq!(param(one(json!("hello"))).as_deref(), Some("messages[1]"));
    }

    #[test]
    fn structured_output_fields() {
        use super::structured::{OutputFormat, ToolMode};
        let format = |value: Value| chat_with("response_format", value).map(|r| r.options.structured.format);
        assert_eq!(format(json!({"type": "text"})).expect("text"), OutputFormat::Text);
        assert_eq!(format(json!({"type": "json_object"})).expect("object"), OutputFormat::JsonObject);
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            format(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}))
                .expect("schema"),
            OutputFormat::JsonSchema(schema)
        );
        assert_eq!(param(format(json!({"type": "xml"}))).as_deref(), Some("response_format.type"));
        assert_eq!(param(format(json!({"type": "json_schema"}))).as_deref(), Some("response_format"));
        let e = completion(json!({"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}))
            .expect("an extension of the text API");
        assert_eq!(e.options.structured.format, OutputFormat::JsonObject);

        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
                              "tool_choice": "required", "parallel_tool_calls": false});
        let r = chat(body.clone()).expect("tools");
        let plan = r.options.structured.tools.expect("a plan");
        assert_eq!((plan.mode, plan.parallel, plan.definitions.len()), (ToolMode::Required, false, 1));
        body["tool_choice"] = json!({"type": "function", "function": {"name": "f"}});
        assert!(chat(body.clone()).is_ok());
        body["tool_choice"] = json!(7);
        assert_eq!(param(chat(body)).as_deref(), Some("tool_choice"));

        // An assistant turn's arguments string becomes the object the template writes.
        let ok = chat_with(
            "messages",
            json!([{"role": "user", "content": "x"},
                   {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                        "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "2"}]),
        )
        .expect("valid");
        assert_eq!(
            serde_json::to_value(&ok.messages[1]).expect("json")["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        let bad = chat_with(
            "messages",
            json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]),
        );
        assert_eq!(param(bad).as_deref(), Some("messages[0].tool_calls[0].function.arguments"));
    }

    #[test]
    fn completion_prompts() {
        let r = completion(json!({"model": "m", "prompt": "hello"})).expect("valid");
        assert_eq!(r.prompt, CompletionPrompt::Text("hello".into()));
        assert_eq!(r.options.sampling.max_tokens, Some(16), "OpenAI's default for completions");
        let r = completion(json!({"model": "m", "prompt": ["hello"], "max_tokens": 3})).expect("one string");
        assert_eq!((r.prompt, r.options.sampling.max_tokens), (CompletionPrompt::Text("hello".into()), Some(3)));
        let r = completion(json!({"model": "m", "prompt": [1, 2, 3], "logprobs": 2})).expect("tokens");
        assert_eq!((r.prompt, r.options.sampling.logprobs), (CompletionPrompt::Tokens(vec![1, 2, 3]), Some(2)));
        // The completions API has no max_completion_tokens: ignored like any unknown field.
        let r = completion(json!({"model": "m", "prompt": "x", "max_completion_tokens": 0})).expect("ignored");
        assert_eq!(r.options.sampling.max_tokens, Some(16));

        let parsed: Prompt = serde_json::from_value(json!([[1, 2], [3]])).expect("token batches");
        assert_eq!(parsed, Prompt::TokenBatches(vec![vec![1, 2], vec![3]]));
        for batch in [json!(["a", "b"]), json!([[1, 2], [3]]), json!([[1, 2]]), json!([])] {
            let e = completion(json!({"model": "m", "prompt": batch})).expect_err("batch");
            assert_eq!(e.param.as_deref(), Some("prompt"));
            assert!(e.message.contains("batches are not supported"), "{}", e.message);
        }
        let too_large = json!([4_294_967_297u64]);
        for wrong in [json!(5), json!([1, "a"]), json!([-1]), json!([1.5]), json!({"text": "x"}), too_large] {
            let e = completion(json!({"model": "m", "prompt": wrong})).expect_err("wrong type");
            assert_eq!(e.param.as_deref(), Some("prompt"), "{e:?}");
            assert!(e.message.contains("expected a string"), "{}", e.message);
        }
        assert_eq!(param(completion(json!({"model": "m"}))).as_deref(), Some("prompt"));
        assert_eq!(param(completion(json!({"model": "m", "prompt": "x", "echo": true}))).as_deref(), Some("echo"));
        assert_eq!(
            param(completion(json!({"model": "m", "prompt": "x", "logprobs": 21}))).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param(completion(json!({"model": "m", "prompt": "x", "logprobs": true}))).as_deref(),
            Some("logprobs")
        );
        assert!(completion(json!({"model": "m", "prompt": "x", "echo": false})).is_ok());
    }
}
