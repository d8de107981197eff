//! [`ClusterTls`]: this process's certificate and key and the cluster CA, as rustls server and
//! client configurations that follow the files.
//!
//! Rotation: the files are looked at again (their modification time and size) at most once per
//! recheck interval, when a handshake asks for a configuration; when they changed, both
//! configurations are rebuilt, and connections made from then on use them (established ones keep
//! the session they negotiated). A set of files that does not load (a certificate replaced before
//! its key, say) keeps the previous configuration in force and is tried again at the next recheck,
//! so a rotation done file by file never leaves the process without an identity. Writing each file
//! to a temporary name and renaming it into place avoids the window altogether.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::errors::TlsError;

/// The three files of a TLS identity (`--tls-cert`, `--tls-key`, `--tls-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key: PathBuf,
    /// PEM certificate(s) of the CA that peers' certificates must chain to.
    pub ca: PathBuf,
}

/// How often, at most, the files are checked for changes by default.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(1);

/// A process's TLS identity and trust anchor; cheap to clone (all clones share one state and see
/// the same reloads).
#[derive(Clone)]
pub struct ClusterTls(Arc<Inner>);

struct Inner {
    files: TlsFiles,
    recheck: Duration,
    state: Mutex<State>,
}

struct State {
    stamp: Stamp,
    checked: Instant,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Modification time and length of the certificate, key and CA files: what a rotation changes.
type Stamp = [Option<(SystemTime, u64)>; 3];

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls").field("files", &self.0.files).field("recheck", &self.0.recheck).finish()
    }
}

impl ClusterTls {
    /// Loads `files` (they must form a usable identity now) and follows their changes, checking at
    /// most once per [`DEFAULT_RECHECK`].
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with_recheck(files, DEFAULT_RECHECK)
    }

    /// [`Self::load`] with another recheck interval (`Duration::ZERO`: on every handshake).
    pub fn load_with_recheck(files: TlsFiles, recheck: Duration) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let (server, client) = build(&files)?;
        let state = State { stamp, checked: Instant::now(), server, client };
        Ok(ClusterTls(Arc::new(Inner { files, recheck, state: Mutex::new(state) })))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.0.files
    }

    /// The configuration a server accepts a connection with: this identity, and clients required to
    /// present a certificate that chains to the CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refreshed(|s| s.server.clone())
    }

    /// The configuration a client connects with: servers verified against the CA, this identity
    /// presented.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refreshed(|s| s.client.clone())
    }

    fn refreshed<T>(&self, pick: impl FnOnce(&State) -> T) -> T {
        let inner = &*self.0;
        let mut state = inner.state.lock();
        if state.checked.elapsed() >= inner.recheck {
            state.checked = Instant::now();
            let now = stamp(&inner.files);
            if now != state.stamp {
                match build(&inner.files) {
                    Ok((server, client)) => {
                        tracing::info!(cert = %inner.files.cert.display(), "TLS certificate files changed: reloaded");
                        *state = State { stamp: now, checked: state.checked, server, client };
                    }
                    // Kept until the files form a usable identity again (see the module's docs).
                    Err(e) => {
                        tracing::warn!("TLS certificate files changed but do not load, keeping the previous ones: {e}")
                    }
                }
            }
        }
        pick(&state)
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca].map(|p| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
}

/// The crypto backend of every configuration here: ring, named rather than left to the process
/// default (with another rustls backend linked in, the default would be ambiguous). Ring is what
/// tonic's `tls-ring` and etcd-client already link; rustls deprecated its provider because ring
/// has no post-quantum key exchange, which only aws-lc-rs (a C and CMake build) offers today.
/// Moving to it is a one-line change here (docs/security.md, "Mutual TLS on the gRPC links").
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_owned() },
        e => TlsError::Pem { path: path.to_owned(), reason: e.to_string() },
    })
}

fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), TlsError> {
    let chain = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let invalid = |reason: String| TlsError::Identity {
        cert: files.cert.clone(),
        key: files.key.clone(),
        ca: files.ca.clone(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca)? {
        roots.add(ca).map_err(|e| invalid(format!("the CA certificate is not usable: {e}")))?;
    }
    let roots = Arc::new(roots);
    let provider = crypto_provider();
    // TLS 1.3 only: both ends of every link are ours.
    let versions = &[&rustls::version::TLS13];
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| invalid(e.to_string()))?;
    // gRPC is HTTP/2 only.
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid(e.to_string()))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}
