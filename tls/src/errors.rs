//! What can go wrong loading or issuing certificates.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key in it", path.display())]
    NoKey { path: PathBuf },
    /// The files parsed but do not make a usable identity (the key does not match the certificate,
    /// the CA file holds something that is not a CA...).
    #[error("certificate {}, key {}, CA {}: {reason}", cert.display(), key.display(), ca.display())]
    Identity { cert: PathBuf, key: PathBuf, ca: PathBuf, reason: String },
    #[error("issuing the {what} certificate: {source}")]
    Issue {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
