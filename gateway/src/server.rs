//! The HTTP server: routes, API-key auth, body limits, the in-flight limit, and the probes.

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
        }
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
    fn require_served_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name { Ok(()) } else { Err(ApiError::model_not_found(model, &self.model_name)) }
    }
}

/// The body of `/health` and `/ready`.
#[derive(Debug, Serialize)]
struct ProbeStatus {
    status: &'static str,
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/health", get(|| async { Json(ProbeStatus { status: "ok" }) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found_route() })
        .layer(middleware::from_fn(observe))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
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
    let route: &'static str = ROUTES.iter().find(|r| **r == request.uri().path()).copied().unwrap_or("other");
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
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if state.api_keys.iter().any(|k| same_secret(k, key)) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Compares two keys in time that depends only on their length, not on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a body declared JSON (`application/json`, any parameters) of at most `--max-body-bytes`
/// and deserialises it (axum's `Json` extractor would answer a wrong type in plain text, not in
/// OpenAI's error JSON).
async fn read_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::not_json(content_type));
    }
    let bytes = axum::body::to_bytes(body, state.max_body_bytes)
        .await
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
        let mut r = ValidatedChat::try_from(read_request::<ChatCompletionRequest>(&state, &headers, body).await?)?;
        state.require_served_model(&r.model)?;
        // Cheap checks first: image parts and the template, then the images' I/O and decoding.
        let requested = state.images.take_parts(&mut r.messages)?;
        let tools = r.options.structured.tools.as_ref().map(|t| t.definitions.as_slice());
        let chat = state
            .text
            .encode_chat_with_tools(&r.messages, tools)
            .map_err(|e| ApiError::invalid_param("messages", format!("{e:#}")))?;
        let constraint = constraints::constraint(state.grammars.as_ref(), &r.options.structured).await?;
        let loaded = state.images.load(requested).await?;
        let (prompt, images) = state.images.expand(&chat.ids, &chat.image_placeholders, loaded, &r.messages)?;
        Ok::<_, ApiError>(Prepared {
            api: CompletionApi::Chat,
            model: r.model,
            prompt,
            images,
            options: r.options,
            prompt_param: "messages",
            request_id: id.0,
            constraint,
        })
    };
    dispatch(state.clone(), prepared.await).await
}

async fn completion(
    State(state): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let prepared = async {
        let r = ValidatedCompletion::try_from(read_request::<CompletionRequest>(&state, &headers, body).await?)?;
        state.require_served_model(&r.model)?;
        let constraint = constraints::constraint(state.grammars.as_ref(), &r.options.structured).await?;
        let prompt = match r.prompt {
            CompletionPrompt::Text(t) => {
                state.text.encode_prompt(&t).map_err(|e| ApiError::invalid_param("prompt", format!("{e:#}")))?
            }
            CompletionPrompt::Tokens(ids) => ids,
        };
        Ok::<_, ApiError>(Prepared {
            api: CompletionApi::Text,
            model: r.model,
            prompt,
            images: Vec::new(),
            options: r.options,
            prompt_param: "prompt",
            request_id: id.0,
            constraint,
        })
    };
    dispatch(state.clone(), prepared.await).await
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

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
