//! Choosing a coordinator: the healthy one with the least load. Every coordinator's `Load` is polled
//! in the background; one that stops answering is taken out and polled again until it answers. A
//! request that fails before its first token is retried on another coordinator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{GenerateRequest, LoadRequest, TokenEvent};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

#[derive(Debug)]
struct Backend {
    addr: String,
    client: CoordinatorServiceClient<Channel>,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    /// Waiting + running, from the last `Load`.
    queued: AtomicU32,
    max_model_len: AtomicU32,
}

#[derive(Debug)]
pub struct CoordinatorPool {
    backends: Vec<Arc<Backend>>,
}

/// Why a generation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The coordinator refused the request itself (bad parameters): the client's fault.
    #[error("{0}")]
    Rejected(String),
    #[error("no healthy coordinator: {0}")]
    Unavailable(String),
}

/// A started generation: its first event (already received) and the rest of the stream. Holding it
/// counts as one request in flight on its coordinator.
#[derive(Debug)]
pub struct Generation {
    pub first: TokenEvent,
    pub rest: Streaming<TokenEvent>,
    _in_flight: InFlight,
}

#[derive(Debug)]
struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CoordinatorPool {
    /// Connects lazily: coordinators that are not up yet are picked up by the health checks.
    pub fn new(addrs: &[String]) -> anyhow::Result<Arc<Self>> {
        let mut backends = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
            let channel = Endpoint::from_shared(uri)?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy();
            backends.push(Arc::new(Backend {
                addr: addr.clone(),
                client: CoordinatorServiceClient::new(channel),
                healthy: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                queued: AtomicU32::new(0),
                max_model_len: AtomicU32::new(0),
            }));
        }
        Ok(Arc::new(CoordinatorPool { backends }))
    }

    /// Polls every coordinator's `Load` every `interval` (with a timeout of the same length).
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration) {
        for backend in &self.backends {
            let backend = backend.clone();
            tokio::spawn(async move {
                loop {
                    let mut client = backend.client.clone();
                    let answer =
                        tokio::time::timeout(interval.max(Duration::from_millis(500)), client.load(LoadRequest {}))
                            .await;
                    match answer {
                        Ok(Ok(load)) => {
                            let load = load.into_inner();
                            backend.queued.store(load.waiting + load.running, Ordering::Relaxed);
                            backend.max_model_len.store(load.max_model_len, Ordering::Relaxed);
                            if !backend.healthy.swap(true, Ordering::Relaxed) {
                                tracing::info!(coordinator = %backend.addr, "coordinator is healthy");
                            }
                        }
                        Ok(Err(e)) => mark_down(&backend, &e.to_string()),
                        Err(_) => mark_down(&backend, "Load timed out"),
                    }
                    tokio::time::sleep(interval).await;
                }
            });
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.backends.iter().any(|b| b.healthy.load(Ordering::Relaxed))
    }

    /// The context limit the coordinators enforce (the smallest among the healthy ones).
    pub fn max_model_len(&self) -> Option<u32> {
        self.backends
            .iter()
            .filter(|b| b.healthy.load(Ordering::Relaxed))
            .map(|b| b.max_model_len.load(Ordering::Relaxed))
            .filter(|&l| l > 0)
            .min()
    }

    /// Healthy coordinators, least loaded first.
    fn candidates(&self) -> Vec<Arc<Backend>> {
        let mut healthy: Vec<_> = self.backends.iter().filter(|b| b.healthy.load(Ordering::Relaxed)).cloned().collect();
        healthy.sort_by_key(|b| b.in_flight.load(Ordering::Relaxed) + b.queued.load(Ordering::Relaxed) as usize);
        healthy
    }

    /// Starts `request` on the least-loaded healthy coordinator, trying the others if it fails
    /// before producing its first event.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Generation, RouteError> {
        let mut last_error = "none is healthy".to_owned();
        for backend in self.candidates() {
            backend.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(backend.clone());
            let mut client = backend.client.clone();
            let started = client.generate(request.clone()).await;
            let mut stream = match started {
                Ok(s) => s.into_inner(),
                Err(status) if status.code() == Code::InvalidArgument => {
                    return Err(RouteError::Rejected(status.message().to_owned()));
                }
                Err(status) => {
                    mark_down(&backend, status.message());
                    last_error = format!("{}: {}", backend.addr, status.message());
                    continue;
                }
            };
            match stream.message().await {
                Ok(Some(first)) => return Ok(Generation { first, rest: stream, _in_flight: guard }),
                Ok(None) => last_error = format!("{}: the stream ended before any event", backend.addr),
                Err(status) => {
                    mark_down(&backend, status.message());
                    last_error = format!("{}: {}", backend.addr, status.message());
                }
            }
        }
        Err(RouteError::Unavailable(last_error))
    }
}

fn mark_down(backend: &Backend, reason: &str) {
    if backend.healthy.swap(false, Ordering::Relaxed) {
        tracing::warn!(coordinator = %backend.addr, "coordinator taken out: {reason}");
    }
}
