//! Real TCP handshakes through [`epserve_tls::incoming`] and [`epserve_tls::TlsConnector`]: the right
//! CA is served, a client without a certificate or with another CA's is refused, and rotated files
//! are picked up by the next connection.

use std::time::Duration;

use epserve_tls::{ClusterTls, TlsConnector, TlsFiles, dev};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tower_service::Service;

/// A server that answers each accepted TLS connection's first byte with the same byte; returns its
/// address.
async fn echo_server(tls: ClusterTls) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test setup");
    let addr = listener.local_addr().expect("test setup");
    let mut incoming = epserve_tls::incoming(listener, tls);
    tokio::spawn(async move {
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(&byte).await;
                    let _ = stream.flush().await;
                }
            });
        }
    });
    addr
}

/// Whether a client with `tls` completes a round trip with the server at `addr`. TLS 1.3 lets the
/// client finish its side before the server has checked the client's certificate: the refusal
/// shows as the connection closing instead of an answer.
async fn round_trip(tls: &ClusterTls, addr: std::net::SocketAddr) -> Result<(), String> {
    let uri: http::Uri = format!("http://{addr}").parse().expect("test setup");
    let mut io = TlsConnector::new(tls.clone()).call(uri).await.map_err(|e| e.to_string())?.into_inner();
    io.write_all(&[7]).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut byte)).await {
        Ok(Ok(_)) if byte[0] == 7 => Ok(()),
        Ok(Ok(_)) => Err("wrong answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

fn load(files: TlsFiles) -> ClusterTls {
    ClusterTls::load_with_recheck(files, Duration::ZERO).expect("test setup")
}

#[tokio::test]
async fn the_cluster_ca_is_served_and_others_are_refused() {
    let dir = tempfile::tempdir().expect("test setup");
    let ours = dev::issue(&dir.path().join("ours"), &[]).expect("test setup");
    let theirs = dev::issue(&dir.path().join("theirs"), &[]).expect("test setup");
    let addr = echo_server(load(ours.files("worker"))).await;

    round_trip(&load(ours.files("coordinator")), addr).await.expect("a certificate from the cluster CA is served");

    // A client certificate from another CA (that trusts our server, so only the server can say no).
    let impostor = load(TlsFiles { ca: ours.ca(), ..theirs.files("coordinator") });
    assert!(round_trip(&impostor, addr).await.is_err(), "another CA's client certificate must be refused");

    // A client that trusts another CA refuses our server.
    let wrong_trust = load(TlsFiles { ca: theirs.ca(), ..ours.files("coordinator") });
    let refused = round_trip(&wrong_trust, addr).await.expect_err("must be refused");
    assert!(refused.contains("certificate"), "{refused}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("test setup");
    let ours = dev::issue(dir.path(), &[]).expect("test setup");
    let addr = echo_server(load(ours.files("worker"))).await;

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ours.ca()).expect("test setup");
    for cert in rustls_pemfile_certs(&ca) {
        roots.add(cert).expect("test setup");
    }
    let provider = epserve_tls::crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("test setup")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("test setup");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("test setup");
    let outcome = async {
        let mut io = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
        io.write_all(&[7]).await?;
        io.flush().await?;
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(5), outcome).await.expect("refused, not hung");
    assert!(outcome.is_err(), "a client without a certificate must be refused");
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.expect("a PEM certificate")).collect()
}

#[tokio::test]
async fn rotated_files_are_used_by_the_next_connection() {
    let dir = tempfile::tempdir().expect("test setup");
    let live = dir.path().join("live");
    let first = dev::issue(&live, &[]).expect("test setup");
    let server = load(first.files("worker"));
    let addr = echo_server(server.clone()).await;
    // The old client identity and CA, copied aside so that they survive the rotation below.
    let old = |name: &str| dir.path().join(name);
    std::fs::copy(first.files("coordinator").cert, old("old.crt")).expect("test setup");
    std::fs::copy(first.files("coordinator").key, old("old.key")).expect("test setup");
    std::fs::copy(first.ca(), old("old-ca.crt")).expect("test setup");
    let old_client = load(TlsFiles { cert: old("old.crt"), key: old("old.key"), ca: old("old-ca.crt") });
    round_trip(&old_client, addr).await.expect("served before the rotation");

    // A new CA and new certificates replace the files the running server was started with.
    let rotated = dev::issue(&live, &[]).expect("test setup");
    let new_client = load(rotated.files("coordinator"));
    round_trip(&new_client, addr).await.expect("the server presents and trusts the rotated files");
    assert!(round_trip(&old_client, addr).await.is_err(), "the old CA's certificate is refused after the rotation");
    assert_eq!(server.files(), &rotated.files("worker"));
}

#[test]
fn files_that_do_not_load_are_named() {
    let dir = tempfile::tempdir().expect("test setup");
    let ours = dev::issue(dir.path(), &[]).expect("test setup");
    let missing = TlsFiles { key: dir.path().join("nope.key"), ..ours.files("worker") };
    let e = ClusterTls::load(missing).expect_err("must be refused").to_string();
    assert!(e.contains("nope.key"), "{e}");
    let swapped = TlsFiles { key: ours.files("gateway").key, ..ours.files("worker") };
    let e = ClusterTls::load(swapped).expect_err("must be refused").to_string();
    assert!(e.contains("worker.crt") && e.contains("gateway.key"), "{e}");
    let not_pem = TlsFiles { ca: ours.files("worker").key, ..ours.files("worker") };
    let e = ClusterTls::load(not_pem).expect_err("must be refused").to_string();
    assert!(e.contains("worker.key"), "{e}");
}

#[cfg(unix)]
#[test]
fn keys_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("test setup");
    let ours = dev::issue(dir.path(), &["node-1.internal".into(), "10.0.0.7".into()]).expect("test setup");
    for c in dev::COMPONENTS {
        let mode = std::fs::metadata(ours.files(c).key).expect("test setup").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{c}.key");
    }
    let mode = std::fs::metadata(dir.path().join(dev::CA_KEY)).expect("test setup").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
