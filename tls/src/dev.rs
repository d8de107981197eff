//! Development certificates: a CA and one certificate per component, all written as PEM files
//! into one directory (`epserve certs`, and `epserve up` for its own temporary cluster).
//!
//! Every component certificate carries both the server and the client usage (a coordinator serves
//! the gateway and is a client of the workers), and names the given hosts plus `localhost`,
//! `127.0.0.1` and `::1`. Keys are ECDSA P-256, written mode 0600. A production cluster should use
//! certificates from its own PKI; these are valid for [`VALIDITY_DAYS`] days.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::errors::TlsError;
use crate::identity::TlsFiles;

/// The components a certificate is issued for: `client` is for the command-line tools that call
/// gRPC (`epserve bench --coordinator`, `exchange-bench`, `logits` through workers), `etcd` for an
/// etcd server (or client) of a development cluster.
pub const COMPONENTS: [&str; 5] = ["gateway", "coordinator", "worker", "client", "etcd"];

pub const VALIDITY_DAYS: i64 = 365;

/// The CA certificate's file name in the output directory; its key is `ca.key`.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// Where [`issue`] wrote everything.
#[derive(Debug, Clone)]
pub struct DevCertificates {
    pub dir: PathBuf,
}

impl DevCertificates {
    /// The CA certificate peers are verified against.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// `COMPONENT.crt`, `COMPONENT.key` and the CA: what a component passes as `--tls-*`.
    pub fn files(&self, component: &str) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join(format!("{component}.crt")),
            key: self.dir.join(format!("{component}.key")),
            ca: self.ca(),
        }
    }
}

/// Issues a fresh CA and a certificate for each of [`COMPONENTS`] into `out` (created if missing;
/// files of an earlier run are replaced, each by rename, so that a running process that reloads
/// them never reads half a file).
pub fn issue(out: &Path, hosts: &[String]) -> Result<DevCertificates, TlsError> {
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write { path: out.to_owned(), source })?;
    let issue_error = |what: &str| {
        let what = what.to_owned();
        move |source| TlsError::Issue { what: what.clone(), source }
    };
    let now = OffsetDateTime::now_utc();
    // A day's margin for clocks that disagree a little between hosts.
    let (not_before, not_after) = (now - Duration::days(1), now + Duration::days(VALIDITY_DAYS));

    let ca_key = KeyPair::generate().map_err(issue_error("CA"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("epserve development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(issue_error("CA"))?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names: Vec<String> = hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
    for default in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_owned());
        }
    }

    let certs = DevCertificates { dir: out.to_owned() };
    for component in COMPONENTS {
        let key = KeyPair::generate().map_err(issue_error(component))?;
        let mut params = CertificateParams::new(names.clone()).map_err(issue_error(component))?;
        params.distinguished_name = name(&format!("epserve {component}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).map_err(issue_error(component))?;
        let files = certs.files(component);
        write(&files.cert, cert.pem().as_bytes(), false)?;
        write(&files.key, key.serialize_pem().as_bytes(), true)?;
    }
    write(&out.join(CA_KEY), issuer.key().serialize_pem().as_bytes(), true)?;
    write(&certs.ca(), ca_cert.pem().as_bytes(), false)?;
    Ok(certs)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "epserve");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `contents` to a temporary name beside `path` and renames it into place; `secret` files
/// are created readable by their owner only.
fn write(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let error = |source| TlsError::Write { path: path.to_owned(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(error)?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)
}
