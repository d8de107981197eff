//! The coordinator's lifecycle in one process, with the in-memory registry: it registers not ready,
//! wins the placement election (its controller then keeps the placement map), waits for the experts
//! to have a live host, then becomes ready, serves, and leaves on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use epserve_control::{ControlConnection, ControlPlane, Instance, Kind, MemoryRegistry};
use epserve_coordinator::kv_pool::KvCapacity;
use epserve_coordinator::run::PLACEMENT_ELECTION;
use epserve_coordinator::{CoordinatorConfig, EngineSizing, LoadConfig};
use epserve_expert_worker::{ExpertSelection, WorkerConfig};
use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{GenerateRequest, SamplingParams};
use tokio::sync::oneshot;

/// The tiny Llama-4 checkpoint (4 MoE layers of 16 experts).
fn tiny_checkpoint() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

/// The processes' default: a loaded test machine must not lose leases between two renewals.
const LEASE_TTL: Duration = Duration::from_secs(10);

const WAIT: Duration = Duration::from_secs(60);

/// Polls `probe` every 20 ms until it gives a value, for [`WAIT`] at most.
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn coordinators(plane: &ControlPlane) -> Vec<Instance> {
    plane.list(Kind::Coordinator).await.expect("list coordinators")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_not_ready_leads_and_is_ready_once_every_expert_has_a_live_host() {
    let plane = ControlPlane::new(Arc::new(MemoryRegistry::new()));
    let join = || Some(ControlConnection::new(plane.clone(), LEASE_TTL, None).expect("control runtime"));
    let config = CoordinatorConfig {
        load: LoadConfig { startup_wait: WAIT, ..LoadConfig::local(tiny_checkpoint(), DType::F32) },
        listen: "127.0.0.1:0".into(),
        sizing: EngineSizing::new(KvCapacity::Tokens(1024)),
        overlap: false,
        control: join(),
    };
    let starting = tokio::spawn(epserve_coordinator::start(config));

    // Registered before the workers exist, not ready, and leading the placement election.
    let record = eventually("the coordinator registers", async || coordinators(&plane).await.pop()).await;
    assert!(!record.ready, "a coordinator without experts must not be sent requests: {record:?}");
    let leader = eventually("the coordinator leads the placement election", async || {
        plane.leader(PLACEMENT_ELECTION).await.expect("leader")
    })
    .await;
    assert_eq!(leader, record.id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!starting.is_finished(), "start-up must wait for the experts' hosts");

    // A worker hosting every expert: the coordinator reaches it, and its controller records it in
    // the placement map.
    let worker = epserve_expert_worker::start(WorkerConfig {
        model: tiny_checkpoint(),
        listen: "127.0.0.1:0".into(),
        selection: ExpertSelection::parse_list("0-15").expect("list"),
        dtype: DType::F32,
        weights: Default::default(),
        control: join(),
        limits: Default::default(),
        shm_dir: None,
    })
    .await
    .expect("worker starts");
    let worker = tokio::spawn(worker.serve(std::future::pending()));

    let coordinator = tokio::time::timeout(WAIT, starting).await.expect("ready in time").expect("task").expect("start");
    let workers = plane.list(Kind::Worker).await.expect("workers");
    assert_eq!(workers.len(), 1);
    let placed = eventually("the leader records the worker in the placement", async || {
        plane.placement().await.expect("placement").filter(|map| map.experts_of(&workers[0].id).len() == 16)
    })
    .await;
    assert_eq!(placed.layers.len(), 4, "every MoE layer is placed");
    eventually("the coordinator's record says ready", async || {
        coordinators(&plane).await.pop().filter(|c| c.ready).map(|_| ())
    })
    .await;

    let addr = coordinator.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(coordinator.serve(async move {
        let _ = stopped.await;
    }));
    let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let request = GenerateRequest {
        request_id: "lifecycle".into(),
        prompt_tokens: vec![480, 470, 468, 474],
        sampling: Some(SamplingParams { temperature: 0.0, max_tokens: 4, ignore_eos: true, ..Default::default() }),
        priority: 0,
        images: Vec::new(),
        constraint: None,
    };
    let mut events = client.generate(request).await.expect("generate").into_inner();
    let mut tokens = 0;
    while let Some(event) = events.message().await.expect("event") {
        tokens += event.tokens.len();
        assert!(event.error.is_empty(), "{}", event.error);
    }
    assert_eq!(tokens, 4, "four tokens through the worker's experts");

    // Shutdown leaves the registry at once (the lease is revoked, not left to expire).
    let _ = stop.send(());
    tokio::time::timeout(WAIT, serving).await.expect("stops in time").expect("task").expect("serve");
    assert!(coordinators(&plane).await.is_empty(), "the coordinator left");
    // The worker is not stopped gracefully: a graceful stop waits for the coordinator's exchange
    // streams, which its transport closes only when the coordinator's process exits.
    worker.abort();
}

/// Without a control plane and without workers, the experts run in process and start-up does not
/// wait for anything; the KV cache caps the longest sequence; a taken port fails start-up, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_coordinator_with_experts_in_process_caps_the_length_by_the_kv_cache() {
    let config = CoordinatorConfig {
        load: LoadConfig::local(tiny_checkpoint(), DType::F32),
        listen: "127.0.0.1:0".into(),
        sizing: EngineSizing { max_model_len: Some(1 << 20), ..EngineSizing::new(KvCapacity::Tokens(64)) },
        overlap: true,
        control: None,
    };
    let coordinator = epserve_coordinator::start(config).await.expect("start");
    assert_eq!(coordinator.engine().max_model_len(), 64, "64 tokens of KV cache");
    let taken = coordinator.local_addr().to_string();
    let clash = CoordinatorConfig {
        load: LoadConfig::local(tiny_checkpoint(), DType::F32),
        listen: taken.clone(),
        sizing: EngineSizing::new(KvCapacity::Tokens(64)),
        overlap: false,
        control: None,
    };
    let err = epserve_coordinator::start(clash).await.expect_err("the port is taken");
    assert!(err.to_string().contains(&taken), "{err}");
}
