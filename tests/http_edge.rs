//! The HTTP edge's defences against the real `epserve gateway` in front of a real `epserve
//! coordinator` (issue 16): a slowloris attack closed within the header timeout while a normal client
//! is served; out-of-range token ids, oversized stop strings and prompts refused before tokenizing; a
//! rate-limited key answered 429 with `Retry-After`; and a streaming client that stops reading
//! cancelled, its KV blocks freed on the coordinator.

mod support;

use std::time::{Duration, Instant};

use epserve_proto::v1::LoadRequest;
use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use serde_json::{Value, json};
use support::{Process, body_json, coordinator, gateway, post, tiny_fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn model() -> String {
    tiny_fixture().to_str().expect("utf-8").to_owned()
}

/// `request` (method, path, headers and body) with `Connection: close`; the status and the response.
fn send(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    (text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

fn post_with_key(addr: &str, key: &str, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    send(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn refused(addr: &str, path: &str, body: Value, param: &str) {
    let (status, response) = post(addr, path, &body.to_string());
    assert_eq!(status, 400, "{response}");
    assert_eq!(body_json(&response)["error"]["param"], param, "{response}");
}

#[test]
fn slowloris_is_closed_within_the_header_timeout_while_others_are_served() {
    let coordinator = coordinator(&model(), &[]);
    let gateway = gateway(&model(), &coordinator.addr, &["--header-timeout-ms", "2000"]);
    let addr = gateway.addr.clone();
    let started = Instant::now();
    let attackers: Vec<_> = (0..200)
        .map(|_| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /v1/models HT").expect("half a request line");
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
                let closed_by_server = matches!(s.read(&mut [0u8; 64]), Ok(0) | Err(_));
                (closed_by_server, Instant::now())
            })
        })
        .collect();
    // Meanwhile a normal client is served (the gateway's readiness: a coordinator may still be loading).
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = json!({"model": "tiny-llama4", "prompt": "Hello", "max_tokens": 2}).to_string();
    loop {
        let (status, response) = post(&addr, "/v1/completions", &body);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not served during the attack: {response}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for attacker in attackers {
        let (closed, at) = attacker.join().expect("thread");
        let held = at - started;
        assert!(closed, "the server closed the connection");
        assert!(held < Duration::from_secs(8), "held for {held:?}, the header timeout is 2 s");
    }
    drop(gateway);
}

#[test]
fn oversized_fields_and_out_of_range_token_ids_are_400s() {
    let coordinator = coordinator(&model(), &[]);
    let gateway = gateway(&model(), &coordinator.addr, &["--max-prompt-chars", "10000", "--max-stop-chars", "64"]);
    let addr = &gateway.addr;
    let user = |text: String| json!([{"role": "user", "content": text}]);
    refused(addr, "/v1/completions", json!({"model": "tiny-llama4", "prompt": [1, 4294967297u64]}), "prompt");
    // The tiny fixture's vocabulary is far below this id.
    refused(addr, "/v1/completions", json!({"model": "tiny-llama4", "prompt": [1, 200000]}), "prompt");
    refused(
        addr,
        "/v1/chat/completions",
        json!({"model": "tiny-llama4", "messages": user("hi".into()), "stop": ["x".repeat(65)]}),
        "stop",
    );
    refused(
        addr,
        "/v1/chat/completions",
        json!({"model": "tiny-llama4", "messages": user("x".repeat(10_001))}),
        "messages",
    );
    refused(addr, "/v1/completions", json!({"model": "tiny-llama4", "prompt": "x".repeat(10_001)}), "prompt");
    // Past the body limit (8 MiB by default): 413 before it is parsed.
    let (status, response) =
        post(addr, "/v1/completions", &json!({"model": "tiny-llama4", "prompt": "x".repeat(9 << 20)}).to_string());
    assert_eq!(status, 413, "{}", &response[..response.len().min(300)]);
}

#[test]
fn a_rate_limited_key_gets_429_with_retry_after() {
    let coordinator = coordinator(&model(), &[]);
    let gateway = gateway(&model(), &coordinator.addr, &["--api-key", "k1,k2", "--rate-limit-per-minute", "2"]);
    let addr = &gateway.addr;
    let body = json!({"model": "tiny-llama4", "prompt": "Hello", "max_tokens": 1});
    // The first may meet a coordinator that is not ready yet (503): it still counts.
    for _ in 0..2 {
        let (status, response) = post_with_key(addr, "k1", "/v1/completions", &body);
        assert!(status == 200 || status == 503, "{response}");
    }
    let (status, response) = post_with_key(addr, "k1", "/v1/completions", &body);
    assert_eq!(status, 429, "{response}");
    let retry_after = response
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_owned()))
        .expect("a Retry-After header");
    assert!(retry_after.parse::<u64>().is_ok_and(|s| (1..=30).contains(&s)), "{retry_after}");
    assert_eq!(body_json(&response)["error"]["code"], "rate_limit_exceeded");
    // The other key is not limited by the first one's use.
    let (status, response) = post_with_key(addr, "k2", "/v1/completions", &body);
    assert!(status == 200 || status == 503, "{response}");
}

/// The coordinator's `Load`: requests running and KV blocks in use.
async fn load(addr: &str) -> (u32, u64) {
    let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let load = client.load(LoadRequest {}).await.expect("load").into_inner();
    (load.running, load.kv_blocks_used)
}

/// `epserve_http_streams_cancelled_total{reason="stalled"}` on the gateway.
fn stalled_streams(gateway: &str) -> u64 {
    let (_, metrics) = post(gateway, "/metrics", "");
    metrics
        .lines()
        .find(|l| l.starts_with("epserve_http_streams_cancelled_total") && l.contains("reason=\"stalled\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_cancelled_and_its_kv_freed() {
    let coordinator: Process = coordinator(&model(), &[]);
    let stall_ms = 1000;
    let gateway = gateway(&model(), &coordinator.addr, &["--stream-stall-timeout-ms", &stall_ms.to_string()]);
    let body = json!({
        "model": "tiny-llama4", "prompt": "Once upon a time", "max_tokens": 30000, "ignore_eos": true,
        "temperature": 0, "stream": true
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A small receive window, so that the socket buffers fill after little output.
    let deadline = Instant::now() + Duration::from_secs(60);
    let tcp = loop {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut tcp: TcpStream = socket.connect(gateway.addr.parse().expect("addr")).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("request");
        let mut head = vec![0u8; 256];
        let n = tcp.read(&mut head).await.expect("head");
        if head[..n].starts_with(b"HTTP/1.1 200") {
            break tcp;
        }
        // 503 until the gateway has seen its coordinator ready.
        assert!(Instant::now() < deadline, "{}", String::from_utf8_lossy(&head[..n]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The response head can leave the gateway before the coordinator's engine admits the request:
    // wait for the admission rather than sample once (a single sample raced it under load).
    let admitted_by = Instant::now() + Duration::from_secs(10);
    let (running, blocks) = loop {
        let (running, blocks) = load(&coordinator.addr).await;
        if running == 1 || Instant::now() > admitted_by {
            break (running, blocks);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(running, 1, "the generation runs");
    assert!(blocks > 0);
    // The client reads no more, and keeps the connection open.
    let stopped_reading = Instant::now();
    loop {
        let (running, blocks) = load(&coordinator.addr).await;
        if running == 0 && blocks == 0 {
            break;
        }
        assert!(
            stopped_reading.elapsed() < Duration::from_secs(60),
            "still running {running} with {blocks} KV blocks after {:?}",
            stopped_reading.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed_after = stopped_reading.elapsed();
    assert_eq!(stalled_streams(&gateway.addr), 1, "cancelled as stalled, not finished ({freed_after:?})");
    eprintln!("KV freed {freed_after:?} after the client stopped reading (stall timeout {stall_ms} ms)");
    drop(tcp);
}
