//! `GET /metrics` in the Prometheus text format, for processes that have no HTTP server of their
//! own (the expert worker). A minimal HTTP/1.1 responder: one request per connection.

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Installs the global Prometheus recorder and serves it on `addr` in the background.
pub async fn serve(addr: &str) -> Result<()> {
    let handle = PrometheusBuilder::new().install_recorder().context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            tokio::spawn(respond(socket, handle));
        }
    });
    Ok(())
}

async fn respond(mut socket: tokio::net::TcpStream, handle: PrometheusHandle) {
    let mut buf = [0u8; 2048];
    let n = socket.read(&mut buf).await.unwrap_or(0);
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if request.starts_with("GET /metrics") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "only GET /metrics is served here\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
}
