//! Constrained decoding in the engine, on the tiny fixture: a grammar request batched with an
//! unconstrained one changes neither's tokens (each equals its run alone), the constrained output
//! follows the grammar and ends with `Stop` when the grammar is complete, and sampled requests
//! follow it too.

mod support;

use support::{collect, prompt};

use std::sync::Arc;

use candle_core::{DType, Device};
use epserve_coordinator::engine::{self, EngineConfig, EngineHandle, Event, FinishReason, Request};
use epserve_coordinator::kv_pool::{KvCapacity, KvPool};
use epserve_coordinator::sampling::SamplingParams;
use epserve_grammar::{GrammarCompiler, GrammarSpec, TokenConstraint, Vocabulary};
use epserve_testkit::fixtures;
use tokio::sync::mpsc::Receiver;

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "level": {"enum": ["low", "mid", "high"]},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 3},
    "ok": {"type": "boolean"}},
  "required": ["level", "tags", "ok"], "additionalProperties": false}"#;

struct Fixture {
    engine: EngineHandle,
    grammars: Arc<GrammarCompiler>,
}

fn start() -> Fixture {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4);
    let (cfg, model, experts) = support::load_tiny();
    let eos = cfg.text.eos_token_ids.clone();
    let grammars =
        GrammarCompiler::new(Vocabulary::from_checkpoint(&dir, cfg.text.vocab_size, &eos).expect("vocabulary"))
            .expect("compiler");
    let pool = KvPool::new(&cfg.text, KvCapacity::Tokens(4096), 16, DType::F32, &Device::Cpu).expect("pool");
    let engine = engine::start(
        model,
        None,
        experts,
        pool,
        EngineConfig { max_batch_tokens: 256, max_running: 16, ..EngineConfig::new(2048, eos) },
    );
    Fixture { engine, grammars: Arc::new(grammars) }
}

fn submit(
    engine: &EngineHandle,
    id: &str,
    prompt: Vec<u32>,
    sampling: SamplingParams,
    constraint: Option<TokenConstraint>,
) -> Receiver<Event> {
    let (tx, rx) = tokio::sync::mpsc::channel(epserve_coordinator::engine::EVENT_BUFFER);
    let request = Request { id: id.into(), prompt, sampling, priority: 0, images: Vec::new(), constraint };
    engine.submit(request, tx).expect("submit");
    rx
}

/// The fixture's tokens are byte-level BPE: decode by the tokenizer.
fn text(tokens: &[u32]) -> String {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    tokenizer.decode(tokens, true).expect("decode")
}

fn check_document(tokens: &[u32]) {
    let value: serde_json::Value = serde_json::from_str(&text(tokens)).expect("the output is JSON");
    assert!(["low", "mid", "high"].contains(&value["level"].as_str().expect("level")), "{value}");
    assert!(value["ok"].is_boolean(), "{value}");
    let tags = value["tags"].as_array().expect("tags");
    assert!(tags.len() <= 3, "{value}");
    for t in tags {
        let t = t.as_str().expect("a string tag");
        assert!((1..=4).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase()), "{value}");
    }
}

#[test]
fn constrained_and_free_requests_do_not_affect_each_other() {
    let f = start();
    let spec = GrammarSpec::json_schema(SCHEMA);
    let greedy = |max_tokens| SamplingParams { temperature: 0.0, max_tokens, ..Default::default() };
    let free = || SamplingParams { ignore_eos: true, ..greedy(24) };

    let alone_free = collect(submit(&f.engine, "free", prompt(19, 1), free(), None));
    let constraint = || Some(f.grammars.compile(&spec).expect("compiles"));
    let alone_json = collect(submit(&f.engine, "json", prompt(11, 2), greedy(200), constraint()));
    assert_eq!(alone_json.reason, FinishReason::Stop, "the grammar completes before max_tokens");
    check_document(&alone_json.tokens);

    // Both in flight at once: the same tokens each got alone.
    let a = submit(&f.engine, "free-b", prompt(19, 1), free(), None);
    let b = submit(&f.engine, "json-b", prompt(11, 2), greedy(200), constraint());
    assert_eq!(collect(a), alone_free);
    assert_eq!(collect(b), alone_json);
    // The grammar changed the constrained request's tokens: without it the model writes other ones.
    let unconstrained = collect(submit(&f.engine, "json-free", prompt(11, 2), greedy(200), None));
    assert_ne!(unconstrained.tokens, alone_json.tokens);
}

#[test]
fn sampled_requests_follow_the_grammar() {
    let f = start();
    let spec = GrammarSpec::json_schema(SCHEMA);
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let sampling = SamplingParams { temperature: 1.0, seed: Some(i), max_tokens: 300, ..Default::default() };
            let constraint = f.grammars.compile(&spec).expect("compiles");
            submit(&f.engine, &format!("s{i}"), prompt(9, i as usize), sampling, Some(constraint))
        })
        .collect();
    for rx in streams {
        let support::Outcome { tokens, reason } = collect(rx);
        assert_eq!(reason, FinishReason::Stop);
        check_document(&tokens);
    }
    assert_eq!(f.grammars.cached(), 1, "compiled once");
}

/// Through `CoordinatorService`: a grammar that does not compile is refused with `invalid_argument`
/// and llguidance's reason (the engine never sees it); a valid one is compiled and enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_refuses_bad_grammars_and_enforces_good_ones() {
    use epserve_coordinator::{CoordinatorConfig, EngineSizing, LoadConfig};
    use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
    use epserve_proto::v1::{self as pb, GenerateRequest};

    let config = CoordinatorConfig {
        load: LoadConfig::local(fixtures::dir(fixtures::TINY_LLAMA4), DType::F32),
        listen: "127.0.0.1:0".into(),
        sizing: EngineSizing::new(KvCapacity::Tokens(2048)),
        overlap: false,
        control: None,
    };
    let coordinator = epserve_coordinator::start(config).await.expect("start");
    let addr = coordinator.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(coordinator.serve(async move {
        let _ = stopped.await;
    }));
    let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let request = |grammar| GenerateRequest {
        request_id: "c".into(),
        prompt_tokens: prompt(7, 3),
        sampling: Some(pb::SamplingParams { temperature: 0.0, max_tokens: 200, ..Default::default() }),
        priority: 0,
        images: Vec::new(),
        constraint: Some(pb::Constraint { grammar }),
    };
    for (grammar, says) in [
        (Some(pb::constraint::Grammar::JsonSchema(r#"{"type": "array", "uniqueItems": true}"#.into())), "uniqueItems"),
        (Some(pb::constraint::Grammar::JsonSchema("{oops".into())), "not JSON"),
        (Some(pb::constraint::Grammar::Lark("start: (".into())), "constraint"),
        (None, "neither json_schema nor lark"),
    ] {
        let status = client.generate(request(grammar)).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    let mut events = client
        .generate(request(Some(pb::constraint::Grammar::JsonSchema(SCHEMA.into()))))
        .await
        .expect("ok")
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = events.message().await.expect("event") {
        tokens.extend(event.tokens.iter().map(|t| t.id));
        if event.finish_reason != 0 {
            assert_eq!(event.finish_reason, pb::FinishReason::Stop as i32, "{}", event.error);
        }
    }
    check_document(&tokens);
    let _ = stop.send(());
    serving.await.expect("task").expect("serve");
}
