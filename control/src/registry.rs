//! The `Registry` trait: the small key-value contract every control-plane backend implements —
//! leases with a TTL, keys that live as long as their lease, a per-key version for compare-and-swap,
//! prefix listing, and change notifications on a prefix. Everything the cluster needs (instances,
//! the placement map, leader election) is built once on top of it in [`crate::ControlPlane`], so
//! the in-memory and etcd backends differ only here and pass the same contract tests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lease granted by the backend; keys put under it vanish when it expires or is revoked.
pub type LeaseId = i64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The backend could not be reached or did not answer: the operation may succeed later.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry address or an argument is wrong: retrying will not help.
    #[error("registry: {0}")]
    Invalid(String),
    /// A stored value could not be decoded.
    #[error("registry key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, RegistryError>;

/// One stored key. `version` counts the writes since the key was created (1 after the first): the
/// compare-and-swap token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub version: u64,
    pub lease: Option<LeaseId>,
}

/// Notifications that something under a watched prefix changed (coalesced: one pending message
/// stands for any number of changes). The channel closing means the watch broke (the backend went
/// away): the caller lists again and re-watches.
pub type Changes = mpsc::Receiver<()>;

/// A condition on another key that a write requires: `key` must exist and be held by `lease`.
/// Leadership is such a key (held by the leader's lease), so a write fenced by it is refused once
/// the writer is no longer the leader, even if it has not noticed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub lease: LeaseId,
}

/// A control-plane backend. Keys are relative to the cluster's namespace, which the backend adds.
pub trait Registry: Send + Sync + fmt::Debug {
    /// Grants a lease that expires `ttl` after its last keep-alive.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>>;
    /// Renews the lease: `Ok(false)` when it no longer exists (expired or revoked).
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool>>;
    /// Revokes the lease and deletes its keys.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>>;
    /// Writes `key` (under `lease` when given). Fails when the lease does not exist.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFuture<'a, Result<()>>;
    /// Writes `key` only if its version is `expected` (0: the key must be absent) and, with a
    /// `fence`, only while the fence's key is held by its lease, atomically; `Ok(false)` if not.
    fn put_if_version<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: u64,
        lease: Option<LeaseId>,
        fence: Option<&'a Fence>,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Deletes `key` only if it is held by `lease`; `Ok(false)` if not.
    fn delete_if_lease<'a>(&'a self, key: &'a str, lease: LeaseId) -> BoxFuture<'a, Result<bool>>;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>>>;
    /// Every key starting with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>>;
    /// Starts notifying changes (writes, deletes, expiries) of keys starting with `prefix`.
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Changes>>;
    /// Where this backend is, for logs (`memory`, `etcd://host:2379`).
    fn describe(&self) -> String;
}
