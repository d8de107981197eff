//! What the image tests share: a recording coordinator (a real gRPC server that keeps every
//! `GenerateRequest` and answers with two tokens), a real gateway in front of it, and the golden
//! vision cases of the tiny fixture.

#![allow(dead_code)] // Each test file uses its own part of the harness.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use epserve_gateway::images::fetch::FetchConfig;
use epserve_gateway::{EdgeConfig, GatewayConfig, ImageConfig};
use epserve_proto::v1::coordinator_service_server::{CoordinatorService, CoordinatorServiceServer};
use epserve_proto::v1::{
    self as pb, GenerateRequest, HealthRequest, HealthResponse, LoadRequest, LoadResponse, TokenEvent,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub const WAIT: Duration = Duration::from_secs(30);

/// The tokens every generation answers with: ids of the tiny tokenizer's byte alphabet.
pub const ANSWER: [u32; 2] = [72, 105];

/// A coordinator that records what it is asked.
#[derive(Debug, Clone, Default)]
pub struct RecordingCoordinator {
    pub requests: Arc<Mutex<Vec<GenerateRequest>>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TokenEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for RecordingCoordinator {
    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let prompt_tokens = request.prompt_tokens.len() as u32;
        self.requests.lock().push(request);
        let token = |id| pb::Token { id, logprob: None, top_logprobs: Vec::new() };
        let events = vec![
            Ok(TokenEvent { tokens: vec![token(ANSWER[0])], ..Default::default() }),
            Ok(TokenEvent {
                tokens: vec![token(ANSWER[1])],
                finish_reason: pb::FinishReason::Stop as i32,
                usage: Some(pb::Usage { prompt_tokens, completion_tokens: 2 }),
                ..Default::default()
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { serving: true }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Ok(Response::new(LoadResponse { max_model_len: 4096, ..Default::default() }))
    }
}

/// A gateway with its recording coordinator, both serving until dropped (with the test's runtime).
#[derive(Debug)]
pub struct Harness {
    pub base: String,
    pub coordinator: RecordingCoordinator,
    pub http: reqwest::Client,
}

impl Harness {
    /// `model`: a fixture name (`fixtures::TINY_LLAMA4`).
    pub async fn start(model: &str, images: ImageConfig) -> Harness {
        let coordinator = RecordingCoordinator::default();
        let base = serve_gateway(coordinator.clone(), |config| {
            config.model = epserve_testkit::fixtures::dir(model);
            config.images = images;
        })
        .await;
        Harness { base, coordinator, http: reqwest::Client::new() }
    }

    /// Posts a chat completion; the status and the JSON answer.
    pub async fn chat(&self, messages: Value) -> (u16, Value) {
        self.chat_with(json!({"model": "tiny", "messages": messages, "max_tokens": 2})).await
    }

    pub async fn chat_with(&self, body: Value) -> (u16, Value) {
        let response =
            self.http.post(format!("{}/v1/chat/completions", self.base)).json(&body).send().await.expect("response");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// The requests the coordinator received so far.
    pub fn received(&self) -> Vec<GenerateRequest> {
        self.coordinator.requests.lock().clone()
    }

    /// Asserts a 400 naming `param`; returns the error message.
    pub async fn refused(&self, messages: Value, param: &str) -> String {
        let (status, body) = self.chat(messages).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        body["error"]["message"].as_str().expect("message").to_owned()
    }
}

/// Image input on, fetching as given.
pub fn images(fetch: Option<FetchConfig>) -> ImageConfig {
    ImageConfig { fetch, ..ImageConfig::default() }
}

pub fn golden_dir() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4).join("golden")
}

pub fn png(name: &str) -> Vec<u8> {
    std::fs::read(golden_dir().join(name)).expect("golden image")
}

pub fn data_uri(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

pub fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// One case of `golden/vision.json`.
#[derive(Debug, Clone)]
pub struct VisionCase {
    pub image: String,
    pub input_ids: Vec<u32>,
    pub tile_shape: [usize; 4],
    pub pixel_values: Vec<f32>,
}

pub fn vision_cases() -> Vec<VisionCase> {
    let dir = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4);
    epserve_testkit::golden::vision_cases(&dir)
        .into_iter()
        .map(|c| VisionCase {
            tile_shape: c.pixel_values_shape.as_slice().try_into().expect("[tiles, 3, S, S]"),
            image: c.image,
            input_ids: c.input_ids,
            pixel_values: c.pixel_values,
        })
        .collect()
}

/// The golden prompt as the gateway builds it. transformers' processor tokenizes the rendered
/// prompt with special tokens, so its `input_ids` start with BOS twice (the template's and the
/// tokenizer's); the gateway renders BOS once, as for text-only chats (`golden/chat.json`).
pub fn gateway_prompt(case: &VisionCase) -> Vec<u32> {
    const BOS: u32 = 480;
    assert_eq!(case.input_ids[..2], [BOS, BOS], "the golden's doubled BOS");
    case.input_ids[1..].to_vec()
}

/// The image's token layout in a golden prompt: from `<|image_start|>` to `<|image_end|>`.
pub fn golden_expansion(case: &VisionCase) -> Vec<u32> {
    let start = case.input_ids.iter().position(|&t| t == 493).expect("<|image_start|>");
    let end = case.input_ids.iter().position(|&t| t == 494).expect("<|image_end|>");
    case.input_ids[start..=end].to_vec()
}

/// Serves `coordinator` over gRPC and a real gateway (the tiny text fixture, served as `tiny`,
/// changed by `configure`) in front of it, both until the test's runtime ends; waits until the
/// gateway is ready and returns its base URL.
pub async fn serve_gateway<C: CoordinatorService>(
    coordinator: C,
    configure: impl FnOnce(&mut GatewayConfig),
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator_addr = listener.local_addr().expect("addr").to_string();
    let service = CoordinatorServiceServer::new(coordinator).max_decoding_message_size(256 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut config = GatewayConfig {
        model: epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4),
        listen: "127.0.0.1:0".into(),
        coordinators: vec![coordinator_addr],
        api_keys: Vec::new(),
        served_model_name: Some("tiny".into()),
        max_body_bytes: 16 << 20,
        max_concurrent_requests: 16,
        health_interval: Duration::from_millis(50),
        metrics: None,
        control: None,
        images: ImageConfig::default(),
        edge: EdgeConfig::default(),
        tls: None,
    };
    configure(&mut config);
    let gateway = epserve_gateway::start(config).await.expect("gateway starts");
    let base = format!("http://{}", gateway.local_addr());
    tokio::spawn(gateway.serve(std::future::pending()));
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "the gateway never saw its coordinator");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    base
}
