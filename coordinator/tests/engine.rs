//! The serving engine on the tiny fixture with experts in process: continuous batching gives each
//! request the tokens it gets alone, preemption loses nothing, cancellation frees blocks, chunked
//! layers stay bounded.

mod support;

use support::{collect, prompt};

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use epserve_coordinator::ExpertTransport;
use epserve_coordinator::engine::{self, EngineConfig, EngineHandle, Event, FinishReason, Request};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::sampling::SamplingParams;
use epserve_model::{
    ExpertBackend, ExpertBatch, ExpertsInFlight, KvCache, LogitsFor, ModelConfig, Retry, SequenceStep, TextModel,
};
use tokio::sync::mpsc::Receiver;

fn start(capacity_tokens: usize, block_size: usize, max_batch_tokens: usize) -> EngineHandle {
    let (cfg, model, experts) = support::load_tiny();
    start_with(cfg, model, experts, capacity_tokens, block_size, max_batch_tokens)
}

fn start_with<E: ExpertBackend + 'static>(
    cfg: ModelConfig,
    model: TextModel,
    experts: E,
    capacity_tokens: usize,
    block_size: usize,
    max_batch_tokens: usize,
) -> EngineHandle {
    let pool = KvPool::new(&cfg.text, KvCapacity::Tokens(capacity_tokens), block_size, DType::F32, &Device::Cpu)
        .expect("pool");
    engine::start(
        model,
        None,
        experts,
        pool,
        EngineConfig { max_batch_tokens, max_running: 64, ..EngineConfig::new(4096, cfg.text.eos_token_ids.clone()) },
    )
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() }
}

fn submit(engine: &EngineHandle, id: usize, prompt: Vec<u32>, sampling: SamplingParams) -> Receiver<Event> {
    let (tx, rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
    engine
        .submit(
            Request { id: format!("r{id}"), prompt, sampling, priority: 0, images: Vec::new(), constraint: None },
            tx,
        )
        .expect("submit");
    rx
}

fn wait_idle(engine: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let load = engine.load();
        if load.running == 0 && load.waiting == 0 && load.kv_blocks_used == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "engine did not go idle: {load:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 16 requests of different prompt lengths, submitted at once, each get the tokens they get alone.
fn concurrent_equals_alone(capacity_tokens: usize, max_batch_tokens: usize) -> EngineHandle {
    let alone_engine = start(4096, 16, 512);
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| prompt(1 + i * 3, i)).collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| collect(submit(&alone_engine, i, p.clone(), greedy(12))).tokens)
        .collect();
    alone_engine.stop();

    let engine = start(capacity_tokens, 4, max_batch_tokens);
    let receivers: Vec<_> =
        prompts.iter().enumerate().map(|(i, p)| submit(&engine, i, p.clone(), greedy(12))).collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let out = collect(rx);
        assert_eq!(out.tokens, alone[i], "request {i} (prompt of {} tokens)", prompts[i].len());
        assert_eq!(out.reason, FinishReason::Length);
    }
    wait_idle(&engine);
    let steps = engine.load().steps;
    assert!(steps > 12 && steps < 16 * 12, "the requests were batched, not run one by one ({steps} steps)");
    engine
}

#[test]
fn concurrent_requests_get_the_tokens_they_get_alone() {
    let engine = concurrent_equals_alone(4096, 64);
    assert_eq!(engine.load().preemptions, 0);
}

/// A cache far too small for all 16 at once: preemption and recompute, every request completes with
/// its own tokens, and every block comes back.
#[test]
fn small_cache_preempts_and_recomputes_without_losing_requests() {
    let engine = concurrent_equals_alone(64, 64);
    assert!(engine.load().preemptions > 0, "the cache was small enough to force preemption");
}

#[test]
fn cancelled_stream_frees_its_blocks() {
    let engine = start(4096, 4, 64);
    let mut rx = submit(&engine, 0, prompt(20, 1), greedy(10_000));
    for _ in 0..3 {
        assert!(matches!(rx.blocking_recv(), Some(Event::Token(_))));
    }
    assert!(engine.load().kv_blocks_used > 0);
    drop(rx);
    wait_idle(&engine);
}

#[test]
fn seeded_sampling_is_the_same_alone_and_batched() {
    let engine = start(4096, 4, 64);
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let alone = collect(submit(&engine, 0, prompt(9, 3), sampled.clone())).tokens;
    let others: Vec<_> = (1..8).map(|i| submit(&engine, i, prompt(5 + i, i), greedy(16))).collect();
    let batched = collect(submit(&engine, 99, prompt(9, 3), sampled)).tokens;
    assert_eq!(alone, batched);
    others.into_iter().for_each(|rx| {
        collect(rx);
    });
}

#[test]
fn stop_tokens_and_max_tokens_end_with_their_reason() {
    let engine = start(4096, 4, 64);
    let free_run = collect(submit(&engine, 0, prompt(7, 2), greedy(8)));
    assert_eq!((free_run.tokens.len(), free_run.reason), (8, FinishReason::Length));
    let stop_at = free_run.tokens[3];
    let first = free_run.tokens.iter().position(|&t| t == stop_at).expect("present");
    let stopped =
        collect(submit(&engine, 1, prompt(7, 2), SamplingParams { stop_token_ids: vec![stop_at], ..greedy(8) }));
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert_eq!(stopped.tokens, free_run.tokens[..=first].to_vec(), "the stop token is the last one sent");
}

/// tiny's chunk is 8 tokens: a 90-token sequence (prompt and output) keeps at most a chunk of blocks
/// on its 3 chunked layers, and the engine's logprobs match a plain full-cache forward pass.
#[test]
fn long_sequence_keeps_one_chunk_on_chunked_layers_and_matches_the_reference() {
    let block = 4;
    let engine = start(4096, block, 16);
    let p = prompt(30, 5);
    let n = 60;
    let mut rx = submit(&engine, 0, p.clone(), SamplingParams { logprobs: Some(5), ..greedy(n) });
    let mut tokens = Vec::new();
    let mut tops = Vec::new();
    let mut most_blocks = 0;
    loop {
        match rx.blocking_recv().expect("event") {
            Event::Token(s) => {
                tokens.push(s.token);
                tops.push(s.top);
                most_blocks = most_blocks.max(engine.load().kv_blocks_used);
            }
            Event::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
        }
    }
    let total = p.len() + n as usize;
    // 1 full layer holds every block; 3 chunked layers hold at most a chunk and a straddling block.
    let bound = total.div_ceil(block) + 3 * (8 / block + 1);
    let unbounded = 4 * total.div_ceil(block);
    assert!(most_blocks <= bound, "{most_blocks} blocks in use, bound {bound}");
    assert!(most_blocks < unbounded / 2, "chunk freeing saved nothing: {most_blocks} of {unbounded}");

    let (_, model, experts) = support::load_tiny();
    let mut cache = KvCache::new(model.config(), DType::F32, &Device::Cpu);
    let mut seq = p.clone();
    seq.extend_from_slice(&tokens[..tokens.len() - 1]);
    let logits = model
        .forward(&mut [SequenceStep::new(&seq, &mut cache)], &experts, LogitsFor::All, None)
        .expect("reference")
        .to_vec2::<f32>()
        .expect("rows");
    for (k, top) in tops.iter().enumerate() {
        let row = &logits[p.len() - 1 + k];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z = row.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
        for &(t, lp) in top {
            assert!((row[t as usize] - z - lp).abs() < 1e-3, "position {k}: token {t} logprob {lp} vs reference");
        }
        assert_eq!(top[0].0, tokens[k], "greedy picks the most likely token");
    }
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let engine = start(64, 4, 64);
    let (tx, _rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
    let err = engine
        .submit(
            Request {
                id: "x".into(),
                prompt: vec![600],
                sampling: greedy(4),
                priority: 0,
                images: Vec::new(),
                constraint: None,
            },
            tx.clone(),
        )
        .expect_err("out of vocabulary");
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let err = engine
        .submit(
            Request {
                id: "y".into(),
                prompt: vec![1; 5000],
                sampling: greedy(4),
                priority: 0,
                images: Vec::new(),
                constraint: None,
            },
            tx.clone(),
        )
        .expect_err("too long");
    assert!(err.to_string().contains("5000") && err.to_string().contains("4096"), "{err}");
    // Fits the context but never the cache: refused with a reason, not left waiting forever.
    let (tx, rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
    engine
        .submit(
            Request {
                id: "z".into(),
                prompt: prompt(40, 1),
                sampling: greedy(200),
                priority: 0,
                images: Vec::new(),
                constraint: None,
            },
            tx,
        )
        .expect("queued");
    let mut rx = rx;
    match rx.blocking_recv() {
        Some(Event::Finished { reason: FinishReason::Error, message: Some(m), .. }) => {
            assert!(m.contains("KV blocks"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Experts that fail the first `failures` layers they are asked for, then work.
struct FlakyExperts {
    inner: ExpertTransport,
    failures: std::sync::atomic::AtomicU32,
}

impl ExpertBackend for FlakyExperts {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + 'a>> {
        let left = self.failures.load(std::sync::atomic::Ordering::Relaxed);
        if left > 0 {
            self.failures.store(left - 1, std::sync::atomic::Ordering::Relaxed);
            return Err(epserve_model::Error::experts(batch.layer, Retry::Now, "worker unavailable (injected)"));
        }
        self.inner.submit(batch)
    }
}

/// A step whose experts fail is retried: the requests complete with the tokens they get without the
/// failure. Failures that persist end the requests with an error naming the cause, not a hang.
#[test]
fn failed_steps_are_retried_then_reported() {
    let alone = collect(submit(&start(4096, 4, 64), 0, prompt(9, 4), greedy(6))).tokens;

    let (cfg, model, experts) = support::load_tiny();
    let flaky = FlakyExperts { inner: experts, failures: 2.into() };
    let engine = start_with(cfg, model, flaky, 4096, 4, 64);
    let out = collect(submit(&engine, 0, prompt(9, 4), greedy(6)));
    assert_eq!(out.tokens, alone, "transient failures change nothing");

    let (cfg, model, experts) = support::load_tiny();
    let broken = FlakyExperts { inner: experts, failures: u32::MAX.into() };
    let engine = start_with(cfg, model, broken, 4096, 4, 64);
    let started = Instant::now();
    let mut rx = submit(&engine, 0, prompt(9, 4), greedy(6));
    match rx.blocking_recv() {
        Some(Event::Finished { reason: FinishReason::Error, message: Some(m), .. }) => {
            assert!(m.contains("injected"), "{m}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
    wait_idle(&engine);
}
