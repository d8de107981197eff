//! The expert worker's lifecycle in one process, with the in-memory registry: it registers with the
//! experts it was started with, loads and announces the experts the placement assigns to it, serves
//! them, and leaves on shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use epserve_control::{ControlConnection, ControlPlane, Instance, Kind, LayerPlacement, MemoryRegistry, PlacementMap};
use epserve_expert_worker::ExpertSelection;
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;

/// The processes' default: a loaded test machine must not lose leases between two renewals.
const LEASE_TTL: Duration = Duration::from_secs(10);

const WAIT: Duration = Duration::from_secs(30);

/// The registered workers, once `done` holds for them (polled every 20 ms, for [`WAIT`] at most).
async fn workers_once(plane: &ControlPlane, what: &str, done: impl Fn(&[Instance]) -> bool) -> Vec<Instance> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let workers = plane.list(Kind::Worker).await.expect("list workers");
        if done(&workers) {
            return workers;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {WAIT:?}: {what}; workers: {workers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loads_and_announces_the_experts_the_placement_assigns_it() {
    let plane = ControlPlane::new(Arc::new(MemoryRegistry::new()));
    let control = ControlConnection::new(plane.clone(), LEASE_TTL, Some("w0".into())).expect("runtime");
    let worker =
        support::serve(support::config(ExpertSelection::parse_list("0-3").expect("list"), Some(control))).await;
    let addr = worker.addr;

    let registered = workers_once(&plane, "the worker registers", |w| w.len() == 1).await;
    let record = &registered[0];
    assert_eq!((record.id.as_str(), record.addr.clone()), ("w0", addr.to_string()), "named by the connection");
    assert_eq!(record.experts, vec![0, 1, 2, 3]);

    // The placement assigns experts 2 and 9 of every MoE layer to it (2 is already loaded).
    let hosts = (0..16u32).map(|e| if e == 2 || e == 9 { vec!["w0".to_owned()] } else { Vec::new() }).collect();
    let layers = (0..4).map(|layer| LayerPlacement { layer, hosts: Vec::clone(&hosts) }).collect();
    assert!(plane.swap_placement(&PlacementMap { version: 0, layers }, None).await.expect("write placement"));
    workers_once(&plane, "the worker announces expert 9", |w| w.first().is_some_and(|r| r.experts == [0, 1, 2, 3, 9]))
        .await;

    // And serves it: what the record says is what `Status` reports for every MoE layer.
    let mut client = ExpertServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let status = client.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.layers.len(), 4);
    for layer in &status.layers {
        assert_eq!(layer.experts, vec![0, 1, 2, 3, 9], "layer {}", layer.layer);
    }

    worker.stop().await;
    workers_once(&plane, "the worker leaves", <[Instance]>::is_empty).await;
}

/// Without a control plane the worker serves the experts it was given, and a selection beyond the
/// model's experts fails start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_worker_checks_its_selection_against_the_model() {
    let config = |selection| support::config(selection, None);
    let worker =
        epserve_expert_worker::start(config(ExpertSelection::Shard { index: 1, count: 4 })).await.expect("start");
    assert_eq!(worker.worker().experts(), vec![4, 5, 6, 7]);
    let err = epserve_expert_worker::start(config(ExpertSelection::parse_list("15-16").expect("list")))
        .await
        .expect_err("expert 16 does not exist");
    assert!(err.to_string().contains("16"), "{err}");
}
