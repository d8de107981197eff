//! Process health for orchestrators, shared by the gRPC servers of the cluster (expert workers and
//! coordinators): the standard gRPC health service (`grpc.health.v1`, `tonic-health`), answered from
//! the moment the port is bound, so that a start that loads a 200 GB checkpoint is seen as alive and
//! not ready rather than as a hung process.
//!
//! Two names matter to probes: `""` (and the process's own service name, e.g.
//! `epserve.v1.ExpertService`) is **readiness**, set by the process ([`Health::set_ready`]) and
//! `NOT_SERVING` for good once it drains ([`Health::drain`]); [`LIVENESS_SERVICE`] is `SERVING` for
//! as long as the process answers at all, load and drain included.
//!
//! Boundaries: what "ready" means is each process's decision (its crate's `health.rs`); this crate
//! holds the statuses and serves them, on the process's own listening socket ([`EarlyHealth`]) until
//! the full server takes it over and adds [`Health::service`] to its routes.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// The health service name liveness probes ask for: `SERVING` while the process answers, load and
/// drain included (the overall status `""` is readiness).
pub const LIVENESS_SERVICE: &str = "liveness";

/// A process's health statuses; once draining, never ready again.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    /// The process's own gRPC service, whose status follows readiness too.
    service: &'static str,
    /// Set by [`Self::drain`]; under a lock so that a readiness update racing a drain cannot win.
    draining: Arc<Mutex<bool>>,
}

impl Health {
    /// Live, not ready. `service` is the process's own gRPC service name.
    pub async fn new(service: &'static str) -> Self {
        let reporter = HealthReporter::new();
        reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        let health = Health { reporter, service, draining: Arc::new(Mutex::new(false)) };
        health.set(false).await;
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
        self.reporter.set_service_status(self.service, status).await;
    }

    /// The gRPC service answering from these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// The health service alone, served on a second descriptor of the process's listening socket while
/// it loads; [`Self::stop`] hands the socket over to the full server.
#[derive(Debug)]
pub struct EarlyHealth {
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// How long the early server may take to finish the probes it is answering when it is stopped.
const EARLY_STOP: Duration = Duration::from_secs(2);

impl EarlyHealth {
    /// Serves `health` on a duplicate of `listener`'s socket (both accept from the same queue; the
    /// duplicate is closed when this stops), over mutual TLS when `tls` is given. `Err`: the socket
    /// could not be duplicated.
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Pb};

    async fn ask(health: &Health, name: &str) -> i32 {
        let service = HealthService::from_health_reporter(health.reporter.clone());
        let request = tonic::Request::new(HealthCheckRequest { service: name.to_owned() });
        service.check(request).await.expect("check").into_inner().status
    }

    #[tokio::test]
    async fn live_from_the_start_ready_when_set_and_a_drain_is_final() {
        let health = Health::new("epserve.v1.Test").await;
        assert_eq!(ask(&health, LIVENESS_SERVICE).await, Pb::Serving as i32);
        assert_eq!(ask(&health, "").await, Pb::NotServing as i32);
        assert_eq!(ask(&health, "epserve.v1.Test").await, Pb::NotServing as i32);
        health.set_ready(true).await;
        assert_eq!(ask(&health, "").await, Pb::Serving as i32);
        assert_eq!(ask(&health, "epserve.v1.Test").await, Pb::Serving as i32);
        health.drain().await;
        health.set_ready(true).await;
        assert_eq!(ask(&health, "").await, Pb::NotServing as i32);
        assert_eq!(ask(&health, "epserve.v1.Test").await, Pb::NotServing as i32);
        assert_eq!(ask(&health, LIVENESS_SERVICE).await, Pb::Serving as i32);
    }

    #[tokio::test]
    async fn the_early_server_answers_on_the_bound_socket_and_hands_it_back() {
        let health = Health::new("epserve.v1.Test").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (listener, early) = EarlyHealth::start(listener, &health, None).expect("start");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = HealthCheckRequest { service: LIVENESS_SERVICE.to_owned() };
        let status = client.check(request).await.expect("check").into_inner().status;
        assert_eq!(status, Pb::Serving as i32);
        early.stop().await;
        assert_eq!(listener.local_addr().expect("still bound"), addr);
    }
}
