//! What the engine does with a failed expert exchange and with registry records it cannot trust,
//! through the grpc transport to real expert workers in process: a record is believed only as far
//! as the worker's own `Status` confirms it; a worker that refuses experts it claims is quarantined
//! and its rows go to a replica; a transient failure is retried and changes nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use candle_core::{DType, Device};
use epserve_control::{Instance, Kind, PlacementMap};
use epserve_coordinator::engine::{self, EngineConfig, Event, FinishReason, Request};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::sampling::SamplingParams;
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts, TransportError};
use epserve_expert_worker::ExpertWorker;
use epserve_model::{
    Checkpoint, ExpertBackend, ExpertBatch, ExpertShard, ExpertsInFlight, ModelConfig, TextModel, WeightStorage,
};
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use epserve_proto::v1::{
    ExchangeRequest, ExchangeResponse, HealthRequest, HealthResponse, StatusRequest, StatusResponse,
};
use tokio::sync::watch;

fn fixture() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

/// Counts the layers the engine hands to the transport, failing the first `fail_first` of them
/// with a transient transport error (a worker lost mid-exchange).
struct CountingExperts {
    inner: ExpertTransport,
    submits: Arc<AtomicU32>,
    fail_first: AtomicU32,
}

impl ExpertBackend for CountingExperts {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + 'a>> {
        self.submits.fetch_add(1, Ordering::Relaxed);
        if self.fail_first.load(Ordering::Relaxed) > 0 {
            self.fail_first.fetch_sub(1, Ordering::Relaxed);
            let lost = TransportError::Unavailable { worker: "injected".into(), reason: "connection reset".into() };
            return Err(lost.at_layer(batch.layer));
        }
        self.inner.submit(batch)
    }

    fn step_finished(&self) {
        self.inner.step_finished();
    }
}

/// An engine over the grpc transport to `workers` (real expert workers in process, or anything
/// serving `ExpertService`), each with the registry record the test says (stale or lying ones too).
struct Setup {
    submits: Arc<AtomicU32>,
    engine: engine::EngineHandle,
    _members: watch::Sender<Vec<Instance>>,
    _placement: watch::Sender<Option<PlacementMap>>,
    // Dropped last: it carries the workers' servers and the transport's streams.
    _runtime: tokio::runtime::Runtime,
}

fn config() -> ModelConfig {
    ModelConfig::from_file(&fixture().join("config.json")).expect("config")
}

/// A real worker hosting `hosted`, not yet served.
fn worker(hosted: &[u32]) -> Arc<ExpertWorker> {
    let cfg = config();
    let ckpt = Checkpoint::open(&fixture()).expect("checkpoint");
    let shard = ExpertShard::load(&cfg, &ckpt, hosted, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
        .expect("shard");
    Arc::new(ExpertWorker::new(shard, cfg.text.clone(), "tiny-llama4".into(), DType::F32))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt")
}

/// The exchange answers of the test's own `ExpertService`s.
type AnswerStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ExchangeResponse, tonic::Status>> + Send>>;

/// Serves `service` (a stand-in for a worker) on a free port of `runtime`; its address.
fn serve_service<S: ExpertService>(runtime: &tokio::runtime::Runtime, service: S) -> String {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(ExpertServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

/// Serves `worker` on a free port of `runtime`; its address.
fn serve_worker(runtime: &tokio::runtime::Runtime, worker: Arc<ExpertWorker>) -> String {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    runtime.spawn(epserve_expert_worker::serve(worker, listener, std::future::pending()));
    addr
}

/// The registry record of the worker at `addr`, claiming `announced`.
fn record(addr: &str, announced: &[u32]) -> Instance {
    Instance { incarnation: 1, experts: announced.to_vec(), ..Instance::new(Kind::Worker, addr, addr) }
}

/// A transport (or why it could not reach every expert) and the senders of what it follows.
type Followed =
    (Result<GrpcExperts, TransportError>, watch::Sender<Vec<Instance>>, watch::Sender<Option<PlacementMap>>);

/// The exchange deadline of the tests that do not test it.
const DEADLINE: Duration = Duration::from_secs(10);

/// The transport following `records`, waiting up to `wait` for every expert to have a host (and
/// in a step, for an expert to get one), with exchange deadline `deadline`.
fn transport(
    runtime: &tokio::runtime::Runtime,
    records: Vec<Instance>,
    wait: Duration,
    deadline: Duration,
) -> Followed {
    let (members, members_rx) = watch::channel(records);
    let (placement, placement_rx) = watch::channel(None);
    let grpc_cfg = GrpcConfig {
        wire: epserve_proto::wire::WireDtype::F32,
        exchange_timeout: deadline,
        host_wait: wait,
        ..GrpcConfig::new(Vec::new())
    };
    let grpc =
        runtime.block_on(GrpcExperts::follow(&grpc_cfg, &config().text, DType::F32, members_rx, placement_rx, wait));
    (grpc, members, placement)
}

fn setup_with(runtime: tokio::runtime::Runtime, records: Vec<Instance>, fail_first: u32, deadline: Duration) -> Setup {
    let (grpc, members, placement) = transport(&runtime, records, Duration::from_secs(20), deadline);
    let grpc = grpc.expect("the transport reaches the workers");
    let cfg = config();
    let ckpt = Checkpoint::open(&fixture()).expect("checkpoint");
    let model =
        TextModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut |_, _| {}).expect("model");
    let pool = KvPool::new(&cfg.text, KvCapacity::Tokens(1024), 4, DType::F32, &Device::Cpu).expect("pool");
    let submits = Arc::new(AtomicU32::new(0));
    let experts = CountingExperts {
        inner: ExpertTransport::Grpc(grpc),
        submits: submits.clone(),
        fail_first: AtomicU32::new(fail_first),
    };
    let engine = engine::start(model, None, experts, pool, EngineConfig::new(1024, cfg.text.eos_token_ids.clone()));
    Setup { submits, engine, _members: members, _placement: placement, _runtime: runtime }
}

/// One real worker hosting every expert, with a truthful record.
fn setup(fail_first: u32) -> (Setup, Arc<ExpertWorker>) {
    let all: Vec<u32> = (0..16).collect();
    let runtime = runtime();
    let w = worker(&all);
    let addr = serve_worker(&runtime, w.clone());
    (setup_with(runtime, vec![record(&addr, &all)], fail_first, DEADLINE), w)
}

/// The tokens of the test request on a clean setup (one honest worker hosting every expert).
fn reference_tokens() -> Vec<u32> {
    let (clean, _) = setup(0);
    run(&clean.engine).0
}

/// Runs one greedy request to its end: its tokens, finish reason and message.
fn run(engine: &engine::EngineHandle) -> (Vec<u32>, FinishReason, Option<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
    let prompt = vec![480, 12, 7, 301, 44, 95, 260, 8, 77];
    let sampling = SamplingParams { temperature: 0.0, max_tokens: 6, ignore_eos: true, ..Default::default() };
    engine
        .submit(Request { id: "r".into(), prompt, sampling, priority: 0, images: Vec::new(), constraint: None }, tx)
        .expect("queued");
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine finishes every request") {
            Event::Token(s) => tokens.push(s.token),
            Event::Finished { reason, message, .. } => return (tokens, reason, message),
        }
    }
}

#[test]
fn a_record_listing_experts_the_worker_does_not_host_is_not_believed() {
    // The registry says the worker serves every expert; it has loaded only expert 0. Its own
    // Status is believed, not the record: nothing else is routed there, so with no other host the
    // transport reports the gap instead of sending exchanges that would be refused.
    let all: Vec<u32> = (0..16).collect();
    let runtime = runtime();
    let stale = worker(&[0]);
    let addr = serve_worker(&runtime, stale.clone());
    let (grpc, _m, _p) = transport(&runtime, vec![record(&addr, &all)], Duration::from_secs(2), DEADLINE);
    let Err(err) = grpc else { panic!("expected no host for experts 1-15") };
    assert!(err.to_string().contains("no worker hosts layer 0: experts 1-15"), "{err}");
    assert_eq!(stale.stats().exchanges_rejected.load(Ordering::Relaxed), 0, "nothing was sent to it");

    // Beside a truthful worker hosting everything: every request is served, the stale record is
    // trimmed to what the worker confirms, and it never refuses an exchange.
    let (clean, _) = setup(0);
    let (expected, reason, message) = run(&clean.engine);
    assert_eq!((reason, expected.len()), (FinishReason::Length, 6), "{message:?}");
    let runtime = self::runtime();
    let (full, half) = (worker(&all), worker(&(0..8).collect::<Vec<_>>()));
    let records =
        vec![record(&serve_worker(&runtime, full.clone()), &all), record(&serve_worker(&runtime, half.clone()), &all)];
    let mixed = setup_with(runtime, records, 0, DEADLINE);
    let (tokens, reason, message) = run(&mixed.engine);
    assert_eq!((reason, &tokens), (FinishReason::Length, &expected), "{message:?}");
    assert_eq!(half.stats().exchanges_rejected.load(Ordering::Relaxed), 0, "only its confirmed experts reach it");
    assert!(half.stats().exchanges_served.load(Ordering::Relaxed) > 0, "its confirmed experts are used");
}

/// An `ExpertService` that claims to host every expert (in `Status`) and refuses every exchange as
/// not hosted: a worker whose record and status are wrong, or one that lies.
#[derive(Clone)]
struct Liar {
    truth: Arc<ExpertWorker>,
    exchanges: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl ExpertService for Liar {
    type ExchangeStream = AnswerStream;

    async fn exchange(
        &self,
        request: tonic::Request<tonic::Streaming<ExchangeRequest>>,
    ) -> Result<tonic::Response<Self::ExchangeStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let exchanges = self.exchanges.clone();
        tokio::spawn(async move {
            while let Ok(Some(x)) = inbound.message().await {
                exchanges.fetch_add(1, Ordering::Relaxed);
                let refusal = ExchangeResponse {
                    id: x.id,
                    code: tonic::Code::FailedPrecondition as i32,
                    message: "expert is not hosted on this worker".into(),
                    ..Default::default()
                };
                if tx.send(Ok(refusal)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn health(&self, _: tonic::Request<HealthRequest>) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthResponse { serving: true }))
    }

    async fn status(&self, _: tonic::Request<StatusRequest>) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        let mut status = self.truth_status();
        for layer in &mut status.layers {
            layer.experts = (0..16).collect();
        }
        Ok(tonic::Response::new(status))
    }
}

impl Liar {
    fn truth_status(&self) -> StatusResponse {
        let cfg = config();
        StatusResponse {
            layers: cfg
                .text
                .moe_layers()
                .map(|layer| epserve_proto::v1::LayerExperts { layer: layer as u32, experts: self.truth.experts() })
                .collect(),
            hidden: cfg.text.hidden_size as u32,
            num_layers: cfg.text.num_hidden_layers as u32,
            num_experts: cfg.text.num_local_experts as u32,
            ..Default::default()
        }
    }
}

#[test]
fn a_worker_refusing_experts_it_claims_is_quarantined_and_its_rows_fail_over() {
    let expected = reference_tokens();

    let all: Vec<u32> = (0..16).collect();
    let runtime = runtime();
    let honest = worker(&all);
    let honest_addr = serve_worker(&runtime, honest.clone());
    let liar = Liar { truth: worker(&[0]), exchanges: Arc::new(AtomicU32::new(0)) };
    let liar_addr = serve_service(&runtime, liar.clone());
    let s = setup_with(runtime, vec![record(&honest_addr, &all), record(&liar_addr, &all)], 0, DEADLINE);
    let (tokens, reason, message) = run(&s.engine);
    assert_eq!(
        (reason, &tokens),
        (FinishReason::Length, &expected),
        "every refused row was served by the replica: {message:?}"
    );
    let refused = liar.exchanges.load(Ordering::Relaxed);
    assert_eq!(refused, 1, "after its first refusal the liar is left alone (quarantined), not retried");
    assert!(honest.stats().exchanges_served.load(Ordering::Relaxed) > 0);
    // Still quarantined for the next request too.
    run(&s.engine);
    assert_eq!(liar.exchanges.load(Ordering::Relaxed), 1);
}

#[test]
fn a_transient_failure_is_retried_and_changes_nothing() {
    let (clean, clean_worker) = setup(0);
    let (expected, reason, message) = run(&clean.engine);
    assert_eq!((reason, expected.len()), (FinishReason::Length, 6), "{message:?}");

    let (flaky, flaky_worker) = setup(2);
    let (tokens, reason, message) = run(&flaky.engine);
    assert_eq!(reason, FinishReason::Length, "{message:?}");
    assert_eq!(tokens, expected, "two lost exchanges cost two retries, not tokens");
    let stats = flaky_worker.stats();
    assert_eq!(stats.exchanges_rejected.load(Ordering::Relaxed), 0);
    let served = stats.exchanges_served.load(Ordering::Relaxed);
    assert_eq!(flaky.submits.load(Ordering::Relaxed) as u64, served + 2, "the two failed attempts, then every layer");
    assert_eq!(served, clean_worker.stats().exchanges_served.load(Ordering::Relaxed));
}

/// A worker that is slow once: it relays every exchange to `worker` (a real one), except the first
/// request of its first exchange stream, which it never answers — a worker stalled past the
/// deadline (a starved or paused process) that then recovers.
#[derive(Clone)]
struct StalledOnce {
    worker: String,
    streams: Arc<AtomicU32>,
    relayed: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl ExpertService for StalledOnce {
    type ExchangeStream = AnswerStream;

    async fn exchange(
        &self,
        request: tonic::Request<tonic::Streaming<ExchangeRequest>>,
    ) -> Result<tonic::Response<Self::ExchangeStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let mut stall = self.streams.fetch_add(1, Ordering::Relaxed) == 0;
        let (to_worker, requests) = tokio::sync::mpsc::channel(16);
        let relayed = self.relayed.clone();
        tokio::spawn(async move {
            while let Ok(Some(x)) = inbound.message().await {
                if std::mem::take(&mut stall) {
                    continue;
                }
                relayed.fetch_add(1, Ordering::Relaxed);
                if to_worker.send(x).await.is_err() {
                    break;
                }
            }
        });
        let mut client = self.client().await?;
        let answers = client.exchange(tokio_stream::wrappers::ReceiverStream::new(requests)).await?.into_inner();
        Ok(tonic::Response::new(Box::pin(answers)))
    }

    async fn health(&self, r: tonic::Request<HealthRequest>) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
        self.client().await?.health(r.into_inner()).await
    }

    async fn status(&self, r: tonic::Request<StatusRequest>) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        self.client().await?.status(r.into_inner()).await
    }
}

impl StalledOnce {
    async fn client(&self) -> Result<ExpertServiceClient<tonic::transport::Channel>, tonic::Status> {
        ExpertServiceClient::connect(format!("http://{}", self.worker))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }
}

#[test]
fn the_only_other_host_is_tried_again_once_it_has_reconnected() {
    // The only host of every expert misses one exchange's deadline: it is lost, reconnects at
    // once, and the exchange goes to it again (it is the only host left) instead of waiting for
    // another host and failing the request. (The worker computes in this process, over gRPC, on
    // the kernels' pool whose thread the waiting engine holds: it needs a pool of two threads,
    // two CPUs.)
    let expected = reference_tokens();

    let all: Vec<u32> = (0..16).collect();
    let runtime = runtime();
    let real = worker(&all);
    let stalled = StalledOnce {
        worker: serve_worker(&runtime, real.clone()),
        streams: Arc::new(AtomicU32::new(0)),
        relayed: Arc::new(AtomicU32::new(0)),
    };
    let addr = serve_service(&runtime, stalled.clone());
    // Long enough for a loaded CI host to answer the exchanges that are not stalled.
    let s = setup_with(runtime, vec![record(&addr, &all)], 0, Duration::from_secs(3));
    let (tokens, reason, message) = run(&s.engine);
    assert_eq!((reason, &tokens), (FinishReason::Length, &expected), "{message:?}");
    assert_eq!(stalled.streams.load(Ordering::Relaxed), 2, "it reconnected once");
    assert_eq!(
        u64::from(stalled.relayed.load(Ordering::Relaxed)),
        real.stats().exchanges_served.load(Ordering::Relaxed),
        "every exchange but the stalled one reached the worker"
    );
}
