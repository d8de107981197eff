//! `--registry` / `--cluster`: joining the control plane. The control plane gets a runtime of its
//! own (one thread), so that lease keep-alives and watches never wait behind request handling.

use std::time::Duration;

use anyhow::{Context, Result};
use epserve_control::{ControlPlane, Instance, Membership};

#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Control plane to register with and discover the cluster through: `etcd://host:port[,host:port]`.
    /// Without it the component is wired statically (addresses on the command line).
    #[arg(long, env = "EPSERVE_REGISTRY")]
    pub registry: Option<String>,
    /// Cluster name: the namespace of this cluster's keys (`/epserve/<cluster>/` in etcd).
    #[arg(long, default_value = "default", env = "EPSERVE_CLUSTER")]
    pub cluster: String,
    /// This instance's name in the registry; default: its kind and listen address.
    #[arg(long, env = "EPSERVE_NAME")]
    pub name: Option<String>,
    /// Lease TTL in milliseconds: how long after a crash the instance is considered gone.
    #[arg(long, default_value_t = 10_000, env = "EPSERVE_LEASE_TTL_MS")]
    pub lease_ttl_ms: u64,
}

/// A process's connection to the control plane.
pub struct Control {
    pub plane: ControlPlane,
    pub runtime: tokio::runtime::Runtime,
    ttl: Duration,
    name: Option<String>,
}

impl ControlArgs {
    /// Connects when `--registry` is given.
    pub fn connect(&self) -> Result<Option<Control>> {
        let Some(url) = &self.registry else { return Ok(None) };
        if !url.starts_with("etcd://") {
            anyhow::bail!(
                "--registry {url}: a separate process needs a shared registry, `etcd://host:port[,host:port]` \
                 (the in-memory registry only exists inside one process)"
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("epserve-control")
            .enable_all()
            .build()?;
        let plane = runtime
            .block_on(epserve_control::connect(url, &self.cluster))
            .with_context(|| format!("connecting to the registry {url}"))?;
        tracing::info!(registry = %plane.describe(), cluster = %self.cluster, "control plane");
        Ok(Some(Control {
            plane,
            runtime,
            ttl: Duration::from_millis(self.lease_ttl_ms.max(1000)),
            name: self.name.clone(),
        }))
    }
}

impl Control {
    /// Registers `instance` (named `--name` if given); the keeper runs on the control runtime.
    pub fn register(&self, mut instance: Instance) -> Membership {
        if let Some(name) = &self.name {
            instance.id = name.clone();
        }
        let _guard = self.runtime.enter();
        self.plane.register(instance, self.ttl)
    }
}
