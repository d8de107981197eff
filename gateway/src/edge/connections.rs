//! The gateway's own accept loop, in place of `axum::serve`, which exposes neither a header-read
//! timeout nor a connection cap: a slowloris client (many connections, each sending half a request
//! line) otherwise holds every connection it opens for as long as it likes.
//!
//! Each connection is HTTP/1.1 (hyper's `http1` builder, whose `header_read_timeout` closes a
//! connection that has not sent a whole request head in time — also an idle keep-alive one, since
//! the timer runs whenever a head is awaited). HTTP/2 is not offered: hyper has no header timeout for
//! it, and no OpenAI client speaks cleartext HTTP/2. Connections past `max_connections` are closed as
//! soon as they are accepted, before a byte is read.
//!
//! Each connection's kernel send buffer is fixed at [`SEND_BUFFER_BYTES`] instead of autotuned: on
//! loopback and fast links Linux grows it to 4 MiB, which a streaming client that stops reading fills
//! only after minutes of output, all that time holding its generation (and KV cache) on a
//! coordinator. Fixed, the stream stall timeout starts after at most this much unread output.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use epserve_proto::metric_names as m;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A connection must send a whole request head within this, from when the gateway starts
    /// waiting for one (its opening, or the end of its previous response); it is closed otherwise.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed as they are accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { header_timeout: Duration::from_secs(10), max_connections: 4096 }
    }
}

/// The kernel send buffer of every connection (Linux doubles it for its bookkeeping). Answers are
/// JSON bodies and token streams of a few hundred bytes an event: this is ample for them.
pub const SEND_BUFFER_BYTES: usize = 128 << 10;

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for the
/// open connections to finish their requests (idle ones are closed at once).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            metrics::counter!(m::HTTP_REFUSED_CONNECTIONS_TOTAL).increment(1);
            drop(tcp);
            continue;
        };
        // Streamed chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds one back
        // until the client's delayed ACK (up to 40 ms), which shows as time to first token.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("TCP_NODELAY: {e}");
        }
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(SEND_BUFFER_BYTES) {
            tracing::warn!("SO_SNDBUF: {e}");
        }
        // The client's address, for `ConnectInfo` (per-client limits when there are no API keys).
        let app = app.clone().map_request(move |mut request: axum::http::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app)));
        metrics::gauge!(m::HTTP_OPEN_CONNECTIONS).increment(1.0);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection closed: {e}");
            }
            metrics::gauge!(m::HTTP_OPEN_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A failed accept: per-connection errors are skipped; anything else (out of file descriptors) is
/// waited out for a second, as axum::serve and hyper do, rather than spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The peer address a request came from, when it came through [`serve`].
pub fn peer(request: &axum::http::Request<axum::body::Body>) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
