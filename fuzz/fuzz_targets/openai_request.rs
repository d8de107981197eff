//! A request body as the gateway receives it on `POST /v1/chat/completions` and
//! `POST /v1/completions`: parsed (`openai::parse_body`), validated (`TryFrom` into
//! `ValidatedChat` / `ValidatedCompletion`), the image parts of a valid chat read as the gateway
//! reads them before fetching or decoding (`images::source`), and the valid request rendered with
//! the chat template and tokenized (`TextCodec`, on the tiny fixture's tokenizer and template), as
//! the gateway does before sending it on.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use epserve_gateway::errors::ApiError;
use epserve_gateway::images::source::{ImageSource, decode_base64};
use epserve_gateway::openai::request::{ContentPart, MessageContent};
use epserve_gateway::openai::{
    ChatCompletionRequest, CompletionPrompt, CompletionRequest, ValidatedChat, ValidatedCompletion, parse_body,
};
use epserve_gateway::text::{StopMatcher, TextCodec};
use libfuzzer_sys::fuzz_target;

fn codec() -> &'static TextCodec {
    static CODEC: OnceLock<TextCodec> = OnceLock::new();
    CODEC.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama4");
        TextCodec::from_checkpoint(&dir).expect("the tiny-llama4 fixture's tokenizer and template")
    })
}

fuzz_target!(|body: &[u8]| {
    match parse_body::<ChatCompletionRequest>(body).and_then(ValidatedChat::try_from) {
        Ok(chat) => {
            images(&chat);
            let tools = chat.options.structured.tools.as_ref().map(|t| t.definitions.as_slice());
            // A template error is the gateway's 400 or 500 to give; a panic is not.
            let _ = codec().encode_chat_with_tools(&chat.messages, tools);
            stops(&chat.options.sampling.stop);
        }
        Err(e) => client_error(&e),
    }
    match parse_body::<CompletionRequest>(body).and_then(ValidatedCompletion::try_from) {
        Ok(completion) => {
            if let CompletionPrompt::Text(text) = &completion.prompt {
                let _ = codec().encode_prompt(text);
            }
            stops(&completion.options.sampling.stop);
        }
        Err(e) => client_error(&e),
    }
});

/// Everything wrong with a body is the client's: a 400 with a message, never a 5xx.
fn client_error(e: &ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    assert!(!e.message.is_empty());
}

fn images(chat: &ValidatedChat) {
    for m in &chat.messages {
        let Some(MessageContent::Parts(parts)) = &m.content else { continue };
        for part in parts {
            let ContentPart::ImageUrl { image_url } = part else { continue };
            for fetching in [false, true] {
                if let Ok(ImageSource::Base64(payload)) = ImageSource::parse(image_url.url.clone(), fetching) {
                    let _ = decode_base64(&payload, 1 << 16);
                }
            }
        }
    }
}

/// The request's stop strings against text streamed in pieces that split characters and stops.
fn stops(stop: &[String]) {
    if stop.is_empty() {
        return;
    }
    let mut matcher = StopMatcher::new(stop.to_vec());
    let text: String = stop.iter().flat_map(|s| [s.as_str(), "x"]).collect();
    // At most ~16 pieces: each push costs the length of the stops already.
    let step = (text.chars().count() / 16).max(1);
    let mut cut = 0;
    for (i, _) in text.char_indices().skip(1).step_by(step) {
        matcher.push(&text[cut..i]);
        cut = i;
    }
    matcher.push(&text[cut..]);
    matcher.finish();
}
