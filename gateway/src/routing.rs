//! Choosing a coordinator: the healthy one with the least load. Every coordinator's `Load` is polled
//! in the background; one that stops answering is taken out and polled again until it answers. A
//! request that fails before its first token is retried on another coordinator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{GenerateRequest, LoadRequest, TokenEvent};
use parking_lot::{Mutex, RwLock};
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
    /// Set when the coordinator left the membership: its poller stops.
    removed: AtomicBool,
}

/// The coordinators requests can go to: a fixed list, or one followed in the control plane.
#[derive(Debug)]
pub struct CoordinatorPool {
    backends: RwLock<Vec<Arc<Backend>>>,
    /// Set by `spawn_health_checks`: coordinators added later are polled at the same interval.
    interval: Mutex<Option<Duration>>,
    /// The identity coordinator links are made with (mutual TLS); `None`: plaintext.
    tls: Option<epserve_tls::ClusterTls>,
}

/// Why a generation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The coordinator refused the request itself (bad parameters): the client's fault.
    #[error("{0}")]
    Rejected(String),
    #[error("no healthy coordinator: {0}")]
    Unavailable(String),
    /// Every coordinator that answered had a full waiting queue (`RESOURCE_EXHAUSTED`): retry later.
    #[error("every coordinator is busy: {0}")]
    Busy(String),
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
        Self::with_tls(addrs, None)
    }

    /// [`Self::new`], the coordinators reached over mutual TLS with `tls` (plaintext without).
    pub fn with_tls(addrs: &[String], tls: Option<epserve_tls::ClusterTls>) -> anyhow::Result<Arc<Self>> {
        let backends = addrs.iter().map(|a| backend(a, tls.as_ref())).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Arc::new(CoordinatorPool { backends: RwLock::new(backends), interval: Mutex::new(None), tls }))
    }

    fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().clone()
    }

    /// Polls every coordinator's `Load` every `interval` (with a timeout of the same length).
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration) {
        *self.interval.lock() = Some(interval);
        for backend in self.backends() {
            poll(backend, interval);
        }
    }

    /// Replaces the membership with `addrs`: new coordinators are added (and polled), departed ones
    /// stop receiving requests (streams already running on them continue).
    pub fn set_members(&self, addrs: &[String]) {
        let interval = *self.interval.lock();
        let mut backends = self.backends.write();
        backends.retain(|b| {
            let keep = addrs.contains(&b.addr);
            if !keep {
                b.removed.store(true, Ordering::Relaxed);
                tracing::info!(coordinator = %b.addr, "coordinator left the cluster");
            }
            keep
        });
        for addr in addrs {
            if backends.iter().any(|b| &b.addr == addr) {
                continue;
            }
            match backend(addr, self.tls.as_ref()) {
                Ok(b) => {
                    tracing::info!(coordinator = %addr, "coordinator joined the cluster");
                    if let Some(interval) = interval {
                        poll(b.clone(), interval);
                    }
                    backends.push(b);
                }
                Err(e) => tracing::warn!(coordinator = %addr, "bad coordinator address: {e}"),
            }
        }
    }

    /// Follows a published membership until its sender is gone.
    pub fn follow(self: &Arc<Self>, mut members: tokio::sync::watch::Receiver<Vec<String>>) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let addrs = members.borrow_and_update().clone();
                pool.set_members(&addrs);
                if members.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Healthy coordinators now (the batch runner sizes its lines in flight by it).
    pub fn healthy_count(&self) -> usize {
        self.backends().iter().filter(|b| b.healthy.load(Ordering::Relaxed)).count()
    }

    pub fn any_healthy(&self) -> bool {
        self.backends().iter().any(|b| b.healthy.load(Ordering::Relaxed))
    }

    /// The context limit the coordinators enforce (the smallest among the healthy ones).
    pub fn max_model_len(&self) -> Option<u32> {
        self.backends()
            .iter()
            .filter(|b| b.healthy.load(Ordering::Relaxed))
            .map(|b| b.max_model_len.load(Ordering::Relaxed))
            .filter(|&l| l > 0)
            .min()
    }

    /// Healthy coordinators, least loaded first.
    fn candidates(&self) -> Vec<Arc<Backend>> {
        let mut healthy: Vec<_> = self.backends().into_iter().filter(|b| b.healthy.load(Ordering::Relaxed)).collect();
        healthy.sort_by_key(|b| b.in_flight.load(Ordering::Relaxed) + b.queued.load(Ordering::Relaxed) as usize);
        healthy
    }

    /// Starts `request` on the least-loaded healthy coordinator, trying the others if it fails
    /// before producing its first event.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Generation, RouteError> {
        let mut last_error = "none is healthy".to_owned();
        let mut busy = None;
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
                // A full queue is load, not a fault: the coordinator stays in, another is tried.
                Err(status) if status.code() == Code::ResourceExhausted => {
                    busy = Some(format!("{}: {}", backend.addr, status.message()));
                    continue;
                }
                Err(status) => {
                    mark_down(&backend, status.message());
                    last_error = format!("{}: {}", backend.addr, status.message());
                    continue;
                }
            };
            match stream.message().await {
                // Nothing was sent to the client yet: a coordinator whose experts are unavailable
                // is as good as down for this request, so another one is tried.
                Ok(Some(first)) if first.unavailable => {
                    last_error = format!("{}: {}", backend.addr, first.error);
                }
                Ok(Some(first)) => return Ok(Generation { first, rest: stream, _in_flight: guard }),
                Ok(None) => last_error = format!("{}: the stream ended before any event", backend.addr),
                Err(status) => {
                    mark_down(&backend, status.message());
                    last_error = format!("{}: {}", backend.addr, status.message());
                }
            }
        }
        Err(busy.map_or(RouteError::Unavailable(last_error), RouteError::Busy))
    }
}

fn backend(addr: &str, tls: Option<&epserve_tls::ClusterTls>) -> anyhow::Result<Arc<Backend>> {
    let uri = epserve_proto::server_uri(addr);
    let endpoint = Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = epserve_tls::channel(endpoint, tls);
    Ok(Arc::new(Backend {
        addr: addr.to_owned(),
        client: CoordinatorServiceClient::new(channel),
        healthy: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        queued: AtomicU32::new(0),
        max_model_len: AtomicU32::new(0),
        removed: AtomicBool::new(false),
    }))
}

/// Polls `backend`'s `Load` every `interval` until it is removed.
fn poll(backend: Arc<Backend>, interval: Duration) {
    tokio::spawn(async move {
        while !backend.removed.load(Ordering::Relaxed) {
            let mut client = backend.client.clone();
            let answer =
                tokio::time::timeout(interval.max(Duration::from_millis(500)), client.load(LoadRequest {})).await;
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

fn mark_down(backend: &Backend, reason: &str) {
    if backend.healthy.swap(false, Ordering::Relaxed) {
        tracing::warn!(coordinator = %backend.addr, "coordinator taken out: {reason}");
    }
}
