//! `epserve up`: a whole cluster on this machine — W expert workers, C coordinators and the gateway,
//! each a separate `epserve` process talking real gRPC over loopback. Wired with static addresses
//! by default; with `--registry etcd://...` every component registers there instead. Waits until
//! the gateway is ready, prints the URL and a curl example, and stops everything on Ctrl-C. A
//! component that dies is restarted on the same address (so that static wiring still reaches it),
//! at once, then after a back-off that doubles with each death in the last minute; only one that
//! cannot be started again stops the cluster, with its reason.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::control::ControlArgs;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Checkpoint to serve; default: a random-weight `mini` demo checkpoint, created once in the cache.
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1, env = "EPSERVE_UP_COORDINATORS")]
    pub coordinators: usize,
    /// Expert workers (0: experts inside the coordinators).
    #[arg(long, default_value_t = 4, env = "EPSERVE_UP_WORKERS")]
    pub workers: usize,
    /// The gateway's HTTP port.
    #[arg(long, default_value_t = 8000, env = "EPSERVE_PORT")]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1", env = "EPSERVE_HOST")]
    pub host: String,
    /// API keys the gateway accepts (none = open).
    #[arg(long = "api-key", value_delimiter = ',', env = "EPSERVE_API_KEYS", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// KV cache of each coordinator, in tokens of full context.
    #[arg(long, default_value_t = 32_768, env = "EPSERVE_KV_CAPACITY_TOKENS")]
    pub kv_capacity_tokens: usize,
    /// Where the demo checkpoint is kept.
    #[arg(long, env = "EPSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Hosts per expert: each worker also serves the next `R-1` workers' shards, so that the
    /// cluster survives losing a worker without reloading anything.
    #[arg(long, default_value_t = 1, env = "EPSERVE_UP_REPLICAS")]
    pub replicas: usize,
    #[command(flatten)]
    pub images: crate::gateway::ImageArgs,
    #[command(flatten)]
    pub edge: crate::gateway::EdgeArgs,
    /// Passed on to the gateway: the Batch API's data directory and limits.
    #[command(flatten)]
    pub batch: crate::batch::BatchArgs,
    /// Passed on to every worker and coordinator.
    #[command(flatten)]
    pub quant: crate::load::QuantArgs,
    /// How the coordinators reach the workers (all on this machine): `auto` and `shm` use
    /// shared-memory rings (`shm` fails at start where it cannot), `grpc` never does.
    #[arg(long, value_enum, default_value = "auto", env = "EPSERVE_TRANSPORT")]
    pub transport: crate::load::TransportArg,
    /// Where the shared-memory segments are created (passed on to workers and coordinators).
    #[arg(long, default_value = "/dev/shm", env = "EPSERVE_SHM_DIR")]
    pub shm_dir: PathBuf,
    // With `--registry`, every component registers in the control plane instead of being wired with
    // static addresses; the three flags are passed on to each.
    #[command(flatten)]
    pub control: ControlArgs,
    /// Automatic expert load balancing on the coordinators (passed on to each).
    #[command(flatten)]
    pub eplb: crate::eplb_live::EplbArgs,
    /// Run the gRPC links in plaintext instead of mutual TLS with a CA of this cluster's own
    /// (for debugging only: anyone who can reach a port can then call it; docs/security.md).
    #[arg(long, env = "EPSERVE_UP_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

/// A fresh CA and component certificates in a temporary directory that lives as long as the
/// cluster; `None` with `--insecure-plaintext`.
fn cluster_certificates(
    insecure_plaintext: bool,
) -> Result<Option<(tempfile::TempDir, epserve_tls::dev::DevCertificates)>> {
    if insecure_plaintext {
        tracing::warn!("--insecure-plaintext: the gRPC links of this cluster are neither encrypted nor authenticated");
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix("epserve-up-tls-")
        .tempdir()
        .context("creating a directory for the cluster's certificates")?;
    let certs = epserve_tls::dev::issue(dir.path(), &[])?;
    Ok(Some((dir, certs)))
}

fn cache_dir(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("epserve")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/epserve")))
        .unwrap_or_else(|| PathBuf::from(".epserve-cache"))
}

/// Failed starts in a row after which `up` gives up on a component (and stops the cluster).
const FAILED_STARTS: usize = 5;
/// Deaths within this window make the next restart wait longer (1, 2, 4 … 32 s).
const BACKOFF_WINDOW: Duration = Duration::from_secs(60);

/// One component: how it was started (to start it again) and when it was restarted.
struct Component {
    name: String,
    args: Vec<String>,
    child: Child,
    restarts: Vec<Instant>,
}

/// The component processes `up` started, by name; all are stopped when this is dropped.
struct ComponentProcesses {
    children: Vec<Component>,
}

impl ComponentProcesses {
    /// Starts `epserve ARGS`, waits for its `listening on` line and returns the address; a
    /// restart listens on that same address.
    fn start(&mut self, name: String, args: &[String]) -> Result<String> {
        let (child, addr) = spawn_component(&name, args)?;
        let mut args = args.to_vec();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr.clone();
        }
        self.children.push(Component { name, args, child, restarts: Vec::new() });
        Ok(addr)
    }

    /// Restarts every component that has exited: at once after its first death in
    /// [`BACKOFF_WINDOW`], then after a back-off that doubles with each further one. A component
    /// that ran is always restarted (a supervisor's job); an error only when one cannot be started
    /// again [`FAILED_STARTS`] times in a row.
    fn restart_exited(&mut self) -> Result<()> {
        for c in &mut self.children {
            let Ok(Some(status)) = c.child.try_wait() else { continue };
            c.restarts.retain(|at| at.elapsed() < BACKOFF_WINDOW);
            let mut failed_starts = 0;
            loop {
                if !c.restarts.is_empty() {
                    let backoff = Duration::from_secs(1 << (c.restarts.len() - 1).min(5));
                    tracing::warn!("{} exited ({status}): restarting it in {} s", c.name, backoff.as_secs());
                    std::thread::sleep(backoff);
                } else {
                    tracing::warn!("{} exited ({status}): restarting it", c.name);
                }
                c.restarts.push(Instant::now());
                match spawn_component(&c.name, &c.args) {
                    Ok((child, addr)) => {
                        c.child = child;
                        tracing::info!("{} restarted on {addr}", c.name);
                        break;
                    }
                    Err(e) => {
                        failed_starts += 1;
                        if failed_starts >= FAILED_STARTS {
                            bail!("{} could not be started again ({failed_starts} tries): {e:#}", c.name);
                        }
                        tracing::warn!("{} did not start again: {e:#}", c.name);
                    }
                }
            }
        }
        Ok(())
    }

    /// The first child that has exited, if any.
    fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|c| match c.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", c.name)),
            _ => None,
        })
    }

    fn stop(&mut self) {
        for c in self.children.iter().rev() {
            // Already gone is fine: it is reaped below.
            let _ = kill_process(Pid::from_child(&c.child), Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for Component { name, child, .. } in self.children.iter_mut().rev() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !matches!(child.try_wait(), Ok(Some(_))) {
                tracing::warn!("{name} did not stop within 10 s: killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.children.clear();
    }
}

/// Starts `epserve ARGS` and waits for its `listening on` line: the child and the address. A
/// child that does not get there is killed.
fn spawn_component(name: &str, args: &[String]) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the epserve binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(addr) => Ok((child, addr)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not start (see its log above)")
        }
    }
}

impl Drop for ComponentProcesses {
    fn drop(&mut self) {
        self.stop();
    }
}

fn demo_model(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("mini");
    let exists = dir.join("config.json").exists();
    if !exists {
        tracing::info!("creating the demo checkpoint (random weights, `mini` shape) in {}", dir.display());
    } else if !dir.join("preprocessor_config.json").exists() {
        // Cached before the presets had a vision tower: the same seed gives the same text weights,
        // now with the tower, so that the demo accepts images.
        tracing::info!("adding the vision tower to the demo checkpoint in {} (same text weights)", dir.display());
    } else {
        return Ok(dir);
    }
    let options = epserve_synthetic::CheckpointOptions { force: exists, ..Default::default() };
    epserve_synthetic::write_checkpoint(epserve_synthetic::Preset::Mini, 0, &dir, &options)?;
    Ok(dir)
}

/// Worker `i` of `n` serves its own shard and the next `replicas - 1` shards, as an `--experts` list.
fn worker_experts(i: usize, n: usize, replicas: usize, num_experts: usize) -> Result<String> {
    let mut ids = Vec::new();
    for k in 0..replicas {
        let shard = epserve_expert_worker::ExpertSelection::Shard { index: (i + k) % n, count: n };
        ids.extend(shard.resolve(num_experts)?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
}

pub fn run(args: UpArgs) -> Result<()> {
    if args.coordinators == 0 {
        bail!("--coordinators must be at least 1");
    }
    if args.replicas == 0 || (args.workers > 0 && args.replicas > args.workers) {
        bail!("--replicas must be between 1 and --workers ({})", args.workers);
    }
    // The gateway would refuse them too, after the workers and coordinators have loaded.
    args.images.config()?;
    args.eplb.auto()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => demo_model(&cache_dir(args.cache_dir.clone()))?,
    };
    let model_arg = model.to_str().context("the model path is not UTF-8")?.to_owned();
    let mut processes = ComponentProcesses { children: Vec::new() };
    let started = Instant::now();

    let registry = args.control.to_flags();
    // The secure path is the default path: every gRPC link is mutual TLS under this cluster's CA.
    let certs = cluster_certificates(args.insecure_plaintext)?;
    let tls_flags = |component: &str| match &certs {
        Some((_, certs)) => crate::tls::TlsArgs::from_files(&certs.files(component)).to_flags(),
        None => Vec::new(),
    };
    let num_experts = epserve_coordinator::loading::read_config(&model)?.text.num_local_experts;
    let shm_dir = args.shm_dir.to_str().context("--shm-dir is not UTF-8")?.to_owned();
    let transport = ["--transport".to_owned(), args.transport.to_string(), "--shm-dir".to_owned(), shm_dir];
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let mut a: Vec<String> =
            ["worker", "--model", &model_arg, "--listen", "127.0.0.1:0", "--experts"].map(String::from).to_vec();
        a.push(worker_experts(i, args.workers, args.replicas, num_experts)?);
        a.extend(args.quant.to_flags());
        a.extend(transport.iter().cloned());
        a.extend(registry.iter().cloned());
        a.extend(tls_flags("worker"));
        workers.push(processes.start(format!("worker {i}"), &a)?);
    }
    let mut coordinators = Vec::new();
    for i in 0..args.coordinators {
        let mut a: Vec<String> =
            ["coordinator", "--model", &model_arg, "--listen", "127.0.0.1:0"].map(String::from).to_vec();
        a.extend(["--kv-capacity-tokens".into(), args.kv_capacity_tokens.to_string()]);
        a.extend(args.eplb.to_flags());
        if registry.is_empty() && !workers.is_empty() {
            a.extend(["--workers".into(), workers.join(",")]);
        }
        a.extend(args.quant.to_flags());
        a.extend(transport.iter().cloned());
        a.extend(registry.iter().cloned());
        a.extend(tls_flags("coordinator"));
        coordinators.push(processes.start(format!("coordinator {i}"), &a)?);
    }
    let listen = format!("{}:{}", args.host, args.port);
    let mut a: Vec<String> = ["gateway", "--model", &model_arg, "--listen", &listen].map(String::from).to_vec();
    if registry.is_empty() {
        a.extend(["--coordinators".into(), coordinators.join(",")]);
    }
    a.extend(registry.iter().cloned());
    if !args.api_keys.is_empty() {
        a.extend(["--api-key".into(), args.api_keys.join(",")]);
    }
    a.extend(args.images.to_flags());
    a.extend(args.edge.to_flags());
    a.extend(args.batch.to_flags());
    a.extend(tls_flags("gateway"));
    let gateway = processes.start("gateway".into(), &a)?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(wait_until_ready(&mut processes, &gateway))?;
    let name = epserve_gateway::served_model_name(&model);
    let auth = args.api_keys.first().map(|k| format!(" -H 'Authorization: Bearer {k}'")).unwrap_or_default();
    println!(
        "epserve is up in {:.1} s: {} worker(s), {} coordinator(s), model `{name}`",
        started.elapsed().as_secs_f64(),
        workers.len(),
        coordinators.len()
    );
    println!("  OpenAI API: http://{gateway}/v1");
    println!("  coordinators (gRPC, `epserve eplb status --coordinator ADDR`): {}", coordinators.join(", "));
    match &certs {
        Some((_, certs)) => println!("  gRPC links: mutual TLS under this cluster's own CA ({})", certs.ca().display()),
        None => println!("  gRPC links: PLAINTEXT (--insecure-plaintext): anyone who can reach a port can call it"),
    }
    println!("  try: curl http://{gateway}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\");
    println!(
        "         -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'"
    );
    println!("  Ctrl-C stops everything.");

    let reason = runtime.block_on(async {
        let mut shutdown = std::pin::pin!(crate::shutdown_signal());
        loop {
            tokio::select! {
                _ = &mut shutdown => break None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if let Err(crash_loop) = processes.restart_exited() {
                        break Some(crash_loop.to_string());
                    }
                }
            }
        }
    });
    processes.stop();
    match reason {
        None => {
            println!("epserve stopped");
            Ok(())
        }
        Some(dead) => bail!("{dead}; the cluster was stopped"),
    }
}

/// Polls the gateway's `GET /ready` until it answers 200 (every component is up), for 120 s at most.
async fn wait_until_ready(processes: &mut ComponentProcesses, gateway: &str) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let url = format!("http://{gateway}/ready");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client.get(&url).send().await.is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
        if ready {
            return Ok(());
        }
        if let Some(dead) = processes.exited() {
            bail!("{dead} before the cluster was ready");
        }
        if Instant::now() > deadline {
            bail!("the gateway at {gateway} was not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
