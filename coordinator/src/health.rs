//! The coordinator's readiness for orchestrators: the standard gRPC health service
//! (`grpc.health.v1`, `tonic-health`) on the coordinator's port, answered from the moment the port is
//! bound — while the model loads and the coordinator waits for its workers, not ready.
//!
//! Readiness (`""` and `epserve.v1.CoordinatorService`): `SERVING` while the engine runs and every
//! routed expert of every MoE layer is listed by a live worker's record (a lease in the registry;
//! with static workers, the engine alone); `NOT_SERVING` before, when an expert loses its last host,
//! and from the start of a drain on. [`LIVENESS_SERVICE`] stays `SERVING` while the process answers.
//! The coordinator's own `CoordinatorService.Health` says the same as readiness.

use std::collections::HashSet;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use epserve_control::Instance;
use epserve_control::controller::Layout;
use epserve_proto::v1::coordinator_service_server::SERVICE_NAME as COORDINATOR_SERVICE;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, oneshot, watch};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::engine::EngineHandle;

/// The health service name liveness probes ask for: `SERVING` while the process answers, load and
/// drain included (the overall status `""` is readiness).
pub const LIVENESS_SERVICE: &str = "liveness";

/// The coordinator's health statuses; once draining, never ready again.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    /// Set by [`Self::drain`]; under a lock so that a readiness update racing a drain cannot win.
    draining: Arc<Mutex<bool>>,
}

impl Health {
    /// Live, not ready.
    pub async fn new() -> Self {
        let reporter = HealthReporter::new();
        reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        let health = Health { reporter, draining: Arc::new(Mutex::new(false)) };
        health.set_ready(false).await;
        health
    }

    /// Sets readiness (ignored once draining).
    pub async fn set_ready(&self, ready: bool) {
        let draining = self.draining.lock().await;
        self.set(ready && !*draining).await;
    }

    /// Not ready from now on.
    pub async fn drain(&self) {
        let mut draining = self.draining.lock().await;
        *draining = true;
        self.set(false).await;
    }

    async fn set(&self, ready: bool) {
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(COORDINATOR_SERVICE, status).await;
    }

    /// The gRPC service answering from these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// The health service alone, served on a second descriptor of the coordinator's listening socket
/// while it loads and waits for its workers; [`Self::stop`] hands the socket to the full server.
#[derive(Debug)]
pub(crate) struct EarlyHealth {
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// How long the early server may take to finish the probes it is answering when it is stopped.
const EARLY_STOP: Duration = Duration::from_secs(2);

impl EarlyHealth {
    /// Serves `health` on a duplicate of `listener`'s socket (both accept from the same queue).
    pub fn start(
        listener: TcpListener,
        health: &Health,
        tls: Option<epserve_tls::ClusterTls>,
    ) -> std::io::Result<(TcpListener, Self)> {
        let std: StdListener = listener.into_std()?;
        let early = TcpListener::from_std(std.try_clone()?)?;
        let listener = TcpListener::from_std(std)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder().add_service(health.service());
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(async move {
            match tls {
                Some(tls) => router.serve_with_incoming_shutdown(epserve_tls::incoming(early, tls), shutdown).await,
                None => {
                    let incoming = tonic::transport::server::TcpIncoming::from(early).with_nodelay(Some(true));
                    router.serve_with_incoming_shutdown(incoming, shutdown).await
                }
            }
        });
        Ok((listener, EarlyHealth { stop, server }))
    }

    /// Stops accepting on the duplicate and lets the probes being answered finish (briefly).
    pub async fn stop(self) {
        let EarlyHealth { stop, mut server } = self;
        let _ = stop.send(());
        if tokio::time::timeout(EARLY_STOP, &mut server).await.is_err() {
            server.abort();
        }
    }
}

/// Keeps readiness up to date until aborted: ready while the engine runs and (with a registry)
/// every expert of `layout` has a live host among `workers`. The engine's death is checked once a
/// second, the records as they change.
pub(crate) fn follow_readiness(
    health: Health,
    engine: EngineHandle,
    mut workers: Option<watch::Receiver<Vec<Instance>>>,
    layout: Layout,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let uncovered = workers.as_mut().map_or(0, |w| uncovered(&w.borrow_and_update(), &layout));
            let died = engine.died();
            let ready = died.is_none() && uncovered == 0;
            if last != Some(ready) {
                if !ready {
                    tracing::warn!(uncovered, engine_died = died.is_some(), "not ready");
                } else if last.is_some() {
                    tracing::info!("ready again: every expert has a live host");
                }
                health.set_ready(ready).await;
                last = Some(ready);
            }
            let changed = async {
                let open = match workers.as_mut() {
                    Some(w) => w.changed().await.is_ok(),
                    None => false,
                };
                if !open {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// How many `(layer, expert)` pairs of `layout` no worker record lists (in its experts, hosted in
/// every MoE layer, or its per-layer replicas).
fn uncovered(workers: &[Instance], layout: &Layout) -> usize {
    let everywhere: HashSet<u32> = workers.iter().flat_map(|w| w.experts.iter().copied()).collect();
    let mut missing = 0;
    for &layer in &layout.moe_layers {
        for e in 0..layout.num_experts {
            let hosted = everywhere.contains(&e)
                || workers.iter().any(|w| w.replicas.get(&layer).is_some_and(|r| r.contains(&e)));
            if !hosted {
                missing += 1;
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use epserve_control::Kind;

    fn worker(experts: &[u32], replicas: &[(u32, &[u32])]) -> Instance {
        Instance {
            experts: experts.to_vec(),
            replicas: replicas.iter().map(|&(l, r)| (l, r.to_vec())).collect(),
            ..Instance::new(Kind::Worker, format!("w{experts:?}"), "127.0.0.1:1")
        }
    }

    #[test]
    fn every_pair_needs_a_host() {
        let layout = Layout { moe_layers: vec![1, 3], num_experts: 4 };
        assert_eq!(uncovered(&[], &layout), 8);
        assert_eq!(uncovered(&[worker(&[0, 1], &[])], &layout), 4);
        assert_eq!(uncovered(&[worker(&[0, 1], &[]), worker(&[2, 3], &[])], &layout), 0);
        // Expert 3 only in layer 1: layer 3 still lacks it.
        assert_eq!(uncovered(&[worker(&[0, 1], &[]), worker(&[2], &[(1, &[3])])], &layout), 1);
        assert_eq!(uncovered(&[worker(&[0, 1], &[(3, &[3])]), worker(&[2], &[(1, &[3])])], &layout), 0);
    }

    #[tokio::test]
    async fn a_drain_is_final() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus as Pb;
        use tonic_health::pb::health_server::Health as _;
        let health = Health::new().await;
        let service = HealthService::from_health_reporter(health.reporter.clone());
        let service = &service;
        let ask = |name: &str| {
            let request = tonic::Request::new(HealthCheckRequest { service: name.to_owned() });
            async move { service.check(request).await.expect("check").into_inner().status }
        };
        assert_eq!(ask("").await, Pb::NotServing as i32);
        assert_eq!(ask(LIVENESS_SERVICE).await, Pb::Serving as i32);
        health.set_ready(true).await;
        assert_eq!(ask(COORDINATOR_SERVICE).await, Pb::Serving as i32);
        health.drain().await;
        health.set_ready(true).await;
        assert_eq!(ask("").await, Pb::NotServing as i32);
        assert_eq!(ask(LIVENESS_SERVICE).await, Pb::Serving as i32);
    }
}
