//! The HTTP API end to end: `epserve up` checked with the official `openai` Python client, 64
//! concurrent streams, and a coordinator killed under a gateway with two.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{post, stop, tiny_fixture, up};

#[test]
fn openai_python_client_against_epserve_up() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = Command::new(&python).args(["-c", "import openai"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(has_openai, "the `openai` Python package is missing: `pip install openai` (scripts/test installs it)");
    let (child, addr) = up(&["--api-key", "sk-test"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .args([&format!("http://{addr}/v1"), "sk-test", "tiny-llama4"])
        .output()
        .expect("python");
    stop(child);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Images through `epserve up` with the official client (issue 13): a base64 PNG, streaming equal to
/// not streaming, two images, each bad image a 400 naming its part, and a URL image from a loopback
/// server, fetched with `--image-fetch --image-fetch-allow-private` and refused without.
/// The one-image chat's greedy text is the text `epserve generate --image` gives in one process.
#[test]
fn openai_python_client_sends_images() {
    let offline = support::run_json(&[
        "generate",
        "--model",
        tiny_fixture().to_str().expect("utf-8"),
        "--prompt",
        "What do you see?",
        "--chat",
        "--image",
        tiny_fixture().join("golden/wide.png").to_str().expect("utf-8"),
        "--max-tokens",
        "8",
        "--json",
    ]);
    let offline = offline["text"].as_str().expect("text").to_owned();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_images.py");
    let images = tiny_fixture().join("golden");
    for (fetch, flags) in [("off", &[][..]), ("on", &["--image-fetch", "--image-fetch-allow-private"][..])] {
        let mut args = vec!["--api-key", "sk-test", "--max-image-bytes", "4096", "--max-images-per-request", "2"];
        args.extend_from_slice(flags);
        let (child, addr) = up(&args);
        let out = Command::new(&python)
            .arg(&script)
            .args([&format!("http://{addr}/v1"), "sk-test", "tiny-llama4", images.to_str().expect("utf-8"), fetch])
            .output()
            .expect("python");
        stop(child);
        assert!(
            out.status.success(),
            "openai image checks (fetch {fetch}) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().expect("the script prints the greedy text");
        let served: String = serde_json::from_str(last).expect("a JSON string");
        assert_eq!(served, offline, "fetch {fetch}: the API's greedy text vs generate --image");
    }
}

#[test]
fn sixty_four_concurrent_streams_complete() {
    let (child, addr) = up(&[]);
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model": "tiny-llama4", "messages": [{{"role": "user", "content": "Request number {i}"}}], "max_tokens": 8, "temperature": 0.7, "seed": {i}, "ignore_eos": true, "stream": true}}"#
                );
                post(&addr, "/v1/chat/completions", &body)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, text) = h.join().expect("thread");
        assert_eq!(status, 200, "request {i}: {text}");
        assert!(text.contains(r#""finish_reason":"length""#), "request {i} did not finish: {text}");
        assert!(text.contains("data: [DONE]"), "request {i}: {text}");
    }
    stop(child);
}

#[test]
fn gateway_keeps_serving_when_a_coordinator_dies() {
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let mut a = support::coordinator(model, &[]);
    let b = support::coordinator(model, &[]);
    let coordinators = format!("{},{}", a.addr, b.addr);
    let gateway = support::gateway(model, &coordinators, &["--health-interval-ms", "200"]);
    let chat = r#"{"model": "tiny-llama4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    while post(&gateway.addr, "/v1/chat/completions", chat).0 != 200 {
        assert!(Instant::now() < deadline, "the gateway never served");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.kill();
    let killed = Instant::now();
    let mut served_after = None;
    while killed.elapsed() < Duration::from_secs(5) {
        let (status, text) = post(&gateway.addr, "/v1/chat/completions", chat);
        if status == 200 {
            served_after = Some(killed.elapsed());
            break;
        }
        assert_eq!(status, 503, "only 'no healthy coordinator' is acceptable meanwhile: {text}");
    }
    let served_after = served_after.expect("the gateway did not serve within 5 s of the kill");
    for _ in 0..10 {
        let (status, text) = post(&gateway.addr, "/v1/chat/completions", chat);
        assert_eq!(status, 200, "{text}");
    }
    eprintln!("first request served {served_after:?} after the kill");
    drop(b);
}

/// A prompt longer than the context is refused with 400 naming both numbers; past the in-flight
/// limit requests get 429.
#[test]
fn context_limit_and_overload_errors() {
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let coordinator = support::coordinator(model, &["--max-model-len", "64"]);
    let gateway = support::gateway(model, &coordinator.addr, &["--max-concurrent-requests", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while post(&gateway.addr, "/ready", "").0 != 200 {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let long: Vec<u32> = (0..100).map(|i| 10 + i % 400).collect();
    let body = serde_json::json!({ "model": "tiny-llama4", "prompt": long, "max_tokens": 4 }).to_string();
    let (status, response) = post(&gateway.addr, "/v1/completions", &body);
    assert_eq!(status, 400, "{response}");
    let error = support::body_json(&response);
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.contains("64") && message.contains("100"), "{message}");
    assert_eq!(error["error"]["param"], "prompt");

    // One stream holds the only slot (once its first chunk has arrived); a second request meanwhile
    // is told to back off, and is served once the stream has ended.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&gateway.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let body = r#"{"model": "tiny-llama4", "prompt": "hello", "max_tokens": 200, "ignore_eos": true, "stream": true}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).expect("first chunk");
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    let (status, response) = post(&gateway.addr, "/v1/models", "");
    assert_eq!(status, 200, "the models list is not limited: {response}");
    let short = r#"{"model": "tiny-llama4", "prompt": "hi", "max_tokens": 1}"#;
    let (status, response) = post(&gateway.addr, "/v1/completions", short);
    assert_eq!(status, 429, "{response}");
    assert_eq!(support::body_json(&response)["error"]["code"], "overloaded");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while post(&gateway.addr, "/v1/completions", short).0 != 200 {
        assert!(Instant::now() < deadline, "the slot was never released");
        std::thread::sleep(Duration::from_millis(50));
    }
}
