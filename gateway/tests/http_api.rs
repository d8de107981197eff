//! The HTTP edge in process (`Router::oneshot`): authentication, OpenAI error JSON and status codes,
//! body limits, probes — with no coordinator behind the gateway.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use epserve_gateway::{AppState, CoordinatorPool, TextCodec, router};
use epserve_testkit::fixtures;
use serde_json::{Value, json};
use tower::ServiceExt;

fn app(keys: &[&str], max_body: usize) -> axum::Router {
    let text = TextCodec::from_checkpoint(&fixtures::dir(fixtures::TINY_LLAMA4)).expect("codec");
    // Nothing listens there: the pool never becomes healthy.
    let pool = CoordinatorPool::new(&["127.0.0.1:9".to_owned()]).expect("pool");
    let state = AppState::new(text, pool, "tiny".into()).with_limits(
        keys.iter().map(|k| (*k).to_owned()).collect(),
        max_body,
        16,
    );
    router(Arc::new(state))
}

async fn call(app: axum::Router, method: &str, path: &str, key: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let response = app.oneshot(req.body(Body::from(body.to_owned())).expect("request")).await.expect("response");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn chat(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string()
}

#[tokio::test]
async fn authentication() {
    let (status, body) = call(app(&["k1", "k2"], 1 << 20), "GET", "/v1/models", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    let (status, _) = call(app(&["k1", "k2"], 1 << 20), "GET", "/v1/models", Some("nope"), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(app(&["k1", "k2"], 1 << 20), "GET", "/v1/models", Some("k2"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"][0]["id"], "tiny");
    // Probes stay open.
    let (status, _) = call(app(&["k1"], 1 << 20), "GET", "/health", None, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn openai_errors() {
    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/chat/completions", None, &chat("gpt-4")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");

    let bad = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": "high"}).to_string();
    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/chat/completions", None, &bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "top_p");

    // A wrong type deep in the body: OpenAI's error JSON with the field's path, not a plain-text rejection.
    let bad = json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]});
    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/chat/completions", None, &bad.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "messages[0].content[0]");
    let bad = json!({"model": "tiny", "prompt": [[1, 2], [3]]}).to_string();
    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/completions", None, &bad).await;
    assert_eq!((status, &body["error"]["param"]), (StatusCode::BAD_REQUEST, &json!("prompt")));

    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/completions", None, "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("JSON"));

    let (status, body) = call(app(&[], 64), "POST", "/v1/chat/completions", None, &chat("tiny")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "request_too_large");

    // A valid request with no healthy coordinator: 503, OpenAI error JSON.
    let (status, body) = call(app(&[], 1 << 20), "POST", "/v1/chat/completions", None, &chat("tiny")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["type"], "server_error");

    // Every response carries a request id: the client's own when it sent one.
    let req = Request::builder().uri("/health").header("x-request-id", "abc-123").body(Body::empty()).expect("request");
    let response = app(&[], 1 << 20).oneshot(req).await.expect("response");
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let req = Request::builder().uri("/health").body(Body::empty()).expect("request");
    let response = app(&[], 1 << 20).oneshot(req).await.expect("response");
    assert!(response.headers()["x-request-id"].to_str().is_ok_and(|v| v.starts_with("req-")));

    let (status, body) = call(app(&[], 1 << 20), "GET", "/v1/nothing", None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_object());
}

/// Only bodies declared JSON are read: a browser sends a cross-origin `text/plain` or form POST
/// without a CORS preflight, so serving those would let any web page use the API.
#[tokio::test]
async fn bodies_not_declared_json_are_refused() {
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = Request::builder().method("POST").uri("/v1/completions");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let body = r#"{"model": "tiny", "prompt": "hi"}"#;
        let response = app(&[], 1 << 20).oneshot(req.body(Body::from(body)).expect("request")).await.expect("response");
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let error: Value = serde_json::from_slice(&bytes).expect("OpenAI error JSON");
        assert_eq!(error["error"]["code"], "unsupported_media_type", "{error}");
        assert!(error["error"]["message"].as_str().expect("message").contains("application/json"), "{error}");
    }
    // Parameters after the type are fine.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(r#"{"model": "nope", "prompt": "hi"}"#))
        .expect("request");
    let response = app(&[], 1 << 20).oneshot(req).await.expect("response");
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "read as JSON: the model is unknown");
}

#[tokio::test]
async fn ready_needs_a_healthy_coordinator() {
    let (status, _) = call(app(&[], 1 << 20), "GET", "/ready", None, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
