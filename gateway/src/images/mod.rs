//! Images through the OpenAI API: the `image_url` parts of a chat request become the tiles the
//! coordinator's vision encoder reads and the `<|patch|>` runs of the prompt that its features fill.
//!
//! A request's images go through three stages, cheapest first, so that a bad request costs little:
//! 1. [`ImageInput::take_parts`]: before any I/O, every image part is checked (the model has a vision
//!    tower, at most `--max-images-per-request`, a `data:` URI or — with `--image-fetch` — an
//!    `http(s)` URL) and its URL taken out of the message (the chat template only sees
//!    `{"type": "image"}`).
//! 2. [`ImageInput::load`]: the images are read concurrently (base64 decoded, or fetched through the
//!    SSRF guard of [`fetch`]), then decoded and cut into tiles by `epserve-imaging` on the blocking
//!    thread pool (CPU work stays off the IO threads), within `--max-image-bytes` and
//!    `--max-image-pixels` (checked from the header, before any pixel is allocated).
//! 3. [`ImageInput::expand`]: each image placeholder the chat template emitted becomes the image's
//!    token layout (`<|image_start|> ... <|patch|>×N ... <|image_end|>`).
//!
//! Every refusal is an OpenAI-style 400 whose `param` names the content part
//! (`messages[0].content[1]`).

pub mod address;
pub mod fetch;
pub mod source;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use epserve_imaging::{DecodeLimits, ImageError, ImageTokenIds, ProcessorConfig, Tiles};
use epserve_proto::metric_names as m;
use epserve_proto::v1 as pb;
use tracing::Instrument;

use crate::errors::ApiError;
use crate::images::fetch::{FetchConfig, FetchError, UrlFetcher, redacted};
use crate::images::source::ImageSource;
use crate::openai::Message;
use crate::openai::request::{ContentPart, MessageContent};

/// The operator's limits on image input (`epserve gateway` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    /// Images in one request, all messages together.
    pub max_images_per_request: usize,
    /// Encoded size of one image (the decoded data URI, or the fetched body).
    pub max_image_bytes: usize,
    /// Width × height of one image, read from its header before it is decoded.
    pub max_image_pixels: u64,
    /// `Some`: `http(s)` URLs are fetched (`--image-fetch`).
    pub fetch: Option<FetchConfig>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig { max_images_per_request: 8, max_image_bytes: 20 << 20, max_image_pixels: 50_000_000, fetch: None }
    }
}

/// Why an image part was refused: a closed set, the `reason` label of the rejection metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoVision,
    TooMany,
    BadUrl,
    FetchDisabled,
    FetchRefused,
    FetchFailed,
    FetchTimeout,
    BadBase64,
    TooLarge,
    TooManyPixels,
    UnsupportedFormat,
    Undecodable,
    MarkerInText,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoVision => "no_vision",
            Reason::TooMany => "too_many",
            Reason::BadUrl => "bad_url",
            Reason::FetchDisabled => "fetch_disabled",
            Reason::FetchRefused => "fetch_refused",
            Reason::FetchFailed => "fetch_failed",
            Reason::FetchTimeout => "fetch_timeout",
            Reason::BadBase64 => "bad_base64",
            Reason::TooLarge => "too_large",
            Reason::TooManyPixels => "too_many_pixels",
            Reason::UnsupportedFormat => "unsupported_format",
            Reason::Undecodable => "undecodable",
            Reason::MarkerInText => "marker_in_text",
        }
    }
}

/// A refused image, before it is tied to its content part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Rejection { reason, message: message.into() }
    }

    /// The 400 naming the content part (`messages[0].content[1]`); counted by reason.
    fn at(self, param: &str) -> ApiError {
        metrics::counter!(m::IMAGE_REJECTIONS_TOTAL, "reason" => self.reason.as_str()).increment(1);
        ApiError::invalid(Some(param.to_owned()), self.message)
    }
}

impl From<ImageError> for Rejection {
    fn from(e: ImageError) -> Self {
        let reason = match &e {
            ImageError::TooLarge { .. } => Reason::TooLarge,
            ImageError::TooManyPixels { .. } => Reason::TooManyPixels,
            ImageError::UnsupportedFormat { .. } => Reason::UnsupportedFormat,
            _ => Reason::Undecodable,
        };
        Rejection::new(reason, format!("Invalid image: {e}."))
    }
}

impl From<FetchError> for Rejection {
    fn from(e: FetchError) -> Self {
        let reason = match &e {
            FetchError::Refused(_) => Reason::FetchRefused,
            FetchError::TooLarge { .. } => Reason::TooLarge,
            FetchError::Timeout(_) => Reason::FetchTimeout,
            FetchError::Failed(_) => Reason::FetchFailed,
        };
        let verb = if reason == Reason::FetchRefused { "refused to fetch" } else { "could not fetch" };
        Rejection::new(reason, format!("The server {verb} the image URL: {e}."))
    }
}

/// What the checkpoint says about images.
#[derive(Debug, Clone)]
pub struct Vision {
    pub processor: ProcessorConfig,
    pub ids: ImageTokenIds,
    /// `<|patch|>` tokens per tile: the encoder's output rows per tile.
    pub tokens_per_tile: usize,
    /// The text of `<|patch|>`, to point at a message that typed it.
    pub patch_text: String,
}

impl Vision {
    /// `None` for a checkpoint without a vision tower (`vision_config`).
    pub fn from_checkpoint(
        dir: &Path,
        token_id: impl Fn(&str) -> Option<u32>,
        token_text: impl Fn(u32) -> String,
    ) -> anyhow::Result<Option<Vision>> {
        use anyhow::Context;
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            tracing::warn!("{} is missing: serving text only", config_path.display());
            return Ok(None);
        }
        let config = epserve_model::ModelConfig::from_file(&config_path)?;
        let Some(tokens_per_tile) = epserve_model::vision::tokens_per_tile(&config)? else { return Ok(None) };
        let Some(vision) = config.vision else { return Ok(None) };
        let processor = ProcessorConfig::from_checkpoint(dir).context("the image processor's configuration")?;
        if processor.tile_size != vision.image_size {
            anyhow::bail!(
                "the image processor cuts {0}×{0} tiles, the vision tower reads {1}×{1}",
                processor.tile_size,
                vision.image_size
            );
        }
        let ids = ImageTokenIds::lookup(&token_id).context("the tokenizer's image tokens")?;
        Ok(Some(Vision { processor, ids, tokens_per_tile, patch_text: token_text(ids.patch) }))
    }
}

/// One image part of a request, taken out of its message.
#[derive(Debug)]
pub struct RequestedImage {
    /// `messages[i].content[j]`.
    pub param: String,
    pub source: ImageSource,
}

/// One image, read and cut into tiles.
#[derive(Debug)]
pub struct LoadedImage {
    pub param: String,
    pub tiles: Tiles,
}

/// The image input of a gateway: its limits, the checkpoint's vision settings, the URL fetcher.
#[derive(Debug)]
pub struct ImageInput {
    config: ImageConfig,
    vision: Option<Arc<Vision>>,
    fetcher: Option<UrlFetcher>,
}

impl ImageInput {
    pub fn new(config: ImageConfig, vision: Option<Vision>) -> anyhow::Result<Self> {
        let fetcher = match &config.fetch {
            Some(fetch) => Some(UrlFetcher::new(fetch, config.max_image_bytes)?),
            None => None,
        };
        Ok(ImageInput { config, vision: vision.map(Arc::new), fetcher })
    }

    /// For a text-only model: every image part is refused.
    pub fn text_only() -> Self {
        ImageInput { config: ImageConfig::default(), vision: None, fetcher: None }
    }

    pub fn vision(&self) -> Option<&Vision> {
        self.vision.as_deref()
    }

    /// Stage 1: checks every image part of `messages` without I/O, and takes their URLs out.
    pub fn take_parts(&self, messages: &mut [Message]) -> Result<Vec<RequestedImage>, ApiError> {
        let mut requested = Vec::new();
        for (i, message) in messages.iter_mut().enumerate() {
            let Some(MessageContent::Parts(parts)) = &mut message.content else { continue };
            for (j, part) in parts.iter_mut().enumerate() {
                let ContentPart::ImageUrl { image_url } = part else { continue };
                let param = format!("messages[{i}].content[{j}]");
                if self.vision.is_none() {
                    return Err(Rejection::new(Reason::NoVision, "This model does not accept images.").at(&param));
                }
                if requested.len() == self.config.max_images_per_request {
                    let limit = self.config.max_images_per_request;
                    let message = format!("At most {limit} images per request; this is image {}.", limit + 1);
                    return Err(Rejection::new(Reason::TooMany, message).at(&param));
                }
                let url = std::mem::take(&mut image_url.url);
                let source = ImageSource::parse(url, self.fetcher.is_some()).map_err(|r| r.at(&param))?;
                requested.push(RequestedImage { param, source });
            }
        }
        Ok(requested)
    }

    /// Stage 2: reads, decodes and tiles the images, concurrently, keeping their order. The first
    /// failing part in prompt order is the one reported.
    pub async fn load(&self, requested: Vec<RequestedImage>) -> Result<Vec<LoadedImage>, ApiError> {
        if requested.is_empty() {
            return Ok(Vec::new());
        }
        let Some(vision) = &self.vision else {
            return Err(ApiError::internal("images reached a gateway whose model has no vision tower"));
        };
        let span = tracing::info_span!("images", count = requested.len());
        let loads = requested.into_iter().map(|image| self.load_one(vision.clone(), image));
        let loaded = futures_util::future::join_all(loads).instrument(span).await;
        loaded.into_iter().collect()
    }

    async fn load_one(&self, vision: Arc<Vision>, image: RequestedImage) -> Result<LoadedImage, ApiError> {
        let RequestedImage { param, source } = image;
        let kind = source.kind();
        let limits = DecodeLimits { max_bytes: self.config.max_image_bytes, max_pixels: self.config.max_image_pixels };
        let fetched = match source {
            ImageSource::Base64(payload) => Encoded::Base64(payload),
            ImageSource::Url(url) => {
                let fetcher = self.fetcher.as_ref().ok_or_else(|| ApiError::internal("URL fetching is disabled"))?;
                let started = Instant::now();
                let bytes = fetcher.fetch(&url).await;
                metrics::histogram!(m::IMAGE_FETCH_SECONDS).record(started.elapsed().as_secs_f64());
                let bytes = bytes.map_err(|e| {
                    tracing::info!(part = %param, url = %redacted(&url), "image fetch refused or failed: {e}");
                    Rejection::from(e).at(&param)
                })?;
                Encoded::Bytes(bytes)
            }
        };
        let span = tracing::Span::current();
        let tiles = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let started = Instant::now();
            let bytes = match &fetched {
                Encoded::Base64(payload) => std::borrow::Cow::Owned(source::decode_base64(payload, limits.max_bytes)?),
                Encoded::Bytes(bytes) => std::borrow::Cow::Borrowed(&bytes[..]),
            };
            metrics::counter!(m::IMAGE_BYTES_TOTAL, "source" => kind).increment(bytes.len() as u64);
            let image = epserve_imaging::decode(&bytes, &limits)?;
            let tiles = epserve_imaging::preprocess(&image, &vision.processor);
            metrics::histogram!(m::IMAGE_PREPROCESS_SECONDS).record(started.elapsed().as_secs_f64());
            tracing::debug!(source = kind, bytes = bytes.len(), rows = tiles.rows, cols = tiles.cols, "image tiled");
            Ok::<_, Rejection>(tiles)
        })
        .await
        .map_err(|e| ApiError::internal(format!("image preprocessing stopped: {e}")))?
        .map_err(|r| r.at(&param))?;
        metrics::counter!(m::IMAGES_TOTAL, "source" => kind).increment(1);
        metrics::counter!(m::IMAGE_TILES_TOTAL).increment(tiles.count() as u64);
        Ok(LoadedImage { param, tiles })
    }

    /// Stage 3: the prompt with each image placeholder of the template (`placeholders`, token
    /// ranges in order, one per image) replaced by its image's layout, and the tiles for the
    /// coordinator in the same order. The result holds exactly as many `<|patch|>` tokens as the
    /// tiles have feature rows: text that typed `<|patch|>` is refused, naming its part.
    pub fn expand(
        &self,
        tokens: &[u32],
        placeholders: &[Range<usize>],
        images: Vec<LoadedImage>,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<pb::ImageTiles>), ApiError> {
        let Some(vision) = &self.vision else {
            return Ok((tokens.to_vec(), Vec::new()));
        };
        if placeholders.len() != images.len() {
            return Err(ApiError::internal(format!(
                "the chat template placed {} image placeholders for {} images",
                placeholders.len(),
                images.len()
            )));
        }
        let mut prompt = Vec::with_capacity(tokens.len());
        let mut expected_patches = 0;
        let mut at = 0;
        for (range, image) in placeholders.iter().zip(&images) {
            prompt.extend_from_slice(&tokens[at..range.start]);
            prompt.extend(epserve_imaging::expand(&image.tiles, vision.tokens_per_tile, &vision.ids));
            expected_patches += image.tiles.count() * vision.tokens_per_tile;
            at = range.end;
        }
        prompt.extend_from_slice(&tokens[at..]);
        let patches = prompt.iter().filter(|&&t| t == vision.ids.patch).count();
        if patches != expected_patches {
            let param = typed_marker(messages, &vision.patch_text).unwrap_or_else(|| "messages".to_owned());
            let message = format!(
                "The text contains '{}', the placeholder of image features; it can only come from an image part.",
                vision.patch_text
            );
            return Err(Rejection::new(Reason::MarkerInText, message).at(&param));
        }
        let tiles = images
            .into_iter()
            .map(|image| {
                let Tiles { rows, cols, tile_size, pixels } = image.tiles;
                pb::ImageTiles {
                    rows: rows as u32,
                    cols: cols as u32,
                    tile_size: tile_size as u32,
                    pixels: pixels.into(),
                }
            })
            .collect();
        Ok((prompt, tiles))
    }
}

/// An image's bytes as they arrived.
enum Encoded {
    Base64(String),
    Bytes(bytes::Bytes),
}

/// The first message part whose text holds `marker`: `messages[i].content` or `messages[i].content[j]`.
fn typed_marker(messages: &[Message], marker: &str) -> Option<String> {
    messages.iter().enumerate().find_map(|(i, message)| match &message.content {
        Some(MessageContent::Text(text)) if text.contains(marker) => Some(format!("messages[{i}].content")),
        Some(MessageContent::Parts(parts)) => parts.iter().enumerate().find_map(|(j, part)| match part {
            ContentPart::Text { text } if text.contains(marker) => Some(format!("messages[{i}].content[{j}]")),
            _ => None,
        }),
        _ => None,
    })
}
