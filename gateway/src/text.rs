//! Text on the gateway's side of the wire: the checkpoint's tokenizer and chat template, incremental
//! detokenization that never emits a broken UTF-8 sequence, and stop strings matched on the text
//! (across token boundaries).

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result};
use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::openai::Message;

/// A conversation, rendered and tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    /// The tokens of each image placeholder the template emitted, one range per image part, in order.
    pub image_placeholders: Vec<Range<usize>>,
}

#[derive(Debug)]
pub struct TextCodec {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl TextCodec {
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let template = match ChatTemplate::from_checkpoint(dir) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("no chat template, /v1/chat/completions will refuse requests: {e:#}");
                None
            }
        };
        Ok(TextCodec { tokenizer, template })
    }

    /// Renders the conversation with the checkpoint's template and tokenizes it without adding
    /// special tokens (the template starts with BOS already). Image parts reach the template as
    /// `{"type": "image"}`; where it placed each one is found by position (see
    /// [`ChatTemplate::image_placeholders`]), never by looking for a token a user could type.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<ChatTokens> {
        self.encode_chat_with_tools(messages, None)
    }

    /// [`Self::encode_chat`] with the request's tool definitions given to the template.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<ChatTokens> {
        let template = self.template.as_ref().context("this checkpoint has no chat template")?;
        let text = template.render_with_tools(messages, tools, true)?;
        let spans = template.image_placeholders(messages, tools, &text)?;
        if spans.is_empty() {
            return Ok(ChatTokens { ids: self.encode(&text, false)?, image_placeholders: Vec::new() });
        }
        let encoding = self.tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let offsets = encoding.get_offsets();
        let image_placeholders = spans
            .iter()
            .map(|span| {
                let first = offsets.iter().position(|&(start, _)| start == span.start);
                let last = offsets.iter().rposition(|&(_, end)| end == span.end);
                match (first, last) {
                    (Some(first), Some(last))
                        if first <= last
                            && offsets[first..=last].iter().all(|&(s, e)| s >= span.start && e <= span.end) =>
                    {
                        Ok(first..last + 1)
                    }
                    _ => anyhow::bail!(
                        "the chat template's image placeholder {:?} does not tokenize apart from its neighbours",
                        &text[span.clone()]
                    ),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ChatTokens { ids: encoding.get_ids().to_vec(), image_placeholders })
    }

    /// Tokenizes a plain prompt, with the tokenizer's BOS.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    /// The id of a token given by its text (`<|patch|>`), when the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The text of one token on its own, for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    pub fn decoder(&self) -> Detokenizer<'_> {
        Detokenizer { tokenizer: &self.tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }
}

/// Turns a stream of token ids into text pieces. Text is only released once it decodes to complete
/// characters: a multi-byte character split over two tokens comes out whole, with the second.
#[derive(Debug)]
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context (byte-level BPE needs the previous token).
    prefix: usize,
    /// Tokens whose text has been released.
    read: usize,
}

impl Detokenizer<'_> {
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_owned();
            self.prefix = self.read;
            self.read = self.ids.len();
            piece
        } else {
            String::new()
        }
    }
}

/// Holds back text that could be the start of a stop string; reports the first stop found.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can go to the client now.
    pub emit: String,
    /// A stop string was found: `emit` ends right before it, and generation must end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome { emit: std::mem::take(&mut self.pending), stopped: false };
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let emit = self.pending[..at].to_owned();
            self.pending.clear();
            return StopOutcome { emit, stopped: true };
        }
        // Keep the longest tail that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let emit = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopOutcome { emit, stopped: false }
    }

    /// The text held back, once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
    }

    /// Multi-byte characters split over several byte-level tokens come out whole, never as U+FFFD.
    #[test]
    fn streaming_never_breaks_utf8() {
        let codec = TextCodec::from_checkpoint(&fixture()).expect("codec");
        let text = "naïve café — 日本語 👋🏽 done";
        let ids = codec.encode(text, false).expect("encode");
        assert!(ids.len() > text.chars().count() / 2, "multi-byte characters span several tokens");
        let mut decoder = codec.decoder();
        let mut out = String::new();
        for id in ids {
            let piece = decoder.push(id);
            assert!(!piece.contains('\u{FFFD}'), "broken UTF-8 released: {piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }

    /// The typed messages a request is read into render exactly as the JSON they came from: the
    /// golden conversations give transformers' tokens.
    #[test]
    fn typed_messages_render_the_golden_prompts() {
        let codec = TextCodec::from_checkpoint(&fixture()).expect("codec");
        let golden = std::fs::read_to_string(fixture().join("golden/chat.json")).expect("golden");
        let golden: serde_json::Value = serde_json::from_str(&golden).expect("json");
        let mut checked = 0;
        for c in golden["conversations"].as_array().expect("list") {
            let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).expect("messages");
            let text_only = messages.iter().all(|m| match &m.content {
                Some(crate::openai::request::MessageContent::Parts(parts)) => {
                    parts.iter().all(|p| matches!(p, crate::openai::request::ContentPart::Text { .. }))
                }
                _ => true,
            });
            if !text_only || c["add_generation_prompt"] == serde_json::Value::Bool(false) {
                continue; // The gateway refuses images, and always adds the generation prompt.
            }
            let expected: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).expect("ids");
            assert_eq!(codec.encode_chat(&messages).expect("encode").ids, expected);
            checked += 1;
        }
        assert!(checked >= 2, "only {checked} text conversations");
    }

    /// Image parts render as the template's own placeholder (the golden conversation with an image),
    /// and each image's placeholder is found where the template put it, not where `<|image|>` appears:
    /// typed placeholder text is text.
    #[test]
    fn image_placeholders_are_found_by_position() {
        let codec = TextCodec::from_checkpoint(&fixture()).expect("codec");
        let golden = std::fs::read_to_string(fixture().join("golden/chat.json")).expect("golden");
        let golden: serde_json::Value = serde_json::from_str(&golden).expect("json");
        let with_image = golden["conversations"]
            .as_array()
            .expect("list")
            .iter()
            .find(|c| c["messages"].to_string().contains(r#""type":"image""#))
            .expect("a golden conversation with an image");
        let mut messages = with_image["messages"].clone();
        for part in messages[0]["content"].as_array_mut().expect("parts") {
            if part["type"] == "image" {
                *part = serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}});
            }
        }
        let messages: Vec<Message> = serde_json::from_value(messages).expect("messages");
        let chat = codec.encode_chat(&messages).expect("encode");
        let expected: Vec<u32> = serde_json::from_value(with_image["input_ids"].clone()).expect("ids");
        assert_eq!(chat.ids, expected);
        let image = codec.token_id("<|image|>").expect("<|image|>");
        let at = expected.iter().position(|&t| t == image).expect("placeholder");
        assert_eq!(chat.image_placeholders, vec![Range { start: at, end: at + 1 }]);

        let typed: Vec<Message> = serde_json::from_value(serde_json::json!([{"role": "user", "content": [
            {"type": "text", "text": "<|image|> typed, then "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            {"type": "text", "text": " and <|image|> again"},
        ]}]))
        .expect("messages");
        let chat = codec.encode_chat(&typed).expect("encode");
        let all: Vec<usize> = chat.ids.iter().enumerate().filter(|&(_, &t)| t == image).map(|(i, _)| i).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(
            chat.image_placeholders,
            vec![Range { start: all[1], end: all[1] + 1 }],
            "the middle one is the image"
        );
    }

    #[test]
    fn stop_string_split_across_pieces_is_honoured() {
        let mut m = StopMatcher::new(vec!["STOP here".into(), "\n\n".into()]);
        let mut emitted = String::new();
        let mut stopped = false;
        for piece in ["Hello", " wor", "ld ST", "OP h", "ere and more"] {
            let out = m.push(piece);
            emitted.push_str(&out.emit);
            if out.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(emitted, "Hello world ");
        let mut m = StopMatcher::new(vec!["xyz".into()]);
        assert_eq!(m.push("abcxy").emit, "abc", "a possible stop prefix is held back");
        assert_eq!(m.push("q").emit, "xyq");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_string_over_real_tokens() {
        let codec = TextCodec::from_checkpoint(&fixture()).expect("codec");
        let ids = codec.encode("The answer is 42. Then more text.", false).expect("encode");
        let mut decoder = codec.decoder();
        let mut m = StopMatcher::new(vec!["42.".into()]);
        let mut emitted = String::new();
        for id in ids {
            let out = m.push(&decoder.push(id));
            emitted.push_str(&out.emit);
            if out.stopped {
                break;
            }
        }
        assert_eq!(emitted, "The answer is ");
    }
}
