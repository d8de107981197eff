//! Every error the HTTP API returns, and the one place they become OpenAI-style JSON:
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`.
    pub error_type: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header of a 429 (when to try again).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error_type: "invalid_request_error",
            message: message.into(),
            param: param.into(),
            code: None,
            retry_after: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(Some(param.to_owned()), message)
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error_type: "authentication_error",
            message: "Incorrect API key provided. Pass it as `Authorization: Bearer KEY`.".into(),
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error_type: "invalid_request_error",
            message: format!("The model `{model}` does not exist. This server serves `{served}`."),
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error_type: "invalid_request_error",
            message: format!("The request body is larger than the limit of {limit} bytes."),
            param: None,
            code: Some("request_too_large"),
            retry_after: None,
        }
    }

    /// A body that is not declared JSON. Refused rather than parsed: a web page can make a browser
    /// send a cross-origin `text/plain` (or form) POST without asking the server first (no CORS
    /// preflight), but not an `application/json` one.
    pub fn not_json(content_type: &str) -> Self {
        let given = if content_type.is_empty() { "none".to_owned() } else { format!("`{content_type}`") };
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error_type: "invalid_request_error",
            message: format!(
                "The request body must be JSON, sent with `Content-Type: application/json` (got {given})."
            ),
            param: None,
            code: Some("unsupported_media_type"),
            retry_after: None,
        }
    }

    pub fn overloaded(limit: usize) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error_type: "rate_limit_error",
            message: format!("The server is at its limit of {limit} requests in flight; retry shortly."),
            param: None,
            code: Some("overloaded"),
            retry_after: Some(1),
        }
    }

    /// Every coordinator's waiting queue is full (they answered `RESOURCE_EXHAUSTED`).
    pub fn queues_full(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error_type: "rate_limit_error",
            message: message.into(),
            param: None,
            code: Some("overloaded"),
            retry_after: Some(1),
        }
    }

    /// This client (its API key, or its address when the gateway has no keys) is over its limit.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error_type: "rate_limit_error",
            message: message.into(),
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after_secs.max(1)),
        }
    }

    /// The body did not arrive whole within `--body-timeout-ms`.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            error_type: "invalid_request_error",
            message: format!("The request body did not arrive within {} ms.", limit.as_millis()),
            param: None,
            code: Some("request_timeout"),
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error_type: "server_error",
            message: message.into(),
            param: None,
            code: Some("no_healthy_backend"),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error_type: "server_error",
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn not_found_route() -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error_type: "invalid_request_error",
            message: "Unknown route.".into(),
            param: None,
            code: Some("unknown_url"),
            retry_after: None,
        }
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                error_type: self.error_type,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

/// The JSON of an error, alone or as an event of a stream that fails midway.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub error_type: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}
