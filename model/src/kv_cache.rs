//! A per-sequence KV cache for incremental decoding: one growable buffer per layer, laid out
//! `[kv_heads, capacity, head_dim]` so that the live part is a view attention can use directly.
//! The paged, shared cache of the serving engine replaces it there; this one serves `generate`,
//! `logits` and the parity tests.

use candle_core::{DType, Device, Tensor};

use crate::config::TextConfig;
use crate::error::Result;

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

    /// Tokens already in the cache: the absolute position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`, contiguous) to `layer` and returns the keys and
    /// values of positions `from..` up to and including the new ones.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<(Tensor, Tensor)> {
        let new = k.dim(1)?;
        let start = self.len;
        let needed = start + new;
        if needed > self.capacity {
            self.grow(needed)?;
        }
        let entry = &self.layers[layer];
        entry.k.slice_set(k, 1, start)?;
        entry.v.slice_set(v, 1, start)?;
        Ok((entry.k.narrow(1, from, needed - from)?, entry.v.narrow(1, from, needed - from)?))
    }

    /// Marks the tokens appended by this step as stored; called once all layers have run.
    pub(crate) fn commit(&mut self, new: usize) {
        self.len += new;
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
