//! Per-client limits on the completion routes: a request rate (a token bucket per client, refilled
//! continuously, as nginx's `limit_req` and OpenAI's requests-per-minute limits work) and a number of
//! requests in flight. A client is its API key, or its address when the gateway has no keys. Both
//! limits are off by default; a refused request is a 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Per-client limits; 0 turns a limit off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests per minute; a client may send this many at once after a quiet minute (the burst).
    pub requests_per_minute: u32,
    /// Requests of one client in flight at once.
    pub max_concurrent: u32,
}

impl KeyLimits {
    pub fn is_off(&self) -> bool {
        self.requests_per_minute == 0 && self.max_concurrent == 0
    }
}

/// Why a client's request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate; a request is allowed again after `retry_after`.
    Rate { retry_after: Duration },
    /// At its limit of requests in flight.
    Concurrency,
}

impl Refusal {
    /// The `limit` label of `epserve_http_rate_limited_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Rate { .. } => "rate",
            Refusal::Concurrency => "concurrency",
        }
    }
}

/// The state of every client seen recently.
#[derive(Debug)]
pub struct KeyLimiter {
    limits: KeyLimits,
    clients: Mutex<HashMap<String, Client>>,
}

#[derive(Debug)]
struct Client {
    /// Requests the client may still send now (the bucket), as of `refilled`.
    allowance: f64,
    refilled: Instant,
    in_flight: Arc<AtomicU32>,
}

/// One admitted request of a client: counts against its concurrency until dropped.
#[derive(Debug)]
pub struct KeySlot(Arc<AtomicU32>);

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clients remembered before idle ones (full bucket, nothing in flight) are forgotten: with no API
/// keys a client is an address, and addresses are the network's to choose.
const PRUNE_ABOVE: usize = 10_000;

impl KeyLimiter {
    pub fn new(limits: KeyLimits) -> Self {
        KeyLimiter { limits, clients: Mutex::new(HashMap::new()) }
    }

    pub fn limits(&self) -> KeyLimits {
        self.limits
    }

    /// Admits one request of `client` now, or says why not. `None`: both limits are off.
    pub fn admit(&self, client: &str) -> Result<Option<KeySlot>, Refusal> {
        self.admit_at(client, Instant::now())
    }

    fn admit_at(&self, client: &str, now: Instant) -> Result<Option<KeySlot>, Refusal> {
        if self.limits.is_off() {
            return Ok(None);
        }
        let burst = f64::from(self.limits.requests_per_minute);
        let per_second = burst / 60.0;
        let mut clients = self.clients.lock();
        if clients.len() > PRUNE_ABOVE {
            clients.retain(|_, c| {
                let full = c.allowance + per_second * now.duration_since(c.refilled).as_secs_f64() >= burst;
                !full || c.in_flight.load(Ordering::Relaxed) > 0
            });
        }
        let c = clients.entry(client.to_owned()).or_insert_with(|| Client {
            allowance: burst,
            refilled: now,
            in_flight: Arc::new(AtomicU32::new(0)),
        });
        if self.limits.max_concurrent > 0 && c.in_flight.load(Ordering::Relaxed) >= self.limits.max_concurrent {
            return Err(Refusal::Concurrency);
        }
        if self.limits.requests_per_minute > 0 {
            c.allowance = (c.allowance + per_second * now.duration_since(c.refilled).as_secs_f64()).min(burst);
            c.refilled = now;
            if c.allowance < 1.0 {
                return Err(Refusal::Rate { retry_after: Duration::from_secs_f64((1.0 - c.allowance) / per_second) });
            }
            c.allowance -= 1.0;
        }
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Some(KeySlot(c.in_flight.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_admits_everything() {
        let limiter = KeyLimiter::new(KeyLimits::default());
        assert!((0..1000).all(|_| matches!(limiter.admit("k"), Ok(None))));
    }

    #[test]
    fn rate_refills_over_time() {
        let limiter = KeyLimiter::new(KeyLimits { requests_per_minute: 2, max_concurrent: 0 });
        let t0 = Instant::now();
        assert!(limiter.admit_at("a", t0).is_ok());
        assert!(limiter.admit_at("a", t0).is_ok(), "the burst is the per-minute count");
        let Err(Refusal::Rate { retry_after }) = limiter.admit_at("a", t0) else { panic!("over the rate") };
        assert_eq!(retry_after.as_secs(), 30, "one request per 30 s");
        assert!(limiter.admit_at("b", t0).is_ok(), "another client has its own bucket");
        assert!(limiter.admit_at("a", t0 + Duration::from_secs(31)).is_ok());
        assert!(limiter.admit_at("a", t0 + Duration::from_secs(31)).is_err());
    }

    #[test]
    fn concurrency_counts_slots_until_dropped() {
        let limiter = KeyLimiter::new(KeyLimits { requests_per_minute: 0, max_concurrent: 2 });
        let a = limiter.admit("k").expect("first");
        let _b = limiter.admit("k").expect("second");
        assert_eq!(limiter.admit("k").err(), Some(Refusal::Concurrency));
        drop(a);
        assert!(limiter.admit("k").is_ok());
    }
}
