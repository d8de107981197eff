//! The HTTP server: routes, API-key auth, per-client limits, body and field limits, the in-flight
//! limit, CORS, and the probes. Tokenizing and templating run on the blocking pool, a bounded number
//! at once, never on the IO threads.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use epserve_grammar::GrammarCompiler;
use epserve_proto::metric_names as m;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::completions::{self, CompletionApi, Prepared};
use crate::constraints;
use crate::edge::rate_limit::{KeySlot, Refusal};
use crate::edge::{EdgeConfig, KeyLimiter};
use crate::errors::ApiError;
use crate::images::ImageInput;
use crate::openai::response::ModelList;
use crate::openai::{
    self, ChatCompletionRequest, CompletionPrompt, CompletionRequest, ValidatedChat, ValidatedCompletion,
};
use crate::routing::CoordinatorPool;
use crate::text::TextCodec;

#[derive(Debug)]
pub struct AppState {
    pub text: TextCodec,
    /// Image parts of chat requests: limits, the checkpoint's vision settings, URL fetching.
    pub images: ImageInput,
    pub pool: Arc<CoordinatorPool>,
    /// The name clients use in `model`.
    pub model_name: String,
    /// Accepted bearer keys; empty = no authentication.
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub in_flight: Arc<Semaphore>,
    pub metrics: Option<PrometheusHandle>,
    pub started: u64,
    /// Checks grammars (`response_format`, required tool calls) before they are sent; `None`: they
    /// are sent unchecked, and the coordinator refuses a bad one.
    pub grammars: Option<Arc<GrammarCompiler>>,
    /// Timeouts and limits of the HTTP edge.
    pub edge: EdgeConfig,
    /// Per-client rate and concurrency, as `edge.keys` says.
    pub clients: KeyLimiter,
    /// Tokenizing and templating jobs on the blocking pool at once (one per core): a burst of large
    /// prompts queues here instead of taking every blocking thread.
    pub text_jobs: Arc<Semaphore>,
    /// The Files and Batches API's data directory; `None`: those routes answer 503.
    pub batches: Option<Arc<crate::batch::Batches>>,
}

impl AppState {
    pub fn new(text: TextCodec, pool: Arc<CoordinatorPool>, model_name: String) -> Self {
        AppState {
            text,
            images: ImageInput::text_only(),
            pool,
            model_name,
            api_keys: Vec::new(),
            max_body_bytes: 8 << 20,
            max_in_flight: 1024,
            in_flight: Arc::new(Semaphore::new(1024)),
            metrics: None,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            grammars: None,
            edge: EdgeConfig::default(),
            clients: KeyLimiter::new(Default::default()),
            text_jobs: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))),
            batches: None,
        }
    }

    /// Applies the HTTP edge's limits (default: [`EdgeConfig::default`]).
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.clients = KeyLimiter::new(edge.keys);
        self.edge = edge;
        self
    }

    /// Runs CPU-bound text work (tokenizing, templating) on the blocking pool, at most
    /// `text_jobs` at once.
    async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&AppState) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self.text_jobs.acquire().await.map_err(|_| ApiError::unavailable("the gateway is stopping"))?;
        let state = self.clone();
        tokio::task::spawn_blocking(move || job(&state))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))
    }

    /// Checks grammars with `grammars` before sending them.
    pub fn with_grammars(mut self, grammars: Arc<GrammarCompiler>) -> Self {
        self.grammars = Some(grammars);
        self
    }

    pub fn with_limits(mut self, api_keys: Vec<String>, max_body_bytes: usize, max_in_flight: usize) -> Self {
        self.api_keys = api_keys;
        self.max_body_bytes = max_body_bytes;
        self.max_in_flight = max_in_flight;
        self.in_flight = Arc::new(Semaphore::new(max_in_flight));
        self
    }

    /// Accepts images as `images` says (default: a text-only model, every image part refused).
    pub fn with_images(mut self, images: ImageInput) -> Self {
        self.images = images;
        self
    }

    /// A request must name the model this gateway serves (OpenAI answers 404 for any other).
    pub(crate) fn require_served_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name { Ok(()) } else { Err(ApiError::model_not_found(model, &self.model_name)) }
    }
}

/// The body of `/health` and `/ready`.
#[derive(Debug, Serialize)]
struct ProbeStatus {
    status: &'static str,
}

pub fn router(state: Arc<AppState>) -> Router {
    let completions = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_per_client));
    // Route layers wrap the routes added before them: authentication runs first, then the limits.
    let api = Router::new()
        .merge(completions)
        .route("/v1/models", get(models))
        .merge(batch_routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let cors = crate::edge::cors(&state.edge.cors_origins);
    let router = Router::new()
        .merge(api)
        .route("/health", get(|| async { Json(ProbeStatus { status: "ok" }) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found_route() })
        .layer(middleware::from_fn(observe))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state);
    // Outermost, so that a preflight is answered before authentication (browsers send no key with it).
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The Files and Batches API ([`crate::batch`]), authenticated like the completion routes.
fn batch_routes() -> Router<Arc<AppState>> {
    use crate::batch::{batches_api, files_api};
    Router::new()
        .route("/v1/files", post(files_api::upload).get(files_api::list))
        .route("/v1/files/{id}", get(files_api::retrieve).delete(files_api::delete))
        .route("/v1/files/{id}/content", get(files_api::content))
        .route("/v1/batches", post(batches_api::create).get(batches_api::list))
        .route("/v1/batches/{id}", get(batches_api::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches_api::cancel))
}

/// The id that follows a request through the gateway's and the coordinator's logs: the client's
/// `x-request-id` when it sent a sane one, else a fresh one. Echoed in the response.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn request_id(request: &Request) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let given = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).filter(|v| {
        !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    });
    match given {
        Some(v) => v.to_owned(),
        None => {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
            format!("req-{:x}-{:x}", t, NEXT.fetch_add(1, Ordering::Relaxed))
        }
    }
}

/// One span (with the request id) and two metrics per request.
async fn observe(mut request: Request, next: Next) -> Response {
    const ROUTES: [&str; 6] =
        ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"];
    let path = request.uri().path();
    let route: &'static str = match ROUTES.iter().find(|r| **r == path) {
        Some(route) => route,
        // Ids in the path are not label values: one label per API.
        None if path.starts_with("/v1/files") => "/v1/files",
        None if path.starts_with("/v1/batches") => "/v1/batches",
        None => "other",
    };
    let id = request_id(&request);
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("http", method = %request.method(), route, request_id = %id);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(request).await;
    }
    match bearer(request.headers()) {
        Some(key) if state.api_keys.iter().any(|k| same_secret(k, key)) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Who a request counts against for the per-client limits: its API key (by position in the list, so
/// the limiter holds no secrets), or its address when the gateway has no keys.
fn client_of(state: &AppState, request: &Request) -> String {
    if !state.api_keys.is_empty() {
        let presented = bearer(request.headers()).unwrap_or("");
        if let Some(i) = state.api_keys.iter().position(|k| same_secret(k, presented)) {
            return format!("key-{i}");
        }
    }
    crate::edge::connections::peer(request).map_or_else(|| "unknown".to_owned(), |addr| addr.ip().to_string())
}

/// The per-client rate and concurrency limits of the completion routes. An admitted request counts
/// against its client's concurrency until its response ends: a stream's body holds the slot.
async fn limit_per_client(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let client = client_of(&state, &request);
    let slot = match state.clients.admit(&client) {
        Ok(slot) => slot,
        Err(refusal) => {
            metrics::counter!(m::HTTP_RATE_LIMITED_TOTAL, "limit" => refusal.label()).increment(1);
            return refused(refusal, &state).into_response();
        }
    };
    let response = next.run(request).await;
    match slot {
        Some(slot) if axum::body::HttpBody::size_hint(response.body()).exact().is_none() => {
            response.map(|body| hold_until_streamed(body, slot))
        }
        _ => response,
    }
}

fn refused(refusal: Refusal, state: &AppState) -> ApiError {
    let limits = state.clients.limits();
    match refusal {
        Refusal::Rate { retry_after } => ApiError::rate_limited(
            format!("Rate limit reached: {} requests per minute; retry later.", limits.requests_per_minute),
            retry_after.as_secs_f64().ceil() as u64,
        ),
        Refusal::Concurrency => ApiError::rate_limited(
            format!(
                "Concurrency limit reached: {} requests in flight per client; retry shortly.",
                limits.max_concurrent
            ),
            1,
        ),
    }
}

/// `body`, holding `slot` until the body is dropped (sent whole, or the client went away).
fn hold_until_streamed(body: Body, slot: KeySlot) -> Body {
    use futures_util::StreamExt;
    Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _ = &slot;
        chunk
    }))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares two keys in time that depends only on their length, not on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a body declared JSON (`application/json`, any parameters) of at most `--max-body-bytes`,
/// arriving within `--body-timeout-ms`, and deserialises it (axum's `Json` extractor would answer a wrong type in plain text, not in
/// OpenAI's error JSON).
pub(crate) async fn read_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::not_json(content_type));
    }
    let timeout = state.edge.body_timeout;
    let bytes = tokio::time::timeout(timeout, axum::body::to_bytes(body, state.max_body_bytes))
        .await
        .map_err(|_| ApiError::body_timeout(timeout))?
        .map_err(|_| ApiError::too_large(state.max_body_bytes))?;
    openai::parse_body(&bytes)
}

async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let prepared = async {
        let r = ValidatedChat::try_from(read_request::<ChatCompletionRequest>(&state, &headers, body).await?)?;
        prepare_chat(&state, id.0, r).await
    };
    dispatch(state.clone(), prepared.await).await
}

/// A chat request as the endpoint checks and tokenizes it: the one path of direct requests and
/// batch lines ([`crate::batch`]), so that both are refused and answered alike.
pub(crate) async fn prepare_chat(
    state: &Arc<AppState>,
    request_id: String,
    mut r: ValidatedChat,
) -> Result<Prepared, ApiError> {
    state.require_served_model(&r.model)?;
    state.edge.requests.check_chat(&r)?;
    // Cheap checks first: image parts and the template, then the images' I/O and decoding.
    let requested = state.images.take_parts(&mut r.messages)?;
    let (messages, tools) = (std::mem::take(&mut r.messages), r.options.structured.tools.take());
    let (chat, messages, tools) = state
        .off_runtime(move |state| {
            let definitions = tools.as_ref().map(|t| t.definitions.as_slice());
            (state.text.encode_chat_with_tools(&messages, definitions), messages, tools)
        })
        .await?;
    (r.messages, r.options.structured.tools) = (messages, tools);
    let chat = chat.map_err(|e| ApiError::invalid_param("messages", format!("{e:#}")))?;
    let constraint = constraints::constraint(state.grammars.as_ref(), &r.options.structured).await?;
    let loaded = state.images.load(requested).await?;
    let (prompt, images) = state.images.expand(&chat.ids, &chat.image_placeholders, loaded, &r.messages)?;
    Ok(Prepared {
        api: CompletionApi::Chat,
        model: r.model,
        prompt,
        images,
        options: r.options,
        prompt_param: "messages",
        request_id,
        constraint,
        priority: 0,
    })
}

async fn completion(
    State(state): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let prepared = async {
        let r = ValidatedCompletion::try_from(read_request::<CompletionRequest>(&state, &headers, body).await?)?;
        prepare_completion(&state, id.0, r).await
    };
    dispatch(state.clone(), prepared.await).await
}

/// A text completion request as the endpoint checks and tokenizes it (see [`prepare_chat`]).
pub(crate) async fn prepare_completion(
    state: &Arc<AppState>,
    request_id: String,
    r: ValidatedCompletion,
) -> Result<Prepared, ApiError> {
    state.require_served_model(&r.model)?;
    state.edge.requests.check_completion(&r)?;
    let constraint = constraints::constraint(state.grammars.as_ref(), &r.options.structured).await?;
    let prompt = match r.prompt {
        CompletionPrompt::Text(t) => state
            .off_runtime(move |state| state.text.encode_prompt(&t))
            .await?
            .map_err(|e| ApiError::invalid_param("prompt", format!("{e:#}")))?,
        CompletionPrompt::Tokens(ids) => ids,
    };
    Ok(Prepared {
        api: CompletionApi::Text,
        model: r.model,
        prompt,
        images: Vec::new(),
        options: r.options,
        prompt_param: "prompt",
        request_id,
        constraint,
        priority: 0,
    })
}

async fn dispatch(state: Arc<AppState>, prepared: Result<Prepared, ApiError>) -> Response {
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return ApiError::overloaded(state.max_in_flight).into_response();
    };
    completions::run(state, prepared, permit).await
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(ModelList::single(&state.model_name, state.started)).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.pool.any_healthy() {
        Json(ProbeStatus { status: "ready" }).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(ProbeStatus { status: "no healthy coordinator" })).into_response()
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(key) = &state.edge.metrics_key
        && !bearer(&headers).is_some_and(|presented| same_secret(key, presented))
    {
        return ApiError::unauthorized().into_response();
    }
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
