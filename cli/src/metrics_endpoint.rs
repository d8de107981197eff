//! `GET /metrics` in the Prometheus text format, for the processes that have no HTTP server of their
//! own (the coordinator, the expert worker); on a coordinator, also `GET /expert-load`: its expert
//! load telemetry as JSON (what `LoadBalancingService.ExpertLoad` answers).

use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use epserve_coordinator::rebalance::LoadBalancer;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Where a coordinator's load balancer is found once the coordinator has started.
pub type ExpertLoadSlot = Arc<OnceLock<Arc<LoadBalancer>>>;

/// Installs the global Prometheus recorder and serves it on `addr` in the background.
pub async fn serve(addr: &str) -> Result<()> {
    serve_with(addr, None).await
}

/// [`serve`], with `GET /expert-load` answered from `expert_load` (404 until it is set, and for a
/// coordinator whose experts are in process).
pub async fn serve_with(addr: &str, expert_load: Option<ExpertLoadSlot>) -> Result<()> {
    let handle = PrometheusBuilder::new().install_recorder().context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    let mut app = Router::new().route(
        "/metrics",
        get(move || {
            let body = handle.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    );
    if let Some(slot) = expert_load {
        app = app.route(
            "/expert-load",
            get(move || {
                let report = slot.get().map(|b| b.report());
                async move {
                    match report.map(|r| serde_json::to_string(&r)) {
                        Some(Ok(json)) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], json),
                        Some(Err(e)) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string())
                        }
                        None => (
                            StatusCode::NOT_FOUND,
                            [(header::CONTENT_TYPE, "text/plain")],
                            "no expert load: the experts are in process, or the coordinator is starting".into(),
                        ),
                    }
                }
            }),
        );
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok(())
}
