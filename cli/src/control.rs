//! The control-plane flags: `--registry`, `--cluster` and `--lease-ttl-ms`, shared by every component
//! and by `epserve up` (which passes them on), and `--name`, one instance's own.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use epserve_control::address::Advertise;
use epserve_control::{ControlConnection, RegistrySecurity};

#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control plane to register with and discover the cluster through: `etcds://host:port[,host:port]`
    /// (etcd over TLS, with `--registry-ca`), or `etcd://...` (plaintext, development only).
    /// Without it the component is wired statically (addresses on the command line).
    #[arg(long, env = "EPSERVE_REGISTRY")]
    pub registry: Option<String>,
    /// Cluster name: the namespace of this cluster's keys (`/epserve/<cluster>/` in etcd).
    #[arg(long, default_value = "default", env = "EPSERVE_CLUSTER")]
    pub cluster: String,
    /// Lease TTL in milliseconds: how long after a crash the instance is considered gone.
    #[arg(long, default_value_t = 10_000, env = "EPSERVE_LEASE_TTL_MS")]
    pub lease_ttl_ms: u64,
    /// PEM CA that etcd's server certificate must chain to (`etcds://`).
    #[arg(long, env = "EPSERVE_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
    /// PEM client certificate presented to etcd (for etcd's `--client-cert-auth`), with `--registry-key`.
    #[arg(long, env = "EPSERVE_REGISTRY_CERT")]
    pub registry_cert: Option<PathBuf>,
    #[arg(long, env = "EPSERVE_REGISTRY_KEY")]
    pub registry_key: Option<PathBuf>,
    /// File with `user:password` on its first line: etcd's auth (`etcds://` only).
    #[arg(long, env = "EPSERVE_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,
}

impl ControlArgs {
    /// The same flags for a child process; none without `--registry`.
    pub fn to_flags(&self) -> Vec<String> {
        let Some(url) = &self.registry else { return Vec::new() };
        let mut flags = vec![
            "--registry".into(),
            url.clone(),
            "--cluster".into(),
            self.cluster.clone(),
            "--lease-ttl-ms".into(),
            self.lease_ttl_ms.to_string(),
        ];
        let security = self.security();
        for (flag, path) in [
            ("--registry-ca", &security.ca),
            ("--registry-cert", &security.cert),
            ("--registry-key", &security.key),
            ("--registry-credentials", &security.credentials),
        ] {
            if let Some(path) = path {
                flags.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        flags
    }

    /// How to check etcd and authenticate to it.
    pub fn security(&self) -> RegistrySecurity {
        RegistrySecurity {
            ca: self.registry_ca.clone(),
            cert: self.registry_cert.clone(),
            key: self.registry_key.clone(),
            credentials: self.registry_credentials.clone(),
        }
    }
}

/// How one component joins the control plane.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// This instance's name in the registry; default: its kind and advertised address.
    #[arg(long, env = "EPSERVE_NAME")]
    pub name: Option<String>,
    /// The address others connect to, written in the registry: `HOST` (the listen port is kept) or
    /// `HOST:PORT`. Default: the listen address, or, when that is unspecified (`0.0.0.0`, `[::]`),
    /// this host's address on its default route. Never an unspecified address.
    #[arg(long, env = "EPSERVE_ADVERTISE", value_parser = parse_advertise)]
    pub advertise: Option<Advertise>,
}

fn parse_advertise(value: &str) -> Result<Advertise, String> {
    Advertise::parse(value).map_err(|e| e.to_string())
}

impl JoinArgs {
    pub fn registry(&self) -> Option<&str> {
        self.control.registry.as_deref()
    }

    /// Connects when `--registry` is given.
    pub fn connect(&self) -> Result<Option<ControlConnection>> {
        let Some(url) = self.registry() else { return Ok(None) };
        if !url.starts_with("etcd://") && !url.starts_with("etcds://") {
            bail!(
                "--registry {url}: a separate process needs a shared registry, `etcds://host:port[,host:port]` \
                 or `etcd://...` (the in-memory registry only exists inside one process)"
            );
        }
        // A lease shorter than a second would expire between two renewals on a loaded machine.
        let ttl = Duration::from_millis(self.control.lease_ttl_ms.max(1000));
        let connection = ControlConnection::connect_with(
            url,
            &self.control.cluster,
            ttl,
            self.name.clone(),
            &self.control.security(),
        )?;
        Ok(Some(connection.with_advertise(self.advertise.clone())))
    }
}
