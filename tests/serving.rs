//! The coordinator as a process: 16 concurrent streamed requests through `CoordinatorService`
//! give each request the tokens it gets alone, with experts in process and through 4 workers.

mod support;

use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use epserve_proto::v1::{FinishReason, GenerateRequest, LoadRequest, SamplingParams};
use support::{Process, tiny_fixture, workers};

fn request(id: usize, len: usize) -> GenerateRequest {
    let mut prompt = vec![480u32];
    prompt.extend((1..len).map(|i| ((i * 37 + id * 101) % 470) as u32));
    GenerateRequest {
        request_id: format!("req-{id}"),
        prompt_tokens: prompt,
        sampling: Some(SamplingParams { temperature: 0.0, max_tokens: 10, ignore_eos: true, ..Default::default() }),
        priority: 0,
    }
}

async fn generate(addr: &str, req: GenerateRequest) -> Vec<u32> {
    let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = stream.message().await.expect("stream") {
        tokens.extend(event.tokens.iter().map(|t| t.id));
        if event.finish_reason != 0 {
            assert_eq!(event.finish_reason, FinishReason::Length as i32, "{}", event.error);
            let usage = event.usage.expect("usage");
            assert_eq!(usage.completion_tokens as usize, tokens.len());
            return tokens;
        }
    }
    panic!("the stream ended without a finish reason");
}

fn concurrent_equals_alone(coordinator: &Process) -> Vec<Vec<u32>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let addr = coordinator.addr.clone();
        let mut alone = Vec::new();
        for i in 0..16 {
            alone.push(generate(&addr, request(i, 1 + 3 * i)).await);
        }
        let handles: Vec<_> = (0..16)
            .map(|i| {
                tokio::spawn({
                    let addr = addr.clone();
                    async move { generate(&addr, request(i, 1 + 3 * i)).await }
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.expect("task"), alone[i], "request {i}");
        }
        let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
        let load = client.load(LoadRequest {}).await.expect("load").into_inner();
        assert_eq!((load.running, load.waiting, load.kv_blocks_used), (0, 0, 0), "{load:?}");
        assert!(load.kv_blocks_total > 0);
        alone
    })
}

#[test]
fn sixteen_concurrent_streams_match_alone_local_and_grpc() {
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let local = support::coordinator(model, &["--kv-block-size", "4"]);
    let local_tokens = concurrent_equals_alone(&local);

    let workers =
        workers(&tiny_fixture(), &[&["--shard", "0/4"], &["--shard", "1/4"], &["--shard", "2/4"], &["--shard", "3/4"]]);
    let addrs = workers.iter().map(|w| w.addr.as_str()).collect::<Vec<_>>().join(",");
    let remote = support::coordinator(model, &["--kv-block-size", "4", "--workers", &addrs, "--wire-dtype", "f32"]);
    let remote_tokens = concurrent_equals_alone(&remote);
    assert_eq!(local_tokens, remote_tokens, "experts in process and through workers agree");
}

#[test]
fn invalid_requests_get_invalid_argument() {
    let model = tiny_fixture();
    let coordinator = support::coordinator(model.to_str().expect("utf-8"), &[]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let mut client =
            CoordinatorServiceClient::connect(format!("http://{}", coordinator.addr)).await.expect("connect");
        let mut bad = request(0, 4);
        bad.sampling.as_mut().expect("sampling").top_p = Some(1.5);
        let err = client.generate(bad).await.expect_err("top_p out of range");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("top_p"), "{}", err.message());
        let mut bad = request(1, 4);
        bad.prompt_tokens.push(9999);
        let err = client.generate(bad).await.expect_err("token out of range");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("9999"), "{}", err.message());
    });
}
