//! The prompt of the offline commands (`logits`, `generate`): token ids, or text tokenized with the
//! checkpoint's tokenizer, optionally inside its chat template with images in the user turn (the
//! images in the order given, then the text: the order of the golden cases).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use epserve_gateway::chat_template::ChatTemplate;
use epserve_imaging::{DecodeLimits, ImageTokenIds, ProcessorConfig, Tiles};
use epserve_model::ModelConfig;
use serde_json::json;

#[derive(Debug, Clone, clap::Args)]
pub struct PromptArgs {
    /// Prompt text, tokenized with the checkpoint's tokenizer.json.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    pub prompt: Option<String>,
    /// Render the checkpoint's chat template around the prompt (one user turn).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// An image for the user turn (repeatable; PNG, JPEG, WebP or GIF), before the text.
    #[arg(long = "image", requires = "chat")]
    pub images: Vec<PathBuf>,
    /// Prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
}

/// A prompt ready to run: its ids (images expanded into their placeholders) and the images' tiles.
#[derive(Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<Tiles>,
    /// Given as text (`--prompt`): the JSON output shows the ids.
    pub from_text: bool,
}

pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl PromptArgs {
    /// Builds the prompt of the checkpoint in `dir` (with `tokenizer` when given as text).
    pub fn build(&self, dir: &Path, tokenizer: Option<&tokenizers::Tokenizer>) -> Result<Prompt> {
        let (Some(text), None) = (&self.prompt, &self.tokens) else {
            let ids = self.tokens.clone().context("give --prompt or --tokens")?;
            return Ok(Prompt { ids, images: Vec::new(), from_text: false });
        };
        let tok = tokenizer.context("a tokenizer is needed for --prompt")?;
        let encode = |text: &str, add_special: bool| -> Result<Vec<u32>> {
            Ok(tok.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec())
        };
        if !self.chat {
            return Ok(Prompt { ids: encode(text, true)?, images: Vec::new(), from_text: true });
        }
        let template = ChatTemplate::from_checkpoint(dir)?;
        let mut content: Vec<serde_json::Value> = self.images.iter().map(|_| json!({ "type": "image" })).collect();
        content.push(json!({ "type": "text", "text": text }));
        // The rendered template already starts with BOS: no special tokens added on top.
        let rendered = encode(&template.render(&json!([{ "role": "user", "content": content }]), true)?, false)?;
        if self.images.is_empty() {
            return Ok(Prompt { ids: rendered, images: Vec::new(), from_text: true });
        }
        let images = self.read_images(dir)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let vision = config.vision.as_ref().context("this checkpoint has no vision tower: --image cannot be used")?;
        let ids = ImageTokenIds::lookup(|name| tok.token_to_id(name))?;
        let ids = epserve_imaging::splice(&rendered, &images, vision.tokens_per_tile(), &ids)?;
        Ok(Prompt { ids, images, from_text: true })
    }

    fn read_images(&self, dir: &Path) -> Result<Vec<Tiles>> {
        let processor = ProcessorConfig::from_checkpoint(dir)?;
        let limits = DecodeLimits::default();
        self.images
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let image =
                    epserve_imaging::decode(&bytes, &limits).with_context(|| format!("decoding {}", path.display()))?;
                Ok(epserve_imaging::preprocess(&image, &processor))
            })
            .collect()
    }
}

impl Prompt {
    pub fn check_not_empty(&self) -> Result<()> {
        if self.ids.is_empty() {
            bail!("the prompt is empty");
        }
        Ok(())
    }
}
