//! Expert load balancing on a coordinator that reaches its experts through workers: the
//! [`LoadBalancer`] owns the view of the load (the transport's [`LoadTelemetry`] with the hosts
//! each expert is routed to now), what `LoadBalancingService.ExpertLoad` and the metrics endpoint
//! report (docs/load-balancing.md, "Live load telemetry").

use std::sync::Arc;
use std::time::Duration;

use crate::load_telemetry::{LoadReport, LoadTelemetry};
use crate::transport::links::WorkerSet;

/// How often the gauges `epserve_expert_load` and `epserve_worker_load_imbalance` are refreshed.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// The load balancer of one coordinator.
#[derive(Debug)]
pub struct LoadBalancer {
    workers: Arc<WorkerSet>,
}

impl LoadBalancer {
    /// Over the transport's workers; publishes the gauges on the current runtime.
    pub(crate) fn new(workers: Arc<WorkerSet>) -> Arc<Self> {
        tokio::spawn(workers.telemetry.clone().publish_every(PUBLISH_EVERY));
        Arc::new(LoadBalancer { workers })
    }

    pub fn telemetry(&self) -> &Arc<LoadTelemetry> {
        &self.workers.telemetry
    }

    /// The telemetry's windows with the hosts each expert is routed to now.
    pub fn report(&self) -> LoadReport {
        let mut report = self.telemetry().report();
        let routes = self.workers.routes();
        for w in &mut report.windows {
            for l in &mut w.layers {
                l.hosts = routes.host_ids(l.layer as usize);
            }
        }
        report
    }
}
