//! What bounds the engine and what it does when its own thread fails: a full waiting queue refuses
//! at once (`RESOURCE_EXHAUSTED` at gRPC), a reader that stops reading is cancelled and its KV
//! freed, only the gateway's priorities are accepted (none more urgent than interactive), and an
//! engine thread that panics makes the coordinator's gRPC service report NOT_SERVING, refuse work
//! and stop.

mod support;

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use epserve_coordinator::ExpertTransport;
use epserve_coordinator::engine::{self, EngineConfig, EngineHandle, Event, Request, SubmitError};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::sampling::SamplingParams;
use epserve_coordinator::server::{self, Coordinator};
use epserve_model::{ExpertBackend, ExpertBatch, ExpertsInFlight};
use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{GenerateRequest, HealthRequest, LoadRequest};
use support::prompt;
use tokio::sync::mpsc::Receiver;

/// The tiny fixture's engine with `max_running`/`max_waiting`, its experts wrapped by `wrap`.
fn start<E: ExpertBackend + 'static>(
    max_running: usize,
    max_waiting: usize,
    wrap: impl FnOnce(ExpertTransport) -> E,
) -> EngineHandle {
    let (cfg, model, experts) = support::load_tiny();
    let pool = KvPool::new(&cfg.text, KvCapacity::Tokens(4096), 4, DType::F32, &Device::Cpu).expect("pool");
    let config = EngineConfig { max_running, max_waiting, ..EngineConfig::new(2048, cfg.text.eos_token_ids.clone()) };
    engine::start(model, None, wrap(experts), pool, config)
}

fn request(id: &str, max_tokens: u32, priority: i32) -> Request {
    let sampling = SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() };
    Request { id: id.into(), prompt: prompt(8, id.len()), sampling, priority, images: Vec::new(), constraint: None }
}

fn submit(engine: &EngineHandle, r: Request, capacity: usize) -> Result<Receiver<Event>, SubmitError> {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    engine.submit(r, tx).map(|()| rx)
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_full_waiting_queue_refuses_new_requests_at_once() {
    let engine = start(1, 2, |e| e);
    // One running (long), two waiting behind it (one sequence runs at a time).
    let mut running = submit(&engine, request("running", 4000, 0), 8192).expect("queued");
    assert!(matches!(running.blocking_recv(), Some(Event::Token(_))), "the first request runs");
    let waiting: Vec<_> =
        ["w1", "w2"].iter().map(|id| submit(&engine, request(id, 4, 0), 64).expect("queued")).collect();
    match submit(&engine, request("w3", 4, 0), 64) {
        Err(e @ SubmitError::Busy { waiting: 2 }) => assert!(e.to_string().contains("try again"), "{e}"),
        other => panic!("expected Busy, got {:?}", other.map(|_| ())),
    }
    // The queue frees its places as requests leave it: cancelling the running one lets both
    // waiting ones run, and new requests are accepted again.
    drop(running);
    for mut rx in waiting {
        while let Some(e) = rx.blocking_recv() {
            if matches!(e, Event::Finished { .. }) {
                break;
            }
        }
    }
    eventually("the queue empties", || engine.load().waiting == 0);
    submit(&engine, request("w4", 1, 0), 64).expect("accepted once there is room");
}

#[test]
fn negative_priorities_are_refused() {
    let engine = start(4, 8, |e| e);
    let err = submit(&engine, request("vip", 4, -1), 64).expect_err("more urgent than interactive");
    assert!(matches!(&err, SubmitError::Invalid(m) if m.contains("priority -1")), "{err}");
    submit(&engine, request("batch", 1, 5), 64).expect("batch-class priorities are fine");
}

#[test]
fn a_reader_that_stops_reading_is_cancelled_and_its_kv_freed() {
    let engine = start(4, 8, |e| e);
    // Room for 4 events, never read: the fifth token finds the channel full.
    let _unread = submit(&engine, request("stalled", 500, 0), 4).expect("queued");
    eventually("the stalled request leaves the engine", || {
        let load = engine.load();
        load.running == 0 && load.waiting == 0 && load.steps > 0
    });
    assert_eq!(engine.load().kv_blocks_used, 0, "its KV blocks are free");
    assert!(engine.load().steps < 50, "cancelled long before its 500 tokens: {} steps", engine.load().steps);
}

/// Panics in the middle of a step once `after` layers have been handed over.
struct PanickingExperts {
    after: std::sync::atomic::AtomicUsize,
    inner: ExpertTransport,
}

impl ExpertBackend for PanickingExperts {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + 'a>> {
        if self.after.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            panic!("injected fault in the expert backend");
        }
        self.inner.submit(batch)
    }
}

#[test]
fn an_engine_that_panics_reports_not_serving_refuses_work_and_stops_the_server() {
    let engine = start(4, 8, |inner| PanickingExperts { after: 6.into(), inner });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let coordinator = Coordinator::new(engine.clone(), Err("no grammars in this test".into()));
        let serving = tokio::spawn(server::serve(coordinator, listener, std::future::pending()));
        let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
        assert!(client.health(HealthRequest {}).await.expect("health").into_inner().serving);

        // A request that reaches the faulty step: its stream ends, without tokens it never got.
        let generate = |id: &str| GenerateRequest {
            request_id: id.into(),
            prompt_tokens: prompt(8, 1),
            sampling: Some(epserve_proto::v1::SamplingParams {
                temperature: 0.0,
                max_tokens: 16,
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut stream = client.generate(generate("doomed")).await.expect("accepted").into_inner();
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match stream.message().await {
                    Ok(Some(e)) if e.finish_reason != 0 => break Some(e),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break None,
                }
            }
        })
        .await
        .expect("the stream ends");
        assert!(ended.is_none(), "no normal finish after the engine died: {ended:?}");

        // The server noticed: it stopped (so the process exits and its supervisor restarts it).
        let served = tokio::time::timeout(Duration::from_secs(30), serving).await.expect("the server stops");
        assert!(served.expect("task").is_ok(), "a graceful stop; the caller reads why from the engine");
        let why = engine.died().expect("the engine reports its death");
        assert!(why.contains("injected fault"), "{why}");
    });
    // Before it stopped, and for anything still holding the engine: no work is taken.
    let err = submit(&engine, request("late", 4, 0), 64).expect_err("a dead engine takes nothing");
    assert!(matches!(err, SubmitError::Died(_)), "{err}");
}

#[test]
fn a_dead_engine_is_not_serving_and_has_no_load_to_report() {
    let engine = start(4, 8, |inner| PanickingExperts { after: 0.into(), inner });
    let mut rx = submit(&engine, request("first", 4, 0), 64).expect("queued");
    assert!(rx.blocking_recv().is_none(), "its stream ends when the engine dies");
    eventually("the engine reports its death", || engine.died().is_some());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        // Serving a dead engine: it answers until it notices, then stops; what it answers in
        // between is NOT_SERVING and no load (a router must not see an idle coordinator).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let coordinator = Coordinator::new(engine.clone(), Err("no grammars in this test".into()));
        let health = coordinator.clone();
        use epserve_proto::v1::coordinator_service_server::CoordinatorService;
        let serving = health.health(tonic::Request::new(HealthRequest {})).await.expect("health").into_inner();
        assert!(!serving.serving, "NOT_SERVING once the engine died");
        let load = health.load(tonic::Request::new(LoadRequest {})).await.expect_err("no load from a dead engine");
        assert_eq!(load.code(), tonic::Code::Unavailable, "{load:?}");
        let stopped =
            tokio::time::timeout(Duration::from_secs(10), server::serve(coordinator, listener, std::future::pending()))
                .await;
        assert!(stopped.is_ok(), "serve returns at once for a dead engine");
    });
}
