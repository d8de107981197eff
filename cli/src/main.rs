//! `epserve`: the one binary of the project. Argument parsing and wiring only: every subcommand
//! turns its flags into the config of the crate that owns the behaviour and calls it — the
//! processes' lifecycles (`epserve_expert_worker`, `epserve_coordinator`, `epserve_gateway`: `start`
//! then `serve`), `epserve_coordinator::StandaloneModel` for the offline commands — and prints the
//! results. The measuring commands (`bench`, `engine-bench`, `exchange-bench`, `decode-bench`,
//! `vision-bench`) are clients, and live here.

mod batch;
mod bench;
mod certs;
mod control;
mod coordinator;
mod decode_bench;
mod engine_bench;
mod eplb;
mod eplb_live;
mod exchange_bench;
mod gateway;
mod gen_model;
mod generate;
mod load;
mod logits;
mod metrics_endpoint;
mod probe;
mod prompt;
mod quality;
mod stats;
mod tls;
mod up;
mod vision_bench;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "epserve", version, about = "Expert-parallel serving of Llama-4-style mixture-of-experts models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a whole cluster on this machine: gateway, coordinator(s) and expert workers.
    Up(up::UpArgs),
    /// Serve the OpenAI-compatible HTTP API in front of coordinators.
    Gateway(gateway::GatewayArgs),
    /// Submit a JSONL file of requests to a gateway's Batch API (and follow it with --wait).
    Batch(batch::BatchCommand),
    /// Print JSON logits for given token ids.
    Logits(logits::LogitsArgs),
    /// Generate from a prompt, offline, in one process.
    Generate(generate::GenerateArgs),
    /// Write a random-weight checkpoint in hub layout for a named shape.
    GenModel(gen_model::GenModelArgs),
    /// Serve a shard of the experts of every MoE layer over gRPC.
    Worker(worker::WorkerArgs),
    /// Serve the engine (continuous batching, KV cache, sampling) over gRPC.
    Coordinator(coordinator::CoordinatorArgs),
    /// Measure decode throughput of the engine at given batch sizes (local or through workers).
    DecodeBench(decode_bench::DecodeBenchArgs),
    /// Load generator for any OpenAI-compatible endpoint (or a coordinator's gRPC API).
    Bench(bench::BenchArgs),
    /// Measure the serving engine in process under closed-loop load (tokens/s, TTFT).
    EngineBench(engine_bench::EngineBenchArgs),
    /// Measure expert-exchange round trips with one running worker.
    ExchangeBench(exchange_bench::ExchangeBenchArgs),
    /// Measure the vision encoder on a Scout-shaped tower against the machine's matmul peak.
    VisionBench(vision_bench::VisionBenchArgs),
    /// Compare a quantized model's logits with the unquantized ones (KL divergence, top-1 agreement).
    Quality(quality::QualityArgs),
    /// Issue a development CA and per-component certificates for mutual TLS on the gRPC links.
    Certs(certs::CertsArgs),
    /// Expert load balancing, offline: routing-trace statistics, placement planning, replay.
    Eplb(eplb::EplbArgs),
    /// Health check for container engines without gRPC probes: exits 0 when healthy.
    Probe(probe::ProbeArgs),
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// glibc's allocator serves every buffer above 128 KiB (its threshold then adapts) with a fresh
/// `mmap` and gives freed heap tops back to the kernel, so a forward pass's activations, allocated
/// and freed per block of rows, were zero-filled pages faulted in again at every block: a 512-token
/// prefill's TTFT moved between ~195 and ~285 ms from run to run, and batch-32 decode lost ~15 %
/// (docs/benchmarks.md, "Short rows one at a time"). Buffers up to 32 MiB (glibc's largest
/// threshold) now come from the heap, and up to 128 MiB of free heap top is kept; peak resident
/// memory did not change. Skipped where the operator tunes malloc with `GLIBC_TUNABLES`.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        // SAFETY: mallopt only changes the allocator's parameters; called before any other thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
    }
}

fn main() -> std::process::ExitCode {
    // candle asks for its thread count at every matrix product and, unless RAYON_NUM_THREADS is set,
    // parses /proc/cpuinfo each time: ~6 % of a decode step at batch 32 (docs/benchmarks.md). Pin it
    // once to the CPUs this process may run on.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: first statement of main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs collected from files and pipes stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EPSERVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::GenModel(args) => gen_model::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::DecodeBench(args) => decode_bench::run(args),
        Command::ExchangeBench(args) => exchange_bench::run(args),
        Command::EngineBench(args) => engine_bench::run(args),
        Command::Bench(args) => bench::run(args),
        Command::VisionBench(args) => vision_bench::run(args),
        Command::Quality(args) => quality::run(args),
        Command::Certs(args) => certs::run(args),
        Command::Eplb(args) => eplb::run(args),
        Command::Probe(args) => probe::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
