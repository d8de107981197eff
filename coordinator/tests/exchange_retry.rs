//! What the engine does with a failed expert exchange, through the grpc transport to a real expert
//! worker in process: an exchange the worker rejects as invalid is sent once and its request fails
//! at once with the worker's reason; a transient failure is retried and changes nothing.

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

/// A worker hosting `hosted` on a free port, and a coordinator side whose registry record for it
/// claims `announced` (a stale record when they differ), with an engine on top.
struct Setup {
    worker: Arc<ExpertWorker>,
    submits: Arc<AtomicU32>,
    engine: engine::EngineHandle,
    _members: watch::Sender<Vec<Instance>>,
    _placement: watch::Sender<Option<PlacementMap>>,
    // Dropped last: it carries the worker's server and the transport's streams.
    _runtime: tokio::runtime::Runtime,
}

fn setup(hosted: &[u32], announced: &[u32], fail_first: u32) -> Setup {
    let dir = fixture();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");

    let shard = ExpertShard::load(&cfg, &ckpt, hosted, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
        .expect("shard");
    let worker = Arc::new(ExpertWorker::new(shard, cfg.text.clone(), "tiny-llama4".into(), DType::F32));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    runtime.spawn(epserve_expert_worker::serve(worker.clone(), listener, std::future::pending()));

    let record =
        Instance { incarnation: 1, experts: announced.to_vec(), ..Instance::new(Kind::Worker, addr.clone(), addr) };
    let (members, members_rx) = watch::channel(vec![record]);
    let (placement, placement_rx) = watch::channel(None);
    let grpc_cfg = GrpcConfig { wire: epserve_proto::wire::WireDtype::F32, ..GrpcConfig::new(Vec::new()) };
    let grpc = runtime
        .block_on(GrpcExperts::follow(
            &grpc_cfg,
            &cfg.text,
            DType::F32,
            members_rx,
            placement_rx,
            Duration::from_secs(20),
        ))
        .expect("the transport reaches the worker");

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
    Setup { worker, submits, engine, _members: members, _placement: placement, _runtime: runtime }
}

/// Runs one greedy request to its end: its tokens, finish reason and message.
fn run(engine: &engine::EngineHandle) -> (Vec<u32>, FinishReason, Option<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
fn an_invalid_exchange_is_sent_once_and_fails_its_request_at_once() {
    // The registry says the worker serves every expert; it has loaded only expert 0, so it rejects
    // (INVALID_ARGUMENT) the first exchange that carries rows of another expert. Sending it again
    // would get the same answer.
    let all: Vec<u32> = (0..16).collect();
    let s = setup(&[0], &all, 0);
    let (tokens, reason, message) = run(&s.engine);
    let message = message.unwrap_or_default();
    assert_eq!(reason, FinishReason::Error, "{message}");
    assert!(tokens.is_empty(), "{tokens:?}");
    assert!(message.contains("rejected") && message.contains("is not hosted on this worker"), "{message}");

    let stats = s.worker.stats();
    assert_eq!(stats.exchanges_rejected.load(Ordering::Relaxed), 1, "the worker saw the invalid exchange once");
    // Each layer the engine hands over is one exchange with the only worker: after the rejected
    // one, nothing more was sent (no step retry, no failover).
    let served = stats.exchanges_served.load(Ordering::Relaxed);
    assert_eq!(s.submits.load(Ordering::Relaxed) as u64, served + 1, "layers handed to the transport");
}

#[test]
fn a_transient_failure_is_retried_and_changes_nothing() {
    let all: Vec<u32> = (0..16).collect();
    let clean = setup(&all, &all, 0);
    let (expected, reason, message) = run(&clean.engine);
    assert_eq!((reason, expected.len()), (FinishReason::Length, 6), "{message:?}");

    let flaky = setup(&all, &all, 2);
    let (tokens, reason, message) = run(&flaky.engine);
    assert_eq!(reason, FinishReason::Length, "{message:?}");
    assert_eq!(tokens, expected, "two lost exchanges cost two retries, not tokens");
    let stats = flaky.worker.stats();
    assert_eq!(stats.exchanges_rejected.load(Ordering::Relaxed), 0);
    let served = stats.exchanges_served.load(Ordering::Relaxed);
    assert_eq!(flaky.submits.load(Ordering::Relaxed) as u64, served + 2, "the two failed attempts, then every layer");
    assert_eq!(served, clean.worker.stats().exchanges_served.load(Ordering::Relaxed));
}
