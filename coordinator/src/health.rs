//! The coordinator's readiness for orchestrators: the standard gRPC health service
//! (`grpc.health.v1`, `tonic-health`) on the coordinator's port, answered from the moment the port is
//! bound — while the model loads and the coordinator waits for its workers, not ready.
//!
//! Readiness (`""` and `epserve.v1.CoordinatorService`): `SERVING` while the engine runs and every
//! routed expert of every MoE layer is listed by a live worker's record (a lease in the registry;
//! with static workers, the engine alone); `NOT_SERVING` before, when an expert loses its last host,
//! and from the start of a drain on. [`LIVENESS_SERVICE`] stays `SERVING` while the process answers.
//! The coordinator's own `CoordinatorService.Health` says the same as readiness.

use std::collections::HashSet;
use std::time::Duration;

use epserve_control::Instance;
use epserve_control::controller::Layout;
pub use epserve_health::{EarlyHealth, Health, LIVENESS_SERVICE};
pub use epserve_proto::v1::coordinator_service_server::SERVICE_NAME as COORDINATOR_SERVICE;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::EngineHandle;

/// Keeps readiness up to date until aborted: ready while the engine runs and (with a registry)
/// every expert of `layout` has a live host among `workers`. The engine's death is checked once a
/// second, the records as they change.
pub(crate) fn follow_readiness(
    health: Health,
    engine: EngineHandle,
    mut workers: Option<watch::Receiver<Vec<Instance>>>,
    layout: Layout,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let uncovered = workers.as_mut().map_or(0, |w| uncovered(&w.borrow_and_update(), &layout));
            let died = engine.died();
            let ready = died.is_none() && uncovered == 0;
            if last != Some(ready) {
                if !ready {
                    tracing::warn!(uncovered, engine_died = died.is_some(), "not ready");
                } else if last.is_some() {
                    tracing::info!("ready again: every expert has a live host");
                }
                health.set_ready(ready).await;
                last = Some(ready);
            }
            let changed = async {
                let open = match workers.as_mut() {
                    Some(w) => w.changed().await.is_ok(),
                    None => false,
                };
                if !open {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// How many `(layer, expert)` pairs of `layout` no worker record lists (in its experts, hosted in
/// every MoE layer, or its per-layer replicas).
fn uncovered(workers: &[Instance], layout: &Layout) -> usize {
    let everywhere: HashSet<u32> = workers.iter().flat_map(|w| w.experts.iter().copied()).collect();
    let mut missing = 0;
    for &layer in &layout.moe_layers {
        for e in 0..layout.num_experts {
            let hosted = everywhere.contains(&e)
                || workers.iter().any(|w| w.replicas.get(&layer).is_some_and(|r| r.contains(&e)));
            if !hosted {
                missing += 1;
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use epserve_control::Kind;

    fn worker(experts: &[u32], replicas: &[(u32, &[u32])]) -> Instance {
        Instance {
            experts: experts.to_vec(),
            replicas: replicas.iter().map(|&(l, r)| (l, r.to_vec())).collect(),
            ..Instance::new(Kind::Worker, format!("w{experts:?}"), "127.0.0.1:1")
        }
    }

    #[test]
    fn every_pair_needs_a_host() {
        let layout = Layout { moe_layers: vec![1, 3], num_experts: 4 };
        assert_eq!(uncovered(&[], &layout), 8);
        assert_eq!(uncovered(&[worker(&[0, 1], &[])], &layout), 4);
        assert_eq!(uncovered(&[worker(&[0, 1], &[]), worker(&[2, 3], &[])], &layout), 0);
        // Expert 3 only in layer 1: layer 3 still lacks it.
        assert_eq!(uncovered(&[worker(&[0, 1], &[]), worker(&[2], &[(1, &[3])])], &layout), 1);
        assert_eq!(uncovered(&[worker(&[0, 1], &[(3, &[3])]), worker(&[2], &[(1, &[3])])], &layout), 0);
    }
}
