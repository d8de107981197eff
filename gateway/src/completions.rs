//! `/v1/chat/completions` and `/v1/completions`: a tokenized prompt goes to a coordinator, tokens come
//! back, text goes out — whole, or as server-sent events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use epserve_proto::v1::{self as pb, FinishReason, GenerateRequest, TokenEvent};
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;

use crate::errors::ApiError;
use crate::openai::Sampling;
use crate::routing::{Generation, RouteError};
use crate::server::AppState;
use crate::text::StopMatcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// A request ready to send: the prompt's tokens and what to do with the answer.
#[derive(Debug)]
pub struct Prepared {
    pub kind: Kind,
    pub model: String,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
    /// Which body field the prompt came from, for errors.
    pub prompt_param: &'static str,
    /// Carried to the coordinator, so that both logs name the request the same way.
    pub request_id: String,
}

/// The OpenAI-style id of a response (`chatcmpl-…`, `cmpl-…`).
fn response_id(kind: Kind) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{:06x}", t as u64 & 0xffff_ffff_ffff, n & 0xff_ffff)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_name(reason: i32) -> &'static str {
    if reason == FinishReason::Length as i32 { "length" } else { "stop" }
}

/// Turns coordinator events into text, logprobs and a finish reason, applying stop strings.
struct Assembler<'a> {
    state: &'a AppState,
    decoder: crate::text::Detokenizer<'a>,
    stops: StopMatcher,
    kind: Kind,
    logprobs: bool,
    completion_tokens: u32,
}

/// What one coordinator event adds to the answer.
#[derive(Default)]
struct Piece {
    text: String,
    logprobs: Vec<Value>,
    /// Some when the answer ends with this event.
    finish: Option<&'static str>,
    error: Option<String>,
    /// The error is the cluster's temporary state (503), not a failure of this request (500).
    unavailable: bool,
}

impl Piece {
    fn error_response(&self) -> Option<ApiError> {
        let error = self.error.as_ref()?;
        Some(if self.unavailable {
            ApiError::unavailable(format!("generation stopped, the cluster cannot serve it now: {error}"))
        } else {
            ApiError::internal(format!("generation failed: {error}"))
        })
    }
}

impl<'a> Assembler<'a> {
    fn new(state: &'a AppState, kind: Kind, sampling: &Sampling) -> Self {
        Assembler {
            state,
            decoder: state.text.decoder(),
            stops: StopMatcher::new(sampling.stop.clone()),
            kind,
            logprobs: sampling.logprobs.is_some(),
            completion_tokens: 0,
        }
    }

    fn logprob_entry(&self, token: &pb::Token) -> Value {
        let text = self.state.text.token_text(token.id);
        match self.kind {
            Kind::Chat => json!({
                "token": text,
                "logprob": token.logprob.unwrap_or(f32::NEG_INFINITY),
                "bytes": text.as_bytes(),
                "top_logprobs": token.top_logprobs.iter().map(|t| {
                    let s = self.state.text.token_text(t.token);
                    json!({ "token": s, "logprob": t.logprob, "bytes": s.as_bytes() })
                }).collect::<Vec<_>>(),
            }),
            Kind::Text => json!({
                "token": text,
                "logprob": token.logprob.unwrap_or(f32::NEG_INFINITY),
                "top": token.top_logprobs.iter().map(|t| (self.state.text.token_text(t.token), t.logprob)).collect::<Vec<_>>(),
            }),
        }
    }

    fn push(&mut self, event: &TokenEvent) -> Piece {
        let mut piece = Piece::default();
        for token in &event.tokens {
            self.completion_tokens += 1;
            if self.logprobs {
                piece.logprobs.push(self.logprob_entry(token));
            }
            let out = self.stops.push(&self.decoder.push(token.id));
            piece.text.push_str(&out.emit);
            if out.stopped {
                piece.finish = Some("stop");
                return piece;
            }
        }
        if event.finish_reason != 0 {
            if event.finish_reason == FinishReason::Error as i32 {
                piece.error = Some(event.error.clone());
                piece.unavailable = event.unavailable;
            }
            piece.text.push_str(&self.stops.finish());
            piece.finish = Some(finish_name(event.finish_reason));
        }
        piece
    }
}

fn legacy_logprobs(entries: &[Value]) -> Value {
    let tokens: Vec<&Value> = entries.iter().map(|e| &e["token"]).collect();
    let lps: Vec<&Value> = entries.iter().map(|e| &e["logprob"]).collect();
    let tops: Vec<Value> = entries
        .iter()
        .map(|e| {
            let map: serde_json::Map<String, Value> = e["top"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].clone()))).collect())
                .unwrap_or_default();
            Value::Object(map)
        })
        .collect();
    json!({ "tokens": tokens, "token_logprobs": lps, "top_logprobs": tops })
}

fn usage(prompt: usize, completion: u32) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt as u32 + completion })
}

pub async fn run(state: Arc<AppState>, p: Prepared, permit: OwnedSemaphorePermit) -> Response {
    if p.prompt.is_empty() {
        return ApiError::invalid_param(p.prompt_param, "The prompt is empty.").into_response();
    }
    if let Some(&bad) = p.prompt.iter().find(|&&t| t as usize >= state.text.vocab_size()) {
        return ApiError::invalid_param(p.prompt_param, format!("Token id {bad} is outside the vocabulary."))
            .into_response();
    }
    let limit = state.pool.max_model_len();
    if let Some(limit) = limit
        && p.prompt.len() >= limit as usize
    {
        return ApiError::invalid_param(
            p.prompt_param,
            format!(
                "This model's maximum context length is {limit} tokens. However, your prompt is {} tokens.",
                p.prompt.len()
            ),
        )
        .into_response();
    }
    let max_tokens = p.sampling.max_tokens.unwrap_or_else(|| limit.map_or(4096, |l| l - p.prompt.len() as u32));
    let s = &p.sampling;
    let request = GenerateRequest {
        request_id: p.request_id.clone(),
        prompt_tokens: p.prompt.clone(),
        sampling: Some(pb::SamplingParams {
            temperature: s.temperature,
            top_p: Some(s.top_p),
            top_k: s.top_k,
            min_p: s.min_p,
            seed: s.seed,
            repetition_penalty: Some(s.repetition_penalty),
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: s.ignore_eos,
            logprobs: s.logprobs,
        }),
        priority: 0,
    };
    let id = response_id(p.kind);
    let generation = match state.pool.generate(request).await {
        Ok(g) => g,
        Err(RouteError::Rejected(m)) => return ApiError::invalid(None, m).into_response(),
        Err(RouteError::Unavailable(m)) => {
            return ApiError::unavailable(format!("No coordinator can serve the request: {m}")).into_response();
        }
    };
    if p.stream {
        stream(state, p, generation, id, permit)
    } else {
        let response = whole(&state, &p, generation, &id).await;
        drop(permit);
        response
    }
}

async fn whole(state: &AppState, p: &Prepared, mut generation: Generation, id: &str) -> Response {
    let mut asm = Assembler::new(state, p.kind, &p.sampling);
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut event = Some(generation.first.clone());
    let finish = loop {
        let Some(e) = event.take() else {
            return ApiError::internal("the coordinator ended the stream without a finish reason").into_response();
        };
        let piece = asm.push(&e);
        text.push_str(&piece.text);
        if let Some(err) = piece.error_response() {
            return err.into_response();
        }
        logprobs.extend(piece.logprobs);
        if let Some(f) = piece.finish {
            break f;
        }
        event = match generation.rest.message().await {
            Ok(e) => e,
            Err(status) => {
                return ApiError::internal(format!("the coordinator failed: {}", status.message())).into_response();
            }
        };
    };
    let usage = usage(p.prompt.len(), asm.completion_tokens);
    let body = match p.kind {
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": now(), "model": p.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": p.sampling.logprobs.map(|_| json!({ "content": logprobs })),
                "finish_reason": finish,
            }],
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": now(), "model": p.model,
            "choices": [{
                "index": 0, "text": text, "finish_reason": finish,
                "logprobs": p.sampling.logprobs.map(|_| legacy_logprobs(&logprobs)),
            }],
            "usage": usage,
        }),
    };
    Json(body).into_response()
}

fn chunk(p: &Prepared, id: &str, created: u64, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
    match p.kind {
        Kind::Chat => json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": p.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }],
        }),
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": created, "model": p.model,
            "choices": [{ "index": 0, "text": delta["content"].as_str().unwrap_or_default(), "logprobs": logprobs, "finish_reason": finish }],
        }),
    }
}

fn stream(
    state: Arc<AppState>,
    p: Prepared,
    mut generation: Generation,
    id: String,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let created = now();
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if p.kind == Kind::Chat
            && !send(chunk(&p, &id, created, json!({ "role": "assistant", "content": "" }), None, None)).await
        {
            return;
        }
        let mut asm = Assembler::new(&state, p.kind, &p.sampling);
        let mut event = Some(generation.first.clone());
        while let Some(e) = event.take() {
            let piece = asm.push(&e);
            if let Some(err) = piece.error_response() {
                let _ = send(err.body()).await;
                break;
            }
            let logprobs = (!piece.logprobs.is_empty()).then(|| match p.kind {
                Kind::Chat => json!({ "content": piece.logprobs }),
                Kind::Text => legacy_logprobs(&piece.logprobs),
            });
            if (!piece.text.is_empty() || logprobs.is_some())
                && !send(chunk(&p, &id, created, json!({ "content": piece.text }), logprobs, None)).await
            {
                return; // The client went away: dropping the stream cancels the request.
            }
            if let Some(f) = piece.finish {
                if !send(chunk(&p, &id, created, json!({}), None, Some(f))).await {
                    return;
                }
                if p.include_usage {
                    let mut u = chunk(&p, &id, created, json!({}), None, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(p.prompt.len(), asm.completion_tokens);
                    let _ = send(u).await;
                }
                break;
            }
            event = match generation.rest.message().await {
                Ok(e) => e,
                Err(status) => {
                    let _ =
                        send(ApiError::internal(format!("the coordinator failed: {}", status.message())).body()).await;
                    break;
                }
            };
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}
