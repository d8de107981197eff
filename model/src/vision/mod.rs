//! The Llama-4 vision tower and projector (`Llama4VisionModel` + `Llama4MultiModalProjector`,
//! transformers 5.24; the reference's §4): image tiles `[tiles, 3, S, S]` in, one text-width
//! embedding per `<|patch|>` placeholder out, `tokens_per_tile` rows per tile in tile order. The text
//! model puts them in place of those placeholders ([`crate::ImageRows`]).
//!
//! ```text
//! unfold (features c, ky, kx) → patch_embedding.linear → append class token (LAST)
//! → + positional_embedding_vlm → layernorm_pre
//! → N × pre-LN blocks with biases (non-causal attention per tile, 2-D RoPE: column then row,
//!   1-based, class token unrotated)
//! → layernorm_post → drop the class token → pixel shuffle → fc1, GELU, fc2, GELU (adapter)
//! → multi_modal_projector.linear_1
//! ```
//!
//! Every size comes from [`VisionConfig`]; a config this code does not implement (another feature
//! layer or selection strategy, a tile that is not a whole number of patches, a shuffle ratio that
//! is not 1/integer...) is refused at load with the field named. Computation is in the model's
//! dtype (f32 on the CPU), RoPE and softmax in f32; see `ops` for how weights are kept.

mod adapter;
mod attention;
mod encoder;
mod ops;
mod rows;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::config::{ModelConfig, VisionConfig};
#[cfg(any(test, feature = "testing"))]
use crate::deviation::Deviation;
use crate::error::{Error, Result};
use crate::layers::WeightStorage;
use adapter::{Adapter, pixel_shuffle};
use attention::RopeTable;
use encoder::{ClassToken, EncoderLayer, RopeAxes, rope_table, unfold};
pub use ops::matmul_t;
use ops::{LayerNorm, Linear, Scratch};

/// The sizes the vision tower runs with, derived from the config and checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Tile side `S` in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    /// Patches per tile side: `S / patch_size`.
    pub grid: usize,
    /// `grid²`.
    pub patches: usize,
    /// Patches plus the class token.
    pub tokens: usize,
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Width of the encoder MLP.
    pub intermediate: usize,
    pub layers: usize,
    /// `1 / pixel_shuffle_ratio`: patches folded per side.
    pub shuffle: usize,
    /// `(grid / shuffle)²`.
    pub tokens_per_tile: usize,
    /// `shuffle² · hidden`, the adapter's input width.
    pub shuffled_dim: usize,
    /// The adapter's width (`projector_input_dim`).
    pub adapter_dim: usize,
    /// The text model's hidden size, the projector's output.
    pub text_hidden: usize,
}

impl Geometry {
    pub fn new(cfg: &ModelConfig) -> Result<Option<Self>> {
        let Some(v) = &cfg.vision else { return Ok(None) };
        let field = |name: &str| format!("vision_config.{name}");
        let refuse = |name: &str, reason: String| Err(Error::config(field(name), reason));
        if v.vision_feature_select_strategy != "default" {
            return refuse(
                "vision_feature_select_strategy",
                format!("`{}` is not supported (only `default`)", v.vision_feature_select_strategy),
            );
        }
        if v.vision_feature_layer != -1 && v.vision_feature_layer != v.num_hidden_layers as i64 - 1 {
            return refuse(
                "vision_feature_layer",
                format!("{} is not supported: the projector reads the last layer (-1)", v.vision_feature_layer),
            );
        }
        for (name, value) in [
            ("hidden_size", v.hidden_size),
            ("intermediate_size", v.intermediate_size),
            ("num_hidden_layers", v.num_hidden_layers),
            ("num_attention_heads", v.num_attention_heads),
            ("image_size", v.image_size),
            ("patch_size", v.patch_size),
            ("num_channels", v.num_channels),
            ("projector_input_dim", v.projector_input_dim),
        ] {
            if value == 0 {
                return refuse(name, "must be positive".into());
            }
        }
        if v.image_size % v.patch_size != 0 {
            return refuse(
                "image_size",
                format!(
                    "{} is not a multiple of patch_size {}: tiles must be whole patches",
                    v.image_size, v.patch_size
                ),
            );
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return refuse(
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", v.num_attention_heads, v.hidden_size),
            );
        }
        let head_dim = v.hidden_size / v.num_attention_heads;
        if head_dim % 4 != 0 {
            return refuse(
                "num_attention_heads",
                format!("head_dim {head_dim} is not a multiple of 4: the 2-D RoPE splits each head's pairs in halves"),
            );
        }
        let grid = v.image_size / v.patch_size;
        let ratio = v.pixel_shuffle_ratio;
        let shuffle = (1.0 / ratio).round();
        if !(ratio > 0.0 && ratio <= 1.0) || (shuffle * ratio - 1.0).abs() > 1e-9 || grid % shuffle as usize != 0 {
            return refuse(
                "pixel_shuffle_ratio",
                format!("{ratio} is not 1/s for a whole s that divides the {grid} patches of a tile side"),
            );
        }
        let shuffle = shuffle as usize;
        let shuffled_dim = shuffle * shuffle * v.hidden_size;
        // transformers sizes the adapter's fc1 by `intermediate_size` and feeds it the shuffled tokens.
        if v.intermediate_size != shuffled_dim {
            return refuse(
                "intermediate_size",
                format!(
                    "{} differs from the shuffled token width {shuffled_dim} (hidden_size · (1/pixel_shuffle_ratio)²) that the adapter's fc1 takes",
                    v.intermediate_size
                ),
            );
        }
        if v.projector_output_dim != v.projector_input_dim {
            return refuse(
                "projector_output_dim",
                format!(
                    "{} differs from projector_input_dim {}: the adapter's fc2 maps one to the other",
                    v.projector_output_dim, v.projector_input_dim
                ),
            );
        }
        if v.vision_output_dim != v.projector_output_dim {
            return refuse(
                "vision_output_dim",
                format!(
                    "{} differs from projector_output_dim {}: the projector reads the adapter's output",
                    v.vision_output_dim, v.projector_output_dim
                ),
            );
        }
        if v.rope_theta.is_nan() || v.rope_theta <= 0.0 {
            return refuse("rope_theta", format!("{} is not positive", v.rope_theta));
        }
        let side = grid / shuffle;
        Ok(Some(Geometry {
            image_size: v.image_size,
            patch_size: v.patch_size,
            channels: v.num_channels,
            grid,
            patches: grid * grid,
            tokens: grid * grid + 1,
            hidden: v.hidden_size,
            heads: v.num_attention_heads,
            head_dim,
            intermediate: v.intermediate_size,
            layers: v.num_hidden_layers,
            shuffle,
            tokens_per_tile: side * side,
            shuffled_dim,
            adapter_dim: v.projector_input_dim,
            text_hidden: cfg.text.hidden_size,
        }))
    }

    /// A small consistent geometry for unit tests to adjust.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Geometry {
            image_size: 56,
            patch_size: 14,
            channels: 3,
            grid: 4,
            patches: 16,
            tokens: 17,
            hidden: 32,
            heads: 2,
            head_dim: 16,
            intermediate: 128,
            layers: 2,
            shuffle: 2,
            tokens_per_tile: 4,
            shuffled_dim: 128,
            adapter_dim: 64,
            text_hidden: 64,
        }
    }

    /// Multiply-adds ×2 of one tile's matrix products (patch embedding, every layer's projections,
    /// MLP and attention products, adapter, projector): what a tile costs, for throughput figures.
    pub fn flops_per_tile(&self) -> f64 {
        let (t, d, i) = (self.tokens as f64, self.hidden as f64, self.intermediate as f64);
        let patch = self.patches as f64 * (self.channels * self.patch_size * self.patch_size) as f64 * d;
        let layer = t * (4.0 * d * d + 2.0 * d * i) + 2.0 * t * t * d;
        let out = self.tokens_per_tile as f64;
        let adapter = out * (self.shuffled_dim * self.adapter_dim + self.adapter_dim * self.adapter_dim) as f64
            + out * (self.adapter_dim * self.text_hidden) as f64;
        2.0 * (patch + self.layers as f64 * layer + adapter)
    }

    /// The part of [`Geometry::flops_per_tile`] spent in one encoder layer.
    pub fn flops_per_tile_layer(&self) -> f64 {
        let (t, d, i) = (self.tokens as f64, self.hidden as f64, self.intermediate as f64);
        2.0 * (t * (4.0 * d * d + 2.0 * d * i) + 2.0 * t * t * d)
    }
}

impl VisionConfig {
    /// `<|patch|>` tokens (and feature rows) per image tile: `(S / patch_size · pixel_shuffle_ratio)²`,
    /// 144 for Scout's 336-pixel tiles of 14-pixel patches at ratio 0.5.
    pub fn tokens_per_tile(&self) -> usize {
        let side = (self.image_size / self.patch_size.max(1)) as f64 * self.pixel_shuffle_ratio;
        let side = side.round() as usize;
        side * side
    }
}

/// The hidden state of a batch of tiles between encoder stages: `[tiles · tokens, hidden]`.
#[derive(Debug)]
pub struct EncoderState {
    hidden: Tensor,
    tiles: usize,
}

impl EncoderState {
    pub fn tiles(&self) -> usize {
        self.tiles
    }
}

/// `<|patch|>` tokens per tile of `cfg`'s vision tower (the encoder's output rows per tile), once the
/// tower is checked to be one this crate runs; `None` without one. What the gateway expands an image
/// into is what the coordinator's encoder then produces.
pub fn tokens_per_tile(cfg: &ModelConfig) -> Result<Option<usize>> {
    Ok(Geometry::new(cfg)?.map(|g| g.tokens_per_tile))
}

/// The vision encoder, adapter and projector of a Llama-4 checkpoint.
#[derive(Debug)]
pub struct VisionModel {
    geometry: Geometry,
    patch_embedding: Linear,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    layernorm_pre: LayerNorm,
    layers: Vec<EncoderLayer>,
    layernorm_post: LayerNorm,
    adapter: Adapter,
    rope: RopeTable,
    scratch: Scratch,
    #[cfg(any(test, feature = "testing"))]
    rope_theta: f64,
    class_token: ClassToken,
    dtype: DType,
    device: Device,
}

impl VisionModel {
    /// The vision tower of `cfg` (`None` when the config has none), weights kept as `storage` says
    /// (for f32 compute on the CPU, `AsStored` keeps bf16 checkpoints' matrices bf16: see `ops`).
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        dtype: DType,
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(g) = Geometry::new(cfg)? else { return Ok(None) };
        let theta = cfg.vision.as_ref().map_or(10_000.0, |v| v.rope_theta);
        let (d, kinds) = (g.hidden, (dtype, storage));
        let patch_embedding = Linear::load(
            src,
            "vision_model.patch_embedding.linear",
            (d, g.channels * g.patch_size * g.patch_size),
            false,
            kinds,
            device,
        )?;
        let layers = (0..g.layers).map(|i| EncoderLayer::load(&g, i, src, kinds, device)).collect::<Result<_>>()?;
        Ok(Some(VisionModel {
            patch_embedding,
            class_embedding: src.tensor("vision_model.class_embedding", &[d], dtype, device)?,
            positional_embedding: src.tensor("vision_model.positional_embedding_vlm", &[g.tokens, d], dtype, device)?,
            layernorm_pre: LayerNorm::load(src, "vision_model.layernorm_pre", d, dtype, device)?,
            layers,
            layernorm_post: LayerNorm::load(src, "vision_model.layernorm_post", d, dtype, device)?,
            adapter: Adapter::load(&g, src, kinds, device)?,
            rope: rope_table(&g, theta, ClassToken::Last, RopeAxes::ColumnFirst),
            scratch: Scratch::default(),
            #[cfg(any(test, feature = "testing"))]
            rope_theta: theta,
            class_token: ClassToken::Last,
            geometry: g,
            dtype,
            device: device.clone(),
        }))
    }

    /// Feature rows per tile (`<|patch|>` tokens per tile in the prompt).
    pub fn tokens_per_tile(&self) -> usize {
        self.geometry.tokens_per_tile
    }

    /// Tile side in pixels.
    pub fn tile_size(&self) -> usize {
        self.geometry.image_size
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of every weight matrix and bias as kept in memory (embeddings and norms excluded).
    pub fn matrix_bytes(&self) -> u64 {
        self.linears().map(Linear::bytes).sum()
    }

    /// Parameters of the whole tower and projector.
    pub fn params(&self) -> usize {
        let vectors = [&self.class_embedding, &self.positional_embedding].map(Tensor::elem_count).iter().sum::<usize>();
        let norms = (2 + 2 * self.layers.len()) * 2 * self.geometry.hidden;
        self.linears().map(Linear::params).sum::<usize>() + vectors + norms
    }

    /// Matrix-product FLOPs of one tile (see `docs/model.md`).
    pub fn flops_per_tile(&self) -> f64 {
        self.geometry.flops_per_tile()
    }

    /// The part of [`VisionModel::flops_per_tile`] spent in one encoder layer.
    pub fn flops_per_tile_layer(&self) -> f64 {
        self.geometry.flops_per_tile_layer()
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.patch_embedding)
            .chain(self.layers.iter().flat_map(EncoderLayer::linears))
            .chain(self.adapter.linears())
    }

    /// `pixel_values` `[tiles, C, S, S]` (f32, normalised as the image processor does) →
    /// `[tiles · tokens_per_tile, text hidden]` in the model dtype, tile after tile.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        crate::kernels::on_pool(|| {
            let mut state = self.embed(pixel_values)?;
            for layer in 0..self.layers.len() {
                self.run_layer(&mut state, layer)?;
            }
            self.project(state)
        })
    }

    /// First stage: patch embedding, class token, positions, `layernorm_pre`.
    pub fn embed(&self, pixel_values: &Tensor) -> Result<EncoderState> {
        let g = &self.geometry;
        let dims = pixel_values.dims();
        let expected = [g.channels, g.image_size, g.image_size];
        if dims.len() != 4 || dims[1..] != expected || dims[0] == 0 {
            return Err(Error::Input(format!(
                "pixel values of shape {dims:?}; the vision tower takes [tiles ≥ 1, {}, {}, {}] (square tiles of the configured size)",
                g.channels, g.image_size, g.image_size
            )));
        }
        let tiles = dims[0];
        let pixels = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let patches =
            self.patch_embedding.forward(&unfold(&pixels, g)?, &self.scratch)?.reshape((tiles, g.patches, g.hidden))?;
        let class = self.class_embedding.reshape((1, 1, g.hidden))?.broadcast_as((tiles, 1, g.hidden))?;
        let tokens = match self.class_token {
            ClassToken::Last => Tensor::cat(&[&patches, &class], 1)?,
            #[cfg(any(test, feature = "testing"))]
            ClassToken::First => Tensor::cat(&[&class, &patches], 1)?,
        };
        let tokens = tokens.broadcast_add(&self.positional_embedding)?.reshape((tiles * g.tokens, g.hidden))?;
        Ok(EncoderState { hidden: self.layernorm_pre.forward(&tokens)?, tiles })
    }

    /// Encoder layer `layer` on `state`.
    pub fn run_layer(&self, state: &mut EncoderState, layer: usize) -> Result<()> {
        let l = self.layers.get(layer).ok_or_else(|| Error::Input(format!("vision layer {layer} does not exist")))?;
        state.hidden = l.forward(&state.hidden, &self.geometry, &self.rope, &self.scratch)?;
        Ok(())
    }

    /// Last stage: `layernorm_post`, the class token dropped, pixel shuffle, adapter, projector.
    pub fn project(&self, state: EncoderState) -> Result<Tensor> {
        let g = &self.geometry;
        let hidden = self.layernorm_post.forward(&state.hidden)?.reshape((state.tiles, g.tokens, g.hidden))?;
        let first_patch = match self.class_token {
            ClassToken::Last => 0,
            #[cfg(any(test, feature = "testing"))]
            ClassToken::First => 1,
        };
        let patches = hidden.narrow(1, first_patch, g.patches)?.reshape((state.tiles * g.patches, g.hidden))?;
        let features = self.adapter.forward(&pixel_shuffle(&patches, g)?, &self.scratch)?;
        Ok(features.to_dtype(self.dtype)?)
    }

    /// The same model with a deliberate departure from Llama 4 (negative controls): the vision
    /// deviations change the tower, the others leave it as it is.
    #[cfg(any(test, feature = "testing"))]
    pub fn with_deviation(mut self, deviation: Option<Deviation>) -> Self {
        let (class, axes) = match deviation {
            Some(Deviation::VisionClassTokenFirst) => (ClassToken::First, RopeAxes::ColumnFirst),
            Some(Deviation::VisionRopeRowFirst) => (ClassToken::Last, RopeAxes::RowFirst),
            _ => (ClassToken::Last, RopeAxes::ColumnFirst),
        };
        self.class_token = class;
        self.rope = rope_table(&self.geometry, self.rope_theta, class, axes);
        self.adapter.skip_second_gelu = deviation == Some(Deviation::VisionNoSecondAdapterGelu);
        self
    }
}
