//! `epserve bench` against a real `epserve up`, and against a deliberately slow server.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use support::{post, run_json};

/// Against a running `epserve up`: the token counts `epserve bench` reports are the usage the
/// server returned for the same prompts.
#[test]
fn reported_tokens_equal_server_usage() {
    let (up, gateway) = support::up(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let prompts = dir.path().join("prompts.jsonl");
    let texts = ["The experts", "Hello there, how are you?", "One two three four five six seven"];
    let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "prompt": t }).to_string()).collect();
    std::fs::write(&prompts, lines.join("\n")).expect("write prompts");

    // Usage the server reports for each prompt, non-streamed.
    let mut expected_prompt = 0;
    for t in texts {
        let body = serde_json::json!({ "model": "tiny-llama4", "prompt": t, "max_tokens": 5, "ignore_eos": true });
        let (status, response) = post(&gateway, "/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{response}");
        let v = support::body_json(&response);
        expected_prompt += v["usage"]["prompt_tokens"].as_u64().expect("usage");
    }
    let url = format!("http://{gateway}/v1");
    let prompts = prompts.to_str().expect("utf-8");
    let report = run_json(&[
        "bench",
        "--url",
        &url,
        "--model",
        "tiny-llama4",
        "--prompts",
        prompts,
        "--requests",
        "3",
        "--output-len",
        "5",
        "--concurrency",
        "3",
        "--json",
    ]);
    assert_eq!(report["requests_ok"], 3, "{report}");
    assert_eq!(report["output_tokens"], 15, "{report}");
    assert_eq!(report["prompt_tokens"], expected_prompt, "{report}");
    assert!(report["ttft"]["p50_ms"].as_f64().is_some_and(|v| v > 0.0));

    // Without --model: the first model the server lists at GET /v1/models.
    let listed =
        run_json(&["bench", "--url", &url, "--prompts", prompts, "--requests", "1", "--output-len", "2", "--json"]);
    assert_eq!(listed["requests_ok"], 1, "{listed}");
    // A model the server does not serve: every request fails, counted under the server's message.
    let args = ["bench", "--url", &url, "--model", "nope", "--prompts", prompts, "--requests", "2", "--json"];
    let out =
        std::process::Command::new(support::epserve()).args(args).env("EPSERVE_LOG", "warn").output().expect("run");
    assert!(!out.status.success(), "every request failed: the command fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = stderr.find('{').zip(stderr.rfind('}')).map(|(a, b)| &stderr[a..=b]).expect("a report on stderr");
    let failed: serde_json::Value = serde_json::from_str(report).expect("the report is JSON");
    let errors = failed["errors"].as_object().expect("errors");
    assert_eq!(errors.len(), 1, "{failed}");
    let (kind, count) = errors.iter().next().expect("one kind");
    assert!(kind.starts_with("http 404: The model `nope` does not exist."), "{kind}");
    assert_eq!(count, 2);
    support::stop(up);
}

/// A server that answers every request after one second, streaming one chunk with usage.
fn slow_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                std::thread::sleep(Duration::from_secs(1));
                let events = "data: {\"choices\":[{\"index\":0,\"text\":\"hi\",\"finish_reason\":null}]}\n\n\
                              data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{events}",
                    events.len()
                );
            });
        }
    });
    addr
}

/// Open loop keeps its schedule: 10 requests at 20/s against a server that takes 1 s each finish in
/// about 1.5 s, not 10 s (they are not serialized behind the slow ones).
#[test]
fn open_loop_keeps_its_schedule_when_the_server_is_slow() {
    let addr = slow_server();
    let url = format!("http://{addr}/v1");
    let report = run_json(&[
        "bench",
        "--url",
        &url,
        "--model",
        "m",
        "--rate",
        "20",
        "--requests",
        "10",
        "--input-len",
        "4",
        "--output-len",
        "1",
        "--json",
    ]);
    assert_eq!(report["requests_ok"], 10, "{report}");
    assert_eq!(report["output_tokens"], 10);
    let secs = report["duration_s"].as_f64().expect("duration");
    assert!(secs < 3.5, "open loop took {secs} s: requests were serialized");
    assert!(report["ttft"]["p50_ms"].as_f64().is_some_and(|v| v >= 1000.0), "{report}");
    // Closed loop with one client does serialize them: the contrast shows the test can fail.
    let closed = run_json(&[
        "bench",
        "--url",
        &url,
        "--model",
        "m",
        "--concurrency",
        "1",
        "--requests",
        "3",
        "--input-len",
        "4",
        "--output-len",
        "1",
        "--json",
    ]);
    assert!(closed["duration_s"].as_f64().is_some_and(|s| s >= 3.0), "{closed}");
}
