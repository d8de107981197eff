//! The client side: a connector that gives tonic channels TLS with the current client configuration,
//! so that a reconnect after a rotation presents the new certificate and trusts the new CA.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::identity::ClusterTls;

/// A `tower::Service<Uri>` for [`Endpoint::connect_with_connector`]: TCP to the URI's host and port,
/// then a TLS handshake that verifies the server's certificate for that host against the CA and
/// presents this process's certificate. The endpoint's URI stays `http://`: TLS is this connector's.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    tls: ClusterTls,
}

impl TlsConnector {
    pub fn new(tls: ClusterTls) -> Self {
        TlsConnector { tls }
    }
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let invalid = |reason: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(80);
            // An IPv6 literal comes bracketed in a URI; the certificate names the bare address.
            let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let name = ServerName::try_from(bare.clone()).map_err(|e| invalid(format!("{host}: {e}")))?;
            let tcp = TcpStream::connect((bare.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A channel to `endpoint` that connects on first use: over TLS with `tls`, in plaintext without.
pub fn channel(endpoint: Endpoint, tls: Option<&ClusterTls>) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector::new(tls.clone())),
        None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now: over TLS with `tls`, in plaintext without.
pub async fn connect(endpoint: Endpoint, tls: Option<&ClusterTls>) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(tls) => endpoint.connect_with_connector(TlsConnector::new(tls.clone())).await,
        None => endpoint.connect().await,
    }
}
