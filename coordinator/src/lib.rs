//! The coordinator: the engine that holds every non-expert weight and drives the forward pass. At
//! every MoE layer it routes tokens, dispatches the routed rows to the experts through an
//! [`ExpertTransport`] (in process, or expert workers over gRPC), computes the shared expert while
//! they work, and combines their answers. A step can be split into two micro-batches whose attention
//! and expert phases overlap ([`overlap`]).
//!
//! Boundaries: no HTTP, no tokenization (the gateway's), no expert weights of its own when the
//! transport is remote.

pub mod engine;
pub mod errors;
pub mod kv_pool;
pub mod overlap;
pub mod placement;
pub mod sampling;
pub mod server;
pub mod transport;

pub use errors::TransportError;
pub use transport::{ExpertTransport, GrpcConfig, GrpcExperts};
