//! [`ControlPlane`]: instances, placement and leader election on top of any [`Registry`].
//!
//! Every long-running piece (lease keeper, followers of a prefix, campaigns) is a task on the
//! runtime that calls it; the binaries give the control plane a runtime of its own, so that request
//! load on the serving runtime can never delay a keep-alive.

use std::sync::Arc;
use std::time::Duration;

use epserve_proto::metric_names as m;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::memory::MemoryRegistry;
use crate::registry::{Entry, Fence, LeaseId, Registry, RegistryError, Result};
use crate::registry_security::RegistrySecurity;
use crate::types::{Instance, Kind, PLACEMENT_KEY, PlacementMap, instances_prefix};

/// How often a follower lists again even without a change notification (covers a watch that
/// silently stalls).
const RESYNC: Duration = Duration::from_secs(5);
/// Pause before retrying after the registry failed.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ControlPlane {
    registry: Arc<dyn Registry>,
}

/// Where the registry is: `memory` (embedded, this process only) or `etcd://host:port[,host:port]`.
pub async fn connect(url: &str, cluster: &str) -> Result<ControlPlane> {
    connect_with(url, cluster, &RegistrySecurity::default()).await
}

/// [`connect`], also to `etcds://host:port[,host:port]` (etcd over TLS), with `security`'s CA,
/// client certificate and credentials.
pub async fn connect_with(url: &str, cluster: &str, security: &RegistrySecurity) -> Result<ControlPlane> {
    if cluster.is_empty() || cluster.contains('/') {
        return Err(RegistryError::Invalid(format!("cluster name {cluster:?} must be non-empty and contain no '/'")));
    }
    let registry: Arc<dyn Registry> = match url {
        "" | "memory" | "memory://" => Arc::new(MemoryRegistry::new()),
        _ => match etcd_hosts(url) {
            Some((hosts, tls)) => {
                let endpoints: Vec<String> = hosts
                    .split(',')
                    .map(|h| h.trim().trim_end_matches('/').to_owned())
                    .filter(|h| !h.is_empty())
                    .collect();
                Arc::new(crate::etcd::EtcdRegistry::connect_with(&endpoints, cluster, tls, security).await?)
            }
            None => {
                return Err(RegistryError::Invalid(format!(
                    "registry {url:?}: expected `memory`, `etcd://host:port[,host:port]` or `etcds://host:port[,host:port]`"
                )));
            }
        },
    };
    Ok(ControlPlane::new(registry))
}

/// The hosts of an `etcd://` (`false`) or `etcds://` (`true`, TLS) registry URL.
fn etcd_hosts(url: &str) -> Option<(&str, bool)> {
    url.strip_prefix("etcd://").map(|h| (h, false)).or_else(|| url.strip_prefix("etcds://").map(|h| (h, true)))
}

/// What a registered instance's keeper reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberState {
    /// The current lease, once registered.
    pub lease: Option<LeaseId>,
    /// How many times the lease was found lost and the instance registered again.
    pub re_registrations: u64,
}

/// A registered instance. Its record stays in the registry while this lives and the lease is kept
/// alive; dropping it (or [`Membership::leave`]) revokes the lease.
#[derive(Debug)]
pub struct Membership {
    record: Arc<Mutex<Instance>>,
    updates: mpsc::UnboundedSender<()>,
    state: watch::Receiver<MemberState>,
    stop: watch::Sender<bool>,
}

impl Membership {
    pub fn id(&self) -> String {
        self.record.lock().id.clone()
    }

    pub fn record(&self) -> Instance {
        self.record.lock().clone()
    }

    /// Changes the record and writes it again under the same lease.
    pub fn update(&self, change: impl FnOnce(&mut Instance)) {
        change(&mut self.record.lock());
        let _ = self.updates.send(());
    }

    pub fn state(&self) -> watch::Receiver<MemberState> {
        self.state.clone()
    }

    pub fn lease(&self) -> Option<LeaseId> {
        self.state.borrow().lease
    }

    /// Waits until the first registration succeeded.
    pub async fn registered(&self) -> LeaseId {
        let mut state = self.state.clone();
        loop {
            if let Some(lease) = state.borrow_and_update().lease {
                return lease;
            }
            if state.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Revokes the lease (the record disappears at once) and stops the keeper; waits for that at
    /// most 3 s (the lease then expires by itself).
    pub async fn leave(&self) {
        let _ = self.stop.send(true);
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            // The keeper drops its sender when it is done.
            while state.changed().await.is_ok() {}
        })
        .await;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(e: &Entry) -> Result<T> {
    serde_json::from_slice(&e.value)
        .map_err(|err| RegistryError::Corrupt { key: e.key.clone(), reason: err.to_string() })
}

impl ControlPlane {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        ControlPlane { registry }
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    pub fn describe(&self) -> String {
        self.registry.describe()
    }

    /// Registers `instance` under a lease of `ttl` and keeps it alive on a task (renewal every
    /// ttl/3). When the lease is found lost (expired while this process was cut off or stalled),
    /// the instance registers again under a new lease; while the registry is unreachable it keeps
    /// serving and retrying (etcd renews every lease when it restarts).
    pub fn register(&self, instance: Instance, ttl: Duration) -> Membership {
        let record = Arc::new(Mutex::new(instance));
        let (updates, mut pending) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(MemberState::default());
        let (stop, mut stopped) = watch::channel(false);
        let registry = self.registry.clone();
        let rec = record.clone();
        tokio::spawn(async move {
            let renew = (ttl / 3).max(Duration::from_millis(50));
            let mut re_registrations = 0u64;
            'register: loop {
                let lease = loop {
                    if *stopped.borrow() {
                        return;
                    }
                    let snapshot = rec.lock().clone();
                    let attempt = async {
                        let lease = registry.grant(ttl).await?;
                        registry.put(&snapshot.key(), encode(&snapshot), Some(lease)).await?;
                        Ok::<_, RegistryError>(lease)
                    };
                    match attempt.await {
                        Ok(lease) => break lease,
                        Err(e) => {
                            tracing::warn!(id = %snapshot.id, "cannot register with the registry, retrying: {e}");
                            tokio::select! {
                                _ = tokio::time::sleep(RETRY.min(renew)) => {}
                                _ = stopped.changed() => {}
                            }
                        }
                    }
                };
                let id = rec.lock().id.clone();
                tracing::info!(%id, lease = format!("{lease:x}"), "registered");
                state_tx.send_replace(MemberState { lease: Some(lease), re_registrations });
                let mut dirty = false;
                // A deadline, not a sleep restarted every pass: record updates arriving more often
                // than `renew` (a coordinator reporting placement versions during a rolling
                // restart) must not put the renewal off until the lease expires.
                let mut next_renewal = tokio::time::Instant::now() + renew;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next_renewal) => {
                            next_renewal = tokio::time::Instant::now() + renew;
                            match registry.keep_alive(lease).await {
                                Ok(true) => {}
                                Ok(false) => {
                                    tracing::warn!(%id, "lease lost (expired): registering again");
                                    break;
                                }
                                Err(e) => tracing::warn!(%id, "lease renewal failed, will retry: {e}"),
                            }
                        }
                        Some(()) = pending.recv() => dirty = true,
                        _ = stopped.changed() => {
                            if let Err(e) = registry.revoke(lease).await {
                                tracing::warn!(%id, "revoking the lease on exit: {e}");
                            }
                            return;
                        }
                    }
                    if dirty {
                        let snapshot = rec.lock().clone();
                        match registry.put(&snapshot.key(), encode(&snapshot), Some(lease)).await {
                            Ok(()) => dirty = false,
                            Err(RegistryError::Invalid(e)) => {
                                tracing::warn!(%id, "lease lost ({e}): registering again");
                                break;
                            }
                            Err(e) => tracing::warn!(%id, "updating the record failed, will retry: {e}"),
                        }
                    }
                }
                re_registrations += 1;
                metrics::counter!(m::CONTROL_REREGISTRATIONS_TOTAL).increment(1);
                state_tx.send_replace(MemberState { lease: None, re_registrations });
                continue 'register;
            }
        });
        Membership { record, updates, state, stop }
    }

    /// The registered instances of `kind`, once.
    pub async fn list(&self, kind: Kind) -> Result<Vec<Instance>> {
        let entries = self.registry.list(&instances_prefix(kind)).await?;
        entries.iter().map(decode).collect()
    }

    /// Follows the instances of `kind`: the receiver always holds the latest list (by id).
    pub fn instances(&self, kind: Kind) -> watch::Receiver<Vec<Instance>> {
        self.follow(instances_prefix(kind), Vec::new(), |entries| {
            // A corrupt record is skipped (and logged), not allowed to hide the others.
            Ok(entries
                .iter()
                .filter_map(|e| decode::<Instance>(e).map_err(|err| tracing::warn!("{err}")).ok())
                .collect())
        })
    }

    /// The current placement map, with its version.
    pub async fn placement(&self) -> Result<Option<PlacementMap>> {
        match self.registry.get(PLACEMENT_KEY).await? {
            None => Ok(None),
            Some(e) => {
                let mut map: PlacementMap = decode(&e)?;
                map.version = e.version;
                Ok(Some(map))
            }
        }
    }

    /// Writes `map` if the stored version is still `map.version` (0: no map yet) and, with a
    /// `fence` (from [`Self::campaign`]), only while its holder still leads. `Ok(false)`: someone
    /// else changed it first (read it again), or the leadership was lost.
    pub async fn swap_placement(&self, map: &PlacementMap, fence: Option<&Fence>) -> Result<bool> {
        let written = self.registry.put_if_version(PLACEMENT_KEY, encode(map), map.version, None, fence).await?;
        if written {
            metrics::gauge!(m::CONTROL_PLACEMENT_VERSION).set((map.version + 1) as f64);
        }
        Ok(written)
    }

    /// Follows the placement map.
    pub fn watch_placement(&self) -> watch::Receiver<Option<PlacementMap>> {
        self.follow(PLACEMENT_KEY.to_owned(), None, |entries| {
            let Some(e) = entries.iter().find(|e| e.key == PLACEMENT_KEY) else { return Ok(None) };
            let mut map: PlacementMap = decode(e)?;
            map.version = e.version;
            metrics::gauge!(m::CONTROL_PLACEMENT_VERSION).set(map.version as f64);
            Ok(Some(map))
        })
    }

    /// The current holder of `election`, if any.
    pub async fn leader(&self, election: &str) -> Result<Option<String>> {
        Ok(self.registry.get(&leader_key(election)).await?.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// Campaigns for `election` as `member` for as long as the membership lives: the receiver holds
    /// the leadership's [`Fence`] while `member` leads, `None` otherwise. Leadership is a key held by
    /// the member's lease, so it ends when the lease does; the others take over as soon as the key
    /// is gone. Writes the leader makes are fenced by it ([`Self::swap_placement`]): a deposed
    /// leader that has not noticed yet cannot overwrite its successor's decisions.
    pub fn campaign(&self, election: &str, member: &Membership) -> watch::Receiver<Option<Fence>> {
        let (tx, rx) = watch::channel(None);
        let registry = self.registry.clone();
        let key = leader_key(election);
        let id = member.id();
        let mut state = member.state();
        let mut stopped = member.stop.subscribe();
        tokio::spawn(async move {
            let mut changes: Option<crate::registry::Changes> = None;
            loop {
                if *stopped.borrow() {
                    tx.send_replace(None);
                    return;
                }
                if changes.is_none() {
                    changes = registry.watch(&key).await.ok();
                }
                let lease = state.borrow_and_update().lease;
                let leading = match lease {
                    None => Ok(false),
                    Some(lease) => match registry.get(&key).await {
                        Ok(Some(e)) => Ok(e.lease == Some(lease)),
                        Ok(None) => registry.put_if_version(&key, id.clone().into_bytes(), 0, Some(lease), None).await,
                        Err(e) => Err(e),
                    },
                };
                match leading {
                    Ok(now) => {
                        let fence = lease.filter(|_| now).map(|lease| Fence { key: key.clone(), lease });
                        let before = tx.send_replace(fence.clone());
                        if fence != before {
                            tracing::info!(%id, election = %key, "{}", if now { "became leader" } else { "no longer leader" });
                        }
                    }
                    // Without the registry nobody can take over, so the last answer stands.
                    Err(e) => tracing::warn!(%id, "election {key}: {e}"),
                }
                let notified = async {
                    match changes.as_mut() {
                        Some(c) => c.recv().await.is_some(),
                        None => {
                            tokio::time::sleep(RETRY).await;
                            true
                        }
                    }
                };
                tokio::select! {
                    open = notified => if !open { changes = None },
                    _ = state.changed() => {}
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        rx
    }

    /// Lists `prefix` again on every change notification (and every [`RESYNC`]), publishing the
    /// parsed value when it changed. A broken watch is re-established after [`RETRY`].
    fn follow<T>(
        &self,
        prefix: String,
        initial: T,
        parse: impl Fn(&[Entry]) -> Result<T> + Send + 'static,
    ) -> watch::Receiver<T>
    where
        T: PartialEq + Send + Sync + 'static,
    {
        let (tx, rx) = watch::channel(initial);
        let registry = self.registry.clone();
        tokio::spawn(async move {
            loop {
                let mut changes = match registry.watch(&prefix).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(prefix, "watch: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => continue,
                            _ = tx.closed() => return,
                        }
                    }
                };
                loop {
                    match registry.list(&prefix).await.and_then(|entries| parse(&entries)) {
                        Ok(value) => {
                            tx.send_if_modified(|current| {
                                if *current == value {
                                    return false;
                                }
                                *current = value;
                                true
                            });
                        }
                        Err(e) => {
                            tracing::debug!(prefix, "list: {e}");
                            tokio::time::sleep(RETRY).await;
                            break;
                        }
                    }
                    tokio::select! {
                        got = changes.recv() => if got.is_none() {
                            tokio::time::sleep(RETRY).await;
                            break;
                        },
                        _ = tokio::time::sleep(RESYNC) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        rx
    }
}

fn leader_key(election: &str) -> String {
    format!("leader/{election}")
}
