//! The worker's readiness for orchestrators: the standard gRPC health service (`grpc.health.v1`,
//! `tonic-health`) on the worker's own port, answered from the moment the port is bound — while the
//! experts load (a 200 GB checkpoint takes minutes), not ready — and the drain on shutdown.
//!
//! Two names matter to probes: `""` (and `epserve.v1.ExpertService`) is readiness: `SERVING` once
//! the experts are loaded, `NOT_SERVING` while loading and while draining; [`LIVENESS_SERVICE`] is
//! `SERVING` for as long as the process answers at all, so that a slow start or a drain is never
//! taken for a hung process.

use std::time::{Duration, Instant};

pub use epserve_health::{EarlyHealth, Health, LIVENESS_SERVICE};
pub use epserve_proto::v1::expert_service_server::SERVICE_NAME as EXPERT_SERVICE;

/// What the drain watches: the worker's exchange streams and exchanges.
pub(crate) trait Traffic {
    /// Exchange streams open (one per coordinator routing here).
    fn streams_open(&self) -> usize;
    /// Exchanges received and not answered yet.
    fn exchanges_in_flight(&self) -> usize;
    /// Exchanges received so far.
    fn exchanges_received(&self) -> u64;
}

/// No exchange for this long, after leaving the registry: no coordinator routes here any more,
/// even one that keeps its (idle) stream open.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(1000);

/// Waits, after the worker left the registry, until no coordinator routes here: nothing in flight,
/// and every exchange stream closed or none used for [`DRAIN_QUIET`]. True if that was reached
/// before `deadline`.
pub(crate) async fn wait_unrouted(traffic: &impl Traffic, deadline: Instant) -> bool {
    let (mut seen, mut quiet_since) = (traffic.exchanges_received(), Instant::now());
    loop {
        let idle = traffic.exchanges_in_flight() == 0;
        if idle && (traffic.streams_open() == 0 || quiet_since.elapsed() >= DRAIN_QUIET) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = traffic.exchanges_received();
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        streams: AtomicUsize,
        in_flight: AtomicUsize,
        received: AtomicU64,
    }

    impl Traffic for Fake {
        fn streams_open(&self) -> usize {
            self.streams.load(Ordering::Relaxed)
        }
        fn exchanges_in_flight(&self) -> usize {
            self.in_flight.load(Ordering::Relaxed)
        }
        fn exchanges_received(&self) -> u64 {
            self.received.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn unrouted_at_once_without_streams() {
        let fake = Fake::default();
        let started = Instant::now();
        assert!(wait_unrouted(&fake, Instant::now() + Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn an_idle_open_stream_waits_for_the_quiet_period() {
        let fake = Fake { streams: AtomicUsize::new(1), ..Default::default() };
        let started = Instant::now();
        assert!(wait_unrouted(&fake, Instant::now() + Duration::from_secs(5)).await);
        assert!(started.elapsed() >= DRAIN_QUIET);
    }

    #[tokio::test]
    async fn an_exchange_in_flight_holds_the_drain_until_the_deadline() {
        let fake = Fake { streams: AtomicUsize::new(1), in_flight: AtomicUsize::new(1), ..Default::default() };
        let started = Instant::now();
        assert!(!wait_unrouted(&fake, Instant::now() + Duration::from_millis(300)).await);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
