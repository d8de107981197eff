//! The coordinator: the engine that holds every non-expert weight and drives the forward pass. At
//! every MoE layer it routes tokens, dispatches the routed rows to the experts through an
//! [`ExpertTransport`] (in process, or expert workers over gRPC), computes the shared expert while
//! they work, and combines their answers. A step can be split into two micro-batches whose attention
//! and expert phases overlap ([`overlap`]). [`run`](mod@run) is the coordinator process's lifecycle
//! (registration, leader campaign, the wait for the workers, KV sizing); [`loading`] loads a
//! checkpoint and chooses the transport.
//!
//! Boundaries: no HTTP, no tokenization (the gateway's), no expert weights of its own when the
//! transport is remote.

mod admission;
pub mod balancing_service;
pub mod engine;
pub mod errors;
pub mod health;
pub mod images;
pub mod kv_pool;
pub mod load_telemetry;
pub mod loading;
mod masks;
pub mod overlap;
pub mod placement;
pub mod rebalance;
pub mod run;
pub mod sampling;
pub mod server;
pub mod transport;

pub use errors::TransportError;
pub use images::{ImageSpec, Vision};
pub use loading::{LoadConfig, LoadError, LoadedModel, StandaloneModel, load_model};
pub use run::{
    CoordinatorConfig, DEFAULT_SHUTDOWN_GRACE, EngineSizing, ReadyCoordinator, RunError, run, start, start_with_tls,
};
pub use transport::{ExpertTransport, GrpcConfig, GrpcExperts, LinkMedium, ShmConfig, WorkerTransport};
