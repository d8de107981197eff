//! Images on the coordinator: the vision tower, the check that a request's images fill its
//! prompt's `<|patch|>` placeholders exactly, and the per-sequence state that turns tiles into the
//! feature rows of each prefill chunk.
//!
//! An image is encoded when the first chunk that reaches one of its placeholders is scheduled
//! (batched with every other image that step needs, across requests), and its features are dropped
//! once the chunk holding its last placeholder has run: features live only while a prefill needs
//! them. A preempted sequence recomputes from its first token, and its images are encoded again from
//! their tiles, which stay with the request (uint8, a quarter of the bytes of the features' inputs).

use std::ops::Range;

use candle_core::{Device, Tensor};
use epserve_imaging::{ProcessorConfig, Tiles};
use epserve_model::config::{FeedForwardKind, TextConfig, VisionConfig};
use epserve_model::{ImageRows, VisionModel};

/// The vision tower and the image processor settings its tiles were cut with.
#[derive(Debug)]
pub struct Vision {
    pub model: VisionModel,
    pub processor: ProcessorConfig,
    pub spec: ImageSpec,
}

/// What a request's images are checked against when it is submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    /// `<|patch|>`: the placeholder token whose embedding image features replace.
    pub image_token: u32,
    /// Side of a tile in pixels.
    pub tile_size: usize,
    /// Feature rows (and placeholders) per tile.
    pub tokens_per_tile: usize,
    /// What encoding one tile costs, in text tokens of a step's budget (see [`tile_cost_tokens`]).
    pub tile_cost_tokens: usize,
}

impl ImageSpec {
    /// The positions of `prompt`'s placeholders, after checking that `images` fill them exactly.
    /// Without images a placeholder id in the prompt is an ordinary token.
    pub fn placeholders(spec: Option<&ImageSpec>, prompt: &[u32], images: &[Tiles]) -> Result<Vec<u32>, String> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let Some(spec) = spec else {
            return Err("this model does not accept images (its checkpoint has no vision tower)".into());
        };
        for (i, tiles) in images.iter().enumerate() {
            if tiles.tile_size != spec.tile_size {
                return Err(format!(
                    "image {i} has {0}×{0} tiles; this model's vision tower takes {1}×{1}",
                    tiles.tile_size, spec.tile_size
                ));
            }
        }
        let positions: Vec<u32> =
            prompt.iter().enumerate().filter(|&(_, &t)| t == spec.image_token).map(|(i, _)| i as u32).collect();
        let tiles: usize = images.iter().map(Tiles::count).sum();
        let expected = tiles * spec.tokens_per_tile;
        if positions.len() != expected {
            return Err(format!(
                "the prompt has {} image placeholder tokens (id {}) but its {} image(s) have {tiles} tiles of {} \
                 features each ({expected} placeholders expected)",
                positions.len(),
                spec.image_token,
                images.len(),
                spec.tokens_per_tile
            ));
        }
        Ok(positions)
    }
}

impl Vision {
    /// The vision tower of a multimodal checkpoint, with its processor settings.
    pub fn new(
        model: VisionModel,
        processor: ProcessorConfig,
        text: &TextConfig,
        vision: &VisionConfig,
        image_token: u32,
    ) -> Self {
        let spec = ImageSpec {
            image_token,
            tile_size: vision.image_size,
            tokens_per_tile: model.tokens_per_tile(),
            tile_cost_tokens: tile_cost_tokens(text, vision),
        };
        Vision { model, processor, spec }
    }

    /// Features of every image in `images`, encoded in one batch: `[tiles · tokens_per_tile, hidden]`
    /// per image, in order.
    pub fn encode(&self, images: &[&Tiles]) -> epserve_model::Result<Vec<Tensor>> {
        let tiles: usize = images.iter().map(|t| t.count()).sum();
        if tiles == 0 {
            return Ok(Vec::new());
        }
        let side = self.spec.tile_size;
        let mut pixels = Vec::with_capacity(tiles * 3 * side * side);
        for image in images {
            pixels.extend(image.pixel_values(&self.processor));
        }
        let pixels = Tensor::from_vec(pixels, (tiles, 3, side, side), &Device::Cpu)?;
        let started = std::time::Instant::now();
        let features = self.model.forward(&pixels)?;
        metrics::histogram!(epserve_proto::metric_names::VISION_ENCODE_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(epserve_proto::metric_names::VISION_TILES_TOTAL).increment(tiles as u64);
        let mut out = Vec::with_capacity(images.len());
        let mut row = 0;
        for image in images {
            let rows = image.count() * self.spec.tokens_per_tile;
            out.push(features.narrow(0, row, rows)?);
            row += rows;
        }
        Ok(out)
    }
}

/// What encoding one tile costs relative to one text token of a step, from the matrix sizes (two
/// flops per weight per row): the vision blocks over the tile's patches and its CLS row, against the
/// text model's attention and feed-forward matrices (routed experts at `top_k`) over all layers.
/// At least 1. Scout: one 336×336 tile is 31 text tokens' worth.
pub fn tile_cost_tokens(text: &TextConfig, vision: &VisionConfig) -> usize {
    let (h, i) = (vision.hidden_size as f64, vision.intermediate_size as f64);
    let patches = (vision.image_size / vision.patch_size.max(1)).pow(2) as f64;
    let vision_block = 4.0 * h * h + 2.0 * h * i;
    let tile = (patches + 1.0) * vision.num_hidden_layers as f64 * vision_block + patches * h * 3.0 * 14.0 * 14.0;
    let th = text.hidden_size as f64;
    let attention = th * (text.num_attention_heads + 2 * text.num_key_value_heads) as f64 * text.head_dim as f64
        + text.num_attention_heads as f64 * text.head_dim as f64 * th;
    let token: f64 = text
        .feed_forward
        .iter()
        .map(|kind| {
            attention
                + match kind {
                    FeedForwardKind::Moe => {
                        3.0 * th * text.intermediate_size as f64 * (text.num_experts_per_tok as f64 + 1.0)
                    }
                    FeedForwardKind::Dense => 3.0 * th * text.intermediate_size_mlp as f64,
                }
        })
        .sum();
    ((tile / token.max(1.0)).ceil() as usize).max(1)
}

/// A request's images and where their features go in its sequence.
#[derive(Debug)]
pub struct SequenceImages {
    images: Vec<Image>,
    /// Every placeholder position of the prompt, ascending.
    positions: Vec<u32>,
}

#[derive(Debug)]
struct Image {
    tiles: Tiles,
    /// Its placeholders, as a range of `positions`.
    range: Range<usize>,
    /// `[range.len(), hidden]` while a prefill needs them.
    features: Option<Tensor>,
}

impl SequenceImages {
    /// `positions` as [`ImageSpec::placeholders`] found them for these images. None without images.
    pub fn new(images: Vec<Tiles>, positions: Vec<u32>, tokens_per_tile: usize) -> Option<Self> {
        if images.is_empty() {
            return None;
        }
        let mut start = 0;
        let images = images
            .into_iter()
            .map(|tiles| {
                let end = start + tiles.count() * tokens_per_tile;
                let image = Image { tiles, range: start..end, features: None };
                start = end;
                image
            })
            .collect();
        Some(SequenceImages { images, positions })
    }

    /// `positions` indices of the placeholders among sequence positions `span`.
    fn in_span(&self, span: &Range<usize>) -> Range<usize> {
        let lo = self.positions.partition_point(|&p| (p as usize) < span.start);
        let hi = self.positions.partition_point(|&p| (p as usize) < span.end);
        lo..hi
    }

    /// Images with placeholders among positions `span` and no features yet.
    pub fn missing(&self, span: Range<usize>) -> Vec<usize> {
        let wanted = self.in_span(&span);
        self.images
            .iter()
            .enumerate()
            .filter(|(_, im)| im.features.is_none() && im.range.start < wanted.end && wanted.start < im.range.end)
            .map(|(i, _)| i)
            .collect()
    }

    /// Tiles to encode before positions `span` can run.
    pub fn tiles_missing(&self, span: Range<usize>) -> usize {
        self.missing(span).into_iter().map(|i| self.images[i].tiles.count()).sum()
    }

    pub fn tiles(&self, image: usize) -> &Tiles {
        &self.images[image].tiles
    }

    pub fn set_features(&mut self, image: usize, features: Tensor) {
        self.images[image].features = Some(features);
    }

    /// The feature rows of positions `span`, whose images must have been encoded.
    pub fn rows(&self, span: Range<usize>) -> epserve_model::Result<Option<ImageRows<'_>>> {
        let wanted = self.in_span(&span);
        if wanted.is_empty() {
            return Ok(None);
        }
        let mut parts = Vec::new();
        for (i, im) in self.images.iter().enumerate() {
            let (lo, hi) = (im.range.start.max(wanted.start), im.range.end.min(wanted.end));
            if lo >= hi {
                continue;
            }
            let features = im.features.as_ref().ok_or_else(|| {
                epserve_model::Error::Input(format!("image {i} was not encoded before its placeholders ran"))
            })?;
            parts.push(features.narrow(0, lo - im.range.start, hi - lo)?);
        }
        let features = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        Ok(Some(ImageRows { positions: &self.positions[wanted], features }))
    }

    /// Drops the features of images whose placeholders all lie before position `computed` (in the
    /// KV cache now).
    pub fn release_before(&mut self, computed: usize) {
        for im in &mut self.images {
            let done = im.range.is_empty() || (self.positions[im.range.end - 1] as usize) < computed;
            if done {
                im.features = None;
            }
        }
    }

    /// Bytes the features held now take.
    pub fn feature_bytes(&self) -> usize {
        self.images
            .iter()
            .filter_map(|im| im.features.as_ref())
            .map(|f| f.elem_count() * f.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;
    use epserve_model::ModelConfig;
    use epserve_testkit::fixtures;

    use super::*;

    fn tiles(rows: usize, cols: usize) -> Tiles {
        let count = rows * cols + usize::from(rows * cols > 1);
        Tiles::from_parts(rows, cols, 2, vec![0; count * 3 * 4]).expect("tiles")
    }

    #[test]
    fn a_scout_tile_costs_31_text_tokens() {
        let cfg = ModelConfig::from_file(&fixtures::dir(fixtures::SCOUT_CONFIG).join("config.json")).expect("config");
        assert_eq!(tile_cost_tokens(&cfg.text, cfg.vision.as_ref().expect("vision")), 31);
    }

    #[test]
    fn placeholders_must_match_the_tiles() {
        let spec = ImageSpec { image_token: 9, tile_size: 2, tokens_per_tile: 2, tile_cost_tokens: 1 };
        let prompt = [1, 9, 9, 3, 9, 9, 9, 9, 9, 9, 9, 9, 4];
        // A 1×1 image (1 tile) and a 1×2 image (2 tiles + global): 2 + 6 placeholders... one short.
        let err = ImageSpec::placeholders(Some(&spec), &prompt, &[tiles(1, 1), tiles(1, 2)]).expect_err("10 vs 8");
        assert!(err.contains("10 image placeholder") && err.contains("8 placeholders expected"), "{err}");
        let positions = ImageSpec::placeholders(Some(&spec), &prompt[..10], &[tiles(1, 1), tiles(1, 2)]).expect("ok");
        assert_eq!(positions, [1, 2, 4, 5, 6, 7, 8, 9]);
        // Without images a placeholder id is a token; images without a vision tower are refused.
        assert_eq!(ImageSpec::placeholders(Some(&spec), &prompt, &[]).expect("text"), Vec::<u32>::new());
        assert!(ImageSpec::placeholders(None, &prompt, &[tiles(1, 1)]).expect_err("no tower").contains("vision"));
        let mut wrong = tiles(1, 1);
        wrong.tile_size = 3;
        assert!(ImageSpec::placeholders(Some(&spec), &prompt, &[wrong]).expect_err("side").contains("3×3"));
    }

    #[test]
    fn chunks_take_the_rows_they_cover_and_release_them_after() {
        // Two images: 2 placeholders at positions 1, 2 and 6 at positions 4..10.
        let positions = vec![1, 2, 4, 5, 6, 7, 8, 9];
        let mut images = SequenceImages::new(vec![tiles(1, 1), tiles(1, 2)], positions, 2).expect("images");
        assert_eq!(images.missing(0..3), [0]);
        assert_eq!(images.missing(0..5), [0, 1]);
        assert_eq!(images.tiles_missing(3..12), 3);
        assert!(images.missing(10..20).is_empty());
        for (i, rows) in [(0, 2), (1, 6)] {
            let f: Vec<f32> = (0..rows * 2).map(|k| (i * 100 + k) as f32).collect();
            images.set_features(i, Tensor::from_vec(f, (rows, 2), &Device::Cpu).expect("tensor"));
        }
        // A chunk over positions 2..6 takes the second row of image 0 and the first two of image 1.
        let rows = images.rows(2..6).expect("rows").expect("some");
        assert_eq!(rows.positions, [2, 4, 5]);
        assert_eq!(rows.features.to_vec2::<f32>().expect("vec"), [[2.0, 3.0], [100.0, 101.0], [102.0, 103.0]]);
        assert!(images.rows(10..12).expect("rows").is_none());
        images.release_before(6);
        assert_eq!(images.missing(0..20), [0], "image 0 is in the cache, image 1 still needed");
        assert_eq!(images.feature_bytes(), 6 * 2 * DType::F32.size_in_bytes());
        let err = images.rows(0..3).expect_err("released");
        assert!(err.to_string().contains("not encoded"), "{err}");
    }
}
