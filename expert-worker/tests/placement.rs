//! Placement changes on a serving worker over real gRPC (`ExpertPlacementService.Place`): replicas
//! of single `(layer, expert)` pairs are loaded from the checkpoint and released again, `Status`
//! follows, and bad requests get a reason.

mod support;

use epserve_expert_worker::ExpertSelection;
use epserve_proto::v1::expert_placement_service_client::ExpertPlacementServiceClient;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{ExpertPair, PlaceRequest, StatusRequest};
use tonic::Code;

fn pair(layer: u32, expert: u32) -> ExpertPair {
    ExpertPair { layer, expert }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn place_loads_and_releases_single_replicas_while_serving() {
    let worker = support::serve(support::config(ExpertSelection::parse_list("0-3").expect("list"), None)).await;
    let addr = worker.addr;
    let mut place = ExpertPlacementServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let mut status = ExpertServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let experts_of = |layers: &[epserve_proto::v1::LayerExperts], layer: u32| {
        layers.iter().find(|l| l.layer == layer).map(|l| l.experts.clone()).unwrap_or_default()
    };

    // Replicas of expert 7 in layer 1 and expert 9 in layer 2 only (1 is already hosted: no-op).
    let before = status.status(StatusRequest {}).await.expect("status").into_inner();
    let placed = place
        .place(PlaceRequest { load: vec![pair(1, 7), pair(2, 9), pair(1, 1)], release: vec![] })
        .await
        .expect("place")
        .into_inner();
    assert_eq!((placed.loaded, placed.released), (2, 0));
    assert!(placed.resident_bytes > before.resident_bytes, "{} <= {}", placed.resident_bytes, before.resident_bytes);
    let now = status.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(experts_of(&now.layers, 1), vec![0, 1, 2, 3, 7]);
    assert_eq!(experts_of(&now.layers, 2), vec![0, 1, 2, 3, 9]);
    assert_eq!(experts_of(&now.layers, 0), vec![0, 1, 2, 3]);

    // Loading again is a no-op; releasing drops exactly the named pairs (and unknown ones are no-ops).
    let again = place
        .place(PlaceRequest { load: vec![pair(1, 7)], release: vec![pair(2, 9), pair(3, 12)] })
        .await
        .expect("place")
        .into_inner();
    assert_eq!((again.loaded, again.released), (0, 1));
    assert_eq!(experts_of(&again.layers, 2), vec![0, 1, 2, 3]);
    assert_eq!(experts_of(&again.layers, 1), vec![0, 1, 2, 3, 7]);

    // A base expert released in one layer only: the others keep it.
    let dropped = place.place(PlaceRequest { load: vec![], release: vec![pair(0, 3)] }).await.expect("place");
    let dropped = dropped.into_inner();
    assert_eq!(dropped.released, 1);
    assert_eq!(experts_of(&dropped.layers, 0), vec![0, 1, 2]);
    assert_eq!(experts_of(&dropped.layers, 1), vec![0, 1, 2, 3, 7]);

    // Bad input: a pair that does not exist is refused with a reason, and nothing changes.
    for bad in [pair(0, 16), pair(99, 0)] {
        let err = place.place(PlaceRequest { load: vec![bad], release: vec![] }).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("has no routed expert"), "{}", err.message());
    }
    let after = status.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(after.layers, dropped.layers);
    assert_eq!(after.resident_bytes, dropped.resident_bytes);

    worker.stop().await;
}
