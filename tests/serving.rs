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
        images: Vec::new(),
        constraint: None,
    }
}

fn concurrent_equals_alone(coordinator: &Process) -> Vec<Vec<u32>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let addr = coordinator.addr.clone();
        let mut alone = Vec::new();
        for i in 0..16 {
            alone.push(support::generate_to_length(&addr, request(i, 1 + 3 * i)).await);
        }
        let handles: Vec<_> = (0..16)
            .map(|i| {
                tokio::spawn({
                    let addr = addr.clone();
                    async move { support::generate_to_length(&addr, request(i, 1 + 3 * i)).await }
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.expect("task"), alone[i], "request {i}");
        }
        // A stream's last event can reach the client before the engine has freed its sequence
        // (seen once in a full-suite run: 10 still running): wait for idle, within a deadline.
        let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let load = loop {
            let load = client.load(LoadRequest {}).await.expect("load").into_inner();
            if (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0) || tokio::time::Instant::now() > deadline
            {
                break load;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
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

/// Tokens and finish reason of one request to the coordinator at `addr`, with the final EOS (which
/// the server streams and `epserve generate` leaves out) removed.
fn served(addr: &str, prompt: &[u32], sampling: SamplingParams) -> (Vec<u32>, FinishReason) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
        let request = GenerateRequest {
            request_id: "same-as-generate".into(),
            prompt_tokens: prompt.to_vec(),
            sampling: Some(sampling),
            priority: 0,
            images: Vec::new(),
            constraint: None,
        };
        let mut stream = client.generate(request).await.expect("generate").into_inner();
        let mut tokens = Vec::new();
        while let Some(event) = stream.message().await.expect("stream") {
            tokens.extend(event.tokens.iter().map(|t| t.id));
            let reason = FinishReason::try_from(event.finish_reason).expect("finish reason");
            match reason {
                FinishReason::Unspecified => continue,
                FinishReason::Stop => {
                    tokens.pop();
                }
                FinishReason::Length => {}
                FinishReason::Error => panic!("{}", event.error),
            }
            return (tokens, reason);
        }
        panic!("the stream ended without a finish reason");
    })
}

/// `epserve generate --json` on `model`: its tokens and finish reason.
fn generated(model: &str, prompt: &str, max_tokens: u32, temperature: f32, seed: u64) -> (Vec<u32>, FinishReason) {
    let (max_tokens, temperature, seed) = (max_tokens.to_string(), temperature.to_string(), seed.to_string());
    let out = support::run_json(&[
        "generate",
        "--model",
        model,
        "--tokens",
        prompt,
        "--max-tokens",
        &max_tokens,
        "--temperature",
        &temperature,
        "--seed",
        &seed,
        "--json",
    ]);
    let tokens: Vec<u32> = serde_json::from_value(out["tokens"].clone()).expect("tokens");
    let reason = match out["finish_reason"].as_str() {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        other => panic!("finish_reason {other:?}"),
    };
    (tokens, reason)
}

const PROMPT: &str = "480,470,468,474,182,82,443";

fn prompt_ids() -> Vec<u32> {
    PROMPT.split(',').map(|t| t.parse().expect("id")).collect()
}

/// `epserve generate` and the server sample with the same sampler: the same seed and temperature
/// give the same tokens (and stop the same way).
#[test]
fn generate_and_the_server_sample_the_same_tokens() {
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let coordinator = support::coordinator(model, &[]);
    let greedy = generated(model, PROMPT, 32, 0.0, 0).0;
    let mut outputs = Vec::new();
    for seed in [1, 2, 3, 4, 5] {
        let sampling = SamplingParams { temperature: 0.8, seed: Some(seed), max_tokens: 32, ..Default::default() };
        let server = served(&coordinator.addr, &prompt_ids(), sampling);
        let offline = generated(model, PROMPT, 32, 0.8, seed);
        assert_eq!(offline, server, "seed {seed}: generate vs the server");
        outputs.push(offline.0);
    }
    // The draws are real: seeds disagree, and differ from greedy decoding.
    assert!(outputs.iter().any(|o| *o != outputs[0]), "every seed gave {:?}", outputs[0]);
    assert!(outputs.iter().any(|o| *o != greedy), "sampling at 0.8 gave the greedy tokens every time");
}

/// Both read the EOS ids the same way: `generation_config.json`'s when the checkpoint has one,
/// else `config.json`'s. A copy of the fixture names different tokens of its greedy output as EOS
/// in each file.
#[test]
fn generate_and_the_server_stop_at_the_same_eos() {
    let fixture = tiny_fixture();
    let greedy = generated(fixture.to_str().expect("utf-8"), PROMPT, 16, 0.0, 0).0;
    // Two tokens that first appear at positions 2 and 3 or later, so that each stop is visible.
    let mut firsts = greedy.iter().enumerate().filter(|&(i, t)| !greedy[..i].contains(t)).skip(1);
    let (from_generation, from_config) = match (firsts.next(), firsts.next()) {
        (Some((i, &a)), Some((j, &b))) => ((i, a), (j, b)),
        _ => panic!("greedy output {greedy:?} repeats too much for this test"),
    };

    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&fixture).expect("fixture") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config")).expect("json");
    if config["text_config"].get("eos_token_id").is_some() {
        config["text_config"]["eos_token_id"] = serde_json::json!([from_config.1]);
    }
    if config.get("eos_token_id").is_some() {
        config["eos_token_id"] = serde_json::json!([from_config.1]);
    }
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let generation_path = dir.path().join("generation_config.json");
    std::fs::write(&generation_path, format!(r#"{{"eos_token_id": {}}}"#, from_generation.1)).expect("write");
    let model = dir.path().to_str().expect("utf-8");
    let greedy_params = SamplingParams { temperature: 0.0, max_tokens: 16, ..Default::default() };

    let coordinator = support::coordinator(model, &[]);
    let expected = (greedy[..from_generation.0].to_vec(), FinishReason::Stop);
    assert_eq!(generated(model, PROMPT, 16, 0.0, 0), expected, "generate stops at generation_config's EOS");
    assert_eq!(served(&coordinator.addr, &prompt_ids(), greedy_params.clone()), expected, "so does the server");
    drop(coordinator);

    std::fs::remove_file(&generation_path).expect("remove");
    let coordinator = support::coordinator(model, &[]);
    let expected = (greedy[..from_config.0].to_vec(), FinishReason::Stop);
    assert_eq!(generated(model, PROMPT, 16, 0.0, 0), expected, "without it, generate stops at config.json's");
    assert_eq!(served(&coordinator.addr, &prompt_ids(), greedy_params), expected, "so does the server");
}
