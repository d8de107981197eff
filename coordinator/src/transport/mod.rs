//! How the coordinator reaches the routed experts, chosen at start-up:
//!
//! - `local`: an in-process [`ExpertShard`] holding every expert, no copies — the single-node fast
//!   path and the baseline every distributed figure is compared with;
//! - `grpc`: expert workers over one bidirectional stream each ([`GrpcExperts`]); a worker on this
//!   host that accepts the handshake gets its exchanges over shared-memory rings instead, the
//!   stream carrying only liveness (`shm`; chosen per link with [`WorkerTransport`]).
//!
//! The ladder, fastest first: in process → shared memory → gRPC.
//!
//! Either tells its steps' routing to a [`RoutingSink`] when one is installed ([`record_routing`]).

mod grpc;
pub(crate) mod links;
mod recording;
mod shm;

use epserve_model::{ExpertBackend, ExpertBatch, ExpertShard, ExpertsInFlight};
use epserve_proto::metric_names as m;

pub(crate) use grpc::FixedMembers;
pub use grpc::{GrpcConfig, GrpcExperts};
pub use recording::{RoutingSink, end_recorded_step, record_routing, stop_recording};
pub use shm::{LinkMedium, ShmConfig, WorkerTransport};

#[derive(Debug)]
pub enum ExpertTransport {
    Local(ExpertShard),
    Grpc(GrpcExperts),
}

impl ExpertTransport {
    pub fn name(&self) -> &'static str {
        match self {
            ExpertTransport::Local(_) => "local",
            ExpertTransport::Grpc(_) => "grpc",
        }
    }

    /// The load balancer over this transport's workers (`None` in process: one "worker" holds
    /// every expert, there is nothing to balance). `leadership`: the registry and this
    /// coordinator's placement election; without it (static wiring) the balancer changes this
    /// coordinator's own map. Must be called inside a runtime.
    pub fn load_balancer(
        &self,
        leadership: Option<crate::rebalance::Leadership>,
    ) -> Option<std::sync::Arc<crate::rebalance::LoadBalancer>> {
        match self {
            ExpertTransport::Local(_) => None,
            ExpertTransport::Grpc(grpc) => {
                let fixed = if leadership.is_some() { None } else { grpc.fixed().cloned() };
                Some(crate::rebalance::LoadBalancer::new(grpc.worker_set().clone(), fixed, leadership))
            }
        }
    }
}

impl ExpertBackend for ExpertTransport {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + 'a>> {
        // Per-expert load, the signal expert load balancing works from. Labels are bounded by the
        // model's layer and expert counts.
        for g in &batch.groups {
            metrics::counter!(m::EXPERT_ROWS_TOTAL, "layer" => batch.layer.to_string(), "expert" => g.expert.to_string())
                .increment(u64::from(g.rows));
        }
        recording::with_sink(|s| s.record_groups(batch.layer, &batch.groups));
        match self {
            ExpertTransport::Local(shard) => shard.submit(batch),
            ExpertTransport::Grpc(grpc) => grpc.submit(batch),
        }
    }

    fn step_finished(&self) {
        if let ExpertTransport::Grpc(grpc) = self {
            grpc.step_finished();
        }
        recording::with_sink(|s| s.end_step());
    }
}
