//! The HTTP edge's defences over real sockets (issue 16): slowloris connections closed within the
//! header timeout while a normal client is served, the connection cap, the body timeout, per-key
//! limits (429 + `Retry-After`), field limits before tokenizing, a full coordinator queue as 429, CORS
//! and the metrics key, and streams cancelled — the coordinator's stream dropped — when their client
//! disconnects or stops reading.

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use epserve_gateway::EdgeConfig;
use epserve_gateway::edge::{ConnectionLimits, KeyLimits};
use epserve_proto::v1::coordinator_service_server::CoordinatorService;
use epserve_proto::v1::{
    self as pb, GenerateRequest, HealthRequest, HealthResponse, LoadRequest, LoadResponse, TokenEvent,
};
use serde_json::{Value, json};
use support::{RecordingCoordinator, serve_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A coordinator whose generations never end (one token after another, as fast as the gateway takes
/// them), counting the streams it started and those that were dropped; or, when `full`, one whose
/// queue is always full.
#[derive(Debug, Clone, Default)]
struct EndlessCoordinator {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    full: bool,
}

/// Counts its stream as dropped (the gRPC stream reset by the gateway) when the stream is dropped.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TokenEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for EndlessCoordinator {
    type GenerateStream = EventStream;

    async fn generate(&self, _: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        if self.full {
            return Err(Status::resource_exhausted("the waiting queue is full (64 requests)"));
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        let guard = DropCounter(self.dropped.clone());
        let token = pb::Token { id: 72, logprob: None, top_logprobs: Vec::new() };
        let events = futures_util::stream::repeat_with(move || {
            let _ = &guard;
            Ok(TokenEvent { tokens: vec![token.clone()], ..Default::default() })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { serving: true }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Ok(Response::new(LoadResponse { max_model_len: 1 << 20, ..Default::default() }))
    }
}

fn chat_body(stream: bool) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": stream})
}

async fn post(http: &reqwest::Client, url: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut request = http.post(url).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("response")
}

/// Waits until `condition` holds, for `within` at most.
async fn eventually(within: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads from `tcp` until the server closes it; the time that took.
async fn time_to_close(mut tcp: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

fn addr(base: &str) -> &str {
    base.trim_start_matches("http://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_connections_are_closed_within_the_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    let base = serve_gateway(RecordingCoordinator::default(), |c| {
        c.edge.connections = ConnectionLimits { header_timeout, max_connections: 1024 };
    })
    .await;
    // 200 connections, each sending half a request line, and one that sends nothing.
    let mut attackers = Vec::new();
    for i in 0..201 {
        let mut tcp = TcpStream::connect(addr(&base)).await.expect("connect");
        if i > 0 {
            tcp.write_all(b"POST /v1/chat/completions HT").await.expect("half a line");
        }
        attackers.push(tokio::spawn(time_to_close(tcp)));
    }
    // Meanwhile a normal client is served.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let answer = post(
        &http,
        &format!("{base}/v1/chat/completions"),
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        None,
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert!(started.elapsed() < header_timeout, "served while the attack held its connections");
    for attacker in attackers {
        let held = tokio::time::timeout(Duration::from_secs(10), attacker).await.expect("closed").expect("task");
        assert!(held >= header_timeout / 2 && held < header_timeout + Duration::from_secs(3), "held {held:?}");
    }
    // A head sent whole in time is served on a raw connection too.
    let mut tcp = TcpStream::connect(addr(&base)).await.expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_cap_are_closed_at_once() {
    let base = serve_gateway(RecordingCoordinator::default(), |c| {
        c.edge.connections = ConnectionLimits { header_timeout: Duration::from_secs(30), max_connections: 8 };
    })
    .await;
    // The harness's readiness poll may still hold a keep-alive connection: wait until it is gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr(&base)).await.expect("connect"));
    }
    let mut refused = 0;
    for _ in 0..4 {
        let tcp = TcpStream::connect(addr(&base)).await.expect("the kernel accepts");
        let closed = tokio::time::timeout(Duration::from_secs(2), time_to_close(tcp)).await;
        refused += usize::from(closed.is_ok());
    }
    assert!(refused >= 3, "connections past the cap are closed quickly ({refused} of 4)");
    drop(held);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http.get(format!("{base}/health")).send().await {
            Ok(r) if r.status() == 200 => break,
            _ => assert!(Instant::now() < deadline, "served again once the held connections closed"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_does_not_arrive_is_a_408() {
    let base = serve_gateway(RecordingCoordinator::default(), |c| {
        c.edge.body_timeout = Duration::from_millis(500);
    })
    .await;
    let mut tcp = TcpStream::connect(addr(&base)).await.expect("connect");
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 1000\r\n\r\n{\"model\": ";
    tcp.write_all(head.as_bytes()).await.expect("head and a little body");
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer)).await.expect("answered").expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn per_key_rate_limit_is_a_429_with_retry_after() {
    let base = serve_gateway(RecordingCoordinator::default(), |c| {
        c.api_keys = vec!["alice".into(), "bob".into()];
        c.edge.keys = KeyLimits { requests_per_minute: 2, max_concurrent: 0 };
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for _ in 0..2 {
        assert_eq!(post(&http, &url, &body, Some("alice")).await.status(), 200);
    }
    let refused = post(&http, &url, &body, Some("alice")).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "rate_limit_error");
    // Another key has its own allowance; a wrong key is refused before it counts for anyone.
    assert_eq!(post(&http, &url, &body, Some("bob")).await.status(), 200);
    assert_eq!(post(&http, &url, &body, Some("mallory")).await.status(), 401);
    // /v1/models is not limited.
    let models = http.get(format!("{base}/v1/models")).bearer_auth("alice").send().await.expect("models");
    assert_eq!(models.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_concurrency_counts_a_stream_until_it_ends() {
    let coordinator = EndlessCoordinator::default();
    let base = serve_gateway(coordinator.clone(), |c| {
        c.edge.keys = KeyLimits { requests_per_minute: 0, max_concurrent: 1 };
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let mut first = post(&http, &url, &chat_body(true), None).await;
    assert_eq!(first.status(), 200);
    first.chunk().await.expect("a chunk").expect("not the end");
    let second = post(&http, &url, &chat_body(false), None).await;
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "1");
    drop(first);
    eventually(Duration::from_secs(10), "the stream's slot is released", || {
        coordinator.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut again = post(&http, &url, &chat_body(true), None).await;
    assert_eq!(again.status(), 200);
    again.chunk().await.expect("a chunk");
}

#[tokio::test]
async fn field_limits_are_checked_before_tokenizing() {
    let coordinator = RecordingCoordinator::default();
    let base = serve_gateway(coordinator.clone(), |c| {
        c.max_body_bytes = 1 << 20;
        c.edge.requests.max_prompt_chars = 1000;
        c.edge.requests.max_stop_chars = 16;
    })
    .await;
    let http = reqwest::Client::new();
    let chat = format!("{base}/v1/chat/completions");
    let completions = format!("{base}/v1/completions");
    let refused = |param: &'static str| {
        move |(status, body): (u16, Value)| {
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["param"], param, "{body}");
        }
    };
    let send = |url: String, body: Value| {
        let http = http.clone();
        async move {
            let r = post(&http, &url, &body, None).await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let user = |text: String| json!([{"role": "user", "content": text}]);
    refused("messages")(send(chat.clone(), json!({"model": "tiny", "messages": user("x".repeat(1001))})).await);
    refused("prompt")(send(completions.clone(), json!({"model": "tiny", "prompt": "x".repeat(1001)})).await);
    let long_stop = json!({"model": "tiny", "messages": user("hi".into()), "stop": ["ok", "s".repeat(17)]});
    refused("stop")(send(chat.clone(), long_stop).await);
    let stops = json!({"model": "tiny", "messages": user("hi".into()), "stop": ["a", "b", "c", "d", "e"]});
    refused("stop")(send(chat.clone(), stops).await);
    // Token ids: past u32, and past the vocabulary (which is far below u32).
    refused("prompt")(send(completions.clone(), json!({"model": "tiny", "prompt": [1, 4294967297u64]})).await);
    refused("prompt")(send(completions.clone(), json!({"model": "tiny", "prompt": [1, 1_000_000]})).await);
    // A body past --max-body-bytes: 413 before it is parsed.
    let (status, body) = send(chat.clone(), json!({"model": "tiny", "messages": user("x".repeat(2 << 20))})).await;
    assert_eq!((status, &body["error"]["code"]), (413, &json!("request_too_large")));
    assert!(coordinator.requests.lock().is_empty(), "nothing reached the coordinator");
    // At the limits, served.
    let (status, body) = send(
        chat,
        json!({"model": "tiny", "messages": user("x".repeat(1000)), "max_tokens": 2, "stop": ["s".repeat(16)]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_full_coordinator_queue_is_a_429() {
    let base = serve_gateway(EndlessCoordinator { full: true, ..Default::default() }, |_| {}).await;
    let http = reqwest::Client::new();
    let answer = post(&http, &format!("{base}/v1/chat/completions"), &chat_body(false), None).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "1");
    let error: Value = answer.json().await.expect("json");
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
    // Still in the pool: a full queue is load, not a fault.
    assert_eq!(http.get(format!("{base}/ready")).send().await.expect("ready").status(), 200);
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_configured_origins() {
    let http = reqwest::Client::new();
    let preflight = |base: &str| {
        http.request(reqwest::Method::OPTIONS, format!("{base}/v1/chat/completions"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let closed = serve_gateway(RecordingCoordinator::default(), |_| {}).await;
    let answer = preflight(&closed).await.expect("answer");
    assert!(answer.headers().get("access-control-allow-origin").is_none());

    let open = serve_gateway(RecordingCoordinator::default(), |c| {
        c.api_keys = vec!["k".into()];
        c.edge.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let answer = preflight(&open).await.expect("answer");
    assert_eq!(answer.status(), 200, "a preflight carries no key and is answered");
    assert_eq!(answer.headers()["access-control-allow-origin"], "https://app.example");
    let other = http
        .get(format!("{open}/v1/models"))
        .header("origin", "https://evil.example")
        .bearer_auth("k")
        .send()
        .await
        .expect("answer");
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn metrics_behind_their_own_key() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let base = serve_gateway(RecordingCoordinator::default(), |c| {
        c.api_keys = vec!["api".into()];
        c.metrics = Some(handle);
        c.edge.metrics_key = Some("scraper".into());
    })
    .await;
    let http = reqwest::Client::new();
    let metrics = |key: Option<&'static str>| {
        let mut r = http.get(format!("{base}/metrics"));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send()
    };
    assert_eq!(metrics(None).await.expect("answer").status(), 401);
    assert_eq!(metrics(Some("api")).await.expect("answer").status(), 401, "an API key is not the metrics key");
    assert_eq!(metrics(Some("scraper")).await.expect("answer").status(), 200);
}

/// Reads the response head and the first event of a stream on `tcp`.
async fn start_stream(base: &str, tcp: &mut TcpStream) {
    let body = chat_body(true).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut buf = vec![0u8; 512];
    let n = tcp.read(&mut buf).await.expect("head");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{base}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_client_stops_reading_is_cancelled() {
    let coordinator = EndlessCoordinator::default();
    let stall = Duration::from_millis(500);
    let base = serve_gateway(coordinator.clone(), |c| c.edge.stream_stall_timeout = stall).await;
    // A small receive window, so that the socket buffers fill after little output.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = socket.connect(addr(&base).parse().expect("addr")).await.expect("connect");
    start_stream(&base, &mut tcp).await;
    assert_eq!(coordinator.started.load(Ordering::SeqCst), 1);
    // The client reads nothing more but keeps the connection open.
    eventually(Duration::from_secs(20), "the coordinator's stream is dropped", || {
        coordinator.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_client_disconnects_is_cancelled() {
    let coordinator = EndlessCoordinator::default();
    // A stall timeout far past the test: only the disconnect can end the stream.
    let base = serve_gateway(coordinator.clone(), |c| c.edge.stream_stall_timeout = Duration::from_secs(600)).await;
    let mut tcp = TcpStream::connect(addr(&base)).await.expect("connect");
    start_stream(&base, &mut tcp).await;
    drop(tcp);
    eventually(Duration::from_secs(10), "the coordinator's stream is dropped", || {
        coordinator.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[test]
fn defaults_are_documented_values() {
    let edge = EdgeConfig::default();
    assert_eq!(edge.connections.header_timeout, Duration::from_secs(10));
    assert_eq!(edge.connections.max_connections, 4096);
    assert_eq!(edge.body_timeout, Duration::from_secs(30));
    assert_eq!(edge.stream_stall_timeout, Duration::from_secs(30));
    assert!(edge.keys.is_off() && edge.cors_origins.is_empty() && edge.metrics_key.is_none());
}
