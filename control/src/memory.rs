//! The in-memory backend: the embedded default when no `--registry` is given. One process's view
//! only — instances in other processes cannot see it — so it serves single-process deployments,
//! embedding, and the contract tests that hold it to etcd's behaviour (leases expire, versions
//! count writes, watches fire on expiry too).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::registry::{BoxFuture, Changes, Entry, Fence, LeaseId, Registry, RegistryError, Result};

#[derive(Debug)]
struct Stored {
    value: Vec<u8>,
    version: u64,
    lease: Option<LeaseId>,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<String, Stored>,
    /// Lease → (ttl, expiry).
    leases: HashMap<LeaseId, (Duration, Instant)>,
    next_lease: LeaseId,
    watchers: Vec<(String, mpsc::Sender<()>)>,
}

impl State {
    fn notify(&mut self, key: &str) {
        self.watchers.retain(|(prefix, tx)| {
            if key.starts_with(prefix.as_str()) {
                // Full means a notification is already pending: changes coalesce.
                !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(_)))
            } else {
                !tx.is_closed()
            }
        });
    }

    fn drop_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let keys: Vec<String> =
            self.entries.iter().filter(|(_, s)| s.lease == Some(lease)).map(|(k, _)| k.clone()).collect();
        for key in keys {
            self.entries.remove(&key);
            self.notify(&key);
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, (_, at))| *at <= now).map(|(id, _)| *id).collect();
        for lease in expired {
            self.drop_lease(lease);
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => {
                Err(RegistryError::Invalid(format!("lease {id:x} does not exist (expired or revoked)")))
            }
            _ => Ok(()),
        }
    }

    fn write(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) {
        let version = self.entries.get(key).map_or(0, |s| s.version) + 1;
        self.entries.insert(key.to_owned(), Stored { value, version, lease });
        self.notify(key);
    }
}

/// Cloning shares the same store.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    /// A fresh store, with a reaper thread that expires leases (it ends with the last clone).
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State { next_lease: 1, ..State::default() }));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
        let reaper = std::thread::Builder::new().name("epserve-registry-reaper".into()).spawn(move || {
            while let Some(state) = weak.upgrade() {
                state.lock().expire(Instant::now());
                drop(state);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        if let Err(e) = reaper {
            tracing::error!("cannot start the in-memory registry's lease reaper: {e}");
        }
        MemoryRegistry { state }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock();
        state.expire(Instant::now());
        f(&mut state)
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl Registry for MemoryRegistry {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        if ttl.is_zero() {
            return ready(Err(RegistryError::Invalid("a lease needs a positive TTL".into())));
        }
        ready(Ok(self.with(|s| {
            let id = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(id, (ttl, Instant::now() + ttl));
            id
        })))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool>> {
        ready(Ok(self.with(|s| match s.leases.get_mut(&lease) {
            Some((ttl, at)) => {
                *at = Instant::now() + *ttl;
                true
            }
            None => false,
        })))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        self.with(|s| s.drop_lease(lease));
        ready(Ok(()))
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>, lease: Option<LeaseId>) -> BoxFuture<'a, Result<()>> {
        ready(self.with(|s| {
            s.check_lease(lease)?;
            s.write(key, value, lease);
            Ok(())
        }))
    }

    fn put_if_version<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: u64,
        lease: Option<LeaseId>,
        fence: Option<&'a Fence>,
    ) -> BoxFuture<'a, Result<bool>> {
        ready(self.with(|s| {
            s.check_lease(lease)?;
            if s.entries.get(key).map_or(0, |e| e.version) != expected {
                return Ok(false);
            }
            if let Some(f) = fence
                && s.entries.get(&f.key).and_then(|e| e.lease) != Some(f.lease)
            {
                return Ok(false);
            }
            s.write(key, value, lease);
            Ok(true)
        }))
    }

    fn delete_if_lease<'a>(&'a self, key: &'a str, lease: LeaseId) -> BoxFuture<'a, Result<bool>> {
        ready(Ok(self.with(|s| {
            if s.entries.get(key).and_then(|e| e.lease) != Some(lease) {
                return false;
            }
            s.entries.remove(key);
            s.notify(key);
            true
        })))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>>> {
        ready(Ok(self.with(|s| {
            s.entries.get(key).map(|e| Entry {
                key: key.to_owned(),
                value: e.value.clone(),
                version: e.version,
                lease: e.lease,
            })
        })))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>> {
        ready(Ok(self.with(|s| {
            s.entries
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| Entry { key: k.clone(), value: e.value.clone(), version: e.version, lease: e.lease })
                .collect()
        })))
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Changes>> {
        let (tx, rx) = mpsc::channel(1);
        self.with(|s| s.watchers.push((prefix.to_owned(), tx)));
        ready(Ok(rx))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
