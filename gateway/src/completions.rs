//! `/v1/chat/completions` and `/v1/completions`: a tokenized prompt goes to a coordinator, tokens come
//! back, text goes out — whole, or as server-sent events ending with `data: [DONE]`. A request that may
//! call tools has its answer read back as calls ([`crate::tool_calls`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use epserve_proto::metric_names as m;
use epserve_proto::v1::{self as pb, GenerateRequest, TokenEvent};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;

use crate::errors::ApiError;
use crate::openai::GenerationOptions;
use crate::openai::request::Role;
use crate::openai::response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, FinishReason, FunctionCallDelta, TokenLogprob, ToolCall,
    ToolCallDelta, Usage,
};
use crate::routing::{Generation, RouteError};
use crate::server::AppState;
use crate::text::StopMatcher;
use crate::tool_calls::ToolCallStream;

/// Which OpenAI API a request came through; it decides the shape of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionApi {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`, the legacy text API.
    Text,
}

/// A request ready to send: the prompt's tokens and what to do with the answer.
#[derive(Debug)]
pub struct Prepared {
    pub api: CompletionApi,
    pub model: String,
    /// With images expanded: what `usage.prompt_tokens` counts.
    pub prompt: Vec<u32>,
    /// The prompt's images in order, for the coordinator's vision encoder.
    pub images: Vec<pb::ImageTiles>,
    pub options: GenerationOptions,
    /// Which body field the prompt came from, for errors.
    pub prompt_param: &'static str,
    /// Carried to the coordinator, so that both logs name the request the same way.
    pub request_id: String,
    /// The grammar the output follows (already compiled once here: it is valid).
    pub constraint: Option<pb::Constraint>,
    /// The engines' scheduling class: 0 for interactive requests, [`crate::batch::BATCH_PRIORITY`]
    /// for batch lines.
    pub priority: i32,
}

/// The OpenAI-style id of a response (`chatcmpl-…`, `cmpl-…`).
fn response_id(api: CompletionApi) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let prefix = match api {
        CompletionApi::Chat => "chatcmpl",
        CompletionApi::Text => "cmpl",
    };
    format!("{prefix}-{:x}{:06x}", t as u64 & 0xffff_ffff_ffff, n & 0xff_ffff)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_reason(reason: i32) -> FinishReason {
    if reason == pb::FinishReason::Length as i32 { FinishReason::Length } else { FinishReason::Stop }
}

/// Turns coordinator events into text, logprobs and a finish reason, applying stop strings.
struct Assembler<'a> {
    state: &'a AppState,
    decoder: crate::text::Detokenizer<'a>,
    stops: StopMatcher,
    logprobs: bool,
    completion_tokens: u32,
}

/// What one coordinator event adds to the answer.
#[derive(Default)]
struct Piece {
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Some when the answer ends with this event.
    finish: Option<FinishReason>,
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
    fn new(state: &'a AppState, options: &GenerationOptions) -> Self {
        Assembler {
            state,
            decoder: state.text.decoder(),
            stops: StopMatcher::new(options.sampling.stop.clone()),
            logprobs: options.sampling.logprobs.is_some(),
            completion_tokens: 0,
        }
    }

    fn logprob(&self, token: &pb::Token) -> TokenLogprob {
        let text = &self.state.text;
        TokenLogprob {
            token: text.token_text(token.id),
            logprob: token.logprob,
            top: token.top_logprobs.iter().map(|t| (text.token_text(t.token), t.logprob)).collect(),
        }
    }

    fn push(&mut self, event: &TokenEvent) -> Piece {
        let mut piece = Piece::default();
        for token in &event.tokens {
            self.completion_tokens += 1;
            if self.logprobs {
                piece.logprobs.push(self.logprob(token));
            }
            let out = self.stops.push(&self.decoder.push(token.id));
            piece.text.push_str(&out.emit);
            if out.stopped {
                piece.finish = Some(FinishReason::Stop);
                return piece;
            }
        }
        if event.finish_reason != 0 {
            if event.finish_reason == pb::FinishReason::Error as i32 {
                piece.error = Some(event.error.clone());
                piece.unavailable = event.unavailable;
            }
            piece.text.push_str(&self.stops.finish());
            piece.finish = Some(finish_reason(event.finish_reason));
        }
        piece
    }
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
    let s = &p.options.sampling;
    let max_tokens = s.max_tokens.unwrap_or_else(|| limit.map_or(4096, |l| l - p.prompt.len() as u32));
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
        priority: p.priority,
        images: p.images.clone(),
        constraint: p.constraint.clone(),
    };
    let id = response_id(p.api);
    let generation = match state.pool.generate(request).await {
        Ok(g) => g,
        Err(RouteError::Rejected(m)) => return ApiError::invalid(None, m).into_response(),
        Err(RouteError::Unavailable(m)) => {
            return ApiError::unavailable(format!("No coordinator can serve the request: {m}")).into_response();
        }
        Err(RouteError::Busy(m)) => {
            return ApiError::queues_full(format!("Every coordinator's queue is full; retry shortly: {m}"))
                .into_response();
        }
    };
    if p.options.stream {
        stream(state, p, generation, id, permit)
    } else {
        let response = whole(&state, &p, generation, &id).await;
        drop(permit);
        response
    }
}

fn usage(p: &Prepared, completion_tokens: u32) -> Usage {
    Usage::new(p.prompt.len() as u32, completion_tokens)
}

async fn whole(state: &AppState, p: &Prepared, mut generation: Generation, id: &str) -> Response {
    let mut asm = Assembler::new(state, &p.options);
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut event = Some(std::mem::take(&mut generation.first));
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
    let usage = usage(p, asm.completion_tokens);
    let logprobs = p.options.sampling.logprobs.map(|_| logprobs);
    match p.api {
        CompletionApi::Chat => {
            let calls =
                p.options.structured.tools.as_ref().and_then(|plan| crate::tool_calls::tool_calls(&text, plan, id));
            let message = match calls {
                Some(calls) => AssistantMessage { role: Role::Assistant, content: None, tool_calls: Some(calls) },
                None => AssistantMessage { role: Role::Assistant, content: Some(text), tool_calls: None },
            };
            let finish = if message.tool_calls.is_some() { FinishReason::ToolCalls } else { finish };
            let choice =
                ChatChoice { index: 0, message, logprobs: logprobs.map(ChatLogprobs::from), finish_reason: finish };
            Json(ChatCompletion::new(id, now(), &p.model, choice, usage)).into_response()
        }
        CompletionApi::Text => {
            let choice = CompletionChoice {
                index: 0,
                text: &text,
                logprobs: logprobs.map(CompletionLogprobs::from),
                finish_reason: Some(finish),
            };
            Json(Completion::new(id, now(), &p.model, choice, Some(usage))).into_response()
        }
    }
}

/// An SSE event whose data is `value` as JSON, serialised once, straight into the event.
fn json_event(value: &impl Serialize) -> SseEvent {
    SseEvent::default().json_data(value).unwrap_or_else(|e| {
        let error = ApiError::internal(format!("serialising a stream chunk: {e}"));
        // An error body has only strings: it serialises.
        SseEvent::default().data(serde_json::to_string(&error.body()).unwrap_or_default())
    })
}

/// The stream events of one API, borrowing what they repeat from the request.
struct ChunkWriter<'a> {
    api: CompletionApi,
    id: &'a str,
    created: u64,
    model: &'a str,
}

impl ChunkWriter<'_> {
    /// The chat API opens with the assistant's role; the text API has no opening chunk.
    fn opening(&self) -> Option<SseEvent> {
        let delta = ChatDelta { role: Some(Role::Assistant), content: Some(""), tool_calls: None };
        (self.api == CompletionApi::Chat).then(|| self.chat(delta, None, None))
    }

    fn content(&self, text: &str, logprobs: Vec<TokenLogprob>) -> SseEvent {
        let logprobs = (!logprobs.is_empty()).then_some(logprobs);
        match self.api {
            CompletionApi::Chat => {
                let delta = ChatDelta { role: None, content: Some(text), tool_calls: None };
                self.chat(delta, logprobs.map(ChatLogprobs::from), None)
            }
            CompletionApi::Text => self.text(text, logprobs.map(CompletionLogprobs::from), None),
        }
    }

    /// A call as two deltas, as OpenAI streams them: its id, type and name with empty arguments,
    /// then its arguments.
    fn tool_call(&self, index: u32, call: &ToolCall) -> [SseEvent; 2] {
        let delta = |id, kind, name, arguments| ChatDelta {
            role: None,
            content: None,
            tool_calls: Some(vec![ToolCallDelta { index, id, kind, function: FunctionCallDelta { name, arguments } }]),
        };
        let head = delta(Some(call.id.as_str()), Some(call.kind), Some(call.function.name.as_str()), "");
        let arguments = delta(None, None, None, call.function.arguments.as_str());
        [self.chat(head, None, None), self.chat(arguments, None, None)]
    }

    fn finish(&self, reason: FinishReason) -> SseEvent {
        match self.api {
            CompletionApi::Chat => self.chat(ChatDelta::default(), None, Some(reason)),
            CompletionApi::Text => self.text("", None, Some(reason)),
        }
    }

    fn usage(&self, usage: Usage) -> SseEvent {
        match self.api {
            CompletionApi::Chat => json_event(&ChatCompletionChunk::usage(self.id, self.created, self.model, usage)),
            CompletionApi::Text => json_event(&Completion::usage(self.id, self.created, self.model, usage)),
        }
    }

    fn chat(&self, delta: ChatDelta<'_>, logprobs: Option<ChatLogprobs>, finish: Option<FinishReason>) -> SseEvent {
        let choice = ChatChunkChoice { index: 0, delta, logprobs, finish_reason: finish };
        json_event(&ChatCompletionChunk::new(self.id, self.created, self.model, choice))
    }

    fn text(&self, text: &str, logprobs: Option<CompletionLogprobs>, finish: Option<FinishReason>) -> SseEvent {
        let choice = CompletionChoice { index: 0, text, logprobs, finish_reason: finish };
        json_event(&Completion::new(self.id, self.created, self.model, choice, None))
    }
}

/// Why a stream was given up before its end; the `reason` label of
/// `epserve_http_streams_cancelled_total`.
#[derive(Debug, Clone, Copy)]
enum Cancelled {
    Disconnected,
    /// The client read nothing for `--stream-stall-timeout-ms` while an event waited.
    Stalled,
}

impl Cancelled {
    fn count(self) {
        let reason = match self {
            Cancelled::Disconnected => "disconnected",
            Cancelled::Stalled => "stalled",
        };
        metrics::counter!(m::HTTP_STREAMS_CANCELLED_TOTAL, "reason" => reason).increment(1);
        tracing::info!(reason, "stream cancelled");
    }
}

/// Events go to the response body through a small channel: when the client stops reading, the
/// socket's buffers fill, the body is no longer polled, and a send waits; one that waits longer than
/// the stall timeout gives the stream up. Returning drops the coordinator's stream (HTTP/2
/// RST_STREAM), which cancels the generation there and frees its KV blocks at its next step.
fn stream(
    state: Arc<AppState>,
    p: Prepared,
    mut generation: Generation,
    id: String,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let stall = state.edge.stream_stall_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        let chunks = ChunkWriter { api: p.api, id: &id, created: now(), model: &p.model };
        let send = |event: SseEvent| {
            let tx = tx.clone();
            async move {
                match tokio::time::timeout(stall, tx.send(Ok(event))).await {
                    Ok(Ok(())) => true,
                    Ok(Err(_)) => {
                        Cancelled::Disconnected.count();
                        false
                    }
                    Err(_) => {
                        Cancelled::Stalled.count();
                        false
                    }
                }
            }
        };
        if let Some(opening) = chunks.opening()
            && !send(opening).await
        {
            return;
        }
        let mut asm = Assembler::new(&state, &p.options);
        let tools = p.options.structured.tools.as_ref().filter(|_| p.api == CompletionApi::Chat);
        let mut calls = tools.map(ToolCallStream::new);
        let mut event = Some(std::mem::take(&mut generation.first));
        while let Some(e) = event.take() {
            let mut piece = asm.push(&e);
            if let Some(err) = piece.error_response() {
                let _ = send(json_event(&err.body())).await;
                break;
            }
            if let Some(calls) = &mut calls {
                piece.text = calls.push(&piece.text);
            }
            if (!piece.text.is_empty() || !piece.logprobs.is_empty())
                && !send(chunks.content(&piece.text, piece.logprobs)).await
            {
                return; // The client went away: dropping the stream cancels the request.
            }
            if let Some(mut f) = piece.finish {
                if let (Some(calls), Some(plan)) = (calls.take(), tools) {
                    let events = match calls.finish(plan, &id) {
                        Ok(calls) => {
                            f = FinishReason::ToolCalls;
                            calls.iter().zip(0..).flat_map(|(call, i)| chunks.tool_call(i, call)).collect()
                        }
                        Err(text) if text.is_empty() => Vec::new(),
                        Err(text) => vec![chunks.content(&text, Vec::new())],
                    };
                    for event in events {
                        if !send(event).await {
                            return;
                        }
                    }
                }
                if !send(chunks.finish(f)).await {
                    return;
                }
                if p.options.include_usage {
                    let _ = send(chunks.usage(usage(&p, asm.completion_tokens))).await;
                }
                break;
            }
            // A client that goes away between tokens is noticed now, not at the next token.
            let next = tokio::select! {
                next = generation.rest.message() => next,
                () = tx.closed() => {
                    Cancelled::Disconnected.count();
                    return;
                }
            };
            event = match next {
                Ok(e) => e,
                Err(status) => {
                    let error = ApiError::internal(format!("the coordinator failed: {}", status.message()));
                    let _ = send(json_event(&error.body())).await;
                    break;
                }
            };
        }
        let _ = send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}
