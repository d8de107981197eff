//! `epserve decode-bench`: decode throughput of the engine, in one process, at given batch sizes.
//! Each batch of sequences is prefilled with a prompt, then every step decodes one token for every
//! sequence; the figure is generated tokens per second of wall time over the measured steps.
//! Compares `local` and `grpc` experts, with and without micro-batch overlap, in one run.
//!
//! With experts in process it also counts the weight bytes each step reads (every matrix of the
//! model, plus one copy of each expert that any row of the step was routed to, per layer) and, with
//! `--probe-bandwidth`, measures the machine's read bandwidth, so that each batch size can be put
//! against its memory bound in the same run: a decode step cannot be faster than its bytes over the
//! bandwidth. The same flag measures the machine's peak f32 multiply-add rate in the kernels'
//! instruction set (in the bf16 mode, `vdpbf16ps`'s where that is faster and the mode uses it for
//! products of many rows) and gives each row its arithmetic bound too (the step's matrix
//! multiply-adds over that peak), and says which of the two bounds is the lower one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use epserve_coordinator::ExpertTransport;
use epserve_model::{LogitsFor, RoutingTrace, SequenceStep};
use serde_json::json;

use crate::load::{ComputeDtype, ExpertArgs};

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
    /// Measure the machine's memory read bandwidth (summing 1 GiB on every thread of the pool) and
    /// its peak f32 multiply-add rate first, and report each batch size against its memory and
    /// arithmetic bounds.
    #[arg(long)]
    pub probe_bandwidth: bool,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

pub fn run(args: DecodeBenchArgs) -> Result<()> {
    if args.batch.contains(&0) || args.prompt_len == 0 || args.steps == 0 {
        bail!("--batch, --prompt-len and --steps must be positive");
    }
    let mut standalone = args.experts.standalone(&args.model, args.dtype)?;
    let vocab = standalone.config.text.vocab_size as u32;
    let bandwidth = args.probe_bandwidth.then(read_bandwidth);
    if let Some(b) = bandwidth {
        tracing::info!("memory read bandwidth: {:.1} GB/s", b / 1e9);
    }
    let peak = args.probe_bandwidth.then(|| {
        let f32_peak = epserve_model::kernels::peak_multiply_adds_per_s();
        tracing::info!("peak f32 multiply-adds: {:.1} G/s ({:?})", f32_peak / 1e9, epserve_model::kernels::isa());
        // The bf16 mode's products of many rows run on `vdpbf16ps` where it is the faster
        // instruction: their peak is its rate (one-row products are memory-bound either way).
        let bf16_speedup = (args.experts.quant.activations == epserve_model::quant::Activations::Bf16
            && epserve_model::kernels::bf16_products_of_many_rows())
        .then(epserve_model::kernels::bf16_dot_speedup)
        .flatten()
        .filter(|&s| s > 1.0);
        match bf16_speedup {
            Some(s) => {
                tracing::info!(
                    "peak bf16 multiply-adds (vdpbf16ps): {:.1} G/s, the arithmetic bound",
                    f32_peak * s / 1e9
                );
                f32_peak * s
            }
            None => f32_peak,
        }
    });
    let multiply_adds_per_token = standalone.config.text.multiply_adds_per_token() as f64;
    let expert_bytes = match &standalone.experts {
        ExpertTransport::Local(shard) => shard.expert_bytes(),
        ExpertTransport::Grpc(_) => None,
    };
    let modes: Vec<bool> = if args.both_overlap { vec![false, true] } else { vec![args.experts.overlap] };
    let mut results = Vec::new();
    for &batch in &args.batch {
        for &overlap in &modes {
            standalone.overlap = overlap;
            let mut caches: Vec<_> = (0..batch).map(|_| standalone.model.new_cache()).collect();
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..args.prompt_len).map(|i| ((i * 31 + b * 7 + 1) as u32) % vocab).collect())
                .collect();
            for (cache, prompt) in caches.iter_mut().zip(&prompts) {
                standalone.step(&mut [SequenceStep::new(prompt, cache)], LogitsFor::Last)?;
            }
            let mut next: Vec<[u32; 1]> = (0..batch).map(|b| [(b as u32 * 13 + 5) % vocab]).collect();
            let mut started = Instant::now();
            let mut trace = RoutingTrace::default();
            for step in 0..args.steps + 3 {
                if step == 3 {
                    started = Instant::now();
                    trace = RoutingTrace::default();
                }
                let mut seqs: Vec<SequenceStep<'_>> =
                    caches.iter_mut().zip(&next).map(|(cache, t)| SequenceStep::new(t, cache)).collect();
                let logits = standalone.step_traced(&mut seqs, LogitsFor::Last, Some(&mut trace))?.to_vec2::<f32>()?;
                for (n, row) in next.iter_mut().zip(&logits) {
                    n[0] = epserve_coordinator::sampling::argmax(row);
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
            let mut row = json!({
                "transport": standalone.experts.name(),
                "workers": args.experts.workers.len(),
                "wire": if args.experts.workers.is_empty() { "none".to_owned() } else { format!("{:?}", args.experts.wire_dtype).to_lowercase() },
                "batch": batch,
                "overlap": overlap,
                "steps": args.steps,
                "step_ms": secs * 1e3 / args.steps as f64,
                "tokens_per_s": tokens_per_s,
            });
            // Overlap does not trace its routing: no byte count then.
            if let (Some(expert_bytes), false) = (expert_bytes, trace.layers.is_empty()) {
                let touched = experts_touched(&trace) / args.steps as f64;
                let bytes = standalone.model.matrix_bytes() as f64 + touched * expert_bytes as f64;
                let achieved = bytes / (secs / args.steps as f64);
                tracing::info!(
                    batch,
                    "{:.1} experts per MoE layer, {:.1} MB of weights per step, read at {:.1} GB/s",
                    touched / standalone.config.text.moe_layers().count().max(1) as f64,
                    bytes / 1e6,
                    achieved / 1e9
                );
                row["experts_per_moe_layer"] =
                    json!(touched / standalone.config.text.moe_layers().count().max(1) as f64);
                row["weight_bytes_per_step"] = json!(bytes);
                row["weight_gb_per_s"] = json!(achieved / 1e9);
                if let Some(bandwidth) = bandwidth {
                    row["bound_tokens_per_s"] = json!(batch as f64 * bandwidth / bytes);
                    row["fraction_of_bound"] = json!(achieved / bandwidth);
                }
            }
            if let Some(peak) = peak {
                let bound = peak / multiply_adds_per_token;
                row["multiply_adds_per_token"] = json!(multiply_adds_per_token);
                row["arithmetic_bound_tokens_per_s"] = json!(bound);
                row["fraction_of_arithmetic_bound"] = json!(tokens_per_s / bound);
                if let Some(memory) = row["bound_tokens_per_s"].as_f64() {
                    row["lower_bound"] = json!(if memory <= bound { "memory" } else { "arithmetic" });
                }
            }
            results.push(row);
        }
    }
    if let Some(b) = bandwidth {
        results.push(json!({ "memory_read_gb_per_s": b / 1e9 }));
    }
    if let Some(p) = peak {
        results.push(json!({ "peak_multiply_adds_g_per_s": p / 1e9, "isa": format!("{:?}", epserve_model::kernels::isa()).to_lowercase() }));
    }
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

/// Distinct (layer, expert) pairs routed to in each step of `trace`, summed over the steps: the
/// experts whose weights those steps had to read. A trace holds one entry per MoE layer per step.
fn experts_touched(trace: &RoutingTrace) -> f64 {
    trace
        .layers
        .iter()
        .map(|(_, rows)| rows.iter().flatten().collect::<std::collections::BTreeSet<_>>().len() as f64)
        .sum()
}

/// Bytes per second read by summing a 1 GiB buffer on every thread of rayon's pool (best of 3).
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 18;
    let data = vec![1.0f32; 1 << 28];
    let mut best = 0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let sum: f32 = data
            .par_chunks(CHUNK)
            .map(|chunk| {
                // 16 independent sums: vectorized loads, no dependency chain on one accumulator.
                let mut acc = [0f32; 16];
                for block in chunk.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(block) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let rate = (data.len() * 4) as f64 / started.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(rate);
    }
    best
}
