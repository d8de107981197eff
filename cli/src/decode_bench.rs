//! `epserve decode-bench`: decode throughput of the engine, in one process, at given batch sizes.
//! Each batch of sequences is prefilled with a prompt, then every step decodes one token for every
//! sequence; the figure is generated tokens per second of wall time over the measured steps.
//! Compares `local` and `grpc` experts, with and without micro-batch overlap, in one run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use epserve_model::{LogitsFor, SequenceStep};
use serde_json::json;

use crate::load::{ComputeDtype, ExpertArgs, engine};

#[derive(Debug, clap::Args)]
pub struct DecodeBenchArgs {
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence before decoding starts.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Measured decode steps (after 3 warm-up steps).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Measure with and without micro-batch overlap (ignores --overlap).
    #[arg(long)]
    pub both_overlap: bool,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

pub fn run(args: DecodeBenchArgs) -> Result<()> {
    if args.batch.contains(&0) || args.prompt_len == 0 || args.steps == 0 {
        bail!("--batch, --prompt-len and --steps must be positive");
    }
    let mut engine = engine(&args.model, args.dtype, &args.experts)?;
    let vocab = engine.config.text.vocab_size as u32;
    let modes: Vec<bool> = if args.both_overlap { vec![false, true] } else { vec![args.experts.overlap] };
    let mut results = Vec::new();
    for &batch in &args.batch {
        for &overlap in &modes {
            engine.overlap = overlap;
            let mut caches: Vec<_> = (0..batch).map(|_| engine.model.new_cache()).collect();
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..args.prompt_len).map(|i| ((i * 31 + b * 7 + 1) as u32) % vocab).collect())
                .collect();
            for (cache, prompt) in caches.iter_mut().zip(&prompts) {
                engine.step(&mut [SequenceStep { tokens: prompt, cache }], LogitsFor::Last)?;
            }
            let mut next: Vec<[u32; 1]> = (0..batch).map(|b| [(b as u32 * 13 + 5) % vocab]).collect();
            let mut started = Instant::now();
            for step in 0..args.steps + 3 {
                if step == 3 {
                    started = Instant::now();
                }
                let mut seqs: Vec<SequenceStep<'_>> =
                    caches.iter_mut().zip(&next).map(|(cache, t)| SequenceStep { tokens: t, cache }).collect();
                let logits = engine.step(&mut seqs, LogitsFor::Last)?.to_vec2::<f32>()?;
                for (n, row) in next.iter_mut().zip(&logits) {
                    n[0] = crate::generate::sample(row, 0.0, &mut epserve_model::synthetic::SplitMix64::new(0));
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let tokens_per_s = (batch * args.steps) as f64 / secs;
            tracing::info!(
                batch,
                overlap,
                "{tokens_per_s:.1} tokens/s ({:.2} ms per step)",
                secs * 1e3 / args.steps as f64
            );
            results.push(json!({
                "transport": engine.experts.name(),
                "workers": args.experts.workers.len(),
                "wire": if args.experts.workers.is_empty() { "none".to_owned() } else { format!("{:?}", args.experts.wire_dtype).to_lowercase() },
                "batch": batch,
                "overlap": overlap,
                "steps": args.steps,
                "step_ms": secs * 1e3 / args.steps as f64,
                "tokens_per_s": tokens_per_s,
            }));
        }
    }
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}
