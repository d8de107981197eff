//! The gateway's graceful shutdown. On SIGTERM it stops accepting connections, answers `/ready` and
//! any new API request that still reaches it (a keep-alive connection) with 503 and an OpenAI error
//! body, lets the requests in flight — token streams included — finish for up to the grace period,
//! and then closes what is left. `/health` (liveness) keeps answering 200 until the end.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use epserve_proto::metric_names as m;
use tokio::net::TcpListener;

use crate::edge::connections::{self, ConnectionLimits};
use crate::errors::ApiError;

/// How long the requests in flight may take to finish on shutdown by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// 503 for everything but `/health` and `/metrics` once `draining` is set.
pub fn refuse_while_draining(app: Router, draining: Arc<AtomicBool>) -> Router {
    app.layer(middleware::from_fn(move |request: Request, next: Next| {
        let draining = draining.clone();
        async move {
            let path = request.uri().path();
            if !draining.load(Ordering::Relaxed) || path == "/health" || path == "/metrics" {
                return next.run(request).await;
            }
            if path == "/ready" {
                let body = serde_json::json!({ "status": "draining" });
                return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
            }
            ApiError {
                code: Some("shutting_down"),
                retry_after: Some(1),
                ..ApiError::unavailable("this gateway is shutting down; retry the request (another gateway serves it)")
            }
            .into_response()
        }
    }))
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: no new connection, 503 for new
/// requests on open ones, the requests in flight finish for at most `grace`. Returns how the drain
/// ended.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Drained {
    let draining = Arc::new(AtomicBool::new(false));
    let app = refuse_while_draining(app, draining.clone());
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<Instant>();
    let shutdown = async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        tracing::info!("draining: no new connection; the requests in flight finish (at most {grace:?})");
        let _ = signalled.send(Instant::now());
    };
    let serving = connections::serve(listener, app, limits, shutdown);
    let mut serving = std::pin::pin!(serving);
    let started = tokio::select! {
        () = &mut serving => return Drained::Finished,
        started = on_signal => started.unwrap_or_else(|_| Instant::now()),
    };
    let drained = match tokio::time::timeout(grace, serving).await {
        Ok(()) => {
            tracing::info!("drained in {:.2} s", started.elapsed().as_secs_f64());
            Drained::Finished
        }
        Err(_) => {
            tracing::warn!("shutdown grace ({grace:?}) over: closing the connections still open");
            Drained::CutOff
        }
    };
    metrics::histogram!(m::DRAIN_SECONDS, "component" => "gateway").record(started.elapsed().as_secs_f64());
    drained
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request in flight finished.
    Finished,
    /// The grace period ended first; the connections still open are closed with the process.
    CutOff,
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn status_of(app: &Router, path: &str) -> (StatusCode, String) {
        let response =
            app.clone().oneshot(Request::get(path).body(Body::empty()).expect("request")).await.expect("call");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn draining_refuses_new_requests_and_readiness_but_not_liveness() {
        let draining = Arc::new(AtomicBool::new(false));
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/ready", get(|| async { "ready" }))
            .route("/v1/models", get(|| async { "models" }));
        let app = refuse_while_draining(app, draining.clone());
        assert_eq!(status_of(&app, "/v1/models").await.0, StatusCode::OK);
        assert_eq!(status_of(&app, "/ready").await.0, StatusCode::OK);
        draining.store(true, Ordering::Relaxed);
        let (status, body) = status_of(&app, "/v1/models").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["error"]["code"], "shutting_down");
        assert_eq!(body["error"]["type"], "server_error");
        let (status, body) = status_of(&app, "/ready").await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#));
        assert_eq!(status_of(&app, "/health").await, (StatusCode::OK, "ok".to_owned()));
    }
}
