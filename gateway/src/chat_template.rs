//! Chat templates exactly as checkpoints ship them (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja plus Python string methods, with the options
//! transformers uses (`trim_blocks`, `lstrip_blocks`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue};
use serde_json::Value;

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
        env.add_template_owned("chat", source).context("chat template does not compile")?;
        Ok(ChatTemplate { env, bos_token })
    }

    /// Renders OpenAI-style `messages` (`[{"role": ..., "content": ...}]`): the gateway's typed
    /// messages, or JSON as it is.
    pub fn render<M: serde::Serialize + ?Sized>(&self, messages: &M, add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => JinjaValue::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
        };
        template.render(ctx).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))
    }
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
