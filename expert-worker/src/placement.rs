//! Placement changes on a running worker (`ExpertPlacementService.Place`, and the registry follower
//! in [`crate::run`]): replicas of `(layer, expert)` pairs are loaded from the memory-mapped
//! checkpoint on the blocking pool while exchanges go on, then swapped in under a brief write lock;
//! released pairs are dropped under the same lock, which waits for the computations in progress.
//! Whoever changes the placement calls `Place` to load *before* the placement names this worker as
//! a host, and to release only *after* no coordinator routes to it any more.

use std::sync::Arc;
use std::time::Instant;

use epserve_proto::v1::expert_placement_service_server::{ExpertPlacementService, ExpertPlacementServiceServer};
use epserve_proto::v1::{ExpertPair, PlaceRequest, PlaceResponse};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::service::ExpertWorker;

/// Why a placement change failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("this worker's experts are fixed (it was started without a checkpoint loader)")]
    Fixed,
    #[error("{0}")]
    Invalid(String),
    #[error("loading the experts: {0}")]
    Load(#[source] epserve_model::Error),
    #[error("the loading task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<PlaceError> for Status {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::Fixed => Status::failed_precondition(e.to_string()),
            PlaceError::Invalid(_) => Status::invalid_argument(e.to_string()),
            PlaceError::Load(_) | PlaceError::Task(_) => Status::internal(e.to_string()),
        }
    }
}

impl ExpertWorker {
    /// Loads the pairs of `pairs` not hosted yet and starts serving them; how many were loaded.
    /// Loading runs on the blocking pool: exchanges are served meanwhile, and see the new experts
    /// only once all are resident.
    pub async fn load_pairs(self: &Arc<Self>, pairs: &[(usize, u32)]) -> Result<usize, PlaceError> {
        let _one_at_a_time = self.placing.lock().await;
        let hosted = self.pairs();
        let missing: Vec<(usize, u32)> = pairs.iter().copied().filter(|p| !hosted.contains(p)).collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let loader = self.loader.clone().ok_or(PlaceError::Fixed)?;
        let started = Instant::now();
        let worker = self.clone();
        let ids = missing.clone();
        tokio::task::spawn_blocking(move || {
            let shard = (loader.0)(&ids)?;
            worker.add_experts(shard)
        })
        .await?
        .map_err(|e| match e {
            epserve_model::Error::Input(reason) => PlaceError::Invalid(reason),
            e => PlaceError::Load(e),
        })?;
        tracing::info!(
            "loaded {} expert replicas ({}) in {:.2} s",
            missing.len(),
            describe(&missing),
            started.elapsed().as_secs_f64()
        );
        Ok(missing.len())
    }
}

/// `layer 3: 1,5; layer 5: 0` for logs.
fn describe(pairs: &[(usize, u32)]) -> String {
    let mut by_layer: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    for &(l, e) in pairs {
        by_layer.entry(l).or_default().push(e.to_string());
    }
    by_layer.iter().map(|(l, es)| format!("layer {l}: {}", es.join(","))).collect::<Vec<_>>().join("; ")
}

/// At most this many pairs per request: more than any model has (Scout: 48 × 16).
const MAX_PAIRS: usize = 1 << 16;

fn pairs_from_proto(field: &str, pairs: &[ExpertPair]) -> Result<Vec<(usize, u32)>, Status> {
    if pairs.len() > MAX_PAIRS {
        return Err(Status::invalid_argument(format!("{field}: {} pairs, at most {MAX_PAIRS}", pairs.len())));
    }
    let mut out: Vec<(usize, u32)> = pairs.iter().map(|p| (p.layer as usize, p.expert)).collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The tonic service over a shared worker.
#[derive(Debug, Clone)]
pub(crate) struct Placement(Arc<ExpertWorker>);

pub(crate) fn service(worker: Arc<ExpertWorker>) -> ExpertPlacementServiceServer<Placement> {
    ExpertPlacementServiceServer::new(Placement(worker))
}

#[tonic::async_trait]
impl ExpertPlacementService for Placement {
    async fn place(&self, request: Request<PlaceRequest>) -> Result<Response<PlaceResponse>, Status> {
        let request = request.into_inner();
        let load = pairs_from_proto("load", &request.load)?;
        let release = pairs_from_proto("release", &request.release)?;
        let span = tracing::info_span!("place", load = load.len(), release = release.len());
        let worker = self.0.clone();
        async move {
            let started = Instant::now();
            let loaded = worker.load_pairs(&load).await.map_err(|e| {
                tracing::warn!("Place: {e}");
                Status::from(e)
            })?;
            let load_seconds = started.elapsed().as_secs_f64();
            let released = {
                let _one_at_a_time = worker.placing.lock().await;
                worker.release(&release)
            };
            if released > 0 {
                tracing::info!("released {released} expert replicas ({})", describe(&release));
            }
            Ok(Response::new(PlaceResponse {
                layers: worker.layer_experts(),
                resident_bytes: worker.resident_bytes(),
                loaded: loaded as u32,
                released: released as u32,
                load_seconds,
            }))
        }
        .instrument(span)
        .await
    }
}
