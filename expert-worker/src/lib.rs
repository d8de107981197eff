//! The expert worker: hosts a shard (any subset of expert ids) of the routed experts of every MoE
//! layer, loaded from the memory-mapped checkpoint (only its experts' slices are read), and answers
//! `ExpertService.Exchange`: rows grouped by expert in, SwiGLU outputs out, in the same order.
//!
//! Boundaries: it knows nothing of sequences, KV caches or sampling, and keeps no per-request state.
//! Compute runs on tokio's blocking pool, never on the IO threads. [`run`](mod@run) is the worker
//! process's lifecycle: registration and following the placement leader's assignments; the
//! `placement` module loads and releases replicas of single `(layer, expert)` pairs while serving
//! (`ExpertPlacementService.Place`, for live expert load balancing); [`health`] is its readiness for
//! orchestrators (`grpc.health.v1`) and the drain on shutdown. A coordinator on the same host may
//! move a stream's exchanges onto shared-memory rings (`shm_link`, handshake in the stream's
//! metadata); the stream then only carries liveness.

pub mod health;
mod placement;
pub mod run;
mod selection;
mod service;
mod shm_link;

pub use placement::PlaceError;
pub use run::{DEFAULT_SHUTDOWN_GRACE, ReadyWorker, RunError, WorkerConfig, run, start, start_with_tls};
pub use selection::{ExpertSelection, SelectionError};
pub use service::{ExchangeLimits, ExpertLoader, ExpertWorker, WorkerStats, serve, serve_with_tls};
