//! The gateway's lifecycle in one process, with the in-memory registry: it follows the registered
//! coordinators that are ready, serves the API through them, and leaves on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use epserve_control::{ControlConnection, ControlPlane, Instance, Kind, MemoryRegistry};
use epserve_coordinator::kv_pool::KvCapacity;
use epserve_coordinator::{CoordinatorConfig, EngineSizing, LoadConfig};
use epserve_gateway::GatewayConfig;
use epserve_gateway::run::ready_coordinators;
use tokio::sync::oneshot;

/// The tiny Llama-4 checkpoint, with its tokenizer and chat template.
fn tiny_checkpoint() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

/// The processes' default: a loaded test machine must not lose leases between two renewals.
const LEASE_TTL: Duration = Duration::from_secs(10);

const WAIT: Duration = Duration::from_secs(30);

fn connection(plane: &ControlPlane) -> ControlConnection {
    ControlConnection::new(plane.clone(), LEASE_TTL, None).expect("control runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_registered_coordinators_that_are_ready() {
    let plane = ControlPlane::new(Arc::new(MemoryRegistry::new()));
    let gateway = connection(&plane);
    let mut followed = ready_coordinators(&gateway);
    let coordinators = connection(&plane);
    let a = coordinators.register(Instance { ready: false, ..Instance::new(Kind::Coordinator, "a", "10.0.0.1:1") });
    let b = coordinators.register(Instance::new(Kind::Coordinator, "b", "10.0.0.2:1"));
    let mut expect = async |want: &[&str]| {
        let seen = tokio::time::timeout(WAIT, followed.wait_for(|addrs| addrs == want)).await;
        assert!(seen.is_ok_and(|r| r.is_ok()), "never followed exactly {want:?}");
    };
    expect(&["10.0.0.2:1"]).await;
    a.update(|i| i.ready = true);
    expect(&["10.0.0.1:1", "10.0.0.2:1"]).await;
    coordinators.leave(b).await;
    expect(&["10.0.0.1:1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_through_a_coordinator_found_in_the_registry() {
    let plane = ControlPlane::new(Arc::new(MemoryRegistry::new()));
    // A coordinator with its experts in process, registered as a coordinator process registers.
    let coordinator = epserve_coordinator::start(CoordinatorConfig {
        load: LoadConfig::local(tiny_checkpoint(), DType::F32),
        listen: "127.0.0.1:0".into(),
        sizing: EngineSizing::new(KvCapacity::Tokens(1024)),
        overlap: false,
        control: None,
    })
    .await
    .expect("coordinator starts");
    let coordinator_addr = coordinator.local_addr().to_string();
    let (stop_coordinator, coordinator_stopped) = oneshot::channel::<()>();
    let coordinator = tokio::spawn(coordinator.serve(async move {
        let _ = coordinator_stopped.await;
    }));
    let registration = connection(&plane);
    let _record = registration.register(Instance::new(Kind::Coordinator, "c", coordinator_addr));

    let gateway = epserve_gateway::start(GatewayConfig {
        model: tiny_checkpoint(),
        listen: "127.0.0.1:0".into(),
        coordinators: Vec::new(),
        api_keys: Vec::new(),
        served_model_name: None,
        max_body_bytes: 1 << 20,
        max_concurrent_requests: 8,
        health_interval: Duration::from_millis(50),
        metrics: None,
        control: Some(connection(&plane)),
        images: Default::default(),
        tls: None,
        edge: Default::default(),
    })
    .await
    .expect("gateway starts");
    let base = format!("http://{}", gateway.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + WAIT;
    while plane.list(Kind::Gateway).await.expect("gateways").len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "the gateway never found the coordinator");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let models: serde_json::Value =
        http.get(format!("{base}/v1/models")).send().await.expect("models").json().await.expect("json");
    assert_eq!(models["data"][0]["id"], "tiny-llama4", "named after the checkpoint directory: {models}");
    let body = serde_json::json!({ "model": "tiny-llama4", "prompt": "Hello", "max_tokens": 3, "ignore_eos": true });
    let response = http.post(format!("{base}/v1/completions")).json(&body).send().await.expect("completion");
    assert_eq!(response.status(), 200);
    let completion: serde_json::Value = response.json().await.expect("json");
    assert_eq!(completion["usage"]["completion_tokens"], 3, "{completion}");

    let _ = stop.send(());
    tokio::time::timeout(WAIT, serving).await.expect("stops in time").expect("task").expect("serve");
    assert!(plane.list(Kind::Gateway).await.expect("gateways").is_empty(), "the gateway left");
    let _ = stop_coordinator.send(());
    tokio::time::timeout(WAIT, coordinator).await.expect("stops in time").expect("task").expect("coordinator serves");
}
