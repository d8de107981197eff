//! `epserve engine-bench`: the serving engine in process, under closed-loop load. For each
//! concurrency C, C clients each send `--requests-per-client` requests one after the other (a
//! `--prompt-len`-token prompt, exactly `--max-tokens` output tokens); reports output tokens/s over
//! the wall time and the time to first token.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use epserve_coordinator::engine::{Event, FinishReason, Request};
use epserve_coordinator::kv_pool::KvCapacity;
use epserve_coordinator::run::start_engine;
use epserve_coordinator::sampling::SamplingParams;
use epserve_coordinator::{EngineSizing, load_model};
use serde_json::json;

use crate::stats::percentile_ms;

use crate::eplb::RecordRoutingArgs;
use crate::load::{ComputeDtype, ExpertArgs};

#[derive(Debug, clap::Args)]
pub struct EngineBenchArgs {
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    pub requests_per_client: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    #[arg(long, default_value_t = 65_536)]
    pub kv_capacity_tokens: usize,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
    #[command(flatten)]
    pub routing: RecordRoutingArgs,
}

pub fn run(args: EngineBenchArgs) -> Result<()> {
    if args.concurrency.contains(&0) || args.requests_per_client == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("all sizes must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let loaded = runtime.block_on(load_model(&args.experts.load_config(&args.model, args.dtype)?, None))?;
    let vocab = loaded.config.text.vocab_size;
    let sizing = EngineSizing {
        max_batch_tokens: args.max_batch_tokens,
        max_model_len: Some(args.kv_capacity_tokens),
        ..EngineSizing::new(KvCapacity::Tokens(args.kv_capacity_tokens))
    };
    let engine = start_engine(loaded, &sizing, args.experts.overlap)?;
    let recording = args.routing.start(&args.model)?;
    let mut results = Vec::new();
    for &c in &args.concurrency {
        let started = Instant::now();
        let clients: Vec<_> = (0..c)
            .map(|client| {
                let engine = engine.clone();
                let (prompt_len, max_tokens, n) = (args.prompt_len, args.max_tokens, args.requests_per_client);
                std::thread::spawn(move || -> Result<(Vec<Duration>, usize)> {
                    let mut ttfts = Vec::new();
                    let mut tokens = 0;
                    for r in 0..n {
                        let prompt: Vec<u32> = (0..prompt_len)
                            .map(|i| ((i * 31 + client * 7 + r * 13 + 1) % vocab.min(2000)) as u32)
                            .collect();
                        let (tx, mut rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
                        let sampling =
                            SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() };
                        let sent = Instant::now();
                        engine.submit(
                            Request {
                                id: format!("c{client}-{r}"),
                                prompt,
                                sampling,
                                priority: 0,
                                images: Vec::new(),
                                constraint: None,
                            },
                            tx,
                        )?;
                        let mut first = None;
                        while let Some(event) = rx.blocking_recv() {
                            match event {
                                Event::Token(_) => {
                                    first.get_or_insert_with(|| sent.elapsed());
                                    tokens += 1;
                                }
                                Event::Finished { reason: FinishReason::Error, message, .. } => {
                                    bail!("request failed: {message:?}")
                                }
                                Event::Finished { .. } => break,
                            }
                        }
                        ttfts.extend(first);
                    }
                    Ok((ttfts, tokens))
                })
            })
            .collect();
        let mut ttfts = Vec::new();
        let mut tokens = 0;
        for h in clients {
            let (t, n) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            ttfts.extend(t);
            tokens += n;
        }
        let secs = started.elapsed().as_secs_f64();
        ttfts.sort();
        let row = json!({
            "concurrency": c,
            "requests": ttfts.len(),
            "output_tokens": tokens,
            "seconds": secs,
            "output_tokens_per_s": tokens as f64 / secs,
            "ttft_p50_ms": percentile_ms(&ttfts, 50.0),
            "ttft_p90_ms": percentile_ms(&ttfts, 90.0),
            "ttft_max_ms": percentile_ms(&ttfts, 100.0),
        });
        tracing::info!(
            "concurrency {c}: {:.1} tokens/s, TTFT p50 {:.0} ms",
            tokens as f64 / secs,
            percentile_ms(&ttfts, 50.0).unwrap_or(f64::NAN)
        );
        results.push(row);
    }
    engine.stop();
    if let Some(recording) = recording {
        recording.stop()?;
    }
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}
