//! `--tls-cert`, `--tls-key`, `--tls-ca`: the identity every server and client of a gRPC link uses
//! (loaded and reloaded by `epserve_tls`), all three or none.

use std::path::PathBuf;

use anyhow::{Result, bail};
use epserve_tls::{ClusterTls, TlsFiles};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents on its gRPC links, as server and as client.
    /// With `--tls-key` and `--tls-ca`: mutual TLS; without all three: plaintext gRPC, which is for
    /// development only (see docs/security.md). Re-read when the file changes.
    #[arg(long, env = "EPSERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "EPSERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate of the cluster CA: peers' certificates must chain to it, in both directions.
    #[arg(long, env = "EPSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
            }
            _ => bail!("--tls-cert, --tls-key and --tls-ca go together: give all three (mutual TLS) or none"),
        }
    }

    /// The identity, loaded now (a file that does not load is an error that names it).
    pub fn load(&self) -> Result<Option<ClusterTls>> {
        match self.files()? {
            None => Ok(None),
            Some(files) => Ok(Some(ClusterTls::load(files)?)),
        }
    }

    /// The same flags for a child process.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, path) in [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key), ("--tls-ca", &self.tls_ca)] {
            if let Some(path) = path {
                flags.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        flags
    }

    pub fn from_files(files: &TlsFiles) -> Self {
        TlsArgs { tls_cert: Some(files.cert.clone()), tls_key: Some(files.key.clone()), tls_ca: Some(files.ca.clone()) }
    }
}
