//! What automatic rebalancing counts a moved replica as (`LoadBalancer::replica_bytes`): one
//! expert's bytes as the workers hold it, read from real expert workers in process: the
//! checkpoint's bf16 as stored, the int8 matrices and scales of `--quantize int8`, and a
//! pre-quantized (W4A16) checkpoint's int4, each equal to what the worker's own shard reports,
//! not the bf16 estimate from the config.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use epserve_control::{Instance, Kind};
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts};
use epserve_expert_worker::ExpertWorker;
use epserve_model::{
    Activations, Checkpoint, ExpertShard, LoadPolicy, ModelConfig, QuantScheme, QuantScope, Quantize, WeightStorage,
};
use epserve_testkit::fixtures;
use tokio::sync::watch;

/// Serves `experts` of `dir`'s checkpoint, loaded under `policy`, on a loopback port; the address
/// and the shard's own figure for one expert.
async fn serve(dir: &Path, experts: &[u32], policy: LoadPolicy) -> (String, u64) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    let shard =
        ExpertShard::load(&cfg, &ckpt, experts, DType::F32, policy, &Device::Cpu, &mut || {}).expect("shard loads");
    let held = shard.expert_bytes().expect("hosts experts");
    let worker = Arc::new(ExpertWorker::new(shard, cfg.text.clone(), "tiny".into(), DType::F32));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(epserve_expert_worker::serve(worker, listener, std::future::pending()));
    (addr, held)
}

/// Two workers (experts 0–7 and 8–15) of `dir` under `policy`, linked by a statically wired grpc
/// transport; the replica bytes its load balancer plans with, and the workers' own figure.
async fn planned_replica_bytes(dir: &Path, policy: LoadPolicy) -> (u64, u64) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let low: Vec<u32> = (0..8).collect();
    let high: Vec<u32> = (8..16).collect();
    let (addr_a, held_a) = serve(dir, &low, policy).await;
    let (addr_b, held_b) = serve(dir, &high, policy).await;
    assert_eq!(held_a, held_b, "every expert of one checkpoint is held alike");
    let records = vec![
        Instance { incarnation: 1, experts: low, ..Instance::new(Kind::Worker, "a", addr_a) },
        Instance { incarnation: 1, experts: high, ..Instance::new(Kind::Worker, "b", addr_b) },
    ];
    let (_members, members_rx) = watch::channel(records);
    let (_placement, placement_rx) = watch::channel(None);
    let grpc = GrpcExperts::follow(
        &GrpcConfig::new(Vec::new()),
        &cfg.text,
        DType::F32,
        members_rx,
        placement_rx,
        Duration::from_secs(20),
    )
    .await
    .expect("transport");
    let balancer = ExpertTransport::Grpc(grpc).load_balancer(None).expect("a balancer over workers");
    (balancer.replica_bytes().await.expect("workers report their expert bytes"), held_a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_costs_what_the_workers_hold() {
    let tiny = fixtures::dir(fixtures::TINY_LLAMA4);
    let text = ModelConfig::from_file(&tiny.join("config.json")).expect("config").text;
    let bf16 = 3 * text.hidden_size as u64 * text.intermediate_size as u64 * 2;

    // As stored: the fixture is bf16, and a CPU worker computing in f32 keeps it so.
    let (planned, held) = planned_replica_bytes(&tiny, WeightStorage::AsStored.into()).await;
    assert_eq!((planned, held), (bf16, bf16));

    // Converted to f32 at load: twice as many bytes to hold and to move.
    let (planned, held) = planned_replica_bytes(&tiny, WeightStorage::Compute.into()).await;
    assert_eq!((planned, held), (2 * bf16, 2 * bf16));

    // `--quantize int8`: 32 int8 weights and an f16 scale per group, 8.5 bits a weight.
    let int8 = LoadPolicy {
        storage: WeightStorage::AsStored,
        quantize: Some(Quantize { scheme: QuantScheme::Int8, scope: QuantScope::ROUTED }),
        activations: Activations::F32,
    };
    let (planned, held) = planned_replica_bytes(&tiny, int8).await;
    assert_eq!(planned, held);
    assert_eq!(planned, bf16 / 2 * 17 / 16, "int8: {planned} bytes, bf16: {bf16}");

    // A pre-quantized checkpoint (compressed-tensors W4A16, int4 in groups of 32): kept as stored.
    let w4 = fixtures::dir(fixtures::TINY_LLAMA4_W4A16);
    let (planned, held) = planned_replica_bytes(&w4, WeightStorage::AsStored.into()).await;
    assert_eq!(planned, held);
    assert!(planned < bf16 / 3, "int4: {planned} bytes, bf16: {bf16}");
}
