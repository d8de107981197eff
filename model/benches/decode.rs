//! Decode cost on the `mini` shape (hidden 512, 8 layers, 16 experts top-1), f32 on CPU, random
//! weights: one MoE decoder layer, and a full decode step (embeddings → 8 layers → logits), at
//! batch 1 and batch 32 with a 100-token context per sequence.
//!
//! `cargo bench -p epserve-model --bench decode`; figures in docs/benchmarks.md.

use candle_core::{DType, Device};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use epserve_model::{ExpertShard, KvCache, LogitsFor, ModelConfig, SequenceStep, TextModel, WeightStorage};
use epserve_synthetic::{Preset, RandomWeights};

// Below the cache's 128-slot capacity, so that a measured step never pays for growing the cache.
const CONTEXT: usize = 100;

struct Mini {
    model: TextModel,
    experts: ExpertShard,
}

fn mini() -> Mini {
    let cfg = ModelConfig::from_json(&Preset::Mini.config_json(3000)).expect("mini config");
    let src = RandomWeights::new(7);
    let all: Vec<u32> = (0..16).collect();
    Mini {
        model: TextModel::load(&cfg, &src, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {})
            .expect("model"),
        experts: ExpertShard::load(&cfg, &src, &all, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
            .expect("experts"),
    }
}

/// `batch` caches each holding a `CONTEXT`-token prompt, and each sequence's next token.
fn prefilled(m: &Mini, batch: usize) -> (Vec<KvCache>, Vec<u32>) {
    let mut caches = Vec::with_capacity(batch);
    let mut next = Vec::with_capacity(batch);
    for b in 0..batch {
        let prompt: Vec<u32> = (0..CONTEXT).map(|i| ((i * 31 + b * 97) % 2000) as u32).collect();
        let mut cache = m.model.new_cache();
        m.model
            .forward(&mut [SequenceStep::new(&prompt, &mut cache)], &m.experts, LogitsFor::Last, None)
            .expect("prefill");
        caches.push(cache);
        next.push((b * 13 % 2000) as u32);
    }
    (caches, next)
}

/// Times `step` on decode batches of 1 and 32 sequences, each with a prefilled cache.
fn decode_group(c: &mut Criterion, m: &Mini, name: &str, step: impl Fn(&Mini, &mut [SequenceStep<'_>]) -> usize) {
    let mut group = c.benchmark_group(name);
    for batch in [1usize, 32] {
        let (caches, next) = prefilled(m, batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("decode", batch), &batch, |b, _| {
            b.iter(|| {
                // Cloned caches share their buffers; a step writes past the prompt and is dropped.
                let mut caches = caches.clone();
                let tokens: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
                let mut seqs: Vec<SequenceStep<'_>> =
                    caches.iter_mut().zip(&tokens).map(|(cache, t)| SequenceStep::new(t, cache)).collect();
                step(m, &mut seqs)
            })
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    let m = mini();
    decode_group(c, &m, "mini_moe_layer", |m, seqs| {
        let mut step = m.model.begin_step(seqs).expect("step");
        m.model.run_layer(&mut step, 0, &m.experts, None).expect("layer");
        step.hidden().dims().len()
    });
    decode_group(c, &m, "mini_decode_step", |m, seqs| {
        m.model.forward(seqs, &m.experts, LogitsFor::Last, None).expect("step").dims().len()
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
