//! [`ControlConnection`]: one process's connection to the control plane. The plane's tasks (lease
//! keep-alives, followers, campaigns, the placement controller) run on a runtime of their own, one
//! thread, so that request load on the serving runtime can never delay a keep-alive (as Dynamo keeps
//! its etcd leases on a small runtime of their own).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::address::{Advertise, advertised_addr};
use crate::plane::{ControlPlane, Membership};
use crate::registry::{Fence, RegistryError};
use crate::registry_security::RegistrySecurity;
use crate::types::{Instance, Kind, PlacementMap};

/// Why a process could not join the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("starting the control plane's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("connecting to the registry {url}")]
    Registry {
        url: String,
        #[source]
        source: RegistryError,
    },
}

/// A process's connection to the control plane: the plane, the runtime its tasks run on, and how
/// this process registers (lease TTL, an optional fixed name).
#[derive(Debug)]
pub struct ControlConnection {
    plane: ControlPlane,
    /// Always `Some` until dropped; shut down in the background on drop, so that a connection may be
    /// dropped inside an async context too (several components in one test process).
    runtime: Option<Runtime>,
    handle: Handle,
    lease_ttl: Duration,
    name: Option<String>,
    /// What to advertise instead of the bound address (`--advertise`).
    advertise: Option<Advertise>,
    /// The registry's first endpoint (`host:port`), to find this host's route when it has no
    /// default route.
    registry_endpoint: Option<String>,
}

impl ControlConnection {
    /// Connects to the registry at `url` (`etcd://host:port[,host:port]`, or `memory` for a registry
    /// private to this process) under the namespace of `cluster`. Blocks: call it outside any async
    /// context.
    pub fn connect(url: &str, cluster: &str, lease_ttl: Duration, name: Option<String>) -> Result<Self, ConnectError> {
        Self::connect_with(url, cluster, lease_ttl, name, &RegistrySecurity::default())
    }

    /// [`Self::connect`], also to `etcds://` registries, with `security`'s CA, client certificate
    /// and credentials.
    pub fn connect_with(
        url: &str,
        cluster: &str,
        lease_ttl: Duration,
        name: Option<String>,
        security: &RegistrySecurity,
    ) -> Result<Self, ConnectError> {
        let runtime = control_runtime()?;
        let plane = runtime
            .block_on(crate::plane::connect_with(url, cluster, security))
            .map_err(|source| ConnectError::Registry { url: url.to_owned(), source })?;
        tracing::info!(registry = %plane.describe(), cluster, "control plane");
        let mut connection = Self::with_runtime(plane, runtime, lease_ttl, name);
        connection.registry_endpoint = url
            .split_once("://")
            .and_then(|(_, hosts)| hosts.split(',').next())
            .map(|h| h.trim().trim_end_matches('/').to_owned());
        Ok(connection)
    }

    /// Joins an existing plane: several components of one process can share one
    /// [`crate::MemoryRegistry`] this way, each with a connection (and a runtime) of its own.
    pub fn new(plane: ControlPlane, lease_ttl: Duration, name: Option<String>) -> Result<Self, ConnectError> {
        Ok(Self::with_runtime(plane, control_runtime()?, lease_ttl, name))
    }

    fn with_runtime(plane: ControlPlane, runtime: Runtime, lease_ttl: Duration, name: Option<String>) -> Self {
        let handle = runtime.handle().clone();
        ControlConnection {
            plane,
            runtime: Some(runtime),
            handle,
            lease_ttl,
            name,
            advertise: None,
            registry_endpoint: None,
        }
    }

    /// Advertises `advertise` (`--advertise`) in this process's records instead of the address
    /// its server is bound to.
    pub fn with_advertise(mut self, advertise: Option<Advertise>) -> Self {
        self.advertise = advertise;
        self
    }

    /// The address to write in a record for a server bound to `local` (see [`advertised_addr`]).
    pub fn advertised(&self, local: SocketAddr) -> String {
        advertised_addr(local, self.advertise.as_ref(), self.registry_endpoint.as_deref())
    }

    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// Registers `instance` (named by the connection's fixed name, if it has one) under a lease that
    /// is kept alive on the control runtime.
    pub fn register(&self, mut instance: Instance) -> Arc<Membership> {
        if let Some(name) = &self.name {
            instance.id = name.clone();
        }
        let _entered = self.handle.enter();
        Arc::new(self.plane.register(instance, self.lease_ttl))
    }

    /// Follows the registered instances of `kind` (see [`ControlPlane::instances`]).
    pub fn instances(&self, kind: Kind) -> watch::Receiver<Vec<Instance>> {
        let _entered = self.handle.enter();
        self.plane.instances(kind)
    }

    /// Follows the placement map (see [`ControlPlane::watch_placement`]).
    pub fn watch_placement(&self) -> watch::Receiver<Option<PlacementMap>> {
        let _entered = self.handle.enter();
        self.plane.watch_placement()
    }

    /// Campaigns for `election` as `member` (see [`ControlPlane::campaign`]).
    pub fn campaign(&self, election: &str, member: &Membership) -> watch::Receiver<Option<Fence>> {
        let _entered = self.handle.enter();
        self.plane.campaign(election, member)
    }

    /// Runs `task` on the control runtime.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }

    /// Leaves the cluster: revokes the membership's lease (its record disappears at once, not a TTL
    /// later) on the control runtime, and waits for that.
    pub async fn leave(&self, membership: Arc<Membership>) {
        let _ = self.handle.spawn(async move { membership.leave().await }).await;
    }
}

impl Drop for ControlConnection {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn control_runtime() -> Result<Runtime, ConnectError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("epserve-control")
        .enable_all()
        .build()
        .map_err(ConnectError::Runtime)
}
