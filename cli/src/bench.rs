//! `epserve bench`: a load generator for any OpenAI-compatible endpoint (epserve's gateway,
//! llama.cpp's server, vLLM...), or — with `--coordinator` — for a coordinator's `Generate` RPC
//! directly (to measure what the gateway adds).
//!
//! Closed loop (`--concurrency N`: N clients, each sending its next request when the last one ended)
//! or open loop (`--rate R`: Poisson arrivals at R requests/s, each request started on schedule
//! whether or not earlier ones finished). Every request is streamed; reported: time to first token,
//! inter-token latency, end-to-end latency (p50, p90, p99, max), output tokens/s, requests/s and
//! errors by kind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::stats::percentile_ms;

/// Which OpenAI API the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiEndpoint {
    /// `POST /completions`.
    Completions,
    /// `POST /chat/completions`.
    Chat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the OpenAI API, e.g. `http://127.0.0.1:8000/v1`.
    #[arg(long, required_unless_present = "coordinator")]
    pub url: Option<String>,
    /// Send `Generate` RPCs to this coordinator instead (token prompts; no HTTP, no tokenizer).
    #[arg(long, conflicts_with = "url")]
    pub coordinator: Option<String>,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name to request; default: the first model the server lists at `GET /models`.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value = "completions")]
    pub endpoint: ApiEndpoint,
    /// Closed loop with this many clients.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests to measure in all.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Requests sent (and not measured) before the measured ones.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Prompt length in tokens (synthetic prompts); ± `--input-len-spread`.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 0)]
    pub input_len_spread: usize,
    /// Output tokens per request (forced with `ignore_eos` where the server supports it).
    #[arg(long, default_value_t = 128)]
    pub output_len: u32,
    /// JSONL file of prompts (`{"prompt": "..."}` or `{"messages": [...]}` per line) instead of synthetic ones.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Send synthetic prompts as token ids (`completions` only): the exact same workload as
    /// `--coordinator`, to measure what the HTTP layer adds.
    #[arg(long)]
    pub token_prompts: bool,
    /// Don't send `ignore_eos` (servers that reject unknown fields).
    #[arg(long)]
    pub no_ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ask every request for JSON following the schema in this file (`response_format` of type
    /// `json_schema`; on `completions`, epserve's extension field): measures constrained decoding.
    /// Requests end when their document is complete, so their output may be shorter than `--output-len`.
    #[arg(long, conflicts_with = "coordinator")]
    pub json_schema: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// With `--coordinator`: the identity the gRPC link is made with (mutual TLS).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    e2e: Duration,
    output_tokens: u64,
    prompt_tokens: u64,
    error: Option<String>,
}

fn summary(mut values: Vec<Duration>) -> Value {
    values.sort();
    let mean = if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<Duration>().as_secs_f64() * 1e3 / values.len() as f64)
    };
    json!({
        "p50_ms": percentile_ms(&values, 50.0), "p90_ms": percentile_ms(&values, 90.0),
        "p99_ms": percentile_ms(&values, 99.0), "max_ms": percentile_ms(&values, 100.0), "mean_ms": mean,
    })
}

/// `GET /models`.
#[derive(Debug, Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Debug, Deserialize)]
struct ModelCard {
    id: String,
}

/// An OpenAI error body: `{"error": {"message": ...}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: String,
}

/// The message of an OpenAI error body, if `body` is one.
fn error_message(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error.message)
}

/// What a failed HTTP request is counted as: its status, with the server's message when it sent one.
fn http_error(status: reqwest::StatusCode, body: &[u8]) -> String {
    match error_message(body) {
        Some(message) => format!("http {}: {message}", status.as_u16()),
        None => format!("http {}", status.as_u16()),
    }
}

/// The model to request when `--model` is not given: the first one the server lists (as vLLM's
/// bench does).
async fn served_model(client: &reqwest::Client, base: &str, api_key: Option<&str>) -> Result<String> {
    let url = format!("{base}/models");
    let mut request = client.get(&url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response.bytes().await.with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        bail!("GET {url}: {} (give --model)", http_error(status, &body));
    }
    let list: ModelList = serde_json::from_slice(&body).with_context(|| format!("GET {url}: not a model list"))?;
    list.data.into_iter().next().map(|m| m.id).with_context(|| format!("GET {url}: the server lists no model"))
}

/// Word list for synthetic prompts: common English words, about one token each for BPE tokenizers.
const WORDS: &[&str] = &[
    "the", "model", "expert", "token", "layer", "request", "server", "time", "cache", "batch", "worker", "route",
    "value", "order", "state", "first", "small", "large", "fast", "slow", "data", "text", "line", "word", "step",
];

enum Payload {
    Http(Value),
    Tokens(Vec<u32>),
}

/// The `response_format` of `--json-schema`, read once.
fn response_format(args: &BenchArgs) -> Result<Option<Value>> {
    let Some(path) = &args.json_schema else { return Ok(None) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let schema: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    Ok(Some(json!({ "type": "json_schema", "json_schema": { "name": "bench", "schema": schema } })))
}

fn prompts(args: &BenchArgs, n: usize) -> Result<Vec<Payload>> {
    let mut payloads = prompt_payloads(args, n)?;
    if let Some(format) = response_format(args)? {
        for p in &mut payloads {
            if let Payload::Http(body) = p {
                body["response_format"] = format.clone();
            }
        }
    }
    Ok(payloads)
}

fn prompt_payloads(args: &BenchArgs, n: usize) -> Result<Vec<Payload>> {
    let mut rng = SplitMix64::seed_from_u64(args.seed);
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1)))
            .collect::<Result<_>>()?;
        if lines.is_empty() {
            bail!("{} holds no prompt", path.display());
        }
        return Ok((0..n).map(|i| Payload::Http(lines[i % lines.len()].clone())).collect());
    }
    Ok((0..n)
        .map(|_| {
            let spread = args.input_len_spread.min(args.input_len.saturating_sub(1));
            let len = args.input_len - spread + (rng.next_u64() % (2 * spread as u64 + 1)) as usize;
            if args.coordinator.is_some() || args.token_prompts {
                let ids: Vec<u32> = (0..len).map(|_| (rng.next_u64() % 400) as u32).collect();
                if args.coordinator.is_some() { Payload::Tokens(ids) } else { Payload::Http(json!({ "prompt": ids })) }
            } else {
                let words: Vec<&str> =
                    (0..len).map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]).collect();
                let text = words.join(" ");
                if args.endpoint == ApiEndpoint::Chat {
                    Payload::Http(json!({ "messages": [{ "role": "user", "content": text }] }))
                } else {
                    Payload::Http(json!({ "prompt": text }))
                }
            }
        })
        .collect())
}

async fn run_http(client: &reqwest::Client, args: &BenchArgs, payload: &Value) -> Sample {
    let started = Instant::now();
    let mut sample = Sample::default();
    let base = args.url.as_deref().unwrap_or_default().trim_end_matches('/');
    let path = match args.endpoint {
        ApiEndpoint::Chat => "chat/completions",
        ApiEndpoint::Completions => "completions",
    };
    let mut body = payload.clone();
    body["model"] = json!(args.model);
    body["max_tokens"] = json!(args.output_len);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    body["temperature"] = json!(0);
    if !args.no_ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let mut request = client.post(format!("{base}/{path}")).json(&body);
    if let Some(key) = &args.api_key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(if e.is_connect() { "connect".into() } else { "request".into() });
            return sample;
        }
    };
    let status = response.status();
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        sample.error = Some(http_error(status, &body));
        return sample;
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut last = None;
    let mut chunks = 0u64;
    use tokio_stream::StreamExt;
    while let Some(piece) = stream.next().await {
        let Ok(piece) = piece else {
            sample.error = Some("stream".into());
            break;
        };
        buffer.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                if v.get("error").is_some() {
                    sample.error = Some(match error_message(data.as_bytes()) {
                        Some(message) => format!("server error event: {message}"),
                        None => "server error event".into(),
                    });
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    sample.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    sample.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                }
                let choice = &v["choices"][0];
                let text = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str()).unwrap_or("");
                if !text.is_empty() {
                    let now = Instant::now();
                    chunks += 1;
                    match last {
                        None => sample.ttft = Some(now - started),
                        Some(t) => sample.gaps.push(now - t),
                    }
                    last = Some(now);
                }
            }
        }
    }
    if sample.output_tokens == 0 {
        sample.output_tokens = chunks;
    }
    sample.e2e = started.elapsed();
    sample
}

async fn run_grpc(channel: tonic::transport::Channel, args: &BenchArgs, tokens: &[u32]) -> Sample {
    use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
    use epserve_proto::v1::{GenerateRequest, SamplingParams};
    let started = Instant::now();
    let mut sample = Sample::default();
    let mut client = CoordinatorServiceClient::new(channel);
    let request = GenerateRequest {
        request_id: format!("bench-{}", started.elapsed().as_nanos()),
        prompt_tokens: tokens.to_vec(),
        sampling: Some(SamplingParams {
            temperature: 0.0,
            max_tokens: args.output_len,
            ignore_eos: !args.no_ignore_eos,
            ..Default::default()
        }),
        priority: 0,
        images: Vec::new(),
        constraint: None,
    };
    let mut stream = match client.generate(request).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            sample.error = Some(format!("grpc {:?}", s.code()));
            return sample;
        }
    };
    let mut last = None;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if !event.tokens.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => sample.ttft = Some(now - started),
                        Some(t) => sample.gaps.push(now - t),
                    }
                    last = Some(now);
                    sample.output_tokens += event.tokens.len() as u64;
                }
                if let Some(u) = event.usage {
                    sample.prompt_tokens = u64::from(u.prompt_tokens);
                }
                if event.finish_reason != 0 {
                    if !event.error.is_empty() {
                        sample.error = Some("server error event".into());
                    }
                    break;
                }
            }
            Ok(None) => break,
            Err(s) => {
                sample.error = Some(format!("grpc {:?}", s.code()));
                break;
            }
        }
    }
    sample.e2e = started.elapsed();
    sample
}

/// The connections every request shares: HTTP keep-alive, or one HTTP/2 channel to the coordinator.
#[derive(Clone)]
struct Clients {
    http: reqwest::Client,
    grpc: Option<tonic::transport::Channel>,
}

async fn one(clients: &Clients, args: &BenchArgs, payload: &Payload) -> Sample {
    match (payload, &clients.grpc) {
        (Payload::Tokens(t), Some(channel)) => run_grpc(channel.clone(), args, t).await,
        (Payload::Http(v), None) => run_http(&clients.http, args, v).await,
        _ => Sample { error: Some("prompt kind does not match the target".into()), ..Default::default() },
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.requests == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--requests, --input-len and --output-len must be positive");
    }
    if args.token_prompts && args.endpoint != ApiEndpoint::Completions {
        bail!("--token-prompts needs --endpoint completions");
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of requests per second");
    }
    let concurrency = args.concurrency.unwrap_or(1);
    if concurrency == 0 {
        bail!("--concurrency must be positive");
    }
    let tls = args.tls.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(async {
        let grpc = match &args.coordinator {
            Some(addr) => Some(epserve_tls::channel(
                tonic::transport::Endpoint::from_shared(epserve_proto::server_uri(addr))?.tcp_nodelay(true),
                tls.as_ref(),
            )),
            None => None,
        };
        let client = Clients { http: reqwest::Client::builder().pool_max_idle_per_host(1024).build()?, grpc };
        let mut args = args;
        if let (Some(url), None) = (&args.url, &args.model) {
            let model = served_model(&client.http, url.trim_end_matches('/'), args.api_key.as_deref()).await?;
            tracing::info!("benchmarking model `{model}` (the first the server lists)");
            args.model = Some(model);
        }
        let args = Arc::new(args);
        let all = Arc::new(prompts(&args, args.warmup + args.requests)?);
        for p in all.iter().take(args.warmup) {
            one(&client, &args, p).await;
        }
        let samples = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
        let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ticker = {
            let progress = progress.clone();
            let total = args.requests;
            let show = !args.json || std::io::IsTerminal::is_terminal(&std::io::stderr());
            tokio::spawn(async move {
                loop {
                    let done = progress.load(std::sync::atomic::Ordering::Relaxed);
                    if show {
                        let bar = "#".repeat(done * 30 / total.max(1));
                        eprint!("\r[{bar:<30}] {done}/{total}");
                    }
                    if done >= total {
                        if show {
                            eprintln!();
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let started = Instant::now();
        let mut tasks = Vec::new();
        match args.rate {
            Some(rate) => {
                // Open loop: exponential gaps; each request starts on schedule in its own task.
                let mut rng = SplitMix64::seed_from_u64(args.seed ^ 0x5eed);
                let mut at = Duration::ZERO;
                for i in 0..args.requests {
                    let gap = -((1.0 - f64::from(epserve_synthetic::uniform(&mut rng))).max(1e-12)).ln() / rate;
                    at += Duration::from_secs_f64(gap);
                    let (client, args, all, samples, progress) =
                        (client.clone(), args.clone(), all.clone(), samples.clone(), progress.clone());
                    tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
                    tasks.push(tokio::spawn(async move {
                        let s = one(&client, &args, &all[args.warmup + i]).await;
                        samples.lock().await.push(s);
                        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }));
                }
            }
            None => {
                let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                for _ in 0..concurrency {
                    let (client, args, all, samples, progress, next) =
                        (client.clone(), args.clone(), all.clone(), samples.clone(), progress.clone(), next.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= args.requests {
                                break;
                            }
                            let s = one(&client, &args, &all[args.warmup + i]).await;
                            samples.lock().await.push(s);
                            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }));
                }
            }
        }
        for t in tasks {
            t.await?;
        }
        let wall = started.elapsed();
        let _ = ticker.await;
        let samples = samples.lock().await.clone();
        anyhow::Ok(report(&args, &samples, wall))
    })?;
    if report["requests_ok"].as_u64() == Some(0) {
        eprintln!("{}", serde_json::to_string_pretty(&report)?);
        bail!("every request failed");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn report(args: &BenchArgs, samples: &[Sample], wall: Duration) -> Value {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for s in samples.iter().filter_map(|s| s.error.as_ref()) {
        *errors.entry(s.clone()).or_default() += 1;
    }
    let output: u64 = ok.iter().map(|s| s.output_tokens).sum();
    let secs = wall.as_secs_f64();
    json!({
        "target": args.url.clone().or_else(|| args.coordinator.as_ref().map(|c| format!("grpc://{c}"))),
        "mode": if args.rate.is_some() { "open-loop" } else { "closed-loop" },
        "concurrency": args.rate.is_none().then_some(args.concurrency.unwrap_or(1)),
        "rate": args.rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "requests": samples.len(),
        "requests_ok": ok.len(),
        "errors": errors,
        "duration_s": secs,
        "prompt_tokens": ok.iter().map(|s| s.prompt_tokens).sum::<u64>(),
        "output_tokens": output,
        "output_tokens_per_s": output as f64 / secs,
        "requests_per_s": ok.len() as f64 / secs,
        "ttft": summary(ok.iter().filter_map(|s| s.ttft).collect()),
        "itl": summary(ok.iter().flat_map(|s| s.gaps.iter().copied()).collect()),
        "e2e": summary(ok.iter().map(|s| s.e2e).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_on_known_samples() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect::<Vec<_>>();
        let v = summary(ms(&[40, 10, 30, 20]));
        assert_eq!(v["p50_ms"], 20.0);
        assert_eq!(v["max_ms"], 40.0);
        assert_eq!(v["mean_ms"], 25.0);
        assert!(summary(Vec::new())["p50_ms"].is_null());
    }

    #[test]
    fn failed_requests_carry_the_servers_message() {
        let body = br#"{"error":{"message":"The model `x` does not exist.","type":"invalid_request_error"}}"#;
        assert_eq!(http_error(reqwest::StatusCode::NOT_FOUND, body), "http 404: The model `x` does not exist.");
        assert_eq!(http_error(reqwest::StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>"), "http 502");
    }
}
