//! Expert parallelism end to end: real `epserve worker` processes on loopback, the coordinator's gRPC
//! transport, and the same logits as the in-process run.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{DType, Device};
use epserve_coordinator::{ExpertTransport, GrpcConfig, GrpcExperts};
use epserve_model::{Checkpoint, ExpertShard, ModelConfig, WeightStorage};
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{ExchangeRequest, ExpertRows, HealthRequest, StatusRequest};
use epserve_proto::wire::WireDtype;
use serde::Deserialize;
use support::coordinator::{Coordinator, max_abs_diff};
use support::{tiny_fixture, workers};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
    greedy_tokens: Vec<u32>,
}

fn golden() -> Vec<Case> {
    let text = std::fs::read_to_string(tiny_fixture().join("golden/text.json")).expect("golden");
    serde_json::from_str::<Golden>(&text).expect("json").cases
}

/// For each placement: f32 wire matches the in-process logits to 1e-5 at every position of every
/// golden case; bf16 wire stays within bf16 rounding and gives the golden greedy tokens.
fn check_parity(selections: &[&[&str]]) {
    let coordinator = Coordinator::new();
    let workers = workers(&tiny_fixture(), selections);
    let f32_wire = coordinator.grpc(&workers, WireDtype::F32, Duration::from_secs(10)).expect("connect");
    let bf16_wire = coordinator.grpc(&workers, WireDtype::Bf16, Duration::from_secs(10)).expect("connect");
    let f32_wire = ExpertTransport::Grpc(f32_wire);
    let bf16_wire = ExpertTransport::Grpc(bf16_wire);
    for case in golden() {
        let local = coordinator.logits(&coordinator.local, &case.input_ids).expect("local");
        let remote = coordinator.logits(&f32_wire, &case.input_ids).expect("grpc f32");
        let diff = max_abs_diff(&local, &remote);
        assert!(diff <= 1e-5, "{selections:?}, T={}: f32 wire differs by {diff}", case.input_ids.len());
        let remote = coordinator.logits(&bf16_wire, &case.input_ids).expect("grpc bf16");
        let diff = max_abs_diff(&local, &remote);
        assert!(diff < 5e-2, "{selections:?}, T={}: bf16 wire differs by {diff}", case.input_ids.len());
        assert_eq!(coordinator.greedy(&bf16_wire, &case.input_ids, 16), case.greedy_tokens, "{selections:?}");
    }
}

#[test]
fn four_workers_match_in_process() {
    check_parity(&[&["--shard", "0/4"], &["--shard", "1/4"], &["--shard", "2/4"], &["--shard", "3/4"]]);
}

#[test]
fn two_workers_match_in_process() {
    check_parity(&[&["--shard", "0/2"], &["--shard", "1/2"]]);
}

#[test]
fn non_contiguous_experts_match_in_process() {
    check_parity(&[&["--experts", "0-3,9"], &["--experts", "4-8,15"], &["--experts", "10-14"]]);
}

/// The command line path: `epserve logits --workers` prints what the in-process run prints.
#[test]
fn logits_command_through_workers() {
    let workers = workers(&tiny_fixture(), &[&["--shard", "0/2"], &["--shard", "1/2"]]);
    let addrs = workers.iter().map(|w| w.addr.as_str()).collect::<Vec<_>>().join(",");
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    // Golden case 1: its prompt, and transformers' greedy continuation of it below.
    let case = &golden()[1];
    let tokens = case.input_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let tokens = tokens.as_str();
    let local = support::run_json(&["logits", "--model", model, "--tokens", tokens]);
    let remote = support::run_json(&[
        "logits",
        "--model",
        model,
        "--tokens",
        tokens,
        "--workers",
        &addrs,
        "--wire-dtype",
        "f32",
    ]);
    let rows = |v: &serde_json::Value| -> Vec<Vec<f32>> { serde_json::from_value(v["logits"].clone()).expect("rows") };
    assert_eq!(rows(&local).len(), case.input_ids.len());
    assert!(max_abs_diff(&rows(&local), &rows(&remote)) <= 1e-5);
    let generated = support::run_json(&[
        "generate",
        "--model",
        model,
        "--tokens",
        tokens,
        "--max-tokens",
        "16",
        "--json",
        "--workers",
        &addrs,
    ]);
    let greedy: Vec<u64> = case.greedy_tokens.iter().map(|&t| u64::from(t)).collect();
    assert_eq!(generated["tokens"], serde_json::json!(support::until_eos(&tiny_fixture(), &greedy)));
}

#[test]
fn coordinator_refuses_incomplete_placement() {
    let coordinator = Coordinator::new();
    let workers = workers(&tiny_fixture(), &[&["--shard", "0/4"], &["--shard", "1/4"], &["--experts", "8-10,12"]]);
    let err = coordinator.grpc(&workers, WireDtype::Bf16, Duration::from_secs(5)).expect_err("gaps");
    assert!(err.contains("layer 0: experts 11,13-15"), "{err}");
}

fn request(id: u64, layer: u32, groups: &[(u32, u32)], hidden: u32, payload_len: usize) -> ExchangeRequest {
    ExchangeRequest {
        id,
        step: 1,
        layer,
        micro_batch: 0,
        groups: groups.iter().map(|&(expert, rows)| ExpertRows { expert, rows }).collect(),
        dtype: WireDtype::F32.to_proto() as i32,
        hidden,
        payload: Bytes::from(vec![0u8; payload_len]),
    }
}

/// Malformed exchanges are answered with INVALID_ARGUMENT and a reason, on the same stream, and the
/// worker keeps serving the good ones.
#[test]
fn malformed_exchange_is_rejected_and_the_worker_keeps_serving() {
    let workers = workers(&tiny_fixture(), &[&["--shard", "0/4"]]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{}", workers[0].addr)).await.expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut answers =
            client.exchange(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
        let cases = [
            (request(1, 0, &[(1, 2)], 64, 100), "payload is 100 bytes"),
            (request(2, 0, &[(9, 1)], 64, 256), "expert 9 of layer 0 is not hosted"),
            (request(3, 7, &[(1, 1)], 64, 256), "layer 7 is out of range"),
            (request(4, 0, &[(1, 1)], 32, 128), "hidden size is 64"),
        ];
        for (req, reason) in cases {
            let id = req.id;
            tx.send(req).await.expect("send");
            let answer = answers.message().await.expect("stream alive").expect("an answer");
            assert_eq!(answer.id, id);
            // Not hosted here is the sender's stale view (another worker may host it); the rest no
            // worker of this model would accept.
            let expected = if reason.contains("not hosted") {
                tonic::Code::FailedPrecondition
            } else {
                tonic::Code::InvalidArgument
            };
            assert_eq!(answer.code, expected as i32, "{}", answer.message);
            assert!(answer.message.contains(reason), "`{}` should mention `{reason}`", answer.message);
        }
        tx.send(request(5, 0, &[(1, 2), (3, 1)], 64, 3 * 64 * 4)).await.expect("send");
        let answer = answers.message().await.expect("stream alive").expect("an answer");
        assert_eq!((answer.id, answer.code), (5, 0), "{}", answer.message);
        assert_eq!(answer.payload.len(), 3 * 64 * 4);
        assert!(client.health(HealthRequest {}).await.expect("health").into_inner().serving);
    });
}

/// A worker that dies (SIGKILL) or stops answering (SIGSTOP) fails the step with a clear error
/// naming it, within the exchange deadline, instead of hanging.
#[test]
fn dead_or_stuck_worker_fails_the_step_within_the_deadline() {
    let coordinator = Coordinator::new();
    let mut workers = workers(&tiny_fixture(), &[&["--shard", "0/2"], &["--shard", "1/2"]]);
    let deadline = Duration::from_secs(2);
    let grpc = ExpertTransport::Grpc(coordinator.grpc(&workers, WireDtype::Bf16, deadline).expect("connect"));
    let tokens = &golden()[3].input_ids; // 41 tokens route to experts on both workers
    coordinator.logits(&grpc, tokens).expect("healthy cluster");

    workers[1].signal(support::Signal::SIGSTOP);
    let started = Instant::now();
    let err = coordinator.logits(&grpc, tokens).expect_err("stuck worker").to_string();
    let elapsed = started.elapsed();
    assert!(err.contains(&workers[1].addr) && err.contains("did not answer"), "{err}");
    assert!(elapsed >= deadline && elapsed < deadline + Duration::from_secs(3), "failed after {elapsed:?}");
    workers[1].signal(support::Signal::SIGCONT);
    // The resumed worker is back once the transport has seen it answer again (on a loaded machine
    // that can take a few steps); only then does the next failure name the other worker alone.
    let resumed = Instant::now();
    while coordinator.logits(&grpc, tokens).is_err() {
        assert!(resumed.elapsed() < Duration::from_secs(30), "the resumed worker never served again");
        std::thread::sleep(Duration::from_millis(200));
    }

    workers[0].kill();
    let started = Instant::now();
    let err = coordinator.logits(&grpc, tokens).expect_err("dead worker").to_string();
    assert!(err.contains(&workers[0].addr) && err.contains("unavailable"), "{err}");
    assert!(started.elapsed() < deadline + Duration::from_secs(1), "failed after {:?}", started.elapsed());
}

/// Status reports hosted experts and resident bytes that are the worker's share of the experts:
/// kept in bf16 as the checkpoint stores them, or in f32 with `--weight-storage compute`.
#[test]
fn worker_holds_only_its_share_of_the_experts() {
    let config = ModelConfig::from_file(&tiny_fixture().join("config.json")).expect("config");
    let all_experts =
        |bytes| (config.text.expert_bytes_per_layer(bytes) * 16 * config.text.moe_layers().count()) as u64;
    let workers = workers(
        &tiny_fixture(),
        &[&["--shard", "1/4"], &["--experts", "0-3,9"], &["--shard", "2/4", "--weight-storage", "compute"]],
    );
    let expected = [(4, vec![4, 5, 6, 7], 2), (5, vec![0, 1, 2, 3, 9], 2), (4, vec![8, 9, 10, 11], 4)];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        for (worker, (share, experts, bytes)) in workers.iter().zip(expected) {
            let mut client = ExpertServiceClient::connect(format!("http://{}", worker.addr)).await.expect("connect");
            let status = client.status(StatusRequest {}).await.expect("status").into_inner();
            assert_eq!(status.layers.len(), 4);
            assert!(status.layers.iter().all(|l| l.experts == experts), "{:?}", status.layers);
            assert_eq!(status.resident_bytes, all_experts(bytes) * share / 16, "{share} of 16 experts, {bytes} B each");
        }
    });
}

/// A Scout-sized exchange — 1,000 rows of width 5,120 in bf16, 10 MB — goes through (gRPC's default
/// 4 MiB limit would refuse it) and comes back equal to the in-process computation.
#[test]
fn scout_sized_exchange_goes_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    support::run_ok(&["gen-model", "--preset", "scout-wire", "--seed", "3", "--out", out]);
    let config = ModelConfig::from_file(&dir.path().join("config.json")).expect("config");
    assert_eq!(config.text.hidden_size, 5120);
    let workers = workers(dir.path(), &[&["--shard", "0/2"], &["--shard", "1/2"]]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let cfg = GrpcConfig::new(workers.iter().map(|w| w.addr.clone()).collect());
    let grpc = runtime.block_on(GrpcExperts::connect(&cfg, &config.text, DType::F32)).expect("connect");

    let ckpt = Checkpoint::open(dir.path()).expect("checkpoint");
    let all: Vec<u32> = (0..16).collect();
    let local = ExpertShard::load(&config, &ckpt, &all, DType::F32, WeightStorage::AsStored, &Device::Cpu, &mut || {})
        .expect("experts");
    let groups: Vec<epserve_model::ExpertGroup> =
        (0..16).map(|e| epserve_model::ExpertGroup { expert: e, rows: if e < 8 { 60 } else { 65 } }).collect();
    let rows = candle_core::Tensor::randn(0f32, 1.0, (1000, 5120), &Device::Cpu).expect("rows");
    // Round the input to bf16 first so that only the answer's rounding differs.
    let rows = rows.to_dtype(DType::BF16).and_then(|t| t.to_dtype(DType::F32)).expect("bf16 rows");
    let expected = local.compute(0, &groups, &rows).expect("local").to_vec2::<f32>().expect("vec");
    let batch = epserve_model::ExpertBatch { layer: 0, groups, rows };
    let answer = grpc.submit(batch).expect("submit").wait().expect("answer").to_vec2::<f32>().expect("vec");
    assert_eq!(answer.len(), 1000);
    for (a, b) in answer.iter().flatten().zip(expected.iter().flatten()) {
        assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6, "{a} vs {b}");
    }
}

/// A client that floods a worker with large frames and never reads the answers: the worker takes in
/// only its bounds (per stream, and payload bytes over all streams), the rest waits at the sender
/// (HTTP/2 flow control), its memory stays bounded, and another client is served meanwhile.
#[test]
fn an_exchange_flood_stays_bounded_and_other_streams_are_served() {
    let limits = ["--experts", "0-15", "--max-exchanges-per-stream", "4", "--exchange-memory-mb", "64"];
    let worker = workers(&tiny_fixture(), &[&limits]).remove(0);
    let rss = || support::rss_mib(worker.pid()).expect("the worker is alive");
    let before = rss();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let connect =
            || async { ExpertServiceClient::connect(format!("http://{}", worker.addr)).await.expect("connect") };
        // 512 frames of 16384 rows × 64 × f32 = 4 MiB each: 2 GiB offered, nothing read back.
        let rows = 16384u32;
        let frame = move |id| request(id, 0, &[(1, rows)], 64, rows as usize * 64 * 4);
        let (flood_tx, flood_rx) = tokio::sync::mpsc::channel(1);
        let mut flooder = connect().await;
        let _unread = flooder.exchange(tokio_stream::wrappers::ReceiverStream::new(flood_rx)).await.expect("stream");
        let offered = tokio::spawn(async move {
            let mut sent = 0u64;
            for id in 0..512 {
                if flood_tx.send(frame(id)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        });
        tokio::time::sleep(Duration::from_secs(5)).await;

        // Meanwhile another coordinator's exchanges are answered.
        let mut other = connect().await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut answers =
            other.exchange(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
        for id in 0..4u64 {
            tx.send(request(10_000 + id, 0, &[(2, 3)], 64, 3 * 64 * 4)).await.expect("send");
            let answer = tokio::time::timeout(Duration::from_secs(20), answers.message())
                .await
                .expect("answered during the flood")
                .expect("stream alive")
                .expect("an answer");
            assert_eq!((answer.id, answer.code), (10_000 + id, 0), "{}", answer.message);
        }
        let after = rss();
        eprintln!("exchange flood: worker RSS {before:.0} MiB before, {after:.0} MiB during; 2048 MiB offered");
        assert!(after - before < 400.0, "the worker took in the flood: {before:.0} → {after:.0} MiB");
        assert!(!offered.is_finished(), "the flooder's sends are held back, not all accepted");
        offered.abort();
    });
}
