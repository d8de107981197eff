//! A conversation with tools, calls and tool results renders exactly as transformers'
//! `apply_chat_template` renders it (tests/fixtures/tool-chat/golden.json, made by
//! scripts/make-template-fixtures): the request goes through the gateway's own parsing and
//! validation (call `arguments` strings become objects) and the checkpoint's template.

use epserve_gateway::TextCodec;
use epserve_gateway::chat_template::ChatTemplate;
use epserve_gateway::openai::{ChatCompletionRequest, ValidatedChat, parse_body};
use epserve_testkit::fixtures;
use serde_json::{Value, json};

#[test]
fn tool_conversations_render_as_transformers_renders_them() {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4);
    let template = ChatTemplate::from_checkpoint(&dir).expect("template");
    let codec = TextCodec::from_checkpoint(&dir).expect("codec");
    let path = fixtures::root().join("tool-chat/golden.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let conversations = golden["conversations"].as_array().expect("conversations");
    assert_eq!(conversations.len(), 3);
    for c in conversations {
        let mut body = c["request"].clone();
        body["model"] = json!("tiny");
        let request: ChatCompletionRequest = parse_body(body.to_string().as_bytes()).expect("parses");
        let chat = ValidatedChat::try_from(request).expect("valid");
        let tools = chat.options.structured.tools.as_ref().map(|t| t.definitions.as_slice());
        assert!(tools.is_some(), "tool_choice defaults to auto: the tools are rendered");
        let rendered = template.render_with_tools(&chat.messages, tools, true).expect("renders");
        assert_eq!(rendered, c["prompt"].as_str().expect("prompt"), "{}", c["name"]);
        let ids: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).expect("ids");
        assert_eq!(codec.encode_chat_with_tools(&chat.messages, tools).expect("encodes").ids, ids, "{}", c["name"]);
    }
}
