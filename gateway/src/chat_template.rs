//! Chat templates exactly as checkpoints ship them (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja plus Python string methods, with the options
//! transformers uses (`trim_blocks`, `lstrip_blocks`), its `tojson` filter, and its `tools` variable.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue};
use serde::Serialize;
use serde_json::Value;

use crate::openai::Message;
use crate::openai::request::{ContentPart, MessageContent};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The checkpoint's template: `chat_template.jinja` when present (transformers prefers it),
    /// else `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of
    /// which `default` is used).
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            std::fs::read_to_string(&jinja_path).with_context(|| format!("{}", jinja_path.display()))?
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_owned)
                    .context("tokenizer_config.json: chat_template list has no `default` entry")?,
                _ => bail!("{} has no chat template (chat_template.jinja or tokenizer_config.json)", dir.display()),
            }
        };
        let bos_token = match config.get("bos_token") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_owned(),
            _ => String::new(),
        };
        Self::new(source, bos_token)
    }

    pub fn new(source: String, bos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .context("jinja syntax config")?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<JinjaValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", source).context("chat template does not compile")?;
        Ok(ChatTemplate { env, bos_token })
    }

    /// Renders OpenAI-style `messages` (`[{"role": ..., "content": ...}]`): the gateway's typed
    /// messages, or JSON as it is.
    pub fn render<M: serde::Serialize + ?Sized>(&self, messages: &M, add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with `tools` (the request's tool definitions as sent), as transformers'
    /// `apply_chat_template(messages, tools=...)` renders them: `None` leaves `tools` undefined.
    pub fn render_with_tools<M: serde::Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => JinjaValue::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
        };
        let ctx = match tools {
            Some(tools) => {
                minijinja::context! { tools => JinjaValue::from(minijinja::value::Serde(tools)), ..ctx }
            }
            None => ctx,
        };
        template.render(ctx).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))
    }

    /// Where in `rendered` (the rendering of `messages`) the template placed each image part: byte
    /// ranges, one per image part, in order.
    ///
    /// Found by position, not by content, so that a user who types the placeholder text (`<|image|>`)
    /// cannot add, remove or reorder an image: the conversation is rendered a second time with each
    /// image part replaced by a unique text marker that no message contains; the text between the
    /// markers must be exactly the text around the placeholders of the first rendering, and every
    /// image must have rendered as the same placeholder text. A template that drops, repeats or
    /// numbers its image placeholders is refused.
    pub fn image_placeholders(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        rendered: &str,
    ) -> Result<Vec<Range<usize>>> {
        let images = messages.iter().map(|m| image_parts(m).count()).sum::<usize>();
        if images == 0 {
            return Ok(Vec::new());
        }
        // Private-use characters, lengthened until nothing in the conversation contains the marker
        // (every message's text is in `rendered`).
        let mut marker = String::from("\u{E000}epserve-image");
        while rendered.contains(&marker) {
            marker.push('\u{E000}');
        }
        let mark = |k: usize| format!("{marker}{k}\u{E001}");
        let mut k = 0;
        let marked: Vec<Message> = messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(MessageContent::Parts(parts)) = &mut m.content {
                    for part in parts.iter_mut().filter(|p| matches!(p, ContentPart::ImageUrl { .. })) {
                        *part = ContentPart::Text { text: mark(k) };
                        k += 1;
                    }
                }
                m
            })
            .collect();
        let with_marks = self.render_with_tools(&marked, tools, true)?;
        let mut segments = Vec::with_capacity(images + 1);
        let mut rest = with_marks.as_str();
        for k in 0..images {
            let m = mark(k);
            let at = rest.find(&m).with_context(|| format!("the chat template dropped image part {k}"))?;
            segments.push(&rest[..at]);
            rest = &rest[at + m.len()..];
        }
        if rest.contains(&marker) {
            bail!("the chat template repeats an image part");
        }
        segments.push(rest);
        let text_len: usize = segments.iter().map(|s| s.len()).sum();
        let placeholder_len =
            rendered.len().checked_sub(text_len).filter(|extra| extra % images == 0).map(|e| e / images);
        let placeholder = placeholder_len
            .filter(|&len| len > 0)
            .and_then(|len| rendered.get(segments[0].len()..segments[0].len() + len))
            .context("the chat template does not render image parts as a placeholder")?;
        let mut spans = Vec::with_capacity(images);
        let mut at = 0;
        for (k, segment) in segments.iter().enumerate() {
            let in_place = rendered.get(at..at + segment.len()) == Some(*segment);
            at += segment.len();
            if k < images {
                if !in_place || rendered.get(at..at + placeholder.len()) != Some(placeholder) {
                    bail!("the chat template does not render every image part as the same placeholder, in place");
                }
                spans.push(at..at + placeholder.len());
                at += placeholder.len();
            } else if !in_place || at != rendered.len() {
                bail!("the chat template does not render image parts in place");
            }
        }
        Ok(spans)
    }
}

/// transformers' `tojson` (`json.dumps(x, ensure_ascii=False, indent=indent)`), not minijinja's, which
/// escapes `<`, `>`, `&` and `'` and writes no spaces: templates render tools and tool calls with it,
/// and the prompt must be the one the model was trained on. Python's layout is `", "` and `": "`
/// without an indent, `","` and newlines with one.
fn python_tojson(value: &JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&spaces),
            );
            value.serialize(&mut ser)
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonCompact)),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(JinjaValue::from_safe_string(text))
}

/// Python's `json.dumps` layout without an indent: `{"a": 1, "b": [1, 2]}`.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn image_parts(message: &Message) -> impl Iterator<Item = &ContentPart> {
    let parts = match &message.content {
        Some(MessageContent::Parts(parts)) => parts.as_slice(),
        _ => &[],
    };
    parts.iter().filter(|p| matches!(p, ContentPart::ImageUrl { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rendering equals what transformers produced for the fixture, byte for byte.
    #[test]
    fn renders_the_golden_conversations() {
        let dir = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4);
        let template = ChatTemplate::from_checkpoint(&dir).expect("template");
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden/chat.json")).expect("read")).expect("json");
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
        let conversations = golden["conversations"].as_array().expect("list");
        assert!(conversations.len() >= 3);
        for c in conversations {
            let add = c["add_generation_prompt"].as_bool().unwrap_or(true);
            let rendered = template.render(&c["messages"], add).expect("render");
            assert_eq!(rendered, c["prompt"].as_str().expect("prompt"));
            // The rendered text starts with BOS already: no special tokens on top.
            let ids = tokenizer.encode(rendered, false).expect("encode").get_ids().to_vec();
            let expected: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).expect("ids");
            assert_eq!(ids, expected);
        }
    }
}
