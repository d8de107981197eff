//! The worker's readiness for orchestrators: the standard gRPC health service (`grpc.health.v1`,
//! `tonic-health`) on the worker's own port, answered from the moment the port is bound — while the
//! experts load (a 200 GB checkpoint takes minutes), not ready — and the drain on shutdown.
//!
//! Two names matter to probes: `""` (and `epserve.v1.ExpertService`) is readiness: `SERVING` once
//! the experts are loaded, `NOT_SERVING` while loading and while draining; [`LIVENESS_SERVICE`] is
//! `SERVING` for as long as the process answers at all, so that a slow start or a drain is never
//! taken for a hung process.

use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use epserve_proto::v1::expert_service_server::SERVICE_NAME as EXPERT_SERVICE;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// The health service name liveness probes ask for: `SERVING` while the process answers, drain and
/// load included (the overall status `""` is readiness).
pub const LIVENESS_SERVICE: &str = "liveness";

/// The worker's health statuses.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Live, not ready.
    pub async fn new() -> Self {
        let reporter = HealthReporter::new();
        reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        let health = Health { reporter };
        health.set_ready(false).await;
        health
    }

    /// Sets readiness: the overall status and `ExpertService`'s.
    pub async fn set_ready(&self, ready: bool) {
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(EXPERT_SERVICE, status).await;
    }

    /// The gRPC service answering from these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// The health service alone, served on a second descriptor of the worker's listening socket while
/// the experts load; [`Self::stop`] hands the socket over to the full server.
#[derive(Debug)]
pub(crate) struct EarlyHealth {
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// How long the early server may take to finish the probes it is answering when it is stopped.
const EARLY_STOP: Duration = Duration::from_secs(2);

impl EarlyHealth {
    /// Serves `health` on a duplicate of `listener`'s socket (both accept from the same queue; the
    /// duplicate is closed when this stops). `Err`: the socket could not be duplicated.
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

/// What the drain watches: the worker's exchange streams and exchanges.
pub(crate) trait Traffic {
    /// Exchange streams open (one per coordinator routing here).
    fn streams_open(&self) -> usize;
    /// Exchanges received and not answered yet.
    fn exchanges_in_flight(&self) -> usize;
    /// Exchanges received so far.
    fn exchanges_received(&self) -> u64;
}

/// No exchange for this long, after leaving the registry: no coordinator routes here any more,
/// even one that keeps its (idle) stream open.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(1000);

/// Waits, after the worker left the registry, until no coordinator routes here: nothing in flight,
/// and every exchange stream closed or none used for [`DRAIN_QUIET`]. True if that was reached
/// before `deadline`.
pub(crate) async fn wait_unrouted(traffic: &impl Traffic, deadline: Instant) -> bool {
    let (mut seen, mut quiet_since) = (traffic.exchanges_received(), Instant::now());
    loop {
        let idle = traffic.exchanges_in_flight() == 0;
        if idle && (traffic.streams_open() == 0 || quiet_since.elapsed() >= DRAIN_QUIET) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = traffic.exchanges_received();
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        streams: AtomicUsize,
        in_flight: AtomicUsize,
        received: AtomicU64,
    }

    impl Traffic for Fake {
        fn streams_open(&self) -> usize {
            self.streams.load(Ordering::Relaxed)
        }
        fn exchanges_in_flight(&self) -> usize {
            self.in_flight.load(Ordering::Relaxed)
        }
        fn exchanges_received(&self) -> u64 {
            self.received.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn unrouted_at_once_without_streams() {
        let fake = Fake::default();
        let started = Instant::now();
        assert!(wait_unrouted(&fake, Instant::now() + Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn an_idle_open_stream_waits_for_the_quiet_period() {
        let fake = Fake { streams: AtomicUsize::new(1), ..Default::default() };
        let started = Instant::now();
        assert!(wait_unrouted(&fake, Instant::now() + Duration::from_secs(5)).await);
        assert!(started.elapsed() >= DRAIN_QUIET);
    }

    #[tokio::test]
    async fn an_exchange_in_flight_holds_the_drain_until_the_deadline() {
        let fake = Fake { streams: AtomicUsize::new(1), in_flight: AtomicUsize::new(1), ..Default::default() };
        let started = Instant::now();
        assert!(!wait_unrouted(&fake, Instant::now() + Duration::from_millis(300)).await);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn health_starts_live_and_not_ready() {
        use tonic_health::pb::health_server::Health as _;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Pb};
        let health = Health::new().await;
        let service = HealthService::from_health_reporter(health.reporter.clone());
        let service = &service;
        let ask = |name: &str| {
            let request = tonic::Request::new(HealthCheckRequest { service: name.to_owned() });
            async move { service.check(request).await.expect("check").into_inner().status }
        };
        assert_eq!(ask(LIVENESS_SERVICE).await, Pb::Serving as i32);
        assert_eq!(ask("").await, Pb::NotServing as i32);
        assert_eq!(ask(EXPERT_SERVICE).await, Pb::NotServing as i32);
        health.set_ready(true).await;
        assert_eq!(ask("").await, Pb::Serving as i32);
        assert_eq!(ask(EXPERT_SERVICE).await, Pb::Serving as i32);
    }
}
