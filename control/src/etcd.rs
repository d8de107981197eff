//! The etcd backend (etcd v3 API through `etcd-client`). Keys live under `/epserve/<cluster>/`;
//! leases are etcd leases; the compare-and-swap token is etcd's per-key `version`; watches are etcd
//! prefix watches whose events are turned into coalesced change notifications. The client
//! reconnects by itself when etcd comes back; a broken watch closes its channel so that the caller
//! lists again.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::mpsc;

use crate::registry::{BoxFuture, Changes, Entry, Fence, LeaseId, Registry, RegistryError, Result};
use crate::registry_security::RegistrySecurity;

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    endpoints: Vec<String>,
    namespace: String,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").field("endpoints", &self.endpoints).field("namespace", &self.namespace).finish()
    }
}

fn unavailable(e: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

/// etcd answers a write under an expired or revoked lease with this status.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// The error of a write under `lease`: `Invalid` when the lease is gone (retrying cannot help).
fn write_error(e: etcd_client::Error, lease: Option<LeaseId>) -> RegistryError {
    if lease_not_found(&e) {
        RegistryError::Invalid(format!("lease {:x} does not exist (expired or revoked)", lease.unwrap_or(0)))
    } else {
        unavailable(e)
    }
}

impl EtcdRegistry {
    /// Connects to `endpoints` (`host:port`); keys go under `/epserve/<cluster>/`. The connection is
    /// established lazily, so this succeeds while etcd is briefly down; operations fail until it is
    /// back.
    pub async fn connect(endpoints: &[String], cluster: &str) -> Result<Self> {
        Self::connect_with(endpoints, cluster, false, &RegistrySecurity::default()).await
    }

    /// [`Self::connect`] over TLS when `tls` (etcd's certificate checked against `security.ca`),
    /// with `security`'s client certificate and credentials. With credentials the connection is made
    /// (and the user authenticated) now.
    pub async fn connect_with(
        endpoints: &[String],
        cluster: &str,
        tls: bool,
        security: &RegistrySecurity,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(RegistryError::Invalid("no etcd endpoint given".into()));
        }
        let urls: Vec<String> = match tls {
            true => endpoints.iter().map(|e| format!("https://{e}")).collect(),
            false => endpoints.iter().map(|e| epserve_proto::server_uri(e)).collect(),
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let options = security.apply(options, tls)?;
        let client = Client::connect(&urls, Some(options)).await.map_err(unavailable)?;
        Ok(EtcdRegistry { client, endpoints: endpoints.to_vec(), namespace: format!("/epserve/{cluster}/") })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Result<Entry> {
        let key = kv
            .key_str()
            .map_err(|e| RegistryError::Corrupt { key: format!("{:?}", kv.key()), reason: e.to_string() })?;
        Ok(Entry {
            key: key.strip_prefix(&self.namespace).unwrap_or(key).to_owned(),
            value: kv.value().to_vec(),
            version: kv.version().max(0) as u64,
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l))
}

impl Registry for EtcdRegistry {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        Box::pin(async move {
            let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
            let granted = self.client.clone().lease_grant(secs, None).await.map_err(unavailable)?;
            Ok(granted.id())
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            match self.client.clone().lease_keep_alive(lease).await {
                Ok(_) => Ok(true),
                // The client reports a renewal answered with TTL 0 this way: the lease is gone.
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
                Err(e) if lease_not_found(&e) => Ok(false),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match self.client.clone().lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(e) if lease_not_found(&e) => Ok(()),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.client.clone().put(self.full(key), value, put_options(lease)).await {
                Ok(_) => Ok(()),
                Err(e) => Err(write_error(e, lease)),
            }
        })
    }

    fn put_if_version<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: u64,
        lease: Option<LeaseId>,
        fence: Option<&'a Fence>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let full = self.full(key);
            let mut conditions = vec![Compare::version(full.clone(), CompareOp::Equal, expected as i64)];
            if let Some(f) = fence {
                // A missing key compares with lease 0, which no granted lease has.
                conditions.push(Compare::lease(self.full(&f.key), CompareOp::Equal, f.lease));
            }
            let txn = Txn::new().when(conditions).and_then([TxnOp::put(full, value, put_options(lease))]);
            match self.client.clone().txn(txn).await {
                Ok(r) => Ok(r.succeeded()),
                Err(e) => Err(write_error(e, lease)),
            }
        })
    }

    fn delete_if_lease<'a>(&'a self, key: &'a str, lease: LeaseId) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let full = self.full(key);
            let txn = Txn::new()
                .when([Compare::lease(full.clone(), CompareOp::Equal, lease)])
                .and_then([TxnOp::delete(full, None)]);
            Ok(self.client.clone().txn(txn).await.map_err(unavailable)?.succeeded())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>>> {
        Box::pin(async move {
            let got = self.client.clone().get(self.full(key), None).await.map_err(unavailable)?;
            got.kvs().first().map(|kv| self.entry(kv)).transpose()
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>> {
        Box::pin(async move {
            let got = self
                .client
                .clone()
                .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(unavailable)?;
            got.kvs().iter().map(|kv| self.entry(kv)).collect()
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Changes>> {
        Box::pin(async move {
            let mut stream = self
                .client
                .clone()
                .watch(self.full(prefix), Some(WatchOptions::new().with_prefix()))
                .await
                .map_err(unavailable)?;
            let (tx, rx) = mpsc::channel(1);
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tx.closed() => break,
                        message = stream.message() => match message {
                            Ok(Some(r)) if r.canceled() => {
                                tracing::warn!(prefix, "etcd watch canceled: {}", r.cancel_reason());
                                break;
                            }
                            Ok(Some(r)) => {
                                if !r.events().is_empty() && matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(_))) {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(prefix, "etcd watch broke: {e}");
                                break;
                            }
                        }
                    }
                }
                // Dropping `tx` closes the channel: the owner lists again and re-watches.
            });
            Ok(rx)
        })
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }
}
