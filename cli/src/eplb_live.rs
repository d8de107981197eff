//! The live half of `epserve eplb`: `status`, the coordinators' expert-load telemetry as a table per
//! MoE layer (imbalance, hottest experts and their hosts) or JSON (docs/load-balancing.md, "Live
//! load telemetry").

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_control::Kind;
use epserve_coordinator::load_telemetry::{LoadReport, imbalance};
use epserve_proto::v1::ExpertLoadRequest;
use epserve_proto::v1::load_balancing_service_client::LoadBalancingServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::control::ControlArgs;
use crate::tls::TlsArgs;

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
