//! The HTTP edge's defences against clients that hold resources without paying for them
//! (docs/security.md, "The HTTP edge"): connections that never finish their request head
//! ([`connections`]), keys that send too much or too often ([`rate_limit`]), request fields too large
//! to be worth tokenizing ([`request_limits`]), and the knobs of all of them ([`EdgeConfig`]).

pub mod connections;
pub mod rate_limit;
pub mod request_limits;

use std::time::Duration;

pub use connections::ConnectionLimits;
pub use rate_limit::{KeyLimiter, KeyLimits};
pub use request_limits::RequestLimits;

/// Every limit of the HTTP edge; [`Default`] is what `epserve gateway` uses without flags.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub connections: ConnectionLimits,
    /// A request body must arrive whole within this, counted from its head (408 otherwise).
    pub body_timeout: Duration,
    /// Per-key request rate and concurrency (off by default).
    pub keys: KeyLimits,
    pub requests: RequestLimits,
    /// A streaming response whose client reads nothing for this long is cancelled, and with it
    /// the generation on the coordinator (its KV blocks are freed).
    pub stream_stall_timeout: Duration,
    /// Origins allowed to call the API from a browser (`*`: any); empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// `GET /metrics` requires `Authorization: Bearer KEY` with this key; `None`: open.
    pub metrics_key: Option<String>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            connections: ConnectionLimits::default(),
            body_timeout: Duration::from_secs(30),
            keys: KeyLimits::default(),
            requests: RequestLimits::default(),
            stream_stall_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
            metrics_key: None,
        }
    }
}

/// The CORS layer for `origins` (`*`: any origin), or `None` when there are none: then the gateway
/// sends no CORS headers and browsers keep other origins' pages from reading its answers.
pub fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let request_id = HeaderName::from_static("x-request-id");
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, request_id.clone()])
            .expose_headers([request_id])
            .max_age(Duration::from_secs(3600)),
    )
}
