//! `epserve worker`: one expert worker process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use epserve_control::{Instance, Kind, Membership};
use epserve_expert_worker::{ExpertSelection, ExpertWorker};
use epserve_model::{Checkpoint, ExpertShard, ModelConfig, WeightStorage};

use crate::control::{Control, ControlArgs};
use crate::load::{ComputeDtype, LoadProgress, WeightStorageArg, read_config};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Checkpoint directory (hub layout); only the hosted experts' slices are read.
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Address to serve gRPC on; port 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:50061", env = "EPSERVE_LISTEN")]
    pub listen: String,
    /// Host the I-th of N contiguous shards of the experts (0-based), e.g. `1/4`.
    #[arg(long, conflicts_with = "experts", env = "EPSERVE_SHARD")]
    pub shard: Option<String>,
    /// Host these experts: ids and inclusive ranges, e.g. `0-3,9`.
    #[arg(long, env = "EPSERVE_EXPERTS")]
    pub experts: Option<String>,
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    /// How the experts' weights are kept: `as-stored` keeps a bf16 checkpoint's experts in bf16
    /// for f32 compute (widened as they are read: the same results at half the memory);
    /// `compute` converts them to the compute dtype at load.
    #[arg(long, value_enum, default_value = "as-stored", env = "EPSERVE_WEIGHT_STORAGE")]
    pub weight_storage: WeightStorageArg,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, env = "EPSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let selection = match (&args.shard, &args.experts) {
        (Some(s), None) => ExpertSelection::parse_shard(s)?,
        (None, Some(e)) => ExpertSelection::parse_list(e)?,
        // With a registry a worker may start empty: a spare that the placement leader fills.
        (None, None) if args.control.registry.is_some() => ExpertSelection::List(Vec::new()),
        _ => bail!("give --shard I/N or --experts LIST"),
    };
    let control = args.control.connect()?;
    let config = read_config(&args.model)?;
    let experts = selection.resolve(config.text.num_local_experts)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let mut progress = LoadProgress::new(&ckpt, "experts");
    let storage = args.weight_storage.into();
    let shard =
        ExpertShard::load(&config, &ckpt, &experts, args.dtype.into(), storage, &Device::Cpu, &mut || progress.tick())?;
    progress.finish();
    tracing::info!(
        "hosting {} of {} experts {experts:?} of {} MoE layers: {:.1} MiB resident",
        experts.len(),
        config.text.num_local_experts,
        config.text.moe_layers().count(),
        shard.resident_bytes() as f64 / 1048576.0,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    // Borrowed, not moved: the control runtime must not be dropped inside the async block.
    let control = &control;
    runtime.block_on(async move {
        if let Some(addr) = &args.metrics_listen {
            crate::metrics_http::serve(addr).await?;
        }
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr()?;
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {local}");
        let model_name = args.model.display().to_string();
        let worker = Arc::new(ExpertWorker::new(shard, config.text.clone(), model_name.clone(), args.dtype.into()));
        let membership = control.as_ref().map(|control| {
            let record = Instance {
                experts: worker.experts(),
                model: model_name,
                ..Instance::new(Kind::Worker, format!("worker-{local}"), local.to_string())
            };
            let membership = Arc::new(control.register(record));
            follow_assignments(
                control,
                membership.clone(),
                worker.clone(),
                &args.model,
                &config,
                (args.dtype, args.weight_storage.into()),
            );
            membership
        });
        epserve_expert_worker::serve(worker, listener, crate::shutdown_signal()).await?;
        if let (Some(control), Some(membership)) = (control, membership) {
            // Leaving revokes the lease: coordinators stop sending here now, not a TTL later.
            control.runtime.spawn(async move { membership.leave().await }).await.ok();
        }
        tracing::info!("expert worker stopped");
        Ok(())
    })
}

/// Loads the experts the placement leader assigns to this worker, then announces them in its record
/// (coordinators route to a worker only for the experts its record lists).
fn follow_assignments(
    control: &Control,
    membership: Arc<Membership>,
    worker: Arc<ExpertWorker>,
    dir: &Path,
    config: &ModelConfig,
    (dtype, storage): (ComputeDtype, WeightStorage),
) {
    let _guard = control.runtime.enter();
    let mut placement = control.plane.watch_placement();
    let (dir, config) = (dir.to_path_buf(), config.clone());
    control.runtime.spawn(async move {
        loop {
            let assigned = placement.borrow_and_update().as_ref().map(|map| map.experts_of(&membership.id()));
            let hosted = worker.experts();
            let missing: Vec<u32> = assigned.unwrap_or_default().into_iter().filter(|e| !hosted.contains(e)).collect();
            if !missing.is_empty() {
                tracing::info!("the placement assigns experts {missing:?} here: loading them");
                let started = std::time::Instant::now();
                let (w, dir, config, ids) = (worker.clone(), dir.clone(), config.clone(), missing.clone());
                let loaded = tokio::task::spawn_blocking(move || -> Result<()> {
                    let ckpt = Checkpoint::open(&dir)?;
                    let shard =
                        ExpertShard::load(&config, &ckpt, &ids, dtype.into(), storage, &Device::Cpu, &mut || ())?;
                    w.add_experts(shard)?;
                    Ok(())
                })
                .await;
                match loaded {
                    Ok(Ok(())) => {
                        tracing::info!("loaded experts {missing:?} in {:.2} s", started.elapsed().as_secs_f64());
                        let experts = worker.experts();
                        membership.update(|i| i.experts = experts);
                    }
                    Ok(Err(e)) => tracing::error!("loading assigned experts {missing:?}: {e:#}"),
                    Err(e) => tracing::error!("loading assigned experts {missing:?}: {e}"),
                }
            }
            if placement.changed().await.is_err() {
                return;
            }
        }
    });
}
