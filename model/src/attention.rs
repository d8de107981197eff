//! `Llama4TextAttention` (transformers 5.24 `modeling_llama4.py`), for a batch of sequences whose
//! token rows are concatenated: projections run once on all rows, the attention itself per sequence
//! against that sequence's cache.
//!
//! Order of operations, as in HF: project → RoPE (interleaved pairs, RoPE layers) → L2 qk-norm
//! (RoPE layers, after RoPE) → temperature tuning of q (NoPE layers) → softmax(q·kᵀ/√d + mask)·v.
//! RoPE layers attend within fixed `attention_chunk_size` blocks (not a sliding window); NoPE layers
//! attend to the whole causal prefix.

use candle_core::{DType, Device, Tensor};

use crate::attend::{Query, Rows, TILE_ROWS, attend_tile};
use crate::checkpoint::WeightSource;
use crate::config::{AttentionKind, TextConfig};
#[cfg(any(test, feature = "testing"))]
use crate::deviation::Deviation;
use crate::deviation::deviates;
use crate::error::Result;
use crate::kv_cache::KvStore;
use crate::layers::{Linear, RmsNorm};
use crate::quant::{LoadPolicy, MatrixRole};
use crate::rope::Rope;

/// Rows `start..start + len` of the step belong to one sequence whose first new token sits at
/// absolute position `pos`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqSpan {
    pub start: usize,
    pub len: usize,
    pub pos: usize,
}

#[derive(Debug)]
pub(crate) struct Attention {
    layer: usize,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    kind: AttentionKind,
    qk_norm: Option<RmsNorm>,
    temperature: Option<(f64, f64)>,
    chunk: Option<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    #[cfg(any(test, feature = "testing"))]
    pub(crate) deviation: Option<Deviation>,
}

impl Attention {
    /// Bytes of the four projections as kept in memory.
    pub fn matrix_bytes(&self) -> u64 {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
    }

    pub fn load(
        cfg: &TextConfig,
        layer: usize,
        src: &dyn WeightSource,
        prefix: &str,
        (dtype, policy): (DType, LoadPolicy),
        dev: &Device,
    ) -> Result<Self> {
        let (h, nh, nkv, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let kind = cfg.attention[layer];
        let p = |name: &str| format!("{prefix}self_attn.{name}.weight");
        let how = (dtype, policy, MatrixRole::Attention);
        Ok(Attention {
            layer,
            q_proj: Linear::load(src, &p("q_proj"), (nh * d, h), how, dev)?,
            k_proj: Linear::load(src, &p("k_proj"), (nkv * d, h), how, dev)?,
            v_proj: Linear::load(src, &p("v_proj"), (nkv * d, h), how, dev)?,
            o_proj: Linear::load(src, &p("o_proj"), (h, nh * d), how, dev)?,
            kind,
            qk_norm: if kind.uses_rope() && cfg.use_qk_norm {
                Some(RmsNorm::unit(d, cfg.rms_norm_eps, dtype, dev)?)
            } else {
                None
            },
            temperature: (!kind.uses_rope() && cfg.attn_temperature_tuning)
                .then_some((cfg.attn_scale, cfg.floor_scale)),
            chunk: if kind == AttentionKind::ChunkedRope { cfg.attention_chunk_size } else { None },
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            #[cfg(any(test, feature = "testing"))]
            deviation: None,
        })
    }

    pub fn forward<'c, 'd>(
        &self,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&'c mut (dyn KvStore + 'd)],
        rope: &Rope,
    ) -> Result<Tensor> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let n = x.dim(0)?;
        // Position-wise work runs once for all rows of the step, each row with its own position:
        // as `[rows, heads, 1, d]`, a row is a batch of its own for RoPE.
        let positions: Vec<usize> = spans.iter().flat_map(|s| s.pos..s.pos + s.len).collect();
        let mut q_all = self.q_proj.forward(x)?.reshape((n, nh, 1, d))?;
        let mut k_all = self.k_proj.forward(x)?.reshape((n, nkv, 1, d))?;
        let v_all = self.v_proj.forward(x)?.reshape((n, nkv, 1, d))?;
        if self.kind.uses_rope() {
            let (cos, sin) = rope.cos_sin(positions.iter().copied(), x.device())?;
            let (cos, sin) = (
                cos.reshape((n, 1, d / 2))?.to_dtype(q_all.dtype())?,
                sin.reshape((n, 1, d / 2))?.to_dtype(q_all.dtype())?,
            );
            let apply = |m: &Tensor| -> Result<Tensor> {
                Ok(if deviates!(self.deviation, RotateHalfRope) {
                    candle_nn::rotary_emb::rope(m, &cos, &sin)?
                } else {
                    candle_nn::rotary_emb::rope_i(m, &cos, &sin)?
                })
            };
            q_all = apply(&q_all)?;
            k_all = apply(&k_all)?;
            if let Some(norm) = self.qk_norm.as_ref().filter(|_| !deviates!(self.deviation, NoQkNorm)) {
                q_all = norm.forward(&q_all)?;
                k_all = norm.forward(&k_all)?;
            }
        }
        if let Some((attn_scale, floor_scale)) = self.temperature
            && !deviates!(self.deviation, NoTemperatureTuning)
        {
            // s(p) = 1 + attn_scale·ln(1 + floor((p + 1) / floor_scale)), p absolute.
            let scales: Vec<f32> = positions
                .iter()
                .map(|&p| (1.0 + attn_scale * (1.0 + ((p as f64 + 1.0) / floor_scale).floor()).ln()) as f32)
                .collect();
            let scales = Tensor::from_vec(scales, (n, 1, 1, 1), x.device())?.to_dtype(q_all.dtype())?;
            q_all = q_all.broadcast_mul(&scales)?;
        }
        let chunk = if deviates!(self.deviation, NoChunkMask) { None } else { self.chunk };

        if q_all.dtype() == DType::F32 && x.device().is_cpu() {
            let out = self.attend_rows(&q_all, &k_all, &v_all, spans, caches, chunk)?;
            return self.o_proj.forward(&out);
        }

        let mut outputs = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let t = span.len;
            // [T, heads, 1, d] → [heads, T, d]
            let heads = |m: &Tensor, h: usize| -> Result<Tensor> {
                Ok(m.narrow(0, span.start, t)?.reshape((t, h, d))?.transpose(0, 1)?.contiguous()?)
            };
            let q = heads(&q_all, nh)?;
            let k = heads(&k_all, nkv)?;
            let v = heads(&v_all, nkv)?;

            // Keys needed: the whole prefix on full layers; from the first query's chunk start on
            // chunked layers (older keys are masked out for every query of this step anyway).
            let from = match chunk {
                Some(c) => span.pos / c * c,
                None => 0,
            };
            let (keys, values) = cache.append(self.layer, &k, &v, from)?;
            let n_keys = keys.dim(1)?;

            // GQA without copying KV: query head h uses KV head h / group, so view q as
            // [kv_heads, group·T, d] and multiply by each KV head's keys once.
            let group = nh / nkv;
            let q = q.reshape((nkv, group * t, d))?;
            let scale = 1.0 / (d as f64).sqrt();
            let mut scores = (q.matmul(&keys.transpose(1, 2)?)? * scale)?;
            if let Some(mask) = causal_mask(span.pos, t, from, n_keys, chunk, x.device())? {
                scores = scores
                    .reshape((nkv, group, t, n_keys))?
                    .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                    .reshape((nkv, group * t, n_keys))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&values)?; // [kv_heads, group·T, d]
            outputs.push(out.reshape((nh, t, d))?.transpose(0, 1)?.reshape((t, nh * d))?);
        }
        let out = if outputs.len() == 1 { outputs.swap_remove(0) } else { Tensor::cat(&outputs, 0)? };
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// Every query row of a step (decode tokens and prompt chunks alike), f32 on the CPU, in plain
    /// Rust: each sequence's keys and values are stored, then read where the cache keeps them (the
    /// paged pool's slots; no gather of the context into new tensors, no transposes, no mask
    /// tensor). One parallel task per (tile of up to `TILE_ROWS` rows of one sequence, KV head):
    /// the `group` query heads of those rows go through the KV head's keys block by block with an
    /// online softmax ([`crate::attend`]), each row over its own window — the positions from its
    /// chunk's start (chunked layers) or from 0, up to its own, which is the causal mask.
    fn attend_rows<'c, 'd>(
        &self,
        q_all: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&'c mut (dyn KvStore + 'd)],
        chunk: Option<usize>,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let rows = q_all.dim(0)?;
        let mut kv = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let t = span.len;
            if span.start + t > rows {
                return Err(bad_layout("a span outside the step"));
            }
            // [T, kv heads, 1, d] → [kv heads, T, d], as the cache takes them.
            let heads = |m: &Tensor| -> Result<Tensor> {
                let m = m.narrow(0, span.start, t)?;
                Ok(if t == 1 {
                    m.reshape((nkv, 1, d))?
                } else {
                    m.reshape((t, nkv, d))?.transpose(0, 1)?.contiguous()?
                })
            };
            let (k, v) = (heads(k_all)?, heads(v_all)?);
            // Keys from the first query's chunk start (older keys are hidden from every query).
            let from = chunk.map_or(0, |c| span.pos / c * c);
            let context = match cache.append_in_place(self.layer, &k, &v, from)? {
                Some(slots) => Context::InPlace(slots),
                None => {
                    let (k, v) = cache.append(self.layer, &k, &v, from)?;
                    Context::Gathered(k, v)
                }
            };
            kv.push((context, from));
        }
        let q = q_all.flatten_all()?.to_vec1::<f32>()?;
        let group = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        // Tasks: (sequence, first row, end row, KV head), tiles of up to TILE_ROWS rows of one
        // sequence; a decode row is a tile of its own.
        let mut tasks = Vec::new();
        for (i, span) in spans.iter().enumerate() {
            for r0 in (span.start..span.start + span.len).step_by(TILE_ROWS) {
                let r1 = (r0 + TILE_ROWS).min(span.start + span.len);
                tasks.extend((0..nkv).map(|kvh| (i, r0, r1, kvh)));
            }
        }
        let tiles = tasks
            .par_iter()
            .map(|&(i, r0, r1, kvh)| -> Result<Vec<f32>> {
                let (span, (context, from)) = (&spans[i], &kv[i]);
                // Keys `lo..=hi` (relative to `from`) are row r's: its chunk's start to itself.
                let queries: Vec<Query<'_>> = (r0..r1)
                    .map(|r| {
                        let pos = span.pos + (r - span.start);
                        let q = &q[(r * nh + kvh * group) * d..(r * nh + (kvh + 1) * group) * d];
                        Query { q, lo: chunk.map_or(0, |c| pos / c * c) - from, hi: pos - from }
                    })
                    .collect();
                let n = queries.last().map_or(0, |q| q.hi + 1);
                let mut out = vec![0f32; (r1 - r0) * group * d];
                let done = match context {
                    Context::Gathered(keys, values) => with_rows(keys, d, |keys, k_head| {
                        with_rows(values, d, |values, v_head| {
                            let k = Rows::Packed(keys.get(kvh * k_head..kvh * k_head + n * d)?);
                            let v = Rows::Packed(values.get(kvh * v_head..kvh * v_head + n * d)?);
                            (n <= keys_len(keys, k_head, nkv, d) && n <= keys_len(values, v_head, nkv, d))
                                .then(|| attend_tile(&queries, k, v, *from, d, scale, &mut out))
                        })
                    })
                    .flatten()
                    .flatten(),
                    Context::InPlace(kv) => {
                        let (k, v) = (crate::kernels::CpuView::new(&kv.k), crate::kernels::CpuView::new(&kv.v));
                        match (k.as_ref().and_then(|k| k.f32()), v.as_ref().and_then(|v| v.f32())) {
                            (Some(k), Some(v)) if k.len() == v.len() => {
                                let at = |data| Rows::Slots { data, slots: &kv.slots, heads: nkv, head: kvh };
                                at(k).fits(n, d).then(|| attend_tile(&queries, at(k), at(v), *from, d, scale, &mut out))
                            }
                            _ => None,
                        }
                    }
                };
                done.map(|()| out).ok_or_else(|| bad_layout("the cache returned an unexpected layout"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; rows * nh * d];
        for (&(_, r0, _, kvh), tile) in tasks.iter().zip(&tiles) {
            for (r, heads) in (r0..).zip(tile.chunks_exact(group * d)) {
                out[(r * nh + kvh * group) * d..(r * nh + (kvh + 1) * group) * d].copy_from_slice(heads);
            }
        }
        Ok(Tensor::from_vec(out, (rows, nh * d), q_all.device())?)
    }
}

fn bad_layout(what: &str) -> crate::error::Error {
    crate::error::Error::Input(format!("attention: {what}"))
}

/// A sequence's keys and values for one layer of a step.
enum Context {
    /// Gathered into `[kv_heads, n, head_dim]` tensors.
    Gathered(Tensor, Tensor),
    /// Where the cache keeps them.
    InPlace(crate::kv_cache::KvSlots),
}

/// Keys per head in a `[heads, n, d]` view whose head stride is `head_stride`.
fn keys_len(data: &[f32], head_stride: usize, heads: usize, d: usize) -> usize {
    if heads == 0 || d == 0 {
        return 0;
    }
    (data.len() - (heads - 1) * head_stride) / d
}

/// Runs `f` on the f32 values of a `[heads, n, d]` CPU tensor whose rows of `d` are contiguous
/// (a narrowed cache is fine), with the stride between heads; `None` for any other layout.
fn with_rows<T>(t: &Tensor, d: usize, f: impl FnOnce(&[f32], usize) -> T) -> Option<T> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return None };
    let data = cpu.as_slice::<f32>().ok()?;
    let (dims, strides) = (layout.dims(), layout.stride());
    if dims.len() != 3 || dims[2] != d || strides[2] != 1 || (dims[1] > 1 && strides[1] != d) {
        return None;
    }
    let start = layout.start_offset();
    let head_stride = if dims[0] > 1 { strides[0] } else { dims[1] * d };
    let len = (dims[0].saturating_sub(1)) * head_stride + dims[1] * d;
    Some(f(data.get(start..start + len)?, head_stride))
}

/// Additive mask `[T, n_keys]` for queries at absolute positions `pos..pos+T` and keys at
/// `from..from+n_keys`: key j is visible to query i iff j ≤ i and, on chunked layers, both sit in
/// the same `chunk`-sized block. `None` when every key is visible (a single decode token).
fn causal_mask(
    pos: usize,
    t: usize,
    from: usize,
    n_keys: usize,
    chunk: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let visible = |i: usize, j: usize| j <= i && chunk.is_none_or(|c| i / c == j / c);
    let all_visible = (pos..pos + t).all(|i| (from..from + n_keys).all(|j| visible(i, j)));
    if all_visible {
        return Ok(None);
    }
    let mut mask = Vec::with_capacity(t * n_keys);
    for i in pos..pos + t {
        mask.extend((from..from + n_keys).map(|j| if visible(i, j) { 0.0f32 } else { f32::NEG_INFINITY }));
    }
    Ok(Some(Tensor::from_vec(mask, (t, n_keys), dev)?))
}
