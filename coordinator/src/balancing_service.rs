//! `LoadBalancingService` over a coordinator's [`LoadBalancer`]: `ExpertLoad` reports the load
//! telemetry (what `epserve eplb status` prints), `ApplyPlacement` applies a placement live on the
//! placement leader (`epserve eplb apply`). Errors become gRPC statuses here, and only here.

use std::sync::Arc;

use epserve_control::PlacementMap;
use epserve_proto::v1::load_balancing_service_server::{LoadBalancingService, LoadBalancingServiceServer};
use epserve_proto::v1::{ApplyPlacementRequest, ApplyPlacementResponse, ExpertLoadRequest, ExpertLoadResponse};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::rebalance::{LoadBalancer, RebalanceError};

/// Placement files larger than this are refused (Scout's is ~40 KiB).
const MAX_PLACEMENT_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Balancing(pub Arc<LoadBalancer>);

impl Balancing {
    pub fn into_service(self) -> LoadBalancingServiceServer<Self> {
        LoadBalancingServiceServer::new(self).max_decoding_message_size(MAX_PLACEMENT_BYTES + 1024)
    }
}

impl From<RebalanceError> for Status {
    fn from(e: RebalanceError) -> Self {
        match e {
            RebalanceError::Invalid(_) => Status::invalid_argument(e.to_string()),
            RebalanceError::NotLeader { .. } => Status::failed_precondition(e.to_string()),
            RebalanceError::Busy => Status::aborted(e.to_string()),
            RebalanceError::Failed(_) => Status::unavailable(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl LoadBalancingService for Balancing {
    async fn expert_load(&self, _: Request<ExpertLoadRequest>) -> Result<Response<ExpertLoadResponse>, Status> {
        Ok(Response::new(self.0.report().into()))
    }

    async fn apply_placement(
        &self,
        request: Request<ApplyPlacementRequest>,
    ) -> Result<Response<ApplyPlacementResponse>, Status> {
        let text = request.into_inner().placement_json;
        if text.len() > MAX_PLACEMENT_BYTES {
            return Err(Status::invalid_argument(format!("placement: larger than {MAX_PLACEMENT_BYTES} bytes")));
        }
        let plan: PlacementMap = serde_json::from_str(&text)
            .map_err(|e| Status::invalid_argument(format!("placement: not a placement map: {e}")))?;
        let balancer = self.0.clone();
        let span = tracing::info_span!("apply_placement", layers = plan.layers.len());
        let applied = async move { balancer.apply(plan, "apply", None).await }.instrument(span).await?;
        Ok(Response::new(ApplyPlacementResponse {
            version: applied.version,
            loaded: applied.loaded as u32,
            released: applied.released as u32,
            seconds: applied.seconds,
            release_skipped: applied.release_skipped,
        }))
    }
}
