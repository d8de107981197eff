//! How a process authenticates to etcd and checks it: TLS (`etcds://`) with the etcd CA, a client
//! certificate for etcd's `--client-cert-auth`, and a user and password (etcd's auth) read from a
//! file. The etcd CA and client certificate are separate from the gRPC links' (`--tls-*`): etcd is
//! often run, and its PKI managed, apart from the serving cluster. They are read once, when the
//! process connects.

use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::registry::RegistryError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySecurity {
    /// PEM CA that etcd's server certificate must chain to (`--registry-ca`); `etcds://` needs it.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key presented to etcd (`--registry-cert`, `--registry-key`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A file holding `user:password` on its first line (`--registry-credentials`).
    pub credentials: Option<PathBuf>,
}

impl RegistrySecurity {
    pub fn is_empty(&self) -> bool {
        *self == RegistrySecurity::default()
    }

    /// `options` with TLS (when `tls`, the `etcds://` scheme) and credentials added. Refuses what
    /// would silently weaken the connection: TLS files or a password over plaintext `etcd://`, a
    /// certificate without its key, `etcds://` without a CA.
    pub(crate) fn apply(&self, mut options: ConnectOptions, tls: bool) -> Result<ConnectOptions, RegistryError> {
        let invalid = |m: &str| Err(RegistryError::Invalid(m.to_owned()));
        if !tls {
            if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
                return invalid("--registry-ca/--registry-cert/--registry-key need an `etcds://` registry (TLS)");
            }
            if self.credentials.is_some() {
                return invalid(
                    "--registry-credentials would send the password in plaintext: use an `etcds://` registry",
                );
            }
            return Ok(options);
        }
        let Some(ca) = &self.ca else {
            return invalid(
                "an `etcds://` registry needs --registry-ca (the CA etcd's certificate is checked against)",
            );
        };
        let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => return invalid("--registry-cert and --registry-key go together"),
        }
        options = options.with_tls(tls_options);
        if let Some(path) = &self.credentials {
            let (user, password) = credentials(path)?;
            // etcd's simple tokens expire (`--auth-token-ttl`, 5 minutes idle by default).
            options = options.with_user(user, password).with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Invalid(format!("reading {}: {e}", path.display())))
}

/// `user:password` from the first line of `path` (the password may contain `:`).
fn credentials(path: &Path) -> Result<(String, String), RegistryError> {
    let text =
        String::from_utf8(read(path)?).map_err(|_| RegistryError::Invalid(format!("{}: not UTF-8", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    match line.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok((user.to_owned(), password.to_owned())),
        _ => Err(RegistryError::Invalid(format!("{}: expected `user:password` on its first line", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_user_colon_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("creds");
        std::fs::write(&path, "epserve:s3:cret\nignored\n").expect("write");
        assert_eq!(credentials(&path).expect("parses"), ("epserve".into(), "s3:cret".into()));
        std::fs::write(&path, "no-colon\n").expect("write");
        let e = credentials(&path).expect_err("no colon").to_string();
        assert!(e.contains("creds") && e.contains("user:password"), "{e}");
    }

    #[test]
    fn plaintext_refuses_tls_files_and_passwords() {
        let with_password = RegistrySecurity { credentials: Some("x".into()), ..Default::default() };
        assert!(with_password.apply(ConnectOptions::new(), false).is_err());
        let with_ca = RegistrySecurity { ca: Some("x".into()), ..Default::default() };
        assert!(with_ca.apply(ConnectOptions::new(), false).is_err());
        assert!(RegistrySecurity::default().apply(ConnectOptions::new(), true).is_err(), "etcds:// needs a CA");
        assert!(RegistrySecurity::default().apply(ConnectOptions::new(), false).is_ok());
    }
}
