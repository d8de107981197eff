//! `epserve eplb`: expert load balancing. Offline: `trace-stats` summarises a routing trace, `plan`
//! chooses a placement from one (balanced or cost-aware), `replay` scores placements against one.
//! Live ([`crate::eplb_live`]): `status` shows the coordinators' load telemetry, `apply` changes the
//! running cluster's placement. The library behind
//! the offline half is `epserve-eplb`; docs/load-balancing.md has the model and the formats.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use epserve_control::PlacementMap;
use epserve_coordinator::transport::RoutingSink;
use epserve_eplb::plan::{self, ParetoPoint};
use epserve_eplb::plot::PlottedPlacement;
use epserve_eplb::replay::{CostModel, PlacementReport, Resolved, StepReplay};
use epserve_eplb::trace::{Record, Recorder, TraceHeader, TraceReader, WriterOptions, WriterStats, config_hash};
use epserve_eplb::{LoadMatrix, StepLoads};
use epserve_model::{Checkpoint, ExpertGroup, ModelConfig, WeightSource};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct EplbArgs {
    #[command(subcommand)]
    pub command: EplbCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum EplbCommand {
    /// Summarise a routing trace: steps, tokens, dropped steps, expert popularity per layer.
    TraceStats(TraceStatsArgs),
    /// Choose a placement for a trace's loads and write it as a placement file.
    Plan(PlanArgs),
    /// Score placements against a trace: aggregate and per-step worker-load imbalance, modelled
    /// step time, bytes moved from the first placement.
    Replay(ReplayArgs),
    /// The running cluster's expert load (coordinators' telemetry): per MoE layer, the worker-load
    /// imbalance and the hottest experts with their hosts.
    Status(crate::eplb_live::StatusArgs),
    /// Apply a placement file to the running cluster: the placement leader has the workers load
    /// the new replicas, flips the placement, then releases the replicas no longer placed.
    Apply(crate::eplb_live::ApplyArgs),
}

#[derive(Debug, clap::Args)]
pub struct TraceStatsArgs {
    /// The trace (its continuation parts `TRACE.1`, `TRACE.2`, … are read too).
    pub trace: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// Replicate by load, then pack (DeepSeek's EPLB); ignores where experts are now.
    Balanced,
    /// Start from `--current` and trade balance for bytes moved (Pareto points).
    CostAware,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[arg(long)]
    pub trace: PathBuf,
    /// Worker count (ids `w0`…`w{N-1}` unless `--current` names them).
    #[arg(long)]
    pub workers: usize,
    /// Expert slots per worker per layer; redundant slots = workers · slots − experts.
    #[arg(long)]
    pub slots_per_worker: usize,
    /// The placement now (a placement file); default: contiguous shards over the workers.
    #[arg(long)]
    pub current: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "balanced")]
    pub algorithm: Algorithm,
    /// Cost-aware: never move more than this many bytes of expert weights.
    #[arg(long)]
    pub max_move_bytes: Option<u64>,
    /// Cost-aware: the cheapest point within this much aggregate imbalance of the balanced plan's
    /// is written (of the best point reached, when `--max-move-bytes` keeps it from the balanced
    /// plan's balance).
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
    /// Bytes of one expert replica; default: the trace header's `expert_bytes`.
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub trace: PathBuf,
    /// Placement files; bytes moved are counted from the first.
    #[arg(long = "placement", required = true)]
    pub placements: Vec<PathBuf>,
    /// Per-step figures count steps of at least this many tokens (small steps are noisy whatever
    /// the placement).
    #[arg(long, default_value_t = 256)]
    pub min_step_tokens: u32,
    /// Cost model: fixed microseconds per MoE layer exchange.
    #[arg(long, default_value_t = CostModel::default().layer_us)]
    pub layer_us: f64,
    /// Cost model: microseconds per routed row on a worker.
    #[arg(long, default_value_t = CostModel::default().row_us)]
    pub row_us: f64,
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    /// Also write charts into this directory, as PNG and SVG: per-layer expert-load heatmap,
    /// per-step imbalance over time per placement, worker-load histograms per placement.
    #[arg(long, env = "EPSERVE_EPLB_PLOT")]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EplbArgs) -> Result<()> {
    match args.command {
        EplbCommand::TraceStats(a) => trace_stats(a),
        EplbCommand::Plan(a) => plan_cmd(a),
        EplbCommand::Replay(a) => replay_cmd(a),
        EplbCommand::Status(a) => crate::eplb_live::run_status(a),
        EplbCommand::Apply(a) => crate::eplb_live::run_apply(a),
    }
}

/// Every step of `path`, handed to `each`; returns the header and the number of dropped steps.
/// `--record-routing PATH` of `coordinator`, `generate` and `engine-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordRoutingArgs {
    /// Record every step's routing (the experts each MoE layer sent each token to) to this file,
    /// in the routing-trace format `epserve eplb` reads (docs/load-balancing.md, "Trace format");
    /// it continues in PATH.1, PATH.2, … past 256 MiB. Steps are dropped, never waited for, when
    /// the disk falls behind.
    #[arg(long, env = "EPSERVE_RECORD_ROUTING")]
    pub record_routing: Option<PathBuf>,
}

impl RecordRoutingArgs {
    /// Starts recording for the checkpoint in `model`, when asked to.
    pub fn start(&self, model: &Path) -> Result<Option<Recording>> {
        let Some(path) = &self.record_routing else { return Ok(None) };
        let config = ModelConfig::from_file(&model.join("config.json"))?;
        let t = &config.text;
        if t.num_experts_per_tok != 1 {
            bail!(
                "--record-routing: the model routes top-{}; coordinators see rows grouped by expert, so only \
                 top-1 routing (Llama 4's) is recorded",
                t.num_experts_per_tok
            );
        }
        let config_bytes = std::fs::read(model.join("config.json")).context("reading config.json")?;
        let header = TraceHeader {
            model: model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            config_hash: config_hash(&config_bytes),
            layers: t.moe_layers().map(|l| l as u32).collect(),
            num_experts: t.num_local_experts as u32,
            top_k: 1,
            expert_bytes: stored_expert_bytes(model, &config),
            start_unix_ms: 0,
            part: 0,
        };
        let recorder = Recorder::create(path, header, WriterOptions::default())
            .with_context(|| format!("--record-routing {}", path.display()))?;
        let sink = Arc::new(TraceSink(recorder));
        epserve_coordinator::transport::record_routing(sink.clone());
        tracing::info!("recording the routing of every step to {}", path.display());
        Ok(Some(Recording { sink }))
    }
}

/// A routing trace being recorded by this process.
#[derive(Debug)]
pub struct Recording {
    sink: Arc<TraceSink>,
}

impl Recording {
    /// Stops recording, writes what is buffered and closes the trace.
    pub fn stop(self) -> Result<WriterStats> {
        epserve_coordinator::transport::stop_recording();
        // Steps borrow the sink under the transport's lock, never keep it: this is the last one.
        let Ok(TraceSink(recorder)) = Arc::try_unwrap(self.sink) else {
            bail!("the routing trace is still in use");
        };
        let stats = recorder.finish()?;
        tracing::info!(
            "routing trace: {} steps, {} dropped, {} bytes in {} part(s)",
            stats.steps,
            stats.dropped_steps,
            stats.bytes,
            stats.parts
        );
        Ok(stats)
    }
}

/// The trace writer as the coordinator's routing sink.
#[derive(Debug)]
struct TraceSink(Recorder);

impl RoutingSink for TraceSink {
    fn record_groups(&self, layer: usize, groups: &[ExpertGroup]) {
        self.0.record_groups(layer, groups.iter().map(|g| (g.expert, g.rows)));
    }

    fn end_step(&self) {
        self.0.end_step();
    }
}

/// Bytes of one expert of one layer as the checkpoint stores it (`gate_up` and `down`), or 0 when
/// the checkpoint cannot say.
fn stored_expert_bytes(dir: &Path, config: &ModelConfig) -> u64 {
    let Some(layer) = config.text.moe_layers().next() else { return 0 };
    let Ok(ckpt) = Checkpoint::open(dir) else { return 0 };
    let p = format!("{}layers.{layer}.feed_forward.experts.", config.architecture.decoder_prefix());
    let per_expert = |name: &str| -> Option<u64> {
        let key = format!("{p}{name}");
        let elements: usize = ckpt.shape(&key)?.iter().skip(1).product();
        Some(elements as u64 * ckpt.stored_dtype(&key)?.size_in_bytes() as u64)
    };
    per_expert("gate_up_proj").zip(per_expert("down_proj")).map_or(0, |(a, b)| a + b)
}

fn read_trace(path: &Path, mut each: impl FnMut(&TraceHeader, StepLoads)) -> Result<(TraceHeader, u64)> {
    let mut reader = TraceReader::open(path).with_context(|| format!("reading trace {}", path.display()))?;
    let header = reader.header().clone();
    let mut dropped = 0;
    while let Some(record) = reader.next_record().with_context(|| format!("reading trace {}", path.display()))? {
        match record {
            Record::Step(step) => each(&header, step.loads(&header)),
            Record::Dropped { steps, .. } => dropped += steps,
        }
    }
    Ok((header, dropped))
}

fn trace_loads(path: &Path) -> Result<(TraceHeader, LoadMatrix)> {
    let mut loads: Option<LoadMatrix> = None;
    let (header, _) = read_trace(path, |h, step| {
        loads.get_or_insert_with(|| LoadMatrix::zeros(&h.layers, h.num_experts as usize)).add_step(&step);
    })?;
    let loads = loads.unwrap_or_else(|| LoadMatrix::zeros(&header.layers, header.num_experts as usize));
    if loads.loads.iter().all(|l| l.iter().all(|&x| x == 0.0)) {
        bail!("trace {} has no routed tokens", path.display());
    }
    Ok((header, loads))
}

#[derive(Serialize)]
struct TraceStats {
    model: String,
    config_hash: String,
    layers: Vec<u32>,
    num_experts: u32,
    top_k: u32,
    steps: u64,
    tokens: u64,
    dropped_steps: u64,
    duration_s: f64,
    /// Each expert's share of its layer's tokens, hottest first, averaged over layers.
    mean_ranked_shares: Vec<f64>,
    /// Per layer: the hottest expert and its share.
    hottest: Vec<(u32, u32, f64)>,
}

fn trace_stats(args: TraceStatsArgs) -> Result<()> {
    let (mut steps, mut tokens, mut first, mut last) = (0u64, 0u64, u64::MAX, 0u64);
    let mut loads: Option<LoadMatrix> = None;
    let (header, dropped) = read_trace(&args.trace, |h, step| {
        steps += 1;
        tokens += u64::from(step.tokens);
        first = first.min(step.timestamp_us);
        last = last.max(step.timestamp_us);
        loads.get_or_insert_with(|| LoadMatrix::zeros(&h.layers, h.num_experts as usize)).add_step(&step);
    })?;
    let loads = loads.unwrap_or_else(|| LoadMatrix::zeros(&header.layers, header.num_experts as usize));
    let hottest = loads
        .layers
        .iter()
        .zip(&loads.loads)
        .map(|(&layer, row)| {
            let total: f64 = row.iter().sum();
            let (e, &x) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap_or((0, &0.0));
            (layer, e as u32, if total > 0.0 { x / total } else { 0.0 })
        })
        .collect();
    let stats = TraceStats {
        model: header.model.clone(),
        config_hash: header.config_hash.clone(),
        layers: header.layers.clone(),
        num_experts: header.num_experts,
        top_k: header.top_k,
        steps,
        tokens,
        dropped_steps: dropped,
        duration_s: if steps > 1 { (last - first) as f64 / 1e6 } else { 0.0 },
        mean_ranked_shares: loads.mean_ranked_shares(),
        hottest,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "model {} ({}), {} MoE layers, {} experts, top-{}",
        stats.model,
        stats.config_hash,
        stats.layers.len(),
        stats.num_experts,
        stats.top_k
    );
    println!(
        "{} steps, {} tokens over {:.1} s; {} steps dropped by the recorder",
        stats.steps, stats.tokens, stats.duration_s, stats.dropped_steps
    );
    let shares: Vec<String> = stats.mean_ranked_shares.iter().take(8).map(|s| format!("{:.1}%", s * 100.0)).collect();
    println!("expert shares by rank (mean over layers): {}", shares.join(" "));
    println!("{:>6} {:>8} {:>7}", "layer", "hottest", "share");
    for (layer, e, share) in &stats.hottest {
        println!("{layer:>6} {e:>8} {:>6.1}%", share * 100.0);
    }
    Ok(())
}

fn read_placement(path: &Path) -> Result<PlacementMap> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading placement {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("placement {} is not a placement map", path.display()))
}

/// The workers a placement names, in order of first appearance.
fn workers_of(placement: &PlacementMap) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for host in placement.layers.iter().flat_map(|l| l.hosts.iter().flatten()) {
        if !out.contains(host) {
            out.push(host.clone());
        }
    }
    out
}

fn expert_bytes(given: Option<u64>, header: &TraceHeader) -> u64 {
    given.unwrap_or(header.expert_bytes)
}

#[derive(Serialize)]
struct PlanOutput<'a> {
    algorithm: &'static str,
    imbalance_aggregate_current: f64,
    imbalance_aggregate: f64,
    moved_bytes: u64,
    /// Cost-aware only: every Pareto point (bytes moved, aggregate imbalance).
    pareto: Vec<(u64, f64)>,
    out: &'a Path,
}

fn plan_cmd(args: PlanArgs) -> Result<()> {
    let (header, loads) = trace_loads(&args.trace)?;
    let current = match &args.current {
        Some(p) => read_placement(p)?,
        None => {
            let ws: Vec<String> = (0..args.workers).map(|i| format!("w{i}")).collect();
            plan::contiguous(&loads.layers, header.num_experts as usize, &ws)?
        }
    };
    let workers = workers_of(&current);
    if workers.len() != args.workers {
        bail!("--current names {} workers, --workers says {}", workers.len(), args.workers);
    }
    let bytes = expert_bytes(args.expert_bytes, &header);
    let per_expert = move |_: u32, _: u32| bytes;
    let before = epserve_eplb::replay::imbalance(&loads, &current)?;
    let (algorithm, chosen, pareto): (&str, PlacementMap, Vec<(u64, f64)>) = match args.algorithm {
        Algorithm::Balanced => {
            let planned = plan::balanced(&loads, &workers, args.slots_per_worker)?;
            ("balanced", plan::align_to(&planned, &current, &workers, &per_expert), Vec::new())
        }
        Algorithm::CostAware => {
            let points: Vec<ParetoPoint> =
                plan::cost_aware(&loads, &workers, args.slots_per_worker, &current, &per_expert, args.max_move_bytes)?;
            // Within the tolerance of what the balanced plan reaches (issue 17's yardstick).
            let reference =
                epserve_eplb::replay::imbalance(&loads, &plan::balanced(&loads, &workers, args.slots_per_worker)?)?;
            let chosen = plan::choose(&points, Some(reference), args.tolerance)
                .context("the planner found no placement")?
                .placement
                .clone();
            ("cost-aware", chosen, points.iter().map(|p| (p.moved_bytes, p.imbalance_aggregate)).collect())
        }
    };
    let after = epserve_eplb::replay::imbalance(&loads, &chosen)?;
    let moved = plan::moved_bytes(&current, &chosen, &per_expert);
    std::fs::write(&args.out, serde_json::to_string_pretty(&chosen)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let output = PlanOutput {
        algorithm,
        imbalance_aggregate_current: before,
        imbalance_aggregate: after,
        moved_bytes: moved,
        pareto,
        out: &args.out,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
        return Ok(());
    }
    println!(
        "{algorithm}: aggregate imbalance {before:.3} -> {after:.3}, {moved} bytes moved; wrote {}",
        args.out.display()
    );
    for (b, i) in &output.pareto {
        println!("  pareto: {b:>14} bytes  {i:.4}");
    }
    Ok(())
}

fn replay_cmd(args: ReplayArgs) -> Result<()> {
    let mut reader =
        TraceReader::open(&args.trace).with_context(|| format!("reading trace {}", args.trace.display()))?;
    let header = reader.header().clone();
    let placements: Vec<PlacementMap> = args.placements.iter().map(|p| read_placement(p)).collect::<Result<_>>()?;
    let cost = CostModel { layer_us: args.layer_us, row_us: args.row_us };
    let mut replays: Vec<StepReplay> = placements
        .iter()
        .zip(&args.placements)
        .map(|(p, path)| {
            Resolved::new(&header.layers, header.num_experts as usize, p)
                .map(|r| StepReplay::new(r, cost, args.min_step_tokens))
                .with_context(|| format!("placement {}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut loads = LoadMatrix::zeros(&header.layers, header.num_experts as usize);
    while let Some(record) = reader.next_record()? {
        if let Record::Step(step) = record {
            let step = step.loads(&header);
            loads.add_step(&step);
            replays.iter_mut().for_each(|r| r.observe(&step));
        }
    }
    let bytes = expert_bytes(args.expert_bytes, &header);
    let per_expert = move |_: u32, _: u32| bytes;
    let reports: Vec<PlacementReport> = replays
        .iter()
        .zip(&placements)
        .zip(&args.placements)
        .map(|((r, p), path)| {
            let moved = plan::moved_bytes(&placements[0], p, &per_expert);
            PlacementReport::new(path.display().to_string(), &loads, r, moved)
        })
        .collect();
    if let Some(dir) = &args.plot {
        let plotted: Vec<PlottedPlacement<'_>> = replays
            .iter()
            .zip(&args.placements)
            .map(|(replay, path)| PlottedPlacement { name: placement_label(path), replay })
            .collect();
        let written = epserve_eplb::plot::write_plots(dir, &loads, &plotted, args.min_step_tokens)
            .with_context(|| format!("--plot {}", dir.display()))?;
        // On stderr: `--json` keeps stdout machine-readable.
        eprintln!("wrote {} charts into {}", written.len(), dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>14}",
        "placement", "aggregate", "step mean", "step p50", "step p99", "steps", "step ms", "moved bytes"
    );
    for r in &reports {
        println!(
            "{:<40} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>10.2} {:>14}",
            r.name,
            r.imbalance_aggregate,
            r.imbalance_step_mean,
            r.imbalance_step_p50,
            r.imbalance_step_p99,
            r.steps_counted,
            r.modelled_step_time_ms,
            r.moved_bytes
        );
    }
    Ok(())
}

/// A placement's name in charts: its file name without the extension (`balanced.json` → `balanced`).
fn placement_label(path: &Path) -> &str {
    path.file_stem().and_then(|s| s.to_str()).unwrap_or("placement")
}
