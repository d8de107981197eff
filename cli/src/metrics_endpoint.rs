//! `GET /metrics` in the Prometheus text format, for the processes that have no HTTP server of their
//! own (the coordinator, the expert worker).

use anyhow::{Context, Result};
use axum::Router;
use axum::http::header;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the global Prometheus recorder and serves it on `addr` in the background.
pub async fn serve(addr: &str) -> Result<()> {
    let handle = PrometheusBuilder::new().install_recorder().context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let body = handle.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok(())
}
