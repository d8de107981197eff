//! Expert load balancing, offline half: what a routing trace is and how it is written and read
//! ([`trace`]), the per-expert token loads it sums to ([`LoadMatrix`]), placement planners that
//! replicate hot experts and pack them onto workers ([`plan`]: `balanced`, after DeepSeek's EPLB, and
//! `cost_aware`, which starts from the current placement and trades balance for bytes moved), and a
//! replay that scores placements against a trace ([`replay`]), and, with the `plot` feature, charts
//! of a replay ([`plot`]: PNG and SVG with `plotters`). Serving processes use only
//! [`trace::Recorder`] (through the CLI's `--record-routing`) and [`split_rows`]; nothing here serves
//! requests, talks to the network or touches the registry.
//!
//! Placements are `epserve_control::PlacementMap`, the live placement map's own type, so that a plan
//! written here is what `epserve eplb apply` publishes.
//!
//! Deviations from the contract agreed with the live-rebalancing side (documented here as agreed):
//! - [`replay::imbalance`] returns `Result<f64, ReplayError>`: a placement that leaves an expert with
//!   no host, or misses a layer of the loads, is an error rather than a silently wrong figure.
//! - The aggregate imbalance over layers is `Σ_layers max_worker / Σ_layers mean_worker`: each MoE
//!   layer is its own synchronisation point, so this is the modelled time of the slowest worker
//!   against a perfectly even one (docs/load-balancing.md, "Model").

mod error;
mod load;
pub mod plan;
#[cfg(feature = "plot")]
pub mod plot;
pub mod replay;
mod split;
pub mod trace;

#[cfg(feature = "plot")]
pub use error::PlotError;
pub use error::{PlanError, ReplayError, TraceError};
pub use load::{LoadMatrix, StepLoads};
pub use split::split_rows;
