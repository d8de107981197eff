//! `LoadBalancingService` over a coordinator's [`LoadBalancer`]: `ExpertLoad` reports the load
//! telemetry (what `epserve eplb status` prints). Errors become gRPC statuses here, and only here.

use std::sync::Arc;

use epserve_proto::v1::load_balancing_service_server::{LoadBalancingService, LoadBalancingServiceServer};
use epserve_proto::v1::{ExpertLoadRequest, ExpertLoadResponse};
use tonic::{Request, Response, Status};

use crate::rebalance::LoadBalancer;

#[derive(Debug, Clone)]
pub struct Balancing(pub Arc<LoadBalancer>);

impl Balancing {
    pub fn into_service(self) -> LoadBalancingServiceServer<Self> {
        LoadBalancingServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl LoadBalancingService for Balancing {
    async fn expert_load(&self, _: Request<ExpertLoadRequest>) -> Result<Response<ExpertLoadResponse>, Status> {
        Ok(Response::new(self.0.report().into()))
    }
}
