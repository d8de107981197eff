//! The Llama-4 text decoder (`Llama4TextModel` + `lm_head`): embeddings, decoder layers (attention,
//! then MoE or dense feed-forward, each behind an RMSNorm with a residual), final norm and head.
//!
//! A step takes several sequences at once, each with its own new tokens and cache; their rows are
//! concatenated so that every projection and every MoE layer runs once for the whole step.

use candle_core::{DType, Device, Tensor};

use crate::attention::{Attention, SeqSpan};
use crate::checkpoint::WeightSource;
use crate::config::{FeedForwardKind, ModelConfig, TextConfig};
#[cfg(any(test, feature = "testing"))]
use crate::deviation::Deviation;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvStore};
use crate::layers::{Linear, Mlp, RmsNorm};
use crate::moe::{ExpertBackend, MoeBlock, MoeInFlight, RoutingTrace};
use crate::quant::{LoadPolicy, MatrixRole};
use crate::rope::Rope;

#[derive(Debug)]
enum FeedForward {
    Moe(MoeBlock),
    Dense(Mlp),
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    attention: Attention,
    post_attention_layernorm: RmsNorm,
    feed_forward: FeedForward,
}

/// New tokens of one sequence for a step, with the cache holding its earlier tokens.
#[derive(Debug)]
pub struct SequenceStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut dyn KvStore,
    /// Image features replacing the embeddings of some of `tokens` (a multimodal prompt's
    /// `<|patch|>` placeholders); `None` for text.
    pub images: Option<ImageRows<'a>>,
}

impl<'a> SequenceStep<'a> {
    /// Text tokens (no image features).
    pub fn new(tokens: &'a [u32], cache: &'a mut dyn KvStore) -> Self {
        SequenceStep { tokens, cache, images: None }
    }

    /// The same step with image features for some of its tokens.
    pub fn with_images(mut self, images: Option<ImageRows<'a>>) -> Self {
        self.images = images;
        self
    }
}

/// Rows whose embeddings image features replace, in one step of one sequence.
#[derive(Debug, Clone)]
pub struct ImageRows<'a> {
    /// Absolute positions in the sequence (the first new token is at `cache.len()`), ascending,
    /// each among the step's new tokens.
    pub positions: &'a [u32],
    /// `[positions.len(), hidden]`, in the order of `positions`.
    pub features: Tensor,
}

/// Which rows of the step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new token of every sequence.
    All,
    /// The last new token of each sequence (decoding, and the end of a prefill).
    Last,
}

#[derive(Debug)]
pub struct TextModel {
    cfg: TextConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl TextModel {
    /// Loads every non-expert text weight, the matrices kept (and quantized) as `policy` says (a
    /// [`crate::WeightStorage`] alone is a policy that quantizes nothing).
    /// `progress(done_tensors, total_tensors)` follows the load.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        dtype: DType,
        policy: impl Into<LoadPolicy>,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let policy = policy.into();
        let t = &cfg.text;
        let prefix = cfg.architecture.decoder_prefix();
        let total = t.num_hidden_layers + 2;
        let embed_tokens =
            src.tensor(&format!("{prefix}embed_tokens.weight"), &[t.vocab_size, t.hidden_size], dtype, device)?;
        progress(1, total);
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let p = format!("{prefix}layers.{i}.");
            let norm = |name: &str| {
                RmsNorm::load(src, &format!("{p}{name}.weight"), t.hidden_size, t.rms_norm_eps, dtype, device)
            };
            let feed_forward = match t.feed_forward[i] {
                FeedForwardKind::Moe => FeedForward::Moe(MoeBlock::load(t, i, src, &p, (dtype, policy), device)?),
                FeedForwardKind::Dense => FeedForward::Dense(Mlp::load(
                    src,
                    &format!("{p}feed_forward."),
                    (t.hidden_size, t.intermediate_size_mlp),
                    (dtype, policy, MatrixRole::DenseMlp),
                    device,
                )?),
            };
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm")?,
                attention: Attention::load(t, i, src, &p, (dtype, policy), device)?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                feed_forward,
            });
            progress(i + 2, total);
        }
        let norm = RmsNorm::load(src, &format!("{prefix}norm.weight"), t.hidden_size, t.rms_norm_eps, dtype, device)?;
        let lm_head = if t.tie_word_embeddings {
            Linear::from_weight(embed_tokens.clone())
        } else {
            Linear::load(
                src,
                cfg.architecture.lm_head_key(),
                (t.vocab_size, t.hidden_size),
                (dtype, policy, MatrixRole::LmHead),
                device,
            )?
        };
        progress(total, total);
        Ok(TextModel {
            cfg: t.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(&t.rope, t.head_dim),
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Bytes of every weight matrix a step multiplies by (attention, router, shared expert, dense
    /// MLPs, lm_head; not the routed experts), as kept in memory: what any decode step reads.
    pub fn matrix_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                l.attention.matrix_bytes()
                    + match &l.feed_forward {
                        FeedForward::Moe(moe) => moe.matrix_bytes(),
                        FeedForward::Dense(mlp) => mlp.bytes(),
                    }
            })
            .sum();
        layers + self.lm_head.bytes()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg, self.dtype, &self.device)
    }

    /// The same model with a deliberate departure from Llama 4 in every layer (negative controls).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_deviation(mut self, deviation: Option<Deviation>) -> Self {
        for layer in &mut self.layers {
            layer.attention.deviation = deviation;
            if let FeedForward::Moe(moe) = &mut layer.feed_forward {
                moe.deviation = deviation;
            }
        }
        self
    }

    /// Runs one step: appends each sequence's tokens to its cache and returns f32 logits
    /// `[rows, vocab]` for the rows `which` selects, sequences in order.
    pub fn forward(
        &self,
        seqs: &mut [SequenceStep<'_>],
        experts: &dyn ExpertBackend,
        which: LogitsFor,
        mut trace: Option<&mut RoutingTrace>,
    ) -> Result<Tensor> {
        crate::kernels::on_pool(|| {
            crate::kernels::warm_step(|| {
                let mut step = self.begin_step(seqs)?;
                for layer in 0..self.layers.len() {
                    self.run_layer(&mut step, layer, experts, trace.as_deref_mut())?;
                }
                self.finish_step(step, which)
            })
        })
    }

    /// Embeds the new tokens of every sequence. The caches are not changed until
    /// [`TextModel::finish_step`], so a step that fails half-way leaves them as they were.
    pub fn begin_step<'s, 'a: 's>(&self, seqs: &'s mut [SequenceStep<'a>]) -> Result<Step<'s, 'a>> {
        let mut spans = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        let mut images = Vec::new();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Input("a sequence in the step has no new tokens".into()));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
            if let Some(rows) = &s.images {
                let at = self.image_rows(rows, s.cache.len(), s.tokens.len(), ids.len())?;
                if !at.is_empty() {
                    images.push((at, rows.features.to_dtype(self.dtype)?));
                }
            }
            spans.push(SeqSpan { start: ids.len(), len: s.tokens.len(), pos: s.cache.len() });
            ids.extend_from_slice(s.tokens);
        }
        let rows = ids.len();
        let ids = Tensor::from_slice(&ids, rows, &self.device)?;
        let mut hidden = self.embed_tokens.index_select(&ids, 0)?;
        if !images.is_empty() {
            let (at, features): (Vec<Vec<u32>>, Vec<Tensor>) = images.into_iter().unzip();
            let at = at.concat();
            let at = Tensor::from_slice(&at, (at.len(), 1), &self.device)?
                .broadcast_as((at.len(), self.cfg.hidden_size))?
                .contiguous()?;
            hidden = hidden.scatter(&at, &Tensor::cat(&features, 0)?, 0)?;
        }
        let caches = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        Ok(Step { spans, caches, hidden })
    }

    /// The step rows (the sequence's first new token is row `first_row`, at position `start`, of
    /// `len` new tokens) that `rows` replaces, after checking them.
    fn image_rows(&self, rows: &ImageRows<'_>, start: usize, len: usize, first_row: usize) -> Result<Vec<u32>> {
        let (n, width) = rows.features.dims2()?;
        if n != rows.positions.len() || width != self.cfg.hidden_size {
            return Err(Error::Input(format!(
                "{} image positions but image features of shape [{n}, {width}] (expected [{}, {}])",
                rows.positions.len(),
                rows.positions.len(),
                self.cfg.hidden_size
            )));
        }
        let mut previous = None;
        rows.positions
            .iter()
            .map(|&p| {
                let p = p as usize;
                if p < start || p >= start + len || previous.is_some_and(|q| q >= p) {
                    return Err(Error::Input(format!(
                        "image position {p} is not ascending within the step's new tokens (positions {start}..{})",
                        start + len
                    )));
                }
                previous = Some(p);
                Ok((first_row + p - start) as u32)
            })
            .collect()
    }

    /// Runs decoder layer `layer` on the step's hidden states.
    pub fn run_layer(
        &self,
        step: &mut Step<'_, '_>,
        layer: usize,
        experts: &dyn ExpertBackend,
        trace: Option<&mut RoutingTrace>,
    ) -> Result<()> {
        let in_flight = self.start_layer(step, layer, experts, trace)?;
        self.finish_layer(step, in_flight)
    }

    /// First half of a layer: attention, the post-attention norm, the router, and the routed rows
    /// sent to the experts. The step can do other work (another micro-batch's attention) before
    /// [`TextModel::finish_layer`].
    pub fn start_layer<'e>(
        &self,
        step: &mut Step<'_, '_>,
        layer: usize,
        experts: &'e dyn ExpertBackend,
        trace: Option<&mut RoutingTrace>,
    ) -> Result<LayerInFlight<'e>> {
        let l = self.layers.get(layer).ok_or_else(|| Error::Input(format!("layer {layer} does not exist")))?;
        let h = l.input_layernorm.forward(&step.hidden)?;
        let h = l.attention.forward(&h, &step.spans, &mut step.caches, &self.rope)?;
        let residual = (&step.hidden + h)?;
        let h = l.post_attention_layernorm.forward(&residual)?;
        let feed_forward = match &l.feed_forward {
            FeedForward::Moe(moe) => PendingFeedForward::Moe(moe.submit(h, experts, trace)?),
            FeedForward::Dense(mlp) => PendingFeedForward::Done(mlp.forward(&h)?),
        };
        Ok(LayerInFlight { layer, residual, feed_forward })
    }

    /// Second half of a layer: shared expert, the routed experts' answers, the residual add.
    pub fn finish_layer(&self, step: &mut Step<'_, '_>, in_flight: LayerInFlight<'_>) -> Result<()> {
        let LayerInFlight { layer, residual, feed_forward } = in_flight;
        let out = match (feed_forward, &self.layers[layer].feed_forward) {
            (PendingFeedForward::Moe(pending), FeedForward::Moe(moe)) => moe.complete(pending)?,
            (PendingFeedForward::Done(out), _) => out,
            (PendingFeedForward::Moe(_), FeedForward::Dense(_)) => {
                return Err(Error::Input(format!("layer {layer} is dense but has experts in flight")));
            }
        };
        step.hidden = (residual + out)?;
        Ok(())
    }

    /// Commits the new tokens to the caches and returns f32 logits for the rows `which` selects.
    pub fn finish_step(&self, step: Step<'_, '_>, which: LogitsFor) -> Result<Tensor> {
        let Step { spans, mut caches, hidden } = step;
        for (cache, span) in caches.iter_mut().zip(&spans) {
            cache.commit(span.len);
        }
        let x = match which {
            LogitsFor::All => hidden,
            LogitsFor::Last => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                hidden.index_select(&Tensor::from_slice(&last, last.len(), &self.device)?, 0)?
            }
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

/// A layer between [`TextModel::start_layer`] and [`TextModel::finish_layer`].
#[derive(Debug)]
pub struct LayerInFlight<'e> {
    layer: usize,
    residual: Tensor,
    feed_forward: PendingFeedForward<'e>,
}

#[derive(Debug)]
enum PendingFeedForward<'e> {
    Moe(MoeInFlight<'e>),
    Done(Tensor),
}

/// A step in progress: the hidden states of all its rows and the caches they attend to.
#[derive(Debug)]
pub struct Step<'s, 'a> {
    spans: Vec<SeqSpan>,
    caches: Vec<&'s mut (dyn KvStore + 'a)>,
    hidden: Tensor,
}

impl Step<'_, '_> {
    /// `[rows, hidden]`: the residual stream after the layers run so far.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }
}
