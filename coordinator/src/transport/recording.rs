//! Routing traces (`--record-routing PATH`, issue 17): where a serving process's routing is
//! observed. Once a [`RoutingSink`] is installed for the process ([`record_routing`], as a metrics
//! recorder is), every [`super::ExpertTransport`] tells it each batch's per-expert rows, and that a
//! step ended when the step is told finished ([`epserve_model::ExpertBackend::step_finished`], only
//! after a step that completed). The sink (the CLI's, writing the `epserve-eplb` trace format) must
//! not block: it is called on the step thread. One process, one trace: the coordinator, `generate`
//! and `engine-bench` each run one model.

use std::sync::{Arc, RwLock};

use epserve_model::ExpertGroup;

/// Receives the routing of every step.
pub trait RoutingSink: Send + Sync {
    /// One batch of `layer`, its rows grouped by expert (micro-batch overlap sends a layer in two).
    fn record_groups(&self, layer: usize, groups: &[ExpertGroup]);
    /// The step whose batches were recorded since the last call completed.
    fn end_step(&self);
}

/// The process's routing sink, if routing is being recorded.
static ROUTING: RwLock<Option<Arc<dyn RoutingSink>>> = RwLock::new(None);

/// Sends the routing of every step of this process's expert transports to `sink` (in place of any
/// earlier one, which is returned).
pub fn record_routing(sink: Arc<dyn RoutingSink>) -> Option<Arc<dyn RoutingSink>> {
    ROUTING.write().unwrap_or_else(|e| e.into_inner()).replace(sink)
}

/// Stops recording and returns the sink (for its owner to close).
pub fn stop_recording() -> Option<Arc<dyn RoutingSink>> {
    ROUTING.write().unwrap_or_else(|e| e.into_inner()).take()
}

/// Ends the step being recorded, for callers that step a model without an engine (`generate`);
/// nothing when no sink is installed.
pub fn end_recorded_step() {
    with_sink(|s| s.end_step());
}

pub(super) fn with_sink(f: impl FnOnce(&dyn RoutingSink)) {
    if let Some(sink) = ROUTING.read().unwrap_or_else(|e| e.into_inner()).as_deref() {
        f(sink);
    }
}
