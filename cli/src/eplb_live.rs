//! The live half of `epserve eplb`: `status` (the coordinators' expert-load telemetry as a table per
//! MoE layer: imbalance, hottest experts and their hosts; or JSON), `apply` (a placement file applied
//! to the running cluster by the placement leader), and the coordinator's automatic-rebalancing
//! flags (docs/load-balancing.md, "Live load telemetry", "Live rebalancing").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_control::{Kind, PlacementMap};
use epserve_coordinator::load_telemetry::{LoadReport, imbalance};
use epserve_coordinator::rebalance::AutoConfig;
use epserve_coordinator::run::PLACEMENT_ELECTION;
use epserve_proto::v1::load_balancing_service_client::LoadBalancingServiceClient;
use epserve_proto::v1::{ApplyPlacementRequest, ExpertLoadRequest};
use serde::Serialize;
use tonic::transport::Channel;

use crate::control::ControlArgs;
use crate::tls::TlsArgs;

/// Automatic rebalancing on the coordinator (on the placement leader, or a statically wired one).
#[derive(Debug, Clone, clap::Args)]
pub struct EplbArgs {
    /// Check the worker-load imbalance this often (e.g. `30s`, `2m`) and rebalance when it is above
    /// `--eplb-threshold`; unset: only `epserve eplb apply` changes the placement.
    #[arg(long, env = "EPSERVE_EPLB_INTERVAL", value_parser = parse_duration)]
    pub eplb_interval: Option<Duration>,
    /// Aggregate imbalance (Σ max worker load / Σ mean, over MoE layers) above which to rebalance.
    #[arg(long, default_value_t = 1.15, env = "EPSERVE_EPLB_THRESHOLD")]
    pub eplb_threshold: f64,
    /// Hysteresis: after a change, rebalance again only once the imbalance has fallen below
    /// threshold − this; a plan is applied only if it predicts at least this much less.
    #[arg(long, default_value_t = 0.05, env = "EPSERVE_EPLB_HYSTERESIS")]
    pub eplb_hysteresis: f64,
    /// At most this many bytes of expert replicas loaded per change (cost-aware planner).
    #[arg(long, env = "EPSERVE_EPLB_MAX_MOVE_BYTES")]
    pub eplb_max_move_bytes: Option<u64>,
    /// Expert slots per worker and MoE layer; default ⌈1.25 · experts / workers⌉.
    #[arg(long, env = "EPSERVE_EPLB_SLOTS_PER_WORKER")]
    pub eplb_slots_per_worker: Option<usize>,
}

impl EplbArgs {
    /// The coordinator's automatic rebalancing, if asked for.
    pub fn auto(&self) -> Result<Option<AutoConfig>> {
        let Some(interval) = self.eplb_interval else { return Ok(None) };
        if interval < Duration::from_secs(1) {
            bail!("--eplb-interval must be at least 1s");
        }
        if !(self.eplb_threshold.is_finite() && self.eplb_threshold >= 1.0) {
            bail!("--eplb-threshold must be at least 1 (perfect balance)");
        }
        if !(self.eplb_hysteresis.is_finite() && self.eplb_hysteresis >= 0.0) {
            bail!("--eplb-hysteresis must be a non-negative number");
        }
        if self.eplb_slots_per_worker == Some(0) {
            bail!("--eplb-slots-per-worker must be positive");
        }
        Ok(Some(AutoConfig {
            interval,
            threshold: self.eplb_threshold,
            hysteresis: self.eplb_hysteresis,
            max_move_bytes: self.eplb_max_move_bytes,
            slots_per_worker: self.eplb_slots_per_worker,
            min_tokens: 256,
        }))
    }

    /// The same flags for a child process (`epserve up`).
    pub fn to_flags(&self) -> Vec<String> {
        let Some(interval) = self.eplb_interval else { return Vec::new() };
        let mut flags = vec![
            "--eplb-interval".into(),
            format!("{}ms", interval.as_millis()),
            "--eplb-threshold".into(),
            self.eplb_threshold.to_string(),
            "--eplb-hysteresis".into(),
            self.eplb_hysteresis.to_string(),
        ];
        if let Some(b) = self.eplb_max_move_bytes {
            flags.extend(["--eplb-max-move-bytes".into(), b.to_string()]);
        }
        if let Some(s) = self.eplb_slots_per_worker {
            flags.extend(["--eplb-slots-per-worker".into(), s.to_string()]);
        }
        flags
    }
}

/// `500ms`, `30s`, `2m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = number.parse().map_err(|_| format!("`{text}`: expected a duration like 500ms, 30s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{text}`: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))
}

/// Which coordinators to ask: one address, or every ready one in the registry.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// A coordinator's gRPC address (`host:port`).
    #[arg(long, env = "EPSERVE_EPLB_COORDINATOR", conflicts_with = "registry")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// The window to show: 10, 60 or 600 seconds.
    #[arg(long, default_value_t = 60, env = "EPSERVE_EPLB_WINDOW")]
    pub window: u32,
    /// Hottest experts listed per layer.
    #[arg(long, default_value_t = 3, env = "EPSERVE_EPLB_TOP")]
    pub top: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub target: Target,
    /// The placement to apply (JSON, docs/load-balancing.md "Placement files").
    #[arg(long, env = "EPSERVE_EPLB_PLACEMENT")]
    pub placement: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A hot expert in the status report.
#[derive(Debug, Serialize)]
struct HotExpert {
    expert: u32,
    tokens: u64,
    /// Its share of the layer's routed tokens.
    share: f64,
    hosts: Vec<String>,
}

#[derive(Debug, Serialize)]
struct LayerStatus {
    layer: u32,
    imbalance: f64,
    tokens: u64,
    worker_tokens: BTreeMap<String, u64>,
    hottest: Vec<HotExpert>,
    /// Every expert's hosts now: with `layer`, a placement file's layer, so that the JSON of
    /// `status` is itself a placement file (`apply` reads `layers[].layer` and `layers[].hosts`).
    hosts: Vec<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct Status {
    coordinators: Vec<String>,
    window_seconds: u32,
    /// Seconds of the window the worker loads cover (least over the coordinators).
    covered_seconds: f64,
    placement_version: u64,
    /// Σ over layers of the most loaded worker's tokens / Σ of the mean worker's.
    imbalance_aggregate: f64,
    layers: Vec<LayerStatus>,
    /// The last live placement change a coordinator made (the placement leader's).
    last_rebalance: Option<epserve_coordinator::load_telemetry::RebalanceRecord>,
}

async fn channel(addr: &str, tls: &TlsArgs) -> Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(epserve_proto::server_uri(addr))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    epserve_tls::connect(endpoint, tls.load()?.as_ref())
        .await
        .with_context(|| format!("connecting to coordinator {addr}"))
}

/// Every ready coordinator's address in the registry.
async fn coordinators(control: &ControlArgs) -> Result<(epserve_control::ControlPlane, Vec<(String, String)>)> {
    let url = control.registry.as_deref().context("give --coordinator ADDR or --registry URL")?;
    let plane = epserve_control::connect_with(url, &control.cluster, &control.security())
        .await
        .with_context(|| format!("connecting to the registry {url}"))?;
    let all = plane.list(Kind::Coordinator).await?;
    Ok((plane, all.into_iter().filter(|c| c.ready).map(|c| (c.id, c.addr)).collect()))
}

pub fn run_status(args: StatusArgs) -> Result<()> {
    if !epserve_coordinator::load_telemetry::WINDOWS.contains(&args.window) {
        bail!("--window must be one of {:?}", epserve_coordinator::load_telemetry::WINDOWS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let status = runtime.block_on(async {
        let addrs: Vec<String> = match &args.target.coordinator {
            Some(addr) => vec![addr.clone()],
            None => coordinators(&args.target.control).await?.1.into_iter().map(|(_, a)| a).collect(),
        };
        if addrs.is_empty() {
            bail!("the registry lists no ready coordinator");
        }
        let mut reports = Vec::new();
        for addr in &addrs {
            let mut client = LoadBalancingServiceClient::new(channel(addr, &args.target.tls).await?);
            let report = client
                .expert_load(ExpertLoadRequest {})
                .await
                .with_context(|| format!("asking coordinator {addr} for its expert load"))?;
            reports.push(LoadReport::from(report.into_inner()));
        }
        summarise(addrs, &reports, args.window, args.top)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_table(&status);
    }
    Ok(())
}

/// One layer summed over the coordinators: tokens per expert, tokens per worker, each expert's hosts.
type LayerSums = (Vec<u64>, BTreeMap<String, u64>, Vec<Vec<String>>);

/// Sums the coordinators' windows (each sees its own traffic) into one status.
fn summarise(coordinators: Vec<String>, reports: &[LoadReport], window: u32, top: usize) -> Result<Status> {
    let mut layers: BTreeMap<u32, LayerSums> = BTreeMap::new();
    let mut covered = f64::INFINITY;
    for r in reports {
        let w = r.windows.iter().find(|w| w.seconds == window).context("a coordinator did not report the window")?;
        covered = covered.min(w.covered_seconds);
        for l in &w.layers {
            let (experts, workers, hosts) = layers.entry(l.layer).or_default();
            if experts.len() < l.expert_tokens.len() {
                experts.resize(l.expert_tokens.len(), 0);
            }
            for (sum, n) in experts.iter_mut().zip(&l.expert_tokens) {
                *sum += n;
            }
            for (w, n) in &l.worker_tokens {
                *workers.entry(w.clone()).or_default() += n;
            }
            if hosts.is_empty() {
                hosts.clone_from(&l.hosts);
            }
        }
    }
    let (mut max_sum, mut mean_sum) = (0.0, 0.0);
    let layers: Vec<LayerStatus> = layers
        .into_iter()
        .map(|(layer, (experts, workers, hosts))| {
            let tokens: u64 = experts.iter().sum();
            let worker_total: u64 = workers.values().sum();
            if worker_total > 0 {
                max_sum += workers.values().copied().max().unwrap_or(0) as f64;
                mean_sum += worker_total as f64 / workers.len() as f64;
            }
            let mut ranked: Vec<(u32, u64)> = experts.iter().enumerate().map(|(e, &n)| (e as u32, n)).collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let hottest = ranked
                .into_iter()
                .take(top)
                .map(|(expert, n)| HotExpert {
                    expert,
                    tokens: n,
                    share: if tokens == 0 { 0.0 } else { n as f64 / tokens as f64 },
                    hosts: hosts.get(expert as usize).cloned().unwrap_or_default(),
                })
                .collect();
            LayerStatus {
                layer,
                imbalance: imbalance(workers.values().copied()),
                tokens,
                worker_tokens: workers,
                hottest,
                hosts,
            }
        })
        .collect();
    Ok(Status {
        coordinators,
        window_seconds: window,
        covered_seconds: if covered.is_finite() { covered } else { 0.0 },
        placement_version: reports.iter().map(|r| r.placement_version).max().unwrap_or(0),
        imbalance_aggregate: if mean_sum == 0.0 { 1.0 } else { max_sum / mean_sum },
        layers,
        last_rebalance: reports.iter().filter_map(|r| r.last_rebalance.clone()).max_by_key(|r| r.unix_ms),
    })
}

fn print_table(s: &Status) {
    println!(
        "coordinators: {}   window: {} s ({:.0} s of it under the current placement)   placement version: {}",
        s.coordinators.join(", "),
        s.window_seconds,
        s.covered_seconds,
        s.placement_version
    );
    println!("aggregate imbalance (max/mean worker load): {:.3}", s.imbalance_aggregate);
    if let Some(r) = &s.last_rebalance {
        println!(
            "last rebalance: version {} ({}), {} loaded, {} released in {:.2} s; imbalance {:.3} before, {:.3} predicted",
            r.version, r.trigger, r.loaded, r.released, r.seconds, r.measured_before, r.predicted
        );
    }
    println!(
        "{:>5}  {:>9}  {:>9}  hottest experts (share of the layer's tokens) → hosts",
        "layer", "imbalance", "tokens"
    );
    for l in &s.layers {
        let hot: Vec<String> = l
            .hottest
            .iter()
            .map(|h| format!("{} ({:.0} %) → {}", h.expert, h.share * 100.0, h.hosts.join("+")))
            .collect();
        println!("{:>5}  {:>9.3}  {:>9}  {}", l.layer, l.imbalance, l.tokens, hot.join(";  "));
    }
}

#[derive(Debug, Serialize)]
struct ApplyResult {
    coordinator: String,
    version: u64,
    loaded: u32,
    released: u32,
    seconds: f64,
    release_skipped: bool,
}

pub fn run_apply(args: ApplyArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.placement)
        .with_context(|| format!("reading the placement {}", args.placement.display()))?;
    let map: PlacementMap =
        serde_json::from_str(&text).with_context(|| format!("{} is not a placement map", args.placement.display()))?;
    if map.layers.is_empty() {
        bail!("{}: the placement lists no layer", args.placement.display());
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let addr = match &args.target.coordinator {
            Some(addr) => addr.clone(),
            None => {
                // Only the placement leader changes the placement: find it.
                let (plane, ready) = coordinators(&args.target.control).await?;
                let leader =
                    plane.leader(PLACEMENT_ELECTION).await?.context("no coordinator leads the placement election")?;
                match ready.into_iter().find(|(id, _)| *id == leader) {
                    Some((_, addr)) => addr,
                    None => bail!("the placement leader {leader} is not a ready coordinator"),
                }
            }
        };
        let mut client = LoadBalancingServiceClient::new(channel(&addr, &args.target.tls).await?);
        let applied = client
            .apply_placement(ApplyPlacementRequest { placement_json: text })
            .await
            .map_err(|s| anyhow::anyhow!("coordinator {addr}: {}", s.message()))?
            .into_inner();
        Ok::<_, anyhow::Error>(ApplyResult {
            coordinator: addr,
            version: applied.version,
            loaded: applied.loaded,
            released: applied.released,
            seconds: applied.seconds,
            release_skipped: applied.release_skipped,
        })
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "placement version {} applied by {} in {:.2} s: {} replicas loaded, {} released",
            result.version, result.coordinator, result.seconds, result.loaded, result.released
        );
        if result.release_skipped {
            println!("the old replicas were kept: a coordinator did not report in time that it stopped using them");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
