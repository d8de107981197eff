//! The prompt of the offline commands (`logits`, `generate`): token ids, or text tokenized with the
//! checkpoint's tokenizer, optionally inside its chat template with images in the user turn (the
//! images in the order given, then the text: the order of the golden cases). A chat prompt goes
//! through the gateway's own steps (template, image placeholders, expansion), so that it is the
//! prompt an API request with the same turn gets.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use epserve_gateway::errors::ApiError;
use epserve_gateway::images::{ImageConfig, ImageInput, LoadedImage, Vision};
use epserve_gateway::openai::Message;
use epserve_gateway::openai::request::{ContentPart, ImageUrl, MessageContent, Role};
use epserve_gateway::text::TextCodec;
use epserve_imaging::{DecodeLimits, Tiles};

#[derive(Debug, Clone, clap::Args)]
pub struct PromptArgs {
    /// Prompt text, tokenized with the checkpoint's tokenizer.json.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    pub prompt: Option<String>,
    /// Render the checkpoint's chat template around the prompt (one user turn).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// An image (repeatable; PNG, JPEG, WebP or GIF). With `--chat`, in the user turn before the
    /// text; with `--tokens`, the ids must hold its expansion already (its `<|patch|>` run).
    #[arg(long = "image")]
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
            let images = if self.images.is_empty() {
                Vec::new()
            } else {
                let codec = TextCodec::from_checkpoint(dir)?;
                let vision = self.vision(dir, &codec)?;
                self.read_images(vision.as_ref())?.into_iter().map(|image| image.tiles).collect()
            };
            return Ok(Prompt { ids, images, from_text: false });
        };
        if !self.images.is_empty() && !self.chat {
            bail!("--image goes with --chat (the image goes in the user turn) or with --tokens");
        }
        if !self.chat {
            let tok = tokenizer.context("a tokenizer is needed for --prompt")?;
            let ids = tok.encode(text.as_str(), true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
            return Ok(Prompt { ids: ids.get_ids().to_vec(), images: Vec::new(), from_text: true });
        }
        let codec = TextCodec::from_checkpoint(dir)?;
        let vision = self.vision(dir, &codec)?;
        let images = self.read_images(vision.as_ref())?;
        let input = ImageInput::new(ImageConfig::default(), vision)?;
        let mut content: Vec<ContentPart> = images
            .iter()
            .map(|_| ContentPart::ImageUrl { image_url: ImageUrl { url: String::new(), detail: None } })
            .collect();
        content.push(ContentPart::Text { text: text.clone() });
        let messages = [Message {
            role: Some(Role::User),
            content: Some(MessageContent::Parts(content)),
            tool_calls: None,
            other_fields: Default::default(),
        }];
        let chat = codec.encode_chat(&messages)?;
        let (ids, tiles) = input.expand(&chat.ids, &chat.image_placeholders, images, &messages).map_err(api_error)?;
        let images = tiles
            .into_iter()
            .map(|t| Tiles::from_parts(t.rows as usize, t.cols as usize, t.tile_size as usize, t.pixels.into()))
            .collect::<Result<_, _>>()?;
        Ok(Prompt { ids, images, from_text: true })
    }

    /// The checkpoint's image settings; an error when images are given to a model without a tower.
    fn vision(&self, dir: &Path, codec: &TextCodec) -> Result<Option<Vision>> {
        let vision = Vision::from_checkpoint(dir, |t| codec.token_id(t), |id| codec.token_text(id))?;
        if !self.images.is_empty() && vision.is_none() {
            bail!("{} has no vision tower: --image cannot be used", dir.display());
        }
        Ok(vision)
    }

    /// The `--image` files, decoded and cut into tiles as the gateway cuts an image part.
    fn read_images(&self, vision: Option<&Vision>) -> Result<Vec<LoadedImage>> {
        let Some(vision) = vision else { return Ok(Vec::new()) };
        let limits = DecodeLimits::default();
        self.images
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let image =
                    epserve_imaging::decode(&bytes, &limits).with_context(|| format!("decoding {}", path.display()))?;
                let tiles = epserve_imaging::preprocess(&image, &vision.processor);
                Ok(LoadedImage { param: path.display().to_string(), tiles })
            })
            .collect()
    }
}

fn api_error(e: ApiError) -> anyhow::Error {
    match e.param {
        Some(param) => anyhow!("{param}: {}", e.message),
        None => anyhow!(e.message),
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
