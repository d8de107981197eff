//! The paged KV cache shared by every sequence of an engine.
//!
//! One pool of fixed-size blocks (`block_size` token slots of `[kv_heads, head_dim]` keys and values)
//! backs every layer: a block belongs to one (sequence, layer) at a time. Each sequence keeps a block
//! table per layer. Llama-4 specific: chunked-attention (RoPE) layers only ever read the current
//! chunk's keys, so their blocks that end before the current chunk's start are freed — with Scout's
//! 8,192-token chunk, 36 of 48 layers hold at most ~one chunk however long the context.

use candle_core::{DType, Device, Tensor};
use epserve_model::config::{AttentionKind, TextConfig};
use epserve_model::{KvSlots, KvStore, Result};

/// How much memory the pool gets, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCapacity {
    /// Room for this many tokens of context in every layer.
    Tokens(usize),
    Bytes(usize),
}

#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    num_blocks: usize,
    k: Tensor,
    v: Tensor,
    free: Vec<u32>,
    /// Per layer: `Some(chunk)` when its blocks before the current chunk may be freed.
    chunk_of_layer: Vec<Option<usize>>,
    block_bytes: usize,
}

/// Block tables of one sequence.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    /// Tokens whose keys and values are stored.
    len: usize,
    layers: Vec<LayerBlocks>,
}

#[derive(Debug, Default, Clone)]
struct LayerBlocks {
    /// Logical index (position / block_size) of `blocks[0]`.
    first: usize,
    blocks: Vec<u32>,
}

impl SeqBlocks {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held, over all layers.
    pub fn blocks_held(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len()).sum()
    }

    /// Blocks held by `layer`.
    pub fn layer_blocks(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.blocks.len())
    }
}

impl KvPool {
    pub fn new(
        cfg: &TextConfig,
        capacity: KvCapacity,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slot_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes();
        let block_bytes = block_size * slot_bytes;
        let num_blocks = match capacity {
            KvCapacity::Tokens(t) => t.div_ceil(block_size) * cfg.num_hidden_layers,
            KvCapacity::Bytes(b) => b / block_bytes,
        };
        if num_blocks == 0 {
            return Err(epserve_model::Error::Input(format!("KV capacity {capacity:?} is smaller than one block")));
        }
        let shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim);
        let chunk_of_layer = cfg
            .attention
            .iter()
            .map(|k| if *k == AttentionKind::ChunkedRope { cfg.attention_chunk_size } else { None })
            .collect();
        Ok(KvPool {
            block_size,
            num_blocks,
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            free: (0..num_blocks as u32).rev().collect(),
            chunk_of_layer,
            block_bytes,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn capacity_bytes(&self) -> usize {
        self.num_blocks * self.block_bytes
    }

    /// Tokens of context a single sequence could hold if it had the whole pool.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks / self.chunk_of_layer.len().max(1) * self.block_size
    }

    /// The first position layer `layer` still needs when the next query is at `pos`.
    fn keep_from(&self, layer: usize, pos: usize) -> usize {
        match self.chunk_of_layer[layer] {
            Some(c) => pos / c * c,
            None => 0,
        }
    }

    /// Blocks `layer` holds for a sequence of `len` tokens whose next query is at `next_pos`.
    fn blocks_for(&self, layer: usize, next_pos: usize, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        let first = self.keep_from(layer, next_pos).min(len) / self.block_size;
        (len - 1) / self.block_size + 1 - first
    }

    /// Most blocks a sequence ever holds at once if it reaches `total_len` tokens.
    pub fn blocks_for_sequence(&self, total_len: usize) -> usize {
        (0..self.chunk_of_layer.len())
            .map(|l| match self.chunk_of_layer[l] {
                // The widest moment: a full chunk plus a block straddling its start.
                Some(c) => self.blocks_for(l, 0, total_len.min(c + self.block_size)),
                None => self.blocks_for(l, 0, total_len),
            })
            .sum()
    }

    /// Extra blocks `seq` needs to store `new` more tokens (after freeing what it no longer needs).
    pub fn blocks_needed(&self, seq: &SeqBlocks, new: usize) -> usize {
        let next = seq.len;
        (0..self.chunk_of_layer.len())
            .map(|l| {
                let held = seq.layers.get(l).map_or(0, |b| b.blocks.len());
                let after_trim = held.min(self.blocks_for(l, next, seq.len));
                self.blocks_for(l, next, next + new).saturating_sub(after_trim)
            })
            .sum()
    }

    /// Frees the blocks chunked layers no longer need, then allocates room for `new` more tokens.
    /// Returns false (allocating nothing) when the pool is short.
    pub fn reserve(&mut self, seq: &mut SeqBlocks, new: usize) -> bool {
        self.trim(seq);
        if self.blocks_needed(seq, new) > self.free.len() {
            return false;
        }
        let layers = self.chunk_of_layer.len();
        seq.layers.resize_with(layers, LayerBlocks::default);
        let last_block = (seq.len + new - 1) / self.block_size;
        for table in &mut seq.layers {
            if table.blocks.is_empty() {
                table.first = seq.len / self.block_size;
            }
            while table.first + table.blocks.len() <= last_block {
                let Some(b) = self.free.pop() else { return false };
                table.blocks.push(b);
            }
        }
        true
    }

    /// Frees the blocks of chunked layers that end before the chunk of the next query.
    pub fn trim(&mut self, seq: &mut SeqBlocks) {
        for (l, table) in seq.layers.iter_mut().enumerate() {
            let keep_block = self.keep_from(l, seq.len) / self.block_size;
            while table.first < keep_block && !table.blocks.is_empty() {
                self.free.push(table.blocks.remove(0));
                table.first += 1;
            }
        }
    }

    /// Returns every block of `seq` to the pool and empties it.
    pub fn release(&mut self, seq: &mut SeqBlocks) {
        for table in seq.layers.drain(..) {
            self.free.extend(table.blocks);
        }
        seq.len = 0;
    }

    /// The view attention writes and reads through, for one step.
    pub fn view<'a>(&'a self, seq: &'a mut SeqBlocks) -> PagedKv<'a> {
        PagedKv { pool: self, seq }
    }

    fn slot(&self, table: &LayerBlocks, pos: usize) -> Option<usize> {
        let b = pos / self.block_size;
        let block = *table.blocks.get(b.checked_sub(table.first)?)?;
        Some(block as usize * self.block_size + pos % self.block_size)
    }
}

/// One sequence's keys and values in the pool, as [`KvStore`] for the model.
#[derive(Debug)]
pub struct PagedKv<'a> {
    pool: &'a KvPool,
    seq: &'a mut SeqBlocks,
}

impl KvStore for PagedKv<'_> {
    fn len(&self) -> usize {
        self.seq.len
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<(Tensor, Tensor)> {
        let slots = self.store(layer, k, v, from)?;
        let n = slots.len();
        let index = Tensor::from_vec(slots, n, self.pool.k.device())?;
        let keys = self.pool.k.index_select(&index, 0)?.transpose(0, 1)?.contiguous()?;
        let values = self.pool.v.index_select(&index, 0)?.transpose(0, 1)?.contiguous()?;
        Ok((keys, values))
    }

    fn append_in_place(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<Option<KvSlots>> {
        let slots = self.store(layer, k, v, from)?;
        Ok(Some(KvSlots { k: self.pool.k.clone(), v: self.pool.v.clone(), slots }))
    }

    fn commit(&mut self, new: usize) {
        self.seq.len += new;
    }
}

impl PagedKv<'_> {
    /// Writes `k`, `v` (`[kv, new, d]`) into the slots of positions `len..len+new` of `layer`, and
    /// returns the slots of positions `from..len+new`.
    fn store(&mut self, layer: usize, k: &Tensor, v: &Tensor, from: usize) -> Result<Vec<u32>> {
        let pool = self.pool;
        let table = self.seq.layers.get(layer).ok_or_else(|| unreserved(layer))?;
        let new = k.dim(1)?;
        let start = self.seq.len;
        // [kv, new, d] → [new, kv, d]: a token's slot is one row of the pool.
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let mut at = 0;
        while at < new {
            let pos = start + at;
            let slot = pool.slot(table, pos).ok_or_else(|| unreserved(layer))?;
            let run = (pool.block_size - pos % pool.block_size).min(new - at);
            pool.k.slice_set(&k.narrow(0, at, run)?, 0, slot)?;
            pool.v.slice_set(&v.narrow(0, at, run)?, 0, slot)?;
            at += run;
        }
        (from..start + new).map(|p| pool.slot(table, p).map(|s| s as u32).ok_or_else(|| unreserved(layer))).collect()
    }
}

fn unreserved(layer: usize) -> epserve_model::Error {
    epserve_model::Error::Input(format!("layer {layer}: KV blocks were not reserved for this step"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TextConfig {
        epserve_model::ModelConfig::from_json(&epserve_synthetic::Preset::Tiny.config_json(480)).expect("tiny").text
    }

    #[test]
    fn chunked_layers_stay_bounded() {
        // tiny: 4 layers, layers 0-2 chunked (chunk 8), layer 3 full; blocks of 4 tokens.
        let cfg = tiny();
        let mut pool = KvPool::new(&cfg, KvCapacity::Tokens(256), 4, DType::F32, &Device::Cpu).expect("pool");
        assert_eq!(pool.total_blocks(), 256);
        let mut seq = SeqBlocks::default();
        for _ in 0..100 {
            assert!(pool.reserve(&mut seq, 1));
            seq.len += 1;
        }
        pool.trim(&mut seq);
        assert_eq!(seq.layer_blocks(3), 25, "the full layer keeps every block");
        for l in 0..3 {
            assert!(seq.layer_blocks(l) <= 2, "chunked layer {l} holds {}", seq.layer_blocks(l));
        }
        assert_eq!(pool.used_blocks(), seq.blocks_held());
        pool.release(&mut seq);
        assert_eq!(pool.used_blocks(), 0);
    }

    /// Decode reads the pool in place: the rows the slots point at are the keys and values that
    /// `append` gathers, for two sequences whose blocks interleave in the pool.
    #[test]
    fn slots_point_at_what_append_gathers() {
        let cfg = tiny();
        let (kv, d) = (cfg.num_key_value_heads, cfg.head_dim);
        let mut pool = KvPool::new(&cfg, KvCapacity::Tokens(256), 4, DType::F32, &Device::Cpu).expect("pool");
        let mut seqs = [SeqBlocks::default(), SeqBlocks::default()];
        let mut value = 0f32;
        for step in 0..21 {
            for seq in seqs.iter_mut() {
                assert!(pool.reserve(seq, 1));
                let mut view = pool.view(seq);
                for layer in 0..cfg.num_hidden_layers {
                    let k: Vec<f32> = (0..kv * d).map(|i| value + i as f32).collect();
                    value += 1000.0;
                    let k = Tensor::from_vec(k, (kv, 1, d), &Device::Cpu).expect("k");
                    let v = (&k * -1.0).expect("v");
                    // What attention asks for: chunked layers only from the current chunk's start.
                    let from = pool.chunk_of_layer[layer].map_or(0, |c| step / c * c);
                    let slots = view
                        .append_in_place(layer, &k, &v, from)
                        .unwrap_or_else(|e| panic!("step {step}: {e}"))
                        .expect("a paged store");
                    let (keys, values) = view.append(layer, &k, &v, from).expect("gathered");
                    assert_eq!(slots.slots.len(), keys.dim(1).expect("n"));
                    let (pool_k, pool_v) = (flat(&slots.k), flat(&slots.v));
                    let (keys, values) = (keys.to_vec3::<f32>().expect("k"), values.to_vec3::<f32>().expect("v"));
                    for h in 0..kv {
                        for (j, &slot) in slots.slots.iter().enumerate() {
                            let at = (slot as usize * kv + h) * d;
                            assert_eq!(
                                &pool_k[at..at + d],
                                &keys[h][j][..],
                                "step {step} layer {layer} head {h} key {j}"
                            );
                            assert_eq!(&pool_v[at..at + d], &values[h][j][..]);
                        }
                    }
                }
                view.commit(1);
            }
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().expect("flatten").to_vec1().expect("f32")
    }

    #[test]
    fn reserve_refuses_when_short() {
        let cfg = tiny();
        let mut pool = KvPool::new(&cfg, KvCapacity::Tokens(8), 4, DType::F32, &Device::Cpu).expect("pool");
        assert_eq!(pool.total_blocks(), 8);
        let mut a = SeqBlocks::default();
        assert!(pool.reserve(&mut a, 8), "8 tokens × 4 layers = 8 blocks of 4");
        let mut b = SeqBlocks::default();
        assert!(!pool.reserve(&mut b, 1));
        assert_eq!(b.blocks_held(), 0, "a refused reservation allocates nothing");
        pool.release(&mut a);
        assert!(pool.reserve(&mut b, 1));
    }
}
