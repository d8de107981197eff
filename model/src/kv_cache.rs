//! A per-sequence KV cache for incremental decoding: one growable buffer per layer, laid out
//! `[kv_heads, capacity, head_dim]` so that the live part is a view attention can use directly.
//! The paged, shared cache of the serving engine replaces it there; this one serves `generate`,
//! `logits` and the parity tests.

use candle_core::{DType, Device, Tensor};

use crate::config::TextConfig;
use crate::error::Result;

/// The keys and values of one sequence, as attention sees them. Implementations: [`KvCache`] (one
/// growable buffer per layer) and the serving engine's paged cache.
pub trait KvStore: Send + std::fmt::Debug {
    /// Tokens already stored: the absolute position of the next token.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `k`, `v` (`[kv_heads, new, head_dim]`, contiguous) for positions `len()..len()+new` of
    /// `layer` and returns the keys and values of positions `from..len()+new`, each
    /// `[kv_heads, n, head_dim]`. Called once per layer per step, before [`KvStore::commit`]; a step
    /// that fails before the commit must leave `len()` unchanged.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<(Tensor, Tensor)>;

    /// Like [`KvStore::append`], but the keys and values of positions `from..len()+new` are returned
    /// where they are stored, by slot, instead of gathered into new tensors: decode attention reads
    /// them in place, so a step does not copy the whole context. `None`, with nothing stored, from
    /// a store without such a layout (the caller then uses `append`).
    fn append_in_place(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<Option<KvSlots>> {
        let _ = (layer, k, v, from);
        Ok(None)
    }

    /// Marks the `new` tokens of this step as stored, once every layer has run.
    fn commit(&mut self, new: usize);
}

/// One layer's keys and values addressed by slot: position `from + j` of KV head `h` is the row of
/// `head_dim` floats at `(slots[j] · kv_heads + h) · head_dim` of `k` and of `v`, both
/// `[slots, kv_heads, head_dim]` and contiguous.
#[derive(Debug, Clone)]
pub struct KvSlots {
    pub k: Tensor,
    pub v: Tensor,
    pub slots: Vec<u32>,
}

#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Empty until the first append allocates every layer.
    layers: Vec<LayerKv>,
    num_layers: usize,
    /// Tokens stored (the same in every layer once a step has finished).
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    pub fn new(cfg: &TextConfig, dtype: DType, device: &Device) -> Self {
        KvCache {
            layers: Vec::new(),
            num_layers: cfg.num_hidden_layers,
            len: 0,
            capacity: 0,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            dtype,
            device: device.clone(),
        }
    }

    fn grow_to(&mut self, needed: usize) -> Result<()> {
        if needed > self.capacity { self.grow(needed) } else { Ok(()) }
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        let capacity = needed.next_power_of_two().max(64);
        let shape = (self.kv_heads, capacity, self.head_dim);
        let mut layers = Vec::with_capacity(self.num_layers);
        for i in 0..self.num_layers {
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = self.layers.get(i) {
                k.slice_set(&old.k, 1, 0)?;
                v.slice_set(&old.v, 1, 0)?;
            }
            layers.push(LayerKv { k, v });
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }
}

impl KvStore for KvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<(Tensor, Tensor)> {
        let new = k.dim(1)?;
        let start = self.len;
        let needed = start + new;
        self.grow_to(needed)?;
        let entry = &self.layers[layer];
        entry.k.slice_set(k, 1, start)?;
        entry.v.slice_set(v, 1, start)?;
        Ok((entry.k.narrow(1, from, needed - from)?, entry.v.narrow(1, from, needed - from)?))
    }

    fn commit(&mut self, new: usize) {
        self.len += new;
    }
}
