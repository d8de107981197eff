//! The grpc transport routes by the placement map to per-layer replicas and splits a replicated
//! expert's rows over its hosts (`epserve_eplb::split_rows`), with real expert workers in process:
//! the combined rows equal one in-process shard's (to 1e-5 with the f32 wire: a matrix product over
//! fewer rows may round differently in the last bit); a replica loaded for one layer only receives
//! that layer's rows; a host the map does not name receives nothing while a named one lives; a
//! changed map is followed from the next batch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use epserve_control::{Instance, Kind, LayerPlacement, PlacementMap};
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts};
use epserve_expert_worker::ExpertWorker;
use epserve_model::{Checkpoint, ExpertBackend, ExpertBatch, ExpertGroup, ExpertShard, ModelConfig, WeightStorage};
use tokio::sync::watch;

fn fixture() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

fn config() -> ModelConfig {
    ModelConfig::from_file(&fixture().join("config.json")).expect("config")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt")
}

/// A worker hosting every expert in every layer.
fn full_worker() -> Arc<ExpertWorker> {
    let cfg = config();
    let ckpt = Checkpoint::open(&fixture()).expect("checkpoint");
    let all: Vec<u32> = (0..16).collect();
    let shard = ExpertShard::load(&cfg, &ckpt, &all, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
        .expect("shard");
    Arc::new(ExpertWorker::new(shard, cfg.text.clone(), "tiny-llama4".into(), DType::F32))
}

/// A worker hosting only the `(layer, expert)` pairs given.
fn replica_worker(pairs: &[(usize, u32)]) -> Arc<ExpertWorker> {
    let cfg = config();
    let ckpt = Checkpoint::open(&fixture()).expect("checkpoint");
    let shard = ExpertShard::load_pairs(&cfg, &ckpt, pairs, DType::F32, WeightStorage::AsStored, &Device::Cpu)
        .expect("replica shard");
    Arc::new(ExpertWorker::new(shard, cfg.text.clone(), "tiny-llama4".into(), DType::F32))
}

fn serve(runtime: &tokio::runtime::Runtime, worker: Arc<ExpertWorker>) -> String {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    runtime.spawn(epserve_expert_worker::serve(worker, listener, std::future::pending()));
    addr
}

/// Every expert of every MoE layer on `a`; `(layer, expert)` pairs of `extra` also on `b`.
fn map(a: &str, b: &str, extra: &[(u32, u32)], version: u64) -> PlacementMap {
    let layers = (0..4u32)
        .map(|layer| LayerPlacement {
            layer,
            hosts: (0..16u32)
                .map(|e| {
                    let mut hosts = vec![a.to_owned()];
                    if extra.contains(&(layer, e)) {
                        hosts.push(b.to_owned());
                    }
                    hosts
                })
                .collect(),
        })
        .collect();
    PlacementMap { version, layers }
}

/// `rows` rows of expert `expert` at `layer`, deterministic values.
fn batch(layer: usize, expert: u32, rows: u32) -> ExpertBatch {
    let values: Vec<f32> = (0..rows as usize * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
    let rows_t = Tensor::from_vec(values, (rows as usize, 64), &Device::Cpu).expect("rows");
    ExpertBatch { layer, groups: vec![ExpertGroup { expert, rows }], rows: rows_t }
}

/// Largest absolute difference.
fn diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn compute(experts: &dyn ExpertBackend, b: ExpertBatch) -> Vec<f32> {
    let out = experts.submit(b).expect("submit").wait().expect("wait");
    out.flatten_all().expect("flat").to_vec1::<f32>().expect("values")
}

#[test]
fn replicated_rows_are_split_over_the_placed_hosts_and_combine_exactly() {
    let rt = runtime();
    let (a, b) = (full_worker(), replica_worker(&[(2, 3)]));
    let (addr_a, addr_b) = (serve(&rt, a.clone()), serve(&rt, b.clone()));
    let records = vec![
        Instance { incarnation: 1, experts: (0..16).collect(), ..Instance::new(Kind::Worker, "a", addr_a) },
        Instance {
            incarnation: 1,
            replicas: BTreeMap::from([(2, vec![3])]),
            ..Instance::new(Kind::Worker, "b", addr_b)
        },
    ];
    let (_members, members_rx) = watch::channel(records);
    let (placement, placement_rx) = watch::channel(Some(map("a", "b", &[], 1)));
    let cfg = GrpcConfig { wire: epserve_proto::wire::WireDtype::F32, ..GrpcConfig::new(Vec::new()) };
    let grpc = rt
        .block_on(GrpcExperts::follow(
            &cfg,
            &config().text,
            DType::F32,
            members_rx,
            placement_rx,
            Duration::from_secs(20),
        ))
        .expect("transport");
    let grpc = ExpertTransport::Grpc(grpc);
    let local = {
        let ckpt = Checkpoint::open(&fixture()).expect("checkpoint");
        let all: Vec<u32> = (0..16).collect();
        ExpertTransport::Local(
            ExpertShard::load(&config(), &ckpt, &all, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
                .expect("local shard"),
        )
    };
    let rows_of = |w: &ExpertWorker| w.stats().rows_served.load(Ordering::Relaxed);

    // The map does not name `b`: it gets nothing, though it hosts the pair.
    assert_eq!(compute(&grpc, batch(2, 3, 11)), compute(&local, batch(2, 3, 11)));
    assert_eq!((rows_of(&a), rows_of(&b)), (11, 0));

    // Named as the second host of (2, 3): 11 rows split 5 / 6, the combine is exact.
    placement.send_replace(Some(map("a", "b", &[(2, 3)], 2)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = (rows_of(&a), rows_of(&b));
        let (got, want) = (compute(&grpc, batch(2, 3, 11)), compute(&local, batch(2, 3, 11)));
        assert!(diff(&got, &want) <= 1e-5, "split rows must combine to the unsplit result: {}", diff(&got, &want));
        let after = (rows_of(&a), rows_of(&b));
        if after.1 > before.1 {
            assert_eq!((after.0 - before.0, after.1 - before.1), (5, 6), "split_rows(11, 2) = [5, 6]");
            break;
        }
        assert!(Instant::now() < deadline, "the new map was not followed within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // One row: all of it to the second host (⌊1·1/2⌋ − 0 = 0 for the first).
    let before = (rows_of(&a), rows_of(&b));
    assert!(diff(&compute(&grpc, batch(2, 3, 1)), &compute(&local, batch(2, 3, 1))) <= 1e-5);
    assert_eq!((rows_of(&a) - before.0, rows_of(&b) - before.1), (0, 1));
    // The replica is for layer 2 only: layer 1's rows of expert 3 stay on `a`.
    let before = rows_of(&b);
    assert_eq!(compute(&grpc, batch(1, 3, 8)), compute(&local, batch(1, 3, 8)));
    assert_eq!(rows_of(&b), before, "a single-layer replica gets no other layer's rows");
}
